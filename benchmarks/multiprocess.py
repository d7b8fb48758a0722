"""The same config on 1 process x 8 devices, 2 x 4 and 4 x 2, in one run: forward and decode.

Every layout runs `scripts/run.py` (through `scripts/launch_local.py` for more than one
process, jax.distributed over loopback, gloo collectives on CPU) on the same 8 emulated
devices and the same mesh (default.yaml: data=2 x model=4), so the differences are the
processes' own: how the collectives travel (XLA's in-process rendezvous for one process; gloo
over TCP for many, where XLA:CPU routes every collective through gloo, those inside one process
included) and the cores the processes share. The forward runs with unrolled layers, so its
compiled collectives are the ones executed per step; "extra ms per collective" is the step time
above 1 x 8 divided by them. Decode is greedy `generate` (prefill excluded). Layouts are run
interleaved; the best of --rounds is kept.

  python benchmarks/multiprocess.py [--set k=v ...] [--rounds 2]

Prints a table and writes JSON to benchmarks/results/multiprocess.json.
"""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import parser, write_json  # noqa: E402
from jaxpar.inspect import format_table  # noqa: E402

LAYOUTS = ((1, 8), (2, 4), (4, 2))  # (processes, devices per process)
FORWARD = ["model.scan_layers=false", "run.warmup=2"]


def run(processes: int, devices: int, args: list[str], timeout: float = 900) -> dict:
  """One command on `processes` x `devices`; its --json result."""
  run_py = [str(ROOT / "scripts" / "run.py")]
  if processes > 1:
    run_py = [str(ROOT / "scripts" / "launch_local.py"), "--processes", str(processes), "--"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, *run_py, *args, "--devices", str(devices), "--json"],
                        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
  if proc.returncode != 0:
    raise SystemExit(f"{processes} x {devices} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(processes: int, devices: int, config: str, sets: list[str], iters: int,
            new_tokens: int) -> dict:
  overrides = lambda extra: [a for s in [*sets, *extra] for a in ("--set", s)]
  fwd = run(processes, devices, ["forward", "--config", config, "--no-verify",
                                 *overrides([*FORWARD, f"run.iters={iters}"])])
  gen = run(processes, devices, ["generate", "--config", config, "--max-new-tokens",
                                 str(new_tokens), *overrides([])])
  rows = len(gen["new_tokens"])
  return {"forward_step_s": fwd["step_s"], "forward_tokens_per_s": fwd["tokens_per_s"],
          "collectives": fwd["collectives"], "cross_process_axes": fwd["cross_process_axes"],
          "decode_tokens_per_s": rows * (gen["steps"] - 1) / gen["decode_s"],
          "decode_s": gen["decode_s"], "steps": gen["steps"], "rows": rows}


def main() -> None:
  p = parser(__doc__, config="default.yaml", out="multiprocess.json", rounds=2)
  p.add_argument("--iters", type=int, default=20, help="forward calls timed per run")
  p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt")
  args = p.parse_args()
  best: dict[tuple, dict] = {}
  for r in range(args.rounds):
    for layout in LAYOUTS:
      m = measure(*layout, args.config, args.set, args.iters, args.new_tokens)
      print(f"round {r + 1}: {layout[0]} x {layout[1]}: forward {m['forward_tokens_per_s']:,.0f}"
            f" tokens/s, decode {m['decode_tokens_per_s']:,.1f} tokens/s", flush=True)
      old = best.get(layout)
      if old is None or m["forward_step_s"] < old["forward_step_s"]:
        best[layout] = {**m, "decode_tokens_per_s": max(
            m["decode_tokens_per_s"], old["decode_tokens_per_s"] if old else 0.0)}
      else:
        old["decode_tokens_per_s"] = max(old["decode_tokens_per_s"], m["decode_tokens_per_s"])
  print(table(best))
  write_json(args.out, {"config": args.config, "set": args.set, "rounds": args.rounds,
                        "layouts": [{"processes": p, "devices_per_process": d, **best[(p, d)]}
                                    for p, d in LAYOUTS]})


def table(best: dict) -> str:
  base = best[LAYOUTS[0]]
  rows = []
  for layout in LAYOUTS:
    m = best[layout]
    count = sum(c["count"] for c in m["collectives"].values())
    extra = (m["forward_step_s"] - base["forward_step_s"]) * 1e3 / count if count else 0.0
    rows.append((f"{layout[0]} x {layout[1]}", " ".join(m["cross_process_axes"]) or "-",
                 f"{m['forward_tokens_per_s']:,.0f}",
                 f"{m['forward_tokens_per_s'] / base['forward_tokens_per_s']:.2f}",
                 f"{m['decode_tokens_per_s']:,.1f}",
                 f"{m['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}",
                 str(count), "-" if layout == LAYOUTS[0] else f"{extra:.2f}"))
  return format_table(("processes x devices", "crossing", "forward tok/s", "ratio",
                       "decode tok/s", "ratio", "collectives/step", "extra ms/collective"), rows)


if __name__ == "__main__":
  main()
