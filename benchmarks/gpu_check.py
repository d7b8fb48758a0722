"""A GPU check, ready to run: jaxpar's main job and generation on the machine's accelerator.

On a machine with an NVIDIA GPU (JAX with CUDA; written for jax 0.10 and 0.11) this runs

- the README's main job (`scripts/run.py forward --config configs/default.yaml`), on the GPU
  when its devices fit the mesh, else on emulated CPU devices (said in its output);
- `generate` at the GPT-2 124M shape and at the Llama 3.2 1B shape (bfloat16), batches 1, 8
  and 64, 128-token prompts, 128 new tokens, random weights, on one GPU;

and prints one JSON object: per run, tokens/s of the decode loop and of the prefill, the
fraction of the GPU's memory bandwidth the decode streams (weights + KV cache read per step
over the step time) and the fraction of its peak bf16 FLOP/s the prefill reaches
(2 x parameters x prompt tokens over the prefill time). Peaks come from a table of known GPUs
(`PEAKS`, by `device_kind`); an unknown GPU gets fractions of null.

`--quantize int8 int8-dynamic kv-int8` adds the same generate runs with int8 weights,
int8 weights and activations, or an int8 KV cache (`model.quantize`,
`model.kv_cache_dtype`; bandwidth fractions count the bytes they hold).

`--dry` runs the same code on the CPU at toy shapes (2 layers, batch 1 and 2, 8 tokens): it
checks the script, not the speed.

  python benchmarks/gpu_check.py [--dry] [--quantize ...] [--out benchmarks/results/gpu_check.json]
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# device_kind substring -> (memory bandwidth bytes/s, dense bf16 FLOP/s), from the vendors'
# data sheets.
PEAKS = {"H200": (4.8e12, 989e12), "H100": (3.35e12, 989e12), "A100": (2.0e12, 312e12),
         "L4": (0.3e12, 121e12), "TPU v5 lite": (0.82e12, 197e12)}

SHAPES = {  # name -> (config, overrides)
    "gpt2-124m": ("configs/gpt2.yaml", ["model.dtype=bfloat16"]),
    "llama-3.2-1b": ("configs/llama.yaml", ["model.dtype=bfloat16"]),
}
QUANTIZE = {"int8": ["model.quantize=int8"], "int8-dynamic": ["model.quantize=int8-dynamic"],
            "kv-int8": ["model.kv_cache_dtype=int8"]}
DRY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=0",
       "model.head_dim=0", "model.d_ff=128", "model.vocab_size=256", "model.max_seq_len=64",
       "model.dtype=float32", "run.seq_len=16"]


def main_job(dry: bool) -> dict:
  """The README's first command (its `forward`), as a subprocess, with --json."""
  args = [sys.executable, "scripts/run.py", "forward", "--config", "configs/default.yaml",
          "--json"]
  if dry:
    args += ["--set", "model.vocab_size=256", "--set", "model.d_model=64", "--set",
             "model.d_ff=128", "--set", "model.n_heads=4"]
  proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=1800)
  if proc.returncode:
    return {"error": proc.stderr.strip().splitlines()[-1:]}
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  return {k: result.get(k) for k in ("platform", "mesh", "tokens_per_s", "compile_s",
                                     "verify_max_abs_diff")}


def generate_run(name: str, batch: int, prompt_len: int, new: int, dry: bool, peaks,
                 variant: str = "") -> dict:
  import jax

  from jaxpar import config as config_lib
  from jaxpar import quant
  from jaxpar.mesh import make_mesh
  from jaxpar.runtime import generate, state
  path, sets = SHAPES[name]
  sets = sets + (DRY if dry else []) + ["mesh.data=1", "mesh.stage=1", "mesh.model=1",
                                        f"run.batch={batch}", "generate.eos_id=-1"]
  sets += QUANTIZE.get(variant, [])
  config = config_lib.load(ROOT / path, sets)
  mesh = make_mesh(config.mesh, devices=jax.devices()[:1])
  gen = generate.build(config, mesh, eos_id=-1)
  prompts = [[(7 * b + 3 * t) % config.model.vocab_size for t in range(prompt_len)]
             for b in range(batch)]
  gen.generate(prompts, max_new_tokens=new)  # compile and warm up
  result = gen.generate(prompts, max_new_tokens=new)
  m = config.model
  values = jax.tree.map(lambda w: w.values if quant.is_quantized(w) else w, gen.params,
                        is_leaf=quant.is_quantized)  # a quantised weight's scales are no FLOPs
  n_params = sum(int(x.size) for x in jax.tree.leaves(values))
  weight_bytes = state.param_bytes_per_device(gen.params)
  cache_bytes = gen.cache_bytes_per_device(batch, prompt_len + new)
  step_s = result.decode_s / max(result.steps - 1, 1)
  out = {"shape": name, "variant": variant or m.dtype, "batch": batch, "dtype": m.dtype,
         "params": n_params,
         "decode_tokens_per_s": batch / step_s,
         "prefill_tokens_per_s": batch * prompt_len / result.prefill_s,
         "compile_s": result.compile_s}
  # Per decode step: every weight once, and on average half the cache.
  bytes_per_step = weight_bytes + cache_bytes / 2
  flops = 2 * n_params * batch * prompt_len
  out["decode_fraction_of_bandwidth"] = (bytes_per_step / step_s / peaks[0]) if peaks else None
  out["prefill_fraction_of_peak_flops"] = (flops / result.prefill_s / peaks[1]
                                           if peaks else None)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dry", action="store_true", help="toy shapes on the CPU")
  parser.add_argument("--quantize", nargs="*", default=[], choices=sorted(QUANTIZE),
                      help="also run these int8 variants")
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
  args = parser.parse_args()
  if args.dry:
    os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  device = jax.devices()[0]
  if device.platform != "gpu" and not args.dry:
    sys.exit(f"error: no GPU (JAX sees {device.platform}: {device.device_kind}); run with "
             f"--dry to check the script on the CPU")
  kind = device.device_kind
  peaks = next((v for k, v in PEAKS.items() if k in kind), None)
  report = {"jax": jax.__version__, "device": kind, "platform": device.platform,
            "dry": args.dry, "peaks": None if peaks is None else
            {"bandwidth_bytes_per_s": peaks[0], "bf16_flops": peaks[1]}}
  start = time.perf_counter()
  report["main_job"] = main_job(args.dry)
  print(f"main job: {report['main_job']}", flush=True)
  batches, prompt_len, new = ((1, 2), 8, 8) if args.dry else ((1, 8, 64), 128, 128)
  report["generate"] = []
  for name in SHAPES:
    for variant in ["", *args.quantize]:
      for batch in batches:
        run = generate_run(name, batch, prompt_len, new, args.dry, peaks, variant)
        report["generate"].append(run)
        print(f"{name} {run['variant']} batch {batch}: decode "
              f"{run['decode_tokens_per_s']:,.1f} tok/s, prefill "
              f"{run['prefill_tokens_per_s']:,.1f} tok/s", flush=True)
  report["seconds"] = time.perf_counter() - start
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=2))
  print(json.dumps(report))


if __name__ == "__main__":
  main()
