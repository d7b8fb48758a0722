"""Choosing the next token from logits (greedy, temperature, top-k, top-p, min-p; logit biases
and repetition, frequency and presence penalties first), and the log-probabilities of what
was chosen and of its likeliest alternatives.

The order is vLLM's: biases (`logit_bias`, and the bans that keep a row's stop tokens out
until it has made `min_tokens`), then penalties, then temperature, then min-p, top-k and
top-p. Log-probabilities are the model's own (before any of these).

Random draws are keyed by (seed, prompt row, step) only, never by device or pipeline group,
so the same seed gives the same tokens on every mesh.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxpar.axes import BATCH, VOCAB
from jaxpar.rules import active_rules, constrain

TOP_LOGPROBS = 20  # the most alternatives a token's log-probabilities give (OpenAI's limit)


NO_TOKEN = -1  # an unused entry of `Bias`
BAN = -1e30  # the bias that keeps a token out


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Bias:
  """Per row, K entries [B, K]: add `values` to the logits of tokens `ids` while the row has
  made fewer than `until` tokens (`logit_bias`: always; a `min_tokens` ban: until then); id
  NO_TOKEN: an unused entry."""
  ids: jax.Array
  values: jax.Array
  until: jax.Array


@jax.tree_util.register_dataclass  # a program argument too (the server's per-row settings)
@dataclasses.dataclass(frozen=True)
class Sampling:
  """How tokens are chosen: numbers (one setting for every row) or arrays [B] (one per row).
  Each default changes nothing."""
  temperature: float = 0.0  # 0: greedy (argmax)
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0  # drop tokens less likely than min_p times the likeliest
  presence: float = 0.0  # subtracted from the logit of each token made already
  frequency: float = 0.0  # ... times the number of times it was made
  repetition: float = 1.0  # divides positive (multiplies negative) logits of tokens seen
  bias: Bias | None = None
  # [B, W] int32: the tokens a row's grammar allows next, packed (`allow`); None: all.
  allowed: jax.Array | None = None

  def rows(self, B: int) -> "Sampling":
    """These settings as arrays [B] (float32, int32), one per row; bias and mask as they
    are."""
    full = lambda name: np.full(B, getattr(self, name),
                                np.int32 if name == "top_k" else np.float32)
    return Sampling(**{f.name: full(f.name) for f in dataclasses.fields(self)
                       if f.name not in ("bias", "allowed")}, bias=self.bias,
                    allowed=self.allowed)

  def adjusts(self) -> bool:
    """Whether anything changes the logits before temperature (biases, penalties)."""
    return self.bias is not None or _per_row(self) or (
        self.presence != 0 or self.frequency != 0 or self.repetition != 1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Context:
  """What penalties need of each row [B]: its tokens by position [B, N] (the prompt's at
  0..start-1, then what it made), where its output starts, the position of its last token
  (later ones are not counted) and how many tokens it has made."""
  history: jax.Array
  starts: jax.Array
  positions: jax.Array
  made: jax.Array


def row_keys(key: jax.Array, rows_B: jax.Array, step) -> jax.Array:
  """One key per row [B] for decode step `step`: fold_in(fold_in(key, row), step)."""
  return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(key, r), step))(rows_B)


def _order_key(x: jax.Array) -> jax.Array:
  """float32 -> uint32 with the same order (so thresholds can be searched bit by bit)."""
  i = lax.bitcast_convert_type(x, jnp.int32)
  u = lax.bitcast_convert_type(i, jnp.uint32)
  return jnp.where(i < 0, ~u, u | jnp.uint32(0x80000000))


def _search(count_ok, like_B: jax.Array, *, largest: bool) -> jax.Array:
  """Per row, the largest (or smallest) uint32 key u with count_ok(u) true, by bisection
  over its 32 bits (`like_B`: any uint32 [B] of the data); `count_ok` is monotone. Every
  step is a masked sum over the vocabulary, which a vocabulary split over `model` turns into
  an all-reduce: no sort, no gather (a sort
  of a split vocabulary needs collective-permutes, which deadlock inside the pipeline's
  last-stage `lax.cond`)."""
  lo = like_B & jnp.uint32(0)  # made from the data, so a shard_map's loop carry matches it
  hi = lo | jnp.uint32(0xFFFFFFFF)

  def step(_, bounds):
    lo, hi = bounds
    half = (hi - lo) // 2
    if largest:  # invariant: count_ok(lo)
      mid = lo + half + ((hi - lo) & 1)
      ok = count_ok(mid)
      return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)
    mid = lo + half  # invariant: count_ok(hi)
    ok = count_ok(mid)
    return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

  lo, hi = lax.fori_loop(0, 32, step, (lo, hi))
  return lo if largest else hi


def likeliest(logits_BV: jax.Array) -> jax.Array:
  """The likeliest token of each row [B] (the first of equals, as `jnp.argmax`): the maximum,
  then the least column that holds it. Two plain reductions; XLA:CPU runs `jnp.argmax`'s
  paired value-and-index reduction 3x slower at a decode step's shape."""
  V = logits_BV.shape[-1]
  top_B1 = jnp.max(logits_BV, axis=-1, keepdims=True)
  column_V = jnp.arange(V, dtype=jnp.int32)
  first_B = jnp.min(jnp.where(logits_BV == top_B1, column_V, V - 1), axis=-1)
  return first_B.astype(jnp.int32)


