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
  `source`'s cache (`source` is `row` itself when nothing is reused), the rest is computed,
  padded to `bucket` tokens."""
  stream: Stream
  row: int
  start: int
  bucket: int
  source: int


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
  `prefix_reuse` false: every prompt is computed whole (the index is kept all the same)."""

  def __init__(self, slots: int, length: int, *, buckets: tuple[int, ...], max_queue: int,
               policy: str, prefix_reuse: bool, group_rows: int | None = None):
    if policy not in POLICIES:
      raise ValueError(f"policy={policy!r}: expected one of {', '.join(POLICIES)}")
    self.slots, self.length, self.buckets = slots, length, tuple(buckets)
    self.max_queue, self.policy, self.prefix_reuse = max_queue, policy, prefix_reuse
    self.group_rows = group_rows or slots
    self.running: list[Stream | None] = [None] * slots
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
    """Placements of waiting requests into free rows, in arrival order (under `static` only
    once every row is free), carried out in order; and the waiting requests found cancelled
    on the way, to finish. The placed requests own their rows from now on."""
    free = [b for b, s in enumerate(self.running) if s is None]
    placements, dropped = [], []
    if self.policy == "static" and len(free) < self.slots:
      return placements, dropped
    while free:
      with self.lock:
        if not self.waiting:
          break
        stream = self.waiting.popleft()
      if stream.cancelled:
        dropped.append(stream)
        continue
      placement = self.place(stream, free)
      free.remove(placement.row)
      self.running[placement.row] = stream
      self.cached[placement.row] = list(stream.prompt)
      placements.append(placement)
    return placements, dropped

  def place(self, stream: Stream, free: list[int]) -> Placement:
    """Where `stream` goes: it starts from the longest prefix a row's cache holds
    (`prefix_reuse`; at least its last token is computed), into the free row that widens the
    runner's steps least; of those the prefix's own row, else the one holding the shortest
    prefix (the least lost). A runner steps the first 1, 2, 4, ... rows of each group: a
    row's level is that of its place in its group (0 for row 0, 1 for row 1, 2 for rows 2-3,
    3 for rows 4-7, ...), and the steps' width is the highest level of a running row."""
    prompt, start, source = stream.prompt, 0, None
    if self.prefix_reuse and not stream.params.scores_prompt:  # it needs every token's logits
      for b, cached in enumerate(self.cached):
        n = common_prefix(cached, prompt[:-1])
        if n > start:
          start, source = n, b
    level = lambda b: (b % self.group_rows).bit_length()
    busy = max((level(b) for b, s in enumerate(self.running) if s is not None), default=0)
    row = min(free, key=lambda b: (max(level(b), busy), b != source, len(self.cached[b])))
    bucket = self.bucket(len(prompt) - start)
    if start + bucket > self.length:  # the padded chunk must fit in the row
      start = self.length - bucket
      bucket = self.bucket(len(prompt) - start)
    return Placement(stream, row, start, bucket, row if source is None else source)

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
        return b
    return None

  def reset(self) -> None:
    """Forgets every request and cached prefix (the caches were zeroed)."""
    with self.lock:
      self.waiting.clear()
    self.running = [None] * self.slots
    self.cached = [[] for _ in range(self.slots)]
