"""Generation: greedy tokens equal an independent full-recompute reference on one device and
on data x stage x model meshes (pipelined decoding when stage > 1), for prompts of unequal
length; EOS, sampling, and the CLI."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from jaxpar import cli, inspect
from jaxpar import config as config_lib
from jaxpar.config import MeshConfig
from jaxpar.mesh import make_mesh
from jaxpar.runtime import generate, sampling
from tests import reference
from tests.conftest import build_generator as build

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11], [3, 3, 3, 3, 3, 3], [5], [6, 7], [8, 9, 10],
           [11]]
NEW = 8


@pytest.fixture(scope="module")
def gen_config(tiny):
  return dataclasses.replace(
      tiny, model=dataclasses.replace(tiny.model, n_layers=8, max_seq_len=32),
      run=dataclasses.replace(tiny.run, batch=len(PROMPTS)))


@pytest.fixture(scope="module")
def expected(gen_config, devices):
  """Greedy continuations recomputed from scratch every step by the NumPy GPT-2 (float64)."""
  params = build(gen_config, devices).natural_params()
  out = reference.gpt2_greedy(params, PROMPTS, NEW, n_heads=gen_config.model.n_heads,
                              vocab_size=gen_config.model.vocab_size)
  assert np.mean([len(set(row)) for row in out]) > 3  # the context matters, not one echo
  return out


# (data, stage, model, scan_layers)
MESHES = [(1, 1, 1, False), (1, 1, 1, True), (2, 1, 4, False), (2, 1, 4, True), (8, 1, 1, None),
          (2, 2, 2, None), (1, 8, 1, None), (1, 4, 2, None), (2, 4, 1, None)]


@pytest.mark.parametrize("data,stage,model,scan", MESHES)
def test_greedy_tokens_equal_full_recompute(gen_config, devices, expected, data, stage, model,
                                            scan):
  gen = build(gen_config, devices, data, stage, model, scan_layers=scan)
  result = gen.generate(PROMPTS, max_new_tokens=NEW)
  assert result.tokens.dtype == np.int32 and result.tokens.shape == (len(PROMPTS), NEW)
  np.testing.assert_array_equal(result.tokens, expected)
  assert result.steps == NEW


@pytest.mark.parametrize("model,scan", [(1, False), (4, False), (1, True)])
def test_batch_1_decodes_with_its_caches_in_place(gen_config, devices, expected, model, scan):
  """One prompt: the tokens of the batch; unrolled, no cache is copied inside the decode loop
  (XLA:CPU copied each 4 times per step when the loop carried its batch dim). A scan carries
  its stacked caches without the batch dim too (tokens only)."""
  gen = build(gen_config, devices, 1, 1, model, scan_layers=scan)
  result = gen.generate(PROMPTS[:1], max_new_tokens=NEW)
  np.testing.assert_array_equal(result.tokens, expected[:1])
  if scan:
    return
  (_, _, decode, _), = gen._compiled.values()
  census = inspect.hlo_census(decode.as_text())
  smallest_leaf = gen.cache_bytes_per_device(1, len(PROMPTS[0]) + NEW) // (
      2 * gen_config.model.n_layers)
  assert census.loops and max(census.loop_copies, default=0) < smallest_leaf


def test_pipelined_decode_moves_activations_and_tokens_only(gen_config, devices, expected):
  """On data=2 x stage=2 x model=2 the loop of rounds moves each tick's activations and
  tokens by collective-permutes and all-reduces the model split; no collective carries a
  KV cache (each is smaller than one layer's cache on one device)."""
  gen = build(gen_config, devices, 2, 2, 2)
  np.testing.assert_array_equal(gen.generate(PROMPTS, max_new_tokens=NEW).tokens, expected)
  (_, _, decode, _), = gen._compiled.values()
  census = inspect.hlo_census(decode.as_text())
  assert set(census.counts()) <= {"collective-permute", "all-reduce", "all-gather"}
  assert census.count("collective-permute", in_loop=True) >= 2  # activations, tokens
  one_layer = gen.cache_bytes_per_device(len(PROMPTS), max(map(len, PROMPTS)) + NEW) // (
      2 * gen_config.model.n_layers)
  assert max(c.bytes for c in census.collectives) < one_layer


