"""Hugging Face GPT-2 weights (`model.safetensors`) read straight into sharded arrays.

Every leaf is made by `jax.make_array_from_callback`: for each of its shards the callback
reads only the rectangle of the Hugging Face tensor that the shard needs (safetensors slices
the file lazily), so no process ever holds a whole vocab-split or head-split tensor. The
mapping from the Hugging Face layout (Conv1D weights stored [in, out]):

    wte[v, d]      = wte.weight[v, d]          rows v >= V (vocab padding) are 0
    wpe, ln_f      = wpe.weight, ln_f.weight / ln_f.bias
    w_q[l, k, d]   = h.l.attn.c_attn.weight[d, 0*D + k]   k = n*H + h (w_k: 1*D, w_v: 2*D)
    b_q[l, k]      = h.l.attn.c_attn.bias[0*D + k]
    w_o[l, d, k]   = h.l.attn.c_proj.weight[k, d]
    w_up[l, f, d]  = h.l.mlp.c_fc.weight[d, f]
    w_down[l, d, f] = h.l.mlp.c_proj.weight[f, d]
    ln_1, ln_2     = h.l.ln_1.weight / bias (scale / bias)

`lm_head.weight` is tied to `wte` and not read. With a pipeline the block leaves are
[S, R, Lc, ...] and index (s, r, j) is layer (r*S + s)*Lc + j (`jaxpar.parallel.pipeline`).
A per-layer dim of the model that fuses several dims of a leaf (k = n*H + h for a leaf
[L, N, H, D]) is read as the flat index, so either layout loads.
"""

import math
import os
from typing import Any

import jax
import numpy as np
import safetensors

from jaxpar.errors import UserError

FILE = "model.safetensors"
_FLOATS = ("F64", "F32", "F16", "BF16")


class _Source:
  """How one leaf's per-layer values come from a Hugging Face tensor: `name` (with `{l}` for
  the layer), transposed or not, columns [offset, offset + width) of its last dim, `rows`
  rows (more than the tensor has for the padded vocabulary: the extra rows are 0)."""

  def __init__(self, name: str, hf_shape: tuple, *, transpose: bool = False, offset: int = 0,
               width: int | None = None, rows: int | None = None):
    self.name, self.hf_shape, self.transpose, self.offset = name, hf_shape, transpose, offset
    self.width = hf_shape[-1] if width is None else width
    self.rows = rows

  @property
  def natural_shape(self) -> tuple:
    """The shape of the model's value for one layer, its dims not split (k, not n and h)."""
    shape = (*self.hf_shape[:-1], self.width)
    if self.rows is not None:
      shape = (self.rows, *shape[1:])
    return shape[::-1] if self.transpose else shape


def _sources(*, V: int, V_padded: int, T: int, D: int, F: int, K: int) -> dict:
  """{leaf path: _Source} for GPT-2 with these sizes (K = n_heads * head_dim)."""
  qkv = {f"w_{c}": _Source("h.{l}.attn.c_attn.weight", (D, 3 * K), transpose=True,
                           offset=i * K, width=K) for i, c in enumerate("qkv")}
  qkv |= {f"b_{c}": _Source("h.{l}.attn.c_attn.bias", (3 * K,), offset=i * K, width=K)
          for i, c in enumerate("qkv")}
  ln = lambda n: {"scale": _Source(f"{n}.weight", (D,)), "bias": _Source(f"{n}.bias", (D,))}
  block = {
      "ln_1": ln("h.{l}.ln_1"), "ln_2": ln("h.{l}.ln_2"),
      "attn": {**qkv, "w_o": _Source("h.{l}.attn.c_proj.weight", (K, D), transpose=True),
               "b_o": _Source("h.{l}.attn.c_proj.bias", (D,))},
      "mlp": {"w_up": _Source("h.{l}.mlp.c_fc.weight", (D, F), transpose=True),
              "b_up": _Source("h.{l}.mlp.c_fc.bias", (F,)),
              "w_down": _Source("h.{l}.mlp.c_proj.weight", (F, D), transpose=True),
              "b_down": _Source("h.{l}.mlp.c_proj.bias", (D,))},
  }
  return {"wte": _Source("wte.weight", (V, D), rows=V_padded),
          "wpe": _Source("wpe.weight", (T, D)), "ln_f": ln("ln_f"), "blocks": block}


