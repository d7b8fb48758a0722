"""Continuous batching: a fixed number of decode slots, refilled between decode steps.

    engine = serve.build(config, mesh, tokenizer=tokenizer)   # compiles every program once
    engine.start()                                             # the scheduler thread
    stream = engine.submit(prompt_ids, Params(max_tokens=32))
    for out in stream:                                         # Output(token_ids, text, ...)
      print(out.text, end="")
    engine.stop()

One scheduler thread owns the device state. Each iteration it queues one decode step over
every slot, reads the previous step's tokens (finished requests leave), frees the slots of
cancelled requests, and prefills waiting requests into free slots (one compiled program per
prompt length bucket, so no request compiles anything), each from the longest prefix of its
prompt that a slot's cache already holds (`_place`). A short request leaves as soon as it
is done and a new one takes its slot at the next step
(`policy: static` instead waits until every slot is free, then admits a batch in arrival
order: the baseline continuous batching is measured against).
"""

import collections
import dataclasses
import itertools
import math
import queue
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxpar import axes
from jaxpar.config import Config
from jaxpar.distributed import say
from jaxpar.errors import UserError
from jaxpar.rules import Rules
from jaxpar.runtime import generate as gen_lib
from jaxpar.runtime.sampling import Sampling
from jaxpar.serve.metrics import Metrics
from jaxpar.serve.pipelined import PipelinedPrograms, Rows
from jaxpar.runtime.decoder import Decoder


class RequestError(ValueError):
  """A request the engine refuses: `param` names the field; `status` is the HTTP status the
  server answers with (400 invalid, 429 queue full, 503 shutting down)."""

  def __init__(self, message: str, *, param: str | None = None, status: int = 400):
    super().__init__(message)
    self.param, self.status = param, status


@dataclasses.dataclass(frozen=True)
class Params:
  """How one request is decoded: up to `max_tokens` new tokens (EOS and stop strings end it
  sooner), greedy when `temperature` is 0; `seed` makes sampling repeatable."""
  max_tokens: int = 16
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int | None = None
  stop: tuple[str, ...] = ()


@dataclasses.dataclass
class Output:
  """What one request produced since its last Output; `finish_reason` is set on the last:
  'stop' (EOS or a stop string), 'length' (max_tokens), 'cancelled' or 'error'."""
  token_ids: list[int]
  text: str
  finish_reason: str | None = None


class Stream:
  """A submitted request: iterate it for Outputs as they come, or call `result()`."""

  def __init__(self, rid: int, prompt: list[int], params: Params,
               listener: Callable[[Output], None] | None):
    self.id, self.prompt, self.params = rid, prompt, params
    self.token_ids: list[int] = []
    self.text = ""
    self.finish_reason: str | None = None
    self.submitted = time.perf_counter()
    self.first_token_at: float | None = None
    self.finished_at: float | None = None
    self.cancelled = False
    self._sent_text = 0
    self._queue: queue.Queue | None = None if listener else queue.Queue()
    self._listener = listener or self._queue.put

  def __iter__(self):
    while True:
      out = self._queue.get()
      yield out
      if out.finish_reason is not None:
        return

  def result(self) -> "Stream":
    """Waits until the request is done (only without a listener)."""
    for _ in self:
      pass
    return self

  def cancel(self) -> None:
    """Frees the request's slot at the next step (its last Output says 'cancelled')."""
    self.cancelled = True


