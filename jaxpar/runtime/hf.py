"""Hugging Face weights read straight into sharded arrays, for any family.

A family's `weights(config, layout)` says where each parameter comes from (`HFTensor`: a
tensor name with `{l}` for the layer, transposed or not, a map of rows). Every leaf is made by
`jax.make_array_from_callback`: for each of its shards the callback reads only the rectangle
of the checkpoint tensor that the shard needs (the files are memory-mapped, `jaxpar.hf_files`),
so no process ever holds a whole vocab-split or head-split tensor. Values are converted to
the parameter's dtype (bf16 checkpoints load into a float32 model, and back).

Leaves of `blocks` carry leading layer dims: [L, ...], or [S, R, Lc, ...] with a pipeline,
where index (s, r, j) is layer `pipeline.layer_of(s, r, j)`.
"""

from typing import Any

import jax
import numpy as np

from jaxpar.errors import UserError
from jaxpar.hf_files import SafeTensors
from jaxpar.models.base import HFTensor
from jaxpar.parallel import pipeline

# A checkpoint may nest the model one level down (GPT-2's `transformer.`).
_PREFIXES = ("", "transformer.")


def _box(indices: list[np.ndarray], extent: tuple) -> tuple[tuple[slice, ...], list]:
  """The smallest rectangle of a tensor of shape `extent` holding `indices` (those past the
  end excluded), and where each index sits in it (-1: past the end)."""
  box, where = [], []
  for idx, n in zip(indices, extent):
    inside = idx[idx < n]
    lo = int(inside.min()) if inside.size else 0
    hi = int(inside.max()) + 1 if inside.size else 0
    box.append(slice(lo, hi))
    where.append(np.where(idx < n, idx - lo, -1))
  return tuple(box), where


class _Leaf:
  """One parameter: where its values come from, and how to cut any shard of it."""

  def __init__(self, files: SafeTensors, source: HFTensor, prefix: str, shape: tuple,
               lead: int, stages: int | None, n_layers: int):
    self.files, self.source, self.prefix = files, source, prefix
    self.shape, self.lead, self.stages, self.n_layers = shape, lead, stages, n_layers

  def name(self, layer: int | None, expert: int | None = None) -> str:
    return self.prefix + self.source.name.format(l=layer, e=expert)

  def layers(self, ranges: list[range]) -> list[int | None]:
    if self.lead == 0:
      return [None]
    if self.lead == 1:
      return list(ranges[0])
    s, r, j = np.meshgrid(*[np.asarray(x) for x in ranges], indexing="ij")
    return pipeline.layer_of(s, r, j, stages=self.stages, repeats=self.shape[1],
                             n_layers=self.n_layers).ravel().tolist()

  def read(self, layer: int | None, ranges: list[range]) -> np.ndarray:
    """One layer's values at the per-layer indices `ranges` (rows past the end: 0); of
    stacked experts, each expert's tensor read on its own."""
    if self.source.experts:
      return np.stack([self._read(self.name(layer, e), ranges[1:]) for e in ranges[0]])
    return self._read(self.name(layer), ranges)

  def _read(self, name: str, ranges: list[range]) -> np.ndarray:
    src = self.source
    indices = [np.asarray(r) for r in ranges]
    if src.rows is not None:
      indices[0] = src.rows(indices[0])
    if src.transpose:
      indices = indices[::-1]
    box, where = _box(indices, self.files.shape(name))
    block = self.files.read(name, box) if all(b.stop > b.start for b in box) else None
    if block is not None and all(np.array_equal(w, np.arange(len(w))) for w in where):
      return block.T if src.transpose else block  # the box itself: no copy here
    out = np.zeros([len(i) for i in indices], np.float32)
    if block is not None:
      valid = np.ix_(*[w >= 0 for w in where])
      out[valid] = block[np.ix_(*[w[w >= 0] for w in where])]
    return out.T if src.transpose else out

  def callback(self, index: tuple, dtype) -> np.ndarray:
    """The shard at `index`, in `dtype`, filled a layer at a time (no second copy)."""
    ranges = [range(*sl.indices(n)) for sl, n in zip(index, self.shape)]
    out = np.zeros([len(r) for r in ranges], dtype)
    layers = out.reshape(-1, *out.shape[self.lead:])
    for i, l in enumerate(self.layers(ranges[:self.lead])):
      if l is None or l >= 0:  # l < 0: identity padding, zeros
        layers[i] = self.read(l, ranges[self.lead:])
    return out


