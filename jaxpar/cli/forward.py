"""`scripts/run.py forward`: the sharded forward pass on a seeded batch (or --prompt-ids), timed,
with its compiled collectives, optionally checked against one device."""


from jaxpar import axes
from jaxpar import config as config_lib
from jaxpar.cli import prologue, report
from jaxpar.cli.prologue import say
from jaxpar.errors import UserError

# What rounding alone gives in `verify` (sharded sums run in another order than on one device).
VERIFY_HINT = {"float32": "float32: rounding alone gives up to about 1e-5",
               "bfloat16": "bfloat16: rounding alone gives up to a few 1e-2",
               "float16": "float16: rounding alone gives up to a few 1e-3"}


def add_parser(commands) -> None:
  sub = prologue.add_command(commands, "forward", "sharded forward pass on a seeded batch",
                             "configs/default.yaml")
  prologue.add_verify_option(sub)
  sub.add_argument("--save-logits", metavar="OUT.npy",
                   help="write float32 logits [B, T, V] (vocab padding removed)")
  sub.add_argument("--prompt-ids", metavar="IDS",
                   help="token ids to run on instead of the seeded batch: rows separated by ';', "
                        "ids by ',' (rows of equal length), e.g. '1,2,3;4,5,6'")
  sub.add_argument("--schedule-png", metavar="OUT.png",
                   help="with mesh.stage > 1: save the pipeline schedule (stage x tick) as PNG")


def overrides(args) -> list[str]:
  """--prompt-ids sets the sequence length (the batch is padded to fit the mesh)."""
  if args.prompt_ids is None:
    return []
  rows = prologue.parse_prompt_ids(args.prompt_ids, equal=True)
  return [f"run.seq_len={len(rows[0])}"]


def check(args, config: config_lib.Config) -> None:
  if args.prompt_ids is not None:
    prologue.check_token_ids(prologue.parse_prompt_ids(args.prompt_ids, equal=True),
                             config.model.vocab_size)


def run(args, config: config_lib.Config) -> dict:
  from jaxpar.runtime import inference

  mesh = prologue.open_mesh(config, args)
  if args.schedule_png and mesh.shape[axes.STAGE] == 1:
    raise UserError(f"--schedule-png {args.schedule_png}: the mesh has no pipeline (mesh.stage=1)"
                    f", so there is no schedule to draw; set mesh.stage > 1 or drop the option")
  prologue.say_mesh(mesh)
  rows_given, tokens_host = None, None
  if args.prompt_ids is not None:
    tokens_host = _given_tokens(args.prompt_ids)
    rows_given = len(tokens_host)
    config, tokens_host = _pad_rows(config, mesh, tokens_host)
  say(f"model: {prologue.describe_model(config.model)}; batch {config.run.batch} x "
      f"{config.run.seq_len} tokens")
  fwd = _build(args, config, mesh)
  if rows_given is None:
    tokens_host = inference.seeded_tokens(config)
  tokens = fwd.tokens(tokens_host)
  result = {**prologue.header("forward", mesh), **report.compile_report(fwd, tokens, fwd.params),
            **_time(config, fwd, tokens)}
  logits = inference.unpad(fwd(tokens), config.model.vocab_size)[:rows_given]  # no padding rows
  if fwd.schedule is not None:
    result["pipeline"] = fwd.schedule.as_dict()
  if fwd.census is not None:
    result["experts"] = _experts(config, fwd.expert_tokens(tokens))
  hint = VERIFY_HINT.get(config.model.dtype, "")
  result.update(report.verify(
      args, config, logits,
      lambda: inference.reference_logits(fwd, tokens_host)[:len(logits)],
      over=f"logits {list(logits.shape)} ({hint})"))
  if args.save_logits:
    report.save_npy(args.save_logits, logits, "logits")
  return result


