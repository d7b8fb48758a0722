"""int8 weights (model.quantize) and int8 KV caches (model.kv_cache_dtype).

Stated up front, on the tiny models (init_std 0.2, so logits differ clearly between tokens),
over the 8 x 16 seeded tokens: against float32 on the same mesh, the largest logit
difference is at most 8% of the largest float32 logit and the top-1 next token agrees at
least 90% of the time (measured: 2.5-6.6% and 93-95%). Weight-only int8 sharded equals
weight-only int8 on one device to 1e-5 (the scales are computed over whole rows either way);
int8-dynamic quantises activations at run time, where a last-bit difference between meshes
may round a value the other way, so it is held to the float32 tolerance only.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpar import cli, quant
from jaxpar import config as config_lib
from jaxpar.config import MeshConfig
from jaxpar.errors import UserError
from jaxpar.mesh import make_mesh, single_device_mesh
from jaxpar.models import attention, base
from jaxpar.runtime import generate, inference, slots, state
from jaxpar.rules import Rules, tree_shardings, use_rules

REL_TOL, TOP1 = 0.08, 0.90
LLAMA = dict(family="llama", n_kv_heads=2, tie_embeddings=False)
_LOGITS = {}


def _config(tiny, mesh, **model):
  return dataclasses.replace(tiny, mesh=MeshConfig(*mesh),
                             model=config_lib.replace_model(tiny.model, **model))


def logits(tiny, devices, mesh, **model):
  """Logits of the seeded batch (cached: each model is built once per session)."""
  key = (mesh, tuple(sorted(model.items())))
  if key not in _LOGITS:
    config = _config(tiny, mesh, **model)
    fwd = inference.build(config, make_mesh(config.mesh, devices=devices[:math.prod(mesh)]))
    tokens = inference.seeded_tokens(config)
    _LOGITS[key] = inference.unpad(fwd(fwd.tokens(tokens)), config.model.vocab_size)
  return _LOGITS[key]


# (family options, quantize, (data, stage, model))
CASES = [({}, "int8", (1, 1, 1)), ({}, "int8", (2, 1, 4)), ({}, "int8", (2, 2, 2)),
         ({}, "int8-dynamic", (1, 1, 1)), ({}, "int8-dynamic", (2, 1, 4)),
         ({}, "int8-dynamic", (2, 2, 2)), (LLAMA, "int8", (1, 1, 1)),
         (LLAMA, "int8", (2, 1, 4)), (LLAMA, "int8-dynamic", (2, 2, 2))]


@pytest.mark.parametrize("family,mode,mesh", CASES)
def test_int8_logits_near_float32(tiny, devices, family, mode, mesh):
  want = logits(tiny, devices, mesh, **family)  # float32 on the same mesh (same layout)
  got = logits(tiny, devices, mesh, quantize=mode, **family)
  assert np.abs(got - want).max() <= REL_TOL * np.abs(want).max()
  assert (got.argmax(-1) == want.argmax(-1)).mean() >= TOP1
  assert np.abs(got - want).max() > 0  # quantised for real


@pytest.mark.parametrize("mesh", [(2, 1, 4), (2, 2, 2)])
def test_int8_sharded_equals_one_device(tiny, devices, mesh):
  np.testing.assert_allclose(logits(tiny, devices, mesh, quantize="int8"),
                             logits(tiny, devices, (1, 1, 1), quantize="int8"), atol=1e-5)


def test_int8_bytes_per_device_hand_count(tiny, devices):
  config = _config(tiny, (2, 1, 4), quantize="int8")
  fwd = inference.build(config, make_mesh(config.mesh, devices=devices))
  L, D, F, P = 2, 64, 128, 32          # layers, width (= heads x head width), MLP, positions
  V = 252                               # vocabulary 250 padded to split over model=4
  int8 = L * (3 * D * D // 4 + D * D // 4 + 2 * F * D // 4)  # q k v o up down, split by 4
  scales = 4 * L * (3 * D // 4 + D + F // 4 + D)  # a row each: q k v split, o whole, up, down
  floats = 4 * (L * (3 * D // 4 + D + F // 4 + D + 4 * D) + P * D + 2 * D)  # biases, norms, wpe
  table = V // 4 * D + 4 * V // 4       # wte rows split by 4, one scale per row
  assert state.param_bytes_per_device(fwd.params) == int8 + scales + floats + table
  w_q = fwd.params["blocks"]["attn"]["w_q"]
  assert w_q.values.dtype == jnp.int8 and w_q.values.sharding.spec == w_q.scale.sharding.spec


def test_int8_hlo(tiny, devices):
  """Weight-only: the weights enter the program as int8 (converted in the product);
  int8-dynamic: every product is int8 x int8 with int32 results."""
  n_products = 6 + 1  # q k v o up down in the scanned layer body (once in the text), the head
  for mode in ("int8", "int8-dynamic"):
    config = _config(tiny, (1, 1, 1), quantize=mode)
    fwd = inference.build(config, make_mesh(config.mesh, devices=devices[:1]))
    text = fwd.compile(fwd.tokens(inference.seeded_tokens(config))).as_text()
    entry = text[text.index("ENTRY"):].split("\n")[0]
    assert entry.count("s8[") == 7  # the stacked q k v o up down and the table
    assert "f32[2,64,64]" not in entry and "f32[250,64]" not in entry
    int_dots = len([l for l in text.split("\n") if " dot(" in l and "= s32[" in l])
    assert int_dots == (n_products if mode == "int8-dynamic" else 0)


# ---- the KV cache ----

def test_int8_attention_near_float(tiny, devices):
  """One decode step over a 40-slot cache: int8 keys and values (per token and head)."""
  with jax.set_mesh(single_device_mesh(devices[0])), use_rules(Rules(tiny.rules)):
    _int8_attention_near_float()


def _int8_attention_near_float():
  k = jax.random.split(jax.random.key(0), 3)
  q_BTNH = jax.random.normal(k[0], (2, 1, 8, 16))
  k_BTKH, v_BTKH = (jax.random.normal(x, (2, 40, 4, 16)) for x in k[1:])
  step = base.Step(jnp.zeros((2, 1), jnp.int32), jnp.ones((2, 1, 40), bool), 0)
  cache = {"k": jnp.zeros((2, 4, 16, 40), jnp.int8), "v": jnp.zeros((2, 4, 40, 16), jnp.int8),
           "k_scale": jnp.zeros((2, 4, 40), jnp.float16),
           "v_scale": jnp.zeros((2, 4, 40), jnp.float16)}
  keys, values, new = attention.write_cache(cache, k_BTKH, v_BTKH, step)
  got = attention.attend(q_BTNH, keys, values, step)
  want = attention.attend(q_BTNH, *attention.write_cache(None, k_BTKH, v_BTKH, step)[:2], step)
  assert new["k"].dtype == jnp.int8 and new["k_scale"].dtype == jnp.float16
  assert 0 < np.abs(got - want).max() <= 0.02 * np.abs(want).max()


def _teacher_forced(gen, tokens_BT):
  """Logits at every position of `tokens_BT` computed through a fresh KV cache (the
  prefill's path): float or int8, as the generator's config says."""
  B, T = tokens_BT.shape

  def run(params):
    model, graphdef, layers = gen.model_parts(params)
    step = base.causal_step(B, T, T + 1)
    caches = slots.new_caches(gen, B, T + 1, scan=gen.scan)
    x_BTD = model.embed(jnp.asarray(tokens_BT), step.positions_BT)
    x_BTD, _ = base.run_blocks(graphdef, layers, x_BTD, step, caches, scan=gen.scan)
    return model.head(x_BTD)

  with jax.set_mesh(gen.mesh), use_rules(gen.rules, keys=gen.family.config_keys):
    out = jax.jit(run)(gen.params)
  return np.asarray(out)[..., :gen.config.model.vocab_size]


@pytest.mark.parametrize("mesh", [(1, 1, 1), (2, 1, 4)])
def test_int8_kv_cache_logits_near_float(tiny, devices, mesh):
  tokens = inference.seeded_tokens(tiny)
  out = {}
  for dtype in ("", "int8"):
    config = _config(tiny, mesh, kv_cache_dtype=dtype)
    gen = generate.build(config, make_mesh(config.mesh, devices=devices[:math.prod(mesh)]),
                         eos_id=-1)
    out[dtype] = _teacher_forced(gen, tokens)
  want, got = out[""], out["int8"]
  assert 0 < np.abs(got - want).max() <= REL_TOL * np.abs(want).max()
  assert (got.argmax(-1) == want.argmax(-1)).mean() >= TOP1


def test_int8_kv_cache_generates_on_meshes(tiny, devices):
  """Greedy tokens with an int8 cache: the same on 2x2x2 (pipelined) as on one device."""
  prompts = inference.seeded_tokens(tiny)[:, :6].tolist()
  tokens = []
  for mesh in [(1, 1, 1), (2, 2, 2)]:
    config = _config(tiny, mesh, kv_cache_dtype="int8", n_layers=4)
    gen = generate.build(config, make_mesh(config.mesh, devices=devices[:math.prod(mesh)]),
                         eos_id=-1)
    tokens.append(gen.generate(prompts, max_new_tokens=6).tokens)
  np.testing.assert_array_equal(tokens[0], tokens[1])


def test_int8_weights_generate_on_meshes(tiny, devices):
  """Greedy tokens with int8 weights: the same on 2x1x4 (unrolled layers, each its own
  buffer) and 2x2x2 (pipelined) as on one device, and not all the float32 model's (the
  weights were quantised)."""
  prompts = inference.seeded_tokens(tiny)[:, :6].tolist()
  tokens = {}
  for mesh, mode in [((1, 1, 1), "int8"), ((2, 1, 4), "int8"), ((2, 2, 2), "int8"),
                     ((1, 1, 1), "none")]:
    config = _config(tiny, mesh, quantize=mode, n_layers=4, init_std=0.3)
    gen = generate.build(config, make_mesh(config.mesh, devices=devices[:math.prod(mesh)]),
                         eos_id=-1)
    tokens[mesh, mode] = gen.generate(prompts, max_new_tokens=6).tokens
  np.testing.assert_array_equal(tokens[(2, 1, 4), "int8"], tokens[(1, 1, 1), "int8"])
  np.testing.assert_array_equal(tokens[(2, 2, 2), "int8"], tokens[(1, 1, 1), "int8"])
  assert not np.array_equal(tokens[(1, 1, 1), "int8"], tokens[(1, 1, 1), "none"])


def test_int8_kv_cache_bytes_hand_count(tiny, devices):
  config = _config(tiny, (2, 1, 4), kv_cache_dtype="int8")
  gen = generate.build(config, make_mesh(config.mesh, devices=devices), eos_id=-1)
  L, B, S, K, H = 2, 8, 24, 8, 8  # layers, batch, slots, heads, head width
  per_leaf = L * (B // 2) * (K // 4) * S  # tokens x heads one device holds
  assert gen.cache_bytes_per_device(B, S) == 2 * per_leaf * H + 2 * per_leaf * 2
  float32 = dataclasses.replace(config, model=dataclasses.replace(config.model,
                                                                  kv_cache_dtype=""))
  gen32 = generate.build(float32, make_mesh(config.mesh, devices=devices), eos_id=-1)
  assert gen32.cache_bytes_per_device(B, S) == 2 * per_leaf * H * 4


# ---- errors ----

@pytest.mark.parametrize("key,value", [("quantize", "int4"), ("kv_cache_dtype", "fp8")])
def test_bad_quantize_options(root, key, value):
  with pytest.raises(UserError, match=f"model.{key}={value!r}: expected one of"):
    config_lib.load(root / "configs" / "tiny.yaml", [f"model.{key}={value}"])


def test_convert_refuses_quantized(root, tmp_path, capsys):
  code = cli.main(["convert", "--config", str(root / "configs" / "tiny.yaml"), "--set",
                   "model.quantize=int8", "--out", str(tmp_path / "ckpt")])
  err = capsys.readouterr().err
  assert code == 2 and "model.quantize=int8: convert writes float weights" in err
  assert "Traceback" not in err


def test_int8_from_given_parameters(tiny, devices):
  """Float parameters handed to `build` are quantised on the mesh as numpy quantises them
  (absmax / 127 per row, rounded); a quantised model's own parameters (`natural_params`, as
  the verify reference uses them) are placed as they are."""
  one = make_mesh(MeshConfig(1, 1, 1), devices=devices[:1])
  host = inference.build(_config(tiny, (1, 1, 1)), one).natural_params()
  config = _config(tiny, (1, 1, 1), quantize="int8")
  from_float = inference.build(config, one, params=host)
  got = from_float.natural_params()
  floats = dict(jax.tree_util.tree_flatten_with_path(host)[0])
  quantised = jax.tree_util.tree_flatten_with_path(got, is_leaf=quant.is_quantized)[0]
  assert sum(quant.is_quantized(w) for _, w in quantised) >= 2 * config.model.n_layers
  for path, w in quantised:
    if not quant.is_quantized(w):
      continue
    w32 = np.asarray(floats[path], np.float32)
    scale = np.abs(w32).max(-1, keepdims=True) * np.float32(1 / 127)
    np.testing.assert_array_equal(np.asarray(w.scale), scale)
    np.testing.assert_array_equal(np.asarray(w.values), np.clip(np.round(w32 / scale), -127, 127))
  again = inference.build(config, one, params=got)
  tokens = inference.seeded_tokens(config)
  want = inference.unpad(from_float(from_float.tokens(tokens)), config.model.vocab_size)
  np.testing.assert_array_equal(
      inference.unpad(again(again.tokens(tokens)), config.model.vocab_size), want)


@pytest.mark.parametrize("layout", [["mesh.data=2", "mesh.model=4"],
                                    ["mesh.data=2", "mesh.stage=2", "mesh.model=2"]])
def test_int8_checkpoint_quantised_as_each_tensor_is_read(root, devices, tmp_path, monkeypatch,
                                                          layout):
  """A Hugging Face checkpoint with model.quantize=int8, on data x model and on a pipeline
  (blocks regrouped into stages): each tensor is quantised before the next is read, so the
  device arrays alive while loading never exceed the int8 model plus one float tensor
  (loading every float first held the whole float model); the result equals quantising the
  whole float model on the mesh after loading."""
  from jaxpar.hf_files import SafeTensors
  from tests.conftest import write_hf_decoder
  checkpoint = write_hf_decoder(tmp_path / "hf", "llama", num_hidden_layers=8)
  load = lambda *sets: config_lib.load(root / "configs" / "tiny.yaml", [
      f"model.checkpoint={checkpoint}", *layout, *sets])
  mesh = make_mesh(load().mesh, devices=devices)
  floats = inference.build(load(), mesh)
  float_bytes = [leaf.nbytes for leaf in jax.tree.leaves(floats.params)]

  before = {id(a) for a in jax.live_arrays()}
  peak = [0]
  release = SafeTensors.release

  def measured(files):  # after each tensor is read, before it is quantised
    peak[0] = max(peak[0], sum(a.nbytes for a in jax.live_arrays() if id(a) not in before))
    release(files)
  monkeypatch.setattr(SafeTensors, "release", measured)
  int8 = inference.build(load("model.quantize=int8"), mesh)
  int8_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(int8.params))
  assert peak[0] <= int8_bytes + max(float_bytes) < 0.6 * sum(float_bytes)

  want, _ = quant.quantize_params(floats.params, floats.names, "int8",
                                  lambda n: tree_shardings(n, floats.rules, mesh))
  for got, expected in zip(jax.tree.leaves(int8.params), jax.tree.leaves(want)):
    assert got.sharding == expected.sharding
    np.testing.assert_array_equal(got, expected)
