"""Where a decode step's time goes on one CPU device: XLA:CPU's own trace of the operations
(`jax.profiler`) of jaxpar's compiled decode loop, at the GPT-2 124M shape (seeded weights),
float32, batches 1, 8 and 32, 32-token prompts, 64 new tokens, against the speed of light
(`limits.speed_of_light`) of the same weights measured in the same run.

Each operation the loop ran is put in one class by its HLO (the compiled program's text):
- weight products: a product with a 2-D weight of a block or the vocabulary head;
- attention: the products of queries with the cached keys and of the weights with the
  cached values, and the softmax between them;
- cache writes: the updates of the KV caches in place;
- the rest: layer norms, activations, residuals, the greedy choice, the loop's own.

The weight products alone, summed over the trace, give the step's time at the speed of
light of its own products (`weight products` tok/s); the other classes are what a decode step
does that the speed-of-light chain does not.

  python benchmarks/decode_profile.py [--batches 1 8 32] [--set model.scan_layers=true]

Prints a table and writes JSON to benchmarks/results/decode_profile.json.
"""

import argparse
import collections
import glob
import pathlib
import re
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import limits  # noqa: E402
from benchmarks.common import write_json  # noqa: E402
from jaxpar import emulate_cpu_devices  # noqa: E402

CLASSES = ("weight products", "attention", "cache writes", "the rest")


def instructions(hlo: str) -> dict:
  """{instruction name: its line} of every instruction in compiled HLO text, and
  {computation name: its lines} under the key of each computation."""
  out, body = {}, None
  for line in hlo.splitlines():
    head = re.match(r"\s*(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if head and "=" not in line.split("{")[0]:
      body = out.setdefault(("computation", head.group(1)), [])
      continue
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)$", line)
    if m:
      out[m.group(1)] = m.group(2)
      if body is not None:
        body.append(m.group(2))
  return out


def classify(name: str, table: dict, weight_shapes: set, span: int) -> str:
  """The class of the operation `name` (a thunk of the trace) by its HLO."""
  line = table.get(name) or table.get(name.split(":")[0])
  if line is None:
    return "the rest"
  lines = [line]
  for called in re.findall(r"calls=%?([\w.\-]+)", line):
    lines += table.get(("computation", called), [])
  text = "\n".join(lines)
  dots = re.findall(r"dot\((.*?)\)", text)
  shapes = set(re.findall(r"f32\[([\d,]+)\]", text))
  if dots and shapes & weight_shapes:
    return "weight products"
  if "dynamic-update-slice" in text or "scatter(" in text:
    return "cache writes"
  if any(str(span) in s.split(",") for s in shapes) and (dots or "exponential" in text):
    return "attention"
  return "the rest"


def profile(gen, prompts, new_tokens: int, weight_shapes: set) -> dict:
  """{class: seconds per decode step} from a trace of one generate, and the step's
  wall-clock seconds."""
  import jax
  from jax.profiler import ProfileData
  gen.generate(prompts, max_new_tokens=new_tokens)  # compiled, warm
  (_, _, decode), = [v for k, v in gen._compiled.items() if k[0] == len(prompts)]
  table = instructions(decode.as_text())
  span = len(prompts[0]) + new_tokens
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    result = gen.generate(prompts, max_new_tokens=new_tokens)
    jax.profiler.stop_trace()
    data = ProfileData.from_file(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[0])
  seconds, names = collections.Counter(), collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if not line.name.startswith("tf_XLA"):
        continue
      for event in line.events:
        if event.name.startswith(("end:", "Thunk", "ThreadpoolListener")):
          continue
        kind = classify(event.name, table, weight_shapes, span)
        seconds[kind] += event.duration_ns / 1e9
        names[kind, event.name] += event.duration_ns / 1e9
  steps = result.steps - 1
  return {"decode_s_per_step": result.decode_s / steps,
          "traced_s_per_step": {k: seconds[k] / result.steps for k in CLASSES},
          "top": [(k, n, s / result.steps) for (k, n), s in names.most_common(12)]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
  parser.add_argument("--prompt-len", type=int, default=32)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--set", action="append", default=[])
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                           "decode_profile.json"))
  args = parser.parse_args()
  emulate_cpu_devices(1)
  import jax

  from jaxpar import config as config_lib
  from jaxpar import inspect
  from jaxpar.mesh import make_mesh
  from jaxpar.runtime import generate

  config = config_lib.load(ROOT / "configs" / "gpt2.yaml", ["mesh.data=1", "mesh.model=1",
                                                            *args.set])
  gen = generate.build(config, make_mesh(config.mesh, devices=jax.devices("cpu")[:1]),
                       eos_id=-1)
  mats, head = limits.weight_matrices(gen)
  weight_shapes = {",".join(map(str, w.shape)) for w in [head, *mats[0]]}
  results = []
  for batch in args.batches:
    prompts = np.random.default_rng(batch).integers(
        0, config.model.vocab_size, (batch, args.prompt_len)).tolist()
    start = time.perf_counter()
    light = limits.speed_of_light(gen, batch, args.new_tokens)
    out = profile(gen, prompts, args.new_tokens, weight_shapes)
    out.update(batch=batch, speed_of_light_tokens_per_s=max(light.values()),
               speed_of_light=light, seconds=time.perf_counter() - start)
    results.append(out)
    print(f"  batch {batch}: done", flush=True)
  rows = []
  for r in results:
    t, B = r["traced_s_per_step"], r["batch"]
    rows.append((B, f"{B / r['decode_s_per_step']:.1f}", f"{r['speed_of_light_tokens_per_s']:.1f}",
                 f"{r['decode_s_per_step'] * 1e3:.2f}", f"{sum(t.values()) * 1e3:.2f}",
                 *(f"{t[k] * 1e3:.2f}" for k in CLASSES),
                 f"{B / t['weight products']:.1f}"))
  print(inspect.format_table(
      ("batch", "decode tok/s", "speed of light", "step ms", "traced ms",
       *(f"{k} ms" for k in CLASSES), "weight products tok/s"), rows))
  for r in results:
    print(f"  batch {r['batch']}, the longest operations per step: " + "; ".join(
        f"{n} ({k}) {s * 1e3:.2f} ms" for k, n, s in r["top"][:8]))
  write_json(args.out, {"benchmark": "decode_profile", "jax": jax.__version__,
                        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                        "results": results})


if __name__ == "__main__":
  main()
