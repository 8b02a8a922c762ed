"""Helpers the tests share: the real config composed with small sizes, the tiny model's spec, the scripts."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from prefopt.config import conf_dir

# The verified-math stages around a run (warm-up, on-policy pairs, verified accuracy) have tests of their own.
MATHLOOP_OFF = ["mathloop.warmup=false", "mathloop.pairs=false", "mathloop.evaluate=false"]
# The tiny random-init model: the default model is the real SmolLM2-135M-Instruct (conf/config.yaml), which the
# real-model tests choose themselves. A later model= or an experiment's own model choice wins over this one.
TINY_MODEL = "model=tiny_qwen"
# Small enough for a few seconds per run on 2 cores.
TINY = [
    TINY_MODEL,
    "steps=3",
    "batch_size=4",
    "micro_batch_size=2",
    "eval_every=2",
    "data.source.n_train=32",
    "data.source.n_eval=8",
    "train.progress=false",
] + MATHLOOP_OFF


# A tiny qwen2 with the character tokenizer (ModelSpec keyword arguments): what the unit tests build models from.
TINY_SPEC = dict(
    arch="qwen2",
    tokenizer="char",
    config=dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
)


def chooses_model(args) -> bool:
    """The overrides pick the model themselves: a model= or an experiment (which brings its own)."""
    return any(a.startswith(("model=", "experiment=")) for a in args)


def tiny_model(args) -> list[str]:
    """`python -m prefopt.run` arguments on the tiny model, unless they choose a model or an experiment."""
    args = list(args)
    return args if chooses_model(args) else [*args, TINY_MODEL]  # at the end: Hydra's -m must come before overrides


def compose_cfg(overrides: list[str] | None = None, tiny: bool = True):
    overrides = list(overrides or [])
    base = TINY if tiny else []  # tiny=False: the config as a user composes it (the real default model)
    if chooses_model(overrides):
        base = [o for o in base if o != TINY_MODEL]
    if any(o.startswith("data=") for o in overrides):  # the sizes below belong to the arithmetic source only
        base = [o for o in base if not o.startswith("data.source.")]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=base + overrides)


def script_module(name: str):
    """scripts/<name>.py, imported as a module (the scripts are not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script
