"""Continuous batching: a fixed number of decode rows (slots), refilled between decode steps.

    engine = serve.build(config, mesh, tokenizer=tokenizer)   # compiles every program once
    engine.start()                                             # the engine thread
    stream = engine.submit(prompt_ids, Params(max_tokens=32))
    for out in stream:                                         # Output(token_ids, text, ...)
      print(out.text, end="")
    engine.stop()

Serving is three parts that this module wires together: the `scheduler` (plain Python: the
queue, the policy, the rows' owners and the prefix index) decides what goes where, the
`runner` (the device state and every compiled program, on any mesh) carries it out, and the
`output` processor turns tokens into Outputs (text, stop strings, metrics). One engine thread
owns the device state; one step of it:

    for request in scheduler.cancelled():            # waiting or running
      output.finish(request, "cancelled")            # -> its row frees (release)
    deliver(runner.step(scheduler.decoding()))       # queue step t, read step t-1's tokens
    runner.choose(scheduler.decoding())              # step t's choice, if it waited (masks)
    placements, cancelled = scheduler.admit()        # prompt chunks, within serve.step_tokens
    for p in placements:
      deliver(runner.prefill(p))                     # a last chunk's first token: next step

    deliver(events):
      for row, owner, token, logprobs in events:
        if owner is scheduler.running[row]:          # else it ended with a step in flight
          scheduler.cache(row, owner's previous token)   # the prefix index
          output.accept(owner, token, logprobs)      # may end it -> release(owner)

    release(request):                                # output.finish's `on_finish`
      row = scheduler.release(request); runner.release(row)

A short request leaves as soon as it is done and a new one takes its row at the next step
(`policy: static` instead waits until every row is free, then admits a batch in arrival
order: the baseline continuous batching is measured against). A step that raises ends every
request with 'error', zeroes the caches and forgets the prefix index; serving goes on.
"""

import functools
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from jaxpar import axes, hardware
from jaxpar.config import Config
from jaxpar.distributed import say
from jaxpar.errors import UserError
from jaxpar.serve.metrics import Metrics
from jaxpar.serve.output import OutputProcessor
from jaxpar.serve.request import Output, Params, RequestError, Stream, check
from jaxpar.serve.scheduler import Scheduler

if TYPE_CHECKING:  # the runner needs JAX; `build` imports it
  from jaxpar.serve.runner import Event, RunnerLike


