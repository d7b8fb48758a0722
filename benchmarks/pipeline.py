"""The pipeline's executed work against the same model without pipelining, in one run.

For S in {1, 2, 4} stages and M in {S, 2S, 4S} microbatches (and the circular schedule with
R = 2 repeats), the pipelined forward runs on a (data = 8/S, stage = S) mesh and the baseline,
the same model and weights without a pipeline, on a data = 8 mesh: the same 8 emulated devices
and the same useful work. Emulated devices share the host's cores, so wall time follows the
total work executed, bubble ticks included: the ratio pipelined / baseline should sit near
(R*M + S - 1) / (R*M); the distance from it is the pipeline's own overhead (permutes, masking,
buffers). Pipelined and baseline calls are timed interleaved; medians over rounds.

  python benchmarks/pipeline.py [--set k=v ...] [--rounds 5]

Prints a table and writes JSON to benchmarks/results/pipeline.json.
"""

import dataclasses
import pathlib
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import parser, time_block, write_json  # noqa: E402
from jaxpar import config as config_lib  # noqa: E402
from jaxpar import emulate_cpu_devices  # noqa: E402

DEFAULTS = ["mesh.cpu_devices=8", "model.vocab_size=256", "model.d_model=128",
            "model.n_heads=4", "model.n_layers=8", "model.d_ff=512", "model.max_seq_len=64",
            "run.batch=32", "run.seq_len=64"]


def main() -> None:
  args = parser(__doc__, config="tiny.yaml", out="pipeline.json").parse_args()
  base = config_lib.load(args.config, DEFAULTS + args.set)
  emulate_cpu_devices(base.mesh.cpu_devices)

  import jax

  from jaxpar import inspect
  from jaxpar.mesh import make_mesh
  from jaxpar.runtime import inference

  devices = jax.devices("cpu")
  n = len(devices)

  def make(stages, microbatches, repeats, pipelined):
    config = dataclasses.replace(
        base, mesh=config_lib.MeshConfig(data=n // stages, stage=stages, model=1),
        pipeline=config_lib.PipelineConfig(microbatches=microbatches, repeats=repeats))
    fwd = inference.build(config, make_mesh(config.mesh, devices=devices), pipelined=pipelined)
    tokens = fwd.tokens(inference.seeded_tokens(config))
    fwd.compile(tokens)
    return fwd, tokens

  def block(fwd, tokens) -> float:
    return time_block(lambda: fwd(tokens), args.calls)

  baseline, tokens = make(1, 1, 1, False)
  cases = [(s, m, 1) for s in (1, 2, 4) for m in (s, 2 * s, 4 * s)]
  cases += [(s, m, 2) for s in (2, 4) for m in (s, 2 * s)]
  rows, results = [], []
  print(f"{n} emulated devices; model d={base.model.d_model} L={base.model.n_layers}; "
        f"batch {base.run.batch} x {base.run.seq_len}; {args.rounds} interleaved rounds")
  for stages, microbatches, repeats in cases:
    fwd, fwd_tokens = make(stages, microbatches, repeats, True)
    piped, plain = [], []
    for r in range(args.rounds):
      if r % 2:
        plain.append(block(baseline, tokens))
        piped.append(block(fwd, fwd_tokens))
      else:
        piped.append(block(fwd, fwd_tokens))
        plain.append(block(baseline, tokens))
    sched = fwd.schedule
    expected = sched.ticks / (repeats * microbatches)
    measured = statistics.median(p / b for p, b in zip(piped, plain))
    census = inspect.hlo_census(fwd.compiled.as_text())
    result = {**sched.as_dict(), "expected_ratio": expected, "measured_ratio": measured,
              "overhead": measured / expected - 1,
              "pipelined_s": statistics.median(piped), "baseline_s": statistics.median(plain),
              "collective_permutes": census.count("collective-permute"),
              "compiled_ticks": max(census.loops.values())}
    results.append(result)
    rows.append((stages, microbatches, repeats, sched.ticks, f"{sched.bubble:.1%}",
                 f"{expected:.3f}", f"{measured:.3f}", f"{result['overhead']:+.1%}",
                 f"{result['pipelined_s'] * 1e3:.1f}", f"{result['baseline_s'] * 1e3:.1f}"))
    print(f"  S={stages} M={microbatches} R={repeats}: ratio {measured:.3f} "
          f"(expected {expected:.3f})", flush=True)
  print(inspect.format_table(
      ("S", "M", "R", "ticks", "bubble", "expected", "measured", "overhead", "ms piped",
       "ms base"), rows))

  # What smaller microbatches cost by themselves: the same batch run unpipelined as k
  # separate forward calls of batch/k (data = 8), against one call.
  split = {}
  for k in (2, 4):
    config = dataclasses.replace(base, mesh=config_lib.MeshConfig(data=n, stage=1, model=1),
                                 run=dataclasses.replace(base.run, batch=base.run.batch // k))
    part = inference.build(config, make_mesh(config.mesh, devices=devices), pipelined=False,
                           params=jax.device_get(baseline.params))
    part_tokens = part.tokens(inference.seeded_tokens(config))
    part.compile(part_tokens)
    ratios = [k * block(part, part_tokens) / block(baseline, tokens) for _ in range(args.rounds)]
    split[k] = statistics.median(ratios)
  print("the same batch as k unpipelined calls of batch/k, time vs one call: "
        + ", ".join(f"k={k}: {r:.3f}" for k, r in split.items()))
  write_json(args.out, {"benchmark": "pipeline", "devices": n, "split_calls_ratio": split,
                        "model": dataclasses.asdict(base.model), "batch": base.run.batch,
                        "seq_len": base.run.seq_len, "rounds": args.rounds,
                        "calls": args.calls, "results": results})


if __name__ == "__main__":
  main()
