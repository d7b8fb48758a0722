"""Plan before compiling: every layout the model, batch and devices allow, with predicted
per-device bytes, collectives, pipeline bubble and step time, ranked.

A plan is a (data, stage, model) mesh with a pipeline schedule (microbatches M, repeats R).
What it predicts, per device:

- bytes: parameters (each leaf's shard under the rule table; a pipeline stage holds
  ceil(L / (S*R)) * R layers), the KV cache (`run.batch` rows of `run.seq_len +
  generate.max_new_tokens` slots), the forward's inputs, outputs (float32 logits) and a
  working set of activations (an estimate, see `_activation_bytes`).
- collectives: the instructions the compiled forward's HLO holds ({kind: {count, bytes}}, the
  format of `inspect.hlo_census(...).counts()` and `forward --json`), and the bytes each step
  moves by kind and mesh axis (loop bodies counted as many times as they run).
- time, the scaling-book way: compute = FLOPs / peak FLOP/s, memory = bytes read (weights,
  KV cache) / HBM bandwidth, collectives = bytes / link bandwidth (an all-reduce over n
  devices sends 2 (n-1)/n of its bytes, an all-gather (n-1)/n of the whole, a permute all of
  them); step = max(compute, memory) + collectives (no overlap assumed). `prefill` is the
  forward over `run.batch` x `run.seq_len` tokens (what `forward` runs and what is compiled
  to check the plan), `decode` one new token for every row with a full cache.

Plans are ranked by predicted prefill time among those that fit the device memory.
"""

import dataclasses
import functools
import math
from typing import Any

import jax
import numpy as np

from jaxpar import axes, models
from jaxpar.config import Config, MeshConfig, PipelineConfig
from jaxpar.errors import UserError
from jaxpar.models.base import Layout
from jaxpar.rules import Rules, is_logical

GB = 1e9
GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Hardware:
  """One device: peak FLOP/s (TFLOP/s), HBM bandwidth and one-way link bandwidth to a
  neighbour (GB/s), memory (GiB)."""
  name: str
  tflops: float
  hbm_gbps: float
  link_gbps: float
  memory_gib: float


# Dense bf16 peaks and one-way link bandwidth from the vendors' sheets; the CPU's from this
# machine (JAX_NOTES: ~465 GFLOP/s einsum at 512 rows, ~40 GB/s copy; emulated devices
# exchange through host memory).
PRESETS = {
    "h100": Hardware("NVIDIA H100 SXM", 989.0, 3350.0, 450.0, 80.0),
    "h200": Hardware("NVIDIA H200", 989.0, 4800.0, 450.0, 141.0),
    "tpu-v5e": Hardware("TPU v5e", 197.0, 819.0, 45.0, 16.0),
    "cpu": Hardware("this CPU (emulated devices)", 0.4, 40.0, 20.0, 64.0),
}


def hardware(preset: str = "cpu", *, tflops: float | None = None, hbm_gbps: float | None = None,
             link_gbps: float | None = None, memory_gib: float | None = None) -> Hardware:
  """A preset with any figure replaced."""
  if preset not in PRESETS:
    raise UserError(f"--hardware {preset}: unknown preset; use one of {', '.join(PRESETS)}")
  base = PRESETS[preset]
  given = {"tflops": tflops, "hbm_gbps": hbm_gbps, "link_gbps": link_gbps,
           "memory_gib": memory_gib}
  for key, value in given.items():
    if value is not None and value <= 0:
      raise UserError(f"--{key.replace('_', '-').replace('gib', 'memory')} {value}: must be "
                      f"positive")
  return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


def hardware_for(device_kind: str, platform: str) -> str:
  """The preset for a JAX device (`device_kind`, `platform`): by name, else `cpu`."""
  kind = device_kind.lower()
  for key, words in (("h200", ("h200",)), ("h100", ("h100",)), ("tpu-v5e", ("v5e", "v5 lite"))):
    if any(w in kind for w in words):
      return key
  return "cpu" if platform == "cpu" else "h100"


