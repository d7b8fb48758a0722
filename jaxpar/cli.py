"""The command line: `python scripts/run.py forward --config FILE [--set k=v ...]`.

The config is parsed and checked before JAX is imported, so `--devices` can still set the
number of emulated CPU devices and a bad value costs no start-up. User mistakes (`UserError`)
print one line on stderr and exit with status 2; there is no traceback for them.
"""

import argparse
import json
import os
import re
import sys
import time

from jaxpar import config as config_lib
from jaxpar.errors import UserError


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="scripts/run.py", description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  fwd = commands.add_parser("forward", help="sharded forward pass on a seeded batch")
  fwd.add_argument("--config", required=True, help="YAML config, e.g. configs/default.yaml")
  fwd.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set mesh.model=2")
  fwd.add_argument("--devices", type=int, default=None, metavar="N",
                   help="emulated CPU devices when no accelerator is present "
                        "(default: mesh.cpu_devices of the config)")
  fwd.add_argument("--platform", choices=("auto", "cpu"), default="auto",
                   help="auto: the accelerator if its devices fit the mesh, else emulated CPU")
  fwd.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute on one device and print the max difference "
                        "(default: run.verify of the config)")
  fwd.add_argument("--save-logits", metavar="OUT.npy",
                   help="write float32 logits [B, T, V] (vocab padding removed)")
  fwd.add_argument("--schedule-png", metavar="OUT.png",
                   help="with mesh.stage > 1: save the pipeline schedule (stage x tick) as PNG")
  fwd.add_argument("--json", action="store_true",
                   help="print one JSON object with the results as the last stdout line")
  return parser


def set_cpu_devices(n: int) -> None:
  """Asks XLA for `n` host devices; must run before JAX initialises its backends."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def pick_devices(mesh_config: config_lib.MeshConfig, platform: str) -> tuple[list, str]:
  """The devices to build the mesh on, and a note when it fell back to emulated CPUs."""
  import jax
  devices = jax.devices()
  if platform == "cpu" or devices[0].platform == "cpu":
    cpu = jax.devices("cpu")
    mesh_config.shape(len(cpu))
    return cpu, ""
  try:
    mesh_config.shape(len(devices))
    return devices, ""
  except UserError as e:
    cpu = jax.devices("cpu")
    mesh_config.shape(len(cpu))
    return cpu, (f"note: {e.args[0].split(';')[0]} on {devices[0].platform}; running on "
                 f"{len(cpu)} emulated CPU devices instead (set the mesh to fit "
                 f"{len(devices)} {devices[0].platform} devices to use them)")


def _say(text: str) -> None:
  print(text, flush=True)


def forward(args, config: config_lib.Config) -> dict:
  import jax
  import numpy as np

  from jaxpar import inspect
  from jaxpar.mesh import describe, make_mesh
  from jaxpar.runtime import inference, state

  devices, note = pick_devices(config.mesh, args.platform)
  if note:
    _say(note)
  mesh = make_mesh(config.mesh, devices=devices)
  _say(f"mesh: {describe(mesh)}")
  m = config.model
  _say(f"model: GPT d_model={m.d_model} n_heads={m.n_heads} n_layers={m.n_layers} "
       f"d_ff={m.d_ff} vocab={m.vocab_size}; batch {config.run.batch} x "
             f"{config.run.seq_len} tokens")

  start = time.perf_counter()
  fwd = inference.build(config, mesh)
  jax.block_until_ready(fwd.params)
  _say(f"parameters initialised sharded in {time.perf_counter() - start:.2f} s")
  rows = inspect.param_table(fwd.params, fwd.names, fwd.rules, mesh)
  _say(inspect.format_params(rows))
  if fwd.schedule is not None:
    sched = fwd.schedule
    _say(f"pipeline: {sched.stages} stages, {sched.microbatches} microbatches, "
         f"{sched.repeats} repeat(s): {sched.ticks} ticks, bubble {sched.bubble:.1%} "
         f"(cells: the microbatch each stage runs per tick)")
    _say(inspect.format_schedule(sched.grid(), microbatches=sched.microbatches))
    if args.schedule_png:
      inspect.save_schedule_png(sched.grid(), args.schedule_png,
                                microbatches=sched.microbatches)
      _say(f"saved the schedule picture to {args.schedule_png}")

  tokens_host = inference.seeded_tokens(config)
  tokens = fwd.tokens(tokens_host)
  _say("compiling...")
  start = time.perf_counter()
  compiled = fwd.compile(tokens)
  compile_s = time.perf_counter() - start
  census = inspect.hlo_census(compiled.as_text())
  mem = inspect.memory(compiled)
  _say(f"compiled in {compile_s:.2f} s; collectives in the compiled program:")
  _say(inspect.format_census(census))
  param_bytes = state.param_bytes_per_device(fwd.params)
  total_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(fwd.params))
  _say(f"per device: parameters {inspect.human(param_bytes)} (of "
             f"{inspect.human(total_bytes)} in all), arguments {inspect.human(mem['argument'])}, "
             f"temporaries {inspect.human(mem['temp'])}, peak {inspect.human(mem['peak'])}")

  seconds = inference.time_steady(fwd, tokens, warmup=config.run.warmup, iters=config.run.iters)
  tokens_per_s = config.run.batch * config.run.seq_len / seconds
  _say(f"forward: {seconds * 1e3:.2f} ms per batch, {tokens_per_s:,.0f} tokens/s "
             f"(mean of {config.run.iters} after {config.run.warmup} warm-up)")
  logits = inference.unpad(fwd(tokens), m.vocab_size)
  result = {
      "command": "forward",
      "mesh": dict(mesh.shape),
      "devices": mesh.devices.size,
      "platform": mesh.devices.flat[0].platform,
      "param_bytes_per_device": param_bytes,
      "param_bytes_total": total_bytes,
      "collectives": census.counts(),
      "memory_per_device": mem,
      "compile_s": compile_s,
      "step_s": seconds,
      "tokens_per_s": tokens_per_s,
  }
  if fwd.schedule is not None:
    result["pipeline"] = fwd.schedule.as_dict()
  verify = config.run.verify if args.verify is None else args.verify
  if verify:
    reference = inference.reference_logits(fwd, tokens_host)
    diff = float(np.max(np.abs(logits - reference)))
    _say(f"verify: max |sharded - single-device| = {diff:.3e} over logits "
               f"{list(logits.shape)}")
    result["verify_max_abs_diff"] = diff
  if args.save_logits:
    np.save(args.save_logits, logits)
    _say(f"saved logits {list(logits.shape)} float32 to {args.save_logits}")
  return result


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    config = config_lib.load(args.config, args.set)
    if args.devices is not None and args.devices < 1:
      raise UserError(f"--devices {args.devices}: must be at least 1")
    for flag in ("save_logits", "schedule_png"):
      path = getattr(args, flag, None)
      folder = os.path.dirname(os.path.abspath(path)) if path else None
      if folder and not os.path.isdir(folder):
        option = "--" + flag.replace("_", "-")
        raise UserError(f"{option} {path}: folder {folder} does not exist; create it or "
                        f"choose another path")
    if "jax" not in sys.modules:
      set_cpu_devices(args.devices or config.mesh.cpu_devices)
    result = forward(args, config)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(result))
  return 0
