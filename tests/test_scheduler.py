"""The serving scheduler's decisions, without JAX: admission order, the two policies, the
prefix index's placements, cancellation, and the queue's refusals. Every expectation is worked
out by hand from the rules in `jaxpar/serve/scheduler.py`."""

import pathlib
import subprocess
import sys

import pytest

from jaxpar.serve.request import Params, RequestError
from jaxpar.serve.scheduler import Placement, Scheduler

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUCKETS = (4, 8, 16, 32)


def scheduler(slots=3, *, length=32, buckets=BUCKETS, max_queue=8, policy="continuous",
              prefix_reuse=True, group_rows=None) -> Scheduler:
  return Scheduler(slots, length, buckets=buckets, max_queue=max_queue, policy=policy,
                   prefix_reuse=prefix_reuse, group_rows=group_rows)


def submit(sched: Scheduler, *prompts: list[int]):
  return [sched.submit(p, Params()) for p in prompts]


def rows(placements: list[Placement]) -> list[tuple[int, int]]:
  """(request id, row) of each placement, in order."""
  return [(p.stream.id, p.row) for p in placements]


def test_the_scheduler_and_requests_import_without_jax():
  code = ("import sys; from jaxpar.serve import engine, output, request, scheduler; "
          "from jaxpar.serve import Params, Stream; "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax')))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       check=True).stdout
  assert out.strip() == "[]"


def test_admission_is_first_come_first_served_into_free_rows():
  sched = scheduler(3, prefix_reuse=False)
  a, b, c, d = submit(sched, [1], [2], [3], [4])
  placements, dropped = sched.admit()
  assert rows(placements) == [(0, 0), (1, 1), (2, 2)] and dropped == []
  assert list(sched.waiting) == [d] and sched.running == [a, b, c]
  assert sched.admit() == ([], [])  # no row is free: d waits
  assert sched.release(b) == 1 and sched.running == [a, None, c]
  assert sched.release(b) is None  # a second release frees nothing
  placements, _ = sched.admit()
  assert rows(placements) == [(3, 1)] and sched.running == [a, d, c]
  assert not sched.waiting


def test_continuous_admits_into_any_free_row_static_waits_for_all():
  for policy, first_admitted in (("continuous", [(2, 0)]), ("static", [])):
    sched = scheduler(2, policy=policy, prefix_reuse=False)
    a, b, c, d = submit(sched, [1], [2], [3], [4])
    assert rows(sched.admit()[0]) == [(0, 0), (1, 1)]
    sched.release(a)
    assert rows(sched.admit()[0]) == first_admitted, policy
    if policy == "static":
      sched.release(b)  # now every row is free: c and d in arrival order
      assert rows(sched.admit()[0]) == [(2, 0), (3, 1)]
      assert sched.running == [c, d]


def test_the_index_holds_each_rows_prompt_and_accepted_tokens():
  sched = scheduler(2)
  a, b = submit(sched, [5, 6, 7], [8])
  sched.admit()
  sched.cache(0, [40])
  sched.cache(0, [41])
  assert sched.cached == [[5, 6, 7, 40, 41], [8]]
  sched.release(a)
  assert sched.cached[0] == [5, 6, 7, 40, 41]  # a finished request's prefix stays


def place(sched: Scheduler, prompt: list[int], free: list[int]) -> tuple[int, int, int, int]:
  p = sched.place(sched.submit(prompt, Params()), free)
  return p.start, p.bucket, p.source, p.row


def test_placement_starts_from_the_longest_cached_prefix():
  sched = scheduler(3)
  sched.cached = [[1, 2, 3, 4, 5], [1, 2, 9], []]
  # prompt[:-1] = [1, 2, 3, 4, 7]: row 0 holds 4 of it, row 1 holds 2. Two tokens left to
  # compute fit the bucket of 4; row 0 is free, so the prompt goes there.
  assert place(sched, [1, 2, 3, 4, 7, 8], [0, 1, 2]) == (4, 4, 0, 0)
  # Row 0 busy: copy from it into the free row of the lowest level (row 1, level 1; row 2,
  # though empty, is level 2 and would widen the steps to 4 rows).
  assert place(sched, [1, 2, 3, 4, 7, 8], [1, 2]) == (4, 4, 0, 1)
  # A prompt that row 0 holds whole: its last token is still computed.
  assert place(sched, [1, 2, 3], [0, 1, 2]) == (2, 4, 0, 0)
  # Nothing in common: into row 0 (level 0), its prefix lost; 9 tokens take bucket 16.
  assert place(sched, [7] * 9, [0, 1]) == (0, 16, 0, 0)
  # The prefix in row 1 (level 1), row 0 free: copied into row 0, so the steps stay 1 row.
  sched.cached = [[], [1, 2, 3, 4, 5], []]
  assert place(sched, [1, 2, 3, 4, 7, 8], [0, 1, 2]) == (4, 4, 1, 0)


def test_placement_keeps_the_padded_chunk_inside_the_row():
  sched = scheduler(2, buckets=(8, 16, 32))
  cached = list(range(100, 126))  # 26 tokens
  sched.cached = [cached, []]
  # 29-token prompt, 26 cached: 3 left, bucket 8, but 26 + 8 > 32, so start at 32 - 8 = 24
  # (5 tokens, still bucket 8).
  assert place(sched, cached + [1, 2, 3], [0, 1]) == (24, 8, 0, 0)


def test_without_prefix_reuse_every_prompt_is_computed_whole():
  """Row 3 runs a request, so the steps are 4 rows wide (level 2) and rows 0-2 cost the
  same: the free row holding the shortest prefix is taken (the least lost)."""
  sched = scheduler(4, prefix_reuse=False)
  sched.cached = [[1, 2, 3, 4, 5], [1, 2, 9], [], [4]]
  sched.running[3] = sched.submit([4], Params())
  assert place(sched, [1, 2, 3, 4, 7, 8], [0, 1, 2]) == (0, 8, 2, 2)
  assert place(sched, [1, 2, 3, 4, 7, 8], [0, 1]) == (0, 8, 1, 1)


def test_requests_fill_each_groups_first_rows():
  """8 rows in 2 groups of 4 (a runner's data groups): the first request of each group takes
  its row 0, the next ones rows 1, then 2-3, so a few requests are stepped alone."""
  sched = scheduler(8, prefix_reuse=False, group_rows=4)
  streams = submit(sched, *[[i] for i in range(6)])
  placements, _ = sched.admit()
  # (rows 2, 3, 6 and 7 share level 2: the lowest of them first)
  assert rows(placements) == [(0, 0), (1, 4), (2, 1), (3, 5), (4, 2), (5, 3)]
  for s in streams[1:]:
    sched.release(s)
  sched.cached[1] = []  # shorter than row 4's prefix, but row 4's level (0) wins
  later = submit(sched, [9])
  assert rows(sched.admit()[0]) == [(later[0].id, 4)]


def test_admission_places_one_after_the_other():
  """The second of two prompts admitted together sees the first one's prompt in the index."""
  sched = scheduler(3)
  submit(sched, [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 7, 8])
  (p0, p1), _ = sched.admit()
  assert (p0.row, p0.start, p0.bucket) == (0, 0, 8)
  assert (p1.row, p1.source, p1.start, p1.bucket) == (1, 0, 6, 4)


def test_cancelled_requests_leave_the_queue_and_their_rows():
  sched = scheduler(2, prefix_reuse=False)
  a, b, c, d = submit(sched, [1], [2], [3], [4])
  sched.admit()
  c.cancel()
  a.cancel()
  assert sched.cancelled() == [a, c]  # running ones first, then waiting ones
  assert list(sched.waiting) == [d]  # c left the queue
  assert sched.running == [a, b]  # a's row frees when it is released (finished)
  assert sched.release(a) == 0
  d.cancel()  # cancelled after the engine looked: admission drops it
  e, = submit(sched, [5])
  assert sched.admit() == ([Placement(e, 0, 0, 4, 0, 1)], [d])
  assert sched.cancelled() == []


def test_a_full_queue_refuses_with_429_and_a_closing_one_with_503():
  sched = scheduler(1, max_queue=2, prefix_reuse=False)
  submit(sched, [1], [2])
  with pytest.raises(RequestError, match="queue is full") as e:
    sched.submit([3], Params())
  assert e.value.status == 429 and len(sched.waiting) == 2
  sched.admit()  # one leaves the queue for the row: room for one more
  submit(sched, [3])
  sched.close()
  with pytest.raises(RequestError, match="shutting down") as e:
    sched.submit([4], Params())
  assert e.value.status == 503


def chunks(placements: list[Placement]) -> list[tuple]:
  """(request id, row, start, bucket, source, end, first) of each placement, in order."""
  return [(p.stream.id, p.row, p.start, p.bucket, p.source, p.end, p.first) for p in placements]


def test_a_long_prompt_fills_its_row_in_chunks_within_the_budget():
  """step_tokens=12: budget 12 less the rows decoding; a chunk that is not a prompt's last is
  the largest bucket that fits, exactly that many tokens."""
  sched = scheduler(2, length=64, buckets=(4, 8, 16, 32, 64), prefix_reuse=False)
  sched.step_tokens = 12
  a, b = submit(sched, list(range(30)), [1, 2, 3])
  # Budget 12: a's 30 tokens pad to 32, so its chunk is bucket 8 (tokens 0-7); b's 3 tokens
  # (bucket 4) fit the 4 left: its whole prompt.
  assert chunks(sched.admit()[0]) == [(0, 0, 0, 8, 0, 8, True), (1, 1, 0, 4, 1, 3, True)]
  assert sched.decoding() == [None, b] and sched.running == [a, b]
  assert sched.filled == {0: 8} and sched.cached[0] == list(range(8))
  # b decodes: budget 11. a goes on from its own row: 8 of the 22 left (bucket 32 > 11).
  assert chunks(sched.admit()[0]) == [(0, 0, 8, 8, 0, 16, False)]
  assert chunks(sched.admit()[0]) == [(0, 0, 16, 8, 0, 24, False)]
  # 6 left: bucket 8 fits, its last chunk; then a decodes too.
  assert chunks(sched.admit()[0]) == [(0, 0, 24, 8, 0, 30, False)]
  assert sched.decoding() == [a, b] and sched.filled == {} and sched.cached[0] == a.prompt


def test_chunks_continue_a_cached_prefix_and_started_prompts_go_first():
  sched = scheduler(3, length=64, buckets=(4, 8, 16, 32, 64))
  sched.step_tokens = 12
  sched.cached[1] = list(range(20))
  a, b = submit(sched, list(range(30)), [7] * 9)
  # a continues row 1's 20 tokens (copied into row 0, level 0): 10 left, bucket 16 > 12, so
  # 8 of them; b's 9 tokens (bucket 16) into row 1 (level 1): 4 of them in the 4 left.
  assert chunks(sched.admit()[0]) == [(0, 0, 20, 8, 1, 28, True), (1, 1, 0, 4, 1, 4, True)]
  sched.submit([5] * 9, Params())  # waits: the started prompts go first and spend the budget
  # a's last 2 tokens (bucket 4, from its own row), then b's last 5 (bucket 8): 12.
  assert chunks(sched.admit()[0]) == [(0, 0, 28, 4, 0, 30, False), (1, 1, 4, 8, 1, 9, False)]
  assert sched.decoding() == [a, b, None] and sched.filled == {} and len(sched.waiting) == 1


def test_the_first_chunk_of_a_step_always_runs():
  """Three rows decoding eat a budget of 6: a prompt still gets the smallest bucket a step;
  a prompt scored whole (echo with logprobs) runs whole, alone in its step."""
  sched = scheduler(5, length=64, buckets=(4, 8, 16, 32, 64), prefix_reuse=False)
  submit(sched, [0], [1], [2])
  sched.admit()  # no budget yet: rows 0-2 decode
  sched.step_tokens = 6
  a = sched.submit(list(range(10)), Params())
  scored = sched.submit(list(range(10)), Params(logprobs=1, echo=True))
  assert chunks(sched.admit()[0]) == [(a.id, 3, 0, 4, 3, 4, True)]
  assert chunks(sched.admit()[0]) == [(a.id, 3, 4, 4, 3, 8, False)]
  assert chunks(sched.admit()[0]) == [(a.id, 3, 8, 4, 3, 10, False)]
  assert chunks(sched.admit()[0]) == [(scored.id, 4, 0, 16, 4, 10, True)]


def test_a_cancelled_filling_request_frees_its_row():
  sched = scheduler(1, length=64, buckets=(4, 8, 16, 32, 64), prefix_reuse=False)
  sched.step_tokens = 8
  a, = submit(sched, list(range(20)))
  sched.admit()
  a.cancel()
  assert sched.cancelled() == [a] and sched.release(a) == 0
  assert sched.filled == {} and sched.running == [None]


def test_without_a_budget_prompts_run_whole():
  """step_tokens=0: every prompt whole."""
  sched = scheduler(3, length=64, buckets=(4, 8, 16, 32, 64), prefix_reuse=False)
  submit(sched, list(range(30)), list(range(20)))
  assert chunks(sched.admit()[0]) == [(0, 0, 0, 32, 0, 30, True), (1, 1, 0, 32, 1, 20, True)]


def test_reset_forgets_requests_and_prefixes():
  sched = scheduler(2)
  submit(sched, [1, 2], [3], [4])
  sched.admit()
  sched.reset()
  assert sched.running == [None, None] and not sched.waiting and sched.cached == [[], []]


def test_an_unknown_policy_is_refused():
  with pytest.raises(ValueError, match="continuous, static"):
    scheduler(policy="fifo")


# ---- the engine's wiring, over a runner that needs no devices ----


class FakeRunner:
  """Each prefill's first token is 5, each decode step gives every running row 7; it records
  what the engine asks of it."""

  def __init__(self, slots: int = 2, *, fail_step: int = 0):
    model = type("Model", (), {"vocab_size": 250})
    self.generator = type("Generator", (), {"config": type("Config", (), {"model": model})})
    self.slots, self.length, self.buckets, self.compiled = slots, 32, (8, 16, 32), {}
    self.group_rows = slots
    self.calls, self.fail_step = [], fail_step  # the step call that raises (1: the first)

  def step(self, running):
    self.calls.append(("step", [s and s.id for s in running]))
    if sum(c[0] == "step" for c in self.calls) == self.fail_step:
      raise RuntimeError("injected")
    return [(b, s, 7, None) for b, s in enumerate(running) if s is not None]

  def choose(self, running):
    pass

  def prefill(self, placement):
    self.calls.append(("prefill", placement.stream.id, placement.row))
    return [(placement.row, placement.stream, 5, None)] if placement.last else []

  def release(self, row):
    self.calls.append(("release", row))

  def busy(self):
    return False

  def reset(self):
    self.calls.append(("reset",))


def engine_over(runner: FakeRunner, *, prefix_reuse: bool = True, step_tokens: int = 0):
  from jaxpar.serve.engine import Engine
  from jaxpar.serve.metrics import Metrics
  return Engine(runner, eos_ids=(9,), detokenize=None, max_queue=8, policy="continuous",
                metrics=Metrics(), prefix_reuse=prefix_reuse, step_tokens=step_tokens)


def test_the_engine_decodes_between_the_chunks_of_a_long_prompt():
  """step_tokens=9 over buckets 8, 16, 32: a decodes while b's 20 tokens go in 8-token
  chunks, one a step; b's row is not decoded until its last chunk, its first token next."""
  runner = FakeRunner()
  engine = engine_over(runner, step_tokens=9)
  a = engine.submit([1], Params(max_tokens=5))
  engine.step()  # a prefilled (bucket 8 of 9)
  b = engine.submit(list(range(20)), Params(max_tokens=2))
  for _ in range(4):
    engine.step()
  assert runner.calls == [("step", [None, None]), ("prefill", 0, 0),
                          ("step", [0, None]), ("prefill", 1, 1),  # b: tokens 0-7
                          ("step", [0, None]), ("prefill", 1, 1),  # 8-15
                          ("step", [0, None]), ("prefill", 1, 1),  # 16-19 (bucket 8)
                          ("step", [0, 1]), ("release", 0), ("release", 1)]
  assert (a.token_ids, b.token_ids, b.finish_reason) == ([5, 7, 7, 7, 7], [5, 7], "length")
  assert engine.metrics.registry.get_sample_value("jaxpar_prompt_tokens_total") == 21


def test_the_engine_runs_admits_and_frees_rows_in_order():
  runner = FakeRunner()
  engine = engine_over(runner)
  a = engine.submit([1, 2], Params(max_tokens=3))
  b = engine.submit([3], Params(max_tokens=1))
  engine.step()  # nothing runs yet; both are admitted, b ends on its first token
  engine.step()
  engine.step()  # a's third token: it ends
  assert runner.calls == [("step", [None, None]), ("prefill", 0, 0), ("prefill", 1, 1),
                          ("release", 1), ("step", [0, None]), ("step", [0, None]),
                          ("release", 0)]
  assert (a.token_ids, a.finish_reason, b.token_ids, b.finish_reason) == (
      [5, 7, 7], "length", [5], "length")
  assert [o.token_ids for o in a] == [[5], [7], [7]]
  # The index: a's prompt, then each token whose successor was made (not the last).
  assert engine.scheduler.cached == [[1, 2, 5, 7], [3]]
  assert engine.running() == 0


def test_a_cancelled_request_ends_before_the_runner_steps():
  runner = FakeRunner()
  engine = engine_over(runner)
  a = engine.submit([1], Params(max_tokens=5))
  engine.step()
  a.cancel()
  waiting = engine.submit([2], Params())
  waiting.cancel()
  engine.step()
  assert runner.calls[2:] == [("release", 0), ("step", [None, None])]
  assert (a.finish_reason, a.token_ids, waiting.finish_reason) == ("cancelled", [5], "cancelled")


def test_a_token_for_a_request_that_left_its_row_is_dropped():
  runner = FakeRunner(1)
  engine = engine_over(runner)
  a = engine.submit([1], Params(max_tokens=4))
  b = engine.submit([2], Params(max_tokens=4))
  engine.step()
  engine.scheduler.release(a)  # as if a ended with a step in flight; b takes the row
  engine.step()  # the runner reports a token for a in row 0 (its step in flight)
  runner.step = lambda running: [(0, a, 8, None)]
  engine.step()
  assert a.token_ids == [5] and b.token_ids == [5]


def test_a_failed_step_ends_every_request_and_forgets_the_index():
  runner = FakeRunner(1, fail_step=2)
  engine = engine_over(runner)
  a = engine.submit([1, 2, 3], Params(max_tokens=4))
  b = engine.submit([4], Params(max_tokens=2))
  engine.step()  # a admitted (its prompt in the index); b waits
  assert engine.scheduler.cached == [[1, 2, 3]]
  engine.start()  # the next step raises
  try:
    assert (a.result().finish_reason, b.result().finish_reason) == ("error", "error")
    assert ("reset",) in runner.calls and engine.scheduler.cached == [[]]
    assert a.token_ids == [5] and b.token_ids == []
    c = engine.submit([1, 2, 3], Params(max_tokens=2)).result()
    assert (c.token_ids, c.finish_reason) == ([5, 7], "length")
  finally:
    engine.stop()
