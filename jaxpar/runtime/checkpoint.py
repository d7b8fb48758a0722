"""Checkpoints that follow the mesh: Orbax in the model's natural layout, and back to Hugging
Face.

A jaxpar checkpoint is a directory with

    params/       an Orbax (OCDBT) checkpoint of the parameters in their natural layout
    jaxpar.json   the family, its sizes, every parameter's logical names; written last

The natural layout is the one no mesh chooses: blocks stacked [L, ...] (no stages, repeats or
per-layer buffers), the vocabulary unpadded, each key/value head once. It is computed on the
devices (a jitted transform of the sharded parameters, by their logical names), and Orbax
writes every process's own shards. Restoring reads each shard into a sharding the natural
shapes allow (`storage_shardings`), then one jitted transform pads, copies and regroups them
into the target mesh's layout: no host ever holds a whole tensor.

Saves are atomic: everything is written to `OUT.partial` and renamed to `OUT` once complete
(jaxpar.json last), so a killed conversion leaves no directory at `OUT` and never touches
another path; a directory without jaxpar.json is refused as incomplete.
"""

import asyncio
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpar import axes, hf_files
from jaxpar.checkpoint_meta import (FORMAT, META, PARAMS, PARTIAL, TOKENIZER_FILES,
                                    check_out, read_meta)
from jaxpar.config import ModelConfig, model_fields
from jaxpar.distributed import tree_to_host
from jaxpar.errors import UserError
from jaxpar.models import registry
from jaxpar.models.base import HFTensor, Layout
from jaxpar.rules import Logical, Rules, is_logical

# ModelConfig fields that describe how a run goes, not the model: never saved.
_RUN_FIELDS = ("checkpoint", "scan_layers", "dtype", "init_std")


# ---- the natural layout, by logical names ----

def _natural_size(name, size: int, cfg: ModelConfig, layout: Layout) -> int:
  if name == axes.VOCAB:
    return cfg.vocab_size
  if name == axes.KV_HEADS:
    return size // layout.kv_repeat
  return size


def natural_shapes(shapes: Any, names: Any, cfg: ModelConfig, layout: Layout) -> Any:
  """The natural ShapeDtypeStructs of parameters shaped for `layout` (blocks [L, ...])."""
  def natural(n: Logical, s) -> jax.ShapeDtypeStruct:
    dims = tuple(_natural_size(k, d, cfg, layout) for k, d in zip(n.names, s.shape))
    return jax.ShapeDtypeStruct(dims, s.dtype)
  return jax.tree.map(natural, names, shapes, is_leaf=is_logical)


def to_natural(params: Any, names: Any, cfg: ModelConfig, layout: Layout) -> Any:
  """Parameters shaped for `layout` -> natural: vocabulary padding cut, one copy per key/value
  head kept (traceable)."""
  def leaf(n: Logical, x: jax.Array) -> jax.Array:
    for dim, name in enumerate(n.names):
      if name == axes.VOCAB:
        x = jax.lax.slice_in_dim(x, 0, cfg.vocab_size, axis=dim)
      elif name == axes.KV_HEADS and layout.kv_repeat > 1:
        K, R, H = cfg.kv_heads, layout.kv_repeat, cfg.head_size
        x = x.reshape(*x.shape[:dim], K, R, H, *x.shape[dim + 1:])
        x = jax.lax.index_in_dim(x, 0, axis=dim + 1, keepdims=False)
        x = x.reshape(*x.shape[:dim], K * H, *x.shape[dim + 2:])
    return x
  return jax.tree.map(leaf, names, params, is_leaf=is_logical)


