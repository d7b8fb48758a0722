"""What runs where, in plain Python (no JAX): the serving scheduler.

It holds the waiting queue (refused past `max_queue` with 429, and with 503 once closing),
the rows (`running[b]`: the request decoding in row b, or None), the admission policy, the
cancelled requests, and the prefix index: `cached[b]`, the tokens whose keys and values row b's
cache holds at positions 0, 1, ... (a finished request's stay until the row is prefilled
again), which a new prompt can start from. `admit` decides which waiting request goes into
which free row, from which cached prefix and in which prompt bucket (a `Placement`); a runner
carries that out on the devices.

    continuous: every free row takes the next waiting request (first come, first served)
    static:     nothing is admitted until every row is free; then a batch in arrival order

Chunked prefill (`step_tokens` > 0, continuous): the prompt tokens computed between two
decode steps are at most `step_tokens` less the rows decoding (padded chunks counted whole),
and a prompt that does not fit is computed in chunks over several steps while the others
decode: its row is `filling` (owned, not decoded) until its last chunk, each chunk continuing
the row's own cache (the runner's prefix reuse). Prompts that were started go on first, in
the order they came; the first chunk of a step always runs, at least the smallest bucket.

    budget = step_tokens - rows decoding
    for each filling row, then each waiting request into a free row, while budget remains:
      chunk = the rest of its prompt if its bucket fits the budget (its last chunk),
              else the largest bucket that fits (exactly that many tokens)
"""

import collections
import dataclasses
import itertools
import threading
from collections.abc import Callable

from jaxpar.serve.request import Output, Params, RequestError, Stream

POLICIES = ("continuous", "static")


@dataclasses.dataclass(frozen=True)
class Placement:
  """Prefill `stream`'s prompt into row `row`: its positions below `start` are copied from row
  `source`'s cache (`source` is `row` itself when nothing is reused), positions start..end-1
  are computed, padded to `bucket` tokens. `end` is the prompt's length for its last chunk
  (the request decodes from the next step); `first`: its first chunk."""
  stream: Stream
  row: int
  start: int
  bucket: int
  source: int
  end: int
  first: bool = True

  @property
  def last(self) -> bool:
    return self.end == len(self.stream.prompt)


def common_prefix(a: list[int], b: list[int]) -> int:
  """How many leading tokens `a` and `b` share."""
  n = 0
  for x, y in zip(a, b):
    if x != y:
      break
    n += 1
  return n


