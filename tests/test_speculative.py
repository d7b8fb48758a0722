"""Speculative decoding: greedy tokens equal an independent full-recompute reference whatever
is proposed (prompt lookup, a draft model, the model itself), on one device, data x model
and pipelined meshes; the model's own proposals are all accepted in the hand-counted number of passes; a
rejected proposal leaves nothing in the cache; the CLI reports what was proposed."""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from jaxpar import cli
from jaxpar.runtime import generate, sampling
from jaxpar.runtime.speculative import Speculation, ngram_proposals, verify_fn
from tests import reference
from tests.conftest import build_generator as build

# Prompts that repeat spans (prompt lookup finds matches) and ones that do not.
PROMPTS = [[1, 2, 3, 1, 2, 3, 1, 2], [7, 8], [9, 10, 11, 9, 10], [3, 3, 3, 3, 3, 3], [5],
           [6, 7, 6, 7], [8, 9, 10], [11, 12, 11]]
NEW, K = 12, 4


@pytest.fixture(scope="module")
def spec_config(tiny):
  return dataclasses.replace(
      tiny, model=dataclasses.replace(tiny.model, n_layers=4, max_seq_len=24),
      run=dataclasses.replace(tiny.run, batch=len(PROMPTS)))


@pytest.fixture(scope="module")
def expected(spec_config, devices):
  """Greedy continuations recomputed from scratch every token by the NumPy GPT-2 (float64)."""
  return reference.gpt2_greedy(build(spec_config, devices).natural_params(), PROMPTS, NEW,
                               n_heads=spec_config.model.n_heads,
                               vocab_size=spec_config.model.vocab_size)


def speculation(method, gen, draft=None):
  return Speculation(method, K, 1, 3, draft=gen if method == "self" else draft)


# (method, data, stage, model): each method and each mesh at least once, not their product;
# on a pipeline every pass is a trip of the stage ring.
CASES = [("ngram", 1, 1, 1), ("self", 1, 1, 1), ("draft", 1, 1, 1), ("ngram", 2, 1, 4),
         ("self", 2, 1, 4), ("draft", 8, 1, 1), ("ngram", 2, 2, 2), ("self", 1, 4, 2),
         ("draft", 2, 2, 2)]


@pytest.mark.parametrize("method,data,stage,model", CASES)
def test_greedy_tokens_equal_full_recompute(spec_config, devices, expected, method, data,
                                            stage, model):
  gen = build(spec_config, devices, data, stage, model)
  # The draft: the same seeded model with int8 weights (it agrees with the model often, not
  # always, so both accepted and rejected proposals occur).
  draft = None
  if method == "draft":
    draft = build(spec_config, devices, data, stage, model, quantize="int8")
  result = gen.generate(PROMPTS, max_new_tokens=NEW, speculation=speculation(method, gen, draft))
  np.testing.assert_array_equal(result.tokens, expected)
  assert result.steps == NEW
  assert 0 < result.accepted <= result.proposed
  if method == "self":  # every proposal accepted: k + 1 tokens per pass after the prefill's
    assert result.accepted == result.proposed
    assert result.passes == 1 + math.ceil((NEW - 1) / (K + 1))
  elif method == "draft":
    assert result.accepted < result.proposed
  if data * stage * model == 1:
    assert_caches_in_place(gen, len(PROMPTS))
  if stage > 1:  # the passes' activations travel the ring; no collective carries a cache
    # (all-to-alls regroup the rows' tokens and positions, split over data, into groups)
    from jaxpar import inspect
    (_, _, decode, _), = gen._compiled.values()
    census = inspect.hlo_census(decode.as_text())
    assert set(census.counts()) <= {"collective-permute", "all-reduce", "all-gather",
                                    "all-to-all"}
    assert census.count("collective-permute", in_loop=True) >= 1
    one_layer = gen.cache_bytes_per_device(len(PROMPTS), max(map(len, PROMPTS)) + NEW) // (
        2 * spec_config.model.n_layers)
    assert max(c.bytes for c in census.collectives) < one_layer


def assert_caches_in_place(gen, batch):
  """No KV cache is copied inside the decode loop (a `lax.cond` around the step or a loop
  carrying the caches with their batch dim at batch 1 made XLA:CPU copy each every round)."""
  from jaxpar import inspect
  (_, _, decode, _), = gen._compiled.values()
  census = inspect.hlo_census(decode.as_text())
  smallest_leaf = gen.cache_bytes_per_device(batch, max(map(len, PROMPTS)) + NEW) // (
      2 * gen.config.model.n_layers)
  assert census.loops and max(census.loop_copies, default=0) < smallest_leaf


def test_one_prompt_int8_weights_and_cache(spec_config, devices):
  """Batch 1 (the decode loop carries its caches without the batch dim), int8 weights and an
  int8 KV cache (scales written with the keys): speculation changes no token, and neither
  kind of round copies a cache."""
  gen = build(spec_config, devices, kv_cache_dtype="int8", quantize="int8")
  plain = gen.generate(PROMPTS[:1], max_new_tokens=NEW)
  for method in ("self", "ngram"):
    gen._compiled.clear()
    spec = gen.generate(PROMPTS[:1], max_new_tokens=NEW, speculation=speculation(method, gen))
    np.testing.assert_array_equal(spec.tokens, plain.tokens)
    assert spec.passes < plain.passes
    assert_caches_in_place(gen, 1)


