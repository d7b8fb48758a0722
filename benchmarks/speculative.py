"""Speculative decoding against plain decoding, greedy, on one CPU device, timed in the same
run: tokens/s, acceptance, and passes of the model per token, against the speed of light for
one token per pass (`limits.speed_of_light`: the model's own matrix-vector products over its
weights, nothing else).

The model is GPT-2 124M's shape with random weights (initializer_range 0.2 as `decode.py`, or
`--init-std`; saved by `transformers`), 64 new tokens per row, EOS off. Two workloads:
`random` (random 32-token prompts) and `repeating` (16 random tokens and the first 16 of the
model's own continuation of them: the prompt's continuation is the rest of it, and prompt
lookup guesses whatever spans of the prompt or of itself it repeats). Methods: `none`, `ngram` (k
proposals by prompt lookup), `self` (the model drafts for itself: every proposal accepted, so
it shows what a pass of k + 1 tokens costs against k + 1 passes of one) and `draft` (the
model's first 3 of its 12 layers with its embeddings and head: a quarter of the layers, about
half the weight bytes, GPT-2's embeddings being a third of them; the ratio is in the JSON).
Each round runs every method once, in a rotating order; the best round of each is reported
(noise only slows a run).

  python benchmarks/speculative.py [--batches 1 8] [--k 4] [--rounds 3]

Prints a table and writes JSON to benchmarks/results/speculative.json.
"""

import argparse
import os
import pathlib
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import limits  # noqa: E402
from benchmarks.common import write_json  # noqa: E402
from benchmarks.decode import make_checkpoint  # noqa: E402
from jaxpar import emulate_cpu_devices  # noqa: E402

METHODS = ("none", "ngram", "self", "draft")


def prompts_for(workload: str, gen, batch: int, length: int, seed: int) -> list:
  """`random`: random tokens. `repeating`: a random half-prompt followed by the first half of
  the model's own greedy continuation of it, so the continuation of the whole prompt is known
  to be the rest of that one (greedy decoding is deterministic); whatever spans it repeats
  (of the prompt or of itself) prompt lookup can find."""
  rng = np.random.default_rng(seed)
  vocab = gen.config.model.vocab_size
  if workload == "random":
    return rng.integers(0, vocab, (batch, length)).tolist()
  half = rng.integers(0, vocab, (batch, length // 2))
  said = gen.generate(half.tolist(), max_new_tokens=length - length // 2).tokens
  return np.concatenate([half, said], axis=1).tolist()


def truncated_draft(target: str, out: str, layers: int) -> None:
  """The target's first `layers` blocks with its embeddings and head, saved as a checkpoint
  (a draft that exits early, as LayerSkip's: it shares the model's vocabulary and, unlike an
  unrelated random model, often its choices)."""
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(target)
  model.transformer.h = model.transformer.h[:layers]
  model.config.n_layer = layers
  model.save_pretrained(out)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
  p.add_argument("--workloads", nargs="+", default=["repeating", "random"])
  p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
  p.add_argument("--k", type=int, default=4)
  p.add_argument("--prompt-len", type=int, default=32)
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--init-std", type=float, default=0.2,
                 help="the random weights' initializer_range (GPT-2's own: 0.02)")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speculative.json"))
  args = p.parse_args()
  emulate_cpu_devices(1)

  import jax

  from jaxpar import config as config_lib
  from jaxpar.mesh import make_mesh
  from jaxpar.runtime import generate

  tmp = tempfile.TemporaryDirectory()
  target_dir, draft_dir = os.path.join(tmp.name, "target"), os.path.join(tmp.name, "draft")
  print(f"writing a random GPT-2 checkpoint and its first 3 layers as the draft to "
        f"{tmp.name} ...", flush=True)
  make_checkpoint("gpt2", target_dir, initializer_range=args.init_std)
  truncated_draft(target_dir, draft_dir, layers=3)
  sets = ["mesh.data=1", "mesh.model=1", f"model.checkpoint={target_dir}",
          "generate.eos_id=-1"]
  config = config_lib.load(ROOT / "configs" / "gpt2.yaml", sets)
  mesh = make_mesh(config.mesh, devices=jax.devices("cpu")[:1])
  gen = generate.build(config, mesh, eos_id=-1)
  specs = {}
  for method in args.methods:
    c = config_lib.apply_overrides(config, [
        f"speculative.method={method}", f"speculative.k={args.k}",
        *([f"speculative.draft={draft_dir}"] if method == "draft" else [])])
    specs[method] = generate.speculation(c, gen, mesh)
  rows = []
  for batch in args.batches:
    light = max(max(limits.speed_of_light(gen, batch, args.new_tokens).values())
                for _ in range(args.rounds))
    for workload in args.workloads:
      prompts = prompts_for(workload, gen, batch, args.prompt_len, seed=batch)
      best, results = {}, {}
      runs = list(specs.items())
      for r in range(args.rounds + 1):  # the first round compiles
        for method, spec in runs[r % len(runs):] + runs[:r % len(runs)]:
          res = gen.generate(prompts, max_new_tokens=args.new_tokens, speculation=spec)
          speed = batch * (res.steps - 1) / res.decode_s
          if r:
            best[method] = max(best.get(method, 0), speed)
          results[method] = res
      base = results["none"].tokens
      for method, res in results.items():
        rows.append({
            "batch": batch, "workload": workload, "method": method, "k": args.k,
            "decode_tokens_per_s": best[method],
            "speedup": best[method] / best["none"],
            "of_speed_of_light": best[method] / light, "speed_of_light_tokens_per_s": light,
            "proposed": res.proposed, "accepted": res.accepted,
            "acceptance": res.accepted / max(res.proposed, 1),
            "passes": res.passes, "tokens_per_pass": res.steps / res.passes,
            "tokens_equal_plain": bool(np.array_equal(res.tokens, base))})
      print(f"  batch {batch}, {workload}: done", flush=True)
  print(f"\nGPT-2 124M shape, random weights (initializer_range {args.init_std}), float32, "
        f"one CPU device; k={args.k}, {args.prompt_len}-token prompts, {args.new_tokens} new "
        f"tokens; best of {args.rounds} rounds")
  print("| batch | workload | method | decode tok/s | vs none | of 1-token limit | accepted | "
        "tokens/pass | same tokens |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['batch']} | {r['workload']} | {r['method']} | {r['decode_tokens_per_s']:.1f} "
          f"| {r['speedup']:.2f}x | {r['of_speed_of_light']:.0%} | {r['accepted']}/"
          f"{r['proposed']} | {r['tokens_per_pass']:.2f} | {r['tokens_equal_plain']} |")
  draft = specs.get("draft")
  write_json(args.out, {"benchmark": "speculative", "jax": jax.__version__,
                        "init_std": args.init_std,
                        "draft_weight_bytes_ratio": draft and (
                            draft.draft.param_bytes_per_device() / gen.param_bytes_per_device()),
                        "cpu_count": os.cpu_count(), "rounds": args.rounds, "rows": rows})
  tmp.cleanup()


if __name__ == "__main__":
  main()
