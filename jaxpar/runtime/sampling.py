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


def _order_key(x: jax.Array) -> jax.Array:
  """float32 -> uint32 with the same order (so thresholds can be searched bit by bit)."""
  i = lax.bitcast_convert_type(x, jnp.int32)
  u = lax.bitcast_convert_type(i, jnp.uint32)
  return jnp.where(i < 0, ~u, u | jnp.uint32(0x80000000))


def _search(count_ok, like_B: jax.Array, *, largest: bool) -> jax.Array:
  """Per row, the largest (or smallest) uint32 key u with count_ok(u) true, by bisection
  over its 32 bits (`like_B`: any uint32 [B] of the data); `count_ok` is monotone. Every step is a masked sum over the vocabulary,
  which a vocabulary split over `model` turns into an all-reduce: no sort, no gather (a sort
  of a split vocabulary needs collective-permutes, which deadlock inside the pipeline's
  last-stage `lax.cond`)."""
  lo = like_B & jnp.uint32(0)  # made from the data, so a shard_map's loop carry matches it
  hi = lo | jnp.uint32(0xFFFFFFFF)

  def step(_, bounds):
    lo, hi = bounds
    half = (hi - lo) // 2
    if largest:  # invariant: count_ok(lo)
      mid = lo + half + ((hi - lo) & 1)
      ok = count_ok(mid)
      return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)
    mid = lo + half  # invariant: count_ok(hi)
    ok = count_ok(mid)
    return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

  lo, hi = lax.fori_loop(0, 32, step, (lo, hi))
  return lo if largest else hi


def sample(logits_BV: jax.Array, keys_B: jax.Array, s: Sampling) -> jax.Array:
  """Next tokens [B] from float32 logits (padding columns already at the float minimum), row
  b drawn with key `keys_B[b]`."""
  if s.temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  draw = lambda key, logits_V: jax.random.categorical(key, logits_V)
  return jax.vmap(draw)(keys_B, filter_logits(logits_BV, s)).astype(jnp.int32)


def filter_logits(logits_BV: jax.Array, s: Sampling) -> jax.Array:
  """Logits / temperature, with the tokens top-k and top-p drop set to the float minimum:
  top-k keeps the k likeliest (ties included); top-p keeps the smallest set of likeliest
  tokens whose mass reaches top_p (always the top token)."""
  logits_BV = logits_BV / s.temperature
  low = jnp.finfo(jnp.float32).min
  if s.top_k:
    keys_BV = _order_key(logits_BV)
    kth_B = _search(lambda u: jnp.sum(keys_BV >= u[:, None], axis=-1) >= s.top_k,
                    keys_BV[:, 0], largest=True)
    logits_BV = jnp.where(keys_BV >= kth_B[:, None], logits_BV, low)
  if s.top_p < 1:
    keys_BV, probs_BV = _order_key(logits_BV), jax.nn.softmax(logits_BV, axis=-1)
    # The smallest key whose strictly likelier tokens hold less than top_p of the mass.
    above = lambda u: jnp.sum(jnp.where(keys_BV > u[:, None], probs_BV, 0.0), axis=-1)
    cut_B = _search(lambda u: above(u) < s.top_p, keys_BV[:, 0], largest=False)
    logits_BV = jnp.where(keys_BV >= cut_B[:, None], logits_BV, low)
  return logits_BV