def _groups(leaf_dims: tuple, natural: tuple, what: str) -> list[int]:
  """How many consecutive leaf dims make each natural dim ((N, H, D) over (K, D): [2, 1])."""
  groups, i = [], 0
  for size in natural:
    n, prod = 0, 1
    while i + n < len(leaf_dims) and (prod < size or n == 0):
      prod *= leaf_dims[i + n]
      n += 1
    if prod != size:
      raise ValueError(f"{what}: leaf dims {leaf_dims} do not regroup into {natural}")
    groups.append(n)
    i += n
  if i != len(leaf_dims):
    raise ValueError(f"{what}: leaf dims {leaf_dims} do not regroup into {natural}")
  return groups


def _flat_indices(ranges: list[range], dims: tuple) -> np.ndarray:
  """Row-major flat indices of the product of `ranges` over dims of sizes `dims`."""
  grid = np.meshgrid(*[np.asarray(r) for r in ranges], indexing="ij")
  return np.ravel_multi_index([g.ravel() for g in grid], dims) if ranges else np.zeros(1, int)


class _Reader:
  """The open file; `read` cuts one layer's requested values out of the smallest rectangle
  of the tensor that holds them (rows past the tensor's end, the vocab padding, are 0)."""

  def __init__(self, handle, prefix: str):
    self.handle, self.prefix = handle, prefix

  def key(self, source: _Source, layer: int | None) -> str:
    return self.prefix + source.name.format(l=layer)

  def read(self, source: _Source, layer: int | None, index: list[np.ndarray]) -> np.ndarray:
    key = self.key(source, layer)
    hf_index = index[::-1] if source.transpose else list(index)
    hf_index[-1] = hf_index[-1] + source.offset
    extent = source.hf_shape
    valid = [i[i < n] for i, n in zip(hf_index, extent)]
    box = tuple(slice(int(i.min()), int(i.max()) + 1) if i.size else slice(0, 0) for i in valid)
    block = self.handle.get_slice(key)[box] if all(i.size for i in valid) else None
    out = np.zeros([len(i) for i in hf_index], np.float32 if block is None else block.dtype)
    if block is not None:
      where = np.ix_(*[np.flatnonzero(i < n) for i, n in zip(hf_index, extent)])
      out[where] = block[np.ix_(*[i - b.start for i, b in zip(valid, box)])]
    return out.T if source.transpose else out


def _leaf(reader: _Reader, source: _Source, spec: jax.ShapeDtypeStruct, sharding, *,
          layered: int, stages: tuple | None) -> jax.Array:
  """One leaf from its shards; `layered` leading dims index layers (0, 1, or 3 if staged)."""
  shape, dtype = spec.shape, spec.dtype
  dims = shape[layered:]
  groups = _groups(dims, source.natural_shape, reader.key(source, 0))
  seen: dict[tuple, np.ndarray] = {}  # replicated shards ask for the same slice

  def layer_ids(ranges: list[range]) -> np.ndarray:
    if layered == 0:
      return np.array([None], object)
    if layered == 1:
      return np.asarray(ranges[0])
    S, Lc = stages[0], shape[2]
    s, r, j = np.meshgrid(*[np.asarray(x) for x in ranges], indexing="ij")
    return (r * S + s) * Lc + j

  def callback(index: tuple) -> np.ndarray:
    ranges = [range(*sl.indices(n)) for sl, n in zip(index, shape)]
    key = tuple((r.start, r.stop, r.step) for r in ranges)
    if key not in seen:
      natural, at = [], layered
      for size, n in zip(source.natural_shape, groups):
        natural.append(_flat_indices(ranges[at:at + n], dims[at - layered:at - layered + n]))
        at += n
      layers = layer_ids(ranges[:layered])
      per_layer = [reader.read(source, None if l is None else int(l), natural)
                   for l in layers.ravel()]
      out = np.stack(per_layer).reshape([len(r) for r in ranges])
      seen[key] = out.astype(dtype)
    return seen[key]

  return jax.make_array_from_callback(shape, sharding, callback)


