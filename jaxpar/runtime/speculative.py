"""Speculative decoding: proposers of the next k tokens of every row of a slot decoder
(`decoder.Decoder`, `d` below), and `verify_fn`, its program that checks them in one pass of
the model (greedy: the output is the same token for token, whatever is proposed; a good
proposer only makes more tokens per pass). On a pipeline each pass is a trip of the stage
ring (`_staged_pass`: the groups one after another, GPipe) and every round checks; a round
between a server's ring steps first sets rows whose entry is still in the ring back to it
(`slots.rewound`) and leaves nothing in flight (`slots.drained`).

    ngram   prompt lookup: the tokens that followed the latest earlier occurrence of the row's
            longest suffix of ngram_max..ngram_min tokens, in its own prompt and output; no
            model. Without stages, a round where fewer than half the unfinished rows have a
            match runs a plain one-token step instead.
    draft   a smaller model with the same vocabulary (its own slot decoder and KV cache, on
            the same mesh): k greedy steps of it (`propose_fn`).
    self    the target itself as the draft (tests: every proposal is accepted).
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxpar.axes import STAGE
from jaxpar.errors import UserError
from jaxpar.models.base import Step
from jaxpar.runtime.sampling import Context, Sampling, adjust, filter_logits, likeliest
from jaxpar.parallel import ring
from jaxpar.runtime.slots import (State, advance_by, as_rows, drained, lead_count, lead_rows,
                                  rewound, token_keys)


@dataclasses.dataclass(frozen=True)
class Speculation:
  """How `Generator.generate` speculates (`generate.speculation` makes it from
  `config.speculative`, the draft's generator built): method none | ngram | draft | self."""
  method: str = "none"
  k: int = 4
  ngram_min: int = 2
  ngram_max: int = 3
  draft: object = None  # the draft's `Generator` (method draft or self)

  @property
  def on(self) -> bool:
    return self.method != "none"

  @property
  def uses_draft(self) -> bool:
    return self.method in ("draft", "self")

  def key(self) -> tuple:
    """What the compiled programs depend on."""
    return (self.method, self.k, self.ngram_min, self.ngram_max, id(self.draft))


def _placed(d, positions_B, T: int, span: int) -> tuple[jax.Array, jax.Array]:
  """(positions_BT, mask_BTS) of each row's T tokens at cache slots positions_B..: each query
  sees the first `span` slots up to its own. Past the model's positions only tokens whose
  results no row keeps (speculated past its request's end): any position there gives
  finite values."""
  slots_BT = positions_B[:, None] + jnp.arange(T, dtype=jnp.int32)
  mask_BTS = jnp.arange(span)[None, None, :] <= slots_BT[:, :, None]
  return jnp.minimum(slots_BT, d.generator.config.model.max_seq_len - 1), mask_BTS


def _pass(d, parts, caches, tokens_BT, positions_B, span: int, lead: int = 0):
  """Each row's T tokens at positions positions_B.. through every layer of decoder `d`, their
  keys and values written there (`_placed`): (logits_BTV, caches). `lead` > 0: the rows are
  the first `lead` of each data group."""
  model, graphdef, layers = parts
  positions_BT, mask_BTS = _placed(d, positions_B, tokens_BT.shape[1], span)
  x_BTD = model.embed(tokens_BT, positions_BT)
  step = Step(positions_BT, mask_BTS, positions_B, lead, d.data_ways)
  y_BTD, caches = d._layers(graphdef, layers, x_BTD, step, caches)
  return model.head(y_BTD), caches


def _staged_pass(d, span: int, finish, *, everywhere: bool = False):
  """On pipelined decoder `d`: (params, caches, tokens_BT, positions_B, extra) -> (out,
  caches), each row's T tokens at positions positions_B.. through every stage (its groups
  through the stage ring one after another, GPipe: G + S - 1 ticks), keys and values written
  there; `out` is `finish(logits_BTV, extra)` of each group's rows at the last stage (extra's
  leaves [B, ...] too). A bubble tick writes its group's trash entries: the T slots that end
  at slot `d.length`, which hold no entry a kept token reads (a row stops k + 1 slots short
  of `d.length`, `verify_fn`). `everywhere`: every stage computes `finish` (kept from the
  last), not the last alone in a `lax.cond` (whose branches must agree on their outputs'
  shardings: zeros and vocabulary-split logits do not)."""
  S, G, Bg = d.S, d.G, d.Bg
  made = {}  # the shapes of `finish`'s output, found while tracing

  def ticks(parts, caches, tokens_GBT, positions_GB, extra_G):
    model, graphdef, layers = parts
    T = tokens_GBT.shape[-1]
    x_like = jax.ShapeDtypeStruct((Bg, T, d.width), d.dtype)
    made["out"] = jax.eval_shape(lambda x, e: finish(model.head(x), e), x_like,
                                 ring.pick(extra_G, 0))
    blank = jax.tree.map(lambda a: jnp.zeros((G, *a.shape), a.dtype), made["out"])

    def tick(t, s, carry, msg):
      caches, out = carry
      i = t - s
      valid = (i >= 0) & (i < G)
      g = jnp.clip(i, 0, G - 1)
      positions_B = ring.pick(positions_GB, g)
      positions_BT, mask_BTS = _placed(d, positions_B, T, span)
      step = Step(positions_BT, mask_BTS, jnp.where(valid, positions_B, d.length))
      x_BTD = ring.first(s, lambda: model.embed(ring.pick(tokens_GBT, g), positions_BT), msg)
      y_BTD, new = d._layers(graphdef, layers, x_BTD, step, d._group(caches, g))
      caches = d._regroup(caches, g, new)
      compute = lambda: finish(model.head(y_BTD), ring.pick(extra_G, g))
      value = compute() if everywhere else ring.last(s, S, compute)
      return (caches, d._out(out, g, value, valid & (s == S - 1))), y_BTD
    msg = ring.varying(jnp.zeros((Bg, T, d.width), d.dtype))
    (caches, out), _ = ring.run(tick, (caches, blank), msg, ticks=G + S - 1, stages=S)
    return caches, ring.pack(out)[None]  # one buffer out
  spec = d.cache_specs()
  body = d._staged(ticks, in_specs=(spec, P(), P(), P()), out_specs=(spec, P(STAGE)))

  def run(params, caches, tokens_BT, positions_B, extra):
    group = lambda a: a.reshape(G, Bg, *a.shape[1:])
    caches, out = body(params, caches, group(tokens_BT), group(positions_B),
                       jax.tree.map(group, extra))
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct((G, *a.shape), a.dtype), made["out"])
    return as_rows(ring.unpack(out[S - 1], like), d.slots, 2), caches
  return run


