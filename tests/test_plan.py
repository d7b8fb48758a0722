"""The planner (`jaxpar.plan`): its predictions against what XLA compiles, and its choices.

Predicted per-device parameter bytes must equal the compiled program's exactly (XLA's
argument bytes less the tokens'), arguments and outputs within 10% of `memory_analysis()`,
temporaries within 25% of its `temp` (a model of XLA's buffers, fitted), and the predicted
collective instructions must equal the HLO census, on every mesh of 8 devices. The choices: data parallel for a narrow model on a big batch, a split model when one
device cannot hold the weights, and a one-line error saying by how much when nothing fits.
"""

import json

import numpy as np
import pytest
import yaml

from jaxpar import cli, plan, plan_report
from jaxpar import config as config_lib
from jaxpar.errors import UserError

LLAMA = ["model.family=llama", "model.n_kv_heads=2", "model.tie_embeddings=false"]


def plan_config(root, family: str):
  """The test configs: tiny GPT-2 (vocabulary padded), and a Llama with 2 key/value heads
  (copied when model > 2) and an untied head; 8 layers so every stage count divides."""
  overrides = ["model.n_layers=8"] + (LLAMA if family == "llama" else [])
  return config_lib.load(root / "configs" / "tiny.yaml", overrides)


def one_plan_per_mesh(plans):
  """The best plan of every mesh, and every FSDP plan."""
  seen = {}
  for p in plans:
    seen.setdefault((*p.candidate.mesh.values(), p.candidate.fsdp), p)
  return list(seen.values())


def test_factorisations_of_8():
  meshes = plan.factorisations(8)
  assert len(meshes) == len(set(meshes)) == 10
  assert all(d * s * m == 8 for d, s, m in meshes)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_predicted_equals_compiled_on_every_mesh_of_8(root, devices, family):
  config = plan_config(root, family)
  plans, rejected = plan.rank(config, 8, plan.hardware("cpu"))
  assert rejected == {}
  checked = one_plan_per_mesh(plans)
  assert len({tuple(p.candidate.mesh.values()) for p in checked}) == 10  # every mesh of 8
  assert sum(p.candidate.fsdp for p in checked) == 3  # data = 8, 4, 2 without a pipeline
  for p in checked:
    compiled = plan_report.compile_plan(config, p, devices)
    predicted, mem = p.predicted, compiled["memory_per_device"]
    label = p.candidate.label()
    assert predicted["param_bytes_per_device"] == compiled["param_bytes_per_device"], label
    argument = predicted["param_bytes_per_device"] + predicted["input_bytes_per_device"]
    assert abs(argument - mem["argument"]) <= 0.1 * mem["argument"], label
    assert abs(predicted["output_bytes_per_device"] - mem["output"]) <= 0.1 * mem["output"]
    temp = predicted["temp_bytes_per_device"]
    assert abs(temp - mem["temp"]) <= 0.25 * mem["temp"], (label, temp, mem["temp"])
    assert predicted["collectives_in_loop"] == compiled["collectives_in_loop"], label
    if not p.candidate.fsdp:  # FSDP: how XLA gathers the embedding tables is its choice
      assert predicted["collectives"] == compiled["collectives"], label


def test_fsdp_gathers_every_layer_and_equals_one_device(tiny, devices):
  """rules.embed=data: parameters split over `data` while the batch is too (no conflict now
  that activations say act_embed); one all-gather per block weight with an `embed` dim in
  the layer loop, as predicted; logits equal one device."""
  from jaxpar import inspect
  from jaxpar.mesh import make_mesh
  from jaxpar.runtime import inference
  c = plan.Candidate(2, 1, 4, fsdp=True)
  config = c.config(tiny)
  assert dict(config.rules)["embed"] == "data"
  fwd = inference.build(config, make_mesh(config.mesh, devices=devices))
  tokens = inference.seeded_tokens(config)
  census = inspect.hlo_census(fwd.compile(fwd.tokens(tokens)).as_text())
  gathers = census.counts(in_loop=True)["all-gather"]
  assert gathers["count"] == 12  # ln_1 (2), q, k, v, o, b_o, ln_2 (2), up, down, b_down
  assert census.counts(in_loop=True) == plan.hlo_collectives(tiny, c, in_loop=True)
  got = inference.unpad(fwd(fwd.tokens(tokens)), config.model.vocab_size)
  assert np.max(np.abs(got - inference.reference_logits(fwd, tokens))) < 1e-5
  whole = plan.param_bytes(tiny, plan.Candidate(2, 1, 4))["total"]
  assert plan.param_bytes(tiny, c)["total"] < whole


