"""Model families behind one interface (`jaxpar.models.base.Family`).

A family is two modules here: its model (`gpt`, `llama`, `cnn`; JAX) and its side of the
config (`gpt_config`, ...; JAX-free: its own options, their check, its config.json readers),
which registers in `jaxpar.families` so that `jaxpar.config` can load and check a config
without importing a model. This package imports only those config modules (and so registers
the built-in families when `jaxpar` is imported); the models are in `jaxpar.models.registry`
(`family`, `register` for your own). Nothing outside `models/` names a family.
"""

from jaxpar.models import cnn_config, gpt_config, llama_config  # noqa: F401 (they register)
