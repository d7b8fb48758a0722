"""The planner's cost model: what one plan costs per device, predicted without compiling.

A plan (`Candidate`) is a (data, stage, model) mesh (with `expert` for a mixture of experts), a
pipeline schedule (microbatches M, repeats R) and, optionally, parameters split over `data` too
(FSDP: `rules.embed=data`, each layer's weights all-gathered just before use). What it predicts,
per device:

- bytes: parameters (each leaf's shard under the rule table; a pipeline stage holds
  ceil(L / (S*R)) * R layers, identity padding included), the KV cache (`run.batch` rows of
  `run.seq_len + generate.max_new_tokens` slots), the forward's inputs, outputs (float32
  logits) and the temporaries XLA allocates (a model fitted to what it compiles, see
  `_io_and_temp_bytes`).
- collectives: the instructions the compiled forward's HLO holds ({kind: {count, bytes}}, the
  format of `inspect.hlo_census(...).counts()` and `forward --json`), those inside loop bodies
  apart, and the bytes each step moves by kind and mesh axis (loop bodies counted as many
  times as they run).
- time, the scaling-book way: compute = FLOPs / peak FLOP/s, memory = bytes read (weights,
  KV cache) / HBM bandwidth, collectives = bytes / link bandwidth (an all-reduce over n
  devices sends 2 (n-1)/n of its bytes, an all-gather (n-1)/n of the whole, a permute all of
  them); step = max(compute, memory) + collectives (no overlap assumed). `prefill` is the
  forward over `run.batch` x `run.seq_len` tokens (what `forward` runs and what is compiled
  to check the plan), `decode` one new token for every row with a full cache.
"""

import dataclasses
import math

import jax
import numpy as np

from jaxpar import axes
from jaxpar import hardware as hardware_lib
from jaxpar.config import Config, MeshConfig, PipelineConfig
from jaxpar.models import registry
from jaxpar.models.base import Layout, cache_leaf
from jaxpar.rules import Rules, is_logical

GB, GIB = hardware_lib.GB, hardware_lib.GIB
Hardware = hardware_lib.Hardware


@dataclasses.dataclass(frozen=True)
class Candidate:
  data: int
  stage: int
  model: int
  microbatches: int = 1
  repeats: int = 1
  fsdp: bool = False  # parameters' `embed` dim split over `data` too
  expert: int = 1     # a mixture of experts' experts split this many ways

  @property
  def mesh(self) -> dict:
    return {axes.DATA: self.data, axes.STAGE: self.stage, axes.EXPERT: self.expert,
            axes.MODEL: self.model}

  def config(self, config: Config) -> Config:
    """`config` run with this plan's mesh, pipeline and (FSDP) rule for `embed`."""
    mesh = MeshConfig(data=self.data, stage=self.stage, model=self.model, expert=self.expert,
                      cpu_devices=config.mesh.cpu_devices)
    rules = config.rules
    if self.fsdp:
      rules = Rules(config.rules).replace(axes.EMBED, axes.DATA).table
    return dataclasses.replace(config, mesh=mesh, rules=rules,
                               pipeline=PipelineConfig(self.microbatches, self.repeats))

  def label(self) -> str:
    text = f"data={self.data} stage={self.stage} model={self.model}"
    text += f" expert={self.expert}" if self.expert > 1 else ""
    text += f" M={self.microbatches} R={self.repeats}" if self.stage > 1 else ""
    return text + (" fsdp" if self.fsdp else "")


class MeshShape:
  """A mesh known by its axis sizes only: what the layout checks read (`.shape`)."""

  def __init__(self, shape: dict):
    self.shape = shape


