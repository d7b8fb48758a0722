"""int8 weights (`model.quantize`) and int8 KV caches (`model.kv_cache_dtype`).

Weights: every matrix a model multiplies by (block weights `w_*`, stored [out, in], and the
[vocab, embed] tables) becomes a `QWeight`: int8 values of the same shape and layout, and
one float32 scale per output channel (per row), shaped [..., out, 1] and sharded like the
weight's rows (the rule table's names for the weight, the contracted `in` dim replaced by
None). Scales are absmax / 127 over the `in` dim, computed on the mesh after the float
weights are loaded or initialised (a row split over devices takes an all-reduce max; the
result equals one device's). Biases, norms and positional tables stay float.

Products go through Qwix (`qwix.einsum` on a `qwix.QArray`):

- `int8`: weight-only; activations stay float, XLA converts the int8 weight inside the
  product. A quarter of the fp32 bytes per device.
- `int8-dynamic`: activations are quantised per token at run time (absmax over the
  contracted dim) and the product runs int8 x int8 with int32 accumulation, rescaled by the
  token's and the channel's scales. Products of fewer than `MIN_ROWS` tokens are padded.

Qwix's model-level entry points (`quantize_model`, `PtqProvider`) are not used: they swap a
module's parameters while tracing it and know nothing of the rule table, the stacked
[layers, ...] blocks that the pipeline regroups, or the per-layer buffers the unrolled
decode uses. Here the quantised tree is a plain pytree like the float one, so sharding,
pipelining and per-layer splitting work unchanged.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxpar.axes import EMBED, VOCAB
from jaxpar.errors import UserError
from jaxpar.rules import Logical, is_logical

MODES = ("int8", "int8-dynamic")
# XLA:CPU runs an int8 x int8 product with 1 row about 18x slower than float32 and with 8 rows
# about 3x faster (measured, [M, 768] x [768, 50257]): int8-dynamic pads a product's tokens
# (the unsharded T dim) with zero rows up to 8.
MIN_ROWS = 8


@flax.struct.dataclass
class QWeight:
  """An int8 matrix [..., out, in] and its per-row scales [..., out, 1]; `mode` says how
  activations meet it. A model reads it like any parameter (`param[...]`)."""
  values: jax.Array
  scale: jax.Array
  mode: str = flax.struct.field(pytree_node=False, default="int8")

  def __getitem__(self, key):
    if key is not Ellipsis:
      raise TypeError("a QWeight is read whole (param[...])")
    return self

  @property
  def shape(self) -> tuple:
    return self.values.shape

  def qarray(self):
    return _qwix().QArray(qvalue=self.values, scale=self.scale)


def _qwix():
  """Qwix, imported when a quantised model runs (jaxpar imports without it)."""
  try:
    import qwix
  except ImportError:
    raise UserError("model.quantize needs Qwix (the JAX quantisation library): pip install "
                    "qwix, or set model.quantize=none") from None
  return qwix


def is_quantized(leaf: Any) -> bool:
  return isinstance(leaf, QWeight)


def quantizable(path: tuple, names: Logical) -> bool:
  """Matrices multiplied by: block weights `w_*` and [vocab, embed] tables."""
  key = getattr(path[-1], "key", str(path[-1]))
  return str(key).startswith("w_") or tuple(names.names[-2:]) == (VOCAB, EMBED)


# Scales multiply by 1/127 (XLA rewrites a division by a constant into this product anyway;
# written out, a reference in numpy computes the very same scales).
INV_127 = np.float32(1 / 127)


def quantize_array(w: jax.Array, mode: str) -> QWeight:
  """Per-row absmax int8: w ~ values * scale."""
  w32 = w.astype(jnp.float32)
  scale = jnp.max(jnp.abs(w32), axis=-1, keepdims=True) * INV_127
  scale = jnp.where(scale > 0, scale, 1.0)
  values = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
  return QWeight(values, scale, mode)


def dequantize(w: QWeight) -> jax.Array:
  return w.values.astype(jnp.float32) * w.scale


def quantized_names(params: dict, names: dict, mode: str, *, present: bool = False) -> dict:
  """The names of `params` once quantised (`present`: as they are, some leaves perhaps
  quantised already): a QWeight's values keep the weight's names, its scale drops the
  contracted (last) one."""
  def leaf(path, p, n):
    if is_quantized(n):  # named already
      return n
    if is_quantized(p) or (not present and quantizable(path, n)):
      return QWeight(n, Logical((*n.names[:-1], None)), mode)
    return n
  return jax.tree_util.tree_map_with_path(leaf, params, names,
                                          is_leaf=lambda x: is_quantized(x) or is_logical(x))


def _check_mode(mode: str) -> None:
  if mode not in MODES:
    raise UserError(f"model.quantize={mode!r}: expected one of none, {', '.join(MODES)}")
  _qwix()


def quantize_params(params: dict, names: dict, mode: str, shardings_for) -> tuple[dict, dict]:
  """(quantised params, their names): float matrices quantised on the mesh, in one program
  whose outputs are born in their shards; leaves already quantised pass through.
  `shardings_for(names)` gives the shardings of a names tree. The float inputs are donated."""
  _check_mode(mode)
  qnames = quantized_names(params, names, mode)

  def convert(params):
    def leaf(path, p, n):
      if not is_quantized(p) and quantizable(path, n):
        return quantize_array(p, mode)
      return p
    return jax.tree_util.tree_map_with_path(leaf, params, names,
                                            is_leaf=lambda x: is_quantized(x))

  out = jax.jit(convert, out_shardings=shardings_for(qnames), donate_argnums=0)(params)
  return out, qnames


def leaf_quantizer(names: dict, mode: str, shardings_for):
  """(quantise, quantised names) for a source that makes the parameters one leaf at a time:
  `quantise(path, array)` turns a float matrix into its QWeight on the mesh (its own small
  program, the float input donated, the int8 values and scales born in their shards) and
  returns any other leaf as it is. Called on each leaf as it is read, the float model never
  exists whole: the load's peak is the int8 model plus one float leaf. Traced inside the
  program that makes the parameters (the seeded initialiser), it is inlined there."""
  _check_mode(mode)
  qnames = quantized_names(names, names, mode)
  flat = lambda tree: dict(jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: is_quantized(x) or is_logical(x))[0])
  floats, quantized = flat(names), flat(qnames)

  def quantise(path: tuple, array: jax.Array):
    if not quantizable(path, floats[path]):
      return array
    return jax.jit(quantize_array, static_argnums=1, donate_argnums=0,
                   out_shardings=shardings_for(quantized[path]))(array, mode)
  return quantise, qnames


# ---- products ----

def einsum(spec: str, x: jax.Array, w: QWeight) -> jax.Array:
  """`spec` (activations, weight [..., out, in]) through Qwix, in x's dtype."""
  qwix = _qwix()
  if w.mode == "int8-dynamic":
    B, T = x.shape[0], x.shape[1]
    pad = -(-MIN_ROWS // B) - T if B * T < MIN_ROWS else 0
    x_pad = jnp.pad(x, ((0, 0), (0, pad), (0, 0))) if pad > 0 else x
    batch_axes = tuple(range(x.ndim - 1))  # one scale per token: absmax over the last dim
    xq = qwix.quantize(x_pad, jnp.int8, channelwise_axes=batch_axes, scale_dtype=jnp.float32)
    return qwix.einsum(spec, xq, w.qarray())[:, :T].astype(x.dtype)
  return qwix.einsum(spec, x, w.qarray()).astype(x.dtype)


def take_rows(table: QWeight, ids: jax.Array, dtype) -> jax.Array:
  """Rows `ids` of a quantised [V, D] table (an embedding lookup), in `dtype`."""
  rows = jnp.take(table.values, ids, axis=0).astype(jnp.float32)
  return (rows * jnp.take(table.scale, ids, axis=0)).astype(dtype)


# ---- KV cache ----

KV_SCALE_DTYPE = jnp.float16  # 2 bytes per token and head: H=64 keys cost 66 bytes, not 256


def quantize_heads(x: jax.Array, axis: int = -1) -> tuple[jax.Array, jax.Array]:
  """int8 values and one scale per token and head (absmax over the head width, `axis`): x
  [B, K, T, H] (axis -1) or [B, K, H, T] (axis 2) gives scales [B, K, T]."""
  x32 = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x32), axis=axis) * INV_127
  scale = jnp.where(scale > 0, scale, 1.0).astype(KV_SCALE_DTYPE)
  values = jnp.clip(jnp.round(x32 / jnp.expand_dims(scale, axis).astype(jnp.float32)),
                    -127, 127)
  return values.astype(jnp.int8), scale
