"""Many processes on this host (`scripts/launch_local.py`, jax.distributed over loopback, gloo
collectives): the same results as one process, output from rank 0 only, one-line errors, and
no rank left behind when one dies.

Every rank is a fresh `scripts/run.py` process (this pytest process already has 8 emulated
devices); the expected results are computed here, in this process.
"""

import dataclasses
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxpar import cli, inspect
from jaxpar import config as config_lib
from jaxpar.config import MeshConfig
from jaxpar.mesh import make_mesh
from jaxpar.runtime import generate, inference, vision
from tests.conftest import cli_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "scripts" / "launch_local.py"




def launch(processes: int, *run_args: str, timeout: float = 240) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(LAUNCH), "--processes", str(processes), "--",
                         *run_args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                        env=cli_env())


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(ROOT / "scripts" / "run.py"), *args],
                        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=cli_env())


def run_ranks(commands: list[list[str]], envs: list[dict],
              timeout: float = 120) -> list[tuple[int, str, str]]:
  """Runs one process per command (this Python, each with its env), all at once; their
  (status, stdout, stderr). Any still running at the end is killed."""
  ranks = [subprocess.Popen([sys.executable, *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                            start_new_session=True) for cmd, env in zip(commands, envs)]
  try:
    outputs = [rank.communicate(timeout=timeout) for rank in ranks]
  finally:
    for rank in ranks:
      if rank.poll() is None:
        os.killpg(rank.pid, signal.SIGKILL)
        rank.wait()
  return [(rank.returncode, out, err) for rank, (out, err) in zip(ranks, outputs)]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def result_of(proc: subprocess.CompletedProcess) -> dict:
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("processes,sets,crossing", [
    (2, ["mesh.model=4"], ["data"]),                               # 2x1x4: a replica a process
    (4, ["mesh.stage=2", "mesh.model=2"], ["data", "stage"]),      # 2x2x2: pipelined across
])
def test_forward_equals_one_process(tmp_path, tiny, devices, processes, sets, crossing):
  out = tmp_path / "logits.npy"
  overrides = [a for s in sets for a in ("--set", s)]
  proc = launch(processes, "forward", "--config", "configs/tiny.yaml", "--devices",
                str(8 // processes), *overrides, "--no-verify", "--save-logits", str(out),
                "--json")
  result = result_of(proc)
  assert result["processes"] == processes and result["process_devices"] == 8 // processes
  assert result["devices"] == 8 and result["cross_process_axes"] == crossing
  assert proc.stdout.count("mesh: ") == 1  # rank 0 prints; the others are quiet

  # The same config on this process's 8 devices: the same program, the same logits.
  config = config_lib.load(ROOT / "configs" / "tiny.yaml", sets)
  fwd = inference.build(config, make_mesh(config.mesh, devices=devices))
  tokens = fwd.tokens(inference.seeded_tokens(config))
  census = inspect.hlo_census(fwd.compile(tokens).as_text())
  assert result["collectives"] == census.counts()
  expected = inference.unpad(fwd(tokens), config.model.vocab_size)
  saved = np.load(out)
  assert saved.shape == (8, 16, 250) and saved.dtype == np.float32
  np.testing.assert_allclose(saved, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sets", [
    ["mesh.model=4"],                                   # data over the processes
    ["mesh.data=1", "mesh.stage=2", "mesh.model=4"],    # pipelined decoding, a stage a process
])
def test_generate_equals_one_process(tmp_path, hf_checkpoint, devices, sets):
  prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
  out = tmp_path / "tokens.npy"
  overrides = [a for s in [f"model.checkpoint={hf_checkpoint}", *sets] for a in ("--set", s)]
  result = result_of(launch(2, "generate", "--config", "configs/tiny.yaml", "--devices", "4",
                            *overrides, "--prompt-ids", "1,2,3;4,5;6,7,8,9,10",
                            "--max-new-tokens", "8", "--save-tokens", str(out), "--json"))
  assert result["processes"] == 2 and result["process_devices"] == 4

  config = config_lib.load(ROOT / "configs" / "tiny.yaml",
                           [f"model.checkpoint={hf_checkpoint}"])
  single = generate.build(config, make_mesh(MeshConfig(1, 1, 1), devices=devices[:1]))
  expected = single.generate(prompts, max_new_tokens=8).tokens
  np.testing.assert_array_equal(np.load(out), expected)
  assert result["new_tokens"] == expected.tolist()


# configs/cnn.yaml's mesh and rules (image strips over `stage`, filters over `model`) at
# cnn_tiny's size: 16x16 images, widths 8 and 16, one block per stage.
CNN_SMALL = ["cnn.image_size=16", "cnn.width=8", "cnn.stages=2", "cnn.blocks=1", "run.batch=8"]


def test_classify_equals_one_process(tmp_path, devices):
  out = tmp_path / "logits.npy"
  small = [a for s in CNN_SMALL for a in ("--set", s)]
  result = result_of(launch(2, "classify", "--config", "configs/cnn.yaml", "--devices", "4",
                            *small, "--set", "run.iters=1", "--set", "run.warmup=0",
                            "--no-verify", "--save-logits", str(out), "--json"))
  assert result["processes"] == 2 and result["mesh"] == {"data": 2, "stage": 2, "expert": 1, "model": 2}

  config = config_lib.load(ROOT / "configs" / "cnn.yaml", CNN_SMALL)
  one = dataclasses.replace(config, mesh=MeshConfig(1, 1, 1))
  single = vision.build(one, make_mesh(one.mesh, devices=devices[:1]))
  images = vision.seeded_images(config)
  expected = np.asarray(single(single.images(images)))
  np.testing.assert_allclose(np.load(out), expected, rtol=0, atol=1e-5)


def _alive(pid: int) -> bool:
  """Whether `pid` is still a process (a zombie counts as gone: it runs nothing)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def _wait_for(path: pathlib.Path, text: str, timeout: float) -> str:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    content = path.read_text() if path.exists() else ""
    if text in content:
      return content
    time.sleep(0.2)
  raise AssertionError(f"{text!r} not in {path} after {timeout} s:\n{content[-3000:]}")


def test_a_killed_rank_stops_every_rank(tmp_path):
  out, err = tmp_path / "out.txt", tmp_path / "err.txt"
  with open(out, "w") as stdout, open(err, "w") as stderr:
    launcher = subprocess.Popen(
        [sys.executable, str(LAUNCH), "--processes", "2", "--", "forward", "--config",
         "configs/tiny.yaml", "--devices", "4", "--set", "mesh.model=4", "--set",
         "run.iters=10000000", "--no-verify"], stdout=stdout, stderr=stderr, cwd=ROOT,
        env=cli_env())
  try:
    pids = [int(p) for p in _wait_for(err, "pids ", 60).split("pids ")[1].split(";")[0].split()]
    _wait_for(out, "compiled in", 180)  # both ranks are in the timed loop
    time.sleep(1)
    killed_at = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    code = launcher.wait(timeout=60)
    took = time.monotonic() - killed_at
  finally:
    if launcher.poll() is None:
      launcher.kill()
      launcher.wait()
  print(f"launcher exited {took:.1f} s after the kill")
  assert code != 0 and took < 60
  assert f"rank 1 (pid {pids[1]}) was killed by SIGKILL" in err.read_text()
  assert not [pid for pid in pids if _alive(pid)], "a rank outlived the launcher"


@pytest.mark.parametrize("args,message", [
    (["--process-id", "2", "--num-processes", "2", "--coordinator", "127.0.0.1:1234"],
     "--process-id 2 is outside 0..1 for --num-processes 2"),
    (["--process-id", "1"], "--process-id without --coordinator"),
    (["--coordinator", "127.0.0.1"], "--coordinator 127.0.0.1: expected HOST:PORT"),
    (["--coordinator", "127.0.0.1:1234", "--process-id", "0"],
     "needs --num-processes N too"),
    (["--num-processes", "0", "--process-id", "0", "--coordinator", "h:1"],
     "--num-processes 0: must be at least 1"),
    (["--join-timeout", "0"], "--join-timeout 0: must be a positive number"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "0"],
     "JAX has already started in this process"),
])
def test_bad_cluster_flags_are_one_line_errors(root, monkeypatch, capsys, args, message):
  monkeypatch.chdir(root)
  assert cli.main(["forward", "--config", "configs/tiny.yaml", *args]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_devices_that_do_not_split_over_the_processes():
  proc = run_script("forward", "--config", "configs/tiny.yaml", "--num-processes", "3",
                    "--process-id", "0", "--coordinator", "127.0.0.1:1")
  assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
      "error: mesh.cpu_devices=8 does not split evenly over 3 processes; pass --devices N "
      "(emulated CPU devices per process)"]


@pytest.mark.parametrize("process_id,message", [
    (1, "nothing answered there within 3 s (--join-timeout)"),
    (0, "not every process joined 127.0.0.1:"),
])
def test_a_cluster_that_never_forms_is_a_one_line_error(process_id, message):
  port = free_port()  # nobody listens there
  start = time.monotonic()
  proc = run_script("forward", "--config", "configs/tiny.yaml", "--coordinator",
                    f"127.0.0.1:{port}", "--num-processes", "2", "--process-id",
                    str(process_id), "--join-timeout", "3", timeout=60)
  took = time.monotonic() - start
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
  assert lines[0].startswith(f"error: process {process_id}: ")
  assert took < 3 + 30  # the stated timeout, plus starting Python


def test_a_coordinator_port_in_use_is_a_one_line_error():
  with socket.socket() as busy:  # JAX itself would crash (SIGSEGV) binding there
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    proc = run_script("forward", "--config", "configs/tiny.yaml", "--coordinator",
                      f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "0")
  assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
      f"error: --coordinator 127.0.0.1:{port}: process 0 cannot listen on port {port} "
      f"(Address already in use); choose a free port"]


def test_a_mesh_the_processes_do_not_fill_is_a_one_line_error():
  proc = launch(3, "forward", "--config", "configs/tiny.yaml", "--devices", "2",
                "--set", "mesh.model=4", timeout=120)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert errors == [
      "error: mesh.data=-1 cannot fill 6 devices: the other axes take 4, which does not divide "
      "6 (3 processes x 2 devices); run each of the 3 processes with --devices 4"]


# One rank reading a checkpoint onto a data=1 x stage=2 x model=4 mesh (a stage a process), and
# printing, as JSON, every rectangle of every safetensors tensor it read.
_READER = """
import json, sys
import jaxpar
jaxpar.emulate_cpu_devices(4)
from jaxpar import config as config_lib, distributed, hf_files
distributed.join(distributed.Cluster(sys.argv[1], 2, int(sys.argv[2])), timeout=60)
from jaxpar.mesh import make_mesh
from jaxpar.runtime import inference
reads, read = [], hf_files.SafeTensors.read
def spy(self, name, box):
  reads.append((name, [[b.start, b.stop] for b in box]))
  return read(self, name, box)
hf_files.SafeTensors.read = spy
config = config_lib.load("configs/tiny.yaml", ["model.checkpoint=" + sys.argv[3], "mesh.data=1",
                                               "mesh.stage=2", "mesh.model=4"])
inference.build(config, make_mesh(config.mesh))
print(json.dumps(reads))
"""


def test_each_process_reads_only_its_own_layers(hf_checkpoint):
  address = f"127.0.0.1:{free_port()}"
  ranks = run_ranks([["-c", _READER, address, str(i), str(hf_checkpoint)] for i in range(2)],
                    [cli_env()] * 2)
  layers = []
  for code, stdout, stderr in ranks:
    assert code == 0, stderr[-3000:]
    reads = json.loads(stdout.strip().splitlines()[-1])
    names = [name.removeprefix("transformer.") for name, _ in reads]
    layers.append({int(name.split(".")[1]) for name in names if name.startswith("h.")})
    # Each model shard of a [250 x 64] vocabulary read once, never the whole table at once.
    assert sorted(box[0] for (_, box), name in zip(reads, names) if name == "wte.weight") == [
        [0, 63], [63, 126], [126, 189], [189, 250]]
  assert layers == [{0, 1}, {2, 3}]  # stage 0's layers in process 0, stage 1's in process 1


def test_joins_the_cluster_slurm_describes():
  """No cluster flags: each process finds its place in SLURM's variables (as `srun` sets
  them), through JAX's own detection."""
  port = free_port()
  slurm = lambda i: {"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "localhost",
                     "SLURM_NTASKS": "2", "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i),
                     "JAX_COORDINATOR_PORT": str(port)}
  command = [str(ROOT / "scripts" / "run.py"), "forward", "--config", "configs/tiny.yaml",
             "--devices", "4", "--set", "mesh.model=4", "--verify", "--json"]
  ranks = run_ranks([command] * 2, [{**cli_env(), **slurm(i)} for i in range(2)])
  for code, _, stderr in ranks:
    assert code == 0, stderr[-3000:]
  result = json.loads(ranks[0][1].strip().splitlines()[-1])
  assert result["processes"] == 2 and result["cross_process_axes"] == ["data"]
  assert result["verify_max_abs_diff"] < 1e-5
  assert "mesh: " not in ranks[1][1]  # process 1 is silent
