"""`scripts/run.py serve`: build the engine (every program compiled up front), then serve HTTP."""

import os
import time

from jaxpar import config as config_lib
from jaxpar.distributed import say
from jaxpar.errors import UserError


def model_name(config: config_lib.Config) -> str:
  """serve.model_name, else the checkpoint's folder name, else 'jaxpar-<family>'."""
  if config.serve.model_name:
    return config.serve.model_name
  if config.model.checkpoint:
    return os.path.basename(os.path.normpath(config.model.checkpoint))
  return f"jaxpar-{config.model.family}"


def serve(args, config: config_lib.Config, *, open_mesh, load_tokenizer) -> dict:
  import jax

  from jaxpar import inspect, serve as serve_lib
  from jaxpar.mesh import describe
  from jaxpar.serve import openai_api, server

  if not 0 <= args.port < 65536:
    raise UserError(f"--port {args.port}: must be from 0 (any free port) to 65535")
  if jax.process_count() > 1:
    raise UserError("serve runs on one process (its devices may be many); start it without "
                    "--coordinator")
  tokenizer = load_tokenizer(config, required=False)
  template = openai_api.ChatTemplate.load(config.model.checkpoint)
  mesh = open_mesh(config, args)
  say(f"mesh: {describe(mesh)}")
  start = time.perf_counter()
  engine = serve_lib.build(config, mesh, tokenizer=tokenizer)
  s, name = config.serve, model_name(config)
  cache = engine.generator.cache_bytes_per_device(s.max_slots, engine.length)
  say(f"engine ready in {time.perf_counter() - start:.1f} s: {s.max_slots} slots of "
      f"{engine.length} positions, KV cache {inspect.human(cache)} per device, parameters "
      f"{inspect.human(engine.generator.param_bytes_per_device())} per device; tokenizer "
      f"{'yes' if tokenizer else 'none (token ids only)'}, chat template "
      f"{'yes' if template else 'none'}")
  limits = openai_api.Limits(model=name, max_tokens=min(s.max_tokens, engine.length - 1),
                             context=engine.length)
  app = server.make_app(engine, limits=limits, tokenizer=tokenizer, template=template)
  engine.start()
  ready = (f"serving {name!r} at {{address}}/v1 (mesh {describe(mesh)}; {s.max_slots} slots, "
           f"{s.policy} batching); Ctrl-C or SIGTERM stops")
  server.run(engine, app, host=args.host, port=args.port, ready=ready,
             shutdown_timeout=s.shutdown_timeout)
  return {"command": "serve", "model": name}
