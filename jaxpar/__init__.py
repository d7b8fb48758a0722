"""jaxpar: run Flax models in parallel over a (data, stage, model) device mesh."""

__version__ = "0.1.0"
