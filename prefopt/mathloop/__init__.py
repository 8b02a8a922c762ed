"""The verified-math loop: warm-up (SFT) → on-policy pairs labelled by an answer checker → preference
training → verified accuracy on math benchmarks. `loop.MathLoop` runs the stages around a run (cached);
`jobs` runs each one alone (`python -m prefopt.sft`, `.pairs`, `.evaluate`)."""
