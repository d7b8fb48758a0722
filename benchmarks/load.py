"""Time to the first token: a Hugging Face directory against the same model as a jaxpar
(Orbax) checkpoint, on 8 emulated CPU devices, in one process, rounds interleaved.

Two shapes: GPT-2 124M (data=2 x model=4) and a Llama-family model of about 0.5B parameters
(8 layers, width 2048, 16 query heads over 4 key/value heads, SwiGLU 5632, vocabulary 32000;
model=8, so each key/value head is copied to 2 devices). Random weights saved by
`transformers`, converted once with `scripts/run.py convert`'s library call. Each round builds
a generator from each source and generates one token for 8 prompts of 16 tokens; the table
gives the medians of: parameters ready (`load`), compiling, the prefill, and their sum (time
to first token). The compilation cache is off, so both sources compile alike.

  python benchmarks/load.py [--rounds 3] [--shapes gpt2 llama]
"""

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_json  # noqa: E402
from jaxpar import emulate_cpu_devices  # noqa: E402

SHAPES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(initializer_range=0.2),
             ["mesh.data=2", "mesh.model=4"]),
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                   num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                   max_position_embeddings=2048, tie_word_embeddings=False),
              ["mesh.data=1", "mesh.model=8"]),
}


def write_hf(shape: str, path: str) -> None:
  import torch
  import transformers
  config_cls, model_cls, args, _ = SHAPES[shape]
  torch.manual_seed(0)
  config = getattr(transformers, config_cls)(**args)
  getattr(transformers, model_cls)(config).save_pretrained(path)


def time_first_token(config, mesh, prompts) -> dict:
  import jax

  from jaxpar.runtime import generate
  start = time.perf_counter()
  gen = generate.build(config, mesh, eos_id=-1)
  jax.block_until_ready(gen.params)
  load_s = time.perf_counter() - start
  result = gen.generate(prompts, max_new_tokens=1)
  return {"load_s": load_s, "compile_s": result.compile_s, "prefill_s": result.prefill_s,
          "first_token_s": load_s + result.compile_s + result.prefill_s,
          "tokens": result.tokens.tolist()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["gpt2", "llama"])
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "load.json"))
  args = parser.parse_args()
  emulate_cpu_devices(8)

  import jax
  import numpy as np

  from jaxpar import config as config_lib
  from jaxpar import inspect
  from jaxpar.mesh import make_mesh
  from jaxpar.runtime import checkpoint, inference

  rows, results = [], []
  prompts = np.random.default_rng(0).integers(0, 1000, (8, 16)).tolist()
  for shape in args.shapes:
    with tempfile.TemporaryDirectory() as tmp:
      hf_dir, orbax_dir = os.path.join(tmp, "hf"), os.path.join(tmp, "orbax")
      print(f"{shape}: writing a random Hugging Face checkpoint ...", flush=True)
      write_hf(shape, hf_dir)
      sets = SHAPES[shape][3] + ["run.batch=8", "generate.eos_id=-1"]
      hf_config = config_lib.load(ROOT / "configs" / "tiny.yaml",
                                  [f"model.checkpoint={hf_dir}", *sets])
      mesh = make_mesh(hf_config.mesh, devices=jax.devices())
      checkpoint.save(inference.build(hf_config, mesh), orbax_dir, say=lambda _: None)
      orbax_config = config_lib.load(ROOT / "configs" / "tiny.yaml",
                                     [f"model.checkpoint={orbax_dir}", *sets])
      size = sum(p.stat().st_size for p in pathlib.Path(hf_dir).rglob("*.safetensors"))
      runs = {"hf": [], "orbax": []}
      for r in range(args.rounds):
        for source in (("hf", "orbax") if r % 2 == 0 else ("orbax", "hf")):
          config = hf_config if source == "hf" else orbax_config
          runs[source].append(time_first_token(config, mesh, prompts))
          print(f"  round {r + 1} {source}: {runs[source][-1]['first_token_s']:.2f} s",
                flush=True)
      same = runs["hf"][0]["tokens"] == runs["orbax"][0]["tokens"]
      med = {s: {k: statistics.median(x[k] for x in v) for k in v[0] if k.endswith("_s")}
             for s, v in runs.items()}
      results.append({"shape": shape, "weights_bytes": size, "mesh": dict(mesh.shape),
                      "median": med, "runs": runs, "same_first_tokens": same})
      for source in ("hf", "orbax"):
        m = med[source]
        rows.append((shape, inspect.human(size), source, f"{m['load_s']:.2f}",
                     f"{m['compile_s']:.2f}", f"{m['prefill_s']:.2f}",
                     f"{m['first_token_s']:.2f}", "yes" if same else "NO"))
  print(inspect.format_table(("shape", "weights", "source", "load s", "compile s",
                              "prefill s", "first token s", "same token"), rows))
  write_json(args.out, {"benchmark": "load", "jax": jax.__version__, "rounds": args.rounds,
                        "results": results})


if __name__ == "__main__":
  main()
