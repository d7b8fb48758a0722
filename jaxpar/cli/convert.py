"""`scripts/run.py convert`: write the model's parameters as a checkpoint (Orbax, restorable on
any mesh; or Hugging Face)."""

import os
import time

from jaxpar import config as config_lib
from jaxpar.cli import prologue
from jaxpar.cli.prologue import say
from jaxpar.errors import UserError


def add_parser(commands) -> None:
  sub = prologue.add_command(commands, "convert", "write the model's parameters as a checkpoint "
                             "(Orbax, restorable on any mesh; or Hugging Face)",
                             "configs/llama.yaml")
  sub.add_argument("--out", required=True, metavar="DIR", help="the checkpoint to write")
  sub.add_argument("--format", choices=("orbax", "hf"), default="orbax",
                   help="orbax: jaxpar's sharded checkpoint (default); hf: config.json + "
                        "safetensors for transformers")
  sub.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="--format hf: the weights' dtype (default: model.dtype)")
  sub.add_argument("--overwrite", action="store_true",
                   help="replace a checkpoint already at --out (after the new one is written)")


def run(args, config: config_lib.Config) -> dict:
  from jaxpar.runtime import checkpoint, inference

  _check_out(args, config)  # before anything is read: a refused --out loses no time
  mesh = prologue.open_mesh(config, args)
  prologue.say_mesh(mesh, config.model)
  fwd, seconds = prologue.timed_build(inference.build, config, mesh)
  say(prologue.params_line(config, fwd.init_timings, seconds))
  start = time.perf_counter()
  if args.format == "orbax":
    checkpoint.save(fwd, args.out, overwrite=args.overwrite, say=say)
  else:
    checkpoint.export_hf(fwd, args.out, dtype=args.dtype or config.model.dtype,
                         overwrite=args.overwrite, say=say)
  return {**prologue.header("convert", mesh), "out": os.path.abspath(args.out),
          "format": args.format, "write_s": time.perf_counter() - start}


def _check_out(args, config: config_lib.Config) -> None:
  if config.model.quantize != "none":
    raise UserError(f"model.quantize={config.model.quantize}: convert writes float "
                    f"weights (quantisation happens on the mesh at load); drop "
                    f"model.quantize, and set it when running the checkpoint")
  from jaxpar.checkpoint_meta import check_out
  check_out(args.out, overwrite=args.overwrite, source=config.model.checkpoint)