def _accept(greedy: bool, k: int):
  """(logits_BTV, rows) -> (tokens_BT, made_B): what a row keeps of a pass over its token and
  k proposals (`verify_fn`); rows: (proposed_BK,) greedy, else (proposed_BK, keys_B,
  counts_B, sampling, its `Context`), the logits adjusted first (`adjusted`)."""
  def accept(logits_BTV, rows):
    proposed_BK = rows[0]
    if greedy:
      chosen_BT = likeliest(logits_BTV)
      agree_BK = (proposed_BK == chosen_BT[:, :k]).astype(jnp.int32)
      return chosen_BT, 1 + jnp.sum(jnp.cumprod(agree_BK, axis=1), axis=1)
    _, keys_B, counts_B, s, context = rows
    return accept_drawn(adjusted(logits_BTV, proposed_BK, s, context), proposed_BK, keys_B,
                        counts_B, s)
  return accept


def adjusted(logits_BTV: jax.Array, proposed_BK: jax.Array, s: Sampling,
             c: Context) -> jax.Array:
  """A pass's logits after `s`'s biases and penalties (`sampling.adjust`), position j of a
  row counting what one-token steps would: the row's tokens up to its position (c), then
  its first j proposals (its j-th token made, for a bias's `until`)."""
  B, T, V = logits_BTV.shape
  N = c.history.shape[-1]
  at_BN = jnp.arange(N, dtype=jnp.int32)[None, :] - (c.positions[:, None] + 1)
  ahead_BN = jnp.take_along_axis(proposed_BK, jnp.clip(at_BN, 0, T - 2), axis=1)
  history_BN = jnp.where((at_BN >= 0) & (at_BN < T - 1), ahead_BN, c.history)
  each = lambda a: jnp.repeat(a, T, axis=0) if jnp.ndim(a) else a  # [B, ...] -> [B * T, ...]
  j = jnp.tile(jnp.arange(T, dtype=jnp.int32), B)
  at_j = Context(each(history_BN), each(c.starts), each(c.positions) + j, each(c.made) + j)
  rows = jax.tree.map(each, dataclasses.replace(s, allowed=None))
  return adjust(logits_BTV.reshape(B * T, V), rows, at_j).reshape(B, T, V)


