"""Where a decode step's time goes on one CPU device: XLA:CPU's own trace of the operations
(`jax.profiler`) of jaxpar's compiled decode loop, at the GPT-2 124M shape (seeded weights),
float32, batches 1, 8 and 32, 32-token prompts, 64 new tokens, against the speed of light
(`limits.speed_of_light`) of the same weights measured in the same run.

Each operation the loop ran is put in one class by its HLO (the compiled program's text):
- weight products: a product without batch dimensions (a weight of a block, or the
  vocabulary head);
- attention: the per-head products of queries with the cached keys and of the softmax
  weights with the cached values, and the softmax between them;
- cache writes: the updates of the KV caches in place;
- the rest: layer norms, activations, residuals, the greedy choice, the loop's own.

XLA:CPU runs an operation on several threads, so each class's busy time is shared out over
the loop's wall-clock time (`threads busy`: how many threads worked on average, for the loop
and for the speed-of-light chain). The weight products' share alone gives the tokens/s the
step would reach if it did nothing else (`weight products tok/s`), to hold against the
chain; the other classes are what a decode step does that the chain does not.

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


def classify(name: str, table: dict) -> str:
  """The class of the operation `name` (a thunk of the trace) by its HLO opcodes (its own
  and, for a fusion, those of the computation it calls): a product without batch dimensions
  multiplies by a weight; one with them (per head) is attention, as is what jaxpar's
  attention names (the softmax); an in-place update or scatter writes a cache."""
  line = table.get(name) or table.get(name.split(":")[0])
  if line is None:
    return "the rest"
  body = [line] + [l for called in re.findall(r"calls=%?([\w.\-]+)", line)
                   for l in table.get(("computation", called), [])]
  ops = [(opcode(l), l) for l in body]
  dots = [l for op, l in ops if op == "dot"]
  if any("lhs_batch_dims" not in l for l in dots):
    return "weight products"
  if any(op in ("dynamic-update-slice", "scatter") for op, _ in ops):
    return "cache writes"
  if dots or "/attn/" in line:
    return "attention"
  return "the rest"


def opcode(line: str) -> str:
  """The opcode of an HLO instruction's text (after its result type)."""
  m = re.search(r"\s([a-z][\w\-]*)\(", " " + line)
  return m.group(1) if m else ""


def profile(gen, prompts, new_tokens: int) -> dict:
  """{class: seconds of a decode step} from a trace of one generate (the threads' busy time
  in each class, shared out over the loop's wall-clock time), and the step's seconds."""
  gen.generate(prompts, max_new_tokens=new_tokens)  # compiled, warm
  (_, _, decode, _), = [v for k, v in gen._compiled.items() if k[0] == len(prompts)]
  table = instructions(decode.as_text())
  result, (lines, loop) = traced(lambda: gen.generate(prompts, max_new_tokens=new_tokens))
  seconds, names = collections.Counter(), collections.Counter()
  for line in lines:
    for event in line.events:
      if not working(event, loop):
        continue
      kind = classify(event.name, table)
      seconds[kind] += event.duration_ns / 1e9
      names[kind, event.name] += event.duration_ns / 1e9
  # The threads' busy time, shared out over the loop's wall-clock time by class.
  steps, busy = result.steps - 1, sum(seconds.values())
  wall = loop.duration_ns / 1e9 / steps
  return {"decode_s_per_step": result.decode_s / steps, "loop_s_per_step": wall,
          "threads_busy": busy / (loop.duration_ns / 1e9),
          "s_per_step": {k: wall * seconds[k] / busy for k in CLASSES},
          "top": {k: [(n, s / steps) for (c, n), s in names.most_common() if c == k][:6]
                  for k in CLASSES}}


def traced(fn):
  """fn()'s result, XLA's threads in a trace of it (`tf_XLA*` lines) and the longest program
  run among them (a generate's decode loop)."""
  import jax
  from jax.profiler import ProfileData
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    out = jax.block_until_ready(fn())
    jax.profiler.stop_trace()
    data = ProfileData.from_file(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[0])
  lines = [line for plane in data.planes for line in plane.lines
           if line.name.startswith("tf_XLA")]
  loop = max((e for line in lines for e in line.events
              if e.name.startswith("ThunkExecutor::Execute")), key=lambda e: e.duration_ns)
  return out, (lines, loop)


def working(event, loop) -> bool:
  """An operation run inside `loop` (the pool's own events, waits and regions, left out)."""
  return (not event.name.startswith(("end:", "Thunk", "ThreadpoolListener", "SlinkyThreadPool"))
          and loop.start_ns <= event.start_ns < loop.start_ns + loop.duration_ns)


def threads_busy(fn) -> float:
  """How many of XLA's threads were working on average over the longest program fn() runs."""
  _, (lines, loop) = traced(fn)
  return sum(e.duration_ns for line in lines for e in line.events
             if working(e, loop)) / loop.duration_ns


def light_busy(gen, batch: int, steps: int, layout: str) -> float:
  """`threads_busy` of the speed-of-light chain in `layout`."""
  import jax
  import jax.numpy as jnp
  mats, head = limits.weight_matrices(gen)
  weights = jax.device_put(limits.chain_weights(mats, head, layout), jax.devices("cpu")[0])
  D = head.shape[1]
  x = jnp.ones((batch, D) if layout != "W @ h" else (D, batch), jnp.float32)
  chain = limits.chain_program(mats, head, steps, layout).lower(weights, x).compile()
  chain(weights, x).block_until_ready()
  return threads_busy(lambda: chain(weights, x))


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
  results = []
  for batch in args.batches:
    prompts = np.random.default_rng(batch).integers(
        0, config.model.vocab_size, (batch, args.prompt_len)).tolist()
    start = time.perf_counter()
    light = limits.speed_of_light(gen, batch, args.new_tokens)
    out = profile(gen, prompts, args.new_tokens)
    fastest = max(light, key=light.get)
    out.update(light_layout=fastest,
               light_threads_busy=light_busy(gen, batch, args.new_tokens, fastest))
    out.update(batch=batch, speed_of_light_tokens_per_s=max(light.values()),
               speed_of_light=light, seconds=time.perf_counter() - start)
    results.append(out)
    print(f"  batch {batch}: done", flush=True)
  rows = []
  for r in results:
    t, B = r["s_per_step"], r["batch"]
    rows.append((B, f"{B / r['decode_s_per_step']:.1f}", f"{r['speed_of_light_tokens_per_s']:.1f}",
                 f"{r['decode_s_per_step'] * 1e3:.2f}",
                 f"{r['threads_busy']:.2f} / {r['light_threads_busy']:.2f}",
                 *(f"{t[k] * 1e3:.2f}" for k in CLASSES),
                 f"{B / t['weight products']:.1f}"))
  print(inspect.format_table(
      ("batch", "decode tok/s", "speed of light", "step ms", "threads busy (light)",
       *(f"{k} ms" for k in CLASSES), "weight products tok/s"), rows))
  for r in results:
    for k in CLASSES[1:]:
      print(f"  batch {r['batch']}, {k}, the longest per step: " + "; ".join(
          f"{n} {s * 1e3:.2f} ms" for n, s in r["top"][k]))
  write_json(args.out, {"benchmark": "decode_profile", "jax": jax.__version__,
                        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                        "results": results})


if __name__ == "__main__":
  main()