class Engine:
  """Continuous batching over the rows of `runner`. Build with `build`."""

  def __init__(self, runner: "RunnerLike", *, eos_ids: tuple[int, ...],
               detokenize: Callable[[list[int]], str] | None, max_queue: int,
               policy: str, metrics: Metrics, prefix_reuse: bool = True, tokenizer=None,
               step_tokens: int = 0):
    self.runner, self.generator = runner, runner.generator
    self.tokenizer = tokenizer  # structured output's grammars are built over it
    self.slots, self.length = runner.slots, runner.length
    self.vocab_size = self.generator.config.model.vocab_size
    self.detokenize, self.metrics = detokenize, metrics
    self.scheduler = Scheduler(self.slots, self.length, buckets=runner.buckets,
                               max_queue=max_queue, policy=policy,
                               prefix_reuse=prefix_reuse, group_rows=runner.group_rows,
                               step_tokens=step_tokens)
    self.output = OutputProcessor(eos_ids=eos_ids, detokenize=detokenize, metrics=metrics,
                                  on_finish=self._release)
    self._thread: threading.Thread | None = None
    self._stopping = False
    metrics.bind(queue=lambda: len(self.scheduler.waiting), running=self.running)

  policy = property(lambda self: self.scheduler.policy)
  prefix_reuse = property(lambda self: self.scheduler.prefix_reuse)

  @property
  def eos_ids(self) -> set[int]:
    return self.output.eos_ids

  @eos_ids.setter
  def eos_ids(self, ids) -> None:
    self.output.eos_ids = set(ids)

  @property
  def max_queue(self) -> int:
    return self.scheduler.max_queue

  @max_queue.setter
  def max_queue(self, n: int) -> None:
    self.scheduler.max_queue = n

  # ---- the caller's side (any thread) ----

  def running(self) -> int:
    return self.scheduler.count_running()

  def check(self, prompt: list[int], params: Params) -> None:
    """RequestError for a request this engine cannot run (before it is queued)."""
    check(prompt, params, vocab_size=self.vocab_size, length=self.length,
          can_detokenize=self.detokenize is not None)

  def grammar(self, kind: str, value, param: str) -> str:
    """The grammar of an output format (`grammar.requested`'s), for `Params.grammar`;
    RequestError naming `param` when it does not compile."""
    if self.tokenizer is None:
      raise RequestError("structured output needs the checkpoint's tokenizer.json",
                         param=param)
    try:
      grammars = self._grammars
    except ValueError as e:  # llguidance reads byte-level and byte-fallback tokenizers
      raise RequestError(f"structured output cannot use this checkpoint's tokenizer.json "
                         f"({e})", param=param) from None
    return grammars.compile(kind, value, param)

  @functools.cached_property
  def _grammars(self):  # built on first use (a large vocabulary takes about a second)
    from jaxpar.serve.grammar import Grammars
    return Grammars(self.tokenizer, self.vocab_size, sorted(self.eos_ids))

  def submit(self, prompt: list[int], params: Params = Params(), *,
             listener: Callable[[Output], None] | None = None) -> Stream:
    """Queues a request (token ids); RequestError when it is invalid or the queue is full.
    `listener` (called on the engine thread) receives the Outputs instead of the Stream's
    own queue."""
    prompt = [int(t) for t in prompt]
    self.check(prompt, params)
    matcher = self._grammars.matcher(params.grammar) if params.grammar is not None else None
    return self.scheduler.submit(prompt, params, listener=listener, matcher=matcher)

  def generate(self, prompts: list[list[int]], params: Params = Params()) -> list[Stream]:
    """Runs `prompts` to completion (the engine must be started)."""
    return [s.result() for s in [self.submit(p, params) for p in prompts]]

  def start(self) -> "Engine":
    self._thread = threading.Thread(target=self._loop, name="jaxpar-serve", daemon=True)
    self._thread.start()
    return self

  def stop(self, *, timeout: float = 0.0) -> None:
    """Stops accepting requests, lets the running and queued ones finish for up to `timeout`
    seconds, cancels the rest, and ends the engine thread."""
    sched = self.scheduler
    sched.close()
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline and (sched.waiting or self.running()):
      time.sleep(0.01)
    with sched.lock:
      for s in [*sched.waiting, *filter(None, sched.running)]:
        s.cancel()
      self._stopping = True
      sched.lock.notify()
    if self._thread is not None:
      self._thread.join(timeout=60)

  # ---- the engine thread ----

  def _has_work(self) -> bool:
    return bool(self.scheduler.waiting) or bool(self.running()) or self.runner.busy()

  def _loop(self) -> None:
    while True:
      with self.scheduler.lock:
        while not self._stopping and not self._has_work():
          self.scheduler.lock.wait()
      try:
        self.step()
      except Exception as e:  # a failed step fails its requests; the engine keeps serving
        say(f"serve: a step failed ({type(e).__name__}: {e}); its requests end with 'error'")
        self._fail()
      if self._stopping and not self._has_work():
        return

  def _fail(self) -> None:
    sched = self.scheduler
    for s in [*sched.waiting, *filter(None, sched.running)]:
      self.output.finish(s, "error")
    sched.reset()  # the caches are zeroed: no prefix is cached any more
    self.runner.reset()

  def step(self) -> None:
    """One iteration (see the module docstring): drop cancelled requests, one decode step,
    admit waiting requests."""
    sched = self.scheduler
    for stream in sched.cancelled():
      self.output.finish(stream, "cancelled")
    self._deliver(self.runner.step(sched.decoding()))  # while step t's forward runs
    self.runner.choose(sched.decoding())  # masks need the tokens just delivered
    placements, cancelled = sched.admit()
    for stream in cancelled:
      self.output.finish(stream, "cancelled")
    for placement in placements:
      events = self.runner.prefill(placement)
      if placement.first:
        self.metrics.prompt_tokens(len(placement.stream.prompt), placement.start)
      self._deliver(events)

  def _deliver(self, events: "list[Event]") -> None:
    for row, owner, token, logprobs in events:
      if owner is self.scheduler.running[row]:  # else it ended while this step was in flight
        # The step that made `token` wrote the previous token's keys and values.
        self.scheduler.cache(row, owner.token_ids[-1:])
        self.output.accept(owner, token, logprobs)

  def _release(self, stream: Stream) -> None:
    row = self.scheduler.release(stream)
    if row is not None:
      self.runner.release(row)


