"""The Llama family (Llama, Mistral, Qwen2, Qwen3) from Hugging Face checkpoints written by
`transformers`: logits and greedy tokens equal `transformers` on one device and on
data x stage x model meshes (pipelined included), grouped-query attention under tensor
parallelism (key/value heads copied when the `model` axis is wider), the compiled collectives,
both config.json styles, bf16 sharded checkpoints, and one-line errors."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxpar import cli, hf_files, inspect
from jaxpar import config as config_lib
from jaxpar.config import MeshConfig
from jaxpar.errors import UserError
from jaxpar.mesh import make_mesh
from jaxpar.runtime import generate, inference
from tests.conftest import write_hf_decoder

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
# What each test checkpoint adds to the shared shape: Mistral's window (4) is shorter than
# the prompts plus the generation; Qwen3's heads are wider than d_model / n_heads.
OPTIONS = {"llama": {}, "mistral": {"sliding_window": 4}, "qwen2": {},
           "qwen3": {"head_dim": 16}}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
               "rope_theta": 500000.0}
PROMPTS = [[5, 17, 200, 3, 9, 41], [7, 8], [100, 12, 99], [3] * 7, [250], [6, 7, 1, 2],
           [8, 9, 10, 11, 12], [0, 1]]
NEW = 10


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
  out = {f: write_hf_decoder(tmp_path_factory.mktemp(f), f, **OPTIONS[f]) for f in FAMILIES}
  out["llama3"] = write_hf_decoder(tmp_path_factory.mktemp("llama3"), "llama", seed=1,
                                   rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)
  return out


def hf_model(checkpoint):
  import torch
  import transformers
  return transformers.AutoModelForCausalLM.from_pretrained(checkpoint,
                                                           dtype=torch.float32).eval()


def hf_logits(checkpoint, tokens) -> np.ndarray:
  import torch
  with torch.no_grad():
    return hf_model(checkpoint)(torch.as_tensor(tokens)).logits.numpy()


def transformers_greedy(checkpoint) -> np.ndarray:
  """transformers' own greedy generate of PROMPTS, one prompt at a time (no padding)."""
  import torch
  model = hf_model(checkpoint)
  rows = []
  with torch.no_grad():
    for prompt in PROMPTS:
      ids = torch.tensor([prompt])
      tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
      rows.append(tokens[0, len(prompt):].tolist())
  assert np.mean([len(set(r)) for r in rows]) > 3  # context-dependent, not an echo
  return np.array(rows)


@pytest.fixture(scope="module")
def hf_greedy(checkpoints) -> dict:
  return {name: transformers_greedy(checkpoint) for name, checkpoint in checkpoints.items()}


def load(root, checkpoint, *overrides) -> config_lib.Config:
  return config_lib.load(root / "configs" / "tiny.yaml",
                         [f"model.checkpoint={checkpoint}", *overrides])


def mesh_for(config, devices):
  m = config.mesh
  return make_mesh(m, devices=devices[:m.data * m.stage * m.model])


def with_mesh(config, data, stage, model, **model_fields):
  return dataclasses.replace(config, mesh=MeshConfig(data, stage, model),
                             model=config_lib.replace_model(config.model, **model_fields))


# Families x meshes as a matrix, not a product. data x stage x model: one device, tensor
# parallel with key/value heads copied 2x (model=4) and 4x (model=8), and pipelines with
# tensor parallelism (key/value heads split). Llama runs on every mesh; each other family with
# its key/value heads copied 2x and 4x and in a pipeline, which is where what is its own
# (Mistral's window, Qwen2's biases, Qwen3's wider heads and norms) meets the sharding.
ALL = [(1, 1, 1), (2, 1, 4), (1, 1, 8), (2, 2, 2), (1, 4, 2)]
FAMILY_MESHES = {"llama": ALL, "mistral": [(2, 1, 4), (1, 1, 8), (1, 4, 2)],
                 "qwen2": [(2, 1, 4), (1, 1, 8), (2, 2, 2)],
                 "qwen3": [(2, 1, 4), (1, 1, 8), (1, 4, 2)]}
MATRIX = [(f, *mesh) for f, meshes in FAMILY_MESHES.items() for mesh in meshes]


@pytest.fixture(scope="module")
def hf_seeded_logits(root, checkpoints) -> dict:
  """transformers' logits of each family's seeded tokens (the same on every mesh)."""
  return {f: hf_logits(checkpoints[f], inference.seeded_tokens(load(root, checkpoints[f])))
          for f in FAMILIES}


