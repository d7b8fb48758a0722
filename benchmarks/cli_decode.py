"""`scripts/run.py generate` against the library's `Generator.generate` on the same config,
one CPU device: the decode loop's tokens/s (`decode_tokens_per_s`, progress lines included),
interleaved rounds, the best of each (noise only slows a run).

GPT-2 124M shape (`configs/gpt2.yaml`, random weights), batch 1, a 32-token prompt, 64 new
tokens, EOS off. Goal (issue 26): the command line within 3% of the library.

  python benchmarks/cli_decode.py [--rounds 3] [--config configs/gpt2.yaml]

Prints each round and writes JSON to benchmarks/results/cli_decode.json.
"""

import argparse
import json
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxpar import emulate_cpu_devices  # noqa: E402

SETS = ("mesh.data=1", "mesh.model=1", "mesh.stage=1", "mesh.cpu_devices=1",
        "generate.eos_id=-1")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default=str(ROOT / "configs" / "gpt2.yaml"))
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cli_decode.json"))
  args = p.parse_args()
  emulate_cpu_devices(1)
  import jax

  from benchmarks.common import write_json
  from jaxpar import config as config_lib
  from jaxpar.mesh import make_mesh
  from jaxpar.runtime import generate

  config = config_lib.load(args.config, list(SETS))
  prompt = np.random.default_rng(1).integers(0, config.model.vocab_size, 32).tolist()
  gen = generate.build(config, make_mesh(config.mesh, devices=jax.devices()[:1]), eos_id=-1)
  gen.generate([prompt], max_new_tokens=args.new_tokens)  # compile
  command = [sys.executable, str(ROOT / "scripts" / "run.py"), "generate", "--config",
             args.config, "--devices", "1", "--json", "--prompt-ids", ",".join(map(str, prompt)),
             "--max-new-tokens", str(args.new_tokens)]
  for override in SETS:
    command += ["--set", override]
  cli, library = [], []
  for r in range(args.rounds):
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    cli.append(json.loads(out.strip().splitlines()[-1])["decode_tokens_per_s"])
    result = gen.generate([prompt], max_new_tokens=args.new_tokens)
    library.append((result.steps - 1) / result.decode_s)
    print(f"round {r + 1}: command line {cli[-1]:.1f} tok/s, library {library[-1]:.1f} tok/s",
          flush=True)
  ratio = max(cli) / max(library)
  print(f"best: command line {max(cli):.1f}, library {max(library):.1f} tok/s: {ratio:.3f}x")
  write_json(args.out, {"config": args.config, "new_tokens": args.new_tokens,
                        "command_line_tokens_per_s": cli, "library_tokens_per_s": library,
                        "best_ratio": ratio})


if __name__ == "__main__":
  main()
