"""The stage ring: the one loop every pipelined program runs (forward, prefill, decode rounds).

Inside `jax.shard_map` over `stage` (`shard`), each of the S stages runs the same tick
function T times; after every tick the message each stage produced moves on to the next stage
with one collective-permute:

    msg = msg0                            # what each stage received last
    for t in range(ticks):                # every stage runs every tick (SPMD)
      carry, out = tick(t, s, carry, msg) # s: this stage's index
      msg = ppermute(out, s -> (s + 1) % S)
    return carry, msg

A program is its tick function (under its own pseudocode docstring) and what it does with the
carry before and after. Values a tick makes are `varying` over `stage` (jax requires a loop
carry inside a shard_map to say so); the ring casts the carry and messages it is given and
returns, so a tick need not. The helpers below read and write one group (or microbatch) of a
buffer without touching the others: a masked write of one slot, never a whole-buffer select
(which copies the buffer every tick).
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh

from jaxpar.axes import STAGE


def _varying_axes(a) -> frozenset:
  aval = jax.typeof(a)
  if hasattr(aval, "vma"):  # jax 0.11
    return frozenset(aval.vma)
  return frozenset(aval.manual_axis_type.varying)  # jax 0.10


def varying(tree: Any) -> Any:
  """Marks every leaf as varying over `stage` (a no-op for leaves that already are)."""
  return jax.tree.map(
      lambda a: a if STAGE in _varying_axes(a) else lax.pcast(a, (STAGE,), to="varying"), tree)


def stage() -> jax.Array:
  """This stage's index (inside the ring's shard_map)."""
  return lax.axis_index(STAGE)


def send(tree: Any, pairs: list[tuple[int, int]]) -> Any:
  """`tree` permuted over `stage` (source, destination) pairs in one collective-permute (its
  leaves `pack`ed into one buffer). XLA:CPU gives the permutes of a tree the same rendezvous
  key and runs independent collectives in any order on each device, so two permutes in a
  tick could meet the wrong partners and wait forever (seen: a pipelined decode step's
  activations and tokens, now and then)."""
  leaves = jax.tree.leaves(tree)
  if len(leaves) == 1:
    return jax.tree.unflatten(jax.tree.structure(tree), [lax.ppermute(leaves[0], STAGE, pairs)])
  return unpack(lax.ppermute(pack(tree), STAGE, pairs), tree)


def pack(tree: Any) -> jax.Array:
  """The leaves of `tree` (sharing their leading dim) as the bytes of one uint8 [rows, n]
  array: what moves between devices moves in one collective."""
  leaves = jax.tree.leaves(tree)
  rows = leaves[0].shape[0]
  as_bytes = lambda a: lax.bitcast_convert_type(a.reshape(rows, -1), jnp.uint8).reshape(rows, -1)
  return jnp.concatenate([as_bytes(a) for a in leaves], axis=1)


def unpack(packed: jax.Array, like: Any) -> Any:
  """`pack`'s inverse: `like` gives the leaves' shapes and dtypes."""
  leaves, out, at = jax.tree.leaves(like), [], 0
  rows = packed.shape[0]
  for a in leaves:
    width = jnp.dtype(a.dtype).itemsize
    n = math.prod(a.shape[1:]) * width
    piece = packed[:, at:at + n]
    piece = piece.reshape(rows, -1, width) if width > 1 else piece
    out.append(lax.bitcast_convert_type(piece, a.dtype).reshape(a.shape))
    at += n
  return jax.tree.unflatten(jax.tree.structure(like), out)


def run(tick: Callable[[jax.Array, jax.Array, Any, Any], tuple[Any, Any]], carry: Any,
        msg: Any, *, ticks: int, stages: int) -> tuple[Any, Any]:
  """Runs `tick(t, s, carry, msg) -> (carry, out)` for t in range(ticks) (a `lax.scan`), each
  tick's `out` permuted s -> (s + 1) % S to be the next tick's `msg`. Returns the last carry
  and the last messages received. One stage (no shard_map needed): the ticks are plain calls
  with t and s Python ints, and each `out` is the next `msg` as it is."""
  if stages == 1:
    for t in range(ticks):
      carry, msg = tick(t, 0, carry, msg)
    return carry, msg
  ring = [(k, (k + 1) % stages) for k in range(stages)]
  s = stage()

  def body(state, t):
    carry, msg = state
    # The send waits for the whole tick: XLA:CPU runs independent collectives in any order
    # on each device, and a permute that one device starts before the last stage's
    # all-reduces and its neighbour after them would wait forever.
    carry, out = lax.optimization_barrier(tick(t, s, carry, msg))
    return (varying(carry), send(varying(out), ring)), None

  (carry, msg), _ = lax.scan(body, (varying(carry), varying(msg)), jnp.arange(ticks))
  return carry, msg


def first(s, make: Callable[[], Any], msg: Any) -> Any:
  """What stage `s` takes in: `make()` on the first stage, the message on the others. With
  one stage (`run` gives s = 0, a Python int) it is the first."""
  if isinstance(s, int):
    return make()
  return jnp.where(s == 0, make(), msg)


def last(s, stages: int, compute: Callable[[], Any]) -> Any:
  """`compute()` on the last stage, zeros of its shape on the others (a `lax.cond`: inside
  it only all-reduces may run, see `sampling._search`). With one stage (s = 0, a Python int)
  it is the last."""
  if isinstance(s, int):
    return compute()
  zeros = lambda: jax.tree.map(lambda a: varying(jnp.zeros(a.shape, a.dtype)),
                               jax.eval_shape(compute))
  return lax.cond(s == stages - 1, lambda: varying(compute()), zeros)


def shard(fn: Callable, *, mesh: Mesh, in_specs, out_specs) -> Callable:
  """`fn` as a shard_map over `stage` only: `data` and `model` stay automatic, so GSPMD keeps
  the tensor-parallel collectives inside each stage."""
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       axis_names={STAGE})


# ---- one group (or microbatch) of a buffer ----

def pick(tree: Any, index, *, axis: int = 0) -> Any:
  """Slot `index` of every leaf along `axis` (the axis removed)."""
  return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, index, axis, keepdims=False), tree)


def put(tree: Any, index, value: Any, keep=True, *, axis: int = 0) -> Any:
  """Slot `index` of every leaf along `axis` set to `value` where `keep` (the old slot kept
  elsewhere); only that slot is touched."""
  def write(a, v):
    old = lax.dynamic_index_in_dim(a, index, axis, keepdims=False)
    return lax.dynamic_update_index_in_dim(a, jnp.where(keep, v.astype(a.dtype), old), index,
                                           axis)
  return jax.tree.map(write, tree, value)


def where(cond, a: Any, b: Any) -> Any:
  """`jnp.where(cond, a, b)` leaf by leaf."""
  return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)