@pytest.mark.parametrize("family,data,stage,model", MATRIX)
def test_logits_equal_transformers(root, devices, checkpoints, hf_seeded_logits, family, data,
                                   stage, model):
  config = with_mesh(load(root, checkpoints[family]), data, stage, model)
  fwd = inference.build(config, mesh_for(config, devices))
  assert fwd.layout.kv_repeat == max(1, model // 2)
  tokens = inference.seeded_tokens(config)
  got = inference.unpad(fwd(fwd.tokens(tokens)), 251)
  expected = hf_seeded_logits[family]
  assert np.abs(expected).max() > 1.0  # not a comparison between near-zeros
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


# (data, stage, model, scan_layers): unrolled and scanned, tensor parallel with copied
# key/value heads, pipelined (which scans each stage's layers). The same matrix as above.
SCAN = {(1, 1, 1): False, (2, 1, 4): True, (1, 1, 8): False, (2, 2, 2): None, (1, 4, 2): None}
GREEDY = [(f, *mesh, SCAN[tuple(mesh)]) for f, *mesh in MATRIX]


@pytest.mark.parametrize("family,data,stage,model,scan", GREEDY)
def test_greedy_equals_transformers(root, devices, checkpoints, hf_greedy, family, data, stage,
                                    model, scan):
  config = with_mesh(load(root, checkpoints[family]), data, stage, model, scan_layers=scan)
  gen = generate.build(config, mesh_for(config, devices), eos_id=-1)
  tokens = gen.generate(PROMPTS, max_new_tokens=NEW).tokens
  np.testing.assert_array_equal(tokens, hf_greedy[family])


@pytest.mark.parametrize("data,stage,model,scan", [(1, 1, 1, True), (2, 1, 4, False)])
def test_greedy_scan_and_unrolled_both_ways(root, devices, checkpoints, hf_greedy, data, stage,
                                            model, scan):
  config = with_mesh(load(root, checkpoints["llama"]), data, stage, model, scan_layers=scan)
  gen = generate.build(config, mesh_for(config, devices), eos_id=-1)
  np.testing.assert_array_equal(gen.generate(PROMPTS, max_new_tokens=NEW).tokens,
                                hf_greedy["llama"])


def test_window_and_llama3_rope_change_the_result(root, devices, checkpoints, hf_greedy):
  """Without its window Mistral decodes other tokens (the window is exercised: prompts of up
  to 7 tokens plus 10 new ones over a window of 4); the llama3 checkpoint decodes as
  transformers does, and other tokens with plain rotary positions."""
  mistral = with_mesh(load(root, checkpoints["mistral"]), 2, 1, 4, sliding_window=0)
  tokens = generate.build(mistral, mesh_for(mistral, devices), eos_id=-1).generate(
      PROMPTS, max_new_tokens=NEW).tokens
  assert not np.array_equal(tokens, hf_greedy["mistral"])
  for data, stage, model in [(1, 1, 1), (2, 2, 2)]:
    llama3 = with_mesh(load(root, checkpoints["llama3"]), data, stage, model)
    got = generate.build(llama3, mesh_for(llama3, devices), eos_id=-1).generate(
        PROMPTS, max_new_tokens=NEW).tokens
    np.testing.assert_array_equal(got, hf_greedy["llama3"])
  plain = with_mesh(load(root, checkpoints["llama3"]), 1, 1, 1, rope_type="default")
  tokens = generate.build(plain, mesh_for(plain, devices), eos_id=-1).generate(
      PROMPTS, max_new_tokens=NEW).tokens
  assert not np.array_equal(tokens, hf_greedy["llama3"])


def test_linear_rope_scaling(root, devices, tmp_path):
  path = write_hf_decoder(tmp_path / "linear", "llama", seed=2, rope_parameters={
      "rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
  config = with_mesh(load(root, path), 2, 1, 4)
  assert (config.model.options.rope_type, config.model.options.rope_factor) == ("linear",
                                                                              4.0)
  fwd = inference.build(config, mesh_for(config, devices))
  tokens = inference.seeded_tokens(config)
  got = inference.unpad(fwd(fwd.tokens(tokens)), 251)
  expected = hf_logits(path, tokens)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
  plain = inference.build(with_mesh(config, 2, 1, 4, rope_type="default"),
                          mesh_for(config, devices))
  assert np.abs(inference.unpad(plain(plain.tokens(tokens)), 251) - expected).max() > 1e-2


def test_each_device_reads_only_its_key_value_head(root, devices, checkpoints, monkeypatch):
  """On model=8 the 2 key/value heads are copied 4 times; each device reads its one head's 8
  rows of k_proj from the file, never the whole tensor."""
  read = {}
  real_read = hf_files.SafeTensors.read

  def recording_read(self, name, box):
    read.setdefault(name, []).append(box)
    return real_read(self, name, box)

  monkeypatch.setattr(hf_files.SafeTensors, "read", recording_read)
  config = with_mesh(load(root, checkpoints["llama"]), 1, 1, 8)
  fwd = inference.build(config, mesh_for(config, devices))
  boxes = read["model.layers.0.self_attn.k_proj.weight"]
  assert sorted((b[0].start, b[0].stop) for b in boxes) == [(0, 8)] * 4 + [(8, 16)] * 4
  q_boxes = read["model.layers.0.self_attn.q_proj.weight"]
  assert sorted(b[0].start for b in q_boxes) == [8 * i for i in range(8)]
  assert all(b[0].stop - b[0].start == 8 for b in q_boxes)
  w_k = fwd.params["blocks"]["attn"]["w_k"]
  assert {s.data.shape for s in w_k.addressable_shards} == {(4, 8, 64)}


def test_bf16_sharded_checkpoint(root, devices, tmp_path):
  """bf16 weights in several safetensors files with an index load into a float32 model and
  give transformers' float32 logits of the same (bf16-rounded) weights."""
  import torch
  path = write_hf_decoder(tmp_path / "bf16", "qwen2", dtype=torch.bfloat16,
                          max_shard_size="40KB")
  files = sorted(p.name for p in path.glob("*.safetensors"))
  assert len(files) > 2 and (path / "model.safetensors.index.json").is_file()
  with safe_open(path / files[0], framework="pt") as f:
    assert f.get_slice(next(iter(f.keys()))).get_dtype() == "BF16"
  config = with_mesh(load(root, path), 2, 1, 4)
  assert config.model.dtype == "float32"
  fwd = inference.build(config, mesh_for(config, devices))
  tokens = inference.seeded_tokens(config)
  got = inference.unpad(fwd(fwd.tokens(tokens)), 251)
  np.testing.assert_allclose(got, hf_logits(path, tokens), rtol=0, atol=1e-4)


def census(config, devices):
  fwd = inference.build(config, mesh_for(config, devices))
  compiled = fwd.compile(fwd.tokens(inference.seeded_tokens(config)))
  return inspect.hlo_census(compiled.as_text())


@pytest.mark.parametrize("model", [2, 4, 8])
def test_tensor_parallel_blocks_have_two_all_reduces_and_no_gather(root, devices, checkpoints,
                                                                   model):
  """Two all-reduces per block (attention output, MLP down), one for the embedding, none for
  the vocab-parallel head, no all-gather: also when key/value heads are copied (model 4, 8)."""
  config = with_mesh(load(root, checkpoints["llama"], "model.scan_layers=true"),
                     8 // model, 1, model)
  c = census(config, devices)
  assert list(c.loops.values()) == [4]
  assert c.count("all-reduce", in_loop=True) == 2
  assert c.counts(in_loop=False) == {"all-reduce": {"count": 1, "bytes": (8 // (8 // model))
                                                    * 16 * 64 * 4}}
  assert set(c.counts()) == {"all-reduce"}


def test_kv_cache_bytes_per_device_counts_copied_heads(root, devices, checkpoints):
  """k and v: [L, B/data, S, heads on a device, H] float32. On model=8 each device holds one
  copied head of the 2; on model=2 one of the 2; on one device both."""
  L, H, S = 4, 8, 24
  for data, model, heads in [(1, 8, 1), (4, 2, 1), (1, 1, 2)]:
    config = with_mesh(load(root, checkpoints["llama"]), data, 1, model)
    gen = generate.build(config, mesh_for(config, devices))
    assert gen.cache_bytes_per_device(8, S) == 2 * L * (8 // data) * S * heads * H * 4


def test_per_layer_weights_keep_the_rules_shardings(root, devices, checkpoints):
  """Unrolled generation holds each layer's weights in its own buffer, sharded as the stack
  is minus the `layers` dim, so it holds exactly the bytes the forward does."""
  for data, model in [(2, 4), (1, 8), (8, 1)]:
    config = with_mesh(load(root, checkpoints["llama"]), data, 1, model, scan_layers=False)
    gen = generate.build(config, mesh_for(config, devices))
    fwd = inference.build(config, mesh_for(config, devices))
    stacked = fwd.params["blocks"]
    for layer in gen.layers:
      for (path, a), b in zip(jax.tree.leaves_with_path(layer), jax.tree.leaves(stacked)):
        assert a.sharding.spec == jax.sharding.PartitionSpec(*b.sharding.spec[1:]), path
    assert gen.param_bytes_per_device() == fwd_bytes(fwd)


def fwd_bytes(fwd) -> int:
  from jaxpar.runtime import state
  return state.param_bytes_per_device(fwd.params)


def test_heads_that_do_not_divide(root, devices):
  config = config_lib.load(root / "configs" / "tiny.yaml", [
      "model.family=llama", "model.n_heads=24", "model.n_kv_heads=3", "model.head_dim=8",
      "mesh.model=2", "mesh.data=4"])
  with pytest.raises(UserError, match=r"model.n_kv_heads \(num_key_value_heads\)=3 does not "
                                      r"split over mesh.model=2"):
    inference.build(config, mesh_for(config, devices))
  config = with_mesh(config, 1, 1, 8)
  with pytest.raises(UserError, match=r"model.n_kv_heads \(num_key_value_heads\)=3 neither "
                                      r"divides nor is divided by the 8 ways"):
    inference.build(config, mesh_for(config, devices))
  config = with_mesh(config, 1, 1, 8, n_heads=12)
  with pytest.raises(UserError, match=r"model.n_heads \(num_attention_heads\)=12 does not "
                                      r"split over mesh.model=8"):
    inference.build(config, mesh_for(config, devices))
  with pytest.raises(UserError, match=r"model.n_heads=8 is not a multiple of model.n_kv_heads=3"):
    config_lib.load(root / "configs" / "tiny.yaml", ["model.family=llama",
                                                     "model.n_kv_heads=3"])


def rewrite(src, dst, change):
  shutil.copytree(src, dst)
  with safe_open(src / "model.safetensors", framework="numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  change(tensors)
  save_file(tensors, dst / "model.safetensors")
  return dst


def run_cli(root, checkpoint, capsys, *args) -> tuple[int, str, str]:
  code = cli.main(["forward", "--config", str(root / "configs" / "tiny.yaml"), "--set",
                   f"model.checkpoint={checkpoint}", *args])
  out, err = capsys.readouterr()
  return code, out, err


def test_checkpoint_errors(root, checkpoints, tmp_path, capsys):
  K_PROJ = "model.layers.1.self_attn.k_proj.weight"
  missing = rewrite(checkpoints["llama"], tmp_path / "missing", lambda t: t.pop(K_PROJ))
  wrong = rewrite(checkpoints["llama"], tmp_path / "wrong",
                  lambda t: t.update({K_PROJ: t[K_PROJ][:8]}))
  unknown = tmp_path / "unknown"
  shutil.copytree(checkpoints["llama"], unknown)
  raw = json.loads((unknown / "config.json").read_text())
  (unknown / "config.json").write_text(json.dumps({**raw, "hidden_act": "gelu"}))
  for path, message in [
      (missing, f"the safetensors files have no tensor {K_PROJ}"),
      (wrong, f"tensor {K_PROJ} has shape (8, 64), expected (16, 64) from config.json"),
      (unknown, 'config.json hidden_act="gelu"; jaxpar\'s llama supports only '
                'hidden_act="silu"')]:
    code, out, err = run_cli(root, path, capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert "compiling" not in out


@pytest.mark.parametrize("ids,message", [
    ("", "--prompt-ids '': no token ids"),
    ("1,,2", "--prompt-ids '1,,2': an empty id"),
    ("1,2;", "an empty row"),
])
def test_prompt_ids_errors(root, monkeypatch, capsys, ids, message):
  monkeypatch.chdir(root)
  for command in ("generate", "forward"):
    code = cli.main([command, "--config", "configs/tiny.yaml", "--prompt-ids", ids])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_generate_cli_with_a_qwen3_checkpoint(root, checkpoints, hf_greedy, monkeypatch,
                                              capsys):
  monkeypatch.chdir(root)
  ids = ";".join(",".join(map(str, p)) for p in PROMPTS[:3])
  code = cli.main(["generate", "--config", "configs/tiny.yaml", "--set",
                   f"model.checkpoint={checkpoints['qwen3']}", "--set", "mesh.data=2",
                   "--set", "mesh.model=4", "--prompt-ids", ids, "--max-new-tokens", str(NEW),
                   "--set", "generate.eos_id=-1", "--json"])
  out = capsys.readouterr().out
  assert code == 0
  result = json.loads(out.strip().splitlines()[-1])
  assert result["new_tokens"] == hf_greedy["qwen3"][:3].tolist()
  assert "model: qwen3 d_model=64 n_heads=8 (2 kv)" in out
