"""The sharded forward pass of any decoder family: build, compile, run, verify.

A model on a mesh is built in three steps, each taking the previous ones as inputs:

    placement = place(config, mesh)            # names, shapes, shardings, schedule; no arrays
    params, names, _ = load_params(placement)  # from one of SOURCES, then quantised
    forward = forward_fn(placement)            # a program (`generate` makes decoders)

`build` composes them into a `Forward`: born-sharded parameters plus a jitted forward whose
inputs, outputs and activations are all laid out by the one rule table. The model is asked
for nothing but the interface of `jaxpar.models.base` (embed, blocks, head): any family
`model.family` names runs here, a user's own included (`jaxpar.models.registry.register`).
"""

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxpar import axes, checkpoint_meta, quant
from jaxpar.distributed import MAX_QUEUED, to_host, tree_to_host
from jaxpar.config import Config, MeshConfig
from jaxpar.errors import UserError
from jaxpar.mesh import processes, single_device_mesh
from jaxpar.models import registry
from jaxpar.models.base import Family, Layout, causal_step, run_blocks
from jaxpar.parallel import pipeline
from jaxpar.rules import Logical, Rules, check_tree, is_logical, tree_shardings, use_rules
from jaxpar.runtime import state


@dataclasses.dataclass
class Forward(state.ShardedModel):
  """A decoder on a mesh: `fn(params, tokens) -> logits`.

  With a pipeline (`schedule` set), the blocks' parameters are held regrouped into stages,
  [S, R, Lc, ...] (see `jaxpar.parallel.pipeline.to_stages`), and the logits leave with their
  batch split over `stage` as well as `data`.
  """
  family: Family | None = None
  layout: Layout = Layout()
  schedule: pipeline.Schedule | None = None
  init_timings: dict = dataclasses.field(default_factory=dict)  # seeded init: compile_s, run_s
  census: Any = None  # a mixture of experts: jitted (params, tokens) -> int32 [L, E]

  @property
  def vocab_size(self) -> int:
    return self.config.model.vocab_size

  def tokens(self, tokens_BT: np.ndarray) -> jax.Array:
    """Places host token ids [B, T] on the mesh, batch over `data`."""
    sharding = self.rules.sharding((axes.BATCH, axes.SEQ), self.mesh, what="tokens")
    return jax.device_put(jnp.asarray(tokens_BT, jnp.int32), sharding)

  def expert_tokens(self, tokens_BT: jax.Array) -> np.ndarray:
    """[L, E]: how many of the batch's (token, expert) pairs each layer's experts got (a
    mixture of experts; each layer's row sums to B * T * experts_per_token)."""
    with jax.set_mesh(self.mesh):
      return np.asarray(to_host(self.census(self.params, tokens_BT)))

  def natural_params(self) -> dict:
    """The parameters on the host in the model's own layout (blocks stacked [L, ...]).
    Every process gets them whole (each must call this)."""
    host = tree_to_host(self.params)
    if self.schedule is not None:
      host = {**host, "blocks": pipeline.from_stages(host["blocks"],
                                                     n_layers=self.config.model.n_layers)}
    return host