def from_natural(params: Any, names: Any, cfg: ModelConfig, layout: Layout) -> Any:
  """The inverse of `to_natural`: padding rows (zeros) added, key/value heads copied."""
  def leaf(n: Logical, x: jax.Array) -> jax.Array:
    for dim, name in enumerate(n.names):
      if name == axes.VOCAB:
        pad = [(0, 0)] * x.ndim
        pad[dim] = (0, -(-cfg.vocab_size // layout.vocab_multiple) * layout.vocab_multiple
                    - cfg.vocab_size)
        x = jnp.pad(x, pad)
      elif name == axes.KV_HEADS and layout.kv_repeat > 1:
        K, R, H = cfg.kv_heads, layout.kv_repeat, cfg.head_size
        x = x.reshape(*x.shape[:dim], K, 1, H, *x.shape[dim + 1:])
        x = jnp.repeat(x, R, axis=dim + 1)
        x = x.reshape(*x.shape[:dim], K * R * H, *x.shape[dim + 3:])
    return x
  return jax.tree.map(leaf, names, params, is_leaf=is_logical)


def storage_shardings(shapes: Any, names: Any, rules: Rules, mesh: Mesh) -> Any:
  """Shardings the natural shapes allow: the rules' spec, with a mesh axis that does not
  divide its dim (an unpadded vocabulary, uncopied key/value heads) moved to the largest dim
  it divides, so no device holds a whole tensor it would not otherwise hold."""
  def sharding(n: Logical, s) -> NamedSharding:
    spec = list(rules.spec(n.names, mesh_axis_names=mesh.axis_names))
    freed = []
    for dim, part in enumerate(spec):
      split = () if part is None else (part if isinstance(part, tuple) else (part,))
      if s.shape[dim] % int(np.prod([mesh.shape[a] for a in split])):
        spec[dim] = None
        freed += list(split)
    for axis in freed:
      free = [d for d in np.argsort(s.shape)[::-1]
              if spec[d] is None and s.shape[d] % mesh.shape[axis] == 0]
      if free:
        spec[free[0]] = axis
    return NamedSharding(mesh, P(*spec))
  return jax.tree.map(sharding, names, shapes, is_leaf=is_logical)


def _name_table(names: Any) -> dict:
  return {jax.tree_util.keystr(path): list(n.names)
          for path, n in jax.tree.leaves_with_path(names, is_leaf=is_logical)}


# ---- atomic directories ----

def _replace_atomically(out: str, *, overwrite: bool, write: Callable[[str], None],
                        source: str = "") -> None:
  """Runs `write(tmp)` into `out.partial` and copies the tokenizer files of the checkpoint
  `source` there, then renames it to `out` (the old `out` removed only after the new one is
  in place; never `source` itself)."""
  if jax.process_index() == 0:  # the one that renames (the others may come after it has)
    out = check_out(out, overwrite=overwrite, source=source)
  out = os.path.abspath(out)
  tmp = out + PARTIAL
  if jax.process_index() == 0 and os.path.exists(tmp):
    shutil.rmtree(tmp)  # left by a conversion that was killed
  write(tmp)
  if jax.process_index() == 0:
    for name in TOKENIZER_FILES if source else ():
      if os.path.isfile(os.path.join(source, name)):
        shutil.copyfile(os.path.join(source, name), os.path.join(tmp, name))
    old = out + ".old"
    if os.path.exists(out):
      os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# ---- save and restore ----

def natural_params(fwd) -> Any:
  """The sharded parameters of a `Forward` (or a Generator's forward) in natural layout, on
  the devices (each in a sharding the natural shapes allow)."""
  from jaxpar.parallel import pipeline
  names = _unstaged_names(fwd)
  cfg = fwd.config.model
  params = fwd.params

  def natural(p):
    if fwd.schedule is not None:
      p = {**p, "blocks": pipeline.from_stages(p["blocks"], n_layers=cfg.n_layers)}
    return to_natural(p, names, cfg, fwd.layout)

  shapes = jax.eval_shape(natural, params)
  shardings = storage_shardings(shapes, names, fwd.rules, fwd.mesh)
  with jax.set_mesh(fwd.mesh):
    return jax.jit(natural, out_shardings=shardings)(params)


def _unstaged_names(fwd) -> Any:
  if fwd.schedule is None:
    return fwd.names
  blocks = jax.tree.map(lambda n: Logical((n.names[0], *n.names[3:])), fwd.names["blocks"],
                        is_leaf=is_logical)
  return {**fwd.names, "blocks": blocks}


def _refuse_quantized(cfg) -> None:
  if cfg.quantize != "none":
    raise UserError(f"model.quantize={cfg.quantize}: checkpoints hold float weights "
                    f"(quantisation happens on the mesh at load); build the model without "
                    f"model.quantize to write one")


def save(fwd, out: str, *, overwrite: bool = False, say: Callable[[str], None] = print) -> None:
  """Writes `fwd`'s parameters as a jaxpar checkpoint at `out` (see the module docstring)."""
  import orbax.checkpoint as ocp
  cfg = fwd.config.model
  _refuse_quantized(cfg)
  model = {k: v for k, v in model_fields(cfg).items() if k not in _RUN_FIELDS}
  meta = {"format": FORMAT, "model": model, "names": _name_table(_unstaged_names(fwd)),
          "dtype": cfg.dtype}

  def write(tmp: str) -> None:
    start = time.perf_counter()
    params = natural_params(fwd)
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    say(f"writing {len(jax.tree.leaves(params))} tensors ({total / 2**20:,.1f} MiB) to {tmp} "
        f"...")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(tmp, PARAMS), params)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:  # last, whole or not at all: it marks the checkpoint complete
      with open(os.path.join(tmp, META + ".tmp"), "w") as f:
        json.dump(meta, f, indent=1)
      os.replace(os.path.join(tmp, META + ".tmp"), os.path.join(tmp, META))
    say(f"wrote the parameters in {time.perf_counter() - start:.2f} s")

  _replace_atomically(out, overwrite=overwrite, write=write, source=cfg.checkpoint)
  say(f"saved a jaxpar checkpoint to {os.path.abspath(out)}")


