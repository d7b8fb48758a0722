"""The pieces every decoding program is assembled from, pipelined or not: where the tokens
of a prefill and of one decode step sit (their `Step`), and the end-of-text test."""

import jax
import jax.numpy as jnp

from jaxpar.distributed import say
from jaxpar.models.base import Step


def prompt_step(mask_BT: jax.Array, max_new: int) -> Step:
  """The prefill's Step: positions count each row's real tokens; a query sees the real
  prompt tokens up to itself (slots past the prompt are for new tokens)."""
  B, T0 = mask_BT.shape
  positions_BT = jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0).astype(jnp.int32)
  valid_BS = jnp.concatenate([mask_BT, jnp.ones((B, max_new), bool)], axis=1)
  causal_TS = jnp.arange(T0 + max_new)[None, :] <= jnp.arange(T0)[:, None]
  return Step(positions_BT, causal_TS[None] & valid_BS[:, None, :], 0)


def token_step(mask_BT: jax.Array, max_new: int, n) -> Step:
  """The Step of new token n >= 1 (its input is token n - 1, written at slot T0 + n - 1)."""
  B, T0 = mask_BT.shape
  slot = T0 + n - 1
  positions_B1 = (mask_BT.sum(axis=1).astype(jnp.int32) + n - 1)[:, None]
  valid_BS = jnp.concatenate([mask_BT, jnp.ones((B, max_new), bool)], axis=1)
  mask_B1S = ((jnp.arange(T0 + max_new) <= slot)[None, :] & valid_BS)[:, None, :]
  return Step(positions_B1, mask_B1S, slot)


def is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
  return jnp.isin(tokens, jnp.asarray(eos_ids or (-1,), jnp.int32))


def report(done, total) -> None:
  """Progress from inside a compiled decode loop (a host callback): about 8 lines."""
  done, every = int(done), max(1, total // 8)
  if done % every == 0 or done == total:
    say(f"  decoded {done}/{total} tokens")
