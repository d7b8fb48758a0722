"""What a new user hit (issue 14), each kept fixed by a test that failed before the fix."""

import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest

from jaxpar import cli, inspect
from jaxpar import config as config_lib
from jaxpar.config import MeshConfig
from jaxpar.errors import UserError
from jaxpar.mesh import describe, make_mesh
from jaxpar.runtime import generate, inference

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(capsys, *args) -> tuple[int, str, str, dict | None]:
  code = cli.main(list(args))
  out, err = capsys.readouterr()
  lines = out.strip().splitlines()
  result = json.loads(lines[-1]) if "--json" in args and code == 0 else None
  return code, out, err, result


def one_line_error(code, err, message):
  lines = err.strip().splitlines()
  assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
  assert message in lines[0], lines[0]


# 1. Unrolled generation keeps tensor parallelism: same bytes per device as the forward.
@pytest.mark.parametrize("data,model", [(1, 8), (2, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("scan", [False, True])
def test_generate_holds_the_forwards_bytes(tiny, devices, data, model, scan):
  config = dataclasses.replace(tiny, mesh=MeshConfig(data, 1, model),
                               model=dataclasses.replace(tiny.model, scan_layers=scan))
  mesh = make_mesh(config.mesh, devices=devices)
  gen = generate.build(config, mesh)
  fwd = inference.build(config, mesh, abstract=True)  # the forward's layout, nothing created
  assert gen.param_bytes_per_device() == sum(
      row.bytes_per_device for row in inspect.param_table(fwd.params, fwd.names, fwd.rules, mesh))
  if not scan:
    for layer in gen.layers:
      for a, b in zip(jax.tree.leaves(layer), jax.tree.leaves(fwd.params["blocks"])):
        assert a.sharding.spec == jax.sharding.PartitionSpec(*b.sharding.spec[1:])


def test_generate_json_reports_param_bytes_like_forward(root, monkeypatch, capsys):
  monkeypatch.chdir(root)
  common = ["--config", "configs/tiny.yaml", "--set", "mesh.model=4", "--json"]
  *_, fwd = run(capsys, "forward", *common)
  *_, gen = run(capsys, "generate", *common, "--set", "model.scan_layers=false")
  assert gen["param_bytes_per_device"] == fwd["param_bytes_per_device"]


# 2. The same seed samples the same tokens on every mesh.
def test_seeded_sampling_does_not_depend_on_the_mesh(tiny, devices):
  config = dataclasses.replace(tiny, model=dataclasses.replace(tiny.model, n_layers=4,
                                                               max_seq_len=32))
  prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [3, 1], [9]]
  sampling = generate.Sampling(temperature=1.0, top_k=50, top_p=0.9)
  results, gens = [], []
  # one device; the plain decoder over data and model; the pipelined one over all three axes
  # and over stage and model (both with rows padded to the groups)
  for data, stage, model in [(1, 1, 1), (2, 1, 4), (2, 2, 2), (1, 4, 2)]:
    c = dataclasses.replace(config, mesh=MeshConfig(data, stage, model))
    gens.append(generate.build(c, make_mesh(c.mesh, devices=devices[:data * stage * model]),
                               eos_id=-1))
    results.append(gens[-1].generate(prompts, max_new_tokens=8, sampling=sampling,
                                     seed=1).tokens)
  for tokens in results[1:]:
    np.testing.assert_array_equal(tokens, results[0])
  other = gens[0].generate(prompts, max_new_tokens=8, sampling=sampling, seed=2).tokens
  assert not np.array_equal(results[0], other)  # it did sample, by its seed


def test_generate_takes_the_penalties_from_the_config(root, monkeypatch, capsys):
  """generate.presence_penalty and friends reach the decoder (the tokens change: each one's
  values against NumPy are tests/test_generate.py's), are said, and are range-checked."""
  monkeypatch.chdir(root)
  base = ["generate", "--config", "configs/tiny.yaml", "--prompt-ids", "1,2,3",
          "--max-new-tokens", "8", "--json"]
  code, _, err, plain = run(capsys, *base)
  assert code == 0, err
  code, out, err, penalised = run(capsys, *base, "--set", "generate.presence_penalty=-2",
                                  "--set", "generate.frequency_penalty=1.5")
  assert code == 0, err
  assert penalised["new_tokens"] != plain["new_tokens"]
  assert "penalties: presence -2.0, frequency 1.5" in out + err
  code, _, err, _ = run(capsys, *base, "--set", "generate.repetition_penalty=0")
  one_line_error(code, err, "generate.repetition_penalty=0.0: expected a number from 0 to 2")


# 3. Small floats in any notation.
def test_floats_in_any_notation(root, tmp_path, monkeypatch, capsys):
  config = config_lib.load(root / "configs" / "tiny.yaml", ["model.init_std=1e-3",
                                                            "generate.top_p=1E-6"])
  assert config.model.init_std == 0.001 and config.generate.top_p == 1e-6
  yaml_file = tmp_path / "c.yaml"
  yaml_file.write_text((root / "configs" / "tiny.yaml").read_text().replace(
      "init_std: 0.2", "init_std: 2e-1"))
  assert config_lib.load(yaml_file).model.init_std == 0.2
  with pytest.raises(UserError, match=r"model.init_std='1e-3x' is a str, expected float"):
    config_lib.load(root / "configs" / "tiny.yaml", ["model.init_std=1e-3x"])
  monkeypatch.chdir(root)
  code, *_ = run(capsys, "generate", "--config", "configs/tiny.yaml", "--prompt-ids", "1,2",
                 "--temperature", "0.00001", "--top-p", "0.000001", "--max-new-tokens", "2")
  assert code == 0


# 5. Every shipped config runs every command it serves (depth cut to the stages it needs, the
# vocabulary to 1001 rows, which no mesh axis divides: the full tables of 128k-152k rows took
# most of the time; the width to 8 per head and an MLP of 128, so every head split stays as
# shipped; a config is still loaded and checked at its full size).
SHIPPED = [(c, cmd) for c in ("default", "tiny", "gpt2", "pipeline", "llama", "mistral", "mixtral",
                              "qwen2", "qwen3") for cmd in ("forward", "generate")]
SHIPPED += [("cnn", "classify"), ("cnn_tiny", "classify")]


@pytest.mark.parametrize("name,command", SHIPPED)
def test_shipped_configs_run(root, monkeypatch, capsys, name, command):
  monkeypatch.chdir(root)
  path = root / "configs" / f"{name}.yaml"
  config = config_lib.load(path)
  args = [command, "--config", str(path), "--set", "run.iters=1", "--set", "run.warmup=0",
          "--json"]
  if command == "classify":  # tests/test_vision.py compares layouts with one device
    args += ["--no-verify"]
  else:
    depth = config.mesh.stage * (config.pipeline.repeats if command == "forward" else 1)
    m = config.model
    narrow = [f"model.d_model={8 * m.n_heads}", "model.d_ff=128"] + (
        ["model.head_dim=8"] if m.head_dim else [])
    for item in [f"model.n_layers={max(depth, 1)}",
                 f"model.vocab_size={min(m.vocab_size, 1001)}", *narrow]:
      args += ["--set", item]
    args += ["--no-verify" if command == "forward" else "--max-new-tokens=2"]
  code, out, err, result = run(capsys, *args)
  assert code == 0, err
  assert result["command"] == command
  if name == "mixtral" and command == "forward":  # each layer's pairs: batch x seq x top k
    pairs = config.run.batch * config.run.seq_len * config.model.options.experts_per_token
    assert [sum(layer) for layer in result["experts"]["tokens_per_expert"]] == [pairs] * depth


def test_errors_name_the_key_to_change(root, monkeypatch, capsys):
  monkeypatch.chdir(root)
  code, _, err, _ = run(capsys, "generate", "--config", "configs/tiny.yaml", "--max-new-tokens",
                        "30")
  one_line_error(code, err, "generate.prompt_len")


def test_pipeline_config_generates_with_a_note(root, monkeypatch, capsys):
  monkeypatch.chdir(root)
  code, out, err, _ = run(capsys, "generate", "--config", "configs/tiny.yaml", "--set",
                          "mesh.stage=2", "--set", "mesh.data=4", "--set", "pipeline.repeats=2",
                          "--prompt-ids", "1,2;3", "--max-new-tokens", "3")
  assert code == 0, err
  assert "pipeline.repeats=2 (the circular schedule) applies to forward only" in out


# 6. forward pads --prompt-ids rows to the mesh, as generate does.
def test_forward_pads_prompt_rows(root, monkeypatch, capsys, tmp_path):
  monkeypatch.chdir(root)
  out_file = tmp_path / "logits.npy"
  code, out, err, result = run(capsys, "forward", "--config", "configs/tiny.yaml", "--set",
                               "mesh.data=8", "--prompt-ids", "1,2,3;4,5,6", "--verify",
                               "--save-logits", str(out_file), "--json")
  assert code == 0, err
  assert "2 rows of --prompt-ids padded to 8" in out
  logits = np.load(out_file)
  assert logits.shape == (2, 3, 250) and result["verify_max_abs_diff"] < 1e-5
  single = inference.build(dataclasses.replace(
      config_lib.load(root / "configs" / "tiny.yaml"), mesh=MeshConfig(1, 1, 1),
      run=config_lib.RunConfig(batch=2, seq_len=3)), make_mesh(MeshConfig(1, 1, 1),
                                                              devices=jax.devices()[:1]))
  expected = inference.unpad(single(single.tokens(np.array([[1, 2, 3], [4, 5, 6]]))), 250)
  np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)


# 7. A size set before the checkpoint is checked against it, as one set after it is.
def test_override_order_does_not_matter(root, hf_checkpoint):
  for order in (["model.n_layers=3", f"model.checkpoint={hf_checkpoint}"],
                [f"model.checkpoint={hf_checkpoint}", "model.n_layers=3"]):
    with pytest.raises(UserError, match=r"model.n_layers=3 disagrees with model.checkpoint"):
      config_lib.load(root / "configs" / "tiny.yaml", order)


# 8. Text and ids together are refused.
def test_prompt_and_prompt_ids_together(root, monkeypatch, capsys):
  monkeypatch.chdir(root)
  code, _, err, _ = run(capsys, "generate", "--config", "configs/tiny.yaml", "--prompt", "hi",
                        "--prompt-ids", "1,2")
  one_line_error(code, err, "--prompt and --prompt-ids both given")


# 9. forward honours model.scan_layers=false: no loop, same logits.
def test_forward_unrolled(tiny, devices):
  logits, loops = [], []
  for scan in (True, False):
    config = dataclasses.replace(tiny, mesh=MeshConfig(2, 1, 4),
                                 model=dataclasses.replace(tiny.model, scan_layers=scan))
    fwd = inference.build(config, make_mesh(config.mesh, devices=devices))
    tokens = fwd.tokens(inference.seeded_tokens(config))
    loops.append(inspect.hlo_census(fwd.compile(tokens).as_text()).loops)
    logits.append(inference.unpad(fwd(tokens), 250))
  assert list(loops[0].values()) == [2] and loops[1] == {}
  np.testing.assert_allclose(logits[1], logits[0], rtol=0, atol=1e-5)


# 10, 11. --schedule-png without stages; output paths taken as given.
def test_schedule_png_without_stages(root, monkeypatch, capsys, tmp_path):
  monkeypatch.chdir(root)
  code, out, err, _ = run(capsys, "forward", "--config", "configs/tiny.yaml", "--schedule-png",
                          str(tmp_path / "s.png"))
  one_line_error(code, err, "the mesh has no pipeline (mesh.stage=1)")
  assert "compiling" not in out


def test_output_paths_are_used_as_given(root, monkeypatch, capsys, tmp_path):
  monkeypatch.chdir(root)
  tokens, logits = tmp_path / "tokens.bin", tmp_path / "logits"
  assert run(capsys, "generate", "--config", "configs/tiny.yaml", "--prompt-ids", "1,2",
             "--max-new-tokens", "2", "--save-tokens", str(tokens))[0] == 0
  assert run(capsys, "forward", "--config", "configs/tiny.yaml", "--save-logits",
             str(logits))[0] == 0
  assert np.load(tokens).shape == (1, 2) and np.load(logits).shape == (8, 16, 250)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["logits", "tokens.bin"]


# 12, 13. A partial rules table merges into the default; an all-commented section is empty.
def test_partial_rules_and_empty_sections(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text("rules:\n  mlp: null\nrun:\n  # batch: 8\n  # seq_len: 16\nmodel:\n"
                  "  n_layers: 4\n")
  config = config_lib.load(path)
  default = config_lib.Config()
  assert [n for n, _ in config.rules] == [n for n, _ in default.rules]
  assert dict(config.rules) == {**dict(default.rules), "mlp": None}
  assert config.run == default.run and config.model.n_layers == 4


# 14. Memory figures that add up.
def test_memory_line_adds_up(root, monkeypatch, capsys):
  monkeypatch.chdir(root)
  code, out, _, result = run(capsys, "classify", "--config", "configs/cnn_tiny.yaml", "--json")
  assert code == 0
  m = result["memory_per_device"]
  assert m["peak"] >= m["argument"] + m["output"] - m["alias"] + m["temp"]
  assert f"total live at most {inspect.human(m['peak'])}" in out


# 16. Smaller things a user sees.
def test_what_the_user_sees(root, monkeypatch, capsys, hf_checkpoint, devices):
  monkeypatch.chdir(root)
  code, out, err, _ = run(capsys, "forward", "--config", "configs/tiny.yaml", "--set",
                          f"model.checkpoint={hf_checkpoint}", "--verify")
  assert code == 0, err
  assert f"parameters read from checkpoint {hf_checkpoint}" in out
  assert "(float32: rounding alone gives up to about 1e-5)" in out
  code, out, *_ = run(capsys, "forward", "--config", "configs/tiny.yaml")
  assert "parameters initialised sharded in" in out and "compiling the initialiser" in out
  code, _, err, _ = run(capsys, "generate", "--config", "configs/tiny.yaml", "--prompt-ids",
                        "-1,2")
  one_line_error(code, err, "token id -1 is outside the vocabulary")
  code, out, *_ = run(capsys, "generate", "--config", "configs/tiny.yaml", "--prompt-ids",
                      "5,6", "--max-new-tokens", "2")
  assert "1 prompt of 2 tokens" in out and "1 prompts" not in out
  assert describe(make_mesh(MeshConfig(1, 1, 1), devices=devices[:1])).endswith(
      "(1 cpu device)")
  assert "JAXPAR_CACHE_DIR" in (root / "README.md").read_text()


def test_classify_one_image_file(root, monkeypatch, capsys, tmp_path):
  from PIL import Image
  monkeypatch.chdir(root)
  Image.new("RGB", (20, 20), (200, 30, 30)).save(tmp_path / "red.png")
  code, out, err, result = run(capsys, "classify", "--config", "configs/cnn_tiny.yaml",
                               "--images", str(tmp_path / "red.png"), "--json")
  assert code == 0, err
  assert list(result["predictions"]) == ["red.png"]
