"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

Random draws are keyed by (seed, prompt row, step) only, never by device or pipeline group,
so the same seed gives the same tokens on every mesh.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 0.0  # 0: greedy (argmax)
  top_k: int = 0
  top_p: float = 1.0


def row_keys(key: jax.Array, rows_B: jax.Array, step) -> jax.Array:
  """One key per row [B] for decode step `step`: fold_in(fold_in(key, row), step)."""
  return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(key, r), step))(rows_B)


def sample(logits_BV: jax.Array, keys_B: jax.Array, s: Sampling) -> jax.Array:
  """Next tokens [B] from float32 logits (padding columns already at the float minimum), row
  b drawn with key `keys_B[b]`."""
  if s.temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / s.temperature
  low = jnp.finfo(jnp.float32).min
  if s.top_k:
    kth_B1 = lax.top_k(logits_BV, s.top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, low, logits_BV)
  if s.top_p < 1:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
    keep_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV) < s.top_p
    cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < cutoff_B1, low, logits_BV)
  draw = lambda key, logits_V: jax.random.categorical(key, logits_V)
  return jax.vmap(draw)(keys_B, logits_BV).astype(jnp.int32)