def sample(logits_BV: jax.Array, keys_B: jax.Array, s: Sampling) -> jax.Array:
  """Next tokens [B] from float32 logits (padding columns already at the float minimum), row
  b drawn with key `keys_B[b]`. `s` holds numbers (one setting for every row, what the
  program is compiled for) or arrays [B] (a setting per row: the serving engine's slots;
  temperature 0 is greedy, top_k 0 and top_p 1 filter nothing)."""
  per_row = _per_row(s)
  if not per_row and s.temperature == 0:
    return likeliest(logits_BV)
  draw = lambda key, logits_V: jax.random.categorical(key, logits_V)
  drawn_B = jax.vmap(draw)(keys_B, filter_logits(logits_BV, s)).astype(jnp.int32)
  if not per_row:
    return drawn_B
  greedy_B = likeliest(logits_BV)
  return jnp.where(s.temperature == 0, greedy_B, drawn_B)


def _per_row(s: Sampling) -> bool:
  return any(isinstance(v, (jax.Array, np.ndarray))
             for v in jax.tree.leaves(dataclasses.replace(s, bias=None, allowed=None)))


def adjust(logits_BV: jax.Array, s: Sampling, c: Context) -> jax.Array:
  """The logits after `s`'s biases and penalties (vLLM's semantics): repetition over the
  tokens of the prompt and the output, frequency and presence over the output's. Counted
  per row by a scatter of its history into its own shard of the vocabulary (no collective)."""
  low = jnp.finfo(jnp.float32).min
  if s.bias is not None:
    values = jnp.where(c.made[:, None] < s.bias.until, s.bias.values, 0.0)
    logits_BV = jnp.maximum(add_at(logits_BV, s.bias.ids, values), low)
  if not (_per_row(s) or s.presence or s.frequency or s.repetition != 1):
    return logits_BV
  column = lambda v: jnp.reshape(jnp.asarray(v, jnp.float32), (-1, 1))
  at_N = jnp.arange(c.history.shape[-1], dtype=jnp.int32)
  made_BN = (at_N >= c.starts[:, None]) & (at_N <= c.positions[:, None])
  prompt_BN = at_N < c.starts[:, None]
  zeros = jnp.zeros_like(logits_BV)
  counts_BV = add_at(zeros, c.history, made_BN.astype(jnp.float32))
  seen_BV = (add_at(zeros, c.history, prompt_BN.astype(jnp.float32)) > 0) | (counts_BV > 0)
  r = column(s.repetition)
  logits_BV = jnp.where(seen_BV, jnp.where(logits_BV > 0, logits_BV / r, logits_BV * r),
                        logits_BV)
  logits_BV = logits_BV - column(s.frequency) * counts_BV - column(s.presence) * (counts_BV > 0)
  return jnp.maximum(logits_BV, low)


def add_at(x_BV: jax.Array, ids_BK: jax.Array, values_BK: jax.Array) -> jax.Array:
  """x with values_BK[b, k] added at x[b, ids_BK[b, k]] (ids outside [0, V) dropped). With
  the vocabulary split, each device adds what falls in its own columns (a scatter whose
  operand is split makes XLA's partitioner gather the indices)."""
  def local(x, first, ids, values):
    W = x.shape[-1]
    ids = ids - first
    ids = jnp.where((ids >= 0) & (ids < W), ids, W)  # W: dropped
    rows_B1 = jnp.arange(x.shape[0], dtype=jnp.int32)[:, None]
    return x.at[rows_B1, ids].add(values.astype(x.dtype), mode="drop")
  return _own_columns(local, x_BV, ids_BK, values_BK)