class Engine:
  """Continuous batching over `slots` decode rows. Build with `build`."""

  def __init__(self, programs: "Decoder | PipelinedPrograms", compiled: dict, *,
               eos_ids: tuple[int, ...],
               detokenize: Callable[[list[int]], str] | None, max_queue: int,
               policy: str, metrics: Metrics, prefix_reuse: bool = True):
    self.programs, self._compiled = programs, compiled
    self.generator = programs.generator
    self.slots, self.length = programs.slots, programs.length
    self.eos_ids, self.detokenize, self.max_queue = set(eos_ids), detokenize, max_queue
    self.policy, self.metrics = policy, metrics
    self.vocab_size = self.generator.forward.config.model.vocab_size
    B = self.slots
    # The host's copy of every row. Pipelined rounds send it each round; a plain decode step
    # keeps its own on the devices (`programs.Slots`) and uses positions and temperatures.
    self._tokens, self._positions = np.zeros(B, np.int32), np.zeros(B, np.int32)
    self._temperature, self._top_k = np.zeros(B, np.float32), np.zeros(B, np.int32)
    self._top_p, self._seeds = np.ones(B, np.float32), np.zeros(B, np.uint32)
    self._counts = np.zeros(B, np.int32)
    # The tokens whose keys and values each row's cache holds at slots 0, 1, ... (a finished
    # request's stay until the row is prefilled again): prefixes a new prompt can start from.
    self._cached: list[list[int]] = [[] for _ in range(B)]
    self.prefix_reuse = prefix_reuse and not isinstance(programs, PipelinedPrograms)
    self._running: list[Stream | None] = [None] * B
    self._waiting: collections.deque[Stream] = collections.deque()
    self._ids = itertools.count()
    self._lock = threading.Condition()
    self._thread: threading.Thread | None = None
    self._closing = False
    self._state = programs.empty_state()
    self._pipelined = isinstance(programs, PipelinedPrograms)
    self._inject = np.zeros(B, bool)
    self._prev_rows, self._prev_owner = None, [None] * B
    self._pending: list = []  # (tokens, owners) queued on the devices, not yet read
    metrics.bind(queue=lambda: len(self._waiting), running=self.running)

  # ---- the caller's side (any thread) ----

  def running(self) -> int:
    return sum(s is not None for s in self._running)

  def check(self, prompt: list[int], params: Params) -> None:
    """RequestError for a request this engine cannot run (before it is queued)."""
    if not prompt:
      raise RequestError("the prompt is empty: give at least one token", param="prompt")
    bad = [t for t in prompt if not 0 <= t < self.vocab_size]
    if bad:
      raise RequestError(f"token id {bad[0]} is outside the vocabulary (0 to "
                         f"{self.vocab_size - 1})", param="prompt")
    if params.max_tokens < 1:
      raise RequestError(f"max_tokens={params.max_tokens}: must be at least 1",
                         param="max_tokens")
    if len(prompt) + params.max_tokens > self.length:
      raise RequestError(f"this model's maximum context length is {self.length} tokens; the "
                         f"request has {len(prompt)} prompt tokens and max_tokens="
                         f"{params.max_tokens}: shorten the prompt or lower max_tokens",
                         param="max_tokens" if len(prompt) < self.length else "prompt")
    if params.temperature < 0 or params.top_k < 0 or not 0 < params.top_p <= 1:
      raise RequestError(f"temperature={params.temperature}, top_k={params.top_k}, top_p="
                         f"{params.top_p}: need temperature >= 0, top_k >= 0 and "
                         f"0 < top_p <= 1", param="temperature")
    if params.stop and self.detokenize is None:
      raise RequestError("stop strings need a tokenizer (tokenizer.json in the checkpoint)",
                         param="stop")

  def submit(self, prompt: list[int], params: Params = Params(), *,
             listener: Callable[[Output], None] | None = None) -> Stream:
    """Queues a request (token ids); RequestError when it is invalid or the queue is full.
    `listener` (called on the scheduler thread) receives the Outputs instead of the Stream's
    own queue."""
    prompt = [int(t) for t in prompt]
    self.check(prompt, params)
    with self._lock:
      if self._closing:
        raise RequestError("the server is shutting down", status=503)
      if len(self._waiting) >= self.max_queue:
        raise RequestError(f"the queue is full ({self.max_queue} requests waiting); retry "
                           f"later", status=429)
      stream = Stream(next(self._ids), prompt, params, listener)
      self._waiting.append(stream)
      self._lock.notify()
    return stream

  def generate(self, prompts: list[list[int]], params: Params = Params()) -> list[Stream]:
    """Runs `prompts` to completion (the engine must be started)."""
    return [s.result() for s in [self.submit(p, params) for p in prompts]]

  def start(self) -> "Engine":
    self._thread = threading.Thread(target=self._loop, name="jaxpar-serve", daemon=True)
    self._thread.start()
    return self

  def stop(self, *, timeout: float = 0.0) -> None:
    """Stops accepting requests, lets the running and queued ones finish for up to `timeout`
    seconds, cancels the rest, and ends the scheduler thread."""
    with self._lock:
      self._closing = True
      self._lock.notify()
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline and (self._waiting or self.running()):
      time.sleep(0.01)
    with self._lock:
      for s in [*self._waiting, *filter(None, self._running)]:
        s.cancel()
      self._stopping = True
      self._lock.notify()
    if self._thread is not None:
      self._thread.join(timeout=60)

  # ---- the scheduler thread ----

  _stopping = False

  def _loop(self) -> None:
    while True:
      with self._lock:
        while (not self._stopping and not self._waiting and not self.running()
               and not self._pending):
          self._lock.wait()
      try:
        self.step()
      except Exception as e:  # a failed step fails its requests; the engine keeps serving
        say(f"serve: a step failed ({type(e).__name__}: {e}); its requests end with 'error'")
        for s in [*self._waiting, *filter(None, self._running)]:
          self._finish(s, "error")
        self._running = [None] * self.slots
        self._waiting.clear()
        self._state = self.programs.empty_state()
        self._cached = [[] for _ in range(self.slots)]  # the caches are zeroed
        self._prev_rows, self._prev_owner = None, [None] * self.slots
        self._pending = []
      if (self._stopping and not self._waiting and not self.running()
          and not self._pending):
        return

  def step(self) -> None:
    """One iteration: queue a decode step, read the previous one's tokens, drop cancelled
    requests, admit waiting ones.

    The decode step's inputs live on the devices (`programs.Slots`), so step t is queued
    before the host reads step t-1's tokens, and the devices decode while the host streams.
    A request that ends on step t-1's token has step t in flight: its token is dropped (the
    row's owner has changed), and a new request prefilled into the row runs after it."""
    if self._pipelined:
      self._cancel()
      self._admit()
      rows = [b for b, s in enumerate(self._running) if s is not None]
      if rows:
        self._round(rows, all(self._temperature[b] == 0 for b in rows))
      return
    rows = [b for b, s in enumerate(self._running) if s is not None]
    step = None
    if rows:
      greedy = all(self._temperature[b] == 0 for b in rows)
      last = max(self._positions[b] for b in rows)
      span = next(t for t in self.programs.spans if t > last)
      next_B, self._state = self._compiled["decode", greedy, span](self.generator.params,
                                                                   self._state)
      self._positions[rows] += 1  # the host's copy of the rows' positions
      step = (next_B, {b: self._running[b] for b in rows})
    pending, self._pending = self._pending, []
    for item in pending:
      self._read(*item)
    self._cancel()
    self._admit()
    if step is not None:
      self._pending.append(step)

  def _read(self, tokens, owners: dict) -> None:
    """Accepts the tokens of a queued program ([B], or a prefill's one) for the rows whose
    request still owns them (`owners`: row -> the request when the program was queued)."""
    tokens = np.asarray(tokens).reshape(-1)
    for b, owner in owners.items():
      if owner is self._running[b]:
        self._accept(b, int(tokens[b if tokens.size > 1 else 0]))

  def _cancel(self) -> None:
    for s in self._running:
      if s is not None and s.cancelled:
        self._finish(s, "cancelled")

  def _round(self, rows: list[int], greedy: bool) -> None:
    """One pipelined round (see `pipelined`): every slot's next step enters the pipeline;
    the tokens that leave it are this round's for group 0, the previous round's for the
    others."""
    G, Bg, S = self.programs.G, self.programs.Bg, self.programs.S
    cur = Rows(self._positions.copy(), np.array([s is not None for s in self._running]),
               self._temperature.copy(), self._top_k.copy(), self._top_p.copy(),
               self._seeds.copy(), self._counts.copy())
    prev = self._prev_rows or jax.tree.map(np.zeros_like, cur)
    both = jax.tree.map(lambda a, b: np.stack([a, b]).reshape(2, G, Bg), prev, cur)
    out, self._state = self._compiled["round", greedy](
        self.generator.params, self._state, self._inject.reshape(G, Bg),
        self._tokens.reshape(G, Bg), both)
    out = np.asarray(out).reshape(-1)
    owners = [(self._running[b] if b // Bg + S - 1 < G else self._prev_owner[b],
               (cur if b // Bg + S - 1 < G else prev).write[b]) for b in range(self.slots)]
    self._inject[:] = False
    for b in rows:
      self._positions[b] += 1
      self._counts[b] += 1
    self._prev_rows, self._prev_owner = cur, list(self._running)
    for b, (owner, valid) in enumerate(owners):
      if valid and owner is not None and owner is self._running[b]:
        self._accept(b, int(out[b]))

  def _admit(self) -> None:
    free = [b for b, s in enumerate(self._running) if s is None]
    if self.policy == "static" and len(free) < self.slots:
      return
    while free:
      with self._lock:
        if not self._waiting:
          return
        stream = self._waiting.popleft()
      if stream.cancelled:
        self._finish(stream, "cancelled")
        continue
      self._prefill(stream, free)

  def _place(self, prompt: list[int], free: list[int]) -> tuple[int, int, int, int]:
    """(start, bucket, source row, free row) for a prompt: it starts from the longest prefix
    a row's cache holds (`prefix_reuse`; at least its last token is computed) and goes into
    that row when it is free, else into the free row holding the shortest prefix (the least
    lost)."""
    P, start = len(prompt), 0
    src = slot = min(free, key=lambda b: len(self._cached[b]))
    if self.prefix_reuse:
      want = np.asarray(prompt[:-1])
      for b, cached in enumerate(self._cached):
        n = min(len(cached), len(want))
        same = np.asarray(cached[:n]) == want[:n]
        n = n if same.all() else int(np.argmin(same))
        if n > start:
          start, src = n, b
    bucket = self._bucket(P - start)
    if start + bucket > self.length:  # the padded chunk must fit in the row
      start = self.length - bucket
      bucket = self._bucket(P - start)
    return start, bucket, src, (src if src in free else slot)

  def _bucket(self, tokens: int) -> int:
    """The least prompt bucket that holds `tokens`."""
    return next(t for t in self.programs.buckets if t >= tokens)

  def _prefill(self, stream: Stream, free: list[int]) -> None:
    P, p = len(stream.prompt), stream.params
    seed = np.uint32(stream.id if p.seed is None else p.seed)
    sampling = Sampling(np.float32(p.temperature), np.int32(p.top_k), np.float32(p.top_p))
    if self._pipelined:  # the whole prompt, into the first free row
      b, start = free[0], 0
      bucket, where = self._bucket(P), (P, b)
    else:
      start, bucket, src, b = self._place(stream.prompt, free)
    free.remove(b)
    tokens = np.zeros((1, bucket), np.int32)
    tokens[0, :P - start] = stream.prompt[start:]
    if self._pipelined:
      first, self._state = self._compiled["prefill", bucket](
          self.generator.params, self._state, tokens, *map(np.int32, where), sampling, seed)
    else:
      one = lambda v: np.asarray([v])
      first, self._state = self._compiled["prefill", bucket](
          self.generator.params, self._state, tokens, np.int32(start), one(np.int32(P)),
          np.int32(src), np.int32(b), jax.tree.map(one, sampling), one(seed),
          one(np.int32(-1)))
    self.metrics.prompt_tokens(P, start)
    self._cached[b] = list(stream.prompt)
    self._running[b] = stream
    self._positions[b], self._counts[b], self._seeds[b] = P, 1, seed
    self._temperature[b], self._top_k[b], self._top_p[b] = p.temperature, p.top_k, p.top_p
    if self._pipelined:
      self._tokens[b], self._inject[b] = int(first), True
      self._accept(b, int(first))
    else:  # read with the next step's tokens, after that step is queued
      self._pending.append((first, {b: stream}))

  def _accept(self, b: int, token: int) -> None:
    """Token `token` of the request in slot `b`: recorded, streamed, maybe its last."""
    stream = self._running[b]
    now = time.perf_counter()
    if stream.first_token_at is None:
      stream.first_token_at = now
      self.metrics.first_token(now - stream.submitted)
    stream.token_ids.append(token)
    if len(stream.token_ids) > 1:  # the step that made `token` wrote the previous one's entry
      self._cached[b].append(stream.token_ids[-2])
    self.metrics.tokens(1)
    reason = None
    if token in self.eos_ids:
      reason = "stop"
    elif len(stream.token_ids) >= stream.params.max_tokens:
      reason = "length"
    text, hit = self._text(stream, final=reason is not None)
    if hit:
      reason = "stop"
    if reason is None:
      stream._listener(Output([token], text))
      return
    self._finish(stream, reason, token_ids=[token], text=text)

  def _text(self, stream: Stream, *, final: bool) -> tuple[str, bool]:
    """The new text to send, and whether a stop string ended the request. Text that may be
    the start of a stop string, or of a multi-byte character, is held back until known."""
    if self.detokenize is None:
      return "", False
    ids = [t for t in stream.token_ids if t not in self.eos_ids]
    full = self.detokenize(ids)
    hit = False
    for stop in stream.params.stop:
      at = full.find(stop)
      if at >= 0:
        full, hit = full[:at], True
    stream.text = full
    ready = len(full)
    if not (final or hit):
      held = max((len(s) - 1 for s in stream.params.stop), default=0)
      ready = max(stream._sent_text, len(full.rstrip("\ufffd")) - held)
    new = full[stream._sent_text:ready]
    stream._sent_text = ready
    return new, hit

  def _finish(self, stream: Stream, reason: str, *, token_ids=(), text: str = "") -> None:
    stream.finish_reason = reason
    stream.finished_at = time.perf_counter()
    if stream in self._running:
      b = self._running.index(stream)
      self._running[b] = None
      self._positions[b] = self._temperature[b] = self._counts[b] = 0
      self._inject[b] = False
      if self._prev_rows is not None:  # its step in flight must not write into the slot
        self._prev_rows.write[b] = False
    if reason in ("stop", "length") and len(stream.token_ids) > 1:
      per_token = (stream.finished_at - stream.first_token_at) / (len(stream.token_ids) - 1)
      self.metrics.token_time(per_token)
    self.metrics.finished(reason)
    stream._listener(Output(list(token_ids), text, reason))


def buckets(length: int, smallest: int = 16) -> tuple[int, ...]:
  """Prompt length buckets: `smallest` times 1, 1.5, 2, 3, 4, 6, 8, ... (a prompt pads by
  less than a third), then `length` itself."""
  out, t = set(), smallest
  while t < length:
    out.update((t, t * 3 // 2))
    t *= 2
  return tuple(sorted(b for b in out if b < length)) + (length,)


def spans(length: int, smallest: int) -> tuple[int, ...]:
  """The decode step's attention spans: doubling from `smallest` or length / 8 (at most four
  programs), then `length` itself."""
  out, t = [], max(smallest, length // 8)
  while t < length:
    out.append(t)
    t *= 2
  return (*out, length)


def build(config: Config, mesh, *, tokenizer=None, progress: bool = True) -> Engine:
  """An Engine for `config` on `mesh` with every program compiled (said with a progress line;
  the persistent compilation cache makes a restart fast)."""
  s = config.serve
  length = s.max_len or config.model.max_seq_len
  if length > config.model.max_seq_len:
    raise UserError(f"serve.max_len={length} exceeds model.max_seq_len="
                    f"{config.model.max_seq_len}; lower serve.max_len (0: max_seq_len)")
  data = math.prod(mesh.shape[a] for a in Rules(config.rules).mesh_axes(axes.BATCH))
  if s.max_slots % data:
    raise UserError(f"serve.max_slots={s.max_slots} does not split over the {data} devices "
                    f"of the batch axes; use a multiple of {data}")
  generator = gen_lib.build(config, mesh)
  if mesh.shape[axes.STAGE] > 1:
    programs = PipelinedPrograms(generator, s.max_slots, length, buckets(length, s.min_bucket))
  else:
    programs = Decoder(generator, s.max_slots, length)
    programs.buckets, programs.spans = buckets(length, s.min_bucket), spans(length, s.min_bucket)
  compiled = _compile(programs, progress=progress)
  detokenize = None
  if tokenizer is not None:
    detokenize = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
  return Engine(programs, compiled, eos_ids=generator.eos_ids, detokenize=detokenize,
                max_queue=s.max_queue, policy=s.policy, metrics=Metrics(),
                prefix_reuse=s.prefix_reuse)


def _compile(programs, *, progress: bool) -> dict:
  """Lowers and compiles the prefill of every bucket and the greedy and sampled decode step of
  every span (or round)."""
  g, B = programs.generator, programs.slots
  pipelined = isinstance(programs, PipelinedPrograms)
  start = time.perf_counter()
  if progress:
    what = (f"pipelined rounds of {B} slots in {programs.G} groups" if pipelined else
            f"decode steps of {B} slots over {', '.join(map(str, programs.spans))} positions")
    steps = 2 if pipelined else 2 * len(programs.spans)
    say(f"compiling {len(programs.buckets) + steps} programs: prefill for prompts of up to "
        f"{', '.join(map(str, programs.buckets))} tokens, {what} (greedy, sampled)...")
  with jax.set_mesh(g.mesh):
    state = programs.empty_state(abstract=True)
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)
    compiled = {}
    sampling = Sampling(scalar(jnp.float32), scalar(jnp.int32), scalar(jnp.float32))
    for bucket in programs.buckets:
      if pipelined:  # (length, row)
        where = (scalar(jnp.int32),) * 2
        compiled["prefill", bucket] = programs.prefill(bucket).lower(
            g.params, state, jax.ShapeDtypeStruct((1, bucket), jnp.int32), *where, sampling,
            scalar(jnp.uint32)).compile()
        continue
      one = lambda a: jax.ShapeDtypeStruct((1,), a.dtype)
      compiled["prefill", bucket] = programs.prefill(1, bucket, reuse=True).lower(
          g.params, state, jax.ShapeDtypeStruct((1, bucket), jnp.int32), scalar(jnp.int32),
          one(scalar(jnp.int32)), scalar(jnp.int32), scalar(jnp.int32),
          jax.tree.map(one, sampling), one(scalar(jnp.uint32)), one(scalar(jnp.int32))).compile()
    for greedy in (True, False):
      if pipelined:
        grid = lambda dtype, *lead: jax.ShapeDtypeStruct((*lead, programs.G, programs.Bg), dtype)
        dtypes = (jnp.int32, bool, jnp.float32, jnp.int32, jnp.float32, jnp.uint32, jnp.int32)
        rows = Rows(*(grid(d, 2) for d in dtypes))
        compiled["round", greedy] = programs.round(greedy=greedy).lower(
            g.params, state, grid(bool), grid(jnp.int32), rows).compile()
        continue
      for span in programs.spans:
        compiled["decode", greedy, span] = programs.step(greedy=greedy, span=span).lower(
            g.params, state).compile()
  if progress:
    say(f"compiled in {time.perf_counter() - start:.1f} s")
  return compiled
