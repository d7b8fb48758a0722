"""Greedy decoding tokens/s: jaxpar on one CPU device against Hugging Face transformers.

`--family gpt2` (default): the GPT-2 124M shape; `--family llama` (or mistral, qwen2, qwen3):
a Llama-family model of 8 layers, width 1024, 16 query heads over 4 key/value heads, SwiGLU
width 2816, vocabulary 32000. Random weights (initializer_range 0.2, so greedy tokens depend on
the context) saved by `transformers` and loaded by both; batch 1 and 8, 32-token prompts, 64
new tokens, float32, EOS disabled so every row decodes all 64 tokens. Each round times one
`transformers` generate and one jaxpar generate (prefill + decode, compile excluded),
alternating which goes first, and the speed of light: a compiled chain of the same weights'
matrix-vector products and nothing else (`speed_of_light`), against which jaxpar's decode
loop alone is reported. Medians over rounds. The jnp.sum roofline (the batch over the time to
stream the weights at a compiled sum's read bandwidth) is kept for reference only: a sum
streams memory slower than a matrix-vector product here, so it is no upper bound. The greedy
tokens of the two must be identical.

  python benchmarks/decode.py [--family llama] [--rounds 3] [--checkpoint DIR] [--batches 1 8]

Prints a table and writes JSON to benchmarks/results/decode[_FAMILY].json. Goals: GPT-2
jaxpar >= 1.2x transformers at batch 1 and >= 1.35x at batch 8; Llama >= 1.5x at both.
"""

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxpar import emulate_cpu_devices  # noqa: E402


def weight_matrices(generator) -> tuple[list, object]:
  """The 2-D weights a decode step multiplies by, per layer ([out, in] as stored), and the
  vocabulary head (the largest 2-D parameter outside the blocks)."""
  import jax
  params = generator.natural_params()
  blocks = params["blocks"]
  mats = [[a[l] for a in jax.tree.leaves(blocks) if a.ndim == 3]
          for l in range(generator.forward.config.model.n_layers)]
  rest = {k: v for k, v in params.items() if k != "blocks"}
  head = max((a for a in jax.tree.leaves(rest) if a.ndim == 2), key=lambda a: a.size)
  return mats, head


