"""Speculative decoding: proposers of the next k tokens of every row, which the slot decoder's
`verify_fn` checks in one pass of the target model (greedy: the output is the same token for
token, whatever is proposed; a good proposer only makes more tokens per pass).

    ngram   prompt lookup: the tokens that followed the latest earlier occurrence of the row's
            longest suffix of ngram_max..ngram_min tokens, in its own prompt and output; no
            model. A round where no row has a match runs a plain one-token step instead.
    draft   a smaller model with the same vocabulary (its own slot decoder and KV cache, on
            the same mesh): k greedy steps of it (`Decoder.propose_fn`).
    self    the target itself as the draft (tests: every proposal is accepted).
"""

import dataclasses

import jax
import jax.numpy as jnp

from jaxpar.errors import UserError


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