@pytest.mark.parametrize("stage", [1, 2])
def test_eos_stops_a_row_and_fills_it_with_eos(gen_config, devices, expected, stage):
  eos = int(expected[0, 2])  # a token row 0 produces at step 2
  config = dataclasses.replace(gen_config, mesh=MeshConfig(data=2, stage=stage,
                                                           model=4 // stage))
  gen = generate.build(config, make_mesh(config.mesh, devices=devices), eos_id=eos)
  tokens = gen.generate(PROMPTS, max_new_tokens=NEW).tokens
  for row, want in zip(tokens, expected):
    stop = list(want).index(eos) if eos in want else NEW
    np.testing.assert_array_equal(row[:stop + 1], want[:stop + 1])
    assert (row[stop:] == eos).all() or stop == NEW


def test_sampling_is_seeded_and_top_k_1_is_greedy(gen_config, devices, expected):
  gen = build(gen_config, devices, 2, 1, 4)
  sample = lambda seed, **kw: gen.generate(PROMPTS, max_new_tokens=NEW, seed=seed,
                                           sampling=generate.Sampling(**kw)).tokens
  np.testing.assert_array_equal(sample(0, temperature=1.0, top_k=1), expected)
  a, b = sample(3, temperature=1.5), sample(3, temperature=1.5)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, sample(4, temperature=1.5))
  assert not np.array_equal(a, expected)
  nucleus = sample(5, temperature=1.0, top_p=1e-6)  # the top token alone reaches top_p
  np.testing.assert_array_equal(nucleus, expected)


def test_sample_filters_keep_only_allowed_tokens():
  logits = jax.numpy.asarray(np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 2000, np.float32)))
  keys = sampling.row_keys(jax.random.key(0), jax.numpy.arange(2000), 0)
  top2 = np.asarray(sampling.sample(logits, keys, sampling.Sampling(1.0, top_k=2)))
  assert set(top2.tolist()) == {0, 1}
  nucleus = np.asarray(sampling.sample(logits, keys, sampling.Sampling(1.0, top_p=0.7)))
  assert set(nucleus.tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
  everything = np.asarray(sampling.sample(logits, keys, sampling.Sampling(1.0)))
  assert set(everything.tolist()) == {0, 1, 2, 3}
  assert abs(np.mean(everything == 0) - 0.5) < 0.05


def test_penalties_equal_the_numpy_reference(gen_config, devices, expected):
  """The offline API's penalties (`Sampling`'s presence, frequency, repetition), greedy, on
  data=2 x stage=2 x model=2 (late pipeline rows included) equal the NumPy GPT-2 with the
  penalties applied to its float64 logits: negative presence and frequency make tokens come
  back, so each one's count (the last one made included) decides what comes next."""
  s = generate.Sampling(presence=-2.0, frequency=-0.5, repetition=1.3)
  gen = build(gen_config, devices, 2, 2, 2)
  got = gen.generate(PROMPTS, max_new_tokens=NEW, sampling=s).tokens
  params = gen.natural_params()
  for prompt, row in zip(PROMPTS, got):
    out: list[int] = []
    for _ in range(NEW):
      x = reference.gpt2_logits(params, np.array([list(prompt) + out]),
                                n_heads=gen_config.model.n_heads,
                                vocab_size=gen_config.model.vocab_size)[0, -1]
      counts = np.bincount(out, minlength=len(x)).astype(np.float64)
      seen = counts > 0
      seen[list(prompt)] = True
      x = np.where(seen, np.where(x > 0, x / 1.3, x * 1.3), x)
      out.append(int(np.argmax(x + 0.5 * counts + 2.0 * (counts > 0))))
    assert list(row) == out
  assert not np.array_equal(got, expected)


def test_min_p_keeps_what_numpy_keeps():
  """min-p (after temperature), per row: a token stays when its probability is at least
  min_p times the likeliest's."""
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(4, 200)).astype(np.float32)
  min_p = np.array([0.0, 0.05, 0.3, 1.0], np.float32)
  temperature = np.array([1.0, 0.7, 2.0, 1.0], np.float32)
  s = dataclasses.replace(sampling.Sampling().rows(4), min_p=min_p, temperature=temperature)
  kept = np.asarray(sampling.filter_logits(jax.numpy.asarray(logits), s)) > np.finfo(
      np.float32).min
  for row, keep, p, t in zip(logits, kept, min_p, temperature):
    probs = np.exp((row - row.max()) / t)  # relative to the likeliest
    np.testing.assert_array_equal(keep, probs >= p)
  assert kept[0].all() and kept[3].sum() == 1
  assert all(1 < k.sum() < 200 for k in kept[1:3])  # some kept, some dropped


