"""Hugging Face GPT-2 checkpoints load straight into sharded arrays: logits equal
`transformers` on one device, tensor-parallel and pipelined meshes; each device reads only its
slice of the file; config.json sets the sizes; broken checkpoints are one-line errors."""

import dataclasses
import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxpar import cli, hf_files
from jaxpar import config as config_lib
from jaxpar.config import MeshConfig, PipelineConfig
from jaxpar.errors import UserError
from jaxpar.mesh import make_mesh, single_device_mesh
from jaxpar.models import registry
from jaxpar.rules import Rules
from jaxpar.runtime import inference
from tests.conftest import write_hf_gpt2

ATTN = "transformer.h.0.attn.c_attn.weight"


def load(root, checkpoint, *overrides) -> config_lib.Config:
  return config_lib.load(root / "configs" / "tiny.yaml",
                         [f"model.checkpoint={checkpoint}", *overrides])


def build(config, devices, data=1, stage=1, model=1, microbatches=4, repeats=1):
  config = dataclasses.replace(config, mesh=MeshConfig(data, stage, model),
                               pipeline=PipelineConfig(microbatches, repeats))
  return inference.build(config, make_mesh(config.mesh, devices=devices[:data * stage * model]))


def hf_logits(checkpoint, tokens) -> np.ndarray:
  import torch
  import transformers
  model = transformers.GPT2LMHeadModel.from_pretrained(checkpoint).float().eval()
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module")
def hf_checkpoint_8(tmp_path_factory) -> pathlib.Path:
  """The same GPT-2 with 8 layers, so 8 pipeline stages divide it."""
  return write_hf_gpt2(tmp_path_factory.mktemp("hf_gpt2_8"), n_layer=8, seed=1)


def rewrite(src: pathlib.Path, dst: pathlib.Path, change) -> pathlib.Path:
  """A copy of checkpoint `src` in `dst` whose tensors dict went through `change`."""
  dst.mkdir()
  shutil.copy(src / "config.json", dst / "config.json")
  with safe_open(src / "model.safetensors", framework="numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  changed = change(tensors)  # a new dict, or None after changing `tensors` in place
  save_file(changed if isinstance(changed, dict) else tensors, dst / "model.safetensors")
  return dst


def edit_config(src: pathlib.Path, dst: pathlib.Path, **changes) -> pathlib.Path:
  shutil.copytree(src, dst)
  raw = json.loads((dst / "config.json").read_text())
  raw.update(changes)
  (dst / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if v != "DROP"}))
  return dst


def test_config_takes_sizes_from_checkpoint(root, hf_checkpoint, tmp_path):
  m = load(root, hf_checkpoint).model  # tiny.yaml says 2 layers, d_ff 128, 32 positions
  assert (m.vocab_size, m.d_model, m.n_heads, m.n_layers, m.d_ff, m.max_seq_len) == (
      250, 64, 8, 4, 256, 64)
  assert m.norm_eps == 1e-5 and m.eos_token_ids == ()  # 50256 is outside the vocabulary
  other = edit_config(hf_checkpoint, tmp_path / "c", n_inner=96, eos_token_id=3)
  (other / "generation_config.json").unlink()  # config.json's EOS when there is no other
  m = load(root, other).model
  assert (m.d_ff, m.eos_token_ids) == (96, (3,))
  (other / "generation_config.json").write_text('{"eos_token_id": [7, 3, 999]}')
  assert load(root, other).model.eos_token_ids == (7, 3)  # generation_config.json wins
  assert load(root, hf_checkpoint, "model.n_layers=4").model.n_layers == 4  # agrees: fine
  with pytest.raises(UserError, match=r"model.n_layers=2 disagrees with model.checkpoint="):
    load(root, hf_checkpoint, "model.n_layers=2")
  home = pathlib.Path.home()  # `~` is the home folder, as in a shell
  if hf_checkpoint.is_relative_to(home):
    tilde = "~/" + str(hf_checkpoint.relative_to(home))
  else:
    tilde = "~/" + os.path.relpath(hf_checkpoint, home)
  assert load(root, tilde).model.checkpoint == os.path.join(home, tilde[2:])
  long = load(root, hf_checkpoint, "run.seq_len=65")  # generate and serve do not use it
  with pytest.raises(UserError, match=r"run.seq_len=65 exceeds model.max_seq_len=64"):
    inference.check_batch(long, single_device_mesh(jax.devices()[0]), Rules(long.rules),
                          registry.family(long.model.family))