class Scheduler:
  """Queue, rows, policy and prefix index of an engine with `slots` rows of `length`
  positions, in groups of `group_rows` (a runner's data groups, whose first rows it steps
  alone when the others are free); prompts pad to the least of `buckets` that holds them.
  `prefix_reuse` false: every prompt is computed from position 0 (the index is kept all the
  same). `step_tokens` (0: no limit): the budget of chunked prefill (module docstring)."""

  def __init__(self, slots: int, length: int, *, buckets: tuple[int, ...], max_queue: int,
               policy: str, prefix_reuse: bool, group_rows: int | None = None,
               step_tokens: int = 0):
    if policy not in POLICIES:
      raise ValueError(f"policy={policy!r}: expected one of {', '.join(POLICIES)}")
    self.slots, self.length, self.buckets = slots, length, tuple(buckets)
    self.max_queue, self.policy, self.prefix_reuse = max_queue, policy, prefix_reuse
    self.group_rows = group_rows or slots
    self.step_tokens = step_tokens
    # The request of each row (decoding, or filling: its prompt part computed).
    self.running: list[Stream | None] = [None] * slots
    self.filled: dict[int, int] = {}  # filling row -> its prompt's tokens computed so far
    self.waiting: collections.deque[Stream] = collections.deque()
    self.cached: list[list[int]] = [[] for _ in range(slots)]
    self.closing = False
    self.lock = threading.Condition()  # the queue is shared with the callers' threads
    self._ids = itertools.count()

  # ---- the callers' side (any thread) ----

  def submit(self, prompt: list[int], params: Params, *,
             listener: Callable[[Output], None] | None = None, matcher=None) -> Stream:
    """Queues a checked request; RequestError (429) when the queue is full, (503) once
    closing."""
    with self.lock:
      if self.closing:
        raise RequestError("the server is shutting down", status=503)
      if len(self.waiting) >= self.max_queue:
        raise RequestError(f"the queue is full ({self.max_queue} requests waiting); retry "
                           f"later", status=429)
      stream = Stream(next(self._ids), prompt, params, listener, matcher)
      self.waiting.append(stream)
      self.lock.notify()
    return stream

  def close(self) -> None:
    """Refuses new requests from now on."""
    with self.lock:
      self.closing = True
      self.lock.notify()

  def count_running(self) -> int:
    return sum(s is not None for s in self.running)

  def decoding(self) -> list[Stream | None]:
    """`running` without the rows still filling: what a decode step computes."""
    return [None if b in self.filled else s for b, s in enumerate(self.running)]

  # ---- the engine's side (its own thread) ----

  def cancelled(self) -> list[Stream]:
    """The requests cancelled since the last call, to finish: running ones (their rows free
    when they are released) and waiting ones (taken out of the queue)."""
    out = [s for s in self.running if s is not None and s.cancelled]
    with self.lock:
      out += [s for s in self.waiting if s.cancelled]
      self.waiting = collections.deque(s for s in self.waiting if not s.cancelled)
    return out

  def admit(self) -> tuple[list[Placement], list[Stream]]:
    """This step's prefill chunks: the filling rows' next ones, then waiting requests into
    free rows in arrival order (under `static` only once every row is free, whole prompts),
    while the budget lasts (module docstring); carried out in order. And the waiting
    requests found cancelled on the way, to finish. Placed requests own their rows from now
    on."""
    free = [b for b, s in enumerate(self.running) if s is None]
    placements, dropped = [], []
    static = self.policy == "static"
    if static and len(free) < self.slots:
      return placements, dropped
    left = None if static or not self.step_tokens else (
        self.step_tokens - sum(s is not None for s in self.decoding()))
    for b, done in list(self.filled.items()):
      placement = self._chunk(self.running[b], b, done, b, left, not placements, first=False)
      if placement is None:
        return placements, dropped
      left = self._took(placement, left)
      placements.append(placement)
    while free:
      with self.lock:
        if not self.waiting:
          break
        stream = self.waiting[0]
        if stream.cancelled:
          dropped.append(self.waiting.popleft())
          continue
        placement = self.place(stream, free, left, not placements)
        if placement is None:  # the budget is spent: it waits for the next step
          break
        self.waiting.popleft()
      free.remove(placement.row)
      self.running[placement.row] = stream
      left = self._took(placement, left)
      placements.append(placement)
    return placements, dropped

  def _took(self, placement: Placement, left: int | None) -> int | None:
    """Records a placed chunk (the row's cached tokens, whether it still fills); the budget
    left after it."""
    b, end = placement.row, placement.end
    self.cached[b] = list(placement.stream.prompt[:end])
    if placement.last:
      self.filled.pop(b, None)
    else:
      self.filled[b] = end
    return None if left is None else left - placement.bucket

  def _chunk(self, stream: Stream, row: int, start: int, source: int, left: int | None,
             alone: bool, *, first: bool = True) -> Placement | None:
    """The next chunk of `stream`'s prompt into `row` from its position `start` (below it
    from row `source`), within `left` tokens of budget (None: no limit; `alone`: the step's
    first chunk, which always runs); None when it does not fit."""
    P = len(stream.prompt)
    bucket, end = self.bucket(P - start), P
    if left is not None and bucket > left:
      fit = [t for t in self.buckets if t <= left]
      if stream.params.scores_prompt or not (fit or alone):
        if not alone:  # whole prompts only (it needs every token's logits in one call)
          return None
      elif fit:
        bucket = fit[-1]
        end = start + bucket
      else:
        bucket = self.buckets[0]
        end = min(P, start + bucket)
    if end == P and start + bucket > self.length:  # the padded chunk must fit in the row
      start = self.length - bucket
      bucket = self.bucket(P - start)
    return Placement(stream, row, start, bucket, source, end, first)

  def place(self, stream: Stream, free: list[int], left: int | None = None,
            alone: bool = True) -> Placement | None:
    """Where `stream` goes: it starts from the longest prefix a row's cache holds
    (`prefix_reuse`; at least its last token is computed), into the free row that widens the
    runner's steps least; of those the prefix's own row, else the one holding the shortest
    prefix (the least lost). A runner steps the first 1, 2, 4, ... rows of each group: a
    row's level is that of its place in its group (0 for row 0, 1 for row 1, 2 for rows 2-3,
    3 for rows 4-7, ...), and the steps' width is the highest level of a running row. Its
    first chunk (`_chunk`: `left`, `alone`); None when that does not fit the budget."""
    prompt, start, source = stream.prompt, 0, None
    if self.prefix_reuse and not stream.params.scores_prompt:  # it needs every token's logits
      for b, cached in enumerate(self.cached):
        n = common_prefix(cached, prompt[:-1])
        if n > start:
          start, source = n, b
    level = lambda b: (b % self.group_rows).bit_length()
    busy = max((level(b) for b, s in enumerate(self.running) if s is not None), default=0)
    row = min(free, key=lambda b: (max(level(b), busy), b != source, len(self.cached[b])))
    return self._chunk(stream, row, start, row if source is None else source, left, alone)

  def bucket(self, tokens: int) -> int:
    """The least prompt bucket that holds `tokens`."""
    return next(t for t in self.buckets if t >= tokens)

  def cache(self, row: int, tokens: list[int]) -> None:
    """Row `row`'s cache now holds `tokens` too, after those it held."""
    self.cached[row].extend(tokens)

  def release(self, stream: Stream) -> int | None:
    """Frees the row of `stream` (a request that ended); the row, or None if it had none."""
    for b, s in enumerate(self.running):
      if s is stream:
        self.running[b] = None
        self.filled.pop(b, None)
        return b
    return None

  def reset(self) -> None:
    """Forgets every request and cached prefix (the caches were zeroed)."""
    with self.lock:
      self.waiting.clear()
    self.running = [None] * self.slots
    self.filled = {}
    self.cached = [[] for _ in range(self.slots)]