@pytest.mark.parametrize("top_k,top_p", [(1, 1.0), (5, 1.0), (0, 0.5), (0, 0.95), (7, 0.8),
                                         (0, 1e-6)])
def test_filters_keep_what_a_sorted_reference_keeps(top_k, top_p):
  """top-k / top-p by bisection (no sort on device) keep exactly the tokens a NumPy reference
  keeps, ties kept together."""
  rng = np.random.default_rng(top_k)
  logits = rng.normal(size=(16, 100)).astype(np.float32) * 3
  logits[0, :10] = 5.0  # a tie across the top-k boundary
  got = np.asarray(sampling.filter_logits(jax.numpy.asarray(logits),
                                          sampling.Sampling(1.0, top_k, top_p)))
  kept = got > np.finfo(np.float32).min
  for row, keep in zip(logits, kept):
    want = np.ones(100, bool)
    if top_k:
      want &= row >= np.sort(row)[::-1][top_k - 1]
    if top_p < 1:
      masked = np.where(want, row, -np.inf)
      p = np.exp(masked - masked.max())
      p /= p.sum()
      # Keep a token when the strictly likelier ones hold less than top_p (ties kept together).
      likelier = np.array([p[masked > masked[i]].sum() for i in range(100)])
      want &= likelier < top_p
    np.testing.assert_array_equal(keep, want)
  assert kept.sum(1).min() >= 1


def test_kv_cache_bytes_per_device(gen_config, devices):
  gen = build(gen_config, devices, 2, 1, 4)
  m = gen_config.model
  # k and v: [L, B/data, T, N/model, H] float32 each; H = 64 / 8 heads.
  assert gen.cache_bytes_per_device(8, 24) == 2 * m.n_layers * 4 * 24 * 2 * 8 * 4


def test_progress_says_about_eight_lines(tiny, devices, capfd):
  """Progress from inside the compiled loop: a line every max_new / 8 tokens, the last
  included (a host callback on those steps only)."""
  gen = generate.build(tiny, make_mesh(MeshConfig(1, 1, 1), devices=devices[:1]))
  gen.generate([[1, 2, 3]], max_new_tokens=24, progress=True)
  lines = [line.strip() for line in capfd.readouterr().out.splitlines() if "decoded" in line]
  assert lines == [f"decoded {n}/24 tokens" for n in range(3, 25, 3)]


