"""prefopt: config-driven direct preference optimization of causal language models."""

from prefopt.config import register_resolvers

register_resolvers()

__version__ = "0.1.0"