# (data, stage, model, microbatches, repeats, layers): one device, tensor parallel, circular
# pipeline x tensor parallel, and 8 pipeline stages.
MESHES = [(1, 1, 1, 4, 1, 4), (2, 1, 4, 4, 1, 4), (2, 2, 2, 4, 2, 4), (1, 8, 1, 8, 1, 8)]


@pytest.mark.parametrize("data,stage,model,microbatches,repeats,layers", MESHES)
def test_logits_equal_transformers(root, devices, hf_checkpoint, hf_checkpoint_8, data, stage,
                                   model, microbatches, repeats, layers):
  checkpoint = hf_checkpoint if layers == 4 else hf_checkpoint_8
  config = load(root, checkpoint)
  assert config.model.n_layers == layers
  fwd = build(config, devices, data, stage, model, microbatches, repeats)
  tokens = inference.seeded_tokens(config)
  got = inference.unpad(fwd(fwd.tokens(tokens)), config.model.vocab_size)
  expected = hf_logits(checkpoint, tokens)
  assert got.shape == expected.shape == (config.run.batch, config.run.seq_len, 250)
  assert np.abs(expected).max() > 1.0  # not a comparison between near-zeros
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_each_device_reads_only_its_slice(root, devices, hf_checkpoint, monkeypatch):
  asked, read = {}, {}
  make = jax.make_array_from_callback

  def recording_make(shape, sharding, callback):
    def wrapped(index):
      asked.setdefault(shape, []).append(tuple(s.indices(n)[:2] for s, n in zip(index, shape)))
      return callback(index)
    return make(shape, sharding, wrapped)

  real_read = hf_files.SafeTensors.read

  def recording_read(self, name, box):
    read.setdefault(name, []).append(box)
    return real_read(self, name, box)

  monkeypatch.setattr(jax, "make_array_from_callback", recording_make)
  monkeypatch.setattr(hf_files.SafeTensors, "read", recording_read)
  fwd = build(load(root, hf_checkpoint), devices, model=8)
  wte, w_q = fwd.params["wte"], fwd.params["blocks"]["attn"]["w_q"]
  assert wte.shape == (256, 64) and w_q.shape == (4, 64, 64)
  assert {s.data.shape for s in wte.addressable_shards} == {(32, 64)}
  assert {s.data.shape for s in w_q.addressable_shards} == {(4, 8, 64)}
  # The callback was asked for 8 distinct eighths of the padded vocabulary...
  rows = sorted(index[0] for index in asked[(256, 64)])
  assert rows == [(32 * i, 32 * (i + 1)) for i in range(8)]
  # ... and read at most those rows of wte (the last shard: rows 224..249, then padding).
  boxes = read["transformer.wte.weight"]
  assert len(boxes) == 8 and all(b[0].stop - b[0].start <= 32 for b in boxes)
  assert sorted(b[0].start for b in boxes) == [32 * i for i in range(8)]
  # q, k and v each read one head (8 columns) of c_attn per device and layer.
  attn = read[ATTN]
  assert len(attn) == 3 * 8 and all(b[1].stop - b[1].start == 8 for b in attn)
  with safe_open(hf_checkpoint / "model.safetensors", framework="numpy") as f:
    np.testing.assert_array_equal(np.asarray(wte)[:250], f.get_tensor("transformer.wte.weight"))
    assert not np.asarray(wte)[250:].any()
    np.testing.assert_array_equal(np.asarray(w_q)[0], f.get_tensor(ATTN)[:, :64].T)


