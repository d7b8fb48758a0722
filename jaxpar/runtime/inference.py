"""The sharded forward pass of the GPT model: build, compile, run, verify.

`build` turns a `Config` and a mesh into a `Forward`: born-sharded parameters plus a jitted
forward whose inputs, outputs and activations are all laid out by the one rule table.
"""

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxpar import axes
from jaxpar.config import Config, MeshConfig
from jaxpar.errors import UserError
from jaxpar.models import gpt
from jaxpar.rules import Rules, check_tree, tree_shardings, use_rules
from jaxpar.runtime import state


@dataclasses.dataclass
class Forward:
  """A model on a mesh: `params` sharded by `names`, `fn(params, tokens) -> logits`."""
  config: Config
  mesh: Mesh
  rules: Rules
  graphdef: nnx.GraphDef
  params: dict
  names: dict
  fn: Any  # jax.jit-wrapped forward
  compiled: Any = None

  @property
  def vocab_size(self) -> int:
    return self.config.model.vocab_size

  def tokens(self, tokens_BT: np.ndarray) -> jax.Array:
    """Places host token ids [B, T] on the mesh, batch over `data`."""
    sharding = self.rules.sharding((axes.BATCH, axes.SEQ), self.mesh, what="tokens")
    return jax.device_put(jnp.asarray(tokens_BT, jnp.int32), sharding)

  def compile(self, tokens_BT: jax.Array):
    """Lowers and compiles for `tokens_BT`'s shape; returns the compiled executable."""
    with jax.set_mesh(self.mesh):
      self.compiled = self.fn.lower(self.params, tokens_BT).compile()
    return self.compiled

  def __call__(self, tokens_BT: jax.Array) -> jax.Array:
    """Padded logits [B, T, V_padded] (float32, padding columns at the float minimum)."""
    with jax.set_mesh(self.mesh):
      if self.compiled is not None:
        return self.compiled(self.params, tokens_BT)
      return self.fn(self.params, tokens_BT)


def check_batch(config: Config, mesh: Mesh, rules: Rules) -> None:
  """The token batch [B, T] must split over its mesh axes (UserError naming run.batch)."""
  rules.check((config.run.batch, config.run.seq_len), (axes.BATCH, axes.SEQ), mesh.shape,
              what="tokens", keys=gpt.CONFIG_KEYS)


def build(config: Config, mesh: Mesh, *, params: dict | None = None,
          vocab_multiple: int | None = None) -> Forward:
  """Checks the layout, creates (or places) the parameters and jits the forward pass.

  `params` (a dict in the model's structure, e.g. gathered from another mesh) replaces the
  seeded initialisation; it is placed on this mesh's shardings. `vocab_multiple` overrides the
  vocabulary padding (default: the number of ways the rules split `vocab` on this mesh).
  """
  if mesh.shape[axes.STAGE] > 1:
    raise UserError(f"mesh.stage={mesh.shape[axes.STAGE]}: the pipeline over `stage` is not "
                    f"available yet; use --set mesh.stage=1")
  rules = Rules(config.rules)
  check_batch(config, mesh, rules)
  token_sharding = rules.sharding((axes.BATCH, axes.SEQ), mesh, what="tokens")
  logits_sharding = rules.sharding((axes.BATCH, axes.SEQ, axes.VOCAB), mesh, what="logits")
  multiple = vocab_multiple or gpt.vocab_multiple(rules, mesh.shape)
  make = lambda rngs: gpt.GPT(config.model, vocab_multiple=multiple, rngs=rngs)
  graphdef, shapes, names = state.abstract(make)
  check_tree(shapes, names, rules, mesh, keys=gpt.CONFIG_KEYS)
  param_shardings = tree_shardings(names, rules, mesh)

  def forward(params: dict, tokens_BT: jax.Array) -> jax.Array:
    with use_rules(rules):
      return nnx.merge(graphdef, params)(tokens_BT)

  # Trace once abstractly: every activation's layout is checked before anything compiles.
  tokens_shape = jax.ShapeDtypeStruct((config.run.batch, config.run.seq_len), jnp.int32)
  with jax.set_mesh(mesh):
    jax.eval_shape(forward, shapes, tokens_shape)

  if params is None:
    params = state.create(make, seed=config.run.seed, mesh=mesh, shardings=param_shardings)
  else:
    params = jax.device_put(params, param_shardings)
  fn = jax.jit(forward, in_shardings=(param_shardings, token_sharding),
               out_shardings=logits_sharding)
  return Forward(config, mesh, rules, graphdef, params, names, fn)


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
  device = forward.mesh.devices.flat[0]
  one = jax.make_mesh((1, 1, 1), axes.MESH_AXES, devices=[device],
                      axis_types=(jax.sharding.AxisType.Auto,) * 3)
  host = jax.device_get(forward.params)
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
