"""What `n` choices of one prompt cost the serving engine: the request's n rows queued together
(the prompt prefilled once, the other rows starting from its cached prefix) against n separate
requests of the same prompt on an engine that reuses no prefix (`serve.prefix_reuse` off, as
a server without a prefix cache runs them) and on one that does (jaxpar's default: separate
requests of one prompt share its prefill too).

The engine in this process at the config's shape (GPT-2 124M by default) on one CPU device,
`--slots` rows; each round gives every mode a fresh random prompt of `--prompt` tokens and
times until all `--n` streams of `--max-tokens` sampled tokens are done; modes alternate and
the figure is the best round of each (noise only slows a run). Goal: n=8 at least 1.5x the
throughput of 8 separate requests.

  python benchmarks/choices.py [--config configs/gpt2.yaml] [--n 8] [--prompt 256]

Prints a table and writes JSON to benchmarks/results/choices.json.
"""

import dataclasses
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import parser, write_json  # noqa: E402
from jaxpar import config as config_lib  # noqa: E402
from jaxpar import emulate_cpu_devices  # noqa: E402

MODES = ("n choices", "separate, no prefix reuse", "separate, prefix reuse")


def main() -> None:
  p = parser(__doc__, config="gpt2.yaml", out="choices.json", rounds=3)
  p.add_argument("--n", type=int, default=8)
  p.add_argument("--slots", type=int, default=8)
  p.add_argument("--prompt", type=int, default=256)
  p.add_argument("--max-tokens", type=int, default=16)
  args = p.parse_args()
  length = args.prompt + args.max_tokens + 16
  cfg = config_lib.load(args.config, ["mesh.data=1", "mesh.stage=1", "mesh.model=1",
                                      f"serve.max_slots={args.slots}",
                                      f"serve.max_len={length}", "generate.eos_id=-1",
                                      *args.set])
  emulate_cpu_devices(1)
  import jax

  from jaxpar import serve
  from jaxpar.mesh import make_mesh
  engine = serve.build(cfg, make_mesh(cfg.mesh, devices=jax.devices()[:1])).start()
  rng = np.random.default_rng(0)
  params = serve.Params(max_tokens=args.max_tokens, temperature=1.0, seed=1)

  def run(mode: str) -> float:
    prompt = rng.integers(0, engine.vocab_size, args.prompt).tolist()
    engine.scheduler.prefix_reuse = mode != "separate, no prefix reuse"
    each = [dataclasses.replace(params, choice=i) if mode == "n choices" else params
            for i in range(args.n)]
    start = time.perf_counter()
    streams = [engine.submit(prompt, p) for p in each]
    for stream in streams:
      stream.result()
    return time.perf_counter() - start

  try:
    for mode in MODES:  # warm: every program has run once
      run(mode)
    times: dict = {m: [] for m in MODES}
    for _ in range(args.rounds):
      for mode in MODES:
        times[mode].append(run(mode))
  finally:
    engine.stop()
  best = {m: min(t) for m, t in times.items()}
  tokens = args.n * args.max_tokens
  base = best["separate, no prefix reuse"]
  print(f"{args.n} choices of a {args.prompt}-token prompt, {args.max_tokens} sampled tokens "
        f"each, {args.slots} slots, {jax.devices()[0].platform}")
  print(f"| {'':26} | best s | tokens/s | vs separate, no reuse | rounds (s)")
  print("|---|---|---|---|---|")
  for mode in MODES:
    print(f"| {mode:26} | {best[mode]:6.3f} | {tokens / best[mode]:8.1f} | "
          f"{base / best[mode]:5.2f}x | " + " ".join(f"{t:.3f}" for t in times[mode]))
  print(f"n choices: {base / best['n choices']:.2f}x the throughput of {args.n} separate "
        f"requests without prefix reuse (goal >= 1.5x)")
  write_json(args.out, {"benchmark": "choices", "config": args.config, "n": args.n,
                        "prompt": args.prompt, "max_tokens": args.max_tokens,
                        "slots": args.slots, "device": jax.devices()[0].platform,
                        "seconds": times, "best_seconds": best,
                        "ratio": base / best["n choices"]})


if __name__ == "__main__":
  main()