def verify_fn(d, *, k: int, span: int, greedy: bool = True, rows: int | None = None):
  """Decoder `d`'s check of proposals: each row's token and the k proposed after it enter in
  one pass (positions p..p+k, their keys and values written). `greedy`: the row keeps the
  longest run of proposals that equal the likeliest token after their predecessor, then the
  likeliest token after that run, exactly what one-token steps make; else each row by its
  sampling settings, by the rejection rule (`accept_drawn`: distributed as one-token steps'
  draws). (params, state, proposed_BK) -> ((tokens_BT, made_B), state), row b made
  tokens_BT[b, :made_B[b]] (1 <= made_B <= k + 1). Entries past a row's new position are no
  query's (masked) until the row writes over them. Needs `d.length` >= a row's last
  position + k + 1. `rows`: of the first `rows` rows of each data group only (`forward_fn`'s),
  the others untouched."""
  (take, put), lead = lead_rows(d, rows), lead_count(d, rows)
  accept, limit = _accept(greedy, k), d.length - 1 - k
  rows_of = lambda cur, proposed_BK: (proposed_BK,) if greedy else (
      proposed_BK, cur.keys, cur.counts, cur.sampling,
      Context(cur.history, cur.starts, cur.positions, cur.counts))
  entering = lambda cur, proposed_BK: jnp.concatenate([cur.tokens[:, None], proposed_BK], 1)
  if d.pipelined:  # greedy: the last stage keeps; sampled: the logits come out (drawing
    # inside the ring's last-stage `lax.cond` failed XLA's SPMD partitioner)
    through = (_staged_pass(d, span, accept) if greedy else _staged_pass(
        d, span, lambda logits_BTV, _: logits_BTV, everywhere=True))
    draw = d._plain(lambda parts, logits_BTV, rows: accept(logits_BTV, rows))

    def run(params, state, proposed_BK):
      cur = state.slots
      rows = rows_of(cur, proposed_BK)
      out, caches = through(params, state.caches, entering(cur, proposed_BK), cur.positions,
                            rows if greedy else ())
      tokens_BT, made_B = out if greedy else draw(params, out, rows)
      slots = advance_by(cur, tokens_BT, made_B, limit)
      return (tokens_BT, made_B), State(caches, slots, drained(state.ring))
    return run

  def body(parts, caches, slots, proposed_BK):
    cur = take(slots)
    logits_BTV, caches = _pass(d, parts, caches, entering(cur, proposed_BK), cur.positions,
                               span, lead)
    tokens_BT, made_B = accept(logits_BTV, rows_of(cur, proposed_BK))
    return (tokens_BT, made_B), caches, put(slots, advance_by(cur, tokens_BT, made_B, limit))
  body = d._plain(body)

  def run(params, state, proposed_BK):
    out, caches, slots = body(params, state.caches, state.slots, proposed_BK)
    return out, State(caches, slots)
  return run


