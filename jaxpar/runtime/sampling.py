"""Choosing the next token from logits: greedy, temperature, top-k, top-p."""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 0.0  # 0: greedy (argmax)
  top_k: int = 0
  top_p: float = 1.0


def sample(logits_BV: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
  """Next tokens [B] from float32 logits (padding columns already at the float minimum)."""
  if s.temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / s.temperature
  low = jnp.finfo(jnp.float32).min
  if s.top_k:
    kth_B1 = lax.top_k(logits_BV, s.top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, low, logits_BV)
  if s.top_p < 1:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
    keep_BV = (cum_BV - jax.nn.softmax(sorted_BV, axis=-1)) < s.top_p
    cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < cutoff_B1, low, logits_BV)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)
