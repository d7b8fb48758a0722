"""The compiled forward contains the analytic minimum of collectives for its layout.

Data parallel inference needs none. Megatron tensor parallelism needs two all-reduces of the
activations per block (after the row-parallel attention output and MLP down projection), one
for the vocab-parallel embedding lookup, none for the tied vocab-parallel logits, and never a
gather of a weight.
"""

import dataclasses

import pytest

from jaxpar import inspect
from jaxpar.config import MeshConfig
from jaxpar.mesh import make_mesh
from jaxpar.runtime import inference


def census_for(config, devices, data, model):
  config = dataclasses.replace(config, mesh=MeshConfig(data=data, stage=1, model=model))
  fwd = inference.build(config, make_mesh(config.mesh, devices=devices[:data * model]))
  compiled = fwd.compile(fwd.tokens(inference.seeded_tokens(config)))
  return inspect.hlo_census(compiled.as_text())


@pytest.mark.parametrize("data", [8, 4, 2, 1])
def test_data_parallel_forward_has_no_collectives(tiny, devices, data):
  census = census_for(tiny, devices, data, 1)
  assert census.collectives == []
  assert list(census.loops.values()) == [tiny.model.n_layers]  # the layer scan


@pytest.mark.parametrize("data,model", [(1, 8), (2, 4), (4, 2), (1, 2)])
def test_tensor_parallel_forward_has_two_all_reduces_per_block(tiny, devices, data, model):
  census = census_for(tiny, devices, data, model)
  # One loop: the scan over layers, so its body is one block.
  assert list(census.loops.values()) == [tiny.model.n_layers]
  assert census.counts(in_loop=True) == {
      "all-reduce": {"count": 2, "bytes": 2 * activation_bytes(tiny, data)}}
  # Outside the loop: only the embedding lookup's all-reduce (masked local gather + sum).
  assert census.counts(in_loop=False) == {
      "all-reduce": {"count": 1, "bytes": activation_bytes(tiny, data)}}


def activation_bytes(config, data):
  """Bytes of one device's [B/data, T, D] float32 activations."""
  return config.run.batch // data * config.run.seq_len * config.model.d_model * 4


def test_census_parses_async_and_tuple_collectives():
  hlo = """
HloModule m

%body.1 (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %ars = f32[4]{0} all-reduce-start(f32[4]{0} %x), replica_groups={}, to_apply=%add
  %ard = f32[4]{0} all-reduce-done(f32[4]{0} %ars)
  %cp = (f32[2,3]{1,0}, f32[2,3]{1,0}, u32[], u32[]) collective-permute-start(f32[2,3]{1,0} %y)
  ROOT %t = (s32[], f32[4]) tuple(%i, %ard)
}

ENTRY %main.2 (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[4]) while(%init), condition=%cond, body=%body.1, backend_config={"known_trip_count":{"n":"5"}}
  %ag = f32[8,2]{1,0} all-gather(f32[4,2]{1,0} %a), dimensions={0}
  %ar = (f32[8]{0}, bf16[2]{0}) all-reduce(%a, %b), to_apply=%add
}
"""
  census = inspect.hlo_census(hlo)
  assert census.loops == {"body.1": 5}
  assert census.counts(in_loop=True) == {"all-reduce": {"count": 1, "bytes": 16},
                                         "collective-permute": {"count": 1, "bytes": 24}}
  assert census.counts(in_loop=False) == {"all-gather": {"count": 1, "bytes": 64},
                                          "all-reduce": {"count": 1, "bytes": 36}}
