"""A decode step's products weights first (jaxpar's `times_rows`: w @ x.T, then the small
transpose) against activations first (x @ w.T, as before), in one process on one CPU device:
the same model and prompts, interleaved rounds, the best of each; tokens must be identical.

  python benchmarks/decode_layout.py [--config gpt2] [--batches 1 8 32] [--set KEY=VALUE]

Prints a table and writes JSON to benchmarks/results/decode_layout[_CONFIG].json.
"""

import argparse
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_json  # noqa: E402
from jaxpar import emulate_cpu_devices  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="gpt2", help="a file in configs/ (without .yaml)")
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
  parser.add_argument("--prompt-len", type=int, default=16)
  parser.add_argument("--new-tokens", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--set", action="append", default=[])
  args = parser.parse_args()
  emulate_cpu_devices(1)
  import jax
  import jax.numpy as jnp

  from jaxpar import config as config_lib
  from jaxpar import inspect
  from jaxpar.mesh import make_mesh
  from jaxpar.models import base
  from jaxpar.runtime import generate

  config = config_lib.load(ROOT / "configs" / f"{args.config}.yaml", [
      "mesh.data=1", "mesh.stage=1", "mesh.model=1", *args.set])
  mesh = make_mesh(config.mesh, devices=jax.devices("cpu")[:1])
  layouts = {"weights first": base.times_rows,
             "activations first": lambda x, w: jnp.einsum("btd,od->bto", x, w)}
  rows, results = [], []
  for batch in args.batches:
    prompts = np.random.default_rng(batch).integers(
        0, config.model.vocab_size, (batch, args.prompt_len)).tolist()
    gens = {}
    for name, product in layouts.items():  # traced (and compiled) with `product` in place
      base.times_rows = product
      gens[name] = generate.build(config, mesh, eos_id=-1)
      gens[name].generate(prompts, max_new_tokens=args.new_tokens)
    base.times_rows = layouts["weights first"]
    best, tokens, rounds = dict.fromkeys(layouts, 0.0), {}, []
    for _ in range(args.rounds):
      for name, gen in gens.items():
        result = gen.generate(prompts, max_new_tokens=args.new_tokens)
        tokens[name] = result.tokens
        speed = batch * (result.steps - 1) / result.decode_s
        best[name] = max(best[name], speed)
        rounds.append((name, speed))
    same = np.array_equal(*tokens.values())
    ratio = best["weights first"] / best["activations first"]
    rows.append((batch, f"{best['activations first']:.1f}", f"{best['weights first']:.1f}",
                 f"{ratio:.2f}x", "yes" if same else "NO"))
    results.append({"batch": batch, "tokens_per_s": best, "ratio": ratio,
                    "same_tokens": bool(same), "rounds": rounds})
    print(f"  batch {batch}: done", flush=True)
  print(inspect.format_table(("batch", "activations first tok/s", "weights first tok/s",
                              "ratio", "same tokens"), rows))
  suffix = "" if args.config == "gpt2" else f"_{args.config}"
  write_json(ROOT / "benchmarks" / "results" / f"decode_layout{suffix}.json",
             {"benchmark": "decode_layout", "config": args.config, "sets": args.set,
              "jax": jax.__version__, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "results": results})
  if not all(r["same_tokens"] for r in results):
    sys.exit("the two layouts gave different tokens")


if __name__ == "__main__":
  main()