def test_generate_cli(root, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(root)
  out = tmp_path / "tokens.npy"
  code = cli.main(["generate", "--config", "configs/tiny.yaml", "--set", "mesh.model=2",
                   "--set", "mesh.data=2", "--set", "mesh.stage=2", "--set", "model.n_layers=4",
                   "--prompt-ids", "1,2,3;4,5;6;7,8,9,10", "--max-new-tokens", "5",
                   "--save-tokens", str(out), "--json",
                   # forward's settings, which generate does not use: no error for them
                   "--set", "run.seq_len=64", "--set", "run.batch=3",
                   "--set", "pipeline.microbatches=3", "--top-k", "5"])
  stdout = capsys.readouterr().out
  assert code == 0
  result = json.loads(stdout.strip().splitlines()[-1])
  saved = np.load(out)
  assert saved.dtype == np.int32 and saved.shape == (4, 5)
  assert result["new_tokens"] == saved.tolist()
  assert result["mesh"] == {"data": 2, "stage": 2, "expert": 1, "model": 2}
  for key in ("tokens_per_s", "decode_tokens_per_s", "prefill_s", "decode_s",
              "kv_cache_bytes_per_device", "param_bytes_per_device"):
    assert result[key] > 0
  assert result["decode_tokens_per_s"] == pytest.approx(4 * 4 / result["decode_s"])
  assert result["tokens_per_s"] == pytest.approx(4 * 5 / (result["prefill_s"] +
                                                          result["decode_s"]))
  assert " tokens/s with the prefill, " in stdout
  assert "note: top_k 5 and top_p 1.0 apply when sampling; temperature 0 decodes greedily" in (
      stdout)
  # The same seeded model on one device, through the library, makes the same tokens.
  config = config_lib.load(root / "configs" / "tiny.yaml", ["model.n_layers=4"])
  single = generate.build(config, make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1]))
  expected = single.generate([[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]], max_new_tokens=5).tokens
  np.testing.assert_array_equal(saved, expected)
  assert "prefill: 4 prompts x 4 tokens" in stdout
  assert "decoding 5 tokens, pipelined: 2 groups over 2 stages, 5 rounds of 2 ticks..." in stdout


