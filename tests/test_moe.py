"""Mixtures of experts (Mixtral, Qwen3-MoE) from checkpoints written by `transformers`: logits
and greedy tokens equal `transformers` on one device and on (data, stage, expert, model)
factorisations of 8 devices, dropless routing against NumPy, the compiled all-to-alls, and
one-line errors."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpar import axes, inspect, quant
from jaxpar import config as config_lib
from jaxpar.config import MeshConfig
from jaxpar.errors import UserError
from jaxpar.mesh import make_mesh
from jaxpar.models import moe
from jaxpar.rules import Rules, use_rules
from jaxpar.runtime import generate, inference
from tests.conftest import write_hf_decoder
from tests.test_llama import PROMPTS, hf_logits, transformers_greedy

# 8 experts of width 48, top 2, over the shared test shape (vocabulary 251: no axis divides it).
OPTIONS = {"mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
           "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                             norm_topk_prob=True, head_dim=16)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
  return {f: write_hf_decoder(tmp_path_factory.mktemp(f), f, **o) for f, o in OPTIONS.items()}


def load(root, checkpoint, *overrides) -> config_lib.Config:
  return config_lib.load(root / "configs" / "tiny.yaml",
                         [f"model.checkpoint={checkpoint}", *overrides])


def on(config, devices, data, stage, expert, model, **changes):
  mesh = MeshConfig(data=data, stage=stage, expert=expert, model=model)
  config = dataclasses.replace(config, mesh=mesh, **changes)
  if stage > 1:
    config = dataclasses.replace(config, pipeline=dataclasses.replace(config.pipeline,
                                                                      microbatches=stage))
  return config, make_mesh(mesh, devices=devices[:data * stage * expert * model])


# (family, data, stage, expert, model): experts split 2, 4 and 8 ways alone, with tensor
# parallelism inside each expert, with a pipeline, with data parallelism; and replicated.
MATRIX = [("mixtral", 1, 1, 1, 1), ("mixtral", 1, 1, 8, 1), ("mixtral", 1, 1, 2, 4),
          ("mixtral", 2, 2, 2, 1), ("qwen3_moe", 1, 1, 4, 1), ("qwen3_moe", 2, 1, 2, 2),
          ("qwen3_moe", 1, 2, 2, 2), ("qwen3_moe", 4, 1, 1, 2)]


@pytest.fixture(scope="module")
def hf_greedy(checkpoints) -> dict:
  """transformers' greedy tokens of PROMPTS, one prompt at a time, per family."""
  return {f: transformers_greedy(c) for f, c in checkpoints.items()}


@pytest.fixture(scope="module")
def hf_seeded_logits(root, checkpoints) -> dict:
  return {f: hf_logits(c, inference.seeded_tokens(load(root, c))) for f, c in checkpoints.items()}


@pytest.mark.parametrize("family,data,stage,expert,model", MATRIX)
def test_logits_equal_transformers(root, devices, checkpoints, hf_seeded_logits, family, data,
                                   stage, expert, model):
  config, mesh = on(load(root, checkpoints[family]), devices, data, stage, expert, model)
  fwd = inference.build(config, mesh)
  got = inference.unpad(fwd(fwd.tokens(inference.seeded_tokens(config))), 251)
  expected = hf_seeded_logits[family]
  assert np.abs(expected).max() > 1.0
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


# Generation: every row's tokens split over data x expert, and (rules.batch=data) the tokens
# replicated over the expert axis, whose devices sum their experts' outputs.
GREEDY = [("mixtral", 1, 1, 1, 1, "data"), ("mixtral", 2, 1, 4, 1, None),
          ("qwen3_moe", 1, 2, 2, 2, None), ("qwen3_moe", 1, 1, 8, 1, "data")]


@pytest.mark.parametrize("family,data,stage,expert,model,batch_rule", GREEDY)
def test_greedy_equals_transformers(root, devices, checkpoints, hf_greedy, family, data, stage,
                                    expert, model, batch_rule):
  config = load(root, checkpoints[family])
  if batch_rule:
    config = dataclasses.replace(config, rules=Rules(config.rules).replace(
        axes.BATCH, batch_rule).table)
  config, mesh = on(config, devices, data, stage, expert, model)
  gen = generate.build(config, mesh, eos_id=-1)
  tokens = gen.generate(PROMPTS, max_new_tokens=10).tokens
  np.testing.assert_array_equal(tokens, hf_greedy[family])