def _experts(config: config_lib.Config, counts) -> dict:
  """Each layer's (token, expert) pairs per expert, said (every expert up to 16 of them, else
  the least, mean and most) and as JSON fields."""
  o = config.model.options
  pairs = config.run.batch * config.run.seq_len * o.experts_per_token
  say(f"experts: (token, expert) pairs each expert got, of {pairs:,} a layer ({config.run.batch}"
      f" x {config.run.seq_len} tokens x top {o.experts_per_token}); most / mean = load "
      f"imbalance")
  for layer, row in enumerate(counts):
    shown = (" ".join(map(str, row)) if len(row) <= 16 else
             f"least {row.min()}, mean {row.mean():.1f}, most {row.max()}")
    say(f"  layer {layer}: {shown} (imbalance {row.max() / row.mean():.2f})")
  return {"tokens_per_expert": counts.tolist(), "pairs_per_layer": pairs,
          "imbalance": [round(float(r.max() / r.mean()), 4) for r in counts]}


def _given_tokens(text: str):
  import numpy as np
  return np.asarray(prologue.parse_prompt_ids(text, equal=True), np.int32)


def _build(args, config: config_lib.Config, mesh):
  """The sharded forward, its parameters and pipeline schedule said."""
  from jaxpar import inspect
  from jaxpar.runtime import inference

  fwd, seconds = prologue.timed_build(inference.build, config, mesh)
  say(prologue.params_line(config, fwd.init_timings, seconds))
  say(inspect.format_params(inspect.param_table(fwd.params, fwd.names, fwd.rules, mesh)))
  if fwd.schedule is not None:
    _say_schedule(fwd.schedule, args.schedule_png)
  return fwd


def _say_schedule(sched, png: str | None) -> None:
  from jaxpar import distributed, inspect
  say(f"pipeline: {sched.stages} stages, {sched.microbatches} microbatches, "
      f"{sched.repeats} repeat(s): {sched.ticks} ticks, bubble {sched.bubble:.1%} "
      f"(cells: the microbatch each stage runs per tick)")
  say(inspect.format_schedule(sched.grid(), microbatches=sched.microbatches))
  if png and distributed.is_main():
    inspect.save_schedule_png(sched.grid(), png, microbatches=sched.microbatches)
    say(f"saved the schedule picture to {png}")


def _time(config: config_lib.Config, fwd, tokens) -> dict:
  """The steady-state step time, said and as JSON fields."""
  from jaxpar.runtime import inference
  run = config.run
  seconds = inference.time_steady(fwd, tokens, warmup=run.warmup, iters=run.iters)
  tokens_per_s = run.batch * run.seq_len / seconds
  say(f"forward: {seconds * 1e3:.2f} ms per batch, {tokens_per_s:,.0f} tokens/s "
      f"(mean of {run.iters} after {run.warmup} warm-up)")
  return {"step_s": seconds, "tokens_per_s": tokens_per_s}


def _pad_rows(config: config_lib.Config, mesh, tokens):
  """Rows padded (repeating the first) to a batch the mesh splits, as generate does: a multiple
  of the batch axes (times the microbatches when pipelined). Returns (config, tokens)."""
  import dataclasses
  import math

  import numpy as np

  from jaxpar.rules import Rules
  unit = math.prod(mesh.shape[a] for a in Rules(config.rules).mesh_axes(axes.BATCH))
  if mesh.shape[axes.STAGE] > 1:
    unit *= config.pipeline.microbatches
  rows = -(-len(tokens) // unit) * unit
  if rows != len(tokens):
    say(f"{report.count(len(tokens), 'row')} of --prompt-ids padded to {rows} to fill the mesh "
        f"(extra rows dropped)")
    tokens = np.concatenate([tokens, np.repeat(tokens[:1], rows - len(tokens), axis=0)])
  run = dataclasses.replace(config.run, batch=rows, seq_len=tokens.shape[1])
  return dataclasses.replace(config, run=run), tokens