def allow(logits_BV: jax.Array, allowed_BW: jax.Array) -> jax.Array:
  """The logits with each token a row's mask leaves out at the float minimum: token t is
  allowed when bit t % 32 of the row's word t // 32 is set (columns past 32 W, the padding,
  are already at the minimum). With the vocabulary split, each device unpacks the words of
  its own columns from the whole mask (a row's mask is V / 8 bytes)."""
  def local(x, first, words):
    column = jnp.arange(x.shape[-1], dtype=jnp.int32) + first
    word = jnp.take(words, column // 32, axis=1, mode="fill", fill_value=-1)
    return jnp.where((word >> (column % 32)) & 1 == 1, x, jnp.finfo(jnp.float32).min)
  return _own_columns(local, logits_BV, allowed_BW)


def _own_columns(local, x_BV: jax.Array, *per_row: jax.Array) -> jax.Array:
  """`local(x, first, *per_row)` on each device's rows of x [B, V] and its own columns of
  the vocabulary (`first`: the first one's index), with `per_row` [B, ...] whole per row:
  by hand (a nested `shard_map`), under the active rules and mesh."""
  rows, split = _vocab_axes()

  def run(x, *args):
    return local(x, lax.axis_index(split) * x.shape[-1] if split else 0, *args)
  if not (rows or split):
    return run(x_BV, *per_row)
  row, both = P(rows or None), P(rows or None, split or None)
  return jax.shard_map(run, in_specs=(both, *[row] * len(per_row)), out_specs=both,
                       axis_names=set(rows) | set(split))(x_BV, *per_row)


def filter_logits(logits_BV: jax.Array, s: Sampling) -> jax.Array:
  """Logits / temperature, with the tokens min-p, top-k and top-p drop set to the float
  minimum: min-p keeps the tokens at least min_p times as likely as the likeliest; top-k
  keeps the k likeliest (ties included); top-p keeps the smallest set of likeliest tokens
  whose mass reaches top_p (always the top token). Settings per row ([B] arrays) are all
  applied; a row's min_p 0, top_k 0 or top_p 1 keeps every token."""
  per_row = _per_row(s)
  column = lambda v: jnp.reshape(jnp.asarray(v), (-1, 1))  # [1, 1] or [B, 1]
  temperature = column(s.temperature).astype(jnp.float32)
  logits_BV = logits_BV / jnp.where(temperature > 0, temperature, 1.0)
  low = jnp.finfo(jnp.float32).min
  if per_row or s.min_p:
    min_p = column(s.min_p).astype(jnp.float32)
    floor_B1 = jnp.max(logits_BV, axis=-1, keepdims=True) + jnp.log(min_p)  # -inf at 0
    logits_BV = jnp.where(logits_BV >= floor_B1, logits_BV, low)
  # Each search runs only when a row asks for it (per row: under a `lax.cond`, skipped
  # when none does, as OpenAI's default top_p 1 asks nothing).
  when = lambda asks, fn, x: lax.cond(jnp.any(asks), fn, lambda x: x, x) if per_row else fn(x)
  if per_row or s.top_k:
    top_k = column(s.top_k)[:, 0]
    top_k = jnp.where(top_k > 0, top_k, logits_BV.shape[-1])

    def by_top_k(logits_BV):
      keys_BV = _order_key(logits_BV)
      kth_B = _search(lambda u: jnp.sum(keys_BV >= u[:, None], axis=-1) >= top_k,
                      keys_BV[:, 0], largest=True)
      return jnp.where(keys_BV >= kth_B[:, None], logits_BV, low)
    logits_BV = when(top_k < logits_BV.shape[-1], by_top_k, logits_BV)
  if per_row or s.top_p < 1:
    top_p = column(s.top_p)[:, 0]

    def by_top_p(logits_BV):
      keys_BV, probs_BV = _order_key(logits_BV), jax.nn.softmax(logits_BV, axis=-1)
      # The smallest key whose strictly likelier tokens hold less than top_p of the mass.
      above = lambda u: jnp.sum(jnp.where(keys_BV > u[:, None], probs_BV, 0.0), axis=-1)
      cut_B = _search(lambda u: above(u) < top_p, keys_BV[:, 0], largest=False)
      cut_B = jnp.where(top_p < 1, cut_B, jnp.uint32(0))
      return jnp.where(keys_BV >= cut_B[:, None], logits_BV, low)
    logits_BV = when(top_p < 1, by_top_p, logits_BV)
  return logits_BV


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LogProbs:
  """Log-probabilities under the model's distribution (log-softmax of the logits, before
  temperature and filtering, as vLLM reports them): of each row's chosen token [B], and the
  TOP_LOGPROBS likeliest tokens [B, K] (ids and values, likeliest first)."""
  token: jax.Array
  top_ids: jax.Array
  top: jax.Array


def log_probs(logits_BV: jax.Array, tokens_B: jax.Array, *,
              k: int = TOP_LOGPROBS) -> LogProbs:
  """`LogProbs` of float32 logits (padding columns at the float minimum), the vocabulary split
  over the mesh as the active rules split it. Split, the normaliser and the chosen column are
  reductions (all-reduces of [B]); each shard takes the top k of its own
  columns and only those split * k candidates of a row are gathered (one all-gather, the
  ids bit-cast beside the values), never the row. The collectives run one after another,
  after the token is chosen (`lax.optimization_barrier`): XLA:CPU runs independent
  collectives in any order on each device, and devices that pick different orders wait
  for each other forever."""
  B, V = logits_BV.shape
  logits_BV, tokens_B = lax.optimization_barrier((logits_BV, tokens_B))
  lse_B = jax.nn.logsumexp(logits_BV, axis=-1)
  logits_BV, lse_B = lax.optimization_barrier((logits_BV, lse_B))
  chosen_BV = jnp.arange(V, dtype=jnp.int32) == tokens_B[:, None]
  token_B = jnp.sum(jnp.where(chosen_BV, logits_BV, 0.0), axis=-1) - lse_B
  logits_BV, token_B = lax.optimization_barrier((logits_BV, token_B))
  rows_axes, split_axes = _vocab_axes()
  split = math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in split_axes)
  if split == 1:
    top_Bk, ids_Bk = lax.top_k(logits_BV, k)
    return LogProbs(token_B, ids_Bk, top_Bk - lse_B[:, None])
  shards_BMW = constrain(logits_BV.reshape(B, split, V // split), (BATCH, VOCAB, None))
  top_BMk, local_BMk = _shard_top_k(shards_BMW, k, rows_axes, split_axes)
  ids_BMk = local_BMk + (jnp.arange(split, dtype=jnp.int32) * (V // split))[None, :, None]
  both_BMk2 = jnp.stack([top_BMk, lax.bitcast_convert_type(ids_BMk, jnp.float32)], axis=-1)
  both_BMk2 = constrain(both_BMk2, (BATCH, None, None, None))
  top_Bn, ids_Bn = both_BMk2[..., 0].reshape(B, split * k), lax.bitcast_convert_type(
      both_BMk2[..., 1], jnp.int32).reshape(B, split * k)
  top_Bk, at_Bk = lax.top_k(top_Bn, k)
  ids_Bk = jnp.take_along_axis(ids_Bn, at_Bk, axis=-1)
  return LogProbs(token_B, ids_Bk, top_Bk - lse_B[:, None])


def _vocab_axes() -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(the automatic mesh axes the rows are split over, those the vocabulary is split over),
  under the active rules and mesh (inside the ring's shard_map `stage` is manual)."""
  mesh, rules = jax.sharding.get_abstract_mesh(), active_rules()
  auto = {n for n, t in zip(mesh.axis_names, mesh.axis_types)
          if t != jax.sharding.AxisType.Manual and mesh.shape[n] > 1}
  return tuple(tuple(a for a in rules.mesh_axes(name) if a in auto) for name in (BATCH, VOCAB))


def _shard_top_k(x_BMW: jax.Array, k: int, rows: tuple, split: tuple):
  """`lax.top_k` over the last dim, each device on its own rows and its own shard of the
  middle dim (split like the vocabulary): by hand, since XLA's partitioner gathers a
  top-k's operand whichever dim is split."""
  spec = P(rows or None, split)
  return jax.shard_map(lambda x: tuple(lax.top_k(x, k)), in_specs=spec, out_specs=(spec, spec),
                       axis_names=set(rows) | set(split))(x_BMW)
