"""The runner: what carries out the scheduler's decisions on the devices.

A runner owns the device state (KV caches, the rows' decoding state) and every compiled
program; it compiles them all when it is made, so that no request compiles anything
(`serve.precompile=false`: each on first use, a quicker start for development). The
engine asks it for one decode step over the running rows and one prefill per `Placement`, and
gets back `(row, owner, token, logprobs)` events: `token` was made for the request `owner` in
`row` (the engine drops it when `owner` no longer holds the row); `logprobs` is the token's
`TokenLogprobs` when the request asked for them, else None. `Runner` runs the slot decoder
(`jaxpar.runtime.decoder`) on any mesh, pipelined included; `RunnerLike` is what the engine
needs of one (tests give it fakes).
"""

import collections
import dataclasses
from collections.abc import Sequence
from typing import Protocol

import jax
import numpy as np

from jaxpar.distributed import say
from jaxpar.runtime.decoder import Decoder
from jaxpar.runtime.slots import row_buckets
from jaxpar.runtime.speculative import Speculation
from jaxpar.serve import grammar
from jaxpar.serve.compiled import Programs, compiling, makers, warm_up
from jaxpar.serve.request import Stream, TokenLogprobs
from jaxpar.serve.scheduler import Placement
from jaxpar.serve.shapes import settings

Event = tuple[int, Stream, int, "TokenLogprobs | None"]  # (row, its owner, token, logprobs)


class RunnerLike(Protocol):
  """What the engine needs from a runner."""
  generator: object  # jaxpar.runtime.generate.Generator
  slots: int
  length: int
  buckets: tuple[int, ...]
  group_rows: int  # rows per data group (the scheduler fills each group's first rows first)
  compiled: dict  # every program, compiled

  def step(self, running: Sequence[Stream | None]) -> list[Event]:
    """Queues a decode step of the rows whose `running` entry is a request (all of it, or
    as far as the tokens' choice, which waits for `choose`); the tokens that are ready
    (possibly an earlier step's and earlier prefills')."""

  def choose(self, running: Sequence[Stream | None]) -> None:
    """Queues the choice of the step `step` queued, if it waits (the masks of the running
    rows' grammars, computed now, after the tokens `step` returned were delivered)."""

  def prefill(self, placement: Placement) -> list[Event]:
    """Prefills `placement`'s prompt into its row; its first token, if ready already."""

  def release(self, row: int) -> None:
    """Row `row`'s request ended: nothing in flight may write into the row any more."""

  def busy(self) -> bool:
    """Whether tokens are in flight that `step` has yet to return."""

  def reset(self) -> None:
    """Zeroed caches and no rows (after a failed program)."""


class Seen:
  """Per row, how often each run of `n` tokens occurred in its prompt and the output read so
  far: whether the row's last `n` tokens occurred before (`speculative.ngram_proposals` would
  find a match)."""

  def __init__(self, n: int):
    self.n, self.rows = n, {}  # n = 0: nothing kept

  def start(self, row: int, tokens: list[int]) -> None:
    n = self.n
    if not n:
      return
    self.rows[row] = (list(tokens[-n:]), collections.Counter(
        tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)))

  def saw(self, row: int, token: int) -> None:
    if row in self.rows:
      tail, seen = self.rows[row]
      tail.append(token)
      del tail[:-self.n]
      seen[tuple(tail)] += 1

  def found(self, row: int) -> bool:
    tail, seen = self.rows.get(row, ((), {}))
    return len(tail) == self.n and seen.get(tuple(tail), 0) >= 2

  def end(self, row: int) -> None:
    self.rows.pop(row, None)