def test_a_rejected_proposal_leaves_no_trace(spec_config, devices, expected):
  """Verify passes with every proposal wrong, then every proposal right: each keeps what k
  one-token steps would, and the cache below each row's position equals that of a decoder
  that only ever took one-token steps."""
  from jaxpar.runtime.decoder import Decoder
  gen = build(spec_config, devices)
  B, T0 = len(PROMPTS), max(map(len, PROMPTS))
  length, V = T0 + NEW + K, spec_config.model.vocab_size
  decoder = Decoder(gen, B, length)
  tokens, lengths = generate.pad_right(PROMPTS)
  prefill = decoder.prefill(B, T0, greedy=True)
  verify = decoder.jit(verify_fn(decoder, k=K, span=length))
  step = decoder.jit(decoder.step_fn(greedy=True, span=length))
  args = (tokens, np.int32(0), lengths, np.int32(0), np.int32(0), sampling.Sampling().rows(B),
          np.zeros(B, np.uint32), np.arange(B, dtype=np.int32))
  with jax.set_mesh(gen.mesh):
    first, state = prefill(gen.params, None, *args)
    _, plain = prefill(gen.params, None, *args)
    np.testing.assert_array_equal(first, expected[:, 0])
    wrong = (expected[:, 1:1 + K] + 1) % V
    (made_tokens, made), state = verify(gen.params, state, wrong)
    np.testing.assert_array_equal(made, np.ones(B))  # the token after the row's last only
    np.testing.assert_array_equal(np.asarray(made_tokens)[:, 0], expected[:, 1])
    (made_tokens, made), state = verify(gen.params, state, expected[:, 2:2 + K])
    np.testing.assert_array_equal(made, np.full(B, K + 1))
    np.testing.assert_array_equal(made_tokens, expected[:, 2:3 + K])
    for _ in range(2 + K):
      _, plain = step(gen.params, plain)
  positions = np.asarray(state.slots.positions)
  np.testing.assert_array_equal(positions, np.asarray(plain.slots.positions))
  np.testing.assert_array_equal(positions, lengths + 2 + K)
  below_BS = np.arange(length)[None, :] < positions[:, None]  # the slots queries see

  def seen(a):  # [B, ..., S]: keys [B, K, H, S], values [B, K, S, H] (slot axis last)
    a = np.asarray(a)
    a = a if a.shape[-1] == length else np.moveaxis(a, 2, -1)
    return np.where(below_BS.reshape(B, *[1] * (a.ndim - 2), length), a, 0)
  for mine, theirs in zip(jax.tree.leaves(state.caches), jax.tree.leaves(plain.caches)):
    np.testing.assert_allclose(seen(mine), seen(theirs), atol=1e-5)  # a pass of k + 1 rounds
    # differently from k + 1 passes of one (float32); a rejected entry would differ by O(1)


def test_sampled_tokens_are_distributed_as_without_speculation(tiny, devices):
  """A 16-token vocabulary, 20,000 rows of one prompt drawn at temperature 1.5 with min-p
  0.01 (each row its own key): at each new position the tokens with and without speculation
  (prompt lookup; the model's own greedy proposals) pass a chi-square test of one
  distribution (p > 0.001); proposals are both kept and rejected; the same seed repeats
  every token."""
  from scipy.stats import chi2_contingency
  config = dataclasses.replace(tiny, model=dataclasses.replace(
      tiny.model, vocab_size=16, n_layers=1, max_seq_len=24, init_std=0.3))
  gen = build(config, devices)
  rows, new, draws = 20_000, 4, sampling.Sampling(temperature=1.5, min_p=0.01)
  # 12 of the 16 tokens: most rows' last token occurs before, so prompt lookup guesses (a
  # round checks when half the rows do)
  prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 1, 2]] * rows
  plain = gen.generate(prompts, max_new_tokens=new, sampling=draws, seed=1).tokens
  runs = {}
  for seed, method in enumerate(["self", "ngram"], start=2):
    spec = runs[method] = gen.generate(prompts, max_new_tokens=new, sampling=draws, seed=seed,
                                       speculation=speculation(method, gen))
    assert 0 < spec.accepted < spec.proposed
    for j in range(1, new):  # token 0 is the prefill's (drawn the same way by both)
      table = np.stack([np.bincount(plain[:, j], minlength=16),
                        np.bincount(spec.tokens[:, j], minlength=16)])
      table = table[:, table.sum(axis=0) > 0]
      assert chi2_contingency(table).pvalue > 1e-3, (method, j, table)
  again = gen.generate(prompts, max_new_tokens=new, sampling=draws, seed=3,
                       speculation=speculation("ngram", gen)).tokens
  np.testing.assert_array_equal(again, runs["ngram"].tokens)


