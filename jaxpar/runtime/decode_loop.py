"""`generate`'s compiled programs over the slot decoder: its prefill, then `decode`, a
`lax.while_loop` of rounds (the decoder's step, or speculation's proposals and their check)
that stops when every row has made an EOS id or its tokens (`programs`)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxpar.distributed import say
from jaxpar.rules import use_rules
from jaxpar.runtime.decoder import Decoder
from jaxpar.runtime.sampling import Sampling
from jaxpar.runtime.slots import State
from jaxpar.runtime.speculative import Speculation, round_fn


def is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
  return jnp.isin(tokens, jnp.asarray(eos_ids or (-1,), jnp.int32))


def report(before: jax.Array, done: jax.Array, total: int) -> None:
  """Progress from inside a compiled decode loop, about 8 lines: a host callback only on the
  rounds that pass an eighth of `total` tokens (one on every step cost 6% of a batch-1 GPT-2
  decode on CPU)."""
  every = max(1, total // 8)
  say_it = lambda: jax.debug.callback(lambda d: say(f"  decoded {int(d)}/{total} tokens"), done)
  lax.cond((done // every > before // every) | ((done == total) & (before < total)), say_it,
           lambda: None)


def batch_dim(state, scan: bool, batch: int, *, add: bool):
  """At batch 1, the caches without their batch dim (`add=False`) or with it back: a decode
  loop carries them so. Carried with it, XLA:CPU fuses the squeeze that each attention
  product makes into the cache's update, runs the update twice and copies the whole cache
  for each (GPT-2 at batch 1: 97 cache copies per step; without them the step is 1.08-1.11x
  faster); carried
  without it, and updated without it (`write_cache`), every update is in place."""
  if batch != 1:
    return state
  dim = 1 if scan else 0  # stacked caches: [L, B, ...]
  change = jnp.expand_dims if add else jnp.squeeze
  return dataclasses.replace(state, caches=jax.tree.map(lambda a: change(a, dim),
                                                        state.caches))


def loop_steps(decoder: Decoder, max_new: int) -> int:
  """Steps after the prefill that make `max_new` tokens per row: one more when some rows
  are `late` (their step gives the token of the entry before)."""
  return 0 if max_new == 1 else max_new - 1 + int(decoder.late().any())


def programs(generator, batch: int, prompt_len: int, max_new: int, sampling: Sampling,
             progress: bool, spec: Speculation):
  """(decoder, prefill, decode, draft decoder or None) over a `Decoder` of `batch` rows:
  the prefill of every prompt, then a `lax.while_loop` of rounds until every row has made
  an EOS id or `max_new` tokens. A round is the decoder's step (one token per row; a
  `late` row's first gives the token of its prefill's entry, not kept), or with `spec`
  the proposals of every row and their verification (1 to k + 1 tokens per row). After its
  first EOS a row repeats it."""
  k = spec.k if spec.on else 0
  decoder = Decoder(generator, batch, prompt_len + max_new + k)
  greedy, eos_ids = sampling.temperature == 0 and not sampling.adjusts(), generator.eos_ids
  lag = int(decoder.late().any()) if not spec.on else 0  # (speculation: no ring rounds)
  draft = Decoder(spec.draft, batch, decoder.length) if spec.uses_draft else None
  rules, keys = generator.rules, generator.family.config_keys
  squeeze = functools.partial(_squeeze, batch=batch)
  loop = rounds(_one_round(decoder, draft, spec, greedy=greedy, squeeze=squeeze),
                batch=batch, max_new=max_new, eos_ids=eos_ids, progress=progress)

  def decode(params, state, first_B, draft_params=None, aux=None):
    with use_rules(rules, keys=keys):
      aux = squeeze(aux, draft, False) if draft else aux
      n, out_BN, count_B, checked_B2 = loop(params, draft_params,
                                            squeeze(state, decoder, False), aux, first_B)
      # After its first EOS a row repeats it (rows that stopped early: the unwritten tail).
      eos = is_eos(out_BN, eos_ids)
      after = jnp.cumsum(eos, axis=-1) - eos > 0
      first_eos = jnp.take_along_axis(out_BN, jnp.argmax(eos, axis=-1)[:, None], axis=-1)
      made = jnp.max(jnp.minimum(count_B, max_new))
      return jnp.where(after, first_eos, out_BN), made, n + 1 - lag, checked_B2

  prefill = decoder.prefill(batch, prompt_len, greedy=greedy)
  draft_prefill = draft.prefill(batch, prompt_len, greedy=True) if draft else None
  return decoder, prefill, jax.jit(decode), draft_prefill


def _squeeze(state, d: Decoder, add: bool, *, batch: int):
  """`batch_dim` of a state, or of a draft's caches, of decoder `d`."""
  if isinstance(state, State):
    return batch_dim(state, d.scan, batch, add=add)
  return batch_dim(State(state, None), d.scan, batch, add=add).caches


