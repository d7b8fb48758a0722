"""The command line: `python scripts/run.py forward --config FILE [--set k=v ...]`.

The config is parsed and checked before JAX is imported, so `--devices` can still set the
number of emulated CPU devices and a bad value costs no start-up. User mistakes (`UserError`)
print one line on stderr and exit with status 2; there is no traceback for them.
"""

import argparse
import json
import os
import sys
import time

import jaxpar
from jaxpar import axes
from jaxpar import config as config_lib
from jaxpar import distributed
from jaxpar.errors import UserError


def _command(commands, name: str, help: str, example: str) -> argparse.ArgumentParser:
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


def _verify_option(sub: argparse.ArgumentParser) -> None:
  sub.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute on one device and print the max difference "
                        "(default: run.verify of the config)")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="scripts/run.py", description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)

  fwd = _command(commands, "forward", "sharded forward pass on a seeded batch",
                 "configs/default.yaml")
  _verify_option(fwd)
  fwd.add_argument("--save-logits", metavar="OUT.npy",
                   help="write float32 logits [B, T, V] (vocab padding removed)")
  fwd.add_argument("--prompt-ids", metavar="IDS",
                   help="token ids to run on instead of the seeded batch: rows separated by ';', "
                        "ids by ',' (rows of equal length), e.g. '1,2,3;4,5,6'")
  fwd.add_argument("--schedule-png", metavar="OUT.png",
                   help="with mesh.stage > 1: save the pipeline schedule (stage x tick) as PNG")

  cls = _command(commands, "classify", "sharded CNN image classification", "configs/cnn.yaml")
  _verify_option(cls)
  cls.add_argument("--images", metavar="DIR|FILE",
                   help="classify the .png/.jpg files of DIR, or one FILE (default: a seeded "
                        "random batch)")
  cls.add_argument("--save-logits", metavar="OUT.npy",
                   help="write float32 logits [N, classes] (batch padding removed)")

  gen = _command(commands, "generate", "autoregressive generation with a sharded KV cache",
                 "configs/default.yaml")
  gen.add_argument("--prompt-ids", metavar="IDS",
                   help="prompts as token ids: rows separated by ';', ids by ',' (rows may "
                        "differ in length), e.g. '1,2,3;4,5'")
  gen.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a text prompt (repeatable); needs tokenizer.json in model.checkpoint")
  gen.add_argument("--max-new-tokens", type=int, metavar="N",
                   help="tokens to generate per prompt (generate.max_new_tokens)")
  gen.add_argument("--temperature", type=float, help="0: greedy (generate.temperature)")
  gen.add_argument("--top-k", type=int, help="sample among the k likeliest (generate.top_k)")
  gen.add_argument("--top-p", type=float, help="nucleus sampling mass (generate.top_p)")
  gen.add_argument("--seed", type=int, help="sampling and seeded-prompt seed (run.seed)")
  gen.add_argument("--save-tokens", metavar="OUT.npy",
                   help="write the new tokens, int32 [B, max_new_tokens]; after EOS: EOS")

  srv = _command(commands, "serve", "an OpenAI-compatible HTTP server with continuous "
                 "batching", "configs/tiny.yaml")
  srv.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 "
                        "opens it to the network)")
  srv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one)")

  conv = _command(commands, "convert", "write the model's parameters as a checkpoint (Orbax, "
                  "restorable on any mesh; or Hugging Face)", "configs/llama.yaml")
  conv.add_argument("--out", required=True, metavar="DIR", help="the checkpoint to write")
  conv.add_argument("--format", choices=("orbax", "hf"), default="orbax",
                    help="orbax: jaxpar's sharded checkpoint (default); hf: config.json + "
                         "safetensors for transformers")
  conv.add_argument("--dtype", choices=("float32", "bfloat16"),
                    help="--format hf: the weights' dtype (default: model.dtype)")
  conv.add_argument("--overwrite", action="store_true",
                    help="replace a checkpoint already at --out (after the new one is written)")
  _plan_options(_command(commands, "plan", "rank every layout of the devices by predicted "
                         "bytes, collectives and step time; compile the best to check",
                         "configs/gpt2.yaml"))
  return parser


