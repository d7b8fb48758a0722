"""What every command shares: its options, the devices and the mesh, the lines that open a run
(mesh, model, parameters), compiling with a report, and the JSON header.

Nothing here imports JAX at module level: the parser is built before JAX starts.
"""

import argparse
import os
import time

from jaxpar import config as config_lib
from jaxpar import distributed
from jaxpar.errors import UserError

say = distributed.say  # process 0 only


def add_command(commands, name: str, help: str, example: str) -> argparse.ArgumentParser:
  """A subcommand with the options every command shares."""
  sub = commands.add_parser(name, help=help)
  sub.add_argument("--config", required=True, help=f"YAML config, e.g. {example}")
  sub.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set mesh.model=2")
  sub.add_argument("--devices", type=int, default=None, metavar="N",
                   help="emulated CPU devices when no accelerator is present "
                        "(default: mesh.cpu_devices of the config)")
  sub.add_argument("--platform", choices=("auto", "cpu"), default="auto",
                   help="auto: the accelerator if its devices fit the mesh, else emulated CPU")
  sub.add_argument("--json", action="store_true",
                   help="print one JSON object with the results as the last stdout line")
  cluster = sub.add_argument_group(
      "many processes", "join a cluster (default: what SLURM, Open MPI or Kubernetes set in the "
      "environment, else one process); --devices is then per process")
  cluster.add_argument("--coordinator", metavar="HOST:PORT",
                       help="process 0's address, the same on every process")
  cluster.add_argument("--num-processes", type=int, metavar="N", help="processes in all")
  cluster.add_argument("--process-id", type=int, metavar="I", help="this process, 0 to N-1")
  cluster.add_argument("--join-timeout", type=float, default=120, metavar="SECONDS",
                       help="give up when the cluster is not complete after this (default 120)")
  return sub


def add_verify_option(sub: argparse.ArgumentParser) -> None:
  sub.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute on one device and print the max difference "
                        "(default: run.verify of the config)")


def parse_prompt_ids(text: str, *, equal: bool = False) -> list[list[int]]:
  """'1,2,3;4,5' -> [[1, 2, 3], [4, 5]] (UserError on anything else)."""
  if not text.strip():
    raise UserError(f"--prompt-ids {text!r}: no token ids; write e.g. '1,2,3;4,5', or leave "
                    f"the option out to run on seeded prompts")
  rows = [_parse_row(text, row) for row in text.split(";")]
  if equal and len({len(r) for r in rows}) > 1:
    raise UserError(f"--prompt-ids {text!r}: forward needs rows of equal length, got lengths "
                    f"{[len(r) for r in rows]}; use generate for prompts of different lengths")
  return rows


def _parse_row(text: str, row: str) -> list[int]:
  """One ';'-separated row of --prompt-ids `text`."""
  ids = [t.strip() for t in row.split(",")]
  if ids == [""]:
    raise UserError(f"--prompt-ids {text!r}: an empty row; every row needs a token id")
  if "" in ids:
    raise UserError(f"--prompt-ids {text!r}: an empty id in row {row!r}; separate ids by "
                    f"single commas, e.g. '1,2,3'")
  try:
    return [int(t) for t in ids]
  except ValueError:
    raise UserError(f"--prompt-ids {text!r}: row {row!r} is not a comma-separated list of "
                    f"integer token ids; write e.g. '1,2,3;4,5'") from None


def check_token_ids(rows: list[list[int]], vocab_size: int) -> None:
  for row in rows:
    for t in row:
      if not 0 <= t < vocab_size:
        raise UserError(f"--prompt-ids: token id {t} is outside the vocabulary [0, "
                        f"{vocab_size}); use ids below model.vocab_size={vocab_size}")


def load_tokenizer(config: config_lib.Config, *, required: bool):
  """The checkpoint's tokenizer.json (for text prompts and decoded output); None when there
  is none and it is not `required`."""
  checkpoint = config.model.checkpoint
  path = os.path.join(checkpoint, "tokenizer.json") if checkpoint else ""
  if not path or not os.path.isfile(path):
    if not required:
      return None
    raise UserError(f"--prompt needs a tokenizer: no tokenizer.json in model.checkpoint="
                    f"{checkpoint!r}; pass token ids with --prompt-ids instead")
  from tokenizers import Tokenizer
  try:
    return Tokenizer.from_file(path)
  except Exception as e:  # the tokenizers library raises its own exception types
    raise UserError(f"{path}: not a valid tokenizer.json ({e}); re-save it with the "
                    f"tokenizers library") from None


def enable_compilation_cache() -> None:
  """Keeps compiled programs across runs (JAXPAR_CACHE_DIR; empty turns it off)."""
  import jax
  path = os.environ.get("JAXPAR_CACHE_DIR",
                        os.path.join(os.path.expanduser("~"), ".cache", "jaxpar", "xla"))
  if path and not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


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


def open_mesh(config: config_lib.Config, args):
  """The mesh for this run, on the accelerator or emulated CPU devices (said which)."""
  import jax

  from jaxpar.mesh import make_mesh
  try:
    devices, note = pick_devices(config.mesh, args.platform)
  except UserError as e:  # say it per process when there are several
    raise distributed.fit_error(e, config.mesh, jax.process_count(), len(jax.devices())) from None
  if note:
    say(note)
  return make_mesh(config.mesh, devices=devices)


def say_mesh(mesh, model: config_lib.ModelConfig | None = None) -> None:
  """The 'mesh: ...' line, and the 'model: ...' line when `model` is given."""
  from jaxpar.mesh import describe
  say(f"mesh: {describe(mesh)}")
  if model is not None:
    say(f"model: {describe_model(model)}")


def describe_model(m: config_lib.ModelConfig) -> str:
  """'llama d_model=2048 n_heads=32 (8 kv) n_layers=16 d_ff=8192 vocab=128256 (checkpoint X)'."""
  kv = f" ({m.kv_heads} kv)" if m.kv_heads != m.n_heads else ""
  source = f"checkpoint {m.checkpoint}" if m.checkpoint else "seeded weights"
  return (f"{m.family} d_model={m.d_model} n_heads={m.n_heads}{kv} n_layers={m.n_layers} "
          f"d_ff={m.d_ff} vocab={m.vocab_size} ({source})")


def timed_build(build, config: config_lib.Config, mesh):
  """`build(config, mesh)` once its parameters are on the devices, and the seconds it took."""
  import jax
  start = time.perf_counter()
  built = build(config, mesh)
  jax.block_until_ready(built.params)
  return built, time.perf_counter() - start


def params_line(config: config_lib.Config, timings: dict, seconds: float) -> str:
  if config.model.checkpoint:
    return (f"parameters read from checkpoint {config.model.checkpoint} in {seconds:.2f} s "
            f"(each device its own slices)")
  compile_s = timings.get("compile_s")
  detail = f" (compiling the initialiser {compile_s:.2f} s)" if compile_s is not None else ""
  return f"parameters initialised sharded in {seconds:.2f} s{detail}"


def header(command: str, mesh) -> dict:
  """The JSON result's first fields: the command and where it ran."""
  from jaxpar.mesh import cross_process_axes, processes
  return {"command": command, "mesh": dict(mesh.shape), "devices": mesh.devices.size,
          "platform": mesh.devices.flat[0].platform, "processes": processes(mesh),
          "process_devices": mesh.devices.size // processes(mesh),
          "cross_process_axes": cross_process_axes(mesh)}