def restore(path: str, *, shapes: Any, names: Any, cfg: ModelConfig, layout: Layout,
            rules: Rules, mesh: Mesh, to_layout: Callable, shardings: Any) -> Any:
  """The parameters of jaxpar checkpoint `path`, placed in `shardings` (the target mesh's
  layout: `to_layout` regroups blocks [L, ...] into stages). `shapes` and `names` are the
  model's, blocks [L, ...]. Mismatches and damaged files are one-line UserErrors."""
  import orbax.checkpoint as ocp
  meta = read_meta(path)
  want, saved = _name_table(names), meta.get("names", {})
  for key in sorted(set(want) | set(saved)):
    if want.get(key) != saved.get(key):
      raise UserError(f"checkpoint {path}: parameter {key} is saved with names "
                      f"{saved.get(key)} but the model has {want.get(key)}; it was written for "
                      f"another model: convert it again")
  natural = natural_shapes(shapes, names, cfg, layout)
  storage = storage_shardings(natural, names, rules, mesh)
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        natural, storage)
  checkpointer = ocp.StandardCheckpointer()
  _silence_failed_reads()  # before the reads start: a late one may report while we raise
  try:
    tree = checkpointer.metadata(os.path.join(path, PARAMS)).item_metadata.tree
    for (key, t), m in zip(jax.tree.leaves_with_path(target), jax.tree.leaves(tree)):
      if tuple(m.shape) != t.shape:
        raise UserError(f"checkpoint {path}: parameter {jax.tree_util.keystr(key)} has shape "
                        f"{tuple(m.shape)}, the model expects {t.shape}; convert it again")
    restored = checkpointer.restore(os.path.join(path, PARAMS), target)
  except UserError:
    raise
  except Exception as e:  # Orbax and tensorstore raise many types for damaged files
    raise UserError(f"checkpoint {path}: the parameters cannot be read ({_cause(e)}); the "
                    f"checkpoint is damaged: convert it again") from None
  with jax.set_mesh(mesh):
    return jax.jit(lambda p: to_layout(from_natural(p, names, cfg, layout)),
                   out_shardings=shardings)(restored)


def _silence_failed_reads() -> None:
  """When one read of a restore fails, its other reads fail later too: asyncio logs them, or
  Python reports them as unraisable when their coroutines are collected (or prints them, when
  one finishes after Orbax closed its loop), each with a hundred lines of tensorstore spec
  after our one-line error. Those reports are dropped; others pass. Installed before the
  reads start: tensorstore binds `loop.call_soon_threadsafe` when a read starts, and a read
  can finish on the closed loop before the failure reaches our `except`."""
  if getattr(_silence_failed_reads, "done", False):
    return
  _silence_failed_reads.done = True

  def keep(record: logging.LogRecord) -> bool:
    text = record.getMessage()
    return not ("exception was never retrieved" in text and "TensorStore" in text)

  def hook(unraisable, previous=sys.unraisablehook):
    late = "Event loop is closed" in str(unraisable.exc_value)  # a read finishing at exit
    if "_read_array_index_and_device_put" not in repr(unraisable.object) and not late:
      previous(unraisable)

  def excepthook(kind, value, tb, previous=sys.excepthook):
    # A read finishing after Orbax closed its loop: tensorstore's thread hands it back
    # through `call_soon_threadsafe`, and Python prints the error it raises.
    if not (kind is RuntimeError and str(value) == "Event loop is closed"):
      previous(kind, value, tb)

  def call_soon_threadsafe(loop, *args, previous=asyncio.BaseEventLoop.call_soon_threadsafe,
                           **kwargs):
    # A read that finishes on a closed loop is handed back to nobody (Python printed the
    # error from tensorstore's thread, past the hook above).
    if not loop.is_closed():
      return previous(loop, *args, **kwargs)
  logging.getLogger("asyncio").addFilter(keep)
  sys.unraisablehook, sys.excepthook = hook, excepthook
  asyncio.BaseEventLoop.call_soon_threadsafe = call_soon_threadsafe


