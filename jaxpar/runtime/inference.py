"""The sharded forward pass of the GPT model: build, compile, run, verify.

`build` turns a `Config` and a mesh into a `Forward`: born-sharded parameters plus a jitted
forward whose inputs, outputs and activations are all laid out by the one rule table.
"""

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxpar import axes
from jaxpar.config import Config, MeshConfig
from jaxpar.errors import UserError
from jaxpar.mesh import single_device_mesh
from jaxpar.models import gpt
from jaxpar.parallel import pipeline
from jaxpar.rules import Logical, Rules, check_tree, is_logical, tree_shardings, use_rules
from jaxpar.runtime import state


@dataclasses.dataclass
class Forward(state.ShardedModel):
  """The GPT on a mesh: `fn(params, tokens) -> logits`.

  With a pipeline (`schedule` set), the blocks' parameters are held regrouped into stages,
  [S, R, Lc, ...] (see `jaxpar.parallel.pipeline.to_stages`), and the logits leave with their
  batch split over `stage` as well as `data`.
  """
  schedule: pipeline.Schedule | None = None

  @property
  def vocab_size(self) -> int:
    return self.config.model.vocab_size

  def tokens(self, tokens_BT: np.ndarray) -> jax.Array:
    """Places host token ids [B, T] on the mesh, batch over `data`."""
    sharding = self.rules.sharding((axes.BATCH, axes.SEQ), self.mesh, what="tokens")
    return jax.device_put(jnp.asarray(tokens_BT, jnp.int32), sharding)

  def natural_params(self) -> dict:
    """The parameters on the host in the model's own layout (blocks stacked [L, ...])."""
    host = jax.device_get(self.params)
    if self.schedule is not None:
      host = {**host, "blocks": pipeline.from_stages(host["blocks"])}
    return host


def check_batch(config: Config, mesh: Mesh, rules: Rules) -> None:
  """The sizes the rules split must divide: batch and sequence of the tokens, heads, MLP
  width (UserErrors naming run.batch, model.n_heads, ...), before any tensor is traced."""
  m = config.model
  rules.check((config.run.batch, config.run.seq_len), (axes.BATCH, axes.SEQ), mesh.shape,
              what="tokens", keys=gpt.CONFIG_KEYS)
  for size, name in ((m.n_heads, axes.HEADS), (m.d_ff, axes.MLP)):
    rules.check((size,), (name,), mesh.shape, what="the model", keys=gpt.CONFIG_KEYS)


def make_schedule(config: Config, mesh: Mesh, rules: Rules,
                  pipelined: bool | None) -> pipeline.Schedule | None:
  """The pipeline schedule (None without one), checked against the config."""
  stages = mesh.shape[axes.STAGE]
  if not (stages > 1 if pipelined is None else pipelined):
    return None
  batch_axes = rules.mesh_axes(axes.BATCH)
  if axes.STAGE in batch_axes or axes.STAGE in rules.mesh_axes(axes.SEQ):
    raise UserError(f"rules.batch={list(batch_axes)} uses the stage axis, which the pipeline "
                    f"needs for layers; map batch to data (and model) only")
  schedule = pipeline.Schedule(stages, config.pipeline.microbatches, config.pipeline.repeats)
  pipeline.check(schedule, n_layers=config.model.n_layers, batch=config.run.batch,
                 data=math.prod(mesh.shape[a] for a in batch_axes))
  return schedule


def _staged_names(names: dict) -> dict:
  """Block names [layers, ...] -> [layers, -, -, ...] for leaves regrouped [S, R, Lc, ...]."""
  staged = jax.tree.map(lambda n: Logical((n.names[0], None, None, *n.names[1:])),
                        names["blocks"], is_leaf=is_logical)
  return {**names, "blocks": staged}


