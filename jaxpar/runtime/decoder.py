"""The slot decoder: one KV cache of `slots` rows, every row's decoding state, and the
programs that advance them, on any mesh. `generate` drives it (prefill every prompt, then a
compiled loop of its step) and the server runs it (prefill a request into a free row, one step
of every row per engine iteration); a capability of decoding is written here once.

The state (`slots.State`) lives on the devices and is donated to every call, so it updates in
place and the host sends nothing per step. A row's tokens sit at the cache slots equal to
their positions (prompts are right-padded), so each row writes at its own position. Each
program is one tick function run on the stage ring (`jaxpar.parallel.ring`). On a pipeline
(mesh.stage = S > 1) the slots form G = S groups of Bg = slots / G rows that rotate through
the stages (slot b is row b % Bg of group b // Bg); each stage keeps the cache of its own
layers for every slot, [Lc, G, Bg, length + 1, ...], where position `length` is a trash slot
no query sees, for writes that must not land. Without stages the tick runs once: one group
of every row, nothing in flight, no trash slot, the cache laid out by the rules alone (rows
over `data`, key/value heads over `model`; stacked for a scan, else a buffer per layer), and
the step is its forward to the logits (`forward_fn`) then the choice (`choice_fn`), which a
server runs as two programs (computing grammars' masks between them).

    prefill[R, T](params, state, tokens_RT, start, lengths_R, src, slot, sampling_R,
                  seeds_R, rows_R) -> first_R, state
      # R prompts, right-padded to T, at positions start.., into rows slot..slot+R-1, as
      # n groups of R/n rows (n = R / Bg, or 1 when R <= Bg); n + S - 1 ticks (GPipe)
      for t in range(n + S - 1):
        i = t - s                         # stage s works on group i; idle unless 0 <= i < n
        x = embed(tokens[i], start..) if s == 0 else msg
        y, rows = layers(x, zeroed rows (start = 0) or a copy of row src (start > 0: one
                         prompt continuing the prefix a request left there, or its own
                         earlier chunks; on a pipeline, row src of its group on this stage))
        group i's rows = rows               # whole rows, on valid ticks
        if s == S-1: first[i] = choose(head(y[lengths - 1]), key(seed, row), token 0)
        msg = y
    step[span](params, state) -> out_B, state
      # every row's next token enters; G ticks
      for t in range(G):
        g = (t - s) % G                     # the group stage s works on
        e = cur if t >= s else prev         # entered stage 0 this round, or the round before
        x = embed(fresh[g] ? cur.tokens[g] : ring, e.positions[g]) if s == 0 else msg
        y = layers(x, cache[g]: attends over the first `span` slots, writes at e.positions[g]
                   (the trash slot where e.keep[g] is false))
        if s == S-1: out[g] = choose(head(y), e's settings, key(seed, row), e.counts[g])
        msg, ring = y, out[g]

(`msg = ...` is what the ring sends to stage s + 1 after the tick: the tick functions never
permute anything themselves. With `logprobs=True` each token comes with its
`sampling.LogProbs`, computed by `choose` on the last stage.) Group g enters stage 0 at tick g
and leaves the last stage at tick g + S - 1: in its own round for g = 0, in the next round
for the others (`late`), whose `out` is the token of their previous entry. That token
reaches stage 0 through `ring` exactly when the group's next step starts, so no stage waits
(G = S). A prefill gives its rows a new request: their entry still in flight (`prev`) writes
to the trash slot from then on (`keep`), and their first token enters from `cur.tokens`
(`fresh`), not from the ring. Rows that hold no request compute too (the host ignores their
tokens). The step attends over the first `span` slots of each row only (the least span that
holds every running row, so short requests do not stream a long cache). Speculation's
check of k proposals per row and a draft's steps (`speculative.verify_fn`, `propose_fn`) are
programs of this decoder too, built from its layers and rules.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxpar.axes import BATCH, STAGE
from jaxpar.errors import UserError
from jaxpar.models.base import Step, run_blocks
from jaxpar.parallel import pipeline, ring
from jaxpar.rules import use_rules
from jaxpar.runtime.sampling import Context
from jaxpar.runtime.slots import (Ring, State, advance, as_rows, base_keys, blank_chosen,
                                  blank_first, cache_spec, choose, chosen_tokens, copy_rows,
                                  lead_count, lead_rows, prefilled, prompt_history,
                                  prompt_log_probs, put_rows, source_row, state_program,
                                  with_mask, zero_rows, zeroed_state)


@dataclasses.dataclass
class Decoder:
  """`slots` rows of `length` positions for a `Generator`'s model, on its mesh; each row's
  sampling settings hold `bias` entries of `sampling.Bias` (0: none)."""
  generator: object  # jaxpar.runtime.generate.Generator
  slots: int
  length: int
  bias: int = 0

  def __post_init__(self):
    g = self.generator
    m = g.config.model
    self.S = self.G = g.mesh.shape[STAGE]
    self.pipelined = self.S > 1
    self.data_ways = math.prod(g.mesh.shape[a] for a in g.rules.mesh_axes(BATCH))
    if self.pipelined and self.slots % (self.G * self.data_ways):
      raise UserError(f"serve.max_slots={self.slots}: with mesh.stage={self.S} the slots form "
                      f"{self.G} groups, each split over the {self.data_ways} devices of the "
                      f"batch axes; use a multiple of {self.G * self.data_ways}")
    self.Bg = self.slots // self.G
    self.positions = self.length + self.pipelined  # a pipeline's trash slot
    self.scan = g.scan or self.pipelined  # a stage scans its layers
    self.width, self.dtype = m.d_model, jnp.dtype(m.dtype)  # the activations between stages
    if self.pipelined:
      self.Lc = pipeline.per_chunk(m.n_layers, stages=self.S)  # identity padding included
      self.active = pipeline.active(m.n_layers, stages=self.S)  # None, or [S, 1, Lc]

  def late(self) -> np.ndarray:
    """bool [slots]: the rows whose step's token leaves the pipeline in the next step."""
    return np.arange(self.slots) // self.Bg + self.S - 1 >= self.G

  # ---- the tick functions (traced inside a program; s a Python int when S = 1) ----

  def _layers(self, graphdef, layers, x_BTD, step: Step, caches):
    """This stage's layers (identity padding passes its input on, uneven stages)."""
    on = None
    if self.pipelined and self.active is not None:
      on = jnp.asarray(self.active[:, 0])[ring.stage()]
    return run_blocks(graphdef, layers, x_BTD, step, caches, scan=self.scan, active=on)

  def _step_tick(self, parts, choice: tuple | None, span: int, rows, t, s, carry, msg,
                 lead: int = 0):
    (model, graphdef, layers), (caches, out), (x_msg, token_msg) = parts, carry, msg
    prev, keep, cur, fresh = rows  # [G, Bg] each on a pipeline; else cur only, [B]
    g, history = (t - s) % self.G, cur.history  # (the round before's has none)
    if self.pipelined:  # the entry stage s works on: this round's or the round before's
      cur = dataclasses.replace(cur, history=None)
      e, keep = ring.pick(ring.where(t >= s, (cur, jnp.ones_like(keep)), (prev, keep)), g)
    else:
      e = cur
    positions_B = e.positions
    mask_B1S = (jnp.arange(span)[None, :] <= positions_B[:, None])[:, None, :]
    index_B = positions_B if keep is None else jnp.where(keep, positions_B, self.length)
    step = Step(positions_B[:, None], mask_B1S, index_B, lead, self.data_ways)

    def embed():
      tokens_B = e.tokens if fresh is None else jnp.where(ring.pick(fresh, g), e.tokens,
                                                          token_msg)
      return model.embed(tokens_B[:, None], step.positions_BT)
    x_B1D = ring.first(s, embed, x_msg)
    y_B1D, new = self._layers(graphdef, layers, x_B1D, step, self._group(caches, g))
    caches = self._regroup(caches, g, new)
    if not self.pipelined:  # the logits: the choice is `choice_fn`'s
      return (caches, model.head(y_B1D)[:, 0]), (y_B1D, None)
    greedy, logprobs = choice
    # The tokens so far: in this round's rows (a late row's entry is the round before's, its
    # last token already in them; a later one is past its position, not counted).
    context = None
    if not greedy:
      context = Context(ring.pick(history, g)[:, :span], e.starts, positions_B, e.counts)
    chosen = ring.last(s, self.S, lambda: choose(model.head(y_B1D)[:, 0], e.keys, context,
                                                 e.sampling, greedy=greedy, logprobs=logprobs))
    return (caches, self._out(out, g, chosen, s == self.S - 1)), (y_B1D, chosen_tokens(chosen))

  def _prefill_tick(self, parts, choice: tuple, reuse: bool, inputs, t, s, carry, msg):
    (model, graphdef, layers), (caches, first) = parts, carry
    greedy, logprobs, echo = choice  # with log-probabilities; of the prompts' tokens
    tokens_nRT, start, lengths_nR, src, slot, sampling_nR, keys_nR, history_nRN = inputs[:8]
    n, R, T = tokens_nRT.shape
    i = t - s
    valid = 0 <= i < n if isinstance(i, int) else (i >= 0) & (i < n)
    i = min(max(i, 0), n - 1) if isinstance(i, int) else jnp.clip(i, 0, n - 1)
    positions_RT = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (R, T))
    x_RTD = ring.first(s, lambda: model.embed(ring.pick(tokens_nRT, i), positions_RT), msg)

    def through(rows, width: int):  # the chunk over the first `width` slots of `rows`
      mask_1TS = (jnp.arange(width)[None, :] <= positions_RT[0, :, None])[None]
      return self._layers(graphdef, layers, x_RTD, Step(positions_RT, mask_1TS, start), rows)
    fresh = lambda: through(zero_rows(self, R), T)
    copied = lambda: through(source_row(self, caches, src), self.positions)
    if reuse and self.pipelined:  # always copied (from position 0 the mask hides what the
      # row held): a `lax.cond` around the layers' collectives in the ring hung XLA:CPU
      y_RTD, new = copied()
    elif reuse:  # a prompt that continues a cached prefix attends over all its row's slots
      y_RTD, new = lax.cond(start == 0, fresh, copied)
    else:
      y_RTD, new = fresh()
    caches = put_rows(self, caches, new, slot + i * R, valid)
    lengths_R = ring.pick(lengths_nR, i)
    last_RD = jnp.take_along_axis(y_RTD, (lengths_R - 1 - start)[:, None, None], axis=1)
    context = Context(ring.pick(history_nRN, i), lengths_R, lengths_R - 1,
                      jnp.zeros((R,), jnp.int32))
    chosen = ring.last(s, self.S, lambda: choose(
        model.head(last_RD)[:, 0], ring.pick(keys_nR, i), context, ring.pick(sampling_nR, i),
        greedy=greedy, logprobs=logprobs))
    if echo:
      like = ring.varying if self.pipelined else (lambda zeros: zeros)
      chosen = (*chosen, ring.last(s, self.S, lambda: prompt_log_probs(
          model.head, y_RTD, ring.pick(tokens_nRT, i), ring.pick(inputs[8], i), like=like)))
    return (caches, self._out(first, i, chosen, valid & (s == self.S - 1))), y_RTD

  # ---- one group's caches and outputs ----

  def _group(self, caches, g):
    return ring.pick(caches, g, axis=1) if self.pipelined else caches

  def _regroup(self, caches, g, new):
    return ring.put(caches, g, new, axis=1) if self.pipelined else new

  def _out(self, out, i, value, keep):
    return ring.put(out, i, value, keep) if self.pipelined else value

  # ---- the programs ----

  def _rules(self, rows: int | None):
    """The model's rules; `rows` that do not split over the batch axes are computed by every
    data group (the group holding the slot keeps them)."""
    rules = self.generator.rules
    return rules.replace(BATCH, None) if rows is not None and rows % self.data_ways else rules

  def _staged(self, fn, in_specs, out_specs, *, rows: int | None = None):
    """`fn(parts, *args)` on the ring's shard_map under the model's rules: (params, *args)."""
    g = self.generator
    rules, keys = self._rules(rows), g.family.config_keys

    def local(rest, blocks_local, *args):
      with use_rules(rules, keys=keys):
        blocks = jax.tree.map(lambda a: a[0, 0], blocks_local)  # this stage's [Lc, ...]
        model, graphdef, _ = g.model_parts(({**rest, "blocks": blocks}, None))
        return fn((model, graphdef, blocks), *args)
    mapped = ring.shard(local, mesh=g.mesh, in_specs=(P(), P(STAGE), *in_specs),
                        out_specs=out_specs)

    def run(params, *args):
      params, _ = params
      return mapped({k: v for k, v in params.items() if k != "blocks"}, params["blocks"],
                    *args)
    return run

  def _plain(self, fn, *, rows: int | None = None):
    """`fn(parts, *args)` under the model's rules: (params, *args)."""
    g = self.generator
    rules, keys = self._rules(rows), g.family.config_keys

    def run(params, *args):
      with use_rules(rules, keys=keys):
        return fn(g.model_parts(params), *args)
    return run

  def cache_specs(self):
    return {k: P(STAGE) for k in cache_spec(self.generator, 1, 1)}

  def jit(self, fn):
    """The program of a traced (params, state, ...) -> (out, state): `step_fn`, `forward_fn`,
    `choice_fn`, the prefill; the state donated, laid out as `state_shardings`."""
    return jax.jit(fn, donate_argnums=(1,), out_shardings=(None, self.state_shardings()))

  def prefill(self, rows: int, bucket: int, *, greedy: bool = False, reuse: bool = False,
              logprobs: bool = False, echo: bool = False):
    """The jitted prefill of `rows` prompts of up to `bucket` tokens (see the module
    docstring); `reuse`: one prompt that may continue a cached prefix (start > 0);
    `logprobs`: the first tokens come with their `LogProbs` ((first_R, LogProbs));
    `echo` (with `logprobs`): and with the `LogProbs` [R, bucket] of their prompts' tokens
    (`prompt_log_probs`) where `echo_R`, the last argument, asks. With rows = slots the
    state passed may be None: the prompts' rows become the whole state."""
    if reuse and rows != 1:
      raise ValueError(f"rows={rows}: a prefill that may continue a cached prefix takes one "
                       f"prompt")
    if echo and not logprobs:
      raise ValueError("echo scores the prompts with log-probabilities: logprobs=True")
    n = rows // self.Bg if rows > self.Bg else 1
    R, S = rows // n, self.S

    blank = lambda: blank_first((n, R), bucket, logprobs=logprobs, echo=echo)
    def ticks(parts, caches, *inputs):
      first = blank() if self.pipelined else None
      msg = ring.varying(jnp.zeros((R, bucket, self.width), self.dtype)) if S > 1 else None
      tick = functools.partial(self._prefill_tick, parts, (greedy, logprobs, echo), reuse,
                               inputs)
      (caches, first), _ = ring.run(tick, (caches, first), msg, ticks=n + S - 1, stages=S)
      return caches, ring.pack(first)[None] if self.pipelined else first  # one buffer out

    if self.pipelined:
      spec = self.cache_specs()
      body = self._staged(ticks, in_specs=(spec,) + (P(),) * (8 + echo),
                          out_specs=(spec, P(STAGE)), rows=R)
    else:
      body = self._plain(ticks, rows=R)

    def run(params, state, tokens_RT, start, lengths_R, src, slot, sampling, seeds_R, rows_R,
            *echo_R):
      if state is None:
        state = zeroed_state(self) if self.pipelined else State(None, None)
      keys_R = base_keys(seeds_R, rows_R)
      before = copy_rows(state.slots.history, src, 1, axis=0, split=self.data_ways > 1) if (
          reuse and state.slots is not None) else None  # a cached prefix's tokens
      history_RN = prompt_history(self.length, tokens_RT, start, before)
      group = lambda a: a.reshape(n, R, *a.shape[1:])
      caches, first = body(params, state.caches, group(tokens_RT), start, group(lengths_R),
                           src, slot, jax.tree.map(group, sampling), group(keys_R),
                           group(history_RN), *map(group, echo_R))
      if self.pipelined:
        first = ring.unpack(first[S - 1], blank())
      first_R = as_rows(first, rows, 1 + self.pipelined)
      fresh = prefilled(chosen_tokens(first_R), lengths_R, sampling, keys_R, history_RN)
      if self.pipelined:  # a pipeline's rows are whole on every device
        fresh = dataclasses.replace(fresh, history=self._whole(fresh.history))
      if state.slots is None:  # every row prefilled: the new rows are the state
        return first_R, State(caches, fresh)
      at = slot + jnp.arange(rows)
      slots = jax.tree.map(lambda a, v: a.at[at].set(v.astype(a.dtype)), state.slots, fresh)
      r = state.ring
      if r is not None:  # the rows' entries in flight are the old requests': never kept
        r = dataclasses.replace(r, keep=r.keep.at[at].set(False), fresh=r.fresh.at[at].set(True))
      return first_R, State(caches, slots, r)
    return self.jit(run)

  def _whole(self, x):
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(self.generator.mesh,
                                                                          P()))

  def step_fn(self, *, greedy: bool, span: int, logprobs: bool = False,
              rows: int | None = None):
    """One decode step of every row, traced (a loop or a program calls it):
    (params, state) -> (out_B, state); `out_B[b]` is the token of row b's entry of this step,
    of the step before for `late` rows (with `logprobs`: (tokens, their `LogProbs`)).
    Called (params, state, allowed_BW) (not `greedy`): the tokens each row's choice in this
    step may take (packed, `sampling.allow`). `rows` (without stages): `forward_fn`'s."""
    S, G, Bg = self.S, self.G, self.Bg
    lead_count(self, rows)  # (a pipeline steps every row)
    if not self.pipelined:  # the forward, then the choice
      forward = self.forward_fn(span=span, rows=rows)
      pick = self.choice_fn(greedy=greedy, logprobs=logprobs, rows=rows)

      def step(params, state, *allowed):
        logits_BV, state = forward(params, state)
        return pick(params, state, logits_BV, *allowed)
      return step

    def ticks(parts, caches, prev, keep, cur, fresh, x_msg, token_msg):
      rows = jax.tree.map(lambda a: a.reshape(G, Bg, *a.shape[1:]), (prev, keep, cur, fresh))
      tick = functools.partial(self._step_tick, parts, (greedy, logprobs), span, rows)
      out, msg = blank_chosen((G, Bg), logprobs), (x_msg[0], token_msg[0])
      (caches, out), (x_msg, token_msg) = ring.run(tick, (caches, out), msg, ticks=G,
                                                   stages=S)
      return caches, x_msg[None], token_msg[None], ring.pack(out)[None]  # one buffer out

    spec = self.cache_specs()
    body = self._staged(ticks, in_specs=(spec,) + (P(),) * 4 + (P(STAGE),) * 2,
                        out_specs=(spec, P(STAGE), P(STAGE), P(STAGE)))

    def step(params, state, *allowed):
      r, cur = state.ring, state.slots
      # Only this round's history is read (`_step_tick`), whole on every device (split like
      # the rows, its [G, Bg] regrouping became all-to-alls); a row's mask, for any entry.
      history = None if greedy else self._whole(cur.history)
      allowed = tuple(map(self._whole, allowed))
      caches, x_msg, token_msg, out = body(
          params, state.caches, with_mask(dataclasses.replace(r.prev, history=None), allowed),
          r.keep, with_mask(dataclasses.replace(cur, history=history), allowed), r.fresh, r.msg,
          r.token)
      out_B = as_rows(ring.unpack(out[S - 1], blank_chosen((G, Bg), logprobs)), self.slots, 2)
      # A late row's token is its entry's of the round before (not kept: an old request's).
      late_B = jnp.asarray(self.late())
      at_B = jnp.where(late_B, jnp.where(r.keep, r.prev.positions + 1, -1),
                       state.slots.positions + 1)
      slots = advance(state.slots, chosen_tokens(out_B), self.length, at_B)
      r = Ring(state.slots, jnp.ones_like(r.keep), jnp.zeros_like(r.fresh), x_msg, token_msg)
      return out_B, State(caches, slots, r)
    return step

  def forward_fn(self, *, span: int, rows: int | None = None):
    """A decode step's forward without stages: (params, state) -> (logits_BV float32, state),
    each row's keys and values written, the rows as they were (`choice_fn` advances them; a
    pipeline chooses inside its ring). `rows`: of the first `rows` rows of each data group
    only (`slots.row_buckets`; B = rows * data groups), the others untouched."""
    take, lead = lead_rows(self, rows)[0], lead_count(self, rows)

    def tick(parts, caches, slots):
      return self._step_tick(parts, None, span, (None, None, take(slots), None), 0, 0,
                             (caches, None), (None, None), lead)[0]
    body = self._plain(tick)

    def run(params, state):
      caches, logits_BV = body(params, state.caches, state.slots)
      return logits_BV, State(caches, state.slots)
    return run

  def choice_fn(self, *, greedy: bool, logprobs: bool, rows: int | None = None):
    """The next token of every row (of `forward_fn`'s `rows`) from its logits, those rows
    advanced: (params, state, logits_BV, *allowed) -> (out_B, state); `allowed`: (mask
    [B, W],) or () (`step_fn`)."""
    take, put = lead_rows(self, rows)

    def pick(parts, slots, logits_BV, allowed):
      cur = take(slots)
      context = Context(cur.history, cur.starts, cur.positions, cur.counts)
      out_B = choose(logits_BV, cur.keys, context, with_mask(cur, allowed).sampling,
                     greedy=greedy, logprobs=logprobs)
      return out_B, put(slots, advance(cur, chosen_tokens(out_B), self.length))
    body = self._plain(pick)

    def run(params, state, logits_BV, *allowed):
      out_B, slots = body(params, state.slots, logits_BV, allowed)
      return out_B, State(state.caches, slots)
    return run

  # ---- the state (made by `slots`) ----

  @functools.cached_property
  def _state_program(self):  # `slots.state_program`, compiled once
    return state_program(self)

  def state_shardings(self) -> State:
    return self._state_program.output_shardings

  def empty_state(self, *, abstract: bool = False) -> State:
    """The zeroed state (shapes and shardings only, when `abstract`)."""
    with jax.set_mesh(self.generator.mesh):
      return self._state_program() if not abstract else jax.tree.map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
          jax.eval_shape(lambda: zeroed_state(self)), self.state_shardings())