def test_unprefixed_keys(root, devices, hf_checkpoint, tmp_path):
  """Keys without `transformer.` (as in the hub's gpt2) load the same."""
  config = load(root, hf_checkpoint)
  plain = rewrite(hf_checkpoint, tmp_path / "plain",
                  lambda t: {k.removeprefix("transformer."): v for k, v in t.items()})
  ref = jax.device_get(build(config, devices, model=8).params)
  got = jax.device_get(build(load(root, plain), devices, model=8).params)
  for (path, a), b in zip(jax.tree.leaves_with_path(got), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


CONFIG_ERRORS = [
    ({"model_type": "bert"}, r"config.json model_type='bert' is not supported; jaxpar reads "
                             r"gpt2, llama, mistral, mixtral, qwen2, qwen3, qwen3_moe"),
    ({"activation_function": "relu"}, r'activation_function="relu"; jaxpar\'s GPT-2 supports '
                                      r'only activation_function="gelu_new"'),
    ({"n_layer": "DROP"}, r"config.json has no 'n_layer'"),
    ({"tie_word_embeddings": False}, r"tie_word_embeddings=false"),
    ({"n_head": 8.5}, r"config.json n_head=8.5 is not an integer"),
    ({"use_rotary": True}, r"config.json has use_rotary=true, which jaxpar's GPT-2 does not "
                           r"implement"),
]


@pytest.mark.parametrize("changes,message", CONFIG_ERRORS)
def test_config_json_errors(root, hf_checkpoint, tmp_path, changes, message):
  broken = edit_config(hf_checkpoint, tmp_path / "c", **changes)
  with pytest.raises(UserError, match=message):
    load(root, broken)


def test_missing_and_malformed_files(root, hf_checkpoint, tmp_path):
  with pytest.raises(UserError, match=r"model.checkpoint='.*nowhere': no such directory"):
    load(root, tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match=r"no config.json in the directory"):
    load(root, tmp_path / "empty")
  bad = edit_config(hf_checkpoint, tmp_path / "bad")
  (bad / "config.json").write_text('{"model_type": "gpt2",\n "n_embd": 64,,}')
  with pytest.raises(UserError, match=r"config.json is not valid JSON at line 2"):
    load(root, bad)


def run_cli(root, checkpoint, capsys) -> tuple[int, str, str]:
  code = cli.main(["forward", "--config", str(root / "configs" / "tiny.yaml"), "--set",
                   f"model.checkpoint={checkpoint}"])
  out, err = capsys.readouterr()
  return code, out, err


def expect_one_line(code, out, err, message):
  assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
  assert message in err
  assert "compiling" not in out


def test_cli_missing_dir_and_unknown_architecture(root, hf_checkpoint, tmp_path, capsys):
  expect_one_line(*run_cli(root, tmp_path / "nowhere", capsys), "no such directory")
  bert = edit_config(hf_checkpoint, tmp_path / "bert", model_type="bert")
  expect_one_line(*run_cli(root, bert, capsys), "model_type='bert' is not supported")


def test_wrong_shape_and_missing_tensor(root, devices, hf_checkpoint, tmp_path, capsys):
  def mangle(tensors):
    tensors[ATTN] = tensors[ATTN][:, :190].copy()
  mangled = rewrite(hf_checkpoint, tmp_path / "mangled", mangle)
  expect_one_line(*run_cli(root, mangled, capsys),
                  f"checkpoint {mangled}: tensor {ATTN} has shape (64, 190), expected (64, 192) "
                  f"from config.json")
  missing = rewrite(hf_checkpoint, tmp_path / "missing",
                    lambda t: t.pop("transformer.h.3.mlp.c_fc.bias"))
  expect_one_line(*run_cli(root, missing, capsys),
                  "the safetensors files have no tensor transformer.h.3.mlp.c_fc.bias")
  (no_file := tmp_path / "no_file").mkdir()
  shutil.copy(hf_checkpoint / "config.json", no_file)
  with pytest.raises(UserError, match=r"no model.safetensors \(or model.safetensors.index.json\)"
                                      r" in the directory"):
    build(load(root, no_file), devices)
  (no_file / "model.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(UserError, match=r"is not a readable safetensors file"):
    build(load(root, no_file), devices)


GEN_PROMPTS = [[5, 17, 200, 3, 9, 41], [7, 8], [100, 12, 99], [3] * 7, [249], [6, 7, 1, 2],
               [8, 9, 10, 11, 12], [0, 1]]


@pytest.fixture(scope="module")
def hf_greedy(hf_checkpoint_8):
  """transformers' own greedy generate, one prompt at a time (no padding involved)."""
  import torch
  import transformers
  model = transformers.GPT2LMHeadModel.from_pretrained(hf_checkpoint_8).float().eval()
  out = []
  with torch.no_grad():
    for prompt in GEN_PROMPTS:
      ids = torch.tensor([prompt], dtype=torch.long)
      tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
      out.append(tokens[0, len(prompt):].tolist())
  out = np.array(out)
  assert np.mean([len(set(row)) for row in out]) > 3  # context-dependent, not an echo
  return out


# One device and all three axes: test_generate.py checks greedy tokens on nine meshes against a
# NumPy recompute, these against transformers.
@pytest.mark.parametrize("data,stage,model", [(1, 1, 1), (2, 2, 2)])
def test_greedy_generate_equals_transformers(root, devices, hf_checkpoint_8, hf_greedy, data,
                                             stage, model):
  from jaxpar.runtime import generate
  config = load(root, hf_checkpoint_8, f"mesh.data={data}", f"mesh.stage={stage}",
                f"mesh.model={model}", f"run.batch={len(GEN_PROMPTS)}")
  gen = generate.build(config, make_mesh(config.mesh, devices=devices[:data * stage * model]))
  tokens = gen.generate(GEN_PROMPTS, max_new_tokens=10).tokens
  np.testing.assert_array_equal(tokens, hf_greedy)


def test_text_prompts_use_the_checkpoints_tokenizer(root, tmp_path, hf_checkpoint, monkeypatch,
                                                    capsys):
  from tokenizers import Tokenizer, models, pre_tokenizers
  words = ["[unk]", "the", "cat", "sat", "on", "mat", "a", "dog"] + [f"w{i}" for i in range(40)]
  tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[unk]"))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  checkpoint = tmp_path / "with_tokenizer"
  shutil.copytree(hf_checkpoint, checkpoint)
  tokenizer.save(str(checkpoint / "tokenizer.json"))
  monkeypatch.chdir(root)
  code = cli.main(["generate", "--config", "configs/tiny.yaml", "--set",
                   f"model.checkpoint={checkpoint}", "--set", "mesh.data=2", "--set",
                   "mesh.model=4", "--prompt", "the cat sat", "--prompt", "a dog",
                   "--max-new-tokens", "4", "--json"])
  out = capsys.readouterr().out
  assert code == 0
  result = json.loads(out.strip().splitlines()[-1])
  assert len(result["new_tokens"]) == 2 and all(len(r) == 4 for r in result["new_tokens"])
  # The new tokens are shown as text too, decoded by the same tokenizer.
  assert result["texts"] == [tokenizer.decode(r) for r in result["new_tokens"]]
  assert f"{result['new_tokens'][0]} {result['texts'][0]!r}" in out
  # The same prompts as ids give the same tokens: the text went through the tokenizer.
  code = cli.main(["generate", "--config", "configs/tiny.yaml", "--set",
                   f"model.checkpoint={checkpoint}", "--set", "mesh.data=2", "--set",
                   "mesh.model=4", "--prompt-ids", "1,2,3;6,7", "--max-new-tokens", "4",
                   "--json"])
  ids = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert code == 0 and ids["new_tokens"] == result["new_tokens"]
