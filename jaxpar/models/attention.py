"""Grouped-query attention over a KV cache, the part every family's attention shares: the
cache's layout (`attention_cache`), writing a call's new keys and values into it
(`write_cache`, `write_rows`) and attending over it (`attend`). A block calls

    keys, values, cache = write_cache(cache, k_BTKH, v_BTKH, step)
    out_BTK = attend(q_BTNH, keys, values, step, window=...)

Shape letters as in `jaxpar.models.base`.
"""

import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxpar import quant
from jaxpar.axes import BATCH, HEAD_DIM, KV_HEADS, SEQ
from jaxpar.config import ModelConfig
from jaxpar.models.base import Layout, Step
from jaxpar.rules import by_group, constrain, lead_rows


def write_cache(cache: dict | None, k_BTKH: jax.Array, v_BTKH: jax.Array, step: Step):
  """(keys [B, K, H, S] and values [B, K, S, H] to attend over, the new cache): the T new
  entries written at slot `step.index`, one for all rows or one per row [B] (a scatter along
  the rows, in place); with `step.rows`, into those cache rows only (`write_rows`). The cache
  is stored in the layouts the two attention products read, so no step transposes it, and
  both are plain matrix products per (row, key/value head): scores = queries [G*T, H] @ keys
  [H, S], out = probabilities [G*T, S] @ values [S, H]. (Keys stored [S, H] made the first
  product a transposed one that XLA:CPU ran 1.3x to 4.8x slower at decode shapes; stored
  [B, S, K, H], every layer copied its whole cache twice per step.) An int8 cache (`k_scale`
  and `v_scale` leaves [B, K, S], one per token and head) gives keys and values as (int8
  values, scales) pairs, which `attend` takes."""
  k_BKHT, v_BKTH = k_BTKH.transpose(0, 2, 3, 1), v_BTKH.transpose(0, 2, 1, 3)
  if cache is None:
    return k_BKHT, v_BKTH, None
  index = step.index

  def write(old, new, axis):
    new = new.astype(old.dtype)
    if step.rows:
      return write_rows(old, new, index, axis, step.rows, step.groups)
    at = index
    if jnp.ndim(at) == 1 and old.shape[0] == 1:  # one row: its slot as a scalar (in place)
      at = at[0]
    if jnp.ndim(at) == 0:
      if old.shape[0] == 1:  # in place (`decode_loop.batch_dim`)
        return lax.dynamic_update_slice_in_dim(old[0], new[0], at, axis=axis - 1)[None]
      return lax.dynamic_update_slice_in_dim(old, new, at, axis=axis)
    row = lambda o, n, i: lax.dynamic_update_slice_in_dim(o, n, i, axis=axis - 1)
    return jax.vmap(row)(old, new, index)

  read = (lambda a: a) if not step.rows else (lambda a: lead_rows(a, step.rows, step.groups))
  if "k_scale" not in cache:
    new = {"k": write(cache["k"], k_BKHT, 3), "v": write(cache["v"], v_BKTH, 2)}
    return read(new["k"]), read(new["v"]), new
  (k_q, k_s), (v_q, v_s) = quant.quantize_heads(k_BKHT, axis=2), quant.quantize_heads(v_BKTH)
  new = {"k": write(cache["k"], k_q, 3), "v": write(cache["v"], v_q, 2),
         "k_scale": write(cache["k_scale"], k_s, 2), "v_scale": write(cache["v_scale"], v_s, 2)}
  return ((read(new["k"]), read(new["k_scale"])), (read(new["v"]), read(new["v_scale"])), new)


def write_rows(old: jax.Array, new: jax.Array, index_B: jax.Array, axis: int, rows: int,
               groups: int) -> jax.Array:
  """`old` with the T new entries of each row of `lead_rows(old, rows, groups)` (new
  [B, ...] with T along `axis`) at `index_B`.. along `axis`: a scatter on each device into
  its own rows, in place."""
  T = new.shape[axis]

  def one(old, new, index):  # [per, ...], [rows, ...], [rows]: one group's
    at_RT = index[:, None] + jnp.arange(T, dtype=index.dtype)
    at = (jnp.arange(rows)[:, None],) + (slice(None),) * (axis - 1) + (at_RT,)
    # The two index arrays, apart, lead the indexed shape: [rows, T, the rest...].
    return old.at[at].set(jnp.moveaxis(new, axis, 1), unique_indices=True)
  return by_group(one, groups, old, new, index_B)