def test_pipelined_draws_equal_one_device(spec_config, devices):
  """Sampled speculation on data=2 x stage=2 x model=2 (its logits leave the stage ring, the
  rows draw outside it) gives the tokens one device gives with the same seed (the draws are
  keyed by seed, row and token number); proposals are kept and rejected."""
  draws = sampling.Sampling(temperature=1.0, top_p=0.9)
  tokens = []
  for mesh in ((1, 1, 1), (2, 2, 2)):
    gen = build(spec_config, devices, *mesh)
    result = gen.generate(PROMPTS, max_new_tokens=NEW, sampling=draws, seed=3,
                          speculation=speculation("self", gen))
    assert 0 < result.accepted < result.proposed
    tokens.append(result.tokens)
  np.testing.assert_array_equal(*tokens)


@pytest.mark.parametrize("mesh", [(1, 1, 1), (2, 2, 2)])
def test_penalties_count_the_proposals_before_each_position(spec_config, devices, mesh):
  """Greedy with repetition, frequency and presence penalties: each checked position's logits
  are adjusted counting the row's tokens and the proposals before it, so speculation gives
  the tokens of one-token steps (which the penalties change)."""
  gen = build(spec_config, devices, *mesh)
  draws = sampling.Sampling(repetition=1.5, frequency=0.4, presence=0.3)
  plain = gen.generate(PROMPTS, max_new_tokens=NEW, sampling=draws).tokens
  assert (plain != gen.generate(PROMPTS, max_new_tokens=NEW).tokens).any()
  result = gen.generate(PROMPTS, max_new_tokens=NEW, sampling=draws,
                        speculation=speculation("self", gen))
  np.testing.assert_array_equal(result.tokens, plain)
  # the draft proposes its likeliest tokens, unpenalised: some kept, some rejected
  assert 0 < result.accepted < result.proposed


def test_ngram_proposals_follow_the_latest_match():
  history = np.array([[5, 6, 7, 9, 5, 6, 8, 1, 5, 6, 0, 0],    # ..5 6 at 8-9: latest 5 6 -> 8 1
                      [1, 2, 3, 4, 2, 3, 0, 0, 0, 0, 0, 0],    # 2 3 at 4-5: earlier 2 3 -> 4, 2, 3
                      [4, 4, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0],    # a run continues
                      [1, 2, 3, 4, 5, 6, 0, 0, 0, 0, 0, 0]])   # no repeat: nothing found
  positions = np.array([9, 5, 3, 5])
  proposed, found = jax.jit(ngram_proposals, static_argnums=(2, 3, 4))(history, positions, 4,
                                                                       1, 3)
  np.testing.assert_array_equal(found, [True, True, True, False])
  # row 0: the 2-gram [5, 6] last occurred at 4-5, followed by 8, 1, 5, 6
  np.testing.assert_array_equal(proposed[0], [8, 1, 5, 6])
  # row 1: [2, 3] occurred at 1-2, followed by 4, then (periodically) 2, 3, 4
  np.testing.assert_array_equal(proposed[1], [4, 2, 3, 4])
  np.testing.assert_array_equal(proposed[2], [4, 4, 4, 4])  # the 3-gram [4, 4, 4] at 0-2


def test_speculation_errors(root, monkeypatch, capsys):
  """Bad settings are refused before anything compiles, in one line."""
  monkeypatch.chdir(root)
  for sets, message in [(["speculative.method=draft"], "a draft checkpoint goes with method "
                          "draft only"),
                        (["speculative.method=draft", "speculative.draft=/no/such"],
                         "speculative.draft='/no/such': no such folder"),
                        (["speculative.k=0"], "need k >= 1")]:
    code = cli.main(["generate", "--config", "configs/tiny.yaml", "--prompt-ids", "1,2",
                     *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_generate_cli_reports_what_was_proposed(root, monkeypatch, capsys):
  monkeypatch.chdir(root)
  args = ["generate", "--config", "configs/tiny.yaml", "--set", "mesh.data=2",
          "--set", "mesh.model=4", "--prompt-ids", "1,2,3,1,2,3;4,4,4", "--max-new-tokens",
          "9", "--json"]
  assert cli.main(args) == 0
  plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert "speculative" not in plain
  assert cli.main([*args, "--set", "speculative.method=self", "--set", "speculative.k=3"]) == 0
  stdout = capsys.readouterr().out
  result = json.loads(stdout.strip().splitlines()[-1])
  assert result["new_tokens"] == plain["new_tokens"]
  # The cache holds k = 3 positions more per row (6 + 9 + 3 instead of 6 + 9), and the draft
  # its own (here the model itself: as much again).
  assert result["kv_cache_bytes_per_device"] * 15 == 2 * plain["kv_cache_bytes_per_device"] * 18
  # 8 tokens after the prefill's, 4 per pass: 2 passes of 3 proposals each, every one kept
  assert result["speculative"] == {"method": "self", "k": 3, "proposed": 12, "accepted": 12,
                                   "passes": 3}
  assert "speculative (self, k=3): 12 of 12 proposed tokens accepted (100%)" in stdout