def build(config: Config, mesh, *, tokenizer=None, progress: bool = True) -> Engine:
  """An Engine for `config` on `mesh` with every program compiled (said with a progress line;
  the persistent compilation cache makes a restart fast; serve.precompile=false: each on
  first use): a pipelined runner when the mesh has stages, else the plain one."""
  from jaxpar.rules import Rules
  from jaxpar.runtime import generate as gen_lib
  from jaxpar.runtime.decoder import Decoder
  from jaxpar.serve.runner import Runner
  from jaxpar.serve.shapes import bias_entries, buckets

  s = config.serve
  if s.max_len > config.model.max_seq_len:
    raise UserError(f"serve.max_len={s.max_len} exceeds model.max_seq_len="
                    f"{config.model.max_seq_len}; lower serve.max_len (0: the default)")
  data = math.prod(mesh.shape[a] for a in Rules(config.rules).mesh_axes(axes.BATCH))
  if s.max_slots % data:
    raise UserError(f"serve.max_slots={s.max_slots} does not split over the {data} devices "
                    f"of the batch axes; use a multiple of {data}")
  generator = gen_lib.build(config, mesh)
  spec = gen_lib.speculation(config, generator, mesh)
  length = slot_length(config, generator, spec)
  prompt_buckets = buckets(length, s.min_bucket)
  k, bias = spec.k if spec.on else 0, bias_entries(generator.eos_ids)
  decoder = Decoder(generator, s.max_slots, length + k, bias=bias)
  draft = Decoder(spec.draft, s.max_slots, length + k, bias=bias) if spec.uses_draft else None
  metrics = Metrics()
  runner = Runner(decoder, buckets=prompt_buckets,
                  spans=decode_spans(config, generator, length + k), progress=progress,
                  precompile=s.precompile, speculation=spec, draft=draft, metrics=metrics)
  detokenize = None
  if tokenizer is not None:
    detokenize = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
  return Engine(runner, eos_ids=generator.eos_ids, detokenize=detokenize,
                max_queue=s.max_queue, policy=s.policy, metrics=metrics,
                prefix_reuse=s.prefix_reuse, tokenizer=tokenizer, step_tokens=s.step_tokens)


def decode_spans(config: Config, generator, length: int) -> tuple[int, ...]:
  """The decode steps' attention spans of `serve.max_slots` rows of `length` positions
  (`shapes.spans`, its slices measured in bytes of one layer's keys on a device)."""
  from jaxpar.serve.shapes import spans
  s = config.serve
  position = generator.cache_bytes_per_device(s.max_slots, length) // (
      2 * config.model.n_layers * length)
  return spans(length, s.min_bucket, position)


DEFAULT_MAX_LEN = 8192  # positions per slot unless serve.max_len asks for more
CACHE_SHARE = 0.9  # of a device's free memory the KV cache may take (the rest: activations)


def free_bytes(mesh) -> int:
  """Bytes free on one device of `mesh` (its accelerator's memory; on CPU, the host's
  available memory shared by its emulated devices)."""
  device = mesh.devices.flat[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "bytes_limit" in stats:
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
  local = sum(d.process_index == device.process_index for d in mesh.devices.flat)
  return hardware.host_available_bytes() // local


def slot_length(config: Config, generator, spec=None) -> int:
  """Positions per slot: serve.max_len, refused when the slots' KV cache (and a speculating
  draft's) does not fit in the devices' free memory (weights loaded); by default the least
  of model.max_seq_len, DEFAULT_MAX_LEN and what fits."""
  s, m = config.serve, config.model
  per_position = generator.cache_bytes_per_device(s.max_slots, 1)
  if spec is not None and spec.uses_draft:  # (self: the model's own slot decoder again)
    per_position += spec.draft.cache_bytes_per_device(s.max_slots, 1)
  fits = int(CACHE_SHARE * free_bytes(generator.mesh)) // per_position
  if s.max_len > fits:
    gib = lambda n: f"{n / 2**30:.1f} GiB"
    raise UserError(f"serve.max_len={s.max_len}: {s.max_slots} slots of {s.max_len} positions "
                    f"need {gib(per_position * s.max_len)} of KV cache per device, and "
                    f"{gib(CACHE_SHARE * free_bytes(generator.mesh))} is free there after the "
                    f"weights; lower serve.max_len (at most {fits}) or serve.max_slots")
  length = s.max_len or min(m.max_seq_len, DEFAULT_MAX_LEN, fits)
  if length < 2:
    raise UserError(f"serve.max_slots={s.max_slots}: after the weights no device has room for "
                    f"a KV cache of 2 positions per slot; lower serve.max_slots")
  return length