def _plan_options(sub: argparse.ArgumentParser) -> None:
  from jaxpar.hardware import PRESETS
  sub.add_argument("--hardware", choices=tuple(PRESETS), default=None,
                   help="the device to plan for (default: the one present; cpu here)")
  sub.add_argument("--device-memory", type=float, metavar="GB",
                   help="memory per device in GiB (default: the hardware's)")
  sub.add_argument("--flops", type=float, metavar="TFLOPS", help="peak TFLOP/s per device")
  sub.add_argument("--hbm-gbps", type=float, metavar="X", help="memory bandwidth, GB/s")
  sub.add_argument("--link-gbps", type=float, metavar="Y",
                   help="one-way link bandwidth to a neighbour, GB/s")
  sub.add_argument("--compile", type=int, default=3, metavar="K",
                   help="compile the K best plans and print predicted against compiled "
                        "(default 3; 0: none)")
  sub.add_argument("--chart", metavar="OUT.png",
                   help="save the ranking and predicted-against-compiled as a PNG chart")


_GENERATE_FLAGS = {"max_new_tokens": "generate.max_new_tokens",
                   "temperature": "generate.temperature", "top_k": "generate.top_k",
                   "top_p": "generate.top_p", "seed": "run.seed"}


def parse_prompt_ids(text: str, *, equal: bool = False) -> list[list[int]]:
  """'1,2,3;4,5' -> [[1, 2, 3], [4, 5]] (UserError on anything else)."""
  if not text.strip():
    raise UserError(f"--prompt-ids {text!r}: no token ids; write e.g. '1,2,3;4,5', or leave "
                    f"the option out to run on seeded prompts")
  rows = []
  for row in text.split(";"):
    ids = [t.strip() for t in row.split(",")]
    if ids == [""]:
      raise UserError(f"--prompt-ids {text!r}: an empty row; every row needs a token id")
    if "" in ids:
      raise UserError(f"--prompt-ids {text!r}: an empty id in row {row!r}; separate ids by "
                      f"single commas, e.g. '1,2,3'")
    try:
      rows.append([int(t) for t in ids])
    except ValueError:
      raise UserError(f"--prompt-ids {text!r}: row {row!r} is not a comma-separated list of "
                      f"integer token ids; write e.g. '1,2,3;4,5'") from None
  if equal and len({len(r) for r in rows}) > 1:
    raise UserError(f"--prompt-ids {text!r}: forward needs rows of equal length, got lengths "
                    f"{[len(r) for r in rows]}; use generate for prompts of different lengths")
  return rows


def check_token_ids(rows: list[list[int]], vocab_size: int) -> None:
  for row in rows:
    for t in row:
      if not 0 <= t < vocab_size:
        raise UserError(f"--prompt-ids: token id {t} is outside the vocabulary [0, "
                        f"{vocab_size}); use ids below model.vocab_size={vocab_size}")


def _jax_started() -> bool:
  if "jax" not in sys.modules:
    return False
  from jax._src import xla_bridge
  return xla_bridge.backends_are_initialized()


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


def _say(text: str) -> None:
  distributed.say(text)  # process 0 only


def _open_mesh(config: config_lib.Config, args):
  """The mesh for this run, on the accelerator or emulated CPU devices (said which)."""
  import jax

  from jaxpar.mesh import make_mesh
  try:
    devices, note = pick_devices(config.mesh, args.platform)
  except UserError as e:  # say it per process when there are several
    raise distributed.fit_error(e, config.mesh, jax.process_count(), len(jax.devices())) from None
  if note:
    _say(note)
  return make_mesh(config.mesh, devices=devices)