def _cause(e: BaseException) -> str:
  """The first line of the innermost error in `e`'s chain that names what failed (tensorstore
  wraps it in messages that print a bound method), at most 200 characters."""
  lines = []
  while e is not None:
    text = str(e).strip()
    if text and "<bound method" not in text:
      lines.append(text.splitlines()[0][:200])
    e = e.__cause__ or e.__context__
  return lines[-1] if lines else "unreadable"


# ---- export to Hugging Face ----

def _hf_tensors(host: dict, sources: dict, cfg: ModelConfig, dtype) -> dict:
  """Natural host parameters -> {tensor name: array}, the inverse of the family's weight map."""
  out: dict[str, np.ndarray] = {}
  is_source = lambda x: isinstance(x, HFTensor)
  for (path, source), value in zip(jax.tree.leaves_with_path(sources, is_leaf=is_source),
                                   jax.tree.leaves(jax.tree.map(lambda s, v: v, sources, host,
                                                                is_leaf=is_source))):
    per_layer = "{l}" in source.name
    for l, e in [(l, e) for l in (range(cfg.n_layers) if per_layer else [None])
                 for e in (range(source.experts) if source.experts else [None])]:
      leaf = np.asarray(value[l] if per_layer else value, np.float32)
      leaf = leaf if e is None else leaf[e]
      name = source.name.format(l=l, e=e)
      tensor = out.setdefault(name, np.zeros(source.shape, np.float32))
      rows = np.arange(leaf.shape[0]) if source.rows is None else source.rows(
          np.arange(leaf.shape[0]))
      if source.transpose:
        tensor[..., rows] = leaf.T
      else:
        tensor[rows] = leaf
  return {k: v.astype(dtype) for k, v in out.items()}


def export_hf(fwd, out: str, *, dtype: str, overwrite: bool = False,
              say: Callable[[str], None] = print) -> None:
  """Writes config.json, generation_config.json and model.safetensors that `transformers`
  loads (and jaxpar reads back), from `fwd`'s parameters."""
  _refuse_quantized(fwd.config.model)
  import ml_dtypes
  cfg = fwd.config.model
  family = registry.family(cfg.family)
  if family.spec.to_hf is None:
    raise UserError(f"model.family={cfg.family!r} has no Hugging Face form; use --format orbax")
  np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
  host = tree_to_host(natural_params(fwd))  # gathered from every process

  def write(tmp: str) -> None:  # one file set: the first process writes it
    if jax.process_index() != 0:
      return
    os.makedirs(tmp)
    tensors = _hf_tensors(host, family.weights(cfg, Layout()), cfg, np_dtype)
    say(f"writing {len(tensors)} tensors ({sum(t.nbytes for t in tensors.values()) / 2**20:,.1f}"
        f" MiB, {dtype}) to {tmp} ...")
    hf_files.write_safetensors(os.path.join(tmp, hf_files.SINGLE), tensors)
    config = {**family.spec.to_hf(cfg), "dtype": dtype}
    if cfg.eos_token_ids:
      eos = list(cfg.eos_token_ids)
      config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
      with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": config["eos_token_id"]}, f, indent=1)
    with open(os.path.join(tmp, "config.json"), "w") as f:  # last
      json.dump(config, f, indent=1)

  _replace_atomically(out, overwrite=overwrite, write=write, source=cfg.checkpoint)
  say(f"saved a Hugging Face checkpoint to {os.path.abspath(out)}")
