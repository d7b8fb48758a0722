"""A collective-permute pipeline over the `stage` mesh axis, for any stage function.

The layer stack is cut into S stages; with R repeats (the circular, or interleaved, schedule)
each stage holds R non-contiguous chunks of layers: chunk (r, s) holds layers
[(r*S + s) * Lc, (r*S + s + 1) * Lc) with Lc = L / (R*S). R = 1 is GPipe. When R*S does not
divide L the chunks differ by one layer at most and each is padded to Lc = ceil(L / (R*S))
slots with identity layers (`layer_of`, `active`). Parameters arrive as
a pytree with leaves [S, R, Lc, ...] sharded over `stage` on dim 0 (see `to_stages`), so each
device holds only its own chunks. The batch is cut into M microbatches (strided, so the `data`
split of the batch stays inside each microbatch).

Schedule: T = R*M + S - 1 ticks of the stage ring (`jaxpar.parallel.ring`: `jax.shard_map`
over `stage` only, so tensor parallelism inside a stage keeps working):

    msg    = bubble          # the activation each stage received from the previous one
    parked = [bubble] * M    # stage 0 only (R > 1): activations back from the last stage
    out    = [0] * M         # last stage only: the finished microbatches
    for t in range(R*M + S - 1):           # every stage runs every tick (SPMD)
      i = t - s                            # the work item of stage s: repeat i // M,
      r, m = i // M, i % M                 #   microbatch i % M; idle unless 0 <= i < R*M
      if s == 0 and 0 <= t-S < (R-1)*M:    # item t-S left the last stage at tick t-1
        parked[(t-S) % M] = msg            #   and must wait for its next repeat
      x = (input[m] if r == 0 else parked[m]) if s == 0 else msg
      x = x if 0 <= i < R*M else bubble    # bubble ticks compute on filler, never kept
      y = stage_fn(params[s], r*Lc, x)     # chunk r of this stage: its Lc layers from
                                           #   r*Lc, each picked in the layer loop
      if s == S-1 and r == R-1 and 0 <= i < R*M:
        out[m] = y
      msg = ppermute(y, s -> (s+1) % S)    # one collective-permute per tick

Stage 0 needs item (r, m) at tick r*M + m and it comes back at tick (r-1)*M + m + S, so the
circular schedule needs M >= S (`check` says so up front; with M < S the result would be
silently wrong). The bubble, the fraction of stage-ticks spent idle, is (S-1) / (R*M + S-1).
At the end the last stage sends microbatches [k*M/S, (k+1)*M/S) to stage k (S - 1
collective-permutes), so the output leaves with its batch split over `stage` as well and no
stage idles through the work that follows (M must be a multiple of S).
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from jaxpar.axes import STAGE
from jaxpar.errors import UserError
from jaxpar.parallel import ring


@dataclasses.dataclass(frozen=True)
class Schedule:
  stages: int
  microbatches: int
  repeats: int = 1

  @property
  def ticks(self) -> int:
    return self.repeats * self.microbatches + self.stages - 1

  @property
  def bubble(self) -> float:
    """Idle fraction of stage-ticks: (S - 1) / (R*M + S - 1)."""
    return (self.stages - 1) / self.ticks

  def grid(self) -> np.ndarray:
    """[stages, ticks] int array: the work item i = r*M + m each stage runs, -1 when idle."""
    t = np.arange(self.ticks)[None, :]
    s = np.arange(self.stages)[:, None]
    i = t - s
    return np.where((i >= 0) & (i < self.repeats * self.microbatches), i, -1)

  def as_dict(self) -> dict:
    return {"stages": self.stages, "microbatches": self.microbatches, "repeats": self.repeats,
            "ticks": self.ticks, "bubble": self.bubble}


def check(schedule: Schedule, *, n_layers: int, batch: int | None = None,
          data: int = 1, over: str | None = None) -> None:
  """One-line UserErrors for layouts the schedule cannot run, before anything compiles: the
  layers always, the batch's microbatches when `batch` is given (a forward pass), split
  `data` ways (`over`: the mesh axes that split it, for the error)."""
  S, M, R = schedule.stages, schedule.microbatches, schedule.repeats
  if M < 1 or R < 1:
    raise UserError(f"pipeline.microbatches={M}, pipeline.repeats={R}: both must be at least 1")
  if n_layers < S * R:
    raise UserError(f"model.n_layers={n_layers} is fewer than mesh.stage={S} x "
                    f"pipeline.repeats={R} chunks of layers; use fewer stages or repeats")
  if batch is None:
    return
  if batch % M:
    raise UserError(f"run.batch={batch} is not divisible by pipeline.microbatches={M}; choose "
                    f"a microbatch count that divides the batch")
  if (batch // M) % data:
    raise UserError(f"a microbatch of run.batch / pipeline.microbatches = {batch // M} rows "
                    f"does not split over {over or f'mesh.data={data}'}; use fewer microbatches "
                    f"or a batch that gives each microbatch a multiple of {data} rows")
  if M < S:
    raise UserError(f"pipeline.microbatches={M} < mesh.stage={S}: the schedule needs at least "
                    f"as many microbatches as stages; set pipeline.microbatches={S} or a multiple of it")
  if M % S:
    raise UserError(f"pipeline.microbatches={M} is not a multiple of mesh.stage={S}: the "
                    f"finished microbatches are spread evenly over the stages; use "
                    f"{S}, {2 * S}, {4 * S}, ...")


def layer_of(s, r, j, *, stages: int, repeats: int, n_layers: int):
  """The layer at index (s, r, j) of the staged layout [S, R, Lc], or -1 for an identity
  padding slot: the one formula, used by `to_stages`, `from_stages` and the checkpoint
  loaders (works on ints and numpy arrays). Chunk k = r*S + s of K = R*S holds the next
  L // K layers, one more for the first L % K chunks, so stages differ by a layer at most
  (L = 12 on 5 stages: 3, 3, 2, 2, 2) and Lc = ceil(L / K) slots each."""
  chunks = stages * repeats
  k = np.asarray(r) * stages + np.asarray(s)
  base, extra = divmod(n_layers, chunks)
  start = k * base + np.minimum(k, extra)
  return np.where(np.asarray(j) < base + (k < extra), start + np.asarray(j), -1)


def per_chunk(n_layers: int, *, stages: int, repeats: int = 1) -> int:
  """Lc: the layer slots of one chunk, ceil(L / (S*R))."""
  return -(-n_layers // (stages * repeats))


def staged_layers(n_layers: int, *, stages: int, repeats: int = 1) -> np.ndarray:
  """[S, R, Lc] int: the layer at each slot, -1 where a slot is identity padding."""
  s, r, j = np.meshgrid(np.arange(stages), np.arange(repeats),
                        np.arange(per_chunk(n_layers, stages=stages, repeats=repeats)),
                        indexing="ij")
  return layer_of(s, r, j, stages=stages, repeats=repeats, n_layers=n_layers)


def to_stages(tree: Any, *, stages: int, repeats: int = 1) -> Any:
  """Leaves [L, ...] -> [S, R, Lc, ...]: index (s, r, j) holds layer `layer_of(s, r, j)`.

  When S*R divides L this is a reshape and a swap of the two leading dims, so a
  `stage`-sharded stack regroups in place. Otherwise (uneven stages) the padding slots hold
  zeros, and the blocks run there as identities (`active`)."""
  def regroup(x):
    L = x.shape[0]
    xp = jnp if isinstance(x, jax.Array) else np
    if L % (stages * repeats) == 0:
      x = x.reshape(repeats, stages, L // (repeats * stages), *x.shape[1:])
      return xp.swapaxes(x, 0, 1)
    index = staged_layers(L, stages=stages, repeats=repeats)
    padded = xp.concatenate([x, xp.zeros_like(x[:1])])
    return xp.take(padded, np.where(index < 0, L, index), axis=0)
  return jax.tree.map(regroup, tree)


def from_stages(tree: Any, *, n_layers: int | None = None) -> Any:
  """The inverse of `to_stages`: leaves [S, R, Lc, ...] -> [L, ...] (the padding dropped;
  `n_layers` defaults to S*R*Lc, no padding)."""
  def ungroup(x):
    S, R, Lc = x.shape[:3]
    L = n_layers or S * R * Lc
    xp = jnp if isinstance(x, jax.Array) else np
    if L == S * R * Lc:
      x = xp.swapaxes(x, 0, 1)
      return x.reshape(-1, *x.shape[3:])
    index = staged_layers(L, stages=S, repeats=R).ravel()
    where = np.argsort(np.where(index < 0, L + np.arange(index.size), index))[:L]
    return xp.take(x.reshape(-1, *x.shape[3:]), where, axis=0)
  return jax.tree.map(ungroup, tree)


def active(n_layers: int, *, stages: int, repeats: int = 1) -> np.ndarray | None:
  """[S, R, Lc] bool: which slots hold a layer (False: identity padding); None when S*R
  divides L and there is no padding."""
  if n_layers % (stages * repeats) == 0:
    return None
  return staged_layers(n_layers, stages=stages, repeats=repeats) >= 0


def _fill(a: jax.Array, value: float) -> jax.Array:
  """What a bubble tick computes on: `value` for floats, 0 for integers."""
  return jnp.full(a.shape, value if jnp.issubdtype(a.dtype, jnp.floating) else 0, a.dtype)


def run(stage_fn: Callable[[Any, Any, Any], Any], params: Any, x: Any, *, mesh: Mesh,
        schedule: Schedule, batch_axes: tuple[str, ...] = (), bubble_fill: float = 0.0) -> Any:
  """Runs `stage_fn(layers, first, x_microbatch) -> y_microbatch` as a pipeline over `stage`.

  `params` leaves are [S, R, Lc, ...] (sharded over `stage` on dim 0); `stage_fn` receives
  this stage's leaves flattened, [R*Lc, ...], and runs the Lc layers of the tick's chunk from
  `first` (traced), picking each inside its own layer loop (`run_blocks(window=...)`):
  slicing the chunk out first would copy its weights every tick. `x` is an array or a pytree of arrays [B, ...] (e.g. activations and
  their positions, which every stage needs) with the batch split over the mesh axes
  `batch_axes` (not over `stage`); `stage_fn` returns the same structure. The result has
  x's shapes with the batch split over (*batch_axes, stage): the last stage hands
  microbatches [k*M/S, (k+1)*M/S) to stage k with one collective-permute each, so work after
  the pipeline is spread over the stages too. `bubble_fill` is what idle ticks compute on in
  float leaves (NaN in tests proves that bubbles never reach the result).
  """
  S, M, R = schedule.stages, schedule.microbatches, schedule.repeats
  if mesh.shape[STAGE] != S:
    raise ValueError(f"schedule has {S} stages but mesh.stage={mesh.shape[STAGE]}")
  if M % S:
    raise ValueError(f"{M} microbatches do not spread over {S} stages (see `check`)")
  ways = math.prod(mesh.shape[a] for a in batch_axes)

  def per_stage(params_local, x_M):
    # This stage's chunks, flattened [R*Lc, ...]: no size-1 dim for XLA to lay out apart.
    layers = jax.tree.map(lambda p: p[0].reshape(-1, *p.shape[3:]), params_local)
    Lc = jax.tree.leaves(params_local)[0].shape[2]
    bubble = jax.tree.map(lambda a: _fill(a[0], bubble_fill), x_M)
    parked = jax.tree.map(lambda b: jnp.broadcast_to(b, (M, *b.shape)), bubble) if R > 1 else None
    out = jax.tree.map(jnp.zeros_like, x_M)

    def tick(t, s, carry, msg):
      parked, out = carry
      i = t - s
      valid = (i >= 0) & (i < R * M)
      i = jnp.clip(i, 0, R * M - 1)
      r, m = i // M, i % M
      first = ring.pick(x_M, m)
      if R > 1:
        back = t - S  # the item that left the last stage at tick t - 1
        arrived = (s == 0) & (back >= 0) & (back < (R - 1) * M)
        parked = ring.put(parked, jnp.clip(back, 0, R * M - 1) % M, msg, arrived)
        first = ring.where(r == 0, first, ring.pick(parked, m))
      x_in = ring.where(valid, ring.where(s == 0, first, msg), bubble)
      y = stage_fn(layers, r * Lc, x_in)
      out = ring.put(out, m, y, valid & (s == S - 1) & (r == R - 1))
      return (parked, out), y

    (_, out), _ = ring.run(tick, (parked, out), bubble, ticks=schedule.ticks, stages=S)
    return _spread(out, S)

  y_M = ring.shard(per_stage, mesh=mesh, in_specs=(P(STAGE), P()), out_specs=P(STAGE))(
      params, jax.tree.map(lambda a: _split(a, ways, M), x))
  return jax.tree.map(lambda a: _merge(a, ways), y_M)


def _split(a: jax.Array, ways: int, M: int) -> jax.Array:
  """[B, ...] -> [M, B/M, ...]: microbatch m takes rows [m*rows, (m+1)*rows) of every one
  of the `ways` batch shards (so each keeps the batch split)."""
  rows = a.shape[0] // (ways * M)
  return jnp.swapaxes(a.reshape(ways, M, rows, *a.shape[1:]), 0, 1).reshape(
      M, ways * rows, *a.shape[1:])


def _merge(a: jax.Array, ways: int) -> jax.Array:
  """The inverse of `_split`."""
  M, rows = a.shape[0], a.shape[1] // ways
  return jnp.swapaxes(a.reshape(M, ways, rows, *a.shape[2:]), 0, 1).reshape(
      M * ways * rows, *a.shape[2:])


def _spread(out: Any, S: int) -> Any:
  """The finished microbatches [M, ...] (on the last stage; zeros elsewhere) spread: stage k
  gets [k*M/S, (k+1)*M/S) by one collective-permute each."""
  per = jax.tree.leaves(out)[0].shape[0] // S
  mine = jax.tree.map(lambda o: o[(S - 1) * per:], out)
  for k in range(S - 1):
    sent = ring.send(jax.tree.map(lambda o: o[k * per:(k + 1) * per], out), [(S - 1, k)])
    mine = jax.tree.map(jnp.add, mine, sent)
  return mine