def hf_expert_tokens(checkpoint, tokens) -> np.ndarray:
  """[L, E]: how many of `tokens`' tokens each layer's router sent to each expert in
  transformers (its router logits, top 2 of the softmax)."""
  import torch

  from tests.test_llama import hf_model
  with torch.no_grad():
    logits = hf_model(checkpoint)(torch.as_tensor(tokens), output_router_logits=True
                                  ).router_logits
  chosen = [torch.topk(torch.softmax(l.float(), -1), 2, dim=-1).indices for l in logits]
  return np.stack([np.bincount(c.numpy().ravel(), minlength=8) for c in chosen])


@pytest.mark.parametrize("family,data,stage,expert,model,batch_rule", [
    ("mixtral", 1, 1, 1, 1, None), ("mixtral", 1, 1, 4, 2, None),
    ("qwen3_moe", 1, 3, 2, 1, None), ("qwen3_moe", 1, 1, 8, 1, "data")])
def test_expert_token_counts_equal_transformers_routing(root, devices, checkpoints, family,
                                                        data, stage, expert, model,
                                                        batch_rule):
  """`Forward.expert_tokens` (forward --json's `experts`): each layer's counts equal those of
  transformers' router on the same batch (exchanged; pipelined over 3 stages, where 2 of the
  6 layer slots are padding; and replicated over the expert axis), and sum to tokens x top
  2."""
  config = load(root, checkpoints[family], "run.batch=12")
  if batch_rule:
    config = dataclasses.replace(config, rules=Rules(config.rules).replace(
        axes.BATCH, batch_rule).table)
  config, mesh = on(config, devices, data, stage, expert, model)
  fwd = inference.build(config, mesh)
  tokens = inference.seeded_tokens(config)
  counts = fwd.expert_tokens(fwd.tokens(tokens))
  np.testing.assert_array_equal(counts, hf_expert_tokens(checkpoints[family], tokens))
  assert (counts.sum(1) == 12 * config.run.seq_len * 2).all()


def _reference(x, weights, experts, w_gate, w_up, w_down) -> np.ndarray:
  """NumPy float64: sum over k of weights * SwiGLU of expert experts[..., k]."""
  x, out = np.float64(x), 0.0
  for j in range(experts.shape[-1]):
    e = experts[..., j]
    g = np.einsum("btd,btfd->btf", x, np.float64(w_gate)[e])
    u = np.einsum("btd,btfd->btf", x, np.float64(w_up)[e])
    h = g / (1 + np.exp(-g)) * u
    out = out + weights[..., j, None] * np.einsum("btf,btdf->btd", h, np.float64(w_down)[e])
  return out


@pytest.mark.parametrize("data,expert,model,pick,mode,T", [
    (2, 4, 1, "one", None, 5), (1, 8, 1, "one", None, 5), (1, 2, 4, "spread", None, 5),
    (8, 1, 1, "one", None, 5), (2, 4, 1, "spread", None, 5), (1, 4, 2, "spread", "int8", 5),
    (2, 4, 1, "one", "int8", 5), (1, 2, 4, "spread", None, 1), (1, 4, 2, "spread", "int8", 1)])
def test_dropless_when_every_token_picks_the_same_experts(devices, data, expert, model, pick,
                                                          mode, T):
  """All 8 x T x 2 (token, expert) pairs to experts 3 and 2 (one device holds both when
  expert=4: every other device's chunks are all padding), or spread at random; T = 1: a
  decode step's few pairs, one row a trip. A token's experts are written in its first two
  features, read by the router given here. int8 experts against float products of their
  dequantised weights."""
  E, D, F, B = 8, 16, 24, 8
  rng = np.random.default_rng(0)
  experts = (np.broadcast_to(np.array([3, 2], np.int32), (B, T, 2)) if pick == "one" else
             np.stack([rng.permutation(E)[:2] for _ in range(B * T)]).reshape(B, T, 2))
  x = rng.normal(size=(B, T, D)).astype(np.float32)
  x[..., :2] = experts
  weights = 0.2 + 0.1 * experts
  w_gate, w_up = (rng.normal(size=(E, F, D)).astype(np.float32) * 0.3 for _ in range(2))
  w_down = rng.normal(size=(E, D, F)).astype(np.float32) * 0.3
  if mode:
    q = [quant.quantize_array(jnp.asarray(w), mode) for w in (w_gate, w_up, w_down)]
    w_gate, w_up, w_down = (np.asarray(quant.dequantize(w)) for w in q)
  route = lambda x_ND: (0.2 + 0.1 * x_ND[:, :2], x_ND[:, :2].astype(jnp.int32))
  mesh = make_mesh(MeshConfig(data=data, expert=expert, model=model),
                   devices=devices[:data * expert * model])
  rules = Rules()
  put = lambda a, *names: jax.device_put(a, rules.sharding(names, mesh))
  names = [(axes.EXPERTS, axes.MLP, axes.EMBED)] * 2 + [(axes.EXPERTS, axes.EMBED, axes.MLP)]
  experts_args = ([put(w, *n) for w, n in zip((w_gate, w_up, w_down), names)] if not mode else
                  [quant.QWeight(put(w.values, *n), put(w.scale, *n[:2], None), mode)
                   for w, n in zip(q, names)])
  args = (put(x, axes.BATCH, axes.SEQ, None), put(np.zeros((E, D), np.float32), None, None),
          *experts_args)
  with jax.set_mesh(mesh), use_rules(rules):
    got = jax.jit(functools.partial(moe.experts_mlp, top_k=2, norm_topk=False,
                                    route_fn=route))(*args)
  want = _reference(x, weights, experts, w_gate, w_up, w_down)
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5 if not mode else 2e-4)


