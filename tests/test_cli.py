"""scripts/run.py forward: a real run end to end, and one-line errors for user mistakes."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxpar import cli
from jaxpar.config import MeshConfig
from jaxpar.mesh import make_mesh
from jaxpar.runtime import inference


def run_script(root, *args, timeout=300):
  return subprocess.run([sys.executable, str(root / "scripts" / "run.py"), *args],
                        capture_output=True, text=True, timeout=timeout, cwd=root)


def test_forward_json_and_saved_logits(root, tmp_path, tiny, devices):
  out = tmp_path / "logits.npy"
  proc = run_script(root, "forward", "--config", "configs/tiny.yaml", "--devices", "8",
                    "--set", "mesh.model=4", "--verify", "--save-logits", str(out), "--json")
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["mesh"] == {"data": 2, "stage": 1, "expert": 1, "model": 4}
  assert result["devices"] == 8
  assert result["collectives"] == {"all-reduce": {"count": 3, "bytes": 3 * 4 * 16 * 64 * 4}}
  assert result["compile_s"] > 0 and result["tokens_per_s"] > 0
  assert result["param_bytes_per_device"] < result["param_bytes_total"] / 2
  assert result["verify_max_abs_diff"] < 1e-5
  for text in ("mesh: data=2 x stage=1 x model=4", "blocks/attn/w_q", "all-reduce",
               "tokens/s", "verify: max"):
    assert text in proc.stdout
  # The saved logits equal this process's own single-device run of the same config.
  single = inference.build(tiny, make_mesh(MeshConfig(1, 1, 1), devices=devices[:1]))
  tokens = inference.seeded_tokens(tiny)
  expected = inference.unpad(single(single.tokens(tokens)), tiny.model.vocab_size)
  saved = np.load(out)
  assert saved.dtype == np.float32 and saved.shape == (8, 16, 250)
  np.testing.assert_allclose(saved, expected, rtol=0, atol=1e-5)


def test_user_error_through_a_real_process_has_no_traceback(root):
  proc = run_script(root, "forward", "--config", "configs/tiny.yaml", "--set",
                    "model.n_heads=3")
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines() == [
      "error: model.d_model=64 is not divisible by model.n_heads=3; pick a head count that "
      "divides the width, or set model.head_dim"]


BAD = [
    (["--set", "model.n_head=4"], "model.n_head: unknown key"),
    (["--set", "model.n_layers=two"], "model.n_layers='two' is a str, expected int"),
    (["--set", "model.n_heads=4", "--set", "mesh.model=8"],
     "model.n_heads=4 does not split over mesh.model=8"),
    (["--set", "model.d_ff=100", "--set", "mesh.model=8"],
     "model.d_ff=100 does not split over mesh.model=8"),
    (["--set", "mesh.data=3"], "needs 3 devices but 8 are present"),
    (["--set", "rules.foo=model"], "rules.foo: unknown logical name 'foo'"),
    (["--set", "rules.mlp=tensor"], "'tensor' is not a mesh axis"),
    (["--set", "rules.embed=model", "--set", "mesh.model=2"], "rule conflict"),
    (["--set", "rules.batch=[data,model]", "--set", "mesh.model=2"],
     "logical names 'batch' and 'vocab' both map to mesh axis 'model'"),
    (["--set", "run.seq_len=64"], "run.seq_len=64 exceeds model.max_seq_len=32"),
    (["--set", "run.batch=3"], "run.batch=3 does not split over mesh.data=8"),
    (["--set", "mesh.stage=2", "--set", "mesh.data=4", "--set", "model.n_layers=3",
      "--set", "pipeline.repeats=2"],
     "model.n_layers=3 is fewer than mesh.stage=2 x pipeline.repeats=2 chunks of layers"),
    (["--set", "mesh.stage=2", "--set", "mesh.data=4", "--set", "pipeline.microbatches=3"],
     "run.batch=8 is not divisible by pipeline.microbatches=3"),
    (["--set", "mesh.stage=4", "--set", "mesh.data=2", "--set", "model.n_layers=4",
      "--set", "pipeline.microbatches=2"], "pipeline.microbatches=2 < mesh.stage=4"),
    (["--set", "mesh.stage=2", "--set", "mesh.data=4", "--set", "pipeline.repeats=0"],
     "pipeline.repeats=0: must be at least 1"),
    (["--set", "mesh.stage=2", "--set", "mesh.data=4", "--schedule-png", "no/dir/s.png"],
     "--schedule-png no/dir/s.png: folder"),
    (["--set", "mesh"], "expected section.key=value"),
    (["--devices", "0"], "--devices 0: must be at least 1"),
    (["--save-logits", "no/such/dir/x.npy"], "--save-logits no/such/dir/x.npy: folder"),
]


@pytest.fixture
def no_compiling(monkeypatch):
  """Fails the test if anything reaches jax.jit: errors must come before compiling."""
  def jit(*args, **kwargs):
    raise AssertionError("jax.jit was reached before the user error was raised")
  monkeypatch.setattr(jax, "jit", jit)


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_gives_one_line_error(root, monkeypatch, capsys, no_compiling, args,
                                        message):
  monkeypatch.chdir(root)
  code = cli.main(["forward", "--config", "configs/tiny.yaml", *args])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2
  assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_file_errors(root, tmp_path, capsys, no_compiling):
  assert cli.main(["forward", "--config", str(tmp_path / "missing.yaml")]) == 2
  assert "missing.yaml: no such file" in capsys.readouterr().err
  broken = tmp_path / "broken.yaml"
  broken.write_text("model:\n  d_model: [64\n")
  assert cli.main(["forward", "--config", str(broken)]) == 2
  assert "not valid YAML at line" in capsys.readouterr().err
  bad_rule = tmp_path / "bad_rule.yaml"
  bad_rule.write_text((root / "configs" / "tiny.yaml").read_text() + "rules: {mlp: tensor}\n")
  assert cli.main(["forward", "--config", str(bad_rule)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "rules.mlp='tensor'" in err[0] and "not a mesh axis" in err[0]


def test_cli_imports_no_jax(root):
  """scripts/run.py builds its parser before JAX starts, so --devices can still act."""
  code = ("import sys; from jaxpar import cli; sys.modules['jaxpar.cli.main']._parser(); "
          "assert 'jax' not in sys.modules, 'jaxpar.cli imported jax'")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                        timeout=60)
  assert proc.returncode == 0, proc.stderr


def test_ctrl_c_ends_with_one_line_not_a_traceback(root, monkeypatch, capsys, tmp_path):
  from jaxpar.cli import convert

  def interrupted(args, config):
    raise KeyboardInterrupt
  monkeypatch.setattr(convert, "run", interrupted)
  monkeypatch.chdir(root)
  code = cli.main(["convert", "--config", "configs/tiny.yaml", "--out", str(tmp_path / "x")])
  assert code == 130 and capsys.readouterr().err.strip() == "interrupted: convert stopped"