def attend(q_BTNH: jax.Array, k_BKHS, v_BKSH, step: Step, *,
           window: int = 0) -> jax.Array:
  """Grouped-query attention [B, T, N*H]: query head n reads key/value head n // (N/K).

  Keys come [B, K, H, S] and values [B, K, S, H] (`write_cache`). A mask narrower than the
  cache (`step.mask_BTS` [B, T, S'], S' < S) reads the first S' slots only, which must then
  hold every key a query sees (the serving engine decodes over the live span of its slots).
  `window` > 0 limits each query to the keys less than `window` slots behind it. Slots and
  positions differ by each row's left padding only, so a window in slots is one in
  positions. Keys and values may be int8 with per-token, per-head scales [B, K, S]: the key
  scales multiply the scores, the value scales the probabilities.
  """
  k_scale = v_scale = None
  if isinstance(k_BKHS, tuple):
    (k_BKHS, k_scale), (v_BKSH, v_scale) = k_BKHS, v_BKSH
  S = step.mask_BTS.shape[-1]
  if v_BKSH.shape[2] > S:
    k_BKHS, v_BKSH = k_BKHS[..., :S], v_BKSH[:, :, :S]
    if k_scale is not None:
      k_scale, v_scale = k_scale[..., :S], v_scale[..., :S]
  if k_scale is not None:
    k_BKHS, v_BKSH = k_BKHS.astype(q_BTNH.dtype), v_BKSH.astype(q_BTNH.dtype)
  B, T, N, H = q_BTNH.shape
  K = v_BKSH.shape[1]
  G = N // K
  q_BKGTH = constrain(q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4),
                      (BATCH, KV_HEADS, None, SEQ, HEAD_DIM))
  # A key/value head's G query heads and T positions are one run of G*T query rows, so both
  # products are plain batched matrix products over (b, k). (Kept apart, with the output's
  # T before K, XLA:CPU ran the probabilities-times-values product 5x slower at 8 rows.)
  q_BKQH = q_BKGTH.reshape(B, K, G * T, H)
  scores = jnp.einsum("bkqh,bkhs->bkqs", q_BKQH, k_BKHS).astype(jnp.float32)
  scores = scores / math.sqrt(H)
  if k_scale is not None:
    scores = scores * k_scale[:, :, None, :].astype(jnp.float32)
  mask_BTS = step.mask_BTS
  if window:
    query_BT = jnp.reshape(step.index, (-1, 1)) + jnp.arange(T)  # [1, T] or [B, T]
    mask_BTS = mask_BTS & (query_BT[:, :, None] - jnp.arange(S) < window)
  mask_B1QS = jnp.broadcast_to(mask_BTS[:, None, None], (mask_BTS.shape[0], 1, G, T, S))
  scores = jnp.where(mask_B1QS.reshape(-1, 1, G * T, S), scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  if v_scale is not None:
    probs = probs * v_scale[:, :, None, :].astype(jnp.float32)
  probs = probs.astype(v_BKSH.dtype)
  out_BKQH = jnp.einsum("bkqs,bksh->bkqh", probs, v_BKSH)
  out_BTKGH = out_BKQH.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4)
  return out_BTKGH.reshape(B, T, N * H)


def attention_cache(cfg: ModelConfig, layout: Layout, batch: int, length: int) -> dict:
  """One layer's KV cache {leaf: (shape, names, dtype)}: keys [B, K * kv_repeat, H, S] and
  values [B, K * kv_repeat, S, H] (the layouts `attend` reads); with model.kv_cache_dtype
  int8 these are int8 and `k_scale`/`v_scale` [B, K * kv_repeat, S] hold one scale per token
  and head."""
  K = cfg.kv_heads * layout.kv_repeat
  H = cfg.head_size
  keys = ((batch, K, H, length), (BATCH, KV_HEADS, HEAD_DIM, SEQ))
  values = ((batch, K, length, H), (BATCH, KV_HEADS, SEQ, HEAD_DIM))
  if cfg.kv_cache_dtype != "int8":
    return {"k": (*keys, jnp.dtype(cfg.dtype)), "v": (*values, jnp.dtype(cfg.dtype))}
  scale = ((batch, K, length), (BATCH, KV_HEADS, SEQ), jnp.dtype(quant.KV_SCALE_DTYPE))
  return {"k": (*keys, jnp.dtype(jnp.int8)), "v": (*values, jnp.dtype(jnp.int8)),
          "k_scale": scale, "v_scale": scale}