def _check(handle, checkpoint: str, prefix: str, sources: dict, n_layers: int) -> None:
  """Every tensor the model needs is present with the shape config.json implies."""
  keys = set(handle.keys())
  for source in jax.tree.leaves(sources, is_leaf=lambda x: isinstance(x, _Source)):
    for layer in range(n_layers) if "{l}" in source.name else [None]:
      key = prefix + source.name.format(l=layer)
      if key not in keys:
        raise UserError(f"checkpoint {checkpoint}: {FILE} has no tensor {key}, which a GPT-2 "
                        f"with config.json's sizes needs; re-save it with save_pretrained")
      tensor = handle.get_slice(key)
      shape = tuple(tensor.get_shape())
      if shape != source.hf_shape:
        raise UserError(f"checkpoint {checkpoint}: tensor {key} has shape {shape}, expected "
                        f"{source.hf_shape} from config.json; the weights and config.json "
                        f"disagree")
      if tensor.get_dtype() not in _FLOATS:
        raise UserError(f"checkpoint {checkpoint}: tensor {key} has dtype "
                        f"{tensor.get_dtype()}, expected a float type ({', '.join(_FLOATS)})")
  extra = f"{prefix}h.{n_layers}.ln_1.weight"
  if extra in keys:
    raise UserError(f"checkpoint {checkpoint}: {FILE} has tensor {extra} but config.json says "
                    f"n_layer={n_layers}; fix n_layer in config.json")


def load_params(checkpoint_dir: str, *, shapes: dict, shardings: Any, vocab_size: int,
                stages_layout: tuple[int, int] | None = None) -> dict:
  """The GPT-2 parameters of `checkpoint_dir`/model.safetensors as a pure dict of sharded
  arrays with the structure of `shapes` (ShapeDtypeStructs, blocks [L, ...], or [S, R, Lc, ...]
  with `stages_layout=(S, R)`), each leaf placed by `shardings` and cast to its dtype.

  Each device's callback reads only its slice from the file. Missing or mis-shaped tensors
  and an unreadable file are one-line UserErrors naming the tensor or file.
  """
  path = os.path.join(checkpoint_dir, FILE)
  if not os.path.isfile(path):
    raise UserError(f"checkpoint {checkpoint_dir}: no {FILE} in the directory; save the model "
                    f"with save_pretrained (safe_serialization, the default)")
  try:
    handle = safetensors.safe_open(path, framework="numpy")
  except Exception as e:  # SafetensorError and OSError: a truncated or foreign file
    raise UserError(f"checkpoint {checkpoint_dir}: {path} is not a readable safetensors file "
                    f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); re-save "
                    f"it with save_pretrained") from None
  prefix = "transformer." if "transformer.wte.weight" in handle.keys() else ""
  blocks = shapes["blocks"]
  w_up = blocks["mlp"]["w_up"].shape
  lead = 1 if stages_layout is None else 3
  n_layers = math.prod(w_up[:lead])
  V_padded, D = shapes["wte"].shape
  K = math.prod(blocks["attn"]["w_o"].shape[lead + 1:])
  sources = _sources(V=vocab_size, V_padded=V_padded, T=shapes["wpe"].shape[0], D=D,
                     F=math.prod(w_up[lead:-1]), K=K)
  _check(handle, checkpoint_dir, prefix, sources, n_layers)
  reader = _Reader(handle, prefix)
  is_source = lambda x: isinstance(x, _Source)

  def load(path_, source: _Source, spec, sharding) -> jax.Array:
    layered = lead if path_[0].key == "blocks" else 0
    return _leaf(reader, source, spec, sharding, layered=layered, stages=stages_layout)

  return jax.tree_util.tree_map_with_path(load, sources, shapes, shardings, is_leaf=is_source)