def _fit(h, width: int):
  """`h` [B, w] cut or tiled to [B, width]: feeds any weight from the last activation."""
  import jax.numpy as jnp
  if h.shape[1] < width:
    h = jnp.tile(h, (1, -(-width // h.shape[1])))
  return h[:, :width]


def chain_program(mats, head, steps: int):
  """The speed-of-light program: per step, every weight of every layer multiplied in one
  chain (each product feeds the next, so none is dead code), then the head; a `tanh`
  between them and nothing else."""
  import jax
  import jax.numpy as jnp

  def program(weights, x_BD):
    mats, head = weights
    D = x_BD.shape[1]

    def step(_, x_BD):
      for layer in mats:
        h = x_BD
        for w_OI in layer:
          h = jnp.tanh(jnp.einsum("bi,oi->bo", _fit(h, w_OI.shape[1]), w_OI))
        x_BD = x_BD + _fit(h, D)
      logits_BV = jnp.einsum("bd,vd->bv", x_BD, head)
      return x_BD + jnp.tanh(logits_BV[:, :D] + logits_BV[:, -D:])
    return jax.lax.fori_loop(0, steps, step, x_BD)
  return jax.jit(program)


def dot_shapes(compiled_text: str) -> list[str]:
  """The result shapes of the matrix products in a compiled CPU program (plain or inside a
  YNNPACK fusion; each product appears once in the text)."""
  import re
  return re.findall(r"= f32\[([\d,]+)\]\S* dot\(", compiled_text)


def speed_of_light(generator, batch: int, steps: int, repeats: int = 3) -> float:
  """Tokens/s of a compiled program that does nothing but stream the model's own weights
  through the matrix-vector products a decode step makes (`chain_program`): the limit of a
  decode step on these weights on this machine (the best of `repeats`). Raises if XLA
  dropped any product (the program would then stream fewer bytes than the model)."""
  import jax
  import jax.numpy as jnp
  mats, head = weight_matrices(generator)
  weights = jax.device_put((mats, head), jax.devices("cpu")[0])
  D = head.shape[1]
  x = jnp.ones((batch, D), jnp.float32)
  chain = chain_program(mats, head, steps).lower(weights, x).compile()
  shapes = dot_shapes(chain.as_text())
  want = sum(len(layer) for layer in mats) + 1
  if len(shapes) != want or f"{batch},{head.shape[0]}" not in shapes:
    raise RuntimeError(f"speed of light: compiled matrix products {shapes}, expected {want} "
                       f"with the whole head [{batch},{head.shape[0]}]")
  chain(weights, x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    chain(weights, x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return batch * steps / best


def read_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> float:
  """Bytes per second that a compiled reduction streams from memory (the best of
  `repeats`): decoding reads its weights, it does not copy them."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones(nbytes // 4, jnp.float32)
  total = jax.jit(jnp.sum)
  total(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    total(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return nbytes / best


LLAMA_SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                   num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                   max_position_embeddings=2048, initializer_range=0.2,
                   tie_word_embeddings=False)
HF_CLASSES = {"gpt2": ("GPT2Config", "GPT2LMHeadModel"),
              "llama": ("LlamaConfig", "LlamaForCausalLM"),
              "mistral": ("MistralConfig", "MistralForCausalLM"),
              "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
              "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}


def make_checkpoint(family: str, path: str) -> None:
  import torch
  import transformers
  config_cls, model_cls = (getattr(transformers, n) for n in HF_CLASSES[family])
  args = {"initializer_range": 0.2} if family == "gpt2" else LLAMA_SHAPE
  torch.manual_seed(0)
  model_cls(config_cls(**args)).save_pretrained(path)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--family", choices=sorted(HF_CLASSES), default="gpt2")
  parser.add_argument("--checkpoint", help="an existing checkpoint dir of that family "
                                           "(default: a random one in a temporary dir)")
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--prompt-len", type=int, default=32)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--set", action="append", default=[],
                      help="jaxpar config overrides, e.g. model.scan_layers=true")
  parser.add_argument("--out", help="JSON path (default benchmarks/results/decode[_FAMILY].json)")
  args = parser.parse_args()
  suffix = "" if args.family == "gpt2" else f"_{args.family}"
  args.out = args.out or str(ROOT / "benchmarks" / "results" / f"decode{suffix}.json")
  emulate_cpu_devices(1)

  import jax
  import numpy as np
  import torch
  from transformers import AutoModelForCausalLM

  from jaxpar import config as config_lib
  from jaxpar import inspect
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

  config = config_lib.load(ROOT / "configs" / "gpt2.yaml",
                           ["mesh.data=1", "mesh.model=1", f"model.checkpoint={checkpoint}",
                            "generate.eos_id=-1", *args.set])
  mesh = make_mesh(config.mesh, devices=jax.devices("cpu")[:1])
  generator = generate.build(config, mesh, eos_id=-1)
  bandwidth = read_bandwidth()
  print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__}; "
        f"weights {weight_bytes / 1e6:.0f} MB; read bandwidth {bandwidth / 1e9:.1f} GB/s; "
        f"jaxpar layers {'scanned' if generator.scan else 'unrolled'}", flush=True)

  rows, results = [], []
  for batch in args.batches:
    rng = np.random.default_rng(batch)
    prompts = rng.integers(0, config.model.vocab_size, (batch, args.prompt_len))
    ids = torch.tensor(prompts, dtype=torch.long)
    n = args.new_tokens

    def run_hf():
      with torch.no_grad():
        start = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          do_sample=False)
        return time.perf_counter() - start, out[:, args.prompt_len:].numpy()

    def run_jaxpar():
      result = generator.generate(prompts.tolist(), max_new_tokens=n)
      decode_s.append(result.decode_s / max(result.steps - 1, 1))  # per decode step
      return result.prefill_s + result.decode_s, result.tokens

    decode_s, sol = [], []

    run_jaxpar()  # compile
    run_hf()      # warm up
    hf_s, jx_s = [], []
    decode_s.clear()
    for r in range(args.rounds):
      sol.append(speed_of_light(generator, batch, n))
      order = (run_hf, run_jaxpar) if r % 2 == 0 else (run_jaxpar, run_hf)
      for fn in order:
        seconds, tokens = fn()
        (hf_s if fn is run_hf else jx_s).append(seconds)
        if fn is run_hf:
          hf_tokens = tokens
        else:
          jx_tokens = tokens
    identical = bool(np.array_equal(hf_tokens, jx_tokens))
    hf_tps = batch * n / statistics.median(hf_s)
    jx_tps = batch * n / statistics.median(jx_s)
    roofline = batch * bandwidth / weight_bytes
    sol_tps = statistics.median(sol)
    decode_tps = batch / statistics.median(decode_s)
    distinct = float(np.mean([len(set(row)) for row in jx_tokens.tolist()]))
    result = {"batch": batch, "prompt_len": args.prompt_len, "new_tokens": n,
              "transformers_tokens_per_s": hf_tps, "jaxpar_tokens_per_s": jx_tps,
              "speedup": jx_tps / hf_tps, "jnp_sum_roofline_tokens_per_s": roofline,
              "jaxpar_decode_tokens_per_s": decode_tps, "speed_of_light_tokens_per_s": sol_tps,
              "jaxpar_decode_of_speed_of_light": decode_tps / sol_tps,
              "greedy_tokens_identical": identical,
              "distinct_tokens_per_row": distinct,
              "transformers_s": hf_s, "jaxpar_s": jx_s}
    results.append(result)
    rows.append((batch, f"{hf_tps:.1f}", f"{jx_tps:.1f}", f"{jx_tps / hf_tps:.2f}x",
                 f"{decode_tps:.1f}", f"{sol_tps:.1f}", f"{decode_tps / sol_tps:.0%}",
                 f"{roofline:.1f}", "yes" if identical else "NO", f"{distinct:.1f}"))
    print(f"  batch {batch}: transformers {hf_tps:.1f} tok/s, jaxpar {jx_tps:.1f} tok/s",
          flush=True)
  print(inspect.format_table(("batch", "transformers tok/s", "jaxpar tok/s", "speedup",
                              "jaxpar decode tok/s", "speed of light tok/s", "of light",
                              "jnp.sum roofline", "tokens identical", "distinct/row"), rows))
  print("tok/s of transformers and jaxpar include the prefill; 'jaxpar decode' is the decode "
        "loop alone, against the speed of light (the same weights' matrix-vector products, "
        "nothing else); the jnp.sum roofline is a compiled sum's read bandwidth (no upper "
        "bound on this machine)")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({
      "benchmark": "decode", "family": args.family, "torch": torch.__version__,
      "jax": jax.__version__,
      "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
      "weight_bytes": weight_bytes, "read_bandwidth": bandwidth,
      "scan_layers": generator.scan, "rounds": args.rounds, "results": results}, indent=2))
  print(f"wrote {out}")
  if tmp is not None:
    tmp.cleanup()


if __name__ == "__main__":
  main()
