"""Test set-up: 8 emulated CPU devices and a persistent compilation cache.

XLA_FLAGS must be set before JAX is imported, so this runs first. Fixtures build small models
once per session.
"""

import os
import pathlib

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxpar import config as config_lib  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
jax.config.update("jax_compilation_cache_dir", str(ROOT / ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def root() -> pathlib.Path:
  return ROOT


@pytest.fixture(scope="session")
def tiny() -> config_lib.Config:
  """configs/tiny.yaml: vocab 250 (padded on every split), 8 heads, 2 layers."""
  return config_lib.load(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="session")
def devices() -> list:
  assert len(jax.devices()) == 8, "tests expect 8 emulated CPU devices"
  return jax.devices()