def test_route_is_the_softmax_top_k():
  logits = jnp.array([[0.0, 2.0, 1.0, -1.0]])
  probs = np.exp(logits[0]) / np.exp(logits[0]).sum()
  w, e = moe.route(logits, 2, norm_topk=False)
  assert e.tolist() == [[1, 2]]
  np.testing.assert_allclose(w[0], probs[[1, 2]], rtol=1e-6)
  w, _ = moe.route(logits, 2, norm_topk=True)
  np.testing.assert_allclose(w[0], probs[[1, 2]] / probs[[1, 2]].sum(), rtol=1e-6)


@pytest.mark.parametrize("data,expert,model", [(1, 8, 1), (2, 2, 2)])
def test_two_all_to_alls_per_layer_and_no_expert_weight_gathered(
    root, devices, checkpoints, data, expert, model):
  """Per MoE layer two all-to-alls: the rows out ([expert, rows, D], with the counts
  [expert, local experts] int32 packed beside them) and back; no all-gather."""
  T = 16
  config, mesh = on(load(root, checkpoints["mixtral"], "model.scan_layers=true",
                         f"run.seq_len={T}"), devices,
                    data, 1, expert, model)
  fwd = inference.build(config, mesh)
  c = inspect.hlo_census(fwd.compile(fwd.tokens(inference.seeded_tokens(config))).as_text())
  assert "all-gather" not in c.counts()
  assert c.count("all-to-all", in_loop=True) == 2 == c.count("all-to-all")
  rows = 8 // (data * expert) * T * 2  # a device's (token, expert) pairs
  sizes = sorted(x.bytes for x in c.collectives if x.kind == "all-to-all")
  assert sizes == [expert * rows * 64 * 4, expert * rows * 64 * 4 + 8 * 4]


@pytest.mark.parametrize("data,stage,expert,model", [(1, 1, 4, 2), (2, 1, 2, 2)])
def test_server_greedy_equals_transformers(root, devices, checkpoints, hf_greedy, data, stage,
                                           expert, model):
  """The serving engine (continuous batching, slots split over data x expert) on Mixtral:
  each request's tokens equal transformers generating it alone. (A pipelined server is left
  out: on 8 emulated CPU devices its step deadlocked about once in 15 runs, XLA:CPU running
  the step's collectives in different orders on different devices.)"""
  from jaxpar import serve
  config, mesh = on(load(root, checkpoints["mixtral"], "serve.max_slots=4",
                         "serve.min_bucket=16", "serve.precompile=false"),
                    devices, data, stage, expert, model)
  engine = serve.build(config, mesh, progress=False).start()
  try:
    streams = [engine.submit(p, serve.Params(max_tokens=10, ignore_eos=True))
               for p in PROMPTS]
    got = [[t for out in stream for t in out.token_ids] for stream in streams]
  finally:
    engine.stop()
  np.testing.assert_array_equal(got, hf_greedy["mixtral"])


def test_checkpoint_saved_on_one_expert_split_restores_on_another(root, devices, checkpoints,
                                                                  hf_greedy, tmp_path, capsys):
  """`convert` on expert=4 x model=2 writes an Orbax checkpoint; restored on data=2 x
  expert=2 x model=2 it generates transformers' tokens, and exported back to Hugging Face
  its logits equal the original's."""
  from jaxpar import cli
  source = checkpoints["qwen3_moe"]
  saved = tmp_path / "orbax"
  code = cli.main(["convert", "--config", str(root / "configs" / "tiny.yaml"), "--set",
                   f"model.checkpoint={source}", "--set", "mesh.data=1", "--set",
                   "mesh.expert=4", "--set", "mesh.model=2", "--out", str(saved)])
  assert code == 0, capsys.readouterr().err
  config, mesh = on(load(root, saved), devices, 2, 1, 2, 2)
  tokens = generate.build(config, mesh, eos_id=-1).generate(PROMPTS, max_new_tokens=10).tokens
  np.testing.assert_array_equal(tokens, hf_greedy["qwen3_moe"])
  exported = tmp_path / "hf"
  code = cli.main(["convert", "--config", str(root / "configs" / "tiny.yaml"), "--set",
                   f"model.checkpoint={saved}", "--format", "hf", "--out", str(exported)])
  assert code == 0, capsys.readouterr().err
  ids = np.random.default_rng(0).integers(0, 251, (2, 12))
  np.testing.assert_allclose(hf_logits(exported, ids), hf_logits(source, ids), rtol=0,
                             atol=1e-5)