@dataclasses.dataclass(frozen=True)
class Candidate:
  data: int
  stage: int
  model: int
  microbatches: int = 1
  repeats: int = 1

  @property
  def mesh(self) -> dict:
    return {axes.DATA: self.data, axes.STAGE: self.stage, axes.MODEL: self.model}

  def config(self, config: Config) -> Config:
    """`config` run with this plan's mesh and pipeline."""
    mesh = MeshConfig(self.data, self.stage, self.model, config.mesh.cpu_devices)
    return dataclasses.replace(config, mesh=mesh,
                               pipeline=PipelineConfig(self.microbatches, self.repeats))

  def label(self) -> str:
    text = f"data={self.data} stage={self.stage} model={self.model}"
    return text + (f" M={self.microbatches} R={self.repeats}" if self.stage > 1 else "")


class _Shape:
  """A mesh known by its axis sizes only: what the layout checks read (`.shape`)."""

  def __init__(self, shape: dict):
    self.shape = shape


def factorisations(n: int) -> list[tuple[int, int, int]]:
  """Every (data, stage, model) with product n."""
  divisors = [d for d in range(1, n + 1) if n % d == 0]
  return [(d, s, n // (d * s)) for d in divisors for s in divisors if (n // d) % s == 0]


def candidates(config: Config, n_devices: int) -> tuple[list[Candidate], dict]:
  """The plans the model, batch and devices allow, and {label: why not} for the meshes that
  none of their schedules allows."""
  from jaxpar.runtime import inference  # the runtime's own checks decide what runs
  family = models.family(config.model.family)
  rules, out, rejected = Rules(config.rules), [], {}
  L, B = config.model.n_layers, config.run.batch
  for d, s, m in factorisations(n_devices):
    mesh = _Shape({axes.DATA: d, axes.STAGE: s, axes.MODEL: m})
    schedules = [(1, 1)] if s == 1 else [
        (M, R) for M in range(s, B + 1, s) for R in range(1, L // s + 1) if B % M == 0]
    found = None
    for M, R in schedules:
      c = Candidate(d, s, m, M, R)
      try:
        cfg = c.config(config)
        inference.layout_for(cfg, mesh, rules, family)
        inference.check_batch(cfg, mesh, rules, family)
        inference.make_schedule(cfg, mesh, rules, None)
      except UserError as e:
        found = found or str(e)
        continue
      out.append(c)
    if s > 1 and not schedules:
      found = (f"model.n_layers={L} and run.batch={B} allow no schedule over {s} stages")
    if found and not any(c.mesh == mesh.shape for c in out):
      rejected[f"data={d} stage={s} model={m}"] = found
  return out, rejected


@functools.lru_cache(maxsize=32)
def _abstract(model_config, layout: Layout):
  from jaxpar.runtime import state
  family = models.family(model_config.family)
  return state.abstract(lambda rngs: family.make(model_config, layout, rngs))


def _ways(rules: Rules, name: str | None, mesh: dict) -> int:
  return math.prod(mesh[a] for a in rules.mesh_axes(name) if a in mesh)


def _leaf_bytes(shape: tuple, names: tuple, dtype, rules: Rules, mesh: dict) -> int:
  """One device's shard of a leaf, in bytes (sizes checked to divide by the rules)."""
  rules.check(shape, names, mesh, what="a parameter")
  return math.prod(n // _ways(rules, name, mesh) for n, name in zip(shape, names)) * np.dtype(
      dtype).itemsize


def layers_per_device(c: Candidate, n_layers: int, rules: Rules) -> int:
  """Layers one device holds: ceil(L / (S*R)) * R with a pipeline, else L over the layers'
  rule."""
  if c.stage > 1:
    return -(-n_layers // (c.stage * c.repeats)) * c.repeats
  return n_layers // _ways(rules, axes.LAYERS, c.mesh)


def param_bytes(config: Config, c: Candidate) -> dict:
  """{'total': one device's parameter bytes, 'blocks': of them the layers', 'per_layer':
  one layer's bytes on one device, 'matmul_per_layer': one layer's matrix entries (whole,
  for FLOPs), 'head_entries': the logits matrix's entries}."""
  from jaxpar.runtime import inference
  family = models.family(config.model.family)
  rules = Rules(config.rules)
  layout = inference.layout_for(c.config(config), _Shape(c.mesh), rules, family)
  _, shapes, names = _abstract(config.model, layout)
  L = config.model.n_layers
  per_layer = matmul = rest = 0
  for (path, logical), leaf in zip(jax.tree.leaves_with_path(names, is_leaf=is_logical),
                                   jax.tree.leaves(shapes), strict=True):
    if getattr(path[0], "key", None) == "blocks":
      per_layer += _leaf_bytes(leaf.shape[1:], logical.names[1:], leaf.dtype, rules, c.mesh)
      matmul += math.prod(leaf.shape[1:]) if leaf.ndim > 2 else 0
    else:
      rest += _leaf_bytes(leaf.shape, logical.names, leaf.dtype, rules, c.mesh)
  blocks = per_layer * layers_per_device(c, L, rules)
  V = -(-config.model.vocab_size // layout.vocab_multiple) * layout.vocab_multiple
  return {"total": blocks + rest, "blocks": blocks, "per_layer": per_layer,
          "matmul_per_layer": matmul, "head_entries": V * config.model.d_model,
          "padded_vocab": V, "layout": layout}


def kv_cache_bytes(config: Config, c: Candidate, layout: Layout) -> int:
  """One device's KV cache for `run.batch` rows of seq_len + max_new_tokens slots."""
  m, rules = config.model, Rules(config.rules)
  family = models.family(m.family)
  length = config.run.seq_len + config.generate.max_new_tokens
  per_layer = 0
  for shape, names in family.kv_cache(m, layout, config.run.batch, length).values():
    ways = [_ways(rules, n, c.mesh) for n in names]
    per_layer += math.prod(-(-n // w) for n, w in zip(shape, ways)) * np.dtype(m.dtype).itemsize
  return per_layer * layers_per_device(c, m.n_layers, rules)


def _add(table: dict, kind: str, count: int, nbytes: int) -> None:
  if count:
    entry = table.setdefault(kind, {"count": 0, "bytes": 0})
    entry["count"] += count
    entry["bytes"] += count * nbytes


def _rows(config: Config, c: Candidate) -> tuple[int, int]:
  """(rows of the batch on one device, rows of one microbatch on one device)."""
  rows = config.run.batch // _ways(Rules(config.rules), axes.BATCH, c.mesh)
  return rows, rows // c.microbatches


def hlo_collectives(config: Config, c: Candidate) -> dict:
  """The collective instructions the compiled forward holds, {kind: {count, bytes}} as
  `inspect.hlo_census(...).counts()` reads them (a loop body's once): per block 2 all-reduces
  of the activations when `model` splits the heads and MLP, 1 for the vocab-parallel
  embedding lookup; with a pipeline 1 collective-permute of a microbatch in the tick loop and
  S - 1 handing the finished microbatches out."""
  rules, m = Rules(config.rules), config.model
  act = m.d_model * config.run.seq_len * np.dtype(m.dtype).itemsize
  rows, mb_rows = _rows(config, c)
  out: dict = {}
  block_rows = mb_rows if c.stage > 1 else rows
  if _ways(rules, axes.HEADS, c.mesh) > 1 or _ways(rules, axes.MLP, c.mesh) > 1:
    _add(out, "all-reduce", 2, block_rows * act)
  if _ways(rules, axes.VOCAB, c.mesh) > 1:
    _add(out, "all-reduce", 1, rows * act)
  if c.stage > 1:
    _add(out, "collective-permute", 1, mb_rows * act)
    _add(out, "collective-permute", c.stage - 1, c.microbatches // c.stage * mb_rows * act)
  return out


def _send(kind: str, nbytes: float, ways: int) -> float:
  """Bytes one device sends for a collective whose result is `nbytes` (ring algorithms)."""
  if kind == "all-reduce":
    return 2 * (ways - 1) / ways * nbytes
  if kind == "all-gather":
    return (ways - 1) / ways * nbytes
  return nbytes


def step_collectives(config: Config, c: Candidate, *, decode: bool) -> list[tuple]:
  """What one step executes: [(kind, mesh axis, count, bytes each)]."""
  rules, m = Rules(config.rules), config.model
  width = m.d_model * np.dtype(m.dtype).itemsize
  T = 1 if decode else config.run.seq_len
  rows, mb_rows = _rows(config, c)
  S, L = c.stage, m.n_layers
  Lc = layers_per_device(c, L, rules) // c.repeats
  tp = _ways(rules, axes.HEADS, c.mesh) > 1 or _ways(rules, axes.MLP, c.mesh) > 1
  if S == 1:
    runs, run_rows, permutes = L, rows, []
  elif decode:  # S groups of rows/S; a token for every row takes S ticks
    runs, run_rows = S * Lc, rows // S
    permutes = [("collective-permute", axes.STAGE, S, run_rows * width)]
  else:
    ticks = c.repeats * c.microbatches + S - 1
    runs, run_rows = ticks * Lc, mb_rows
    permutes = [("collective-permute", axes.STAGE, ticks, mb_rows * T * width),
                ("collective-permute", axes.STAGE, S - 1,
                 c.microbatches // S * mb_rows * T * width)]
  out = []
  if tp:
    out.append(("all-reduce", axes.MODEL, 2 * runs, run_rows * T * width))
  if _ways(rules, axes.VOCAB, c.mesh) > 1:
    out.append(("all-reduce", axes.MODEL, 1, rows * T * width))
  return out + permutes


def collective_seconds(steps: list[tuple], c: Candidate, hw: Hardware) -> float:
  return sum(count * _send(kind, nbytes, c.mesh[axis]) for kind, axis, count, nbytes in steps
             ) / (hw.link_gbps * GB)


def _by_kind_axis(steps: list[tuple]) -> dict:
  out: dict = {}
  for kind, axis, count, nbytes in steps:
    entry = out.setdefault(kind, {}).setdefault(axis, {"count": 0, "bytes": 0})
    entry["count"] += count
    entry["bytes"] += count * nbytes
  return out


def _activation_bytes(config: Config, c: Candidate, V: int) -> dict:
  """The forward's inputs, outputs (float32 logits, vocab split over `model`, batch over
  data x stage) and an estimate of its working set: a few residual streams, the MLP and
  attention widths and the attention scores of the rows one block runs at a time (a
  microbatch with a pipeline, plus its buffers of the whole batch)."""
  m, rules = config.model, Rules(config.rules)
  T, item = config.run.seq_len, np.dtype(m.dtype).itemsize
  rows, mb_rows = _rows(config, c)
  model = c.model
  out_rows = rows // c.stage if c.stage > 1 else rows
  out = out_rows * T * (V // _ways(rules, axes.VOCAB, c.mesh)) * 4
  work_rows = mb_rows if c.stage > 1 else rows
  heads = m.n_heads * m.head_size
  work = work_rows * T * (4 * m.d_model + (m.d_ff + 3 * heads) // model) * item
  work += work_rows * (m.n_heads // model) * T * T * 4
  if c.stage > 1:
    work += 2 * rows * T * m.d_model * item  # the input and finished-microbatch buffers
  return {"input": rows * T * 4, "output": out, "working": out + work}


def predict(config: Config, c: Candidate, hw: Hardware) -> dict:
  """Every figure of one plan (see the module docstring)."""
  m, rules = config.model, Rules(config.rules)
  p = param_bytes(config, c)
  cache = kv_cache_bytes(config, c, p["layout"])
  act = _activation_bytes(config, c, p["padded_vocab"])
  rows, mb_rows = _rows(config, c)
  T, ctx = config.run.seq_len, config.run.seq_len + config.generate.max_new_tokens
  S, R, M, L = c.stage, c.repeats, c.microbatches, m.n_layers
  Lc = layers_per_device(c, L, rules) // R
  heads = m.n_heads * m.head_size
  layer_flops = lambda tokens, keys: tokens * (2 * p["matmul_per_layer"] + 4 * keys * heads)
  head_flops = lambda tokens: 2 * tokens * p["head_entries"]
  flops = FLOPS = hw.tflops * 1e12
  bw = hw.hbm_gbps * GB
  other = p["total"] - p["blocks"]
  if S == 1:
    pre_flops = layer_flops(rows * T, T) * L + head_flops(rows * T)
    dec_flops = layer_flops(rows, ctx) * L + head_flops(rows)
    pre_read = p["total"]
    dec_read = p["total"] + cache
  else:
    ticks = R * M + S - 1
    pre_flops = ticks * layer_flops(mb_rows * T, T) * Lc + head_flops(rows // S * T)
    dec_flops = S * layer_flops(rows // S, ctx) * Lc + head_flops(rows // S)
    pre_read = ticks * Lc * p["per_layer"] + other
    dec_read = S * p["blocks"] // R + other + cache
  pre_flops /= c.model
  dec_flops /= c.model
  pre_steps = step_collectives(config, c, decode=False)
  dec_steps = step_collectives(config, c, decode=True)

  def timing(f, read, steps):
    terms = {"compute_s": f / FLOPS, "memory_s": read / bw,
             "collective_s": collective_seconds(steps, c, hw)}
    return {"step_s": max(terms["compute_s"], terms["memory_s"]) + terms["collective_s"],
            **terms, "flops": f, "bytes_read": read}

  total = p["total"] + cache + act["working"] + act["input"]
  bubble = (S - 1) / (R * M + S - 1) if S > 1 else 0.0
  del flops
  return {
      "param_bytes_per_device": p["total"],
      "kv_cache_bytes_per_device": cache,
      "input_bytes_per_device": act["input"],
      "output_bytes_per_device": act["output"],
      "activation_bytes_per_device": act["working"],
      "bytes_per_device": total,
      "fits": total <= hw.memory_gib * GIB,
      "collectives": hlo_collectives(config, c),
      "step_collectives": {"prefill": _by_kind_axis(pre_steps),
                           "decode": _by_kind_axis(dec_steps)},
      "bubble": bubble,
      "stage_balance": L / (S * R * Lc) if S > 1 else 1.0,
      "prefill": timing(pre_flops, pre_read, pre_steps),
      "decode": timing(dec_flops, dec_read, dec_steps),
  }


@dataclasses.dataclass
class Plan:
  candidate: Candidate
  predicted: dict
  compiled: dict | None = None

  def as_dict(self) -> dict:
    c = self.candidate
    out = {"mesh": c.mesh, "pipeline": {"microbatches": c.microbatches, "repeats": c.repeats},
           "predicted": self.predicted}
    if self.compiled is not None:
      out["compiled"] = self.compiled
    return out


def rank(config: Config, n_devices: int, hw: Hardware) -> tuple[list[Plan], dict]:
  """(every plan, best first: those that fit, by predicted prefill time; then the rest by
  bytes per device), and {mesh: why not} for meshes no schedule allows."""
  found, rejected = candidates(config, n_devices)
  if not found:
    reasons = "; ".join(f"{k}: {v}" for k, v in rejected.items())
    raise UserError(f"no layout of {n_devices} devices runs this model and batch ({reasons})")
  plans = [Plan(c, predict(config, c, hw)) for c in found]

  def key(plan: Plan):
    p, c = plan.predicted, plan.candidate
    return (not p["fits"], p["prefill"]["step_s"] if p["fits"] else p["bytes_per_device"],
            p["decode"]["step_s"], p["bytes_per_device"], c.stage, c.model)
  return sorted(plans, key=key), rejected


def check_fits(plans: list[Plan], hw: Hardware) -> None:
  """A UserError saying by how much the smallest plan misses, when none fits."""
  if plans and not plans[0].predicted["fits"]:
    best = min(plans, key=lambda p: p.predicted["bytes_per_device"])
    need = best.predicted["bytes_per_device"]
    raise UserError(
        f"no layout fits {hw.memory_gib:g} GiB per device: the smallest, "
        f"{best.candidate.label()}, needs {need / GIB:.2f} GiB per device (parameters "
        f"{best.predicted['param_bytes_per_device'] / GIB:.2f}, KV cache "
        f"{best.predicted['kv_cache_bytes_per_device'] / GIB:.2f}, activations "
        f"{best.predicted['activation_bytes_per_device'] / GIB:.2f}), "
        f"{(need - hw.memory_gib * GIB) / GIB:.2f} GiB too many; use more devices, a smaller "
        f"batch or sequence, or bfloat16")
