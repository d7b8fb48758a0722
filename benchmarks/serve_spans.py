"""Which attention spans pay in the serving engine's decode step: each span program's time
against the step over the whole cache, on one CPU device.

A seeded Llama-family model (width 768, 12 query heads of 64, 4 layers, vocabulary 8192) on 8
slots, for caches of `--shapes` positions x key/value heads. Every span the rule could offer
(doubling from length / 8 up to three quarters of the length) is compiled, and each is timed
in `--rounds` interleaved rounds of 10 steps (best round kept: noise only slows a run). The
table gives ms per step, each span's slice of one cache leaf on the device, and whether
`serve.shapes.spans` keeps it (the shortest; past it, a span whose slice is at most
`SPAN_SLICE`).

  python benchmarks/serve_spans.py [--shapes 1024x12 2048x12 2048x4 4096x4] [--rounds 4]

Writes JSON to benchmarks/results/serve_spans.json.
"""

import argparse
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_json  # noqa: E402
from jaxpar import emulate_cpu_devices  # noqa: E402


def measure(length: int, kv: int, rounds: int) -> dict:
  import jax

  from jaxpar import config as config_lib
  from jaxpar import serve
  from jaxpar.mesh import make_mesh
  from jaxpar.serve import engine as engine_lib
  from jaxpar.serve import shapes
  config = config_lib.load(ROOT / "configs" / "tiny.yaml", [
      "mesh.data=1", "mesh.model=1", "mesh.stage=1", "mesh.cpu_devices=1",
      "model.family=llama", "model.d_model=768", "model.n_heads=12", f"model.n_kv_heads={kv}",
      "model.d_ff=2048", "model.vocab_size=8192", "model.n_layers=4",
      f"model.max_seq_len={length}", "serve.max_slots=8", f"serve.max_len={length}",
      "generate.eos_id=-1", "serve.precompile=false"])
  slice_bytes, shapes.SPAN_SLICE = shapes.SPAN_SLICE, 1 << 62  # every span, to time them all
  try:
    engine = serve.build(config, make_mesh(config.mesh, devices=jax.devices()[:1]),
                         progress=False)
  finally:
    shapes.SPAN_SLICE = slice_bytes
  runner, gen = engine.runner, engine.generator
  kept = engine_lib.decode_spans(config, gen, length)
  position = gen.cache_bytes_per_device(8, length) // (2 * config.model.n_layers * length)
  rows = runner.rows[-1]
  best = {span: float("inf") for span in runner.spans}
  for _ in range(rounds):
    for span in runner.spans:
      program = runner.compiled["decode", True, span, rows]
      out, state = program(gen.params, runner._state)
      jax.block_until_ready(out)
      start = time.perf_counter()
      for _ in range(10):
        out, state = program(gen.params, state)
      jax.block_until_ready(out)
      best[span] = min(best[span], (time.perf_counter() - start) / 10)
      runner._state = state
  return {"length": length, "kv_heads": kv, "spans": [
      {"span": span, "ms": best[span] * 1e3, "slice_mib": span * position / 2**20,
       "kept": span in kept} for span in runner.spans]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", nargs="+", default=["1024x12", "2048x12", "2048x4", "4096x4"],
                      help="positions x key/value heads")
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                           "serve_spans.json"))
  args = parser.parse_args()
  emulate_cpu_devices(1)
  results = []
  print("| positions | kv heads | span | ms/step | vs whole | slice MiB | kept |")
  print("|---|---|---|---|---|---|---|")
  for shape in args.shapes:
    length, kv = map(int, shape.split("x"))
    r = measure(length, kv, args.rounds)
    whole = r["spans"][-1]["ms"]
    for s in r["spans"]:
      print(f"| {length} | {kv} | {s['span']} | {s['ms']:.2f} | {s['ms'] / whole:.2f}x | "
            f"{s['slice_mib']:.1f} | {'yes' if s['kept'] else 'no'} |", flush=True)
    results.append(r)
  write_json(args.out, {"args": vars(args), "results": results})


if __name__ == "__main__":
  main()