def _check(files: SafeTensors, leaves: list[_Leaf], n_layers: int, checkpoint: str) -> None:
  """Every tensor the model needs is present, a float, with the shape config.json implies."""
  keys = files.keys()
  for leaf in leaves:
    layers = range(n_layers) if "{l}" in leaf.source.name else [None]
    for layer, expert in [(l, e) for l in layers for e in range(leaf.source.experts or 1)]:
      name = leaf.name(layer, expert)
      if name not in keys:
        raise UserError(f"checkpoint {checkpoint}: the safetensors files have no tensor {name}, "
                        f"which a model with config.json's sizes needs; re-save it with "
                        f"save_pretrained")
      files.array(name)  # a float dtype, or a UserError naming it
      if files.shape(name) != tuple(leaf.source.shape):
        raise UserError(f"checkpoint {checkpoint}: tensor {name} has shape {files.shape(name)}, "
                        f"expected {tuple(leaf.source.shape)} from config.json; the weights and "
                        f"config.json disagree")


def load_params(checkpoint: str, sources: dict, *, shapes: dict, shardings: Any,
                stages: int | None = None, n_layers: int | None = None,
                each=None) -> dict:
  """The parameters of the Hugging Face directory `checkpoint` as a pure dict of sharded
  arrays with the structure of `shapes` (ShapeDtypeStructs; blocks [L, ...], or
  [S, R, Lc, ...] when `stages` is set), each leaf placed by `shardings` and cast to its
  dtype. `sources` (a family's `weights`) has the same structure, with per-layer HFTensors.

  `n_layers`: the model's layers, when the stages hold identity padding past them (uneven
  stages: slots of no layer are zeros). Each device's callback reads only its slice.
  Missing or mis-shaped tensors and unreadable files are one-line UserErrors naming the
  tensor or file, raised before anything is read. `each(path, array)`, if given, takes every
  leaf as soon as it is read, before the next one is (int8: quantised, so the floats never
  exist whole), and gives what the tree holds.
  """
  files = SafeTensors(checkpoint)
  is_source = lambda x: isinstance(x, HFTensor)
  first = jax.tree.leaves(sources, is_leaf=is_source)[0].name.format(l=0, e=0)
  prefix = next((p for p in _PREFIXES if p + first in files.keys()), "")
  lead = 1 if stages is None else 3
  n_layers = n_layers or int(np.prod(jax.tree.leaves(shapes["blocks"])[0].shape[:lead]))

  def leaf(path, source: HFTensor, spec) -> _Leaf:
    layered = lead if path[0].key == "blocks" else 0
    return _Leaf(files, source, prefix, tuple(spec.shape), layered, stages, n_layers)

  leaves = jax.tree_util.tree_map_with_path(leaf, sources, shapes, is_leaf=is_source)
  _check(files, jax.tree.leaves(leaves, is_leaf=lambda x: isinstance(x, _Leaf)), n_layers,
         checkpoint)

  def make(path, leaf: _Leaf, spec, sharding):
    cache: dict[tuple, np.ndarray] = {}  # replicated shards ask for the same slice

    def callback(index):
      key = tuple((sl.start, sl.stop) for sl in index)
      if key not in cache:
        cache[key] = leaf.callback(index, spec.dtype)
      return cache[key]
    array = jax.make_array_from_callback(spec.shape, sharding, callback)
    files.release()  # the pages read so far leave this process
    return array if each is None else each(path, array)

  return jax.tree_util.tree_map_with_path(make, leaves, shapes, shardings,
                                          is_leaf=lambda x: isinstance(x, _Leaf))
