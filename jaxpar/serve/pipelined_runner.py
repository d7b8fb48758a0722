"""The runner on a pipeline (mesh.stage > 1): one decode step of every row is one round of
the pipelined slot decoder (`jaxpar.runtime.pipelined_decoder`, the schedule in pseudocode),
and a prompt is prefilled whole through the stages into its row.

The host keeps every row's state (position, token, sampling settings) and sends it each
round, for the tokens that enter the pipeline this round (`cur`) and those that entered the
round before (`prev`): group 0's token leaves in its own round, the other groups' one round
late, so a request that ended has one more step in flight, which writes to the trash slot
(`release` clears its `write`) and whose token the engine drops. A new request's first token
joins the ring at its group's next turn (`inject`).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpar.runtime.pipelined_decoder import PipelinedDecoder, Rows
from jaxpar.serve.request import Stream
from jaxpar.serve.runner import Event, abstract_sampling, compiling, scalar, settings
from jaxpar.serve.scheduler import Placement


class PipelinedRunner:
  """Continuous batching over the rows of a `PipelinedDecoder`, which rotate through the
  stages; prompts padded to `buckets`."""
  prefix_reuse = False  # every prompt is prefilled whole, from position 0

  def __init__(self, programs: PipelinedDecoder, buckets: tuple[int, ...], *,
               progress: bool = True):
    self.programs, self.generator = programs, programs.generator
    self.slots, self.length = programs.slots, programs.length
    self.buckets = tuple(buckets)
    self.compiled = self._compile(progress)
    B = self.slots
    self._tokens, self._positions = np.zeros(B, np.int32), np.zeros(B, np.int32)
    self._temperature, self._top_k = np.zeros(B, np.float32), np.zeros(B, np.int32)
    self._top_p, self._seeds = np.ones(B, np.float32), np.zeros(B, np.uint32)
    self._counts, self._inject = np.zeros(B, np.int32), np.zeros(B, bool)
    self.reset()

  def reset(self) -> None:
    self._state = self.programs.empty_state()
    self._prev_rows, self._prev_owner = None, [None] * self.slots

  def busy(self) -> bool:
    return False  # a round returns every token that leaves the pipeline

  def step(self, running: Sequence[Stream | None]) -> list[Event]:
    rows = [b for b, s in enumerate(running) if s is not None]
    if not rows:
      return []
    return self._round(running, rows, all(self._temperature[b] == 0 for b in rows))

  def _round(self, running, rows: list[int], greedy: bool) -> list[Event]:
    """Every running row's next step enters the pipeline; the tokens that leave it are this
    round's for group 0, the previous round's for the others."""
    G, Bg, S = self.programs.G, self.programs.Bg, self.programs.S
    cur = Rows(self._positions.copy(), np.array([s is not None for s in running]),
               self._temperature.copy(), self._top_k.copy(), self._top_p.copy(),
               self._seeds.copy(), np.full(self.slots, -1, np.int32), self._counts.copy())
    prev = self._prev_rows or jax.tree.map(np.zeros_like, cur)
    both = jax.tree.map(lambda a, b: np.stack([a, b]).reshape(2, G, Bg), prev, cur)
    out, self._state = self.compiled["round", greedy](
        self.generator.params, self._state, self._inject.reshape(G, Bg),
        self._tokens.reshape(G, Bg), both)
    out = np.asarray(out).reshape(-1)
    now = lambda b: b // Bg + S - 1 < G  # left the pipeline in the round it entered
    owners = [(running[b], cur.write[b]) if now(b) else (self._prev_owner[b], prev.write[b])
              for b in range(self.slots)]
    self._inject[:] = False
    self._positions[rows] += 1
    self._counts[rows] += 1
    self._prev_rows, self._prev_owner = cur, list(running)
    return [(b, owner, int(out[b])) for b, (owner, valid) in enumerate(owners)
            if valid and owner is not None]

  def prefill(self, placement: Placement) -> list[Event]:
    stream, b = placement.stream, placement.row
    if placement.start:
      raise ValueError(f"{placement}: the pipelined runner prefills whole prompts "
                       f"(prefix_reuse is False), from position 0")
    P, p = len(stream.prompt), stream.params
    seed, sampling = settings(stream)
    tokens = np.zeros((1, 1, placement.bucket), np.int32)
    tokens[0, 0, :P] = stream.prompt
    one = lambda v: np.asarray(v).reshape(1, 1)
    first, self._state = self.compiled["prefill", placement.bucket](
        self.generator.params, self._state, tokens, one(np.int32(P)), np.int32(b),
        jax.tree.map(one, sampling), one(seed), one(np.int32(-1)))
    first = np.asarray(first).reshape(-1)[0]
    self._positions[b], self._counts[b], self._seeds[b] = P, 1, seed
    self._temperature[b], self._top_k[b], self._top_p[b] = p.temperature, p.top_k, p.top_p
    self._tokens[b], self._inject[b] = int(first), True
    return [(b, stream, int(first))]

  def release(self, row: int) -> None:
    self._positions[row] = self._temperature[row] = self._counts[row] = 0
    self._inject[row] = False
    if self._prev_rows is not None:  # its step in flight must not write into the row
      self._prev_rows.write[row] = False

  def _compile(self, progress: bool) -> dict:
    p, g = self.programs, self.generator
    steps = f"pipelined rounds of {self.slots} slots in {p.G} groups"
    compiled = {}
    with compiling(len(self.buckets) + 2, self.buckets, steps, progress=progress), \
        jax.set_mesh(g.mesh):
      state = p.empty_state(abstract=True)
      one = lambda a: jax.ShapeDtypeStruct((1, 1), a.dtype)
      for bucket in self.buckets:  # (tokens, length, slot, sampling, seed, fold): one prompt
        compiled["prefill", bucket] = p.prefill(1, 1, bucket).lower(
            g.params, state, jax.ShapeDtypeStruct((1, 1, bucket), jnp.int32),
            one(scalar(jnp.int32)), scalar(jnp.int32), jax.tree.map(one, abstract_sampling()),
            one(scalar(jnp.uint32)), one(scalar(jnp.int32))).compile()
      grid = lambda dtype, *lead: jax.ShapeDtypeStruct((*lead, p.G, p.Bg), dtype)
      dtypes = (jnp.int32, bool, jnp.float32, jnp.int32, jnp.float32, jnp.uint32, jnp.int32,
                jnp.int32)
      rows = Rows(*(grid(d, 2) for d in dtypes))
      for greedy in (True, False):
        compiled["round", greedy] = p.round(greedy=greedy).lower(
            g.params, state, grid(bool), grid(jnp.int32), rows).compile()
    return compiled
