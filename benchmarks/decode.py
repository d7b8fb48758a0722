"""Greedy decoding tokens/s on one CPU device: jaxpar (float32, int8 weights, int8 weights
and activations, int8 KV cache) against Hugging Face transformers and against the speed of
light measured in the same run.

`--family gpt2` (default): the GPT-2 124M shape; `--family llama` (or mistral, qwen2, qwen3): a
Llama-family model of 8 layers, width 1024, 16 query heads over 4 key/value heads, SwiGLU width
2816, vocabulary 32000; `--family mixtral` (or qwen3_moe): the same with 8 SwiGLU experts of
width 1024 in every layer, 2 per token (its speed of light reads the experts a step may choose:
2 at batch 1, `limits.speed_of_light`). Random weights (initializer_range 0.2, so greedy tokens
depend on the context) saved by `transformers` and loaded by both; batches 1, 8 and 32, 32-token
prompts, 64 new tokens, float32, EOS disabled so every row decodes all 64 tokens. Each round
times the speed of light (`limits.speed_of_light`: a compiled chain of the float32 weights'
matrix-vector products and nothing else, at the decode's batch, in each of its layouts, the
fastest taken), the prefill limit (the same products at the prefill's size, the same way), one
`transformers` generate and one generate of each jaxpar variant, rotating their order. The best
round of each (noise only slows a run: a limit must not be beaten by a noisy median), and every
round's figures for the float32 decode and the limit. jaxpar's decode loop alone is reported
against the speed of light, its prefill against the prefill limit; int8 variants are held to the
float32 limits (above 100%: faster than float32 weights can stream). Quality of each variant
against float32: next-token top-1 agreement and the largest logit difference over the prompts of
batch 8 (every position, teacher-forced through the KV cache). The jnp.sum read bandwidth is
kept for reference only: no bound on this machine.

  python benchmarks/decode.py [--family llama] [--rounds 3] [--batches 1 8 32]
  python benchmarks/decode.py --speculative [...]   (runs benchmarks/speculative.py)

Prints a table and writes JSON to benchmarks/results/decode[_FAMILY].json.
"""

import argparse
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import limits  # noqa: E402
from benchmarks.common import write_json  # noqa: E402
from jaxpar import emulate_cpu_devices  # noqa: E402

VARIANTS = {"float32": [], "int8": ["model.quantize=int8"],
            "int8-dynamic": ["model.quantize=int8-dynamic"],
            "int8 KV cache": ["model.kv_cache_dtype=int8"]}


LLAMA_SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                   num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                   max_position_embeddings=2048, initializer_range=0.2,
                   tie_word_embeddings=False)
# Mixtures of experts: the Llama shape with 8 experts of width 1024 in every layer, 2 a token.
MOE_SHAPE = {"mixtral": {**LLAMA_SHAPE, "intermediate_size": 1024, "num_local_experts": 8,
                         "num_experts_per_tok": 2},
             "qwen3_moe": {**LLAMA_SHAPE, "moe_intermediate_size": 1024, "num_experts": 8,
                           "num_experts_per_tok": 2, "norm_topk_prob": True, "head_dim": 64}}
HF_CLASSES = {"gpt2": ("GPT2Config", "GPT2LMHeadModel"),
              "llama": ("LlamaConfig", "LlamaForCausalLM"),
              "mistral": ("MistralConfig", "MistralForCausalLM"),
              "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
              "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
              "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
              "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM")}


def make_checkpoint(family: str, path: str, **changes) -> None:
  """A random checkpoint of the benchmark's shape for `family` (`changes`: to its
  transformers config, e.g. n_layer=3)."""
  import torch
  import transformers
  config_cls, model_cls = (getattr(transformers, n) for n in HF_CLASSES[family])
  args = ({"initializer_range": 0.2} if family == "gpt2" else
          MOE_SHAPE.get(family, LLAMA_SHAPE))
  args = {**args, **changes}
  torch.manual_seed(0)
  model_cls(config_cls(**args)).save_pretrained(path)