def _one_round(decoder: Decoder, draft: Decoder | None, spec: Speculation, *, greedy: bool,
               squeeze):
  """(params, draft params, state, aux, round n, done_B) -> ((tokens_BT, made_B), state,
  aux, proposed_B), on states carried by `squeeze` (the batch dim put back for the call
  only, so no loop carries it)."""
  def in_place(fn, d):
    def run(params, state, *args):
      out, state = fn(params, squeeze(state, d, True), *args)
      return out, squeeze(state, d, False)
    return run
  span = decoder.length
  if spec.on:
    spec_round = round_fn(decoder, spec, span=span, greedy=greedy, draft=draft,
                          wrap=in_place)

    def one_round(params, draft_params, state, aux, n, done_B):
      (tokens_BT, made_B, proposed_B), state, aux = spec_round(params, state, ~done_B,
                                                               draft_params, aux)
      return (tokens_BT, made_B), state, aux, proposed_B
    return one_round
  step = in_place(decoder.step_fn(greedy=greedy, span=span), decoder)
  late_B = jnp.asarray(decoder.late(), jnp.int32)

  def plain(params, draft_params, state, aux, n, done_B):
    new_B, state = step(params, state)
    made_B = jnp.where(n >= late_B, 1, 0)  # a late row's first gives its prefill's entry's
    return (new_B[:, None], made_B), state, aux, jnp.zeros(new_B.shape, jnp.int32)
  return plain

def rounds(one_round, *, batch: int, max_new: int, eos_ids, progress: bool):
  """(params, draft params, state, aux, first_B) -> (rounds run, out_BN, count_B,
  checked_B2): a `lax.while_loop` of `one_round` until every row has made an EOS id or
  `max_new` tokens, `first_B` being their first; out_BN holds each row's tokens (unwritten
  past an early stop), checked_B2 per row the proposals checked and accepted."""
  def run(params, draft_params, state, aux, first_B):
    def cond(carry):
      return ~jnp.all(carry[5])

    def body(carry):
      n, state, aux, out_BN, count_B, done_B, checked_B2 = carry
      (tokens_BT, made_B), state, aux, proposed_B = one_round(params, draft_params, state,
                                                              aux, n, done_B)
      T = tokens_BT.shape[1]
      at_BT = count_B[:, None] + jnp.arange(T)
      kept_BT = (jnp.arange(T) < made_B[:, None]) & (at_BT < max_new) & ~done_B[:, None]
      out_BN = out_BN.at[jnp.arange(batch)[:, None], jnp.where(kept_BT, at_BT, max_new)
                         ].set(tokens_BT, mode="drop")
      live_B = (~done_B).astype(jnp.int32)
      checked_B2 += jnp.stack([proposed_B, jnp.maximum(made_B - 1, 0)], axis=1) * live_B[
          :, None]
      done_B |= jnp.any(is_eos(tokens_BT, eos_ids) & kept_BT, axis=1)
      if progress:
        report(jnp.min(count_B), jnp.min(jnp.minimum(count_B + made_B, max_new)), max_new)
      count_B = count_B + made_B
      return n + 1, state, aux, out_BN, count_B, done_B | (count_B >= max_new), checked_B2

    out_BN = jnp.zeros((batch, max_new), jnp.int32).at[:, 0].set(first_B)
    carry = (0, state, aux, out_BN, jnp.ones((batch,), jnp.int32),
             is_eos(first_B, eos_ids) | (max_new <= 1), jnp.zeros((batch, 2), jnp.int32))
    n, _, _, out_BN, count_B, _, checked_B2 = lax.while_loop(cond, body, carry)
    return n, out_BN, count_B, checked_B2
  return run