def propose_fn(d, *, k: int, span: int, rows: int | None = None):
  """Decoder `d`'s model as a draft: k greedy proposals per row of a target decoder's rows
  `slots` (of its `rows`, as `verify_fn`'s), `d`'s caches kept in step with them. The row's
  last two tokens enter first (the one before the last is new here when the target kept
  every proposal), then each proposal but the last: (params, caches, slots) -> (proposed_BK,
  caches)."""
  take, lead = lead_rows(d, rows)[0], lead_count(d, rows)
  if d.pipelined:  # each pass a trip of the stage ring
    last = lambda logits_BTV, _: likeliest(logits_BTV[:, -1])
    passes = {T: _staged_pass(d, span, last) for T in (1, 2)}

    def through(params, caches, tokens_BT, positions_B):
      return passes[tokens_BT.shape[1]](params, caches, tokens_BT, positions_B, ())
  else:
    def through(parts, caches, tokens_BT, positions_B):
      logits_BTV, caches = _pass(d, parts, caches, tokens_BT, positions_B, span, lead)
      return likeliest(logits_BTV[:, -1]), caches

  def body(parts, caches, slots):
    cur = take(slots)
    at_B1 = jnp.maximum(cur.positions - 1, 0)[:, None]
    tokens_B2 = jnp.stack([jnp.take_along_axis(cur.history, at_B1, axis=1)[:, 0],
                           cur.tokens], axis=1)
    proposed, caches = through(parts, caches, tokens_B2, cur.positions - 1)
    proposed = [proposed]
    for j in range(1, k):  # unrolled: a loop carrying the caches made XLA:CPU copy them
      token_B, caches = through(parts, caches, proposed[-1][:, None], cur.positions + j)
      proposed.append(token_B)
    return jnp.stack(proposed, axis=1), caches
  return body if d.pipelined else d._plain(body)


def either(pred, on_true, on_false, state, blank):
  """(out, state) of `on_true(state)` where `pred`, else of `on_false(state)` (each returns
  (out, state); `blank`: zeros shaped like out), as two while loops of at most one trip:
  XLA:CPU copied every KV cache a `lax.cond` updates (each round), a loop updates its carry
  in place."""
  def once(fn, want, carry):
    def body(carry):
      out, state = fn(carry[2])
      return True, out, state
    return lax.while_loop(lambda c: ~c[0] & (pred == want), body, carry)
  _, out, state = once(on_false, False, once(on_true, True, (False, blank, state)))
  return out, state


def round_fn(d, spec: Speculation, *, span: int, greedy: bool, rows: int | None = None,
             draft=None, wrap=lambda fn, d: fn):
  """One round of decoder `d`'s rows (of its `rows`) with `spec`: the proposals (k steps of
  the `draft` decoder, or `ngram_proposals`) and their check (`verify_fn`). With ngram, a
  round where fewer than half the live rows have a match runs `d`'s one-token step instead.
  `wrap(fn, decoder)` wraps each program's function (`generate` carries its caches without
  their batch dim). (params, state, live_B, draft_params, draft_caches) -> ((tokens_BT,
  made_B, proposed_B), state, draft_caches): row b made tokens_BT[b, :made_B[b]] and had
  proposed_B[b] tokens checked (k or 0)."""
  k = spec.k
  verify = wrap(verify_fn(d, k=k, span=span, greedy=greedy, rows=rows), d)

  def check(params, state, proposed_BK):  # every row's k proposals checked
    (tokens_BT, made_B), state = verify(params, state, proposed_BK)
    return (tokens_BT, made_B, jnp.full(made_B.shape, k, jnp.int32)), state

  if spec.uses_draft:
    propose = wrap(propose_fn(draft, k=k, span=span, rows=rows), draft)

    def run(params, state, live_B, draft_params, draft_caches):
      state = rewound(d, state)
      proposed_BK, draft_caches = propose(draft_params, draft_caches, state.slots)
      return (*check(params, state, proposed_BK), draft_caches)
    return run

  take = lead_rows(d, rows)[0]
  guess = d._plain(lambda parts, slots: ngram_proposals(
      take(slots).history, take(slots).positions, k, spec.ngram_min, spec.ngram_max))
  if d.pipelined:  # every round checks (a one-token step would use the ring's own rounds)
    def run(params, state, live_B, draft_params, draft_caches):
      state = rewound(d, state)
      return (*check(params, state, guess(params, state.slots)[0]), draft_caches)
    return run
  step = wrap(d.step_fn(greedy=greedy, span=span, rows=rows), d)

  def plain(params, state):
    next_B, state = step(params, state)
    return (jnp.pad(next_B[:, None], ((0, 0), (0, k))), jnp.ones_like(next_B)), state

  def run(params, state, live_B, draft_params, draft_caches):
    proposed_BK, found_B = guess(params, state.slots)
    # A pass of k + 1 tokens per row costs more than a step of one (GPT-2 124M's products
    # at 5 tokens of one row on one CPU: 1.5-1.6x those at 1): checked when at least half
    # the live rows have a guess.
    checked = 2 * jnp.sum(found_B & live_B) >= jnp.maximum(jnp.sum(live_B), 1)
    B = found_B.shape[0]
    blank = (jnp.zeros((B, k + 1), jnp.int32), jnp.zeros((B,), jnp.int32))
    (tokens_BT, made_B), state = either(
        checked, lambda state: verify(params, state, proposed_BK), lambda state: plain(
            params, state), state, blank)
    return (tokens_BT, made_B, jnp.where(checked, k, 0) * jnp.ones_like(made_B)), state, (
        draft_caches)
  return run


