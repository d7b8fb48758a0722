"""Sharded logits equal single-device logits on every (data, model) factorisation of 1-8
devices, and the single-device model equals an independent NumPy GPT-2."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxpar.config import MeshConfig
from jaxpar.mesh import make_mesh
from jaxpar.runtime import inference
from tests import reference

MESHES = [(1, 1), (1, 2), (2, 1), (1, 4), (2, 2), (4, 1), (1, 8), (2, 4), (4, 2), (8, 1)]


def run(config, devices, data, model):
  config = dataclasses.replace(config, mesh=MeshConfig(data=data, stage=1, model=model))
  mesh = make_mesh(config.mesh, devices=devices[:data * model])
  fwd = inference.build(config, mesh)
  tokens = inference.seeded_tokens(config)
  return fwd, fwd(fwd.tokens(tokens)), tokens


@pytest.fixture(scope="module")
def single(tiny, devices):
  fwd, logits, tokens = run(tiny, devices, 1, 1)
  return jax.device_get(fwd.params), inference.unpad(logits, tiny.model.vocab_size), tokens


def test_single_device_matches_numpy_gpt2(tiny, single):
  params, logits, tokens = single
  expected = reference.gpt2_logits(params, tokens, vocab_size=tiny.model.vocab_size,
                                   n_heads=tiny.model.n_heads, eps=tiny.model.norm_eps)
  assert logits.shape == (tiny.run.batch, tiny.run.seq_len, tiny.model.vocab_size)
  assert np.abs(logits - expected).max() < 1e-4
  assert np.abs(expected).max() > 1.0  # the comparison is not between near-zeros


@pytest.mark.parametrize("data,model", MESHES)
def test_sharded_logits_equal_single_device(tiny, devices, single, data, model):
  _, expected, _ = single
  fwd, logits, _ = run(tiny, devices, data, model)
  assert logits.sharding.spec == jax.sharding.PartitionSpec(("data", "expert"), None, "model")
  got = inference.unpad(logits, tiny.model.vocab_size)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_vocab_padding_is_masked(tiny, devices):
  fwd, logits, _ = run(tiny, devices, 1, 8)
  V = tiny.model.vocab_size
  assert logits.shape[-1] == 256 and V == 250  # 250 rounded up to a multiple of 8
  padded = np.asarray(logits)[..., V:]
  assert (padded == np.finfo(np.float32).min).all()
  assert (np.asarray(fwd.params["wte"])[V:] == 0).all()


def test_reference_logits_helper_uses_one_device(tiny, devices, monkeypatch):
  fwd, logits, tokens = run(tiny, devices, 2, 4)
  built = []
  real_build = inference.build

  def recording_build(config, mesh, **kwargs):
    built.append(mesh)
    return real_build(config, mesh, **kwargs)

  monkeypatch.setattr(inference, "build", recording_build)
  ref = inference.reference_logits(fwd, tokens)
  # The reference ran on a mesh of one device (the sharded model's first), not the 8.
  assert [m.devices.size for m in built] == [1]
  assert built[0].devices.flat[0] == fwd.mesh.devices.flat[0]
  np.testing.assert_allclose(inference.unpad(logits, tiny.model.vocab_size), ref, rtol=0,
                             atol=1e-5)