def test_collectives_by_hand(tiny):
  """data=2 x stage=2 x model=2, 4 microbatches: rows of one device 4, of a microbatch 1."""
  row = tiny.run.seq_len * tiny.model.d_model * 4  # one row's activations, float32
  c = plan.Candidate(2, 2, 2, microbatches=4, repeats=1)
  assert plan.hlo_collectives(tiny, c) == {
      "all-reduce": {"count": 3, "bytes": 2 * row + 4 * row},  # 2 per block, 1 embedding
      "collective-permute": {"count": 2, "bytes": row + 2 * row}}  # a tick's; the hand-out
  steps = plan.predict(tiny, c, plan.hardware("cpu"))["step_collectives"]["prefill"]
  ticks = 4 + 2 - 1
  layers = tiny.model.n_layers // 2
  assert steps["all-reduce"]["model"] == {"count": 2 * ticks * layers + 1,
                                          "bytes": 2 * ticks * layers * row + 4 * row}
  assert steps["collective-permute"]["stage"] == {"count": ticks + 1,
                                                  "bytes": ticks * row + 2 * row}


def narrow_big_batch(root):
  return config_lib.load(root / "configs" / "tiny.yaml",
                         ["run.batch=512", "run.seq_len=32", "model.n_layers=4"])


@pytest.mark.parametrize("preset", ["cpu", "h100", "tpu-v5e"])
def test_narrow_model_big_batch_plans_data_parallel(root, preset):
  plans, _ = plan.rank(narrow_big_batch(root), 8, plan.hardware(preset))
  assert plans[0].candidate.mesh == {"data": 8, "stage": 1, "expert": 1, "model": 1}
  best = plans[0].predicted
  assert best["collectives"] == {}
  tensor = next(p for p in plans if p.candidate.mesh == {"data": 1, "stage": 1, "expert": 1, "model": 8})
  assert tensor.predicted["prefill"]["collective_s"] > best["prefill"]["step_s"]


def gpt2_small(root):
  return config_lib.load(root / "configs" / "gpt2.yaml")


def test_weights_beyond_one_device_plan_split(root, capsys):
  config = gpt2_small(root)
  plans, _ = plan.rank(config, 8, plan.hardware("cpu"))
  whole = next(p for p in plans if p.candidate.mesh == {"data": 8, "stage": 1, "expert": 1, "model": 1})
  weights = whole.predicted["param_bytes_per_device"]  # all of GPT-2 124M, float32
  assert 480e6 < weights < 520e6
  memory_gib = 0.9 * weights / plan.GIB  # less than the weights
  code = cli.main(["plan", "--config", "configs/gpt2.yaml", "--device-memory",
                   f"{memory_gib:.4f}", "--compile", "0", "--json"])
  assert code == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  best = result["plans"][0]
  assert best["mesh"]["model"] > 1 or best["mesh"]["stage"] > 1 or best["fsdp"]
  assert best["predicted"]["fits"]
  assert best["predicted"]["bytes_per_device"] <= memory_gib * plan.GIB
  replicas = [p for p in result["plans"]
              if p["mesh"]["model"] == p["mesh"]["stage"] == 1 and not p["fsdp"]]
  assert replicas and not any(p["predicted"]["fits"] for p in replicas)


def test_nothing_fits_says_by_how_much(root, capsys):
  code = cli.main(["plan", "--config", "configs/gpt2.yaml", "--device-memory", "0.01",
                   "--compile", "0"])
  assert code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: no layout fits 0.01 GiB per device: the smallest, ")
  assert "GiB too many" in err and len(err.splitlines()) == 1
  config = gpt2_small(root)
  plans, _ = plan.rank(config, 8, plan.hardware("cpu", memory_gib=0.01))
  smallest = min(p.predicted["bytes_per_device"] for p in plans)
  assert f"{(smallest - 0.01 * plan.GIB) / plan.GIB:.2f} GiB too many" in err


