"""Checkpoints that follow the mesh: Hugging Face -> Orbax on one mesh, restored bit-exact on
others (another stage count, circular or not, scan or unrolled) with greedy tokens equal to
`transformers`; Orbax -> Hugging Face loads in `transformers` with equal logits; saves are
atomic (a SIGKILL midway leaves the old checkpoint and no loadable new one); damaged or
mismatched checkpoints are one-line errors."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxpar import cli
from jaxpar import config as config_lib
from jaxpar.errors import UserError
from jaxpar.mesh import make_mesh
from jaxpar.runtime import checkpoint, generate, inference
from tests.conftest import cli_env, write_hf_decoder
from tests.test_llama import NEW, PROMPTS, hf_logits, transformers_greedy

SOURCE_MESH = ["mesh.data=2", "mesh.stage=2", "mesh.model=2", "pipeline.repeats=2"]


def load(root, path, *overrides):
  return config_lib.load(root / "configs" / "tiny.yaml", [f"model.checkpoint={path}",
                                                          *overrides])


def convert(root, source, out, *args) -> tuple[int, str, str]:
  proc = subprocess.run(
      [sys.executable, "scripts/run.py", "convert", "--config", "configs/tiny.yaml", "--set",
       f"model.checkpoint={source}", *args, "--out", str(out)], cwd=root, capture_output=True,
      text=True, timeout=600, env=cli_env())
  return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
  return write_hf_decoder(tmp_path_factory.mktemp("hf"), "llama", seed=3)


@pytest.fixture(scope="module")
def orbax_llama(root, hf_llama, tmp_path_factory):
  """The HF checkpoint converted on a 2x2x2 mesh with a circular pipeline, copied KV heads."""
  out = tmp_path_factory.mktemp("orbax") / "llama"
  sets = [a for s in SOURCE_MESH for a in ("--set", s)]
  code, stdout, stderr = convert(root, hf_llama, out, *sets)
  assert code == 0, stderr
  assert "saved a jaxpar checkpoint" in stdout
  assert sorted(os.listdir(out)) == ["jaxpar.json", "params"]
  return out


@pytest.fixture(scope="module")
def hf_greedy(hf_llama):
  return transformers_greedy(hf_llama)


def natural_host(config, devices):
  m = config.mesh
  fwd = inference.build(config, make_mesh(m, devices=devices[:m.data * m.stage * m.model]))
  return jax.device_get(checkpoint.natural_params(fwd))


# (data, stage, model, repeats, scan): one device, copied KV heads on 8, data only, another
# stage count, circular.
TARGETS = [(1, 1, 1, 1, False), (1, 1, 8, 1, True), (8, 1, 1, 1, False), (1, 4, 2, 1, None),
           (2, 2, 2, 2, None)]


@pytest.mark.parametrize("data,stage,model,repeats,scan", TARGETS)
def test_restore_on_any_mesh(root, devices, hf_llama, orbax_llama, hf_greedy, data, stage,
                             model, repeats, scan):
  reference = natural_host(load(root, hf_llama, "mesh.data=1", "mesh.model=1"), devices)
  config = load(root, orbax_llama, f"mesh.data={data}", f"mesh.stage={stage}",
                f"mesh.model={model}", f"pipeline.repeats={repeats}")
  config = dataclasses.replace(config, model=dataclasses.replace(config.model,
                                                                 scan_layers=scan))
  assert config.model.family == "llama" and config.model.n_kv_heads == 2
  restored = natural_host(config, devices)
  for (path, a), b in zip(jax.tree.leaves_with_path(restored), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))  # bit-exact
  mesh = make_mesh(config.mesh, devices=devices[:data * stage * model])
  tokens = generate.build(config, mesh, eos_id=-1).generate(PROMPTS, max_new_tokens=NEW).tokens
  np.testing.assert_array_equal(tokens, hf_greedy)


def test_each_device_reads_a_slice(root, devices, orbax_llama):
  """Restoring on model=8 (vocabulary 251 and 2 key/value heads, which 8 divides in neither)
  reads no more elements per device than the device then holds: no whole tensor anywhere."""
  config = load(root, orbax_llama, "mesh.data=1", "mesh.model=8")
  fwd = inference.build(config, make_mesh(config.mesh, devices=devices))
  assert fwd.layout.kv_repeat == 4 and fwd.layout.vocab_multiple == 8
  natural = checkpoint.natural_shapes(fwd.params, fwd.names, config.model, fwd.layout)
  storage = checkpoint.storage_shardings(natural, fwd.names, fwd.rules, fwd.mesh)
  for (path, s), sh, held in zip(jax.tree.leaves_with_path(natural), jax.tree.leaves(storage),
                                 jax.tree.leaves(fwd.params)):
    read = np.prod(sh.shard_shape(s.shape))
    holds = np.prod(held.sharding.shard_shape(held.shape))
    assert read <= holds, (jax.tree_util.keystr(path), s.shape, sh.spec, held.sharding.spec)
    if held.ndim >= 2 and holds < held.size:  # split in the mesh layout: split when read
      assert read < np.prod(s.shape), jax.tree_util.keystr(path)


def test_export_to_hugging_face(root, devices, orbax_llama, hf_llama, tmp_path):
  out = tmp_path / "hf"
  code, _, stderr = convert(root, orbax_llama, out, "--format", "hf")
  assert code == 0, stderr
  tokens = np.random.default_rng(0).integers(0, 251, (4, 12))
  np.testing.assert_allclose(hf_logits(out, tokens), hf_logits(hf_llama, tokens), rtol=0,
                             atol=1e-5)
  bf16 = tmp_path / "hf_bf16"
  code, _, stderr = convert(root, orbax_llama, bf16, "--format", "hf", "--dtype", "bfloat16")
  assert code == 0, stderr
  assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
  got = hf_logits(bf16, tokens)  # loads; bf16 weights move logits by about 1e-2
  assert np.abs(got - hf_logits(hf_llama, tokens)).max() < 0.5


def test_existing_out_is_refused(root, orbax_llama, hf_llama, tmp_path):
  code, _, err = convert(root, hf_llama, orbax_llama)
  assert code == 2 and "already exists (a checkpoint); pass --overwrite" in err
  (folder := tmp_path / "notes").mkdir()
  (folder / "todo.txt").write_text("mine")
  code, _, err = convert(root, hf_llama, folder, "--overwrite")
  assert code == 2 and "is not a checkpoint" in err
  assert (folder / "todo.txt").read_text() == "mine"


def test_convert_keeps_the_tokenizer_and_never_writes_over_its_source(root, hf_llama,
                                                                      tmp_path):
  """The tokenizer and chat template travel with the weights (Orbax and Hugging Face);
  --out naming the checkpoint being read is refused, --overwrite or not, and loses nothing."""
  source = tmp_path / "source"
  shutil.copytree(hf_llama, source)
  files = {"tokenizer.json": '{"model": "yours"}', "tokenizer_config.json": '{"a": 1}',
           "chat_template.jinja": "{{ messages[0].content }}"}
  for name, text in files.items():
    (source / name).write_text(text)
  for fmt in ("orbax", "hf"):
    code, _, err = convert(root, source, tmp_path / fmt, "--format", fmt)
    assert code == 0, err
    assert {n: (tmp_path / fmt / n).read_text() for n in files} == files
  before = sorted(os.listdir(source))
  code, _, err = convert(root, source, source, "--format", "hf", "--overwrite")
  assert code == 2 and "is the checkpoint being read (model.checkpoint)" in err
  assert sorted(os.listdir(source)) == before and (source / "tokenizer.json").read_text() == (
      files["tokenizer.json"])


def test_sigkill_midway_keeps_the_old_checkpoint(root, tmp_path, devices):
  """A conversion killed while writing over an existing checkpoint (--overwrite) leaves the old
  one loadable and untouched, a `.partial` directory that is refused as incomplete, and no
  other path changed."""
  sizes = ["model.d_model=512", "model.d_ff=2048", "model.n_layers=8", "model.vocab_size=8192",
           "model.n_heads=8"]  # 112 MiB: the kill lands while it is written
  good, other = tmp_path / "good", tmp_path / "other"
  config = config_lib.load(root / "configs" / "tiny.yaml", sizes)
  config = dataclasses.replace(config, mesh=config_lib.MeshConfig(1, 1, 1))
  one = make_mesh(config.mesh, devices=devices[:1])
  rng = np.random.default_rng(0)  # numpy's draws: quicker than compiling the initialiser
  params = jax.tree.map(lambda a: rng.standard_normal(a.shape, np.float32).astype(a.dtype),
                        inference.place(config, one).natural[0])
  checkpoint.save(inference.build(config, one, params=params), str(good), say=lambda _: None)
  shutil.copytree(good, other)  # the source, and a checkpoint beside it that must stay as is
  before = {p: contents(p) for p in (good, other)}
  proc = subprocess.Popen([sys.executable, "scripts/run.py", "convert", "--config",
                           "configs/tiny.yaml", *[a for s in sizes for a in ("--set", s)],
                           "--set", f"model.checkpoint={other}", "--out", str(good),
                           "--overwrite"], cwd=root, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  partial = tmp_path / "good.partial"
  deadline = time.time() + 300
  # Killed once the weights are being written (an empty folder is no checkpoint of any kind).
  while not writing(partial) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.002)
  assert proc.poll() is None, "the conversion ended before it could be killed midway"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait(timeout=30)
  assert {p: contents(p) for p in (good, other)} == before  # byte for byte
  with pytest.raises(UserError, match=r"incomplete"):
    load(root, partial)
  stray = tmp_path / "moved"  # the folder alone, renamed by hand, does not load either
  os.rename(partial, stray)
  with pytest.raises(UserError, match=r"incomplete \(no jaxpar.json"):
    load(root, stray)
  os.rename(stray, partial)
  assert load(root, good).model.d_model == 512
  code, _, err = convert(root, partial, tmp_path / "again")
  assert code == 2 and err.count("\n") == 1 and "incomplete" in err


def writing(folder) -> bool:
  try:
    return any(folder.iterdir())
  except FileNotFoundError:
    return False


def contents(folder) -> dict:
  import hashlib
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob("*")) if p.is_file()}


def expect_one_line(capsys, code, message):
  out, err = capsys.readouterr()
  assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
  assert message in err, err
  assert "compiling" not in out


def test_damaged_and_mismatched_checkpoints(root, orbax_llama, tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(root)
  forward = lambda path, *sets: cli.main(["forward", "--config", "configs/tiny.yaml", "--set",
                                          f"model.checkpoint={path}",
                                          *[a for s in sets for a in ("--set", s)]])
  expect_one_line(capsys, forward(orbax_llama, "model.d_model=128"),
                  "model.d_model=128 disagrees with model.checkpoint")
  expect_one_line(capsys, forward(orbax_llama, "model.family=qwen2"),
                  "model.family='qwen2' disagrees with model.checkpoint")
  # Data files truncated, or deleted.
  for name, damage in [("truncated", lambda f: f.write_bytes(f.read_bytes()[:10])),
                       ("deleted", lambda f: f.unlink())]:
    copy = tmp_path / name
    shutil.copytree(orbax_llama, copy)
    files = sorted((p for p in (copy / "params").rglob("*") if p.is_file()
                    and p.parent.name == "d"), key=lambda p: -p.stat().st_size)
    damage(files[0])
    expect_one_line(capsys, forward(copy), "the checkpoint is damaged: convert it again")
    capsys.readouterr()
  # The cause named plainly (not tensorstore's spec), and in a process of its own nothing
  # after the one line (asyncio reported the other failed reads: a hundred lines).
  proc = subprocess.run([sys.executable, "scripts/run.py", "forward", "--config",
                         "configs/tiny.yaml", "--set", f"model.checkpoint={copy}"], cwd=root,
                        capture_output=True, text=True, timeout=600,
                        env=cli_env())
  assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
  assert "damaged" in proc.stderr and "bound method" not in proc.stderr
  # jaxpar.json of another model (its layers do not match the saved parameters).
  other = tmp_path / "other"
  shutil.copytree(orbax_llama, other)
  meta = json.loads((other / "jaxpar.json").read_text())
  meta["model"]["n_layers"] = 2
  (other / "jaxpar.json").write_text(json.dumps(meta))
  expect_one_line(capsys, forward(other), "convert it again")


def launch(root, *args) -> subprocess.CompletedProcess:
  """`scripts/launch_local.py --processes 2 -- ARGS`, 4 emulated devices per process."""
  return subprocess.run(
      [sys.executable, "scripts/launch_local.py", "--processes", "2", "--timeout", "500", "--",
       *args, "--devices", "4"], cwd=root, capture_output=True, text=True, timeout=600,
      env=cli_env())


def test_two_processes(root, hf_llama, hf_greedy, tmp_path):
  """Converted by 2 processes (each writing its own shards) on a 2-stage circular pipeline,
  restored by 2 processes on data=2 x model=4: greedy tokens equal transformers."""
  out = tmp_path / "two"
  proc = launch(root, "convert", "--config", "configs/tiny.yaml", "--set",
                f"model.checkpoint={hf_llama}", "--set", "mesh.data=1", "--set", "mesh.stage=2",
                "--set", "mesh.model=4", "--set", "pipeline.repeats=2", "--out", str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(p.name for p in (out / "params").glob("ocdbt.process_*")) == [
      "ocdbt.process_0", "ocdbt.process_1"]
  ids = ";".join(",".join(map(str, p)) for p in PROMPTS)
  proc = launch(root, "generate", "--config", "configs/tiny.yaml", "--set",
                f"model.checkpoint={out}", "--set", "mesh.data=2", "--set", "mesh.model=4",
                "--set", "generate.eos_id=-1", "--prompt-ids", ids, "--max-new-tokens",
                str(NEW), "--json")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["processes"] == 2
  np.testing.assert_array_equal(np.array(result["new_tokens"]), hf_greedy)
  # Exported to Hugging Face by 2 processes (each holding half the shards): transformers
  # loads the same model (issue 25: jax.device_get of shards another process holds).
  hf_out = tmp_path / "two_hf"
  proc = launch(root, "convert", "--config", "configs/tiny.yaml", "--set",
                f"model.checkpoint={out}", "--set", "mesh.data=1", "--set", "mesh.model=8",
                "--format", "hf", "--out", str(hf_out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  tokens = np.random.default_rng(1).integers(0, 251, (2, 10))
  np.testing.assert_allclose(hf_logits(hf_out, tokens), hf_logits(hf_llama, tokens), rtol=0,
                             atol=1e-5)
