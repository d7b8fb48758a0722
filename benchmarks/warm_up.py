"""What a served program's first run costs, with and without the start-up warm-up: each
greedy decode step of a serving engine (per attention span, at 1 and all rows) called three
times in a row right after its engine was built, on one CPU device.

A seeded Llama-family model of GPT-2 124M's shape (width 768, 12 layers, 12 heads, 4
key/value heads, vocabulary 8192) on 8 slots of 512 positions. "compiled" builds the engine
with `serve.precompile=false` and then compiles every program (`Programs.compile_all`), as
the engine did before the warm-up; "warmed" runs `Runner.compile_all`, which also runs each
program once (`serve.compiled.warm_up`), as `serve.precompile=true` (the default) does. The
table gives ms per call; the first call is what the first request of that shape waits.

  python benchmarks/warm_up.py

Writes JSON to benchmarks/results/warm_up.json.
"""

import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_json  # noqa: E402
from jaxpar import emulate_cpu_devices  # noqa: E402


def calls(warm: bool) -> dict:
  import jax

  from jaxpar import config as config_lib
  from jaxpar import serve
  from jaxpar.mesh import make_mesh
  config = config_lib.load(ROOT / "configs" / "tiny.yaml", [
      "mesh.data=1", "mesh.model=1", "mesh.stage=1", "mesh.cpu_devices=1",
      "model.family=llama", "model.d_model=768", "model.n_heads=12", "model.n_kv_heads=4",
      "model.d_ff=2048", "model.vocab_size=8192", "model.n_layers=12",
      "model.max_seq_len=512", "serve.max_slots=8", "serve.max_len=512",
      "generate.eos_id=-1", "serve.precompile=false"])
  runner = serve.build(config, make_mesh(config.mesh, devices=jax.devices()[:1]),
                       progress=False).runner
  start = time.perf_counter()
  runner.compile_all(progress=False) if warm else runner.compiled.compile_all()
  ready = time.perf_counter() - start
  out = {"ready_s": round(ready, 2), "steps": {}}
  for span in runner.spans:
    for rows in (runner.rows[-1], 1):
      program, times = runner.compiled["decode", True, span, rows], []
      for _ in range(3):
        t = time.perf_counter()
        tokens, runner._state = program(runner.generator.params, runner._state)
        jax.block_until_ready(tokens)
        times.append(round((time.perf_counter() - t) * 1e3, 1))
      out["steps"][f"{span}x{rows}"] = times
  return out


def main():
  emulate_cpu_devices(1)
  results = {name: calls(warm) for name, warm in (("compiled", False), ("warmed", True))}
  print("\n| span x rows | compiled: 1st / 2nd / 3rd call, ms | warmed: 1st / 2nd / 3rd, ms |")
  print("|---|---|---|")
  for key in results["compiled"]["steps"]:
    cells = [" / ".join(map(str, results[n]["steps"][key])) for n in ("compiled", "warmed")]
    print(f"| {key} | {cells[0]} | {cells[1]} |")
  print(f"ready after {results['compiled']['ready_s']} s (compiled) and "
        f"{results['warmed']['ready_s']} s (warmed: compiled and run once)")
  write_json(str(ROOT / "benchmarks" / "results" / "warm_up.json"), results)


if __name__ == "__main__":
  main()