def teacher_forced_logits(gen, tokens_BT):
  """float32 logits [B, T, V] at every position, through a fresh KV cache of the generator's
  kind (the prefill's path, so an int8 cache is read back for every position)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxpar.models.base import run_blocks
  from jaxpar.rules import use_rules
  from jaxpar.models.base import causal_step
  from jaxpar.runtime.slots import new_caches
  B, T = tokens_BT.shape

  def run(params, tokens_BT):
    with use_rules(gen.rules, keys=gen.family.config_keys):
      model, graphdef, layers = gen.model_parts(params)
      step = causal_step(B, T, T + 1)
      caches = new_caches(gen, B, T + 1, scan=gen.scan)
      x_BTD = model.embed(tokens_BT, step.positions_BT)
      x_BTD, _ = run_blocks(graphdef, layers, x_BTD, step, caches, scan=gen.scan)
      return model.head(x_BTD)

  with jax.set_mesh(gen.mesh):
    out = jax.jit(run)(gen.params, jnp.asarray(tokens_BT, jnp.int32))
  return np.asarray(out)[..., :gen.config.model.vocab_size]


def quality(gens: dict, tokens_BT) -> dict:
  """Each variant against float32: top-1 agreement and max |logit difference|."""
  import numpy as np
  want = teacher_forced_logits(gens["float32"], tokens_BT)
  out = {}
  for name, gen in gens.items():
    if name == "float32":
      continue
    got = teacher_forced_logits(gen, tokens_BT)
    out[name] = {"top1_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
                 "max_logit_diff": float(np.abs(got - want).max()),
                 "max_abs_logit_float32": float(np.abs(want).max())}
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--family", choices=sorted(HF_CLASSES), default="gpt2")
  parser.add_argument("--checkpoint", help="an existing checkpoint dir of that family "
                                           "(default: a random one in a temporary dir)")
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
  parser.add_argument("--prompt-len", type=int, default=32)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
  parser.add_argument("--set", action="append", default=[],
                      help="jaxpar config overrides, e.g. model.scan_layers=true")
  parser.add_argument("--out", help="JSON path (default benchmarks/results/decode[_FAMILY].json)")
  args = parser.parse_args()
  suffix = "" if args.family == "gpt2" else f"_{args.family}"
  args.out = args.out or str(ROOT / "benchmarks" / "results" / f"decode{suffix}.json")
  if "float32" not in args.variants:
    args.variants.insert(0, "float32")
  emulate_cpu_devices(1)

  import jax
  import torch
  from transformers import AutoModelForCausalLM

  from jaxpar import config as config_lib
  from jaxpar.mesh import make_mesh
  from jaxpar.runtime import generate

  tmp = None
  checkpoint = args.checkpoint
  if checkpoint is None:
    tmp = tempfile.TemporaryDirectory()
    checkpoint = tmp.name
    print(f"writing a random {args.family} checkpoint to {checkpoint} ...", flush=True)
    make_checkpoint(args.family, checkpoint)

  hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
  hf.generation_config.eos_token_id = None
  hf.generation_config.pad_token_id = 0
  weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())

  gens = {}
  for name in args.variants:
    config = config_lib.load(ROOT / "configs" / "gpt2.yaml",
                             ["mesh.data=1", "mesh.model=1", f"model.checkpoint={checkpoint}",
                              "generate.eos_id=-1", *args.set, *VARIANTS[name]])
    mesh = make_mesh(config.mesh, devices=jax.devices("cpu")[:1])
    gens[name] = generate.build(config, mesh, eos_id=-1)
  bandwidth = limits.read_bandwidth()
  print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__}; "
        f"weights {weight_bytes / 1e6:.0f} MB; jnp.sum read bandwidth {bandwidth / 1e9:.1f} "
        f"GB/s; jaxpar layers {'scanned' if gens['float32'].scan else 'unrolled'}", flush=True)
  vocab = gens["float32"].config.model.vocab_size
  tokens = np.random.default_rng(8).integers(0, vocab, (8, args.prompt_len))
  scores = quality(gens, tokens)
  results = [run_batch(args, batch, hf, gens, vocab, weight_bytes, bandwidth)
             for batch in args.batches]
  print_table(args, results, gens, scores)
  write_json(args.out, {
      "benchmark": "decode", "family": args.family, "torch": torch.__version__,
      "jax": jax.__version__, "torch_threads": torch.get_num_threads(),
      "cpu_count": os.cpu_count(), "weight_bytes": weight_bytes,
      "param_bytes_per_device": {n: g.param_bytes_per_device() for n, g in gens.items()},
      "kv_cache_bytes_per_device": {
          n: g.cache_bytes_per_device(8, args.prompt_len + args.new_tokens)
          for n, g in gens.items()},
      "jnp_sum_read_bandwidth": bandwidth, "scan_layers": gens["float32"].scan,
      "rounds": args.rounds, "quality": scores, "results": results})
  if tmp is not None:
    tmp.cleanup()


def run_batch(args, batch: int, hf, gens: dict, vocab: int, weight_bytes: int,
              bandwidth: float) -> dict:
  """One batch: interleaved rounds of the limits, transformers and every jaxpar variant."""
  import torch
  rng = np.random.default_rng(batch)
  prompts = rng.integers(0, vocab, (batch, args.prompt_len))
  ids = torch.tensor(prompts, dtype=torch.long)
  n = args.new_tokens
  times = {name: [] for name in ["transformers", *gens]}
  decode = {name: [] for name in gens}
  prefill = {name: [] for name in gens}
  tokens = {}

  def run_hf():
    with torch.no_grad():
      start = time.perf_counter()
      out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                        do_sample=False)
      times["transformers"].append(time.perf_counter() - start)
      tokens["transformers"] = out[:, args.prompt_len:].numpy()

  def jaxpar(name):
    def run():
      result = gens[name].generate(prompts.tolist(), max_new_tokens=n)
      times[name].append(result.prefill_s + result.decode_s)
      decode[name].append(batch * (result.steps - 1) / result.decode_s)
      prefill[name].append(batch * args.prompt_len / result.prefill_s)
      tokens[name] = result.tokens
    return run

  runs = [run_hf, *(jaxpar(name) for name in gens)]
  for fn in runs:  # compile, warm up
    fn()
  for series in (*times.values(), *decode.values(), *prefill.values()):
    series.clear()
  sol, pre_sol = [], []
  for r in range(args.rounds):
    sol.append(limits.speed_of_light(gens["float32"], batch, n))
    pre_sol.append(limits.prefill_limit(gens["float32"], batch, args.prompt_len))
    for fn in runs[r % len(runs):] + runs[:r % len(runs)]:
      fn()
  light = [max(r.values()) for r in sol]
  layout = max(sol[light.index(max(light))], key=sol[light.index(max(light))].get)
  out = {"batch": batch, "prompt_len": args.prompt_len, "new_tokens": n,
         "speed_of_light_tokens_per_s": max(light), "speed_of_light_layout": layout,
         "speed_of_light_rounds": sol,
         "prefill_limit_tokens_per_s": max(max(r.values()) for r in pre_sol),
         "prefill_limit_rounds": pre_sol,
         "jnp_sum_roofline_tokens_per_s": batch * bandwidth / weight_bytes,
         "transformers_tokens_per_s": batch * n / min(times["transformers"]),
         "float32_tokens_identical_to_transformers":
             bool(np.array_equal(tokens["transformers"], tokens["float32"])),
         "float32_rows_identical_to_transformers":
             int((tokens["transformers"] == tokens["float32"]).all(1).sum()),
         "float32_first_difference_per_row": [
             int(np.argmax(a != b)) if (a != b).any() else None
             for a, b in zip(tokens["transformers"], tokens["float32"])],
         "distinct_tokens_per_row": float(np.mean([len(set(r)) for r in
                                                   tokens["float32"].tolist()])),
         "seconds": times, "jaxpar": {}}
  for name in gens:
    out["jaxpar"][name] = {
        "tokens_per_s": batch * n / min(times[name]),
        "decode_tokens_per_s": max(decode[name]), "decode_rounds": decode[name],
        "decode_of_speed_of_light": max(decode[name]) / max(light),
        "prefill_tokens_per_s": max(prefill[name]),
        "prefill_of_limit": max(prefill[name]) / max(max(r.values()) for r in pre_sol),
        "greedy_tokens_equal_float32": float((tokens[name] == tokens["float32"]).mean())}
  print(f"  batch {batch}: done", flush=True)
  return out


def print_table(args, results: list, gens: dict, scores: dict) -> None:
  from jaxpar import inspect
  rows = []
  for r in results:
    j = r["jaxpar"]
    rows.append((r["batch"], f"{r['transformers_tokens_per_s']:.1f}",
                 *(f"{j[n]['decode_tokens_per_s']:.1f}" for n in gens),
                 f"{r['speed_of_light_tokens_per_s']:.1f}",
                 *(f"{j[n]['decode_of_speed_of_light']:.0%}" for n in gens),
                 "yes" if r["float32_tokens_identical_to_transformers"] else "NO"))
  print(inspect.format_table(
      ("batch", "transformers tok/s", *(f"{n} decode" for n in gens), "speed of light",
       *(f"{n} / light" for n in gens), "float32 tokens = HF"), rows))
  rows = [(r["batch"], *(f"{r['jaxpar'][n]['prefill_tokens_per_s']:.0f}" for n in gens),
           f"{r['prefill_limit_tokens_per_s']:.0f}",
           *(f"{r['jaxpar'][n]['prefill_of_limit']:.0%}" for n in gens)) for r in results]
  print(inspect.format_table(("batch", *(f"{n} prefill" for n in gens), "prefill limit",
                              *(f"{n} / limit" for n in gens)), rows))
  rows = [(n, f"{s['top1_agreement']:.3f}", f"{s['max_logit_diff']:.3f}",
           f"{s['max_abs_logit_float32']:.2f}", f"{gens[n].param_bytes_per_device() / 1e6:.0f}",
           f"{gens[n].cache_bytes_per_device(8, args.prompt_len + args.new_tokens) / 1e6:.1f}")
          for n, s in scores.items()]
  f32 = gens["float32"]
  rows.insert(0, ("float32", "1", "0", "", f"{f32.param_bytes_per_device() / 1e6:.0f}",
                  f"{f32.cache_bytes_per_device(8, args.prompt_len + args.new_tokens) / 1e6:.1f}"))
  print(inspect.format_table(("variant", "top-1 = float32", "max |logit diff|", "max |logit|",
                              "param MB/device", "KV cache MB (batch 8)"), rows))
  print("decode columns: the decode loop alone; tok/s of transformers include its prefill. "
        "Speed of light: the float32 weights' matrix-vector products alone, same run, in the "
        "fastest layout; each the best of its rounds:")
  for r in results:
    rounds = "; ".join(
        f"light {max(sol.values()):.1f} ({', '.join(f'{k} {v:.1f}' for k, v in sol.items())})"
        f", float32 decode {d:.1f}"
        for sol, d in zip(r["speed_of_light_rounds"], r["jaxpar"]["float32"]["decode_rounds"]))
    print(f"  batch {r['batch']} (limit: {r['speed_of_light_layout']}): {rounds}")


if __name__ == "__main__":
  if "--speculative" in sys.argv:  # speculative decoding against plain: its own script
    sys.argv.remove("--speculative")
    from benchmarks import speculative
    speculative.main()
  else:
    main()