@pytest.mark.parametrize("args,message", [
    (["--prompt-ids", "1,2;x"], "row 'x' is not a comma-separated list"),
    (["--prompt-ids", "1,2;;3"], "an empty row"),
    (["--prompt-ids", "1,999"], "token id 999 is outside the vocabulary [0, 250)"),
    (["--prompt", "hello"], "--prompt needs a tokenizer"),
    (["--prompt-ids", "1,2,3", "--max-new-tokens", "40"], "exceeds model.max_seq_len=32"),
    (["--prompt-ids", "1;2", "--top-p", "0"], "0 < top_p <= 1"),
])
def test_generate_errors(root, monkeypatch, capsys, args, message):
  monkeypatch.chdir(root)
  code = cli.main(["generate", "--config", "configs/tiny.yaml", *args])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2
  assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_forward_accepts_prompt_ids(root, monkeypatch, capsys):
  monkeypatch.chdir(root)
  assert cli.main(["forward", "--config", "configs/tiny.yaml", "--prompt-ids", "1,2;3,4",
                   "--set", "mesh.data=2", "--set", "mesh.model=4", "--json"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["mesh"] == {"data": 2, "stage": 1, "expert": 1, "model": 4}
  assert cli.main(["forward", "--config", "configs/tiny.yaml", "--prompt-ids", "1,2;3"]) == 2
  assert "rows of equal length" in capsys.readouterr().err


@pytest.mark.parametrize("data,stage,model", [(8, 1, 1), (2, 2, 2)])
def test_odd_prompt_counts_are_padded_to_the_mesh(gen_config, devices, expected, data, stage,
                                                  model):
  gen = build(gen_config, devices, data, stage, model)
  assert gen.padded_batch(3) == 8 if data == 8 else gen.padded_batch(3) == 4
  tokens = gen.generate(PROMPTS[:3], max_new_tokens=NEW).tokens
  np.testing.assert_array_equal(tokens, expected[:3])


def test_a_prompt_prefilled_over_a_step_in_flight_keeps_its_row(gen_config, devices):
  """data=2 x stage=2 x model=2, 4 slots: row 2 is `late` (its step leaves the pipeline in
  the next step). A request ends with its step still in flight and a new prompt is prefilled
  into its row: that step writes to the trash slot, and the new prompt's first token (not the
  one the ring brings) enters next. After three more steps the row's cache (all but the trash
  slot) and tokens equal those of the same prompt prefilled into an empty decoder."""
  from jaxpar.runtime.decoder import Decoder
  gen = build(gen_config, devices, 2, 2, 2)
  length, row, prompt = 12, 2, [9, 10, 11, 12, 13, 14]
  decoder = Decoder(gen, 4, length)
  assert decoder.late()[row]
  prefill, step = decoder.prefill(1, 8), decoder.jit(decoder.step_fn(greedy=True, span=length))
  greedy = sampling.Sampling().rows(1)

  def put(state, tokens):
    padded = np.zeros((1, 8), np.int32)
    padded[0, :len(tokens)] = tokens
    _, state = prefill(gen.params, state, padded, np.int32(0), np.array([len(tokens)]),
                       np.int32(0), np.int32(row), greedy, np.zeros(1, np.uint32),
                       np.full(1, -1, np.int32))
    return state

  def run(state):
    state, out = put(state, prompt), []
    for _ in range(3):
      tokens, state = step(gen.params, state)
      out.append(int(tokens[row]))
    return state, out

  with jax.set_mesh(gen.mesh):
    state = put(decoder.empty_state(), [3, 1])
    _, state = step(gen.params, state)  # the old request's step at position 2, in flight
    (over, tokens), (fresh, want) = run(state), run(decoder.empty_state())
  assert tokens[1:] == want[1:]  # a late row's first step gives its previous entry's token
  for k, shape in ((k, v[0]) for k, v in decoder_spec(gen, length + 1).items()):
    positions = shape.index(length + 1)  # the slot axis of [B, ...] (the trash slot last);
    # the caches are [layers, G, Bg, ...]: row `row`'s is [layers, ...], same axis
    mine = lambda caches: np.take(np.asarray(caches[k])[:, row // 2, row % 2],
                                  np.arange(length), axis=positions)
    np.testing.assert_array_equal(mine(over.caches), mine(fresh.caches))


def decoder_spec(gen, length: int) -> dict:
  from jaxpar.runtime.slots import cache_spec
  return cache_spec(gen, 1, length)


@pytest.mark.parametrize("data,model,rows", [(1, 1, (1, 4)), (2, 4, (1, 2))])
def test_a_step_of_the_first_rows_equals_the_step_of_every_row(gen_config, devices, data,
                                                               model, rows):
  """The serving step over the first A rows of each data group (`forward_fn(rows=A)`): those
  rows' tokens and caches equal a step of every row's, the other rows' caches stay as they
  were (zero), on one device and on data=2 x model=4."""
  from jaxpar.runtime.decoder import Decoder
  gen = build(gen_config, devices, data, 1, model)
  decoder, length = Decoder(gen, 8, 16), 16
  prefill, greedy = decoder.prefill(1, 8), sampling.Sampling().rows(1)
  full = decoder.jit(decoder.step_fn(greedy=True, span=length))
  per = 8 // data
  for A in rows:
    part = decoder.jit(decoder.step_fn(greedy=True, span=length, rows=A))
    active = [g * per + a for g in range(data) for a in range(A)]
    runs = []
    for step in (full, part):
      with jax.set_mesh(gen.mesh):
        state, out = decoder.empty_state(), []
        for i, row in enumerate(active):
          padded = np.zeros((1, 8), np.int32)
          padded[0, :3] = [3 + i, 5, 7]
          _, state = prefill(gen.params, state, padded, np.int32(0), np.array([3]),
                             np.int32(0), np.int32(row), greedy, np.zeros(1, np.uint32),
                             np.full(1, -1, np.int32))
        for _ in range(4):
          tokens, state = step(gen.params, state)
          out.append(np.asarray(tokens))
      runs.append((np.array(out), jax.tree.map(np.asarray, state.caches)))
    (every, every_caches), (mine, my_caches) = runs
    np.testing.assert_array_equal(mine, every[:, active])
    rows_of = lambda a, which: np.take(a, which, axis=int(decoder.scan))
    idle = [b for b in range(8) if b not in active]
    for a, b in zip(jax.tree.leaves(every_caches), jax.tree.leaves(my_caches)):
      # (float32 products of 1 row and of 8 sum in different orders)
      np.testing.assert_allclose(rows_of(b, active), rows_of(a, active), rtol=1e-5, atol=1e-5)
      assert not rows_of(b, idle).any()