def test_plan_json_matches_forward_json(root, capsys, tmp_path):
  """`plan --json`'s compiled figures for its best plan are what `forward --json` reports
  when run with that plan's mesh."""
  chart = tmp_path / "plan.png"
  assert cli.main(["plan", "--config", "configs/tiny.yaml", "--compile", "1", "--json",
                   "--chart", str(chart)]) == 0
  out = capsys.readouterr().out
  result = json.loads(out.strip().splitlines()[-1])
  assert "predicted against compiled" in out
  plans = result["plans"]
  assert [p["predicted"]["fits"] for p in plans] == sorted(
      (p["predicted"]["fits"] for p in plans), reverse=True)
  steps = [p["predicted"]["prefill"]["step_s"] for p in plans if p["predicted"]["fits"]]
  assert steps == sorted(steps)
  best = plans[0]
  assert set(best) == {"mesh", "pipeline", "fsdp", "predicted", "compiled"}
  assert all("compiled" not in p for p in plans[1:])
  mesh = best["mesh"]
  assert cli.main(["forward", "--config", "configs/tiny.yaml", "--json",
                   *[f"--set=mesh.{k}={v}" for k, v in mesh.items()],
                   f"--set=pipeline.microbatches={best['pipeline']['microbatches']}",
                   f"--set=pipeline.repeats={best['pipeline']['repeats']}"]) == 0
  forward = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert forward["collectives"] == best["compiled"]["collectives"]
  assert forward["param_bytes_per_device"] == best["compiled"]["param_bytes_per_device"]
  assert forward["collectives"] == best["predicted"]["collectives"]
  assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_plan_options_are_one_line_errors(capsys):
  for args, message in ((["--device-memory", "0"], "--device-memory 0: must be positive"),
                        (["--compile", "-1"], "--compile -1: must be 0 or more")):
    assert cli.main(["plan", "--config", "configs/tiny.yaml", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_bad_hardware_figures_are_user_errors():
  with pytest.raises(UserError, match="--hardware tpu-v9"):
    plan.hardware("tpu-v9")
  with pytest.raises(UserError, match="--link-gbps 0: must be positive"):
    plan.hardware("cpu", link_gbps=0)
  with pytest.raises(UserError, match="--device-memory -1: must be positive"):
    plan.hardware("cpu", memory_gib=-1)


def test_presets_by_device_kind():
  assert plan.hardware_for("NVIDIA H200", "gpu") == "h200"
  assert plan.hardware_for("NVIDIA H100 80GB HBM3", "gpu") == "h100"
  assert plan.hardware_for("TPU v5 lite", "tpu") == "tpu-v5e"
  assert plan.hardware_for("cpu", "cpu") == "cpu"


def test_mesh_auto_in_yaml_and_override(root, tmp_path):
  raw = yaml.safe_load((root / "configs" / "tiny.yaml").read_text())
  raw["mesh"] = "auto"
  path = tmp_path / "auto.yaml"
  path.write_text(yaml.safe_dump(raw))
  assert config_lib.load(path).mesh.auto
  assert config_lib.load(root / "configs" / "tiny.yaml", ["mesh=auto"]).mesh.auto
  # A size given over a file's `auto` turns it off: the sizes are what the user asked for.
  assert not config_lib.load(path, ["mesh.model=2"]).mesh.auto
  # Both as overrides, in either order: refused (one of them would be dropped).
  tiny = root / "configs" / "tiny.yaml"
  for sets in (["mesh.model=2", "mesh=auto"], ["mesh=auto", "mesh.model=2"]):
    with pytest.raises(UserError, match=r"--set mesh=auto with --set mesh.model: auto picks "
                                        r"every mesh size; drop one of them"):
      config_lib.load(tiny, sets)
  with pytest.raises(UserError, match=r"'mesh=automatic': the whole mesh takes only 'auto'"):
    config_lib.load(tiny, ["mesh=automatic"])
  with pytest.raises(UserError, match="mesh: auto is chosen by the planner"):
    config_lib.load(path).mesh.shape(8)


def test_emulated_devices_share_the_host_memory(root, capsys):
  """On CPU each emulated device plans with its share of the host's available memory (the
  preset's 64 GiB per device was 8 x 64 GiB on a 24 GiB machine); --device-memory still
  overrides it."""
  with open("/proc/meminfo") as f:
    available = next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
  hw = plan.for_devices("cpu", 8)
  assert abs(hw.memory_gib - available / 8 / plan.GIB) < 0.05 * hw.memory_gib
  assert plan.for_devices("cpu", 8, memory_gib=3.0).memory_gib == 3.0
  assert plan.for_devices("h100", 8).memory_gib == 80.0  # an accelerator's own memory
  args = ["plan", "--config", "configs/tiny.yaml", "--compile", "0", "--json"]
  assert cli.main(args) == 0
  planned = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["hardware"]
  assert abs(planned["memory_gib"] - hw.memory_gib) < 0.1 * hw.memory_gib


def test_mesh_auto_runs_the_best_plan_and_says_why(root, capsys):
  args = ["--config", "configs/tiny.yaml", "--set", "mesh=auto", "--set", "run.batch=64",
          "--set", "run.seq_len=32"]
  assert cli.main(["plan", *args, "--compile", "0", "--json"]) == 0
  best = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["plans"][0]
  assert cli.main(["forward", *args, "--verify", "--json"]) == 0
  out = capsys.readouterr().out
  result = json.loads(out.strip().splitlines()[-1])
  assert result["mesh"] == best["mesh"] == {"data": 8, "stage": 1, "expert": 1, "model": 1}
  assert "mesh: auto chose data=8 stage=1 model=1: predicted prefill" in out
  assert "next best" in out
  assert result["collectives"] == best["predicted"]["collectives"] == {}
  assert result["verify_max_abs_diff"] < 1e-5


def test_mesh_auto_for_classify_is_a_user_error(capsys):
  assert cli.main(["classify", "--config", "configs/cnn_tiny.yaml", "--set", "mesh=auto"]) == 2
  assert "mesh: auto plans decoder models" in capsys.readouterr().err