def build(config: Config, mesh: Mesh, *, params: dict | None = None,
          vocab_multiple: int | None = None, pipelined: bool | None = None) -> Forward:
  """Checks the layout, creates (or places) the parameters and jits the forward pass.

  `params` (a dict in the model's own layout, e.g. gathered from another mesh) replaces the
  seeded initialisation; it is placed on this mesh's shardings. `vocab_multiple` overrides the
  vocabulary padding (default: the number of ways the rules split `vocab` on this mesh).
  `pipelined` forces the pipeline on or off (default: on when mesh.stage > 1).
  """
  rules = Rules(config.rules)
  check_batch(config, mesh, rules)
  schedule = make_schedule(config, mesh, rules, pipelined)
  out_rules = rules
  if schedule is not None:  # after the pipeline the batch is spread over the stages too
    out_rules = rules.replace(axes.BATCH, (*rules.mesh_axes(axes.BATCH), axes.STAGE))
  token_sharding = rules.sharding((axes.BATCH, axes.SEQ), mesh, what="tokens")
  logits_sharding = out_rules.sharding((axes.BATCH, axes.SEQ, axes.VOCAB), mesh, what="logits")
  multiple = vocab_multiple or gpt.vocab_multiple(rules, mesh.shape)
  make = lambda rngs: gpt.GPT(config.model, vocab_multiple=multiple, rngs=rngs)
  graphdef, shapes, names = state.abstract(make)
  check_tree(shapes, names, rules, mesh, keys=gpt.CONFIG_KEYS)

  def layout(p: dict) -> dict:
    if schedule is None:
      return p
    blocks = pipeline.to_stages(p["blocks"], stages=schedule.stages, repeats=schedule.repeats)
    return {**p, "blocks": blocks}

  if schedule is not None:
    names = _staged_names(names)
    shapes = jax.eval_shape(layout, shapes)
  param_shardings = tree_shardings(names, rules, mesh)

  def forward(params: dict, tokens_BT: jax.Array) -> jax.Array:
    with use_rules(rules, keys=gpt.CONFIG_KEYS):
      model = nnx.merge(graphdef, params)
      x_BTD = model.embed(tokens_BT)
      if schedule is None:
        x_BTD = model.run_blocks(x_BTD)
      else:
        stage_fn = functools.partial(gpt.scan_layers, nnx.graphdef(model.blocks))
        x_BTD = pipeline.run(stage_fn, params["blocks"], x_BTD, mesh=mesh, schedule=schedule,
                             batch_axes=rules.mesh_axes(axes.BATCH))
    with use_rules(out_rules, keys=gpt.CONFIG_KEYS):
      return model.logits(x_BTD)

  # Trace once abstractly: every activation's layout is checked before anything compiles.
  tokens_shape = jax.ShapeDtypeStruct((config.run.batch, config.run.seq_len), jnp.int32)
  with jax.set_mesh(mesh):
    jax.eval_shape(forward, shapes, tokens_shape)

  if params is None and config.model.checkpoint:
    from jaxpar.runtime import hf  # Hugging Face weights, each device reading its own slice
    params = hf.load_params(config.model.checkpoint, shapes=shapes, shardings=param_shardings,
                            vocab_size=config.model.vocab_size,
                            stages_layout=None if schedule is None else
                            (schedule.stages, schedule.repeats))
  elif params is None:
    params = state.create(make, seed=config.run.seed, mesh=mesh, shardings=param_shardings,
                          layout=layout)
  else:
    params = jax.device_put(layout(params), param_shardings)
  fn = jax.jit(forward, in_shardings=(param_shardings, token_sharding),
               out_shardings=logits_sharding)
  return Forward(config, mesh, rules, graphdef, params, names, fn, schedule=schedule)


def seeded_tokens(config: Config) -> np.ndarray:
  """The seeded batch of token ids [run.batch, run.seq_len] every command runs on."""
  rng = np.random.default_rng(config.run.seed)
  return rng.integers(0, config.model.vocab_size, (config.run.batch, config.run.seq_len),
                      dtype=np.int32)


def unpad(logits_BTV: jax.Array, vocab_size: int) -> np.ndarray:
  """Host float32 logits [B, T, V] with the vocabulary padding removed."""
  return np.asarray(jax.device_get(logits_BTV), np.float32)[..., :vocab_size]


def reference_logits(forward: Forward, tokens_BT: np.ndarray) -> np.ndarray:
  """The same parameters and batch on one device (the first of the mesh), unpadded."""
  one = single_device_mesh(forward.mesh.devices.flat[0])
  host = forward.natural_params()
  single = build(dataclasses.replace(forward.config, mesh=MeshConfig(1, 1, 1)), one,
                 params=host, vocab_multiple=host["wte"].shape[0])
  return unpad(single(single.tokens(tokens_BT)), forward.vocab_size)


def time_steady(forward: Forward, tokens_BT: jax.Array, *, warmup: int, iters: int) -> float:
  """Seconds per call after `warmup` untimed calls (compile excluded)."""
  for _ in range(warmup):
    forward(tokens_BT).block_until_ready()
  start = time.perf_counter()
  for _ in range(iters):
    out = forward(tokens_BT)
  out.block_until_ready()
  return (time.perf_counter() - start) / iters
