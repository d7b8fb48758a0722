"""The runner's programs: how each is compiled (`makers`), kept by key and compiled on first
use or all at once (`Programs`), with a line saying so (`compiling`), and each run once
before serving (`warm_up`)."""

import contextlib
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxpar.distributed import say
from jaxpar.runtime.speculative import round_fn
from jaxpar.serve.shapes import abstract_sampling, scalar


@contextlib.contextmanager
def compiling(count: int, prompt_buckets: tuple[int, ...], steps: str, *, progress: bool):
  """Says that `count` programs compile (prefill per bucket, then `steps`), and how long they
  took."""
  start = time.perf_counter()
  if progress:
    say(f"compiling {count} programs: prefill for prompts of up to "
        f"{', '.join(map(str, prompt_buckets))} tokens, {steps} (greedy, sampled)...")
  yield
  if progress:
    say(f"compiled in {time.perf_counter() - start:.1f} s")


class Programs(dict):
  """The runner's compiled programs by key. A program not compiled yet compiles on first use
  (`makers[key]()`); `compile_all` compiles every one."""

  def __init__(self, makers: dict, mesh):
    super().__init__()
    self.makers, self.mesh = makers, mesh

  def __missing__(self, key):
    with jax.set_mesh(self.mesh):
      self[key] = program = self.makers[key]()
    return program

  def compile_all(self) -> None:
    for key in self.makers:
      self[key]  # noqa: B018 (compiles it)


def makers(runner) -> dict:
  """{key: a function that compiles the program} of a `runner.Runner`: prefill per prompt
  bucket; per span and active-row count the greedy step, and the forward (a pipeline: the
  sampled step, every row); per row count the choice."""
  d, g = runner.decoder, runner.generator
  state = d.empty_state(abstract=True)
  one = lambda a: jax.ShapeDtypeStruct((1, *a.shape), a.dtype)
  lower = lambda fn, *args: lambda: d.jit(fn).lower(g.params, state, *args).compile()

  def prefill(d, bucket, **flags):
    echo = flags.get("echo", False)
    return lambda: d.prefill(1, bucket, reuse=True, **flags).lower(
        d.generator.params, d.empty_state(abstract=True),
        jax.ShapeDtypeStruct((1, bucket), jnp.int32), scalar(jnp.int32),
        one(scalar(jnp.int32)), scalar(jnp.int32), scalar(jnp.int32),
        jax.tree.map(one, abstract_sampling(d.bias, runner.width)), one(scalar(jnp.uint32)),
        one(scalar(jnp.int32)), *[one(scalar(jnp.bool_))] * echo).compile()
  makers = {}
  for bucket in runner.buckets:
    makers["prefill", bucket] = prefill(d, bucket, logprobs=True, echo=True)
    if runner.draft:
      makers["draft prefill", bucket] = prefill(runner.draft, bucket, greedy=True)
  for A in runner.rows:
    mask = jax.ShapeDtypeStruct((len(runner.active(A)), runner.width), jnp.int32)
    for span in runner.spans:
      if runner.k and span > runner.k:
        for greedy in (True, False):
          makers["speculate", greedy, span, A] = functools.partial(
              _lower_round, runner, greedy, span, A)
      if d.pipelined:  # every row; the choice inside the ring
        makers["decode", True, span, A] = lower(d.step_fn(greedy=True, span=span))
        makers["decode", False, span, A] = lower(
            d.step_fn(greedy=False, span=span, logprobs=True), mask)
        continue
      makers["decode", True, span, A] = lower(d.step_fn(greedy=True, span=span, rows=A))
      makers["forward", span, A] = lower(d.forward_fn(span=span, rows=A))
    if not d.pipelined:  # takes the logits as the forward lays them out
      choice = d.choice_fn(greedy=False, logprobs=True, rows=A)
      makers["choose", A] = lambda choice=choice, A=A, mask=mask: lower(
          choice, runner.compiled["forward", runner.spans[0], A].out_info[0], mask)()
  return makers


def _lower_round(runner, greedy: bool, span: int, A: int):
  """A `runner.Runner`'s compiled `round_fn` of `A` active rows per data group over `span`
  positions: (params, state, live, draft params, draft state) -> ((tokens_BT, made_B, proposed_B),
  state, draft state), both states donated."""
  d, draft = runner.decoder, runner.draft
  one_round = round_fn(d, runner.spec, span=span, greedy=greedy, rows=A, draft=draft)

  def program(params, state, live_B, draft_params, draft_state):
    caches = None if draft is None else draft_state.caches
    out, state, caches = one_round(params, state, live_B, draft_params, caches)
    return out, state, None if draft is None else dataclasses.replace(draft_state,
                                                                      caches=caches)
  draft_args = (None, None) if draft is None else (
      runner.spec.draft.params, draft.empty_state(abstract=True))
  return jax.jit(program, donate_argnums=(1, 4), out_shardings=(
      None, d.state_shardings(), None if draft is None else draft.state_shardings())).lower(
      runner.generator.params, d.empty_state(abstract=True),
      jax.ShapeDtypeStruct((len(runner.active(A)),), jnp.bool_), *draft_args).compile()


def warm_up(runner) -> None:
  """Runs each of a `runner.Runner`'s compiled programs once, on its own state and zeros for
  the other inputs, then zeroes the state: XLA:CPU's first run of a program costs several
  times the next ones (GPT-2 124M's shape, one CPU device, the 8-row decode step: 128-143
  ms, then 23-35 ms; `benchmarks/warm_up.py`), which the first requests would otherwise pay,
  program by program."""
  draft_params = runner.spec.draft.params if runner.draft else None
  for key, program in runner.compiled.items():
    own = key[0] != "draft prefill"  # else the draft's program, on its params and state
    given = {0: runner.generator.params if own else draft_params,
             1: runner._state if own else runner._draft_state}
    if key[0] == "speculate" and runner.draft:
      given.update({3: draft_params, 4: runner._draft_state})
    zeros = lambda a: np.zeros(a.shape, a.dtype)  # (placed as the program takes it)
    out = program(*[given[i] if i in given else jax.tree.map(zeros, a)
                    for i, a in enumerate(program.in_avals[0])])
    if own:
      runner._state = out[1]
      if 4 in given:
        runner._draft_state = out[2]
    else:
      runner._draft_state = out[1]
    jax.block_until_ready(out)
  runner.reset()
