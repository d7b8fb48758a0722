"""Your own model: a small decoder defined here, outside `jaxpar/`, runs `forward`, `generate`
and the pipeline through the public API once registered, with nothing in `jaxpar/` changed.

The model is deliberately unlike the shipped families: no norms, ReLU MLP, learned positions
added in every block (so positions must reach every pipeline stage), a scaled-down residual.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpar import config as config_lib
from jaxpar import families
from jaxpar.axes import BATCH, EMBED, HEAD_DIM, HEADS, KV_HEADS, MLP, SEQ, VOCAB
from jaxpar.config import MeshConfig
from jaxpar.mesh import make_mesh
from jaxpar.models import attention, base, registry
from jaxpar.rules import constrain
from jaxpar.runtime import generate, inference


class Block(nnx.Module):
  def __init__(self, cfg, layout, rngs):
    D, N, H, F, std = cfg.d_model, cfg.n_heads, cfg.head_size, cfg.d_ff, cfg.init_std
    self.n_heads = N
    self.pos = base.param(rngs, (cfg.max_seq_len, D), (SEQ, EMBED), std, jnp.float32)
    self.w_q = base.param(rngs, (N * H, D), (HEADS, EMBED), std, jnp.float32)
    self.w_k = base.param(rngs, (N * H, D), (KV_HEADS, EMBED), std, jnp.float32)
    self.w_v = base.param(rngs, (N * H, D), (KV_HEADS, EMBED), std, jnp.float32)
    self.w_o = base.param(rngs, (D, N * H), (EMBED, HEADS), std, jnp.float32)
    self.w_in = base.param(rngs, (F, D), (MLP, EMBED), std, jnp.float32)
    self.w_out = base.param(rngs, (D, F), (EMBED, MLP), std, jnp.float32)

  def __call__(self, x_BTD, step: base.Step, cache=None):
    B, T, _ = x_BTD.shape
    x_BTD = x_BTD + jnp.take(self.pos[...], step.positions_BT, axis=0)
    heads = lambda w, name: constrain(base.project(x_BTD, w[...]).reshape(B, T, self.n_heads, -1),
                                      (BATCH, SEQ, name, HEAD_DIM))
    k, v, cache = attention.write_cache(cache, heads(self.w_k, KV_HEADS), heads(self.w_v, KV_HEADS),
                                   step)
    attn_BTK = attention.attend(heads(self.w_q, HEADS), k, v, step)
    x_BTD = x_BTD + 0.5 * base.residual(base.project(attn_BTK, self.w_o[...]))
    h_BTF = constrain(jax.nn.relu(base.project(x_BTD, self.w_in[...])), (BATCH, SEQ, MLP))
    return x_BTD + 0.5 * base.residual(base.project(h_BTF, self.w_out[...])), cache


class Tiny(nnx.Module):
  def __init__(self, cfg, layout, rngs):
    self.vocab_size = cfg.vocab_size
    self.table = base.embedding(rngs, cfg, layout, (VOCAB, EMBED), jnp.float32)
    self.blocks = base.stack(lambda r: Block(cfg, layout, r), cfg.n_layers, rngs)

  def embed(self, tokens_BT, positions_BT):
    return base.residual(jnp.take(self.table[...], tokens_BT, axis=0))

  def head(self, x_BTD):
    return constrain(base.vocab_logits(x_BTD, self.table[...], self.vocab_size),
                     (BATCH, SEQ, VOCAB))


def no_hf(*args):
  raise NotImplementedError("this test model has no Hugging Face checkpoints")


TINY = registry.register(base.Family(
    spec=families.Spec(name="tiny-test"), make=lambda cfg, layout, rngs: Tiny(cfg, layout, rngs),
    weights=no_hf, kv_cache=attention.attention_cache,
    config_keys={HEADS: "model.n_heads", KV_HEADS: "model.n_heads", MLP: "model.d_ff"}))


@pytest.fixture(scope="module")
def config(root):
  return config_lib.load(root / "configs" / "tiny.yaml", [
      "model.family=tiny-test", "model.n_layers=4", "model.init_std=0.15", "run.batch=8"])


def build(config, devices, data, stage, model, **kw):
  config = dataclasses.replace(config, mesh=MeshConfig(data, stage, model),
                               model=dataclasses.replace(config.model, **kw))
  mesh = make_mesh(config.mesh, devices=devices[:data * stage * model])
  return config, mesh


@pytest.fixture(scope="module")
def single(config, devices):
  config, mesh = build(config, devices, 1, 1, 1)
  fwd = inference.build(config, mesh)
  tokens = inference.seeded_tokens(config)
  return fwd.natural_params(), inference.unpad(fwd(fwd.tokens(tokens)), 250), tokens


@pytest.mark.parametrize("data,stage,model", [(2, 1, 4), (2, 2, 2), (1, 4, 2)])
def test_forward_equals_one_device(config, devices, single, data, stage, model):
  params, expected, tokens = single
  config, mesh = build(config, devices, data, stage, model)
  fwd = inference.build(config, mesh)  # seeded: the same weights (padding aside) as `single`
  got = inference.unpad(fwd(fwd.tokens(tokens)), 250)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
  np.testing.assert_allclose(got, inference.reference_logits(fwd, tokens), rtol=0, atol=1e-5)
  assert np.abs(expected).max() > 1.0


PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11], [3, 3, 3], [5], [6, 7], [8, 9, 10], [11]]


@pytest.fixture(scope="module")
def expected_tokens(config, devices, single):
  """Greedy tokens by running every sequence whole through `forward` for each new token
  (right-padded to a fixed length: a causal model's logits at t ignore what follows)."""
  n, length = 6, max(map(len, PROMPTS)) + 6
  config = dataclasses.replace(config, run=dataclasses.replace(config.run, seq_len=length))
  config, mesh = build(config, devices, 1, 1, 1)
  fwd = inference.build(config, mesh, params=single[0])
  seqs = [list(p) for p in PROMPTS]
  for _ in range(n):
    tokens = np.array([s + [0] * (length - len(s)) for s in seqs])
    logits = inference.unpad(fwd(fwd.tokens(tokens)), 250)
    for b, s in enumerate(seqs):
      s.append(int(logits[b, len(s) - 1].argmax()))
  out = np.array([s[len(p):] for s, p in zip(seqs, PROMPTS)])
  assert np.mean([len(set(r)) for r in out]) > 2
  return out


@pytest.mark.parametrize("data,stage,model,scan", [(1, 1, 1, False), (2, 1, 4, True),
                                                   (2, 2, 2, None), (1, 4, 2, None)])
def test_generate_equals_full_recompute(config, devices, single, expected_tokens, data, stage,
                                        model, scan):
  config, mesh = build(config, devices, data, stage, model, scan_layers=scan)
  gen = generate.build(config, mesh, eos_id=-1)
  # The seeded weights do not depend on the mesh; check, then compare tokens.
  for a, b in zip(jax.tree.leaves(gen.natural_params()), jax.tree.leaves(single[0])):
    np.testing.assert_array_equal(a[:b.shape[0]], b)  # the vocabulary may be padded
  np.testing.assert_array_equal(gen.generate(PROMPTS, max_new_tokens=6).tokens,
                                expected_tokens)
