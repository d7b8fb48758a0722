"""What the runtime may ask of a decoder-only model: the one interface every family implements,
and the pieces the families share (norms, rotary positions; attention is
`jaxpar.models.attention`).

A family is a `Family`: a dataclass of functions and names, nothing else. Its `make` builds an
NNX module (a `Decoder`) with

    embed(tokens_BT, positions_BT) -> x_BTD     int32 [B, T] ids and positions -> [B, T, D]
    blocks                                       the blocks, stacked on a leading `layers` dim
    head(x_BTD) -> logits_BTV                    final norm and logits, float32 [B, T, V_padded];
                                                 padding columns hold the float32 minimum

and every block (one element of `blocks`) is called one way, by the scan, by the unrolled
path and by the pipeline alike (`run_blocks`):

    block(x_BTD, step, cache) -> (x_BTD, cache)

`step` is a `Step`: each query token's position [B, T] (rotary or learned positions), the
mask [B, T, S] of key slots each query may see (causality and padding; a block adds its own
sliding window), and `index`, the cache slot of the first query token: one for all rows, or
one per row [B] (the serving engine's slots each sit at their own length). `cache` is None
(the keys are the T tokens themselves, S = T) or this layer's KV cache, a dict of arrays
whose shapes and logical names `Family.kv_cache` gives; the block writes its T new entries
at `step.index` (`attention.write_cache`) and attends over all S slots.

A block may also `taps.tap` arrays of what it computed (a mixture of experts: the tokens each
expert got), which `run_blocks(taps=True)` returns per layer; only then are they computed.

Shape letters: B batch, T query tokens, S key slots, D width, N query heads, K key/value
heads, G = N/K queries per key/value head, H head width, F MLP width, V vocabulary, L layers.
"""

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jaxpar import families, quant
from jaxpar.axes import ACT_EMBED, BATCH, LAYERS, SEQ
from jaxpar.config import ModelConfig
from jaxpar.models import taps as taps_lib
from jaxpar.rules import constrain


class Step(NamedTuple):
  """Where the tokens of one call sit: positions [B, T], visible slots [B, T, S], the cache
  slot of the first token: a scalar, or int32 [B] per row (0 without a cache). `rows` > 0:
  the B rows are the first `rows` cache rows of each of the cache's `groups` equal groups
  (B = groups * rows; the serving step over its active rows), else every cache row."""
  positions_BT: jax.Array
  mask_BTS: jax.Array
  index: Any = 0
  rows: int = 0
  groups: int = 1


