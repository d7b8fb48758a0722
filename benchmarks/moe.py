"""Where a mixture of experts' experts live, on 8 emulated devices, in one run: split over
`expert` (expert=8: one expert a device, the batch split over it too, two all-to-alls per
layer), replicated (data=8: every device holds every expert), or each expert's width split
over `model` (model=8: two all-reduces per layer). The same random Mixtral-style model
(4 layers, width 512, 8 experts of width 1024, 2 a token, vocabulary 32000, float32) and the
same batch on each: forward (prefill) tokens/s on run.batch x run.seq_len, greedy decode
tokens/s of `generate` (8 prompts), per-device parameter bytes and the compiled collectives.
Emulated devices share the host's cores, so wall time follows the total work and bytes every
device moves; timed interleaved, the best of the rounds.

  python benchmarks/moe.py [--set k=v ...] [--rounds 3]

Prints a table and writes JSON to benchmarks/results/moe.json.
"""

import dataclasses
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import parser, time_block, write_json  # noqa: E402
from jaxpar import config as config_lib  # noqa: E402
from jaxpar import emulate_cpu_devices  # noqa: E402

DEFAULTS = ["mesh.cpu_devices=8", "model.family=mixtral", "model.vocab_size=32000",
            "model.d_model=512", "model.n_heads=8", "model.n_kv_heads=8", "model.n_layers=4",
            "model.d_ff=1024", "model.n_experts=8", "model.experts_per_token=2",
            "model.max_seq_len=256", "model.tie_embeddings=false", "run.batch=8",
            "run.seq_len=128"]
LAYOUTS = {"expert=8": dict(data=1, expert=8, model=1),
           "data=8 (experts replicated)": dict(data=8, expert=1, model=1),
           "model=8 (expert width split)": dict(data=1, expert=1, model=8)}


def main() -> None:
  args = parser(__doc__, config="tiny.yaml", out="moe.json", rounds=3).parse_args()
  base = config_lib.load(args.config, DEFAULTS + args.set)
  emulate_cpu_devices(base.mesh.cpu_devices)

  import jax

  from jaxpar import inspect
  from jaxpar.mesh import make_mesh
  from jaxpar.runtime import generate, inference, state

  devices = jax.devices("cpu")
  prompts = [[(7 * r + 3 * i) % base.model.vocab_size for i in range(32)] for r in range(8)]
  built = {}
  for name, sizes in LAYOUTS.items():
    config = dataclasses.replace(base, mesh=config_lib.MeshConfig(stage=1, **sizes))
    mesh = make_mesh(config.mesh, devices=devices)
    fwd = inference.build(config, mesh)
    tokens = fwd.tokens(inference.seeded_tokens(config))
    census = inspect.hlo_census(fwd.compile(tokens).as_text())
    gen = generate.build(config, mesh, eos_id=-1)
    gen.generate(prompts, max_new_tokens=4)  # compile
    built[name] = (fwd, tokens, gen, census)
    print(f"built {name}", flush=True)

  prefill = {n: [] for n in built}
  decode = {n: [] for n in built}
  outputs = {}
  for r in range(args.rounds):
    names = list(built)[r % len(built):] + list(built)[:r % len(built)]
    for name in names:
      fwd, tokens, gen, _ = built[name]
      rows, T = tokens.shape
      prefill[name].append(rows * T / time_block(lambda: fwd(tokens), args.calls))
      result = gen.generate(prompts, max_new_tokens=32)
      decode[name].append(len(prompts) * (result.steps - 1) / result.decode_s)
      outputs[name] = result.tokens.tolist()
  first = next(iter(outputs.values()))
  results = {}
  for name, (fwd, _, gen, census) in built.items():
    results[name] = {
        "mesh": LAYOUTS[name], "prefill_tokens_per_s": max(prefill[name]),
        "prefill_rounds": prefill[name], "decode_tokens_per_s": max(decode[name]),
        "decode_rounds": decode[name],
        "param_bytes_per_device": state.param_bytes_per_device(fwd.params),
        "collectives": census.counts(),
        "greedy_tokens_equal_expert8": outputs[name] == first}
  rows = [(n, f"{r['prefill_tokens_per_s']:.0f}", f"{r['decode_tokens_per_s']:.1f}",
           f"{r['param_bytes_per_device'] / 1e6:.1f}",
           ", ".join(f"{k} {v['count']}" for k, v in sorted(r["collectives"].items())),
           "yes" if r["greedy_tokens_equal_expert8"] else "NO") for n, r in results.items()]
  print(inspect.format_table(("layout", "prefill tok/s", "decode tok/s", "param MB/device",
                              "forward collectives", "tokens = expert=8"), rows))
  write_json(args.out, {"benchmark": "moe", "jax": jax.__version__, "rounds": args.rounds,
                        "config": DEFAULTS + args.set, "time": time.time(),
                        "results": results})


if __name__ == "__main__":
  main()
