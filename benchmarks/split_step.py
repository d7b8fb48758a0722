"""What splitting the sampled decode step costs: the server's two programs (`forward_fn`, then
`choice_fn`, so that grammars' masks are computed while the forward runs) against the same
step compiled as one program (`step_fn`, as `generate` runs it), in the same run; and what
the top-k and top-p searches cost when a row asks for them (they are skipped when none does,
as with OpenAI's defaults).

The engine at the config's shape (GPT-2 124M by default) on one CPU device, 8 slots, the
widest attention span; rounds of `--calls` steps alternate, and each figure is the best
round's time per step.

  python benchmarks/split_step.py [--config configs/gpt2.yaml]

Prints a table and writes JSON to benchmarks/results/split_step.json.
"""

import dataclasses
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import parser, write_json  # noqa: E402
from jaxpar import config as config_lib  # noqa: E402
from jaxpar import emulate_cpu_devices  # noqa: E402


def main() -> None:
  args = parser(__doc__, config="gpt2.yaml", out="split_step.json", rounds=5,
                calls=20).parse_args()
  cfg = config_lib.load(args.config, ["mesh.data=1", "mesh.stage=1", "mesh.model=1",
                                      "serve.max_slots=8", "serve.max_len=128",
                                      "generate.eos_id=-1", *args.set])
  emulate_cpu_devices(1)
  import jax

  from jaxpar import serve
  from jaxpar.mesh import make_mesh
  engine = serve.build(cfg, make_mesh(cfg.mesh, devices=jax.devices()[:1]))
  runner, d, params = engine.runner, engine.runner.decoder, engine.generator.params
  span, rows = runner.spans[-1], runner.rows[-1]  # every slot
  allowed = runner._open[runner.slots]
  with jax.set_mesh(engine.generator.mesh):
    one = d.jit(d.step_fn(greedy=False, span=span, logprobs=True)).lower(
        params, d.empty_state(abstract=True), allowed).compile()
  forward, choice = runner.compiled["forward", span, rows], runner.compiled["choose", rows]

  def fused(state):
    return one(params, state, allowed)

  def split(state):
    logits, state = forward(params, state)
    return choice(params, state, logits, allowed)

  def top_p(state, value: float):  # row 0's top_p
    rows = state.slots
    sampling = dataclasses.replace(rows.sampling, top_p=rows.sampling.top_p.at[0].set(value))
    return dataclasses.replace(state, slots=dataclasses.replace(rows, sampling=sampling))
  modes = {"one program (step_fn)": fused, "forward, then choice": split,
           "forward, then choice; a row with top_p 0.9": split}
  state, times = d.empty_state(), {m: [] for m in modes}
  for rnd in range(args.rounds + 1):  # the first round warms up
    for mode, step in modes.items():
      state = top_p(state, 0.9 if "top_p" in mode else 1.0)
      start = time.perf_counter()
      for _ in range(args.calls):
        out, state = step(state)
      jax.block_until_ready(out)
      if rnd:
        times[mode].append((time.perf_counter() - start) / args.calls)
  best = {m: min(t) for m, t in times.items()}
  base = best["one program (step_fn)"]
  print(f"sampled decode step, 8 slots, span {span}, {jax.devices()[0].platform}")
  print("| program | ms per step (best round) | rounds (ms) | vs one program |")
  print("|---|---|---|---|")
  for m, t in times.items():
    print(f"| {m} | {best[m] * 1e3:.2f} | {', '.join(f'{x * 1e3:.2f}' for x in t)} | "
          f"{best[m] / base:.3f}x |")
  write_json(args.out, {"benchmark": "split_step", "config": args.config, "span": span,
                        "step_s": times, "ratio": best["forward, then choice"] / base,
                        "searches": best["forward, then choice; a row with top_p 0.9"]
                        / best["forward, then choice"]})


if __name__ == "__main__":
  main()
