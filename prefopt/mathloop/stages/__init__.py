"""The verified-math loop's stages: warm-up, on-policy pair sampling, the reward model, verified accuracy."""
