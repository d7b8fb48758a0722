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

from jaxpar.axes import LAYERS
from jaxpar.models.base import cache_leaf
from jaxpar.rules import constrain
from jaxpar.runtime.sampling import (NO_TOKEN, TOP_LOGPROBS, Bias, Context, LogProbs, Sampling,
                                     adjust, likeliest, log_probs, sample)


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
    tokens_B = sample(adjust(logits_BV, sampling, context),
                      token_keys(keys_B, context.made), sampling)
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
