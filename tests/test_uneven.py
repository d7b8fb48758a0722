"""Uneven stages: a layer count that stages x repeats does not divide runs with chunks that
differ by one layer at most, padded with identity layers. Logits and greedy tokens equal the
single device (GPT-2's 12 layers on 5 stages, Llama 3.2 1B's 16 on 3), and the planner
counts the padding."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxpar import config as config_lib
from jaxpar import plan, plan_report
from jaxpar.config import MeshConfig, PipelineConfig
from jaxpar.mesh import make_mesh
from jaxpar.parallel import pipeline
from jaxpar.runtime import generate, inference

# init_std 0.1: 16 layers at tiny.yaml's 0.2 grow logits to ~7, where float32 rounding alone
# differs by 2e-5 between two batch sizes on one device, without any pipeline.
LLAMA = dict(family="llama", n_kv_heads=2, tie_embeddings=False, init_std=0.1)


def test_layer_slots_by_hand():
  # 12 layers on 5 stages: 3, 3, 2, 2, 2 layers in slots of 3; -1 is identity padding.
  assert pipeline.staged_layers(12, stages=5)[:, 0].tolist() == [
      [0, 1, 2], [3, 4, 5], [6, 7, -1], [8, 9, -1], [10, 11, -1]]
  assert pipeline.staged_layers(16, stages=3)[:, 0].tolist() == [
      [0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, -1], [11, 12, 13, 14, 15, -1]]
  # Circular, 7 layers in 2 stages x 2 repeats: chunk k = r*S + s holds 2, 2, 2, 1 layers.
  assert pipeline.staged_layers(7, stages=2, repeats=2).tolist() == [
      [[0, 1], [4, 5]], [[2, 3], [6, -1]]]
  assert pipeline.active(8, stages=2, repeats=2) is None  # even: no padding, no flags


@pytest.mark.parametrize("n_layers,stages,repeats", [(12, 5, 1), (7, 2, 2), (16, 3, 1)])
def test_regrouping_round_trips(n_layers, stages, repeats):
  x = np.arange(n_layers * 2, dtype=np.float32).reshape(n_layers, 2)
  staged = pipeline.to_stages(x, stages=stages, repeats=repeats)
  slots = pipeline.staged_layers(n_layers, stages=stages, repeats=repeats)
  assert staged.shape[:3] == slots.shape
  np.testing.assert_array_equal(staged[slots >= 0], x[slots[slots >= 0]])
  assert not staged[slots < 0].any()
  np.testing.assert_array_equal(pipeline.from_stages(staged, n_layers=n_layers), x)


def uneven(tiny, n_layers, data, stage, model, microbatches, repeats=1, **model_fields):
  return dataclasses.replace(
      tiny, mesh=MeshConfig(data, stage, model),
      pipeline=PipelineConfig(microbatches, repeats),
      model=config_lib.replace_model(tiny.model, n_layers=n_layers, **model_fields),
      run=dataclasses.replace(tiny.run, batch=data * microbatches))


# (layers, data, stage, model, microbatches, repeats, family)
# Circular repeats with uneven chunks run in tests/test_properties.py (e.g. 10 layers in
# 4 stages x 2 repeats).
FORWARD = [(12, 1, 5, 1, 5, 1, {}), (16, 1, 3, 2, 6, 1, LLAMA)]


@pytest.mark.parametrize("layers,data,stage,model,microbatches,repeats,fields", FORWARD)
def test_uneven_forward_equals_one_device(tiny, devices, layers, data, stage, model,
                                          microbatches, repeats, fields):
  config = uneven(tiny, layers, data, stage, model, microbatches, repeats, **fields)
  fwd = inference.build(config, make_mesh(config.mesh, devices=devices[:data * stage * model]))
  slots = pipeline.per_chunk(layers, stages=stage, repeats=repeats)
  assert jax.tree.leaves(fwd.params["blocks"])[0].shape[:3] == (stage, repeats, slots)
  tokens = inference.seeded_tokens(config)
  got = inference.unpad(fwd(fwd.tokens(tokens)), config.model.vocab_size)
  want = inference.reference_logits(fwd, tokens)  # sequential layers on one device
  assert np.max(np.abs(got - want)) < 1e-5


PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11], [3, 3, 3, 3, 3, 3], [5], [6, 7]]


@pytest.mark.parametrize("layers,stage,model,fields", [(12, 5, 1, {}), (16, 3, 2, LLAMA)])
def test_uneven_pipelined_decode_equals_one_device(tiny, devices, layers, stage, model,
                                                   fields):
  config = uneven(tiny, layers, 1, stage, model, stage, **fields)
  sharded = generate.build(config, make_mesh(config.mesh, devices=devices[:stage * model]),
                           eos_id=-1)
  assert sharded.schedule is not None
  got = sharded.generate(PROMPTS, max_new_tokens=6).tokens
  # Each stage holds ceil(L / S) layer slots: keys and values of B rows x T positions of the
  # key/value heads on one device (issue 25: this raised an IndivisibleError).
  m, T = config.model, 16
  heads = max(m.kv_heads, model) // model
  want_bytes = 2 * -(-layers // stage) * len(PROMPTS) * heads * m.head_size * T * 4
  assert sharded.cache_bytes_per_device(len(PROMPTS), T) == want_bytes
  one = dataclasses.replace(config, mesh=MeshConfig(1, 1, 1))
  single = generate.build(one, make_mesh(one.mesh, devices=devices[:1]), eos_id=-1)
  single.stacked = jax.device_put(sharded.natural_params(), devices[0])
  single.layers = None  # run the stacked parameters given above
  single.scan = True
  want = single.generate(PROMPTS, max_new_tokens=6).tokens
  assert np.mean([len(set(row)) for row in want]) > 2  # the context matters
  np.testing.assert_array_equal(got, want)


def test_planner_counts_the_padding(tiny, devices):
  config = uneven(tiny, 7, 1, 2, 2, 4, **LLAMA)
  config = dataclasses.replace(config, mesh=config_lib.MeshConfig())
  plans, _ = plan.rank(config, 8, plan.hardware("cpu"))
  staged = {(p.candidate.data, p.candidate.stage, p.candidate.model, p.candidate.repeats): p
            for p in plans}
  p = staged[(1, 4, 2, 1)]  # 7 layers in 4 stages: 2, 2, 2, 1 (slots of 2)
  assert p.predicted["stage_balance"] == 7 / 8
  parts = plan.param_bytes(config, p.candidate)
  assert parts["blocks"] == 2 * parts["per_layer"]  # 2 slots per stage, padding included
  compiled = plan_report.compile_plan(config, p, devices)
  assert compiled["param_bytes_per_device"] == p.predicted["param_bytes_per_device"]
  assert compiled["collectives"] == p.predicted["collectives"]


def test_uneven_stages_read_a_hf_checkpoint(root, devices, hf_checkpoint):
  """4 checkpoint layers on 3 stages (2, 1, 1): padding slots are zeros, never read."""
  sets = [f"model.checkpoint={hf_checkpoint}", "run.batch=3", "pipeline.microbatches=3"]
  config = config_lib.load(root / "configs" / "tiny.yaml",
                           sets + ["mesh.data=1", "mesh.stage=3", "mesh.model=1"])
  fwd = inference.build(config, make_mesh(config.mesh, devices=devices[:3]))
  assert jax.tree.leaves(fwd.params["blocks"])[0].shape[:3] == (3, 1, 2)
  one = config_lib.load(root / "configs" / "tiny.yaml", sets + ["mesh.data=1"])
  single = inference.build(one, make_mesh(one.mesh, devices=devices[:1]))
  tokens = inference.seeded_tokens(config)
  got = inference.unpad(fwd(fwd.tokens(tokens)), config.model.vocab_size)
  want = inference.unpad(single(single.tokens(tokens)), config.model.vocab_size)
  assert np.max(np.abs(got - want)) < 1e-5