def ngram_proposals(history_BN: jax.Array, positions_B: jax.Array, k: int, lo: int,
                    hi: int) -> tuple[jax.Array, jax.Array]:
  """(proposed [B, k], found [B]): for each row, the tokens that followed the latest earlier
  occurrence of its last m tokens (up to its position; the longest m of hi..lo that occurs),
  continued periodically when that occurrence ends less than k tokens before the row's end
  (a repeating span repeats on)."""
  B, N = history_BN.shape
  padded_BN = jnp.concatenate([history_BN, jnp.full((B, hi), -1, history_BN.dtype)], axis=1)
  end_N = jnp.arange(N, dtype=jnp.int32)  # the token after a match starting at i: i + m
  start_B = jnp.full((B,), -1, jnp.int32)  # where the continuation starts (-1: none)
  for m in range(lo, hi + 1):  # a longer match replaces a shorter one
    same_BN = jnp.ones((B, N), bool)
    for j in range(m):
      at_B = positions_B - m + 1 + j
      token_B = jnp.take_along_axis(history_BN, jnp.clip(at_B, 0, N - 1)[:, None], axis=1)
      same_BN &= (padded_BN[:, j:j + N] == token_B) & (at_B >= 0)[:, None]
    ok_BN = same_BN & (end_N[None, :] + m <= positions_B[:, None])  # strictly earlier
    latest_B = jnp.max(jnp.where(ok_BN, end_N[None, :] + m, -1), axis=1)
    start_B = jnp.where(latest_B >= 0, latest_B, start_B)
  found_B = start_B >= 0
  start_B = jnp.maximum(start_B, 0)
  period_B = jnp.maximum(positions_B + 1 - start_B, 1)
  at_BK = start_B[:, None] + jnp.arange(k, dtype=jnp.int32)[None, :] % period_B[:, None]
  return jnp.take_along_axis(history_BN, jnp.clip(at_BK, 0, N - 1), axis=1), found_B


