"""Born-sharded parameters for any Flax NNX model.

A model is held as three things: its NNX graph definition, a pure dict of arrays, and a dict
of the same structure holding each array's `Logical` names (read from the parameters'
`out_sharding` metadata). The rule table turns the names into shardings; `jax.jit` with those
`out_shardings` creates every array directly in its shards, never whole on one device.
"""

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxpar.rules import Logical, Rules, check_tree, tree_shardings

MakeModel = Callable[[nnx.Rngs], nnx.Module]
# The initialiser runs once, over every parameter: for a large model XLA:CPU's optimisations
# stay on whatever XLA_FLAGS asks (the tests' quick compiles ran a 1-layer Llama 3.2
# initialiser 3.5x slower, 4.1 s against 1.2 s); a small one compiles quicker without.
OPTIMISED_CPU = {"xla_backend_optimization_level": 3, "xla_cpu_use_fusion_emitters": True}
OPTIMISE_FROM = 2**23  # parameters


def _names(state: nnx.State) -> dict:
  def logical(variable: nnx.Variable) -> Logical:
    names = variable.get_metadata().get("out_sharding")
    if names is None:
      raise ValueError(f"a {type(variable).__name__} of shape {variable.shape} has no logical "
                       f"names: create it with out_sharding=(name, ...)")
    return Logical(tuple(names))
  return nnx.to_pure_dict(jax.tree.map(logical, state,
                                       is_leaf=lambda x: isinstance(x, nnx.Variable)))


def abstract(make: MakeModel) -> tuple[nnx.GraphDef, dict, dict]:
  """(graphdef, ShapeDtypeStruct dict, Logical dict) without allocating anything."""
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state), _names(state)


def create(make: MakeModel, *, seed: int, mesh: Mesh, shardings: Any,
           layout: Callable[[dict], dict] = lambda p: p, timings: dict | None = None) -> dict:
  """Runs the model's initialisers under jit, each array created in its shards.

  `layout` regroups the pure dict inside the same program (e.g. into pipeline stages).
  `timings`, if given, receives `compile_s` (compiling the initialiser) and `run_s`.
  """
  def params() -> dict:
    with nnx.use_eager_sharding(False):
      return layout(nnx.to_pure_dict(nnx.state(make(nnx.Rngs(seed)))))

  with jax.set_mesh(mesh):
    start = time.perf_counter()
    lowered = jax.jit(params, out_shardings=shardings).lower()
    size = sum(math.prod(a.shape) for a in jax.tree.leaves(lowered.out_info))
    cpu = mesh.devices.flat[0].platform == "cpu"
    program = lowered.compile(OPTIMISED_CPU if cpu and size >= OPTIMISE_FROM else None)
    compiled = time.perf_counter()
    out = jax.block_until_ready(program())
  if timings is not None:
    timings.update(compile_s=compiled - start, run_s=time.perf_counter() - compiled)
  return out


def init(make: MakeModel, *, seed: int, mesh: Mesh, rules: Rules,
         keys: Mapping[str, str] = {}) -> tuple[nnx.GraphDef, dict, dict]:
  """(graphdef, sharded params, names). Layout errors are raised before anything compiles."""
  graphdef, shapes, names = abstract(make)
  check_tree(shapes, names, rules, mesh, keys=keys)
  params = create(make, seed=seed, mesh=mesh, shardings=tree_shardings(names, rules, mesh))
  return graphdef, params, names


def param_bytes_per_device(params: Any) -> int:
  """Bytes of the parameters held by one device (this process's first), read from the
  shards."""
  device = min(jax.tree.leaves(params)[0].sharding.addressable_devices, key=lambda d: d.id)
  return sum(shard.data.nbytes for leaf in jax.tree.leaves(params)
             for shard in leaf.addressable_shards if shard.device == device)


@dataclasses.dataclass
class ShardedModel:
  """A model on a mesh: `params` sharded by `names` (the rule table's reading of them), and
  `fn(params, x)` jitted. Calls go through the executable that `compile` made, if any."""
  config: Any
  mesh: Mesh
  rules: Rules
  graphdef: nnx.GraphDef
  params: dict
  names: dict
  fn: Any  # the jax.jit-wrapped forward
  compiled: Any = None

  def compile(self, x: jax.Array):
    """Lowers and compiles for `x`'s shape and sharding; returns the executable."""
    with jax.set_mesh(self.mesh):
      self.compiled = self.fn.lower(self.params, x).compile()
    return self.compiled

  def __call__(self, x: jax.Array) -> jax.Array:
    with jax.set_mesh(self.mesh):
      if self.compiled is not None:
        return self.compiled(self.params, x)
      return self.fn(self.params, x)
