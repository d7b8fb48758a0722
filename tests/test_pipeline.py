"""The stage pipeline equals the sequential model on values and gradients, runs exactly the
schedule's ticks, moves activations only by collective-permutes over `stage`, and keeps each
stage's blocks on its own devices."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpar import config as config_lib
from jaxpar import inspect
from jaxpar.config import MeshConfig
from jaxpar.errors import UserError
from jaxpar.mesh import make_mesh
from jaxpar.parallel import pipeline
from jaxpar.runtime import inference, state

D, L = 16, 8


def toy_layer(x, p):
  return jnp.tanh(x @ p["w"] + p["b"]), None


def toy_stage(layers, first, x, *, chunk):
  """The `chunk` toy layers from `first` of a stage's flattened [R*Lc, ...] layers, each
  picked inside the loop."""
  layer = lambda x, j: toy_layer(x, jax.tree.map(lambda a: a[first + j], layers))
  return jax.lax.scan(layer, x, jnp.arange(chunk))[0]


@pytest.fixture(scope="module")
def toy():
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(L, D, D)).astype(np.float32) / 4,
            "b": rng.normal(size=(L, D)).astype(np.float32)}
  x = rng.normal(size=(16, D)).astype(np.float32)
  return params, x


def sequential(params, x):
  return jax.lax.scan(toy_layer, x, params)[0]


# (data, stage, microbatches, repeats) on 8 devices (the toy has no model axis).
TOY = [(4, 2, 2, 1), (2, 4, 4, 1), (1, 8, 8, 1), (4, 2, 4, 2), (2, 4, 4, 2), (2, 2, 8, 2)]


@pytest.mark.parametrize("data,stages,microbatches,repeats", TOY)
def test_toy_pipeline_values_and_gradients(toy, devices, data, stages, microbatches, repeats):
  params, x = toy
  mesh = make_mesh(MeshConfig(data=data, stage=stages, model=8 // (data * stages)),
                   devices=devices)
  schedule = pipeline.Schedule(stages, microbatches, repeats)
  staged = jax.device_put(pipeline.to_stages(params, stages=stages, repeats=repeats),
                          NamedSharding(mesh, P("stage")))
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))

  def piped(p, x, fill=0.0):
    stage = functools.partial(toy_stage, chunk=L // (stages * repeats))
    return pipeline.run(stage, p, x, mesh=mesh, schedule=schedule, batch_axes=("data",),
                        bubble_fill=fill)

  with jax.set_mesh(mesh):
    # Bubbles compute on NaN: any leak into the result would show.
    y = jax.jit(lambda p, x: piped(p, x, float("nan")))(staged, xs)
    loss = lambda p, x: jnp.sum(jnp.sin(piped(p, x)))
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(staged, xs)
  np.testing.assert_allclose(np.asarray(y), np.asarray(sequential(params, x)), rtol=0, atol=1e-5)
  ref_p, ref_x = jax.grad(lambda p, x: jnp.sum(jnp.sin(sequential(p, x))), argnums=(0, 1))(
      params, x)
  got_p = pipeline.from_stages(jax.device_get(grads[0]))
  for k in params:
    np.testing.assert_allclose(got_p[k], np.asarray(ref_p[k]), rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(grads[1]), np.asarray(ref_x), rtol=0, atol=1e-5)


def test_stage_regrouping_round_trips_and_places_chunks():
  x = np.arange(8)[:, None] * np.ones((8, 3))
  staged = pipeline.to_stages(x, stages=2, repeats=2)  # chunks of 2 layers
  assert staged.shape == (2, 2, 2, 3)
  assert staged[0, 0, :, 0].tolist() == [0, 1] and staged[1, 0, :, 0].tolist() == [2, 3]
  assert staged[0, 1, :, 0].tolist() == [4, 5] and staged[1, 1, :, 0].tolist() == [6, 7]
  np.testing.assert_array_equal(pipeline.from_stages(staged), x)


def test_schedule_counts():
  s = pipeline.Schedule(stages=4, microbatches=8, repeats=2)
  assert s.ticks == 2 * 8 + 4 - 1 and s.bubble == pytest.approx(3 / 19)
  grid = s.grid()
  assert grid.shape == (4, 19)
  for stage in range(4):  # every stage runs every (repeat, microbatch) exactly once, in order
    assert grid[stage][grid[stage] >= 0].tolist() == list(range(16))
  assert (grid >= 0).sum() / grid.size == pytest.approx(1 - s.bubble)


# (data, stage, model, microbatches, repeats, layers) for the GPT through the runtime.
GPT = [(2, 2, 2, 2, 1, 2), (1, 4, 2, 4, 1, 4), (2, 4, 1, 4, 2, 8), (1, 8, 1, 8, 1, 8),
       (1, 2, 4, 4, 2, 4), (1, 4, 2, 4, 2, 8)]
# Gradients too on those that add what the toy's gradients (TOY: the same schedules, no
# model axis) do not check: the model axis (2 and 4), with data 1 and 2, repeats 1 and 2.
GPT_GRADS = {(2, 2, 2, 2, 1, 2), (1, 2, 4, 4, 2, 4), (1, 4, 2, 4, 2, 8)}


def build(tiny, devices, d, s, m, microbatches, repeats, layers):
  config = dataclasses.replace(
      tiny, mesh=MeshConfig(data=d, stage=s, model=m),
      model=dataclasses.replace(tiny.model, n_layers=layers),
      pipeline=config_lib.PipelineConfig(microbatches=microbatches, repeats=repeats))
  return config, inference.build(config, make_mesh(config.mesh, devices=devices))


def grad_of_logits(fwd, tokens, vocab):
  """Gradients of the mean next-token cross-entropy (the training loss) on `tokens`."""
  def loss(p):
    logits = fwd.fn(p, tokens)[:, :-1, :vocab]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
  with jax.set_mesh(fwd.mesh):
    return jax.jit(jax.grad(loss))(fwd.params)


@pytest.mark.parametrize("d,s,m,microbatches,repeats,layers", GPT)
def test_gpt_pipeline_equals_sequential(tiny, devices, d, s, m, microbatches, repeats, layers):
  config, fwd = build(tiny, devices, d, s, m, microbatches, repeats, layers)
  assert fwd.schedule == pipeline.Schedule(s, microbatches, repeats)
  tokens_host = inference.seeded_tokens(config)
  tokens = fwd.tokens(tokens_host)
  compiled = fwd.compile(tokens)
  logits = inference.unpad(fwd(tokens), tiny.model.vocab_size)
  # The sequential reference: the same parameters, unpipelined, on one device.
  one = make_mesh(MeshConfig(1, 1, 1), devices=devices[:1])
  host = fwd.natural_params()
  seq = inference.build(dataclasses.replace(config, mesh=MeshConfig(1, 1, 1)), one,
                        params=host, layout=fwd.layout)
  expected = inference.unpad(seq(seq.tokens(tokens_host)), tiny.model.vocab_size)
  np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)

  if (d, s, m, microbatches, repeats, layers) in GPT_GRADS:
    # Gradients with respect to every parameter, back in the model's own layout.
    got = grad_of_logits(fwd, tokens, tiny.model.vocab_size)
    got = {**jax.device_get(got), "blocks": pipeline.from_stages(jax.device_get(got["blocks"]))}
    want = jax.device_get(grad_of_logits(seq, seq.tokens(tokens_host), tiny.model.vocab_size))
    for (path, g), w in zip(jax.tree.leaves_with_path(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=0, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    assert np.abs(want["blocks"]["mlp"]["w_up"]).max() > 1e-2  # not near-zeros compared

  # The compiled program: the tick loop runs R*M + S - 1 times; each stage runs L/(R*S)
  # layers per tick (an inner loop, or unrolled when it is one layer).
  census = inspect.hlo_census(compiled.as_text())
  per_chunk = layers // (repeats * s)
  assert sorted(census.loops.values()) == sorted(
      [repeats * microbatches + s - 1] + ([per_chunk] if per_chunk > 1 else []))
  kinds = set(census.counts())
  assert kinds <= {"collective-permute", "all-reduce"}
  assert ("all-reduce" in kinds) == (m > 1)  # only tensor parallelism reduces
  # One permute per tick in the loop, S - 1 after it to spread the finished microbatches.
  assert census.count("collective-permute", in_loop=True) == 1
  assert census.count("collective-permute", in_loop=False) == s - 1
  for pairs in permute_pairs(compiled.as_text()):
    for src, dst in pairs:  # every permute moves along `stage` only
      a, b = (np.unravel_index(i, fwd.mesh.devices.shape) for i in (src, dst))
      assert a[0] == b[0] and a[2] == b[2] and a[1] != b[1]

  # Each device holds only its own stage's blocks: exactly total / (stage x model).
  blocks = fwd.params["blocks"]
  block_total = sum(leaf.nbytes for leaf in jax.tree.leaves(blocks))
  rows = inspect.param_table(blocks, fwd.names["blocks"], fwd.rules, fwd.mesh)
  sharded = [r for r in rows if "model" in str(r.spec)]
  replicated = [r for r in rows if "model" not in str(r.spec)]
  expected_bytes = (sum(4 * np.prod(r.shape) for r in sharded) // (s * m)
                    + sum(4 * np.prod(r.shape) for r in replicated) // s)
  assert state.param_bytes_per_device(blocks) == expected_bytes
  assert expected_bytes <= block_total // s


def permute_pairs(hlo: str) -> list[list[tuple[int, int]]]:
  out = []
  for line in hlo.splitlines():
    if "collective-permute" in line and "source_target_pairs=" in line and " = " in line:
      text = line.split("source_target_pairs=")[1]
      out.append([(int(a), int(b)) for a, b in re.findall(r"\{(\d+),(\d+)\}", text)])
  assert out, "no collective-permute found"
  return out


@pytest.mark.parametrize("overrides,message", [
    ({"n_layers": 3, "repeats": 2},
     "model.n_layers=3 is fewer than mesh.stage=2 x pipeline.repeats=2 chunks of layers"),
    ({"microbatches": 3}, "run.batch=8 is not divisible by pipeline.microbatches=3"),
    ({"microbatches": 8, "data": 2}, "does not split over mesh.data=2"),
    ({"microbatches": 6, "stage": 4, "n_layers": 8, "batch": 12},
     "pipeline.microbatches=6 is not a multiple of mesh.stage=4"),
])
def test_bad_pipeline_layouts(tiny, devices, overrides, message):
  stage = overrides.get("stage", 2)
  data = overrides.get("data", 1)
  config = dataclasses.replace(
      tiny, mesh=MeshConfig(data=data, stage=stage, model=8 // (data * stage)),
      model=dataclasses.replace(tiny.model, n_layers=overrides.get("n_layers", 2)),
      pipeline=config_lib.PipelineConfig(overrides.get("microbatches", 4),
                                         overrides.get("repeats", 1)),
      run=dataclasses.replace(tiny.run, batch=overrides.get("batch", 8)))
  with pytest.raises(UserError, match=message):
    inference.build(config, make_mesh(config.mesh, devices=devices))


@pytest.mark.parametrize("repeats", [1, 2])
def test_fewer_microbatches_than_stages_is_refused(repeats):
  with pytest.raises(UserError, match="pipeline.microbatches=2 < mesh.stage=4: the schedule "
                                      "needs at least as many microbatches as stages"):
    pipeline.check(pipeline.Schedule(4, 2, repeats), n_layers=8, batch=8)


def test_cli_reports_the_schedule(root, tmp_path, monkeypatch, capsys):
  from jaxpar import cli
  monkeypatch.chdir(root)
  png = tmp_path / "schedule.png"
  code = cli.main(["forward", "--config", "configs/pipeline.yaml", "--set", "model.d_model=64",
                   "--set", "model.vocab_size=250", "--set", "model.d_ff=128", "--set",
                   "model.n_layers=4", "--verify", "--schedule-png", str(png), "--json"])
  out = capsys.readouterr().out
  assert code == 0
  result = __import__("json").loads(out.strip().splitlines()[-1])
  assert result["mesh"] == {"data": 2, "stage": 2, "expert": 1, "model": 2}
  assert result["pipeline"] == {"stages": 2, "microbatches": 4, "repeats": 2, "ticks": 9,
                                "bubble": 1 / 9}
  assert result["collectives"]["collective-permute"]["count"] == 2
  assert result["verify_max_abs_diff"] < 1e-5
  assert "stage 1   . a0 a1 a2 a3 b0 b1 b2 b3" in out
  from PIL import Image
  with Image.open(png) as picture:  # the labelled picture of 2 stages x 9 ticks
    assert picture.format == "PNG" and picture.size[0] > 9 * inspect.PNG_CELL


@pytest.mark.parametrize("repeats", [2, 4])
def test_circular_schedule_needs_no_more_temporaries_than_one_repeat(root, devices, repeats):
  """A circular schedule picks each layer of the tick's chunk inside the layer loop, so its
  compiled temporaries stay within 10% of one repeat's (slicing the chunk out first copied
  its layers' weights every tick: 75 and 135 MiB against 26 MiB on mistral.yaml 2x2x2)."""
  from jaxpar import plan, plan_report
  config = config_lib.load(root / "configs" / "tiny.yaml", [
      "model.d_model=256", "model.d_ff=1024", "model.n_layers=8"])

  def temporaries(R: int) -> int:
    candidate = plan.Candidate(2, 2, 2, microbatches=4, repeats=R)
    compiled = plan_report.compile_plan(config, plan.Plan(candidate, {}), devices)
    return compiled["memory_per_device"]["temp"]
  assert temporaries(repeats) <= 1.1 * temporaries(1)
