"""The command line: `python scripts/run.py forward --config FILE [--set k=v ...]`.

The config is parsed and checked before JAX is imported, so `--devices` can still set the
number of emulated CPU devices and a bad value costs no start-up. User mistakes (`UserError`)
print one line on stderr and exit with status 2; there is no traceback for them.

Each command is a module with `add_parser(commands)`, `run(args, config) -> dict` (the JSON
result) and, when it has any, checks that run before JAX starts: `overrides(args)` (config
overrides its flags imply) and `check(args, config)` (once the config is loaded).
"""

import argparse
import json
import os
import sys

import jaxpar
from jaxpar import config as config_lib
from jaxpar import distributed
from jaxpar.cli import classify, convert, forward, generate, plan, prologue, serve
from jaxpar.errors import UserError

# In the order `--help` lists them.
COMMANDS = {"forward": forward, "classify": classify, "generate": generate, "serve": serve,
            "convert": convert, "plan": plan}

# Options that name a file to write, whose folder must exist.
_OUTPUTS = ("save_logits", "schedule_png", "save_tokens", "chart")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="scripts/run.py", description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  for command in COMMANDS.values():
    command.add_parser(commands)
  return parser


def _joined_values(argv: list[str]) -> list[str]:
  """`--prompt-ids -1,2` as `--prompt-ids=-1,2`: argparse would read a value that starts
  with '-' as an option (and say "expected one argument")."""
  out, args = [], list(argv)
  for i, arg in enumerate(args):
    if i > 0 and args[i - 1] == "--prompt-ids" and arg.startswith("-"):
      out[-1] = f"--prompt-ids={arg}"
    else:
      out.append(arg)
  return out


def _load_config(args, command) -> config_lib.Config:
  """The config with --set and the command's own overrides, checked before JAX starts."""
  overrides = list(args.set)
  if hasattr(command, "overrides"):
    overrides += command.overrides(args)
  config = config_lib.load(args.config, overrides)
  if hasattr(command, "check"):
    command.check(args, config)
  if args.devices is not None and args.devices < 1:
    raise UserError(f"--devices {args.devices}: must be at least 1")
  for flag in _OUTPUTS:
    path = getattr(args, flag, None)
    folder = os.path.dirname(os.path.abspath(path)) if path else None
    if folder and not os.path.isdir(folder):
      option = "--" + flag.replace("_", "-")
      raise UserError(f"{option} {path}: folder {folder} does not exist; create it or "
                      f"choose another path")
  return config


def _jax_started() -> bool:
  if "jax" not in sys.modules:
    return False
  from jax._src import xla_bridge
  return xla_bridge.backends_are_initialized()


def _start_jax(args, config: config_lib.Config) -> None:
  """Sets the emulated CPU devices and joins the cluster that the flags, else the environment,
  describe (if any), before JAX starts. In-process callers (tests) keep the devices they have."""
  if args.join_timeout <= 0:
    raise UserError(f"--join-timeout {args.join_timeout:g}: must be a positive number of seconds")
  cluster = distributed.Cluster.from_flags(args.coordinator, args.num_processes, args.process_id)
  if _jax_started():
    if cluster is not None:
      raise UserError(f"--coordinator {args.coordinator}: JAX has already started in this "
                      f"process, so it cannot join a cluster; run scripts/run.py as a process")
    return
  cluster = cluster or distributed.Cluster.from_environment()
  if cluster is None:
    jaxpar.emulate_cpu_devices(args.devices or config.mesh.cpu_devices)
    return
  jaxpar.emulate_cpu_devices(cluster.local_devices(args.devices, config.mesh.cpu_devices))
  distributed.join(cluster, timeout=args.join_timeout)


def _auto_mesh(config: config_lib.Config, args) -> config_lib.Config:
  """`mesh: auto`: the planner's best layout for the devices this run gets, and why."""
  import jax

  from jaxpar import plan as plan_lib
  from jaxpar import plan_report
  if args.command == "classify":
    raise UserError("mesh: auto plans decoder models; for classify set mesh.data, mesh.stage "
                    "and mesh.model")
  accelerated = args.platform != "cpu" and jax.devices()[0].platform != "cpu"
  device = jax.devices()[0] if accelerated else jax.devices("cpu")[0]
  n = len(jax.devices() if accelerated else jax.devices("cpu"))
  hw = plan_lib.for_devices(plan_lib.hardware_for(device.device_kind, device.platform), n)
  plans, _ = plan_lib.rank(config, n, hw)
  plan_lib.check_fits(plans, hw)
  why = plan_report.why(plans[0], plans[1] if len(plans) > 1 else None)
  prologue.say(f"mesh: auto chose {why} (of {len(plans)} plans for {n} devices on {hw.name}; "
               f"`plan` lists them)")
  return plans[0].candidate.config(config)


def _run(args) -> dict:
  """Checks, starts JAX, and runs the command; its JSON result."""
  command = COMMANDS[args.command]
  config = _load_config(args, command)
  _start_jax(args, config)
  prologue.enable_compilation_cache()
  if config.mesh.auto and args.command != "plan":
    config = _auto_mesh(config, args)
  return command.run(args, config)


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(_joined_values(sys.argv[1:] if argv is None else argv))
  try:
    result = _run(args)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:  # Ctrl-C: a checkpoint being written is never half-replaced
    print(f"interrupted: {args.command} stopped", file=sys.stderr)
    return 130
  if args.json and distributed.is_main():
    print(json.dumps(result))
  return 0
