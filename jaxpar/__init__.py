"""jaxpar: run Flax models in parallel over a (data, stage, model) device mesh."""

import os
import re
import sys

__version__ = "0.1.0"

# The built-in families' config modules (JAX-free) register in `jaxpar.families`, so that
# `jaxpar.config` finds them without importing a model.
from jaxpar import models  # noqa: E402,F401


def emulate_cpu_devices(n: int) -> None:
  """Asks XLA for `n` emulated CPU devices (used when no accelerator is present). Call it
  before anything asks JAX for its devices; afterwards the count is fixed, and asking for
  another one is an error rather than silently ignored."""
  if n < 1:
    raise ValueError(f"emulate_cpu_devices({n}): need at least 1 device")
  if "jax" in sys.modules:
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
      import jax
      have = len(jax.devices("cpu"))
      if have != n:
        raise RuntimeError(f"emulate_cpu_devices({n}): JAX already started with {have} CPU "
                           f"devices; call it first thing, before any jax.devices() or jit")
      return
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
