"""What structured output costs the serving engine: the decode step's time with 8 requests
constrained to a JSON schema against 8 unconstrained ones, in the same run.

The engine in this process at the config's shape (GPT-2 124M by default) on one CPU device
(or the mesh `--set mesh.*` asks for, on as many emulated devices), 8 slots, with a byte-level
BPE vocabulary of GPT-2's size trained here (no model hub;
`grammar_libraries.train_tokenizer`). Both modes sample (temperature 1) every token of every
row; the constrained mode also feeds each step's tokens to the requests' matchers and sends
their masks with the step's choice (computed while the step's forward runs; on a pipeline,
which chooses inside its ring, before the step is queued). A request's
step time is (its last token's time - its first's) / (tokens - 1); a round's figure is the
median over its 8 requests, the modes alternate, and each mode's figure is its best round.
Goal: constrained at most 5% slower.

  python benchmarks/grammar.py [--config configs/gpt2.yaml] [--max-tokens 64]
                               [--set mesh.stage=2 --out benchmarks/results/grammar_pipeline.json]

Prints a table and writes JSON to benchmarks/results/grammar.json.
"""

import pathlib
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import parser, write_json  # noqa: E402
from benchmarks.grammar_libraries import SCHEMA, train_tokenizer  # noqa: E402
from jaxpar import config as config_lib  # noqa: E402
from jaxpar import emulate_cpu_devices  # noqa: E402

MODES = ("unconstrained", "JSON schema")


def main() -> None:
  p = parser(__doc__, config="gpt2.yaml", out="grammar.json", rounds=3)
  p.add_argument("--rows", type=int, default=8)
  p.add_argument("--prompt", type=int, default=32)
  p.add_argument("--max-tokens", type=int, default=64)
  args = p.parse_args()
  cfg = config_lib.load(args.config, ["mesh.data=1", "mesh.stage=1", "mesh.model=1",
                                      f"serve.max_slots={args.rows}", "serve.max_len=128",
                                      "generate.eos_id=-1", *args.set])
  devices = cfg.mesh.data * cfg.mesh.stage * cfg.mesh.model  # --set mesh.stage=2: a pipeline
  emulate_cpu_devices(devices)
  import jax

  from jaxpar import serve
  from jaxpar.mesh import make_mesh
  print("training a tokenizer of GPT-2's vocabulary size...", flush=True)
  tokenizer = train_tokenizer(cfg.model.vocab_size)
  engine = serve.build(cfg, make_mesh(cfg.mesh, devices=jax.devices()[:devices]),
                       tokenizer=tokenizer).start()
  schema = engine.grammar("json", SCHEMA, "response_format")
  prompt = tokenizer.encode("Describe a person as JSON: " * 8).ids[:args.prompt]

  def run(mode: str, seed: int) -> tuple[float, int]:
    streams = [engine.submit(prompt, serve.Params(
        max_tokens=args.max_tokens, temperature=1.0, seed=seed * 100 + i,
        grammar=schema if mode == "JSON schema" else None)) for i in range(args.rows)]
    per_token = []
    for s in streams:
      s.result()
      if len(s.token_ids) > 1:
        per_token.append((s.finished_at - s.first_token_at) / (len(s.token_ids) - 1))
    return statistics.median(per_token), sum(len(s.token_ids) for s in streams)

  try:
    for mode in MODES:  # warm: every program has run once
      run(mode, 0)
    times: dict = {m: [] for m in MODES}
    tokens: dict = {m: [] for m in MODES}
    for r in range(args.rounds):
      for mode in MODES:
        step, made = run(mode, r + 1)
        times[mode].append(step)
        tokens[mode].append(made)
  finally:
    engine.stop()
  best = {m: min(t) for m, t in times.items()}
  base = best["unconstrained"]
  print(f"{args.rows} rows, {args.prompt}-token prompt, up to {args.max_tokens} sampled "
        f"tokens, vocabulary {cfg.model.vocab_size}, mesh {cfg.mesh.data}x{cfg.mesh.stage}x"
        f"{cfg.mesh.model} of {jax.devices()[0].platform} devices")
  print("| mode | step time (ms, best round) | rounds (ms) | tokens per round | vs unconstrained |")
  print("|---|---|---|---|---|")
  for m in MODES:
    print(f"| {m} | {best[m] * 1e3:.2f} | {', '.join(f'{t * 1e3:.2f}' for t in times[m])} | "
          f"{', '.join(map(str, tokens[m]))} | {best[m] / base:.3f}x |")
  write_json(args.out, {"benchmark": "grammar", "config": args.config, "rows": args.rows,
                        "mesh": [cfg.mesh.data, cfg.mesh.stage, cfg.mesh.model],
                        "prompt": args.prompt, "max_tokens": args.max_tokens,
                        "step_s": times, "tokens": tokens,
                        "ratio": best["JSON schema"] / base})


if __name__ == "__main__":
  main()
