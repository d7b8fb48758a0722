"""Images/s of the CNN classifier for each layout against one device, in one run.

Every layout runs the same parameters (initialised once on one device, then placed on each
mesh) on the same seeded batch; each is checked against the one-device logits, and timed in
interleaved rounds (each round times a block of calls of every layout), so load from other
processes spreads over all of them. The speed-up is the median over rounds of one-device
seconds / layout seconds per batch.

  python benchmarks/vision.py [--config configs/cnn.yaml] [--set k=v ...] [--rounds 5]

Prints a table and writes JSON to benchmarks/results/vision.json.
"""

import os
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import parser, time_block, write_json  # noqa: E402
from jaxpar import config as config_lib  # noqa: E402
from jaxpar import emulate_cpu_devices  # noqa: E402
from jaxpar.cli import pick_devices  # noqa: E402

SPATIAL = ["rules.height=stage"]
# name -> (data, stage, model, overrides)
LAYOUTS = {
    "1 device": (1, 1, 1, []),
    "data=8": (8, 1, 1, []),
    "model=8 (channels)": (1, 1, 8, []),
    "stage=8 (height strips)": (1, 8, 1, SPATIAL),
    "data=2 x model=4": (2, 1, 4, []),
    "data=2 x stage=4 (strips)": (2, 4, 1, SPATIAL),
    "data=2 x stage=2 x model=2": (2, 2, 2, SPATIAL),
}


def main() -> None:
  args = parser(__doc__, config="cnn.yaml", out="vision.json").parse_args()
  config = config_lib.load(args.config, args.set)
  emulate_cpu_devices(config.mesh.cpu_devices)

  import jax
  import numpy as np

  from jaxpar import inspect
  from jaxpar.mesh import make_mesh
  from jaxpar.runtime import vision

  devices, note = pick_devices(config.mesh, "auto")
  if note:
    print(note)
  host_images = vision.seeded_images(config)
  runs, params, expected = {}, None, None
  for name, (data, stage, model, overrides) in LAYOUTS.items():
    cfg = config_lib.apply_overrides(
        config, [f"mesh.data={data}", f"mesh.stage={stage}", f"mesh.model={model}",
                 *overrides])
    mesh = make_mesh(cfg.mesh, devices=devices[:data * stage * model])
    clf = vision.build(cfg, mesh, params=params)
    params = jax.device_get(clf.params) if params is None else params
    images = clf.images(host_images)
    start = time.perf_counter()
    compiled = clf.compile(images)
    compile_s = time.perf_counter() - start
    logits = np.asarray(clf(images))
    expected = logits if expected is None else expected
    runs[name] = {"clf": clf, "images": images, "compile_s": compile_s,
                  "max_abs_diff": float(np.abs(logits - expected).max()),
                  "collectives": inspect.hlo_census(compiled.as_text()).counts(),
                  "seconds": []}

  for r in range(args.rounds):
    order = list(runs) if r % 2 == 0 else list(reversed(runs))
    for name in order:
      run = runs[name]
      run["seconds"].append(time_block(lambda: run["clf"](run["images"]), args.calls))

  base = runs["1 device"]["seconds"]
  batch = config.run.batch
  rows, results = [], []
  for name, run in runs.items():
    step = statistics.median(run["seconds"])
    speedup = statistics.median(b / s for b, s in zip(base, run["seconds"]))
    kinds = ", ".join(f"{k} x{v['count']}" for k, v in run["collectives"].items()) or "none"
    rows.append((name, f"{step * 1e3:.2f}", f"{batch / step:,.0f}", f"{speedup:.2f}",
                 f"{run['max_abs_diff']:.1e}", kinds, f"{run['compile_s']:.2f}"))
    results.append({"layout": name, "mesh": dict(run["clf"].mesh.shape),
                    "rules_overrides": LAYOUTS[name][3], "step_s": step,
                    "images_per_s": batch / step, "speedup_vs_1_device": speedup,
                    "max_abs_diff_vs_1_device": run["max_abs_diff"],
                    "collectives": run["collectives"], "compile_s": run["compile_s"]})
  print(inspect.format_table(("layout", "ms/batch", "images/s", "vs 1 device", "max diff",
                              "collectives", "compile s"), rows))
  out = {"benchmark": "vision", "config": os.path.relpath(args.config, ROOT),
         "overrides": args.set, "batch": batch, "cnn": config_lib.to_dict(config)["cnn"],
         "platform": devices[0].platform, "device_kind": devices[0].device_kind,
         "host_cpus": os.cpu_count(), "rounds": args.rounds, "calls": args.calls,
         "layouts": results}
  write_json(args.out, out)


if __name__ == "__main__":
  main()