def test_planned_expert_layouts_equal_compiled(root, devices):
  """The planner offers expert splits that divide the experts; for each kind of layout its
  predicted parameter bytes and collectives (all-to-alls included) equal the compiled ones.
  With a pipeline, those of the layer and tick loops: outside them XLA regroups the batch
  (split over data x expert, the stage axis between them in the mesh) into microbatches with
  two collective-permutes the planner does not predict."""
  from jaxpar import plan, plan_report
  config = config_lib.load(root / "configs" / "tiny.yaml", [
      "model.family=mixtral", "model.n_experts=4", "model.n_kv_heads=2",
      "model.tie_embeddings=false", "model.n_layers=8"])
  plans, rejected = plan.rank(config, 8, plan.hardware("cpu"))
  assert rejected == {}
  splits = {p.candidate.expert for p in plans}
  assert splits == {1, 2, 4}  # 8 does not divide 4 experts
  wanted = {(1, 1, 8, 1), (2, 1, 1, 4), (1, 1, 4, 2), (1, 2, 2, 2)}  # data, stage, model, expert
  checked = {}
  for p in plans:
    c = p.candidate
    key = (c.data, c.stage, c.model, c.expert)
    if key in wanted and not c.fsdp and key not in checked:
      checked[key] = p
  assert set(checked) == wanted
  for key, p in checked.items():
    compiled = plan_report.compile_plan(config, p, devices)
    assert p.predicted["param_bytes_per_device"] == compiled["param_bytes_per_device"], key
    assert p.predicted["collectives_in_loop"] == compiled["collectives_in_loop"], key
    if p.candidate.stage == 1:
      assert p.predicted["collectives"] == compiled["collectives"], key


def test_int8_experts_on_an_expert_mesh_equal_one_device(root, devices, checkpoints):
  """int8 weights (experts quantised per row, the router float) on expert=4 x model=2 give the
  logits of the same int8 model on one device."""
  logits = {}
  for mesh_sizes in [(1, 1, 1, 1), (1, 1, 4, 2)]:
    config, mesh = on(load(root, checkpoints["mixtral"], "model.quantize=int8"), devices,
                      *mesh_sizes)
    fwd = inference.build(config, mesh)
    assert fwd.params["blocks"]["mlp"]["w_gate"].values.dtype == jnp.int8
    logits[mesh_sizes] = inference.unpad(fwd(fwd.tokens(inference.seeded_tokens(config))), 251)
  np.testing.assert_allclose(logits[(1, 1, 4, 2)], logits[(1, 1, 1, 1)], rtol=0, atol=1e-4)


@pytest.mark.parametrize("overrides,message", [
    (["rules.experts=[expert,model]"], "rules.experts=['expert', 'model'] and rules.batch="
                                       "['data', 'expert']: the experts' mesh axes must all "
                                       "split the batch, or none of them"),
    (["model.family=llama", "model.n_experts=4"], "model.n_experts=4: model.family=llama has a "
                                                  "dense MLP"),
    (["model.family=mixtral"], "model.n_experts=0: model.family=mixtral needs at least one"),
    (["model.family=mixtral", "model.n_experts=4", "model.experts_per_token=5"],
     "model.experts_per_token=5: must be 1 to model.n_experts=4"),
])
def test_config_errors(root, overrides, message):
  with pytest.raises(UserError, match=re.escape(message)):
    config_lib.load(root / "configs" / "tiny.yaml", overrides)


def test_qwen3_moe_with_dense_layers_is_refused(root, checkpoints, tmp_path):
  import json
  import shutil
  dense = tmp_path / "dense"
  shutil.copytree(checkpoints["qwen3_moe"], dense)
  raw = json.loads((dense / "config.json").read_text())
  (dense / "config.json").write_text(json.dumps({**raw, "mlp_only_layers": [1]}))
  with pytest.raises(UserError, match=re.escape("mlp_only_layers=[1]: some layers have a dense "
                                                "MLP")):
    load(root, dense)