def causal_step(batch: int, tokens: int, length: int | None = None) -> Step:
  """The Step of `tokens` tokens at positions 0.. in every row, written from cache slot 0 of
  `length` (default: `tokens`): each sees the slots up to its own."""
  length = tokens if length is None else length
  positions_BT = jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32), (batch, tokens))
  mask_1TS = (jnp.arange(length)[None, :] <= jnp.arange(tokens)[:, None])[None]
  return Step(positions_BT, mask_1TS, 0)


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a mesh changes a model's shapes: the vocabulary padded to `vocab_multiple` rows, and
  every key/value head stored `kv_repeat` times when the `model` axis is wider than the
  key/value heads (each device then holds the head its query heads use, Megatron-style)."""
  vocab_multiple: int = 1
  kv_repeat: int = 1


@dataclasses.dataclass(frozen=True)
class HFTensor:
  """Where one parameter comes from in a Hugging Face checkpoint: tensor `name` (`{l}` for the
  layer) of `shape` (what config.json implies), stored [in, out] when `transpose` (GPT-2's
  Conv1D). `rows` maps the parameter's first-dim indices to the tensor's (after the
  transpose); rows past the tensor's end are 0 (the padded vocabulary). `experts` > 0: the
  parameter is that many tensors (`{e}` in the name) stacked on its first dim."""
  name: str
  shape: tuple
  transpose: bool = False
  rows: Callable[[np.ndarray], np.ndarray] | None = None
  experts: int = 0


class Decoder(Protocol):
  blocks: nnx.Module

  def embed(self, tokens_BT: jax.Array, positions_BT: jax.Array) -> jax.Array: ...

  def head(self, x_BTD: jax.Array) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class Family:
  """A model family: everything the runtime, the pipeline and the loaders may ask of it.

  - `spec`: its side of the config (`jaxpar.families.Spec`: name, own options, check,
    config.json readers), JAX-free and registered by name.
  - `make(config, layout, rngs)`: the model (a `Decoder`), parameters named by logical axes.
  - `weights(config, layout)`: {parameter path: HFTensor}, the structure of the parameters
    with block leaves given per layer.
  - `kv_cache(config, layout, batch, length)`: one layer's cache {name: (shape, names[,
    dtype])}, every leaf batch-first (the dtype defaults to model.dtype).
  - `config_keys`: logical name -> the config key behind its size, for errors.
  """
  spec: families.Spec
  make: Callable[[ModelConfig, Layout, nnx.Rngs], Decoder]
  weights: Callable[[ModelConfig, Layout], dict]
  kv_cache: Callable[[ModelConfig, Layout, int, int], dict]
  config_keys: Mapping[str, str]

  @property
  def name(self) -> str:
    return self.spec.name


def run_blocks(graphdef: nnx.GraphDef, layers: Any, x_BTD: jax.Array, step: Step,
               caches: Any = None, *, scan: bool,
               active: jax.Array | None = None,
               window: tuple[Any, int] | None = None, taps: bool = False):
  """Runs every block in order: the one way through a stack.

  `scan`: `layers` are the stacked parameters [L, ...] and `caches` (if any) stacked
  [L, ...] too, run by a `lax.scan` (compile time independent of depth). Otherwise `layers`
  is a sequence of per-layer parameter dicts and `caches` a tuple of per-layer caches (on
  XLA:CPU each then updates in place and no step cuts weights out of a stack).
  `active` (scan only): a bool per layer [L]; where False the layer passes its input through
  unchanged (the identity padding of uneven pipeline stages).
  `window` = (first, count) (scan only, no caches): layers first..first+count-1 of the
  stack (`first` may be traced), each picked inside the loop (slicing them out first would
  copy their weights: the circular pipeline's chunks).
  Returns (x_BTD, caches); with `taps`, (x_BTD, caches, taps): the blocks' `tap`ped arrays, a
  tuple of [L, ...] (the layers' in order).
  """
  def block(params, x_BTD, cache):
    if not taps:
      return nnx.merge(graphdef, params)(x_BTD, step, cache)
    with taps_lib.collecting() as tapped:
      y_BTD, cache = nnx.merge(graphdef, params)(x_BTD, step, cache)
    return y_BTD, (cache, tuple(tapped))

  if scan:
    def picked(j):  # layer first + j of the stack, no cache
      pick = lambda tree: jax.tree.map(
          lambda a: lax.dynamic_index_in_dim(a, window[0] + j, 0, keepdims=False), tree)
      return pick(layers), None, None if active is None else pick(active)

    def layer(x_BTD, inputs):
      params, cache, on = inputs if window is None else picked(inputs)
      with jax.named_scope("block"):
        y_BTD, cache = block(params, x_BTD, cache)
      return (y_BTD if on is None else jnp.where(on, y_BTD, x_BTD)), cache
    xs = (layers, caches, active) if window is None else jnp.arange(window[1])
    x_BTD, out = lax.scan(layer, x_BTD, xs)
    return (x_BTD, *out) if taps else (x_BTD, out)
  new = []
  for l, params in enumerate(layers):
    with jax.named_scope(f"block_{l}"):
      x_BTD, cache = block(params, x_BTD, None if caches is None else caches[l])
    new.append(cache)
  if taps:
    caches, tapped = zip(*new)
    return x_BTD, None if caches[0] is None else caches, jax.tree.map(
        lambda *a: jnp.stack(a), *tapped)
  return x_BTD, None if caches is None else tuple(new)


def stack(make_block: Callable[[nnx.Rngs], nnx.Module], n_layers: int,
          rngs: nnx.Rngs) -> nnx.Module:
  """`n_layers` blocks with their parameters stacked on a leading `layers` dim."""
  @nnx.split_rngs(splits=n_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS})
  def blocks(rngs: nnx.Rngs) -> nnx.Module:
    return make_block(rngs)
  return blocks(rngs)


# ---- parameters ----

def param(rngs: nnx.Rngs, shape: tuple, names: tuple, std: float, dtype) -> nnx.Param:
  init = jax.random.normal(rngs.params(), shape, jnp.float32) * std
  return nnx.Param(init.astype(dtype), out_sharding=names)


def const(shape: tuple, names: tuple, value: float, dtype) -> nnx.Param:
  return nnx.Param(jnp.full(shape, value, dtype), out_sharding=names)


def padded_vocab(vocab_size: int, multiple: int) -> int:
  """The vocabulary rounded up to `multiple` rows (GPT-2's 50257 is 29 x 1733)."""
  return -(-vocab_size // multiple) * multiple


def embedding(rngs: nnx.Rngs, cfg: ModelConfig, layout: Layout, names: tuple,
              dtype) -> nnx.Param:
  """[V_padded, D] rows drawn at init_std; the padding rows are 0."""
  V = padded_vocab(cfg.vocab_size, layout.vocab_multiple)
  table = jax.random.normal(rngs.params(), (V, cfg.d_model), jnp.float32) * cfg.init_std
  table = jnp.where(jnp.arange(V)[:, None] < cfg.vocab_size, table, 0.0)
  return nnx.Param(table.astype(dtype), out_sharding=names)


def vocab_logits(x_BTD: jax.Array, table_VD: jax.Array, vocab_size: int) -> jax.Array:
  """Float32 logits [B, T, V_padded] against a [V, D] table; padding columns at the minimum."""
  if quant.is_quantized(table_VD):
    logits_BTV = quant.einsum("btd,vd->btv", x_BTD, table_VD).astype(jnp.float32)
  else:
    logits_BTV = times_rows(x_BTD, table_VD).astype(jnp.float32)
  V = logits_BTV.shape[-1]
  return jnp.where(jnp.arange(V) < vocab_size, logits_BTV, jnp.finfo(jnp.float32).min)


def embed_rows(table_VD: jax.Array, tokens_BT: jax.Array, dtype) -> jax.Array:
  """Rows of an embedding table (float or `quant.QWeight`) in `dtype`."""
  if quant.is_quantized(table_VD):
    return quant.take_rows(table_VD, tokens_BT, dtype)
  return jnp.take(table_VD, tokens_BT, axis=0)


def expand_kv_rows(rows: np.ndarray, *, kv_repeat: int, head_dim: int) -> np.ndarray:
  """Row e*H + h of a key/value projection stored `kv_repeat` times per head reads row
  (e // kv_repeat)*H + h of the checkpoint's: copies of a head sit side by side."""
  head, within = rows // head_dim, rows % head_dim
  return (head // kv_repeat) * head_dim + within


# ---- norms ----

def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """x / rms(x) * scale, the statistics in float32 (as Hugging Face's Llama computes them)."""
  x32 = x.astype(jnp.float32)
  y = x32 * lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return scale * y.astype(x.dtype)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  y = (x32 - mean) * lax.rsqrt(var + eps)
  return (y * scale + bias).astype(x.dtype)


# ---- rotary positions ----

def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies [H/2] (float32) for rope_type default, linear or llama3 (the rotary
  options of `cfg.options`, e.g. `LlamaOptions`)."""
  H, o = cfg.head_size, cfg.options
  inv = 1.0 / (o.rope_theta ** (np.arange(0, H, 2, dtype=np.float64) / H))
  if o.rope_type == "linear":
    inv = inv / o.rope_factor
  elif o.rope_type == "llama3":
    # Long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
    old = o.rope_original_max_len
    low, high = old / o.rope_low_freq_factor, old / o.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - o.rope_low_freq_factor) / (
        o.rope_high_freq_factor - o.rope_low_freq_factor)
    blended = (1 - smooth) * inv / o.rope_factor + smooth * inv
    inv = np.where(wavelen > low, inv / o.rope_factor, np.where(wavelen < high, inv, blended))
  return inv.astype(np.float32)


def rope(x_BTNH: jax.Array, positions_BT: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotary positions, the two halves of each head rotated (Hugging Face's layout), in
  float32."""
  angles_BTh = positions_BT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
  cos, sin = jnp.cos(angles_BTh)[:, :, None], jnp.sin(angles_BTh)[:, :, None]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


def cache_leaf(spec, cfg: ModelConfig) -> tuple:
  """(shape, names, dtype) of one `Family.kv_cache` entry; a (shape, names) entry is in
  model.dtype (a family may give either)."""
  return tuple(spec) if len(spec) == 3 else (*spec, jnp.dtype(cfg.dtype))


def project(x_BTD: jax.Array, w_OD: jax.Array, b_O: jax.Array | None = None) -> jax.Array:
  """x @ w.T (+ b) with w stored [out, in]: XLA:CPU multiplies these in place."""
  if quant.is_quantized(w_OD):
    y = quant.einsum("btd,od->bto", x_BTD, w_OD)
  else:
    y = times_rows(x_BTD, w_OD)
  return y if b_O is None else y + b_O


def times_rows(x_BTD: jax.Array, w_OD: jax.Array) -> jax.Array:
  """x @ w.T [B, T, O] for w stored [out, in]. A decode step (one token per row) and a pass
  of a few tokens (speculation's check of k + 1 per row: B * T <= 16) multiply weights first,
  w @ x.T, and transpose the small product: XLA:CPU then streams w's rows as stored instead
  of reading it transposed (one CPU device, float32, the same tokens: GPT-2 124M 1.21x decode
  tokens/s at batch 8, 1.0x at 1 and 32; a 4-layer Llama of width 2048 1.43x at batch 8;
  benchmarks/decode_layout.py; GPT-2's products at 2 to 4 tokens of one row: 1.2-1.4x)."""
  if x_BTD.shape[1] == 1 or x_BTD.shape[0] * x_BTD.shape[1] <= 16:
    # (jnp.einsum would put x first again: the transpose is explicit)
    return jnp.transpose(jnp.einsum("od,btd->obt", w_OD, x_BTD), (1, 2, 0))
  return jnp.einsum("btd,od->bto", x_BTD, w_OD)


def residual(x_BTD: jax.Array) -> jax.Array:
  return constrain(x_BTD, (BATCH, SEQ, ACT_EMBED))