def _compile(model, x, params) -> dict:
  """Compiles `model` for `x`, prints its collectives and per-device bytes; returns those
  figures as the JSON result's fields."""
  import jax

  from jaxpar import inspect
  from jaxpar.runtime import state
  _say("compiling...")
  start = time.perf_counter()
  compiled = model.compile(x)
  compile_s = time.perf_counter() - start
  census = inspect.hlo_census(compiled.as_text())
  mem = inspect.memory(compiled)
  _say(f"compiled in {compile_s:.2f} s; collectives in the compiled program:")
  _say(inspect.format_census(census))
  param_bytes = state.param_bytes_per_device(params)
  total_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
  _say(f"parameters: {inspect.human(param_bytes)} per device (of {inspect.human(total_bytes)} "
       f"in all)")
  _say(inspect.format_memory(mem))
  return {"param_bytes_per_device": param_bytes, "param_bytes_total": total_bytes,
          "collectives": census.counts(), "memory_per_device": mem, "compile_s": compile_s}


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
  hw = plan_lib.hardware(plan_lib.hardware_for(device.device_kind, device.platform))
  plans, _ = plan_lib.rank(config, n, hw)
  plan_lib.check_fits(plans, hw)
  _say(f"mesh: auto chose {plan_report.why(plans[0], plans[1] if len(plans) > 1 else None)} "
       f"(of {len(plans)} plans for {n} devices on {hw.name}; `plan` lists them)")
  return plans[0].candidate.config(config)


def _header(command: str, mesh) -> dict:
  from jaxpar.mesh import cross_process_axes, processes
  return {"command": command, "mesh": dict(mesh.shape), "devices": mesh.devices.size,
          "platform": mesh.devices.flat[0].platform, "processes": processes(mesh),
          "process_devices": mesh.devices.size // processes(mesh),
          "cross_process_axes": cross_process_axes(mesh)}


def forward(args, config: config_lib.Config) -> dict:
  import jax
  import numpy as np

  from jaxpar import inspect
  from jaxpar.mesh import describe
  from jaxpar.runtime import inference

  mesh = _open_mesh(config, args)
  if args.schedule_png and mesh.shape[axes.STAGE] == 1:
    raise UserError(f"--schedule-png {args.schedule_png}: the mesh has no pipeline (mesh.stage=1)"
                    f", so there is no schedule to draw; set mesh.stage > 1 or drop the option")
  _say(f"mesh: {describe(mesh)}")
  rows_given = None
  if args.prompt_ids is not None:
    tokens_host = np.asarray(parse_prompt_ids(args.prompt_ids, equal=True), np.int32)
    rows_given = len(tokens_host)
    config, tokens_host = _pad_rows(config, mesh, tokens_host)
  m = config.model
  _say(f"model: {describe_model(m)}; batch {config.run.batch} x {config.run.seq_len} tokens")

  start = time.perf_counter()
  fwd = inference.build(config, mesh)
  jax.block_until_ready(fwd.params)
  _say(_params_line(config, fwd.init_timings, time.perf_counter() - start))
  rows = inspect.param_table(fwd.params, fwd.names, fwd.rules, mesh)
  _say(inspect.format_params(rows))
  if fwd.schedule is not None:
    sched = fwd.schedule
    _say(f"pipeline: {sched.stages} stages, {sched.microbatches} microbatches, "
         f"{sched.repeats} repeat(s): {sched.ticks} ticks, bubble {sched.bubble:.1%} "
         f"(cells: the microbatch each stage runs per tick)")
    _say(inspect.format_schedule(sched.grid(), microbatches=sched.microbatches))
    if args.schedule_png and distributed.is_main():
      inspect.save_schedule_png(sched.grid(), args.schedule_png,
                                microbatches=sched.microbatches)
      _say(f"saved the schedule picture to {args.schedule_png}")

  if rows_given is None:
    tokens_host = inference.seeded_tokens(config)
  tokens = fwd.tokens(tokens_host)
  compiled = _compile(fwd, tokens, fwd.params)

  seconds = inference.time_steady(fwd, tokens, warmup=config.run.warmup, iters=config.run.iters)
  tokens_per_s = config.run.batch * config.run.seq_len / seconds
  _say(f"forward: {seconds * 1e3:.2f} ms per batch, {tokens_per_s:,.0f} tokens/s "
             f"(mean of {config.run.iters} after {config.run.warmup} warm-up)")
  logits = inference.unpad(fwd(tokens), m.vocab_size)
  result = {**_header("forward", mesh), **compiled, "step_s": seconds,
            "tokens_per_s": tokens_per_s}
  if rows_given is not None:  # the padding rows are dropped
    logits = logits[:rows_given]
  if fwd.schedule is not None:
    result["pipeline"] = fwd.schedule.as_dict()
  verify = config.run.verify if args.verify is None else args.verify
  if verify:
    reference = inference.reference_logits(fwd, tokens_host)[:len(logits)]
    diff = float(np.max(np.abs(logits - reference)))
    _say(f"verify: max |sharded - single-device| = {diff:.3e} over logits "
         f"{list(logits.shape)} ({VERIFY_HINT.get(m.dtype, '')})")
    result["verify_max_abs_diff"] = diff
  if args.save_logits:
    _save_npy(args.save_logits, logits)
    _say(f"saved logits {list(logits.shape)} float32 to {args.save_logits}")
  return result