class Runner:
  """The slot decoder: one prefill program per prompt bucket (from a cached prefix or not,
  without stages) and a greedy and a sampled decode step per attention span and active-row
  bucket. The prefill and the sampled step also give each token's log-probabilities and
  adjust the logits (biases, penalties); a step runs greedy only when every running row needs
  none of that (`Params.greedy`). Without stages a step computes only the first A rows of
  each data group, A the least of `slots.row_buckets` that holds every running row (the
  scheduler fills low rows first): one request on an 8-slot server decodes at batch 1.

  The decode step's inputs live on the devices, so step t is queued before the host reads
  step t-1's tokens, and the devices decode while the host streams. Without stages the
  sampled step is two programs, a forward to the logits and the choice (`choose`): the host
  reads step t-1's tokens, streams them and computes the grammars' masks while step t's
  forward runs, then queues its choice with the masks. A pipeline chooses inside its ring:
  while a row has a grammar, its step waits for step t-1's tokens. A request that ends on
  step t-1's token has step t in flight: its token is dropped (the row's owner has changed),
  and a new request prefilled into the row runs after it. On a pipeline the `late` rows' step
  gives the token of their previous entry: it belongs to whoever held the row then.

  With `speculation` (`draft`: the draft's slot decoder, its own caches
  prefilled beside the model's), a step whose running rows all `Params.speculates` is one
  round (`speculative.round_fn`): the proposals and their check, 1 to k + 1 tokens per row.
  The host does not know how many until it reads them: meanwhile a row's host position is
  the most it can be. The decoder holds k positions per row more than requests may use. On
  a pipeline a round gives every row's own tokens (a late row's first is the one its last
  step left in the ring, computed again) and leaves nothing in flight."""

  def __init__(self, decoder: Decoder, *, buckets: tuple[int, ...], spans: tuple[int, ...],
               progress: bool = True, precompile: bool = True,
               speculation: Speculation = Speculation(), draft: Decoder | None = None,
               metrics=None):
    self.decoder, self.generator = decoder, decoder.generator
    self.spec, self.draft, self.metrics = speculation, draft, metrics
    self.k = speculation.k if speculation.on else 0
    if speculation.on and speculation.uses_draft != (draft is not None):
      raise ValueError(f"speculation {speculation.method}: a draft decoder exactly when it "
                       f"uses one")
    # A row's last k positions hold its checked proposals: requests end k before them.
    self.slots, self.length = decoder.slots, decoder.length - self.k
    self.buckets, self.spans = tuple(buckets), tuple(spans)
    self.rows = row_buckets(decoder)
    self.group_rows = self.slots // decoder.data_ways
    self._late = decoder.late()
    self.width = grammar.words(self.generator.config.model.vocab_size)  # a row's mask
    with jax.set_mesh(self.generator.mesh):
      self.compiled = Programs(makers(self), self.generator.mesh)
    self._open = {}  # the open masks of a step's rows, by how many it computes
    # The host's copy of the rows' positions (which span) and whether their request needs
    # the sampled step.
    self._positions = np.zeros(self.slots, np.int32)
    self._sampled = np.zeros(self.slots, bool)
    # On a pipeline, the late rows whose last step's entry is still in the ring (a round
    # computes it again: the host has counted its token already).
    self._in_ring = np.zeros(self.slots, bool)
    self.reset()
    if precompile:
      self.compile_all(progress)
    elif progress:
      say(f"{len(self.compiled.makers)} programs compile on first use "
          f"(serve.precompile=false)")

  def reset(self) -> None:
    self._state = self.decoder.empty_state()
    self._draft_state = self.draft.empty_state() if self.draft else None
    self._logits = None  # a split step's logits, waiting for its choice
    # (program, {row: owner}, {row: its place in the step}) of the step whose choice
    # `choose` queues
    self._choice = None
    # (tokens, {row: owner}, {row: its place in tokens}) of the prefills queued, not yet
    # read, and of the decode step queued
    self._firsts: list = []
    self._queued: list = []
    self._owners: dict = {}  # {row: owner} of the last step's entries
    self._in_ring[:] = False
    # What prompt lookup would find, as far as the host has read (speculating by lookup).
    self._seen = Seen(self.spec.ngram_min if self.spec.method == "ngram" else 0)

  def busy(self) -> bool:
    return bool(self._firsts or self._queued or self._choice)

  def active(self, rows: int) -> list[int]:
    """The rows a step of `rows` rows per data group computes, in its batch's order."""
    per = self.group_rows
    return [g * per + a for g in range(self.slots // per) for a in range(rows)]

  def step(self, running: Sequence[Stream | None]) -> list[Event]:
    rows = [b for b, s in enumerate(running) if s is not None]
    queued = []
    if rows:
      greedy = not self._sampled[rows].any()
      last = min(max(self._positions[b] for b in rows), self.length - 1)
      span = next(t for t in self.spans if t > last)
      A = next(a for a in self.rows if a > max(b % self.group_rows for b in rows))
      at = {b: i for i, b in enumerate(self.active(A))}  # row -> its place in the step
      now = {b: running[b] for b in rows}
      rounds = self.k and all(running[b].params.speculates() for b in rows) and (
          self._guessable(rows))
      # A step's late rows give their entry of the step before; a round gives every row's
      # own (and the late rows' next step gives nothing kept).
      late = self._late & (not rounds)
      owners = {b: owner for b in range(self.slots)
                if (owner := (self._owners if late[b] else now).get(b)) is not None}
      self._owners = {} if rounds else now
      self._positions[rows] += 1
      params = self.generator.params
      masked = any(running[b].matcher is not None for b in rows)
      if rounds:
        queued = [(self._speculate(greedy, last, A, rows, at), owners, at)]
      elif greedy:
        next_B, self._state = self.compiled["decode", True, span, A](params, self._state)
        queued = [(next_B, owners, at)]
      elif not self.decoder.pipelined:  # the forward now, the choice in `choose`
        self._logits, self._state = self.compiled["forward", span, A](params, self._state)
        self._choice = (self.compiled["choose", A], owners, at)
      elif masked:  # a pipeline chooses in its ring: the masks need every token first
        self._choice = (self.compiled["decode", False, span, A], owners, at)
      else:
        program = self.compiled["decode", False, span, A]
        next_B, self._state = program(params, self._state, self._open_mask(program, len(at)))
        queued = [(next_B, owners, at)]
      if not rounds and self.decoder.pipelined:
        self._in_ring[:] = self._late
    events = self._read(running)
    self._queued = queued
    return events

  def _speculate(self, greedy: bool, last: int, A: int, rows: list[int], at: dict) -> "Checked":
    """Queues a round that checks proposals for `rows` (`speculative.round_fn`): up to k + 1
    tokens each, so their host positions become upper bounds until `_read` reads them."""
    k = self.k
    span = next(t for t in self.spans if t > last + k)  # it writes positions up to last + k
    live = np.zeros(len(at), bool)
    live[[at[b] for b in rows]] = True
    self._positions[rows] += k - self._in_ring[rows]
    self._in_ring[:] = False
    draft_params = self.spec.draft.params if self.draft else None
    out, self._state, self._draft_state = self.compiled["speculate", greedy, span, A](
        self.generator.params, self._state, live, draft_params, self._draft_state)
    return Checked(*out)

  def choose(self, running: Sequence[Stream | None]) -> None:
    if self._choice is None:
      return
    (program, owners, at), self._choice = self._choice, None
    matchers = [None if running[b] is None else running[b].matcher for b in at]
    masked = any(m is not None for m in matchers)
    allowed = (grammar.masks(matchers, self.width) if masked
               else self._open_mask(program, len(at)))
    args = (self._state, allowed) if self._logits is None else (self._state, self._logits,
                                                                allowed)
    next_B, self._state = program(self.generator.params, *args)
    self._logits, self._queued = None, [(next_B, owners, at)]

  def _read(self, running: Sequence[Stream | None]) -> list[Event]:
    """The tokens of the prefills and the step queued (waiting for them), as events; each
    is given to its request's grammar (while the request still holds the row)."""
    pending, self._firsts, self._queued = [*self._firsts, *self._queued], [], []
    events = []
    for chosen, owners, at_row in pending:
      if isinstance(chosen, Checked):
        events += self._checked(chosen, owners, at_row, running)
        continue
      tokens, logprobs, *prompt = (chosen, None) if not isinstance(chosen, tuple) else chosen
      tokens = np.asarray(tokens).reshape(-1)
      for owner in owners.values():  # a prefill's: the prompt's log-probabilities
        if prompt and owner.params.scores_prompt:
          scored = jax.tree.map(lambda a: np.asarray(a)[0], prompt[0])
          owner.prompt_logprobs = [_token_logprobs(scored, t, owner)
                                   for t in range(len(owner.prompt) - 1)]
      if logprobs is not None and any(o.params.logprobs is not None for o in owners.values()):
        logprobs = jax.tree.map(np.asarray, logprobs)
      else:
        logprobs = None
      for b, owner in owners.items():
        at = at_row[b]
        events.append((b, owner, int(tokens[at]), _token_logprobs(logprobs, at, owner)))
        if owner.matcher is not None and owner is running[b]:
          owner.matcher.consume_token(int(tokens[at]))
    for b, owner, token, _ in events:
      if owner is running[b]:
        self._seen.saw(b, token)
    return events

  def _checked(self, c: "Checked", owners: dict, at_row: dict,
               running: Sequence[Stream | None]) -> list[Event]:
    """A speculating round's tokens as events (each row's in order); the rows' host positions
    made exact, and the metrics told what was proposed and kept."""
    tokens, made, proposed = np.asarray(c.tokens), np.asarray(c.made), np.asarray(c.proposed)
    events, counts = [], np.zeros(3, np.int64)  # proposed, accepted, checks
    for b, owner in owners.items():
      at, n = at_row[b], int(made[at_row[b]])
      if owner is running[b]:
        self._positions[b] -= self.k + 1 - n
        if proposed[at]:
          counts += (proposed[at], n - 1, 1)
      events += [(b, owner, int(t), None) for t in tokens[at, :n]]
    if self.metrics is not None and counts[2]:
      self.metrics.speculated(*map(int, counts))
    return events

  def _guessable(self, rows: list[int]) -> bool:
    """Whether a round may check proposals: always with a draft; with prompt lookup when at
    least half of `rows` have a last `ngram_min` tokens that occurred before, in what the
    host has read (the round looks again on the devices, with the tokens in flight too; a
    round that only looks and steps costs more than a step)."""
    return self.spec.method != "ngram" or 2 * sum(map(self._seen.found, rows)) >= len(rows)

  def prefill(self, placement: Placement) -> list[Event]:
    stream, b, start = placement.stream, placement.row, placement.start
    P = placement.end  # the prompt's tokens computed after this chunk
    seed, sampling = settings(stream, self.generator.eos_ids, self.decoder.bias, self.width)
    tokens = np.zeros((1, placement.bucket), np.int32)
    tokens[0, :P - start] = stream.prompt[start:P]
    one = lambda v: np.asarray([v])
    first, self._state = self.compiled["prefill", placement.bucket](
        self.generator.params, self._state, tokens, np.int32(start), one(np.int32(P)),
        np.int32(placement.source), np.int32(b), jax.tree.map(one, sampling), one(seed),
        one(np.int32(stream.params.choice)),
        one(np.bool_(stream.params.scores_prompt)))
    if self.draft:  # the draft's cache too (its first token unused)
      _, self._draft_state = self.compiled["draft prefill", placement.bucket](
          self.spec.draft.params, self._draft_state, tokens, np.int32(start),
          one(np.int32(P)), np.int32(placement.source), np.int32(b),
          jax.tree.map(one, sampling), one(seed), one(np.int32(stream.params.choice)))
    self._positions[b], self._sampled[b] = P, not stream.params.greedy()
    self._in_ring[b] = False  # (its entry in flight is not kept)
    if not placement.last:  # the row fills on (not decoded): its token is not the request's
      return []
    self._seen.start(b, stream.prompt)
    self._firsts.append((first, {b: stream}, {b: 0}))  # read after the next step is queued
    return []

  def release(self, row: int) -> None:
    self._positions[row] = self._sampled[row] = 0
    self._seen.end(row)

  def compile_all(self, progress: bool = True) -> None:
    """Compiles every program and runs each once (`compiled.warm_up`), so that no request
    waits for a compile or a program's slow first run; said in a line."""
    d = self.decoder
    rows = "" if len(self.rows) == 1 else f" ({', '.join(map(str, self.rows))} active rows)"
    steps = (f"decode steps of {self.slots} slots{rows} over {', '.join(map(str, self.spans))} "
             f"positions" + (f" ({d.G} groups through {d.S} stages)" if d.pipelined else "")
             + (f", rounds checking {self.k} {self.spec.method} proposals" if self.k else ""))
    with compiling(len(self.compiled.makers), self.buckets, steps, progress=progress):
      self.compiled.compile_all()
      warm_up(self)

  def _open_mask(self, program, rows: int):
    """The mask that allows every token, for a step of `rows` rows (made once per count)."""
    if rows not in self._open:
      self._open[rows] = jax.device_put(grammar.masks([None] * rows, self.width),
                                        program.input_shardings[0][-1])
    return self._open[rows]


@dataclasses.dataclass
class Checked:
  """A speculating round's output (device arrays): row i made tokens_BT[i, :made_B[i]] and
  had proposed_B[i] tokens checked."""
  tokens: jax.Array
  made: jax.Array
  proposed: jax.Array


def _token_logprobs(logprobs, at: int, owner: Stream) -> TokenLogprobs | None:
  """Row `at`'s log-probabilities (host arrays), as many alternatives as `owner` asks for."""
  n = owner.params.logprobs
  if logprobs is None or n is None:
    return None
  top = [(int(i), float(v)) for i, v in zip(logprobs.top_ids[at, :n], logprobs.top[at, :n])]
  return TokenLogprobs(float(logprobs.token[at]), top)
