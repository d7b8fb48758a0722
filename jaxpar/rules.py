"""The one ordered table from logical dimension names to mesh axes.

Models name dimensions (`batch`, `heads`, `mlp`, ...); a `Rules` table turns those names into
a `PartitionSpec` for a given mesh. A name missing from the table is an error (map it to
`None` on purpose to replicate), two dims of one tensor on the same mesh axis is an error, and
a dim that its mesh axes do not divide is an error: JAX itself would silently replicate it
inside jit.

Parameters travel as two pytrees of the same structure: values (arrays or ShapeDtypeStructs)
and names (`Logical` leaves). Everything here works on any such pair, whatever made it.
"""

import contextlib
import dataclasses
import math
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpar import axes
from jaxpar.errors import UserError


@dataclasses.dataclass(frozen=True)
class Logical:
  """The logical names of one tensor's dims; a pytree leaf."""
  names: tuple[str | None, ...]

  def __repr__(self) -> str:
    return "(" + ", ".join(str(n) for n in self.names) + ")"


def _targets(target: Any) -> tuple[str, ...]:
  if target is None:
    return ()
  return tuple(target) if isinstance(target, (tuple, list)) else (target,)


@dataclasses.dataclass(frozen=True)
class Rules:
  """An ordered table of (logical name, mesh axis | tuple of mesh axes | None)."""
  table: tuple = axes.DEFAULT_RULES

  def __post_init__(self):
    for name, target in self.table:
      if name not in axes.LOGICAL_NAMES:
        raise UserError(f"rules.{name}: unknown logical name; known names: "
                        f"{', '.join(axes.LOGICAL_NAMES)}")
      for axis in _targets(target):
        if axis not in axes.MESH_AXES:
          raise UserError(f"rules.{name}={target!r}: {axis!r} is not a mesh axis; use one of "
                          f"{', '.join(axes.MESH_AXES)} or null")

  def replace(self, name: str, target: Any) -> "Rules":
    """The same table with `name` mapped to `target` (kept in place, or appended)."""
    names = [n for n, _ in self.table]
    if name in names:
      return Rules(tuple((n, target if n == name else t) for n, t in self.table))
    return Rules(self.table + ((name, target),))

  def mesh_axes(self, name: str | None, *, what: str = "a tensor") -> tuple[str, ...]:
    """The mesh axes that logical `name` is split over (() for replicated)."""
    if name is None:
      return ()
    for rule_name, target in self.table:
      if rule_name == name:
        return _targets(target)
    raise UserError(f"logical name {name!r} of {what} has no rule; add 'rules.{name}' (a mesh "
                    f"axis, or null to replicate) to the config's rules table")

  def spec(self, names: tuple, *, mesh_axis_names: tuple = axes.MESH_AXES,
           what: str = "a tensor") -> P:
    """The PartitionSpec for dims named `names`; mesh axes absent from the mesh are dropped."""
    used: dict[str, str] = {}
    parts = []
    for name in names:
      dims = tuple(a for a in self.mesh_axes(name, what=what) if a in mesh_axis_names)
      for axis in dims:
        if axis in used:
          raise UserError(f"rule conflict in {what} {tuple(names)}: logical names "
                          f"{used[axis]!r} and {name!r} both map to mesh axis {axis!r} "
                          f"(rules.{used[axis]}, rules.{name}); map one of them to another "
                          f"axis or null")
        used[axis] = name
      parts.append(None if not dims else dims[0] if len(dims) == 1 else dims)
    return P(*parts)

  def sharding(self, names: tuple, mesh: Mesh, *, what: str = "a tensor") -> NamedSharding:
    return NamedSharding(mesh, self.spec(names, mesh_axis_names=mesh.axis_names, what=what))

  def check(self, shape: tuple, names: tuple, mesh_shape: Mapping[str, int], *,
            what: str = "a tensor", keys: Mapping[str, str] = {}) -> P:
    """Checks rank and divisibility of `shape`; returns its PartitionSpec.

    `keys` maps logical names to the config keys that set those sizes, so the error can say
    which value to change (e.g. heads -> model.n_heads).
    """
    if len(shape) != len(names):
      raise UserError(f"{what} has shape {tuple(shape)} but {len(names)} logical names "
                      f"{tuple(names)}; give one name per dim")
    spec = self.spec(names, mesh_axis_names=tuple(mesh_shape), what=what)
    for dim, (size, name, part) in enumerate(zip(shape, names, spec)):
      split = _targets(part)
      ways = math.prod(mesh_shape[a] for a in split)
      if size % ways:
        key = keys.get(name, f"dim {dim} of {what}")
        over = " x ".join(f"mesh.{a}={mesh_shape[a]}" for a in split)
        raise UserError(f"{key}={size} does not split over {over} ({what} {tuple(shape)}, "
                        f"names {tuple(names)}, spec {spec}); choose sizes that divide, or "
                        f"set rules.{name}=null to replicate it")
    return spec


