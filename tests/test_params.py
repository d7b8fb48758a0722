"""Per-device parameter bytes equal the analytic count, and the layout matches the golden
table of PartitionSpecs."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from jaxpar import config as config_lib
from jaxpar import inspect
from jaxpar.config import MeshConfig
from jaxpar.mesh import make_mesh
from jaxpar.models import base, gpt
from jaxpar.rules import Rules
from jaxpar.runtime import inference, state


def analytic_bytes_per_device(m: config_lib.ModelConfig, model: int, padded_vocab: int) -> int:
  """Hand count: Megatron-split tensors / model, plus the small replicated ones."""
  D, F, L = m.d_model, m.d_ff, m.n_layers
  sharded = (padded_vocab * D                        # wte, vocab-parallel
             + L * (3 * D * D + 3 * D                # q, k, v weights and biases (heads)
                    + D * D                          # attention output (heads)
                    + F * D + F                      # MLP up weight and bias (mlp)
                    + D * F))                        # MLP down (mlp)
  replicated = (m.max_seq_len * D                    # wpe
                + L * (4 * D                         # ln_1, ln_2 scale and bias
                       + 2 * D)                      # row-parallel biases b_o, b_down
                + 2 * D)                             # ln_f
  assert sharded % model == 0
  return 4 * (sharded // model + replicated)


@pytest.mark.parametrize("data,model", [(1, 1), (2, 4), (1, 8), (4, 2)])
def test_param_bytes_per_device_match_analytic_count(tiny, devices, data, model):
  config = dataclasses.replace(tiny, mesh=MeshConfig(data=data, stage=1, model=model))
  mesh = make_mesh(config.mesh, devices=devices[:data * model])
  fwd = inference.build(config, mesh)
  padded = base.padded_vocab(tiny.model.vocab_size, model)
  expected = analytic_bytes_per_device(tiny.model, model, padded)
  # Three readings: the arrays' shards, the sharding table, the compiled program's arguments.
  assert state.param_bytes_per_device(fwd.params) == expected
  rows = inspect.param_table(fwd.params, fwd.names, fwd.rules, mesh)
  assert sum(r.bytes_per_device for r in rows) == expected
  tokens = fwd.tokens(inference.seeded_tokens(config))
  token_bytes = config.run.batch // data * config.run.seq_len * 4
  assert inspect.memory(fwd.compile(tokens))["argument"] == expected + token_bytes


def test_gpt2_124m_per_device_bytes_near_total_over_model(root):
  """At the GPT-2 124M shape, checked abstractly (nothing allocated)."""
  config = config_lib.load(root / "configs" / "gpt2.yaml")
  model = 4
  mesh = jax.sharding.AbstractMesh((2, 1, model), ("data", "stage", "model"))
  rules = Rules(config.rules)
  layout = base.Layout(vocab_multiple=model)
  _, shapes, names = state.abstract(lambda rngs: gpt.GPT(config.model, layout, rngs=rngs))
  rows = inspect.param_table(shapes, names, rules, mesh)
  total_params = sum(int(np.prod(r.shape)) for r in rows)
  padding = (base.padded_vocab(50257, model) - 50257) * 768
  assert total_params - padding == 124_439_808  # GPT-2 small, as published
  per_device = sum(r.bytes_per_device for r in rows)
  expected = analytic_bytes_per_device(config.model, model, 50257 + padding // 768)
  assert per_device == expected
  assert abs(per_device / (4 * total_params / model) - 1) < 0.05


def test_partition_specs_match_golden_table(tiny, devices, root):
  config = dataclasses.replace(tiny, mesh=MeshConfig(data=2, stage=1, model=4))
  mesh = make_mesh(config.mesh, devices=devices)
  fwd = inference.build(config, mesh)
  got = {r.path: [list(p) if isinstance(p, tuple) else p for p in r.spec]
         for r in inspect.param_table(fwd.params, fwd.names, fwd.rules, mesh)}
  actual = {path: [list(p) if isinstance(p, tuple) else p for p in leaf.sharding.spec]
            for path, leaf in _flat(fwd.params).items()}
  golden = json.loads((root / "tests" / "golden" / "param_specs.json").read_text())
  assert got == golden
  assert actual == golden  # the arrays really carry the table's shardings


def _flat(tree) -> dict:
  return {"/".join(k.key for k in path): leaf
          for path, leaf in jax.tree.leaves_with_path(tree)}
