"""What log-probabilities cost the serving engine's sampled decode step.

The slot decoder's sampled step (`Decoder.step_fn(greedy=False)`) with and without
log-probabilities (`logprobs=True`: the chosen token's and the 20 likeliest, computed on the
devices), at the config's shape on one device by default: `--slots` rows over a `--span`-slot
cache, each row holding the server's table of logit biases (`--bias` entries; the step
applies them and the penalties whatever the rows ask). Each round times a block of each,
alternating; the figure is the best round of each (noise only slows a run) and their ratio.
Goal: within 3%.

  python benchmarks/logprobs.py [--config configs/gpt2.yaml] [--slots 8] [--span 256]

Prints a table and writes JSON to benchmarks/results/logprobs.json.
"""

import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import parser, write_json  # noqa: E402
from jaxpar import config as config_lib  # noqa: E402
from jaxpar import emulate_cpu_devices  # noqa: E402


def main() -> None:
  p = parser(__doc__, config="gpt2.yaml", out="logprobs.json", rounds=5, calls=10)
  p.add_argument("--slots", type=int, default=8)
  p.add_argument("--span", type=int, default=256)
  p.add_argument("--bias", type=int, default=None,
                 help="Bias entries per row (default: the server's, for the model's EOS ids)")
  args = p.parse_args()
  cfg = config_lib.load(args.config, ["mesh.data=1", "mesh.stage=1", "mesh.model=1",
                                      *args.set])
  emulate_cpu_devices(1)  # no accelerator: one CPU device
  import jax

  from jaxpar.mesh import make_mesh
  from jaxpar.runtime import generate
  from jaxpar.runtime.decoder import Decoder
  mesh = make_mesh(cfg.mesh, devices=jax.devices()[:1])
  from jaxpar.serve.shapes import bias_entries
  gen = generate.build(cfg, mesh)
  args.bias = bias_entries(gen.eos_ids) if args.bias is None else args.bias
  decoder = Decoder(gen, args.slots, args.span, bias=args.bias)
  with jax.set_mesh(mesh):
    steps = {lp: decoder.jit(decoder.step_fn(greedy=False, span=args.span, logprobs=lp))
             for lp in (False, True)}
    state = decoder.empty_state()
    for step in steps.values():  # compile and warm
      out, state = step(gen.params, state)
    times: dict = {False: [], True: []}
    for _ in range(args.rounds):
      for lp, step in steps.items():
        start = time.perf_counter()
        for _ in range(args.calls):
          out, state = step(gen.params, state)
        jax.block_until_ready(out)
        times[lp].append((time.perf_counter() - start) / args.calls)
  best = {lp: min(t) for lp, t in times.items()}
  ratio = best[True] / best[False]
  print(f"sampled decode step, {args.slots} slots over {args.span} positions, "
        f"{args.bias} bias entries per row, "
        f"{jax.devices()[0].platform}")
  print(f"{'':16}{'best ms':>9}  rounds (ms)")
  for lp, name in ((False, "tokens only"), (True, "with logprobs")):
    print(f"{name:16}{best[lp] * 1e3:9.2f}  " + " ".join(f"{t * 1e3:.1f}" for t in times[lp]))
  print(f"ratio {ratio:.3f} (goal <= 1.03)")
  write_json(args.out, {"benchmark": "logprobs", "config": args.config, "slots": args.slots,
                        "span": args.span, "bias": args.bias, "device": jax.devices()[0].platform,
                        "seconds": {"tokens": times[False], "logprobs": times[True]},
                        "best_seconds": {"tokens": best[False], "logprobs": best[True]},
                        "ratio": ratio})


if __name__ == "__main__":
  main()