def _abstract(model_config, layout: Layout):
  from jaxpar.runtime.inference import abstract_model
  return abstract_model(model_config, layout)


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
  for FLOPs), 'head_entries': the logits matrix's entries, 'gathers_per_layer' and
  'gathers_rest': with FSDP, the bytes each all-gathered leaf has once gathered,
  'mlp_hidden': how many d_ff-wide hiddens the MLP makes (1; 2 when gated)}."""
  config = c.config(config)
  from jaxpar.runtime import inference
  family = registry.family(config.model.family)
  rules = Rules(config.rules)
  whole = rules.replace(axes.EMBED, None)  # what an FSDP leaf is once gathered
  fsdp = _ways(rules, axes.EMBED, c.mesh) > 1
  layout = inference.layout_for(config, MeshShape(c.mesh), rules, family)
  _, shapes, names = _abstract(config.model, layout)
  L = config.model.n_layers
  per_layer = matmul = rest = mlp_matrices = 0
  gathers: dict = {True: [], False: []}
  for (path, logical), leaf in zip(jax.tree.leaves_with_path(names, is_leaf=is_logical),
                                   jax.tree.leaves(shapes), strict=True):
    block = getattr(path[0], "key", None) == "blocks"
    shape, leaf_names = (leaf.shape[1:], logical.names[1:]) if block else (leaf.shape,
                                                                          logical.names)
    nbytes = _leaf_bytes(shape, leaf_names, leaf.dtype, rules, c.mesh)
    if fsdp and axes.EMBED in leaf_names:
      gathers[block].append(_leaf_bytes(shape, leaf_names, leaf.dtype, whole, c.mesh))
    if block:
      per_layer += nbytes
      if len(shape) > 1:  # a token multiplies by experts_per_token of the experts only
        active = (_experts(config.model)[1] / shape[0] if axes.EXPERTS in leaf_names else 1)
        matmul += int(math.prod(shape) * active)
      mlp_matrices += len(shape) > 1 and axes.MLP in leaf_names
    else:
      rest += nbytes
  blocks = per_layer * layers_per_device(c, L, rules)
  V = -(-config.model.vocab_size // layout.vocab_multiple) * layout.vocab_multiple
  return {"total": blocks + rest, "blocks": blocks, "per_layer": per_layer,
          "matmul_per_layer": matmul, "head_entries": V * config.model.d_model,
          "padded_vocab": V, "layout": layout, "mlp_hidden": mlp_matrices - 1,
          "gathers_per_layer": gathers[True],
          "gathers_rest": gathers[False]}


def _experts(m) -> tuple[int, int]:
  """(experts, experts a token uses) of a mixture-of-experts model; (0, 0) for a dense one."""
  n = getattr(m.options, "n_experts", 0)
  return n, getattr(m.options, "experts_per_token", 0) if n else 0


def _moe(config: Config, c: Candidate, rows: int, T: int) -> list[tuple]:
  """A mixture-of-experts layer's collectives for `rows` x `T` tokens on a device:
  [(kind, mesh axis, count, bytes each)]. Batch split over `expert`: two all-to-alls, the
  routed rows ([expert, rows x T x k, D] in the model's dtype) out with the per-expert counts
  ([expert, E / expert] int32) packed beside them, and back; tokens replicated over it: their
  outputs summed (float32). An expert's width split over `model`: its output summed
  (float32)."""
  m, rules = config.model, Rules(config.rules)
  E, k = _experts(m)
  X = _ways(rules, axes.EXPERTS, c.mesh)
  exchange = X > 1 and set(rules.mesh_axes(axes.EXPERTS)) <= set(rules.mesh_axes(axes.BATCH))
  out = []
  if exchange:
    pairs = X * rows * T * k * m.d_model * np.dtype(m.dtype).itemsize
    out += [("all-to-all", axes.EXPERT, 1, pairs + E * 4), ("all-to-all", axes.EXPERT, 1, pairs)]
  if _ways(rules, axes.MLP, c.mesh) > 1:  # one all-reduce, over `expert` too if replicated
    out.append(("all-reduce", axes.MODEL, 1, rows * T * m.d_model * 4))
  elif X > 1 and not exchange:
    out.append(("all-reduce", axes.EXPERT, 1, rows * T * m.d_model * 4))
  return out


def kv_cache_bytes(config: Config, c: Candidate, layout: Layout) -> int:
  """One device's KV cache for `run.batch` rows of seq_len + max_new_tokens slots."""
  config = c.config(config)
  m, rules = config.model, Rules(config.rules)
  family = registry.family(m.family)
  length = config.run.seq_len + config.generate.max_new_tokens
  per_layer = 0
  for leaf in family.kv_cache(m, layout, config.run.batch, length).values():
    shape, names, dtype = cache_leaf(leaf, m)
    ways = [_ways(rules, n, c.mesh) for n in names]
    per_layer += math.prod(-(-n // w) for n, w in zip(shape, ways)) * np.dtype(dtype).itemsize
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


def hlo_collectives(config: Config, c: Candidate, *, in_loop: bool | None = None) -> dict:
  """The collective instructions the compiled forward holds, {kind: {count, bytes}} as
  `inspect.hlo_census(...).counts(in_loop=...)` reads them (a loop body's once): per block 2
  all-reduces of the activations when `model` splits the heads and MLP, 1 for the
  vocab-parallel embedding lookup; with a pipeline 1 collective-permute of a microbatch in the
  tick loop and S - 1 handing the finished microbatches out; with FSDP an all-gather of every
  block weight with an `embed` dim in the layer loop. Outside loops, how XLA gathers the FSDP
  embedding tables is its own choice (all-to-alls, permutes): counted as one all-gather per
  table, an estimate."""
  config = c.config(config)
  rules, m = Rules(config.rules), config.model
  act = m.d_model * config.run.seq_len * np.dtype(m.dtype).itemsize
  rows, mb_rows = _rows(config, c)
  found = []  # (kind, count, bytes each, in a loop)
  block_rows = mb_rows if c.stage > 1 else rows
  if _experts(m)[0]:  # attention's all-reduce, the experts' own (`_moe`)
    if _ways(rules, axes.HEADS, c.mesh) > 1:
      found.append(("all-reduce", 1, block_rows * act, True))
    found += [(kind, count, nbytes, True) for kind, _, count, nbytes in
              _moe(config, c, block_rows, config.run.seq_len)]
  elif _ways(rules, axes.HEADS, c.mesh) > 1 or _ways(rules, axes.MLP, c.mesh) > 1:
    found.append(("all-reduce", 2, block_rows * act, True))
  if _ways(rules, axes.VOCAB, c.mesh) > 1:
    found.append(("all-reduce", 1, rows * act, False))
  if c.stage > 1:
    found.append(("collective-permute", 1, mb_rows * act, True))
    found.append(("collective-permute", c.stage - 1, c.microbatches // c.stage * mb_rows * act,
                  False))
  if c.fsdp:
    p = param_bytes(config, c)
    found += [("all-gather", 1, b, True) for b in p["gathers_per_layer"]]
    found += [("all-gather", 1, b, False) for b in p["gathers_rest"]]
  out: dict = {}
  for kind, count, nbytes, looped in found:
    if in_loop is None or in_loop == looped:
      _add(out, kind, count, nbytes)
  return out


def _send(kind: str, nbytes: float, ways: int) -> float:
  """Bytes one device sends for a collective whose result is `nbytes` (ring algorithms)."""
  if kind == "all-reduce":
    return 2 * (ways - 1) / ways * nbytes
  if kind in ("all-gather", "all-to-all"):
    return (ways - 1) / ways * nbytes
  return nbytes


def step_collectives(config: Config, c: Candidate, *, decode: bool) -> list[tuple]:
  """What one step executes: [(kind, mesh axis, count, bytes each)]."""
  config = c.config(config)
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
  if _experts(m)[0]:
    if _ways(rules, axes.HEADS, c.mesh) > 1:
      out.append(("all-reduce", axes.MODEL, runs, run_rows * T * width))
    out += [(kind, axis, count * runs, nbytes) for kind, axis, count, nbytes in
            _moe(config, c, run_rows, T)]
  elif tp:
    out.append(("all-reduce", axes.MODEL, 2 * runs, run_rows * T * width))
  if _ways(rules, axes.VOCAB, c.mesh) > 1:
    out.append(("all-reduce", axes.MODEL, 1, rows * T * width))
  if c.fsdp:  # every layer's weights gathered before use, the tables once
    p = param_bytes(config, c)
    out += [("all-gather", axes.DATA, L, b) for b in p["gathers_per_layer"]]
    out += [("all-gather", axes.DATA, 1, b) for b in p["gathers_rest"]]
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


# The temporaries' terms, in residual streams ([rows, T, d_model] of one device) and
# fractions: fitted to what XLA compiles for the test plans (tests/test_plan.py: both
# families, every mesh of 8, where they are checked to within 25%) and a wider model.
BESIDE_WEIGHTS = 2.0    # streams beside a layer's weights: its carry and the one it makes
BESIDE_BLOCK = 2.5      # ... beside the block's own intermediates
PIPELINE_BATCH = 2.5    # a pipeline's input and output buffers: streams of the whole batch
PIPELINE_TICK = 4.0     # a tick's microbatch beside the weights: the message, its state, ...
GATHERED_TABLES = 0.5   # FSDP: the share of the gathered embedding tables live beside a layer


def _io_and_temp_bytes(config: Config, c: Candidate, p: dict) -> dict:
  """The forward's inputs, outputs (float32 logits, vocab split over `model`, batch over
  data x stage) and temporaries (XLA's `temp`), the larger of
  - the layer loop: a layer's weights sliced out of the stacked layers (gathered too, with
    FSDP; nothing to slice on a stage of one layer) beside BESIDE_WEIGHTS streams, or the
    block's intermediates (queries, keys, values and the MLP's hidden, split over `model`;
    float32 attention scores [rows, heads, T, T]) beside BESIDE_BLOCK streams. With a
    pipeline a block runs on a microbatch's rows, beside PIPELINE_TICK streams of them, and
    the pipeline's buffers of the whole batch are live throughout;
  - the head: the float32 logits, made as temporaries and copied out, beside a stream;
  plus, with FSDP, GATHERED_TABLES of the gathered embedding tables."""
  m, rules = config.model, Rules(config.rules)
  T, item = config.run.seq_len, np.dtype(m.dtype).itemsize
  rows, mb_rows = _rows(config, c)
  model, S = c.model, c.stage
  V, layout = p["padded_vocab"], p["layout"]
  out_rows = rows // S if S > 1 else rows
  out = out_rows * T * (V // _ways(rules, axes.VOCAB, c.mesh)) * 4
  stream = lambda n: n * T * m.d_model * item
  kv_heads = m.kv_heads * layout.kv_repeat

  def block(n: int) -> int:
    width = (m.n_heads + 2 * kv_heads) * m.head_size + p["mlp_hidden"] * m.d_ff
    return n * T * width // model * item + n * (m.n_heads // model) * T * T * 4

  weights = p["per_layer"] + sum(p["gathers_per_layer"])
  if S == 1:
    layer = max(weights + BESIDE_WEIGHTS * stream(rows),
                BESIDE_BLOCK * stream(rows) + block(rows))
  else:
    if layers_per_device(c, m.n_layers, rules) == 1:
      weights = 0  # one layer on the stage: used in place
    layer = (max(weights + PIPELINE_TICK * stream(mb_rows), block(mb_rows))
             + PIPELINE_BATCH * stream(rows))
  temp = max(layer, out + stream(out_rows)) + GATHERED_TABLES * sum(p["gathers_rest"])
  return {"input": rows * T * 4, "output": out, "temp": int(temp)}


def _work(config: Config, c: Candidate, p: dict, cache: int) -> dict:
  """FLOPs and bytes read per device: {'prefill': (flops, bytes), 'decode': (flops, bytes)}.
  A pipeline runs R*M + S - 1 ticks of Lc layer slots (identity padding included) for the
  prefill and S ticks per decoded token; FSDP also reads every gathered layer."""
  m = config.model
  rows, mb_rows = _rows(config, c)
  T, ctx = config.run.seq_len, config.run.seq_len + config.generate.max_new_tokens
  S, R, M, L = c.stage, c.repeats, c.microbatches, m.n_layers
  Lc = layers_per_device(c, L, Rules(config.rules)) // R
  heads = m.n_heads * m.head_size
  layer_flops = lambda tokens, keys: tokens * (2 * p["matmul_per_layer"] + 4 * keys * heads)
  head_flops = lambda tokens: 2 * tokens * p["head_entries"]
  other = p["total"] - p["blocks"]
  gathered = L * sum(p["gathers_per_layer"])
  if S == 1:
    prefill = (layer_flops(rows * T, T) * L + head_flops(rows * T), p["total"] + gathered)
    decode = (layer_flops(rows, ctx) * L + head_flops(rows), p["total"] + gathered + cache)
  else:
    ticks = R * M + S - 1
    prefill = (ticks * layer_flops(mb_rows * T, T) * Lc + head_flops(rows // S * T),
               ticks * Lc * p["per_layer"] + other)
    decode = (S * layer_flops(rows // S, ctx) * Lc + head_flops(rows // S),
              S * p["blocks"] // R + other + cache)
  return {k: (flops / c.model, read) for k, (flops, read) in
          {"prefill": prefill, "decode": decode}.items()}


def predict(config: Config, c: Candidate, hw: Hardware) -> dict:
  """Every figure of one plan (see the module docstring)."""
  config = c.config(config)
  S, R, M, L = c.stage, c.repeats, c.microbatches, config.model.n_layers
  p = param_bytes(config, c)
  cache = kv_cache_bytes(config, c, p["layout"])
  act = _io_and_temp_bytes(config, c, p)
  work = _work(config, c, p, cache)
  Lc = layers_per_device(c, L, Rules(config.rules)) // R
  peak, bw = hw.tflops * 1e12, hw.hbm_gbps * GB
  pre_steps = step_collectives(config, c, decode=False)
  dec_steps = step_collectives(config, c, decode=True)

  def timing(f, read, steps):
    terms = {"compute_s": f / peak, "memory_s": read / bw,
             "collective_s": collective_seconds(steps, c, hw)}
    return {"step_s": max(terms["compute_s"], terms["memory_s"]) + terms["collective_s"],
            **terms, "flops": f, "bytes_read": read}

  total = p["total"] + cache + act["input"] + act["output"] + act["temp"]
  bubble = (S - 1) / (R * M + S - 1) if S > 1 else 0.0
  return {
      "param_bytes_per_device": p["total"],
      "kv_cache_bytes_per_device": cache,
      "input_bytes_per_device": act["input"],
      "output_bytes_per_device": act["output"],
      "temp_bytes_per_device": act["temp"],
      "bytes_per_device": total,
      "fits": total <= hw.memory_gib * GIB,
      "collectives": hlo_collectives(config, c),
      "collectives_in_loop": hlo_collectives(config, c, in_loop=True),
      "step_collectives": {"prefill": _by_kind_axis(pre_steps),
                           "decode": _by_kind_axis(dec_steps)},
      "bubble": bubble,
      "stage_balance": L / (S * R * Lc) if S > 1 else 1.0,
      "prefill": timing(*work["prefill"], pre_steps),
      "decode": timing(*work["decode"], dec_steps),
  }