# What rounding alone gives in `verify` (sharded sums run in another order than on one device).
VERIFY_HINT = {"float32": "float32: rounding alone gives up to about 1e-5",
               "bfloat16": "bfloat16: rounding alone gives up to a few 1e-2",
               "float16": "float16: rounding alone gives up to a few 1e-3"}


def _pad_rows(config: config_lib.Config, mesh, tokens):
  """Rows padded (repeating the first) to a batch the mesh splits, as generate does: a multiple
  of the batch axes (times the microbatches when pipelined). Returns (config, tokens)."""
  import dataclasses
  import math

  import numpy as np

  from jaxpar.rules import Rules
  from jaxpar.axes import BATCH, STAGE
  unit = math.prod(mesh.shape[a] for a in Rules(config.rules).mesh_axes(BATCH))
  if mesh.shape[STAGE] > 1:
    unit *= config.pipeline.microbatches
  rows = -(-len(tokens) // unit) * unit
  if rows != len(tokens):
    _say(f"{_count(len(tokens), 'row')} of --prompt-ids padded to {rows} to fill the mesh "
         f"(extra rows dropped)")
    tokens = np.concatenate([tokens, np.repeat(tokens[:1], rows - len(tokens), axis=0)])
  run = dataclasses.replace(config.run, batch=rows, seq_len=tokens.shape[1])
  return dataclasses.replace(config, run=run), tokens


def _count(n: int, word: str) -> str:
  """'1 prompt', '3 prompts'."""
  return f"{n} {word}{'' if n == 1 else 's'}"


def _params_line(config: config_lib.Config, timings: dict, seconds: float) -> str:
  if config.model.checkpoint:
    return (f"parameters read from checkpoint {config.model.checkpoint} in {seconds:.2f} s "
            f"(each device its own slices)")
  compile_s = timings.get("compile_s")
  detail = f" (compiling the initialiser {compile_s:.2f} s)" if compile_s is not None else ""
  return f"parameters initialised sharded in {seconds:.2f} s{detail}"


def _save_npy(path: str, array) -> None:
  """Writes `array` to exactly `path` (np.save would add .npy to a path without it), once:
  from process 0."""
  import numpy as np
  if not distributed.is_main():
    return
  with open(path, "wb") as f:
    np.save(f, array)


def classify(args, config: config_lib.Config) -> dict:
  import jax
  import numpy as np

  from jaxpar import inspect
  from jaxpar.mesh import describe
  from jaxpar.rules import Rules
  from jaxpar.runtime import vision

  mesh = _open_mesh(config, args)
  vision.check_layout(config, mesh, Rules(config.rules))
  c, batch = config.section("cnn"), config.run.batch
  if args.images:
    files = vision.list_images(args.images)
    images = vision.load_images(files, config)  # every file decoded before compiling
  else:
    files, images = [], None
  _say(f"mesh: {describe(mesh)}")
  _say(f"model: ResNet image_size={c.image_size} in_channels={c.in_channels} "
       f"width={c.width} stages={c.stages} blocks={c.blocks} classes={c.num_classes}; "
       f"batch {batch}")

  start = time.perf_counter()
  clf = vision.build(config, mesh)
  jax.block_until_ready(clf.params)
  _say(f"parameters initialised sharded in {time.perf_counter() - start:.2f} s")
  _say(inspect.format_params(inspect.param_table(clf.params, clf.names, clf.rules, mesh)))

  if images is None:
    images = vision.seeded_images(config)
    work = [(images, batch)] * config.run.iters
    _say(f"{config.run.iters} batches of {batch} seeded random images")
  else:
    work = list(vision.batches(images, batch))
    _say(f"{len(files)} images from {args.images} in {len(work)} batches of {batch}")
  compiled = _compile(clf, clf.images(work[0][0]), clf.params)

  for _ in range(config.run.warmup):
    clf(clf.images(work[0][0])).block_until_ready()
  logits, seconds = [], 0.0
  for i, (chunk, n) in enumerate(work):
    start = time.perf_counter()
    out = clf(clf.images(chunk))
    out.block_until_ready()
    took = time.perf_counter() - start
    seconds += took
    logits.append(distributed.to_host(out)[:n])
    padding = f" + {batch - n} padding" if n < batch else ""
    _say(f"batch {i + 1}/{len(work)}: {n} images{padding} in {took * 1e3:.2f} ms")
  n_images = sum(n for _, n in work)
  images_per_s = n_images / seconds
  _say(f"classify: {images_per_s:,.1f} images/s ({n_images} images, {len(work)} batches, "
       f"after {config.run.warmup} warm-up)")
  logits = np.concatenate(logits) if files else logits[0]
  result = {
      **_header("classify", mesh), **compiled,
      "images": n_images,
      "batches": len(work),
      "step_s": seconds / len(work),
      "images_per_s": images_per_s,
  }
  if files:
    top = logits.argmax(-1)
    for path, k in zip(files, top):
      _say(f"{os.path.basename(path)}: class {k}")
    result["predictions"] = {os.path.basename(p): int(k) for p, k in zip(files, top)}
  verify = config.run.verify if args.verify is None else args.verify
  if verify:
    reference = vision.reference_logits(clf, work[0][0])[:work[0][1]]
    diff = float(np.max(np.abs(logits[:work[0][1]] - reference)))
    _say(f"verify: max |sharded - single-device| = {diff:.3e} over the first batch's logits "
         f"{list(reference.shape)}")
    result["verify_max_abs_diff"] = diff
  if args.save_logits:
    _save_npy(args.save_logits, logits.astype(np.float32))
    _say(f"saved logits {list(logits.shape)} float32 to {args.save_logits}")
  return result


def generate(args, config: config_lib.Config) -> dict:
  import jax
  import numpy as np

  from jaxpar import inspect
  from jaxpar.mesh import describe
  from jaxpar.runtime import generate as gen_lib

  g = config.generate
  tokenizer = load_tokenizer(config, required=bool(args.prompt))
  if args.prompt:
    prompts = [tokenizer.encode(text).ids for text in args.prompt]
  elif args.prompt_ids is not None:
    prompts = parse_prompt_ids(args.prompt_ids)
  else:
    prompts = gen_lib.seeded_prompts(config)
  check_token_ids(prompts, config.model.vocab_size)
  mesh = _open_mesh(config, args)
  _say(f"mesh: {describe(mesh)}")
  _say(f"model: {describe_model(config.model)}")
  start = time.perf_counter()
  generator = gen_lib.build(config, mesh)
  jax.block_until_ready(generator.params)
  for note in generator.notes:
    _say(note)
  param_bytes = generator.param_bytes_per_device()
  _say(f"{_params_line(config, generator.forward.init_timings, time.perf_counter() - start)}: "
       f"{inspect.human(param_bytes)} per device")
  lengths = [len(p) for p in prompts]
  batch = generator.padded_batch(len(prompts))
  cache_bytes = generator.cache_bytes_per_device(batch, max(lengths) + g.max_new_tokens)
  if batch != len(prompts):
    _say(f"{_count(len(prompts), 'prompt')} padded to {batch} rows to fill the mesh (extra rows "
         f"dropped)")
  mode = "greedy" if g.temperature == 0 else (
      f"sampling (temperature {g.temperature}, top_k {g.top_k}, top_p {g.top_p})")
  span = f"{min(lengths)}-{max(lengths)}" if min(lengths) != max(lengths) else str(lengths[0])
  _say(f"{_count(len(prompts), 'prompt')} of {span} tokens, {g.max_new_tokens} new "
       f"tokens each, {mode}, eos {list(generator.eos_ids) or 'none'}; "
       f"layers {'scanned' if generator.scan else 'unrolled'}; KV cache "
       f"{inspect.human(cache_bytes)} per device")
  result = generator.generate(prompts, max_new_tokens=g.max_new_tokens,
                              sampling=gen_lib.Sampling(g.temperature, g.top_k, g.top_p),
                              seed=config.run.seed, progress=True)
  new = result.tokens.shape[0] * result.steps  # the user's rows only
  total_s = result.prefill_s + result.decode_s
  _say(f"compiled in {result.compile_s:.2f} s; prefill {result.prefill_s * 1e3:.1f} ms, decode "
       f"{result.steps} steps in {result.decode_s * 1e3:.1f} ms: {new / total_s:,.1f} tokens/s")
  texts = [tokenizer.decode(row.tolist()) for row in result.tokens] if tokenizer else None
  for b, row in enumerate(result.tokens[:8]):
    _say(f"  [{b}] {row.tolist()}" + (f" {texts[b]!r}" if texts else ""))
  if len(result.tokens) > 8:
    _say(f"  ... {len(result.tokens) - 8} more rows")
  if args.save_tokens:
    _save_npy(args.save_tokens, result.tokens.astype(np.int32))
    _say(f"saved new tokens {list(result.tokens.shape)} int32 to {args.save_tokens}")
  extra = {"texts": texts} if texts else {}
  return {
      **extra,
      **_header("generate", mesh),
      "new_tokens": result.tokens.tolist(),
      "steps": result.steps,
      "compile_s": result.compile_s,
      "prefill_s": result.prefill_s,
      "decode_s": result.decode_s,
      "tokens_per_s": new / total_s,
      "kv_cache_bytes_per_device": cache_bytes,
      "param_bytes_per_device": param_bytes,
      "scan_layers": generator.scan,
  }


def convert(args, config: config_lib.Config) -> dict:
  import jax

  from jaxpar.mesh import describe
  from jaxpar.runtime import checkpoint, inference

  mesh = _open_mesh(config, args)
  _say(f"mesh: {describe(mesh)}")
  _say(f"model: {describe_model(config.model)}")
  start = time.perf_counter()
  fwd = inference.build(config, mesh)
  jax.block_until_ready(fwd.params)
  _say(_params_line(config, fwd.init_timings, time.perf_counter() - start))
  start = time.perf_counter()
  if args.format == "orbax":
    checkpoint.save(fwd, args.out, overwrite=args.overwrite, say=_say)
  else:
    checkpoint.export_hf(fwd, args.out, dtype=args.dtype or config.model.dtype,
                         overwrite=args.overwrite, say=_say)
  return {**_header("convert", mesh), "out": os.path.abspath(args.out), "format": args.format,
          "write_s": time.perf_counter() - start}


def _serve(args, config: config_lib.Config) -> dict:
  from jaxpar.serve.command import serve
  return serve(args, config, open_mesh=_open_mesh, load_tokenizer=load_tokenizer)


def plan(args, config: config_lib.Config) -> dict:
  import jax

  from jaxpar import plan as plan_lib
  from jaxpar import plan_report
  n = args.devices or len(jax.devices())
  device = jax.devices()[0]
  hw = plan_lib.hardware(args.hardware or plan_lib.hardware_for(device.device_kind,
                                                                 device.platform),
                         tflops=args.flops, hbm_gbps=args.hbm_gbps, link_gbps=args.link_gbps,
                         memory_gib=args.device_memory)
  if args.compile < 0:
    raise UserError(f"--compile {args.compile}: must be 0 or more")
  return {"command": "plan", **plan_report.run(config, n_devices=n, hw=hw,
                                               compile_top=args.compile, chart=args.chart,
                                               say=_say)}


def describe_model(m: config_lib.ModelConfig) -> str:
  """'llama d_model=2048 n_heads=32 (8 kv) n_layers=16 d_ff=8192 vocab=128256 (checkpoint X)'."""
  kv = f" ({m.kv_heads} kv)" if m.kv_heads != m.n_heads else ""
  source = f"checkpoint {m.checkpoint}" if m.checkpoint else "seeded weights"
  return (f"{m.family} d_model={m.d_model} n_heads={m.n_heads}{kv} n_layers={m.n_layers} "
          f"d_ff={m.d_ff} vocab={m.vocab_size} ({source})")


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


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(_joined_values(sys.argv[1:] if argv is None else argv))
  try:
    overrides = list(args.set)
    for flag, key in _GENERATE_FLAGS.items():
      if getattr(args, flag, None) is not None:
        overrides.append(f"{key}={getattr(args, flag)}")
    if getattr(args, "prompt", None) and args.prompt_ids is not None:
      raise UserError("--prompt and --prompt-ids both given: pass the prompts one way, as text "
                      "(--prompt, repeatable) or as token ids (--prompt-ids '1,2;3')")
    if args.command == "forward" and args.prompt_ids is not None:
      rows = parse_prompt_ids(args.prompt_ids, equal=True)
      overrides += [f"run.seq_len={len(rows[0])}"]  # the batch is padded to fit the mesh
    config = config_lib.load(args.config, overrides)
    if args.command == "forward" and args.prompt_ids is not None:
      check_token_ids(rows, config.model.vocab_size)
    if args.devices is not None and args.devices < 1:
      raise UserError(f"--devices {args.devices}: must be at least 1")
    for flag in ("save_logits", "schedule_png", "save_tokens", "chart"):
      path = getattr(args, flag, None)
      folder = os.path.dirname(os.path.abspath(path)) if path else None
      if folder and not os.path.isdir(folder):
        option = "--" + flag.replace("_", "-")
        raise UserError(f"{option} {path}: folder {folder} does not exist; create it or "
                        f"choose another path")
    _start_jax(args, config)
    enable_compilation_cache()
    if config.mesh.auto and args.command != "plan":
      config = _auto_mesh(config, args)
    if args.command == "convert":  # before anything is read: a refused --out loses no time
      if config.model.quantize != "none":
        raise UserError(f"model.quantize={config.model.quantize}: convert writes float "
                        f"weights (quantisation happens on the mesh at load); drop "
                        f"model.quantize, and set it when running the checkpoint")
      from jaxpar.checkpoint_meta import check_out
      check_out(args.out, overwrite=args.overwrite)
    command = {"forward": forward, "classify": classify, "generate": generate,
               "convert": convert, "serve": _serve, "plan": plan}[args.command]
    result = command(args, config)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.json and distributed.is_main():
    print(json.dumps(result))
  return 0