def layout_for(config: Config, mesh: Mesh, rules: Rules, family: Family) -> Layout:
  """The vocabulary padding and key/value head copies this mesh needs; one-line errors when
  the heads or the MLP width do not divide the axes the rules split them over."""
  m, shape = config.model, mesh.shape
  ways = lambda name: math.prod(shape[a] for a in rules.mesh_axes(name) if a in shape)
  keys = family.config_keys
  rules.check((m.n_heads,), (axes.HEADS,), shape, what="the model", keys=keys)
  rules.check((m.d_ff,), (axes.MLP,), shape, what="the model", keys=keys)
  kv_ways, K = ways(axes.KV_HEADS), m.kv_heads
  if kv_ways > K and kv_ways % K:
    raise UserError(f"{keys.get(axes.KV_HEADS, 'model.n_kv_heads')}={K} neither divides nor is "
                    f"divided by the {kv_ways} ways rules.kv_heads splits it over; choose "
                    f"mesh.model to be a divisor or a multiple of it")
  layout = Layout(vocab_multiple=ways(axes.VOCAB), kv_repeat=max(1, kv_ways // K))
  rules.check((K * layout.kv_repeat,), (axes.KV_HEADS,), shape, what="the model", keys=keys)
  return layout


def check_batch(config: Config, mesh: Mesh, rules: Rules, family: Family,
                schedule: pipeline.Schedule | None = None) -> None:
  """What the forward program splits must divide: the batch and sequence of run.batch x
  run.seq_len tokens and the pipeline's microbatches (UserErrors naming run.batch, ...),
  before any tensor is traced."""
  r, m = config.run, config.model
  if r.seq_len > m.max_seq_len:
    raise UserError(f"run.seq_len={r.seq_len} exceeds model.max_seq_len={m.max_seq_len} (the "
                    f"position table); use --set run.seq_len={m.max_seq_len} or less")
  rules.check((r.batch, r.seq_len), (axes.BATCH, axes.SEQ), mesh.shape, what="tokens",
              keys=family.config_keys)
  if schedule is not None:
    split = [a for a in rules.mesh_axes(axes.BATCH) if mesh.shape[a] > 1]
    pipeline.check(schedule, n_layers=config.model.n_layers, batch=config.run.batch,
                   data=math.prod(mesh.shape[a] for a in split),
                   over=" x ".join(f"mesh.{a}={mesh.shape[a]}" for a in split) or None)


def make_schedule(config: Config, mesh: Mesh, rules: Rules, pipelined: bool | None,
                  repeats: int | None = None) -> pipeline.Schedule | None:
  """The pipeline schedule (None without one; `pipelined` forces it on or off, default on
  when mesh.stage > 1; `repeats` overrides pipeline.repeats), checked against the layers
  (the batch is the forward program's: `check_batch`)."""
  stages = mesh.shape[axes.STAGE]
  if not (stages > 1 if pipelined is None else pipelined):
    return None
  batch_axes = rules.mesh_axes(axes.BATCH)
  if axes.STAGE in batch_axes or axes.STAGE in rules.mesh_axes(axes.SEQ):
    raise UserError(f"rules.batch={list(batch_axes)} uses the stage axis, which the pipeline "
                    f"needs for layers; map batch to data (and model) only")
  schedule = pipeline.Schedule(stages, config.pipeline.microbatches,
                               repeats or config.pipeline.repeats)
  pipeline.check(schedule, n_layers=config.model.n_layers)
  return schedule


def _staged_names(names: dict) -> dict:
  """Block names [layers, ...] -> [layers, -, -, ...] for leaves regrouped [S, R, Lc, ...]."""
  staged = jax.tree.map(lambda n: Logical((n.names[0], None, None, *n.names[1:])),
                        names["blocks"], is_leaf=is_logical)
  return {**names, "blocks": staged}


@dataclasses.dataclass
class Placement:
  """Step 1, the layout of a model on a mesh: its parameters' names, shapes and shardings
  and the pipeline schedule; no arrays (the planner compiles from it). With a schedule, the
  blocks are regrouped into stages, [S, R, Lc, ...] (`pipeline.to_stages`); `natural` is
  (shapes, names) in the model's own layout, blocks [L, ...], what checkpoints hold."""
  config: Config
  mesh: Mesh
  rules: Rules
  family: Family
  layout: Layout
  schedule: pipeline.Schedule | None
  graphdef: nnx.GraphDef
  shapes: dict
  names: dict
  natural: tuple[dict, dict]

  def make(self, rngs: nnx.Rngs):
    return self.family.make(self.config.model, self.layout, rngs)

  def to_layout(self, p: dict) -> dict:
    """Parameters in the model's own layout -> this placement's (staged blocks)."""
    if self.schedule is None:
      return p
    s = self.schedule
    return {**p, "blocks": pipeline.to_stages(p["blocks"], stages=s.stages, repeats=s.repeats)}

  def shardings(self, names: dict | None = None) -> dict:
    return tree_shardings(self.names if names is None else names, self.rules, self.mesh)


def place(config: Config, mesh: Mesh, *, layout: Layout | None = None,
          pipelined: bool | None = None, repeats: int | None = None) -> Placement:
  """The layout step: heads, key/value copies and vocabulary padding checked against the
  rules (`layout_for`; `layout` overrides it), the schedule (`pipelined` forces it on or off,
  default on when mesh.stage > 1; `repeats` overrides pipeline.repeats), every parameter's
  names checked against the mesh. One-line UserErrors, nothing allocated."""
  family = registry.family(config.model.family)
  rules = Rules(config.rules)
  keys = family.config_keys
  layout = layout or layout_for(config, mesh, rules, family)
  schedule = make_schedule(config, mesh, rules, pipelined, repeats)
  graphdef, shapes, names = abstract_model(config.model, layout)
  placement = Placement(config, mesh, rules, family, layout, schedule, graphdef, shapes, names,
                        (shapes, names))
  if schedule is not None:
    placement.names = _staged_names(names)
    placement.shapes = jax.eval_shape(placement.to_layout, shapes)
  check_tree(placement.shapes, placement.names, rules, mesh, keys=keys)
  return placement


@functools.lru_cache(maxsize=32)
def abstract_model(model_config, layout: Layout) -> tuple[nnx.GraphDef, dict, dict]:
  """`state.abstract` of `model_config`'s model in `layout`, traced once per pair (a build and
  the planner ask for the same ones again; callers do not change what it returns)."""
  family = registry.family(model_config.family)
  return state.abstract(lambda rngs: family.make(model_config, layout, rngs))


def _seeded(pl: Placement, _, shardings, timings: dict, quantise) -> dict:
  layout = pl.to_layout if quantise is None else (  # inside the program: no float leaves out
      lambda p: jax.tree_util.tree_map_with_path(quantise, pl.to_layout(p)))
  return state.create(pl.make, seed=pl.config.run.seed, mesh=pl.mesh, shardings=shardings,
                      layout=layout, timings=timings)


def _given(pl: Placement, params: dict, shardings, _, __) -> dict:
  return jax.device_put(pl.to_layout(params), shardings)


def _jaxpar_checkpoint(pl: Placement, _, shardings, __, ___) -> dict:
  from jaxpar.runtime import checkpoint  # Orbax: each device reads its own slices
  return checkpoint.restore(pl.config.model.checkpoint, shapes=pl.natural[0],
                            names=pl.natural[1], cfg=pl.config.model, layout=pl.layout,
                            rules=pl.rules, mesh=pl.mesh, to_layout=pl.to_layout,
                            shardings=shardings)


def _hf_checkpoint(pl: Placement, _, shardings, __, quantise) -> dict:
  from jaxpar.runtime import hf  # Hugging Face weights, each device reading its own slice
  m = pl.config.model
  return hf.load_params(m.checkpoint, pl.family.weights(m, pl.layout), shapes=pl.shapes,
                        shardings=shardings,
                        stages=None if pl.schedule is None else pl.schedule.stages,
                        n_layers=m.n_layers, each=quantise)


def _abstract(pl: Placement, _, shardings, __, ___) -> dict:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      pl.shapes, shardings)


# Step 2, the parameters: every source reads or makes them straight into their shards,
# (placement, given parameters, shardings, timings, quantise) -> parameters. With
# model.quantize, the sources in MADE_BY_LEAF take `quantise(path, leaf)`
# (`quant.leaf_quantizer`) and apply it to each leaf as they make it, so the float model
# never exists whole (the seed's program returns the leaves quantised, the Hugging Face
# reader quantises each before it reads the next); the others load floats, quantised on the
# mesh after.
SOURCES = {"seed": _seeded, "given": _given, "jaxpar checkpoint": _jaxpar_checkpoint,
           "hf checkpoint": _hf_checkpoint, "abstract": _abstract}
MADE_BY_LEAF = {"seed", "hf checkpoint"}


def source(config: Config, *, given: bool = False, abstract: bool = False) -> str:
  """Where the parameters come from: 'abstract' (shapes and shardings only), 'given' (a
  dict in the model's own layout, e.g. gathered from another mesh), a checkpoint
  ('jaxpar checkpoint', 'hf checkpoint') or 'seed'."""
  if abstract or given:
    return "abstract" if abstract else "given"
  checkpoint = config.model.checkpoint
  if checkpoint:
    return "jaxpar checkpoint" if checkpoint_meta.is_jaxpar(checkpoint) else "hf checkpoint"
  return "seed"


def load_params(pl: Placement, *, params: dict | None = None,
                abstract: bool = False) -> tuple[dict, dict, dict]:
  """(parameters, their names, the seeded initialiser's timings): from their `source`,
  quantised (model.quantize) leaf by leaf as they are made where the source makes them, else
  on the mesh after loading (the scales born sharded either way)."""
  timings, names, mode = {}, pl.names, pl.config.model.quantize
  kind = source(pl.config, given=params is not None, abstract=abstract)
  shardings_for = lambda n: tree_shardings(n, pl.rules, pl.mesh)
  if mode != "none" and kind in MADE_BY_LEAF:
    quantise, qnames = quant.leaf_quantizer(names, mode, shardings_for)
    made = qnames if kind == "seed" else names  # the seed's program returns them quantised
    return SOURCES[kind](pl, None, shardings_for(made), timings, quantise), qnames, timings
  if kind == "given" and mode != "none":  # e.g. a quantised model's own parameters
    names = quant.quantized_names(params, names, mode, present=True)
  params = SOURCES[kind](pl, params, pl.shardings(names), timings, None)
  if mode != "none":  # on the mesh, after loading: scales born sharded
    params, names = quant.quantize_params(params, names, mode, shardings_for)
  return params, names, timings


def forward_fn(pl: Placement, *, census: bool = False):
  """The forward pass, traced: (params, tokens [B, T]) -> logits [B, T, V_padded], laid out
  by the rules (after a pipeline the batch is spread over the stages too). `census` (a
  mixture of experts): -> (logits, int32 [L, E]: the batch's tokens each layer's experts got,
  from the blocks' taps; through a pipeline each microbatch carries its rows' counts per
  layer slot, [B, S*R*Lc, E], written by the stage that runs the slot)."""
  config, rules, keys, schedule = pl.config, pl.rules, pl.family.config_keys, pl.schedule
  out_rules = rules
  if schedule is not None:
    out_rules = rules.replace(axes.BATCH, (*rules.mesh_axes(axes.BATCH), axes.STAGE))
    active = pipeline.active(config.model.n_layers, stages=schedule.stages,
                             repeats=schedule.repeats)
    chunk = pipeline.per_chunk(config.model.n_layers, stages=schedule.stages,
                               repeats=schedule.repeats)  # layer slots per chunk
  scan = config.model.scan_layers is not False

  def forward(params: dict, tokens_BT: jax.Array) -> jax.Array:
    with use_rules(rules, keys=keys):
      model = nnx.merge(pl.graphdef, params)
      block_graphdef = nnx.graphdef(model.blocks)
      B, T = tokens_BT.shape
      step = causal_step(B, T)
      x_BTD = model.embed(tokens_BT, step.positions_BT)
      if schedule is None:
        blocks = params["blocks"]
        layers = blocks if scan else [jax.tree.map(lambda a: a[l], blocks)
                                      for l in range(config.model.n_layers)]
        x_BTD, _, *tapped = run_blocks(block_graphdef, layers, x_BTD, step, scan=scan,
                                       taps=census)
        counts = tapped[0][0].sum(1) if census else None  # [L, B, E] -> [L, E]
      else:
        def stage_fn(layers, first, x):  # positions are 0..T-1 on every stage
          blocks, on = layers  # `on`: None, or which layers are not padding [R*Lc]
          x_BTD, counts_BJE = x if census else (x, None)
          y_BTD, _, *tapped = run_blocks(block_graphdef, blocks, x_BTD,
                                         causal_step(x_BTD.shape[0], T), scan=True, active=on,
                                         window=(first, chunk), taps=census)
          if not census:
            return y_BTD
          at = jax.lax.axis_index(axes.STAGE) * (schedule.repeats * chunk) + first
          return y_BTD, jax.lax.dynamic_update_slice_in_dim(
              counts_BJE, tapped[0][0].transpose(1, 0, 2), at, axis=1)
        on = None if active is None else jnp.asarray(active)
        slots = schedule.stages * schedule.repeats * chunk
        x = (x_BTD, jnp.zeros((B, slots, config.model.options.n_experts), jnp.int32)
             ) if census else x_BTD
        x = pipeline.run(stage_fn, (params["blocks"], on), x, mesh=pl.mesh,
                         schedule=schedule, batch_axes=rules.mesh_axes(axes.BATCH))
        x_BTD, counts = x if census else (x, None)
        if census:
          counts = _slots_to_layers(counts.sum(0), config.model.n_layers, schedule)
    with use_rules(out_rules, keys=keys):
      logits = model.head(x_BTD)
    return (logits, counts) if census else logits
  return forward, out_rules


def _slots_to_layers(per_slot: jax.Array, n_layers: int, schedule) -> jax.Array:
  """[S*R*Lc, ...] per pipeline layer slot (stage, repeat, layer of the chunk) -> [L, ...]
  per layer, the padding slots dropped."""
  where = pipeline.staged_layers(n_layers, stages=schedule.stages,
                                 repeats=schedule.repeats).ravel()
  return per_slot[np.argsort(np.where(where < 0, where.size, where))[:n_layers]]


def build(config: Config, mesh: Mesh, *, params: dict | None = None,
          layout: Layout | None = None, pipelined: bool | None = None,
          abstract: bool = False) -> Forward:
  """The forward program, in three steps: the layout (`place`), the forward traced
  abstractly so every activation's layout is checked, then the parameters (`load_params`)
  and the jit.

  `params` (a dict in the model's own layout, e.g. gathered from another mesh) replaces the
  seeded initialisation; it is placed on this mesh's shardings. `layout` overrides the
  vocabulary padding and key/value copies (default: what the rules need on this mesh; pass the
  sharded model's to reuse its parameters on one device). `pipelined` forces the pipeline on or
  off (default: on when mesh.stage > 1). `abstract`: the parameters stay ShapeDtypeStructs
  with their shardings (nothing is created or read), enough to compile and inspect the
  program (`jaxpar.plan`).
  """
  pl = place(config, mesh, layout=layout, pipelined=pipelined)
  check_batch(config, mesh, pl.rules, pl.family, pl.schedule)
  forward, out_rules = forward_fn(pl)
  tokens = pl.rules.sharding((axes.BATCH, axes.SEQ), mesh, what="tokens")
  logits = out_rules.sharding((axes.BATCH, axes.SEQ, axes.VOCAB), mesh, what="logits")
  tokens_shape = jax.ShapeDtypeStruct((config.run.batch, config.run.seq_len), jnp.int32)
  with jax.set_mesh(mesh):
    jax.eval_shape(forward, pl.shapes, tokens_shape)
  params, names, timings = load_params(pl, params=params, abstract=abstract)
  fn = jax.jit(forward, in_shardings=(pl.shardings(names), tokens), out_shardings=logits)
  census = None
  if getattr(config.model.options, "n_experts", 0):
    census = jax.jit(lambda p, t: forward_fn(pl, census=True)[0](p, t)[1],
                     in_shardings=(pl.shardings(names), tokens))
  return Forward(config, mesh, pl.rules, pl.graphdef, params, names, fn, family=pl.family,
                 layout=pl.layout, schedule=pl.schedule, init_timings=timings, census=census)


def seeded_tokens(config: Config) -> np.ndarray:
  """The seeded batch of token ids [run.batch, run.seq_len] every command runs on."""
  rng = np.random.default_rng(config.run.seed)
  return rng.integers(0, config.model.vocab_size, (config.run.batch, config.run.seq_len),
                      dtype=np.int32)


def unpad(logits_BTV: jax.Array, vocab_size: int) -> np.ndarray:
  """Host float32 logits [B, T, V] with the vocabulary padding removed."""
  return np.asarray(to_host(logits_BTV), np.float32)[..., :vocab_size]


def reference_logits(forward: Forward, tokens_BT: np.ndarray) -> np.ndarray:
  """The same parameters and batch on one device (this process's first of the mesh),
  unpadded. Over many processes each computes it alone, from the gathered parameters."""
  one = single_device_mesh(forward.mesh.local_devices[0])
  host = forward.natural_params()
  single = build(dataclasses.replace(forward.config, mesh=MeshConfig(1, 1, 1)), one,
                 params=host, layout=forward.layout)
  return unpad(single(single.tokens(tokens_BT)), forward.vocab_size)


def time_steady(forward: Forward, tokens_BT: jax.Array, *, warmup: int, iters: int) -> float:
  """Seconds per call after `warmup` untimed calls (compile excluded)."""
  for _ in range(warmup):
    forward(tokens_BT).block_until_ready()
  # Over many processes more calls in flight than MAX_QUEUED can deadlock (see there).
  every = MAX_QUEUED if processes(forward.mesh) > 1 else iters
  start = time.perf_counter()
  for i in range(iters):
    out = forward(tokens_BT)
    if (i + 1) % every == 0:
      out.block_until_ready()
  out.block_until_ready()
  return (time.perf_counter() - start) / iters
