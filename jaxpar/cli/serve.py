"""`scripts/run.py serve`: build the engine (every program compiled up front), then serve an
OpenAI-compatible HTTP API with continuous batching."""

import os
import time

from jaxpar import config as config_lib
from jaxpar.cli import prologue
from jaxpar.cli.prologue import say
from jaxpar.errors import UserError


def add_parser(commands) -> None:
  sub = prologue.add_command(commands, "serve", "an OpenAI-compatible HTTP server with "
                             "continuous batching", "configs/tiny.yaml")
  sub.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 "
                        "opens it to the network)")
  sub.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one)")


def model_name(config: config_lib.Config) -> str:
  """serve.model_name, else the checkpoint's folder name, else 'jaxpar-<family>'."""
  if config.serve.model_name:
    return config.serve.model_name
  if config.model.checkpoint:
    return os.path.basename(os.path.normpath(config.model.checkpoint))
  return f"jaxpar-{config.model.family}"


def run(args, config: config_lib.Config) -> dict:
  import jax

  from jaxpar.mesh import describe
  from jaxpar.serve import openai_api, server

  if not 0 <= args.port < 65536:
    raise UserError(f"--port {args.port}: must be from 0 (any free port) to 65535")
  if jax.process_count() > 1:
    raise UserError("serve runs on one process (its devices may be many); start it without "
                    "--coordinator")
  tokenizer = prologue.load_tokenizer(config, required=False)
  template = openai_api.ChatTemplate.load(config.model.checkpoint)
  mesh = prologue.open_mesh(config, args)
  prologue.say_mesh(mesh)
  engine = _engine(config, mesh, tokenizer, template)
  s, name = config.serve, model_name(config)
  limits = openai_api.Limits(model=name, max_tokens=min(s.max_tokens, engine.length - 1),
                             context=engine.length)
  app = server.make_app(engine, limits=limits, tokenizer=tokenizer, template=template)
  engine.start()
  ready = (f"serving {name!r} at {{address}}/v1 (mesh {describe(mesh)}; {s.max_slots} slots, "
           f"{s.policy} batching); Ctrl-C or SIGTERM stops")
  server.run(engine, app, host=args.host, port=args.port, ready=ready,
             shutdown_timeout=s.shutdown_timeout)
  return {"command": "serve", "model": name}


def _engine(config: config_lib.Config, mesh, tokenizer, template):
  """The engine, every program compiled; says its slots, KV cache and parameters."""
  from jaxpar import inspect, serve as serve_lib
  start = time.perf_counter()
  engine = serve_lib.build(config, mesh, tokenizer=tokenizer)
  s = config.serve
  cache = engine.generator.cache_bytes_per_device(s.max_slots, engine.length)
  say(f"engine ready in {time.perf_counter() - start:.1f} s: {s.max_slots} slots of "
      f"{engine.length} positions, KV cache {inspect.human(cache)} per device, parameters "
      f"{inspect.human(engine.generator.param_bytes_per_device())} per device; "
      f"{_prefill(s.step_tokens)}; tokenizer "
      f"{'yes' if tokenizer else 'none (token ids only)'}, chat template "
      f"{'yes' if template else 'none'}")
  return engine


def _prefill(budget: int) -> str:
  """How prompts are prefilled (the ready line's words)."""
  if not budget:
    return "prompts prefilled whole (serve.step_tokens=0)"
  return f"prompts prefilled in chunks, up to {budget} tokens a step (serve.step_tokens)"
