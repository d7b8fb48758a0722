"""The slot decoder's state on the devices (`decoder.Decoder` runs the programs over it).

`State` holds the KV caches, every row's decoding state (`Slots`) and, on a pipeline, what
stays in the stage ring between two rounds (`Ring`). Random draws are keyed by (seed, prompt
row, token number), (seed, token number) when the row is -1: a request's tokens depend on
neither its slot, its neighbours nor the mesh.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxpar import rules
from jaxpar.axes import ACT_EMBED, BATCH, LAYERS, SEQ, STAGE
from jaxpar.models.base import cache_leaf
from jaxpar.parallel import ring
from jaxpar.rules import constrain, use_rules
from jaxpar.runtime.sampling import (NO_TOKEN, TOP_LOGPROBS, Bias, Context, LogProbs, Sampling,
                                     adjust, allow, likeliest, log_probs, sample)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Slots:
  """Every row's decoding state, [B] each: the last token (the next step's input), its
  position, how many tokens the row has made (its draws' counter), its sampling settings,
  its random key's data, its tokens by position (what penalties count) and where its
  output starts in them (the prompt's length)."""
  tokens: jax.Array
  positions: jax.Array
  counts: jax.Array
  sampling: Sampling
  keys: jax.Array  # uint32 [B, key size]: `jax.random.key_data`
  history: jax.Array  # int32 [B, length]
  starts: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Ring:
  """A pipeline's state between rounds: each row's entry of the round before (`prev`, still
  in flight through the later stages for some groups) and whether that entry's keys and
  values are kept (False once a prefill gave the row to a new request); the rows whose next
  input is the token a prefill made (`fresh`), not the one the ring brings; and what each
  stage received last (activations [S, Bg, 1, D] and tokens [S, Bg], one per stage)."""
  prev: Slots
  keep: jax.Array  # bool [B]
  fresh: jax.Array  # bool [B]
  msg: jax.Array
  token: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class State:
  """Everything a decoder's programs carry from call to call (donated to each)."""
  caches: Any
  slots: Slots
  ring: Ring | None = None


def empty_slots(B: int, length: int, bias: int = 0) -> Slots:
  """Zeroed rows of `length` positions; settings per row with `bias` entries of `Bias` (0:
  none)."""
  full = lambda v, dtype, *shape: jnp.full((B, *shape), v, dtype)
  key_shape = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape
  sampling = jax.tree.map(jnp.asarray, Sampling().rows(B))
  if bias:
    sampling = dataclasses.replace(sampling, bias=Bias(
        full(NO_TOKEN, jnp.int32, bias), full(0, jnp.float32, bias), full(0, jnp.int32, bias)))
  zeros = lambda dtype, *shape: full(0, dtype, *shape)
  return Slots(zeros(jnp.int32), zeros(jnp.int32), zeros(jnp.int32), sampling,
               zeros(jnp.uint32, *key_shape), zeros(jnp.int32, length), zeros(jnp.int32))


def row_buckets(d) -> tuple[int, ...]:
  """The active-row counts a serving step of decoder `d` is compiled for (`forward_fn`'s
  `rows`): 1, 2, 4, ... rows of each data group, up to all of them; a pipeline steps every
  row."""
  per = d.slots // d.data_ways
  if d.pipelined:
    return (per,)
  out = [1]
  while out[-1] < per:
    out.append(min(2 * out[-1], per))
  return tuple(out)


def lead_count(d, rows: int | None) -> int:
  """`rows` of each data group of decoder `d` as `Step.rows` gives them (0: every row)."""
  if rows in (None, d.slots // d.data_ways):
    return 0
  if d.pipelined:
    raise ValueError(f"rows={rows}: a pipeline steps every row")
  return rows


def lead_rows(d, rows: int | None):
  """(rows state -> that of the first `rows` rows of each data group; (whole, part) ->
  whole with part in them), traced under the model's rules; `rows` None: every row."""
  if not lead_count(d, rows):
    return (lambda a: a), (lambda whole, part: part)
  D = d.data_ways
  return (lambda s: jax.tree.map(lambda a: rules.lead_rows(a, rows, D), s),
          lambda whole, part: jax.tree.map(lambda a, p: rules.put_lead_rows(a, p, rows, D),
                                           whole, part))


def prompt_history(length: int, tokens_RT: jax.Array, start, before_1N=None) -> jax.Array:
  """Prompt rows' token histories [R, length]: tokens_RT at positions start..; before `start`
  (a prompt continuing a cached prefix) the row `before_1N`."""
  R, T = tokens_RT.shape
  at_N = jnp.arange(length, dtype=jnp.int32) - start
  inside_N = (at_N >= 0) & (at_N < T)
  history_RN = jnp.where(inside_N, jnp.take(tokens_RT, jnp.clip(at_N, 0, T - 1), axis=1), 0)
  return history_RN if before_1N is None else jnp.where(at_N < 0, before_1N, history_RN)


def prefilled(first_R, lengths_R, sampling: Sampling, keys_R, history_RN) -> Slots:
  """The rows of prompts of `lengths_R` tokens whose prefill made `first_R`."""
  at_RN = jnp.arange(history_RN.shape[-1])[None, :] == lengths_R[:, None]
  history_RN = jnp.where(at_RN, first_R[:, None], history_RN)
  sampling = dataclasses.replace(sampling, allowed=None)  # each step is given its own
  return Slots(first_R, lengths_R, jnp.ones_like(lengths_R), sampling, keys_R, history_RN,
               lengths_R)


def with_mask(rows: Slots, allowed: tuple) -> Slots:
  """`rows` whose next choice may take only the tokens of `allowed` ((mask [B, W],), packed
  as `sampling.allow` reads it; (): any token)."""
  if not allowed:
    return rows
  return dataclasses.replace(rows, sampling=dataclasses.replace(rows.sampling,
                                                                allowed=allowed[0]))


def as_rows(chosen, rows: int, lead: int):
  """`chosen` ([n, R, ...] when lead = 2, else [R, ...]) as [rows, ...]."""
  return jax.tree.map(lambda a: a.reshape(rows, *a.shape[lead:]), chosen)


def advance(slots: Slots, tokens_B: jax.Array, length: int, at_B: jax.Array | None = None
            ) -> Slots:
  """The rows after one step made `tokens_B`, written into their histories at `at_B` (by
  default each row's next position; one outside the row: not written). A row past its
  request's end (the host drops its token) stays inside the cache."""
  at_B = slots.positions + 1 if at_B is None else at_B
  history = jnp.where(jnp.arange(slots.history.shape[-1])[None, :] == at_B[:, None],
                      tokens_B[:, None], slots.history)
  return dataclasses.replace(slots, tokens=tokens_B, counts=slots.counts + 1,
                             positions=jnp.minimum(slots.positions + 1, length - 1),
                             history=history)


def advance_by(slots: Slots, tokens_BT: jax.Array, made_B: jax.Array, limit: int) -> Slots:
  """The rows after a pass that made `made_B[b]` tokens each (the first of row b of
  tokens_BT, 1 <= made_B <= T), written into their histories after their positions; a row's
  position stops at `limit` (a row past its request's end: the host drops its tokens)."""
  T, N = tokens_BT.shape[1], slots.history.shape[-1]
  at_BN = jnp.arange(N, dtype=jnp.int32)[None, :] - (slots.positions[:, None] + 1)
  new_BN = jnp.take_along_axis(tokens_BT, jnp.clip(at_BN, 0, T - 1), axis=1)
  history = jnp.where((at_BN >= 0) & (at_BN < made_B[:, None]), new_BN, slots.history)
  last_B = jnp.take_along_axis(tokens_BT, (made_B - 1)[:, None], axis=1)[:, 0]
  return dataclasses.replace(slots, tokens=last_B, counts=slots.counts + made_B,
                             positions=jnp.minimum(slots.positions + made_B, limit),
                             history=history)


def base_keys(seeds_R: jax.Array, rows_R: jax.Array) -> jax.Array:
  """Key data [R, ...] of key(seed), folded with the prompt row where it is >= 0."""
  def one(seed, row):
    key = jax.random.key(seed)
    with_row = jax.random.fold_in(key, jnp.maximum(row, 0))
    return jnp.where(row >= 0, jax.random.key_data(with_row), jax.random.key_data(key))
  return jax.vmap(one)(seeds_R, rows_R)


def token_keys(keys_B: jax.Array, counts_B: jax.Array) -> jax.Array:
  """The key of each row's token number `counts_B[b]` (0: the first)."""
  return jax.vmap(lambda k, n: jax.random.fold_in(jax.random.wrap_key_data(k), n))(
      keys_B, counts_B)


def request_keys(seeds_B: jax.Array, counts_B: jax.Array) -> jax.Array:
  """The key of token number `counts_B[b]` of the request seeded `seeds_B[b]` (no row)."""
  return token_keys(base_keys(seeds_B, jnp.full(seeds_B.shape, -1, jnp.int32)), counts_B)


def choose(logits_BV: jax.Array, keys_B: jax.Array, context: Context, sampling: Sampling, *,
           greedy: bool, logprobs: bool = False):
  """Next tokens [B]: the likeliest (`greedy`: every row greedy, nothing adjusts the
  logits), or per row after `sampling`'s biases and penalties, greedy or drawn. With
  `logprobs`: (tokens, their `LogProbs`, of the logits as the model gave them)."""
  if greedy:
    tokens_B = likeliest(logits_BV)
  else:
    adjusted_BV = adjust(logits_BV, sampling, context)
    if sampling.allowed is not None:  # a grammar's mask
      adjusted_BV = allow(adjusted_BV, sampling.allowed)
    tokens_B = sample(adjusted_BV, token_keys(keys_B, context.made), sampling)
  if not logprobs:
    return tokens_B
  return tokens_B, log_probs(logits_BV, tokens_B)


PROMPT_CHUNK = 256  # prompt positions whose logits a prefill computes at once (echo)


def prompt_log_probs(head, y_RTD: jax.Array, tokens_RT: jax.Array, echo_R: jax.Array, *,
                     like=lambda zeros: zeros):
  """`LogProbs` [R, T] of each prompt's tokens 1..T (entry t: of token t + 1, given those up
  to t), from the prefill's last hidden states [R, T, D] through the model's `head`, a chunk
  of positions at a time (the logits of a whole prompt would not fit); zeros unless a row
  asks (`echo_R`), made `like` the scores (inside a pipeline's stages: varying)."""
  R, T, D = y_RTD.shape
  C = next(c for c in range(min(T, PROMPT_CHUNK), 0, -1) if T % c == 0)
  next_RT = jnp.concatenate([tokens_RT[:, 1:], jnp.zeros((R, 1), tokens_RT.dtype)], axis=1)

  def chunk(args):
    y_RCD, next_RC = args
    lp = log_probs(head(y_RCD).reshape(R * C, -1), next_RC.reshape(R * C))
    return jax.tree.map(lambda a: a.reshape(R, C, *a.shape[1:]), lp)

  def score():
    by_chunk = lambda a: a.reshape(R, T // C, C, *a.shape[2:]).swapaxes(0, 1)
    out = lax.map(chunk, (by_chunk(y_RTD), by_chunk(next_RT)))
    return jax.tree.map(lambda a: a.swapaxes(0, 1).reshape(R, T, *a.shape[3:]), out)
  return lax.cond(jnp.any(echo_R), score, lambda: like(blank_prompt((R,), T)))


def blank_prompt(lead: tuple, T: int) -> LogProbs:
  """Zeros shaped like `prompt_log_probs`' result for rows `lead`."""
  return blank_chosen((*lead, T), True)[1]


def blank_first(lead: tuple, bucket: int, *, logprobs: bool, echo: bool):
  """Zeros shaped like a prefill's first tokens (and their log-probabilities, and with echo
  the prompts')."""
  chosen = blank_chosen(lead, logprobs)
  return (*chosen, blank_prompt(lead, bucket)) if echo else chosen


def chosen_tokens(chosen) -> jax.Array:
  """The tokens of what `choose` returned."""
  return chosen[0] if isinstance(chosen, tuple) else chosen


def blank_chosen(lead: tuple, logprobs: bool):
  """Zeros shaped like `choose`'s result for rows `lead` (e.g. (groups, rows))."""
  tokens = jnp.zeros(lead, jnp.int32)
  if not logprobs:
    return tokens
  top = (*lead, TOP_LOGPROBS)
  return tokens, LogProbs(jnp.zeros(lead, jnp.float32), jnp.zeros(top, jnp.int32),
                          jnp.zeros(top, jnp.float32))


def cache_spec(gen, batch: int, length: int) -> dict:
  """{leaf: (shape, logical names, dtype)} of one layer's cache."""
  m = gen.config.model
  return {k: cache_leaf(v, m) for k, v in
          gen.family.kv_cache(m, gen.layout, batch, length).items()}


def new_caches(gen, batch: int, length: int, *, scan: bool) -> object:
  """Zeroed KV caches laid out by the rules: stacked [L, ...] for a scan, else one per layer
  (each leaf in the dtype its spec gives)."""
  spec, L = cache_spec(gen, batch, length), gen.config.model.n_layers
  if scan:
    return {k: constrain(jnp.zeros((L, *shape), dtype), (LAYERS, *names))
            for k, (shape, names, dtype) in spec.items()}
  return tuple({k: constrain(jnp.zeros(shape, dtype), names)
                for k, (shape, names, dtype) in spec.items()} for _ in range(L))


def copy_rows(caches, src, count: int, *, axis: int, split: bool):
  """Rows src..src+count-1 of every cache. Rows `split` over devices: a masked sum over the
  rows (one row only), so each device reads its own and one row is all-reduced (a dynamic
  slice would all-gather every row)."""
  def take(c):
    if not split:
      return lax.dynamic_slice_in_dim(c, src, count, axis=axis)
    mine = lax.broadcasted_iota(jnp.int32, c.shape, axis) == src
    return jnp.sum(jnp.where(mine, c, 0), axis=axis, keepdims=True, dtype=c.dtype)
  return jax.tree.map(take, caches)


# ---- a decoder's zeroed state (`d`: a `decoder.Decoder`) ----

def zeroed_state(d) -> State:
  """The zeroed state, traced."""
  g = d.generator
  if not d.pipelined:
    with use_rules(g.rules, keys=g.family.config_keys):
      return State(new_caches(g, d.slots, d.positions, scan=d.scan),
                   empty_slots_of(d, d.slots))

  def stage_local():
    caches = {k: ring.varying(constrain(jnp.zeros((d.Lc, d.G, *shape), dtype),
                                        (None, None, *names)))
              for k, (shape, names, dtype) in cache_spec(g, d.Bg, d.positions).items()}
    msg = constrain(jnp.zeros((1, d.Bg, 1, d.width), d.dtype),
                    (None, BATCH, SEQ, ACT_EMBED))
    token = constrain(jnp.zeros((1, d.Bg), jnp.int32), (None, BATCH))
    return caches, ring.varying(msg), ring.varying(token)
  with use_rules(g.rules, keys=g.family.config_keys):
    caches, msg, token = ring.shard(stage_local, mesh=g.mesh, in_specs=(),
                                    out_specs=(d.cache_specs(), P(STAGE), P(STAGE)))()
  none = jnp.zeros((d.slots,), bool)
  return State(caches, empty_slots_of(d, d.slots),
               Ring(empty_slots_of(d, d.slots), none, none, msg, token))


def empty_slots_of(d, rows: int) -> Slots:
  return empty_slots(rows, d.length, d.bias)


def zero_rows(d, R: int):
  """Zeroed caches of R rows, as one stage's layers of decoder `d` hold them."""
  g = d.generator
  if not d.pipelined:
    return new_caches(g, R, d.positions, scan=d.scan)
  return ring.varying({k: jnp.zeros((d.Lc, *shape), dtype) for k, (shape, _, dtype) in
                       cache_spec(g, R, d.positions).items()})


def source_row(d, caches, src):
  """Row `src` of decoder `d`'s caches (a stage's, on a pipeline: row src % Bg of group
  src // Bg), laid out as `zero_rows(d, 1)`: a cached prefix that a prompt continues."""
  split = d.data_ways > 1
  if not d.pipelined:
    return copy_rows(caches, src, 1, axis=int(d.scan), split=split)
  return copy_rows(ring.pick(caches, src // d.Bg, axis=1), src % d.Bg, 1, axis=1, split=split)


def put_rows(d, caches, rows, slot, valid):
  """`rows` (whole rows) into slots slot.. of decoder `d`'s `caches` (None: the rows are the
  caches); on a pipeline only where `valid`."""
  if caches is None:
    return rows
  if not d.pipelined:
    axis = int(d.scan)  # a scan's caches are stacked [L, B, ...]
    return jax.tree.map(lambda c, r: lax.dynamic_update_slice_in_dim(c, r, slot, axis=axis),
                        caches, rows)

  def put(c, r):  # [Lc, G, Bg, ...] <- [Lc, R, ...] at group slot // Bg, row slot % Bg
    update = r[:, None].astype(c.dtype)
    at = (0, slot // d.Bg, slot % d.Bg) + (0,) * (c.ndim - 3)
    old = lax.dynamic_slice(c, at, update.shape)
    return lax.dynamic_update_slice(c, jnp.where(valid, update, old), at)
  return jax.tree.map(put, caches, rows)


def state_program(d):
  """The compiled program that makes the zeroed state: the rows split like the batch without
  stages; on a pipeline the caches over `stage` (the ring's out_specs) and the rows
  replicated (the groups cut them differently)."""
  g, shardings = d.generator, None
  if not d.pipelined:
    spec = {k: names for k, (_, names, _) in cache_spec(g, d.slots, d.positions).items()}
    sharding = lambda names: g.rules.sharding(names, g.mesh, what="the KV cache")
    if d.scan:
      caches = {k: sharding((LAYERS, *names)) for k, names in spec.items()}
    else:
      caches = tuple({k: sharding(names) for k, names in spec.items()}
                     for _ in range(g.config.model.n_layers))
    rows = g.rules.sharding((BATCH,), g.mesh, what="decoder slots")
    shardings = State(caches, jax.tree.map(lambda _: rows, empty_slots_of(d, 1)))
  with jax.set_mesh(g.mesh):
    return jax.jit(lambda: zeroed_state(d), out_shardings=shardings).lower().compile()


# ---- a pipeline's rows around a speculating round (`speculative.round_fn`) ----

def rewound(d, state: State) -> State:
  """On a pipeline, the rows whose entry is still in the ring after a step (`late` rows, kept:
  their state is one token past it) set back to that entry (its token at the position before,
  one draw fewer), which the round computes again; elsewhere `state`."""
  if not d.pipelined:
    return state
  s = state.slots
  back_B = (jnp.asarray(d.late()) & state.ring.keep).astype(jnp.int32)
  before_B = jnp.take_along_axis(s.history, jnp.maximum(s.positions - 1, 0)[:, None], axis=1)
  slots = dataclasses.replace(s, tokens=jnp.where(back_B > 0, before_B[:, 0], s.tokens),
                              positions=s.positions - back_B, counts=s.counts - back_B)
  return dataclasses.replace(state, slots=slots)


def drained(r):
  """A pipeline's ring after a pass that computed every row to its new position (an entry
  still in flight from a step before was computed again, as its first token): nothing in
  flight is kept, and every row's next input is its own last token."""
  return dataclasses.replace(r, keep=jnp.zeros_like(r.keep), fresh=jnp.ones_like(r.fresh))