def is_logical(x: Any) -> bool:
  return isinstance(x, Logical)


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def check_tree(values: Any, names: Any, rules: Rules, mesh: Mesh, *,
               keys: Mapping[str, str] = {}) -> Any:
  """Checks every leaf of `values` against its `Logical` in `names`; returns a spec tree."""
  return jax.tree.map_with_path(
      lambda path, n, v: rules.check(v.shape, n.names, mesh.shape, what=_path(path), keys=keys),
      names, values, is_leaf=is_logical)


def tree_shardings(names: Any, rules: Rules, mesh: Mesh) -> Any:
  """Maps a tree of `Logical` leaves to NamedShardings on `mesh`."""
  return jax.tree.map_with_path(
      lambda path, n: rules.sharding(n.names, mesh, what=_path(path)), names, is_leaf=is_logical)


# Activations: models call `constrain(x, names)`; the runtime says which rules apply.
_ACTIVE = threading.local()


@contextlib.contextmanager
def use_rules(rules: Rules, *, keys: Mapping[str, str] = {}) -> Iterator[Rules]:
  """Makes `rules` the table that `constrain` uses while tracing inside this block; `keys`
  name the config keys behind logical sizes, for errors."""
  previous = getattr(_ACTIVE, "rules", None), getattr(_ACTIVE, "keys", {})
  _ACTIVE.rules, _ACTIVE.keys = rules, keys
  try:
    yield rules
  finally:
    _ACTIVE.rules, _ACTIVE.keys = previous


def active_rules() -> Rules:
  rules = getattr(_ACTIVE, "rules", None)
  if rules is None:
    raise RuntimeError("no rule table is active: wrap the traced call in "
                       "`with jaxpar.rules.use_rules(rules):`")
  return rules


def constrain(x: jax.Array, names: tuple) -> jax.Array:
  """`with_sharding_constraint` by logical names, under the active rules and mesh.

  Never silently does nothing: an unknown name, a wrong rank, a missing mesh or a dim its
  mesh axes do not divide raises (JAX would quietly replicate the last one). Inside
  `jax.shard_map` the manual axes are already split by hand and are left out of the spec.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    raise RuntimeError("constrain() needs a mesh: call it under `jax.set_mesh(mesh)`")
  auto = {name: size for name, size, kind in zip(mesh.axis_names, mesh.axis_sizes,
                                                 mesh.axis_types)
          if kind != jax.sharding.AxisType.Manual}
  spec = active_rules().check(x.shape, names, auto, what="an activation",
                              keys=getattr(_ACTIVE, "keys", {}))
  return jax.lax.with_sharding_constraint(x, spec)


def by_hand(fn, name: str, *args) -> Any:
  """`fn(*args)` on each device's share of `args`, every leaf split on its first dim over
  the mesh axes of logical `name` (a shard_map over those axes only: the others stay
  automatic, so GSPMD still splits what `fn` computes over them). For indices that address
  a device's own part of an array (the cache rows of its batch), which GSPMD cannot know."""
  mesh_axes = active_rules().mesh_axes(name)
  split = P(mesh_axes)
  mapped = jax.shard_map(fn, in_specs=(split,) * len(args), out_specs=split,
                         axis_names=set(mesh_axes))
  return mapped(*args)


def by_group(fn, groups: int, *arrays):
  """`fn` on each data group's share of `arrays` (split on their first dim like the batch):
  on each device its own group's (`by_hand` over the batch axes), as one when there is one
  group."""
  return fn(*arrays) if groups == 1 else by_hand(fn, axes.BATCH, *arrays)


def lead_rows(x: jax.Array, rows: int, groups: int) -> jax.Array:
  """The first `rows` rows of each of the `groups` equal groups of x's leading dim (the
  groups are the batch axes' shards: each device takes its own, `by_hand`)."""
  return by_group(lambda a: a[:rows], groups, x)


def put_lead_rows(x: jax.Array, part: jax.Array, rows: int, groups: int) -> jax.Array:
  """x with `lead_rows(x, rows, groups)` replaced by `part`."""
  return by_group(lambda a, p: a.at[:rows].set(p), groups, x, part)