def accept_drawn(logits_BTV: jax.Array, proposed_BK: jax.Array, keys_B: jax.Array,
                 counts_B: jax.Array, s: Sampling) -> tuple[jax.Array, jax.Array]:
  """(tokens_BT, made_B) of a pass that checked k proposals per row, each a proposer's
  choice (a point mass), when the rows sample: proposal j is kept with the probability the
  model gives it after `s`'s filters (`filter_logits`, as `sample` draws); the first one
  rejected is replaced by a draw from that distribution without it, and after k kept one
  more is drawn from the last. This is the standard rejection rule, so every token is
  distributed as the model's own draw. Token j of a row is keyed by (its key, its token
  number counts + j), so seeded runs repeat; a row at temperature 0 keeps exactly the
  proposals its greedy choices equal."""
  B, T, V = logits_BTV.shape
  k = T - 1
  each = lambda a: jnp.repeat(a, T, axis=0) if jnp.ndim(a) else a  # [B] -> [B * T]
  rows = jax.tree.map(each, dataclasses.replace(s, bias=None, allowed=None))
  logp_BTV = jax.nn.log_softmax(filter_logits(logits_BTV.reshape(B * T, V), rows), axis=-1)
  logp_BTV = logp_BTV.reshape(B, T, V)
  greedy_B11 = jnp.reshape(jnp.asarray(s.temperature) == 0, (-1, 1, 1))
  top_BT1 = likeliest(logits_BTV)[..., None]
  column_V = jnp.arange(V, dtype=jnp.int32)
  logp_BTV = jnp.where(greedy_B11, jnp.where(column_V == top_BT1, 0.0, -jnp.inf), logp_BTV)
  keys_BT = jax.vmap(lambda j: token_keys(keys_B, counts_B + j), out_axes=1)(jnp.arange(T))
  draw = lambda key, salt: jax.random.fold_in(key, salt)
  u_BK = jax.vmap(jax.vmap(lambda key: jax.random.uniform(draw(key, 1))))(keys_BT[:, :k])
  p_BK = jnp.exp(jnp.take_along_axis(logp_BTV[:, :k], proposed_BK[..., None], axis=-1)[..., 0])
  n_B = jnp.sum(jnp.cumprod((u_BK < p_BK).astype(jnp.int32), axis=1), axis=1)
  at = lambda a: jnp.take_along_axis(a, n_B.reshape(-1, *[1] * (a.ndim - 1)), axis=1)[:, 0]
  rejected_B = jnp.take_along_axis(proposed_BK, jnp.minimum(n_B, k - 1)[:, None], axis=1)[:, 0]
  rest_BV = jnp.where((n_B < k)[:, None] & (column_V == rejected_B[:, None]), -jnp.inf,
                      at(logp_BTV))
  last_B = jax.vmap(lambda key, lp: jax.random.categorical(draw(key, 2), lp))(at(keys_BT),
                                                                             rest_BV)
  T_ = jnp.arange(T)[None, :]
  tokens_BT = jnp.pad(proposed_BK, ((0, 0), (0, 1)))
  tokens_BT = jnp.where(T_ == n_B[:, None], last_B[:, None].astype(jnp.int32), tokens_BT)
  return tokens_BT, n_B + 1


def check_draft(target_config, draft_config) -> None:
  """A draft must share the target's vocabulary (its token ids are the target's)."""
  t, d = target_config.model, draft_config.model
  if t.vocab_size != d.vocab_size:
    raise UserError(f"speculative.draft={draft_config.model.checkpoint}: its vocabulary has "
                    f"{d.vocab_size} tokens, the model's {t.vocab_size}; a draft must share "
                    f"the model's tokenizer")


def draft_config(config):
  """The config of `speculative.draft`: its checkpoint's model, in the model's dtype,
  quantisation and KV-cache dtype; everything else the model's."""
  import os

  from jaxpar import config as config_lib
  path, m = config.speculative.draft, config.model
  if not os.path.isdir(path):
    raise UserError(f"speculative.draft={path!r}: no such folder; give a checkpoint folder "
                    f"(config.json and weights) of a model with the same tokenizer")
  overrides = [f"model.checkpoint={path}", f"model.dtype={m.dtype}",
               f"model.quantize={m.quantize}"]
  if m.kv_cache_dtype:
    overrides.append(f"model.kv_cache_dtype={m.kv_cache_dtype}")
  base = dataclasses.replace(config, model=config_lib.ModelConfig())
  draft = config_lib.apply_overrides(base, overrides)
  check_draft(config, draft)
  return draft
