"""jaxpar's forward against a hand-written `jax.jit` + `NamedSharding` GPT-2 forward.

Both run on the same mesh, with the same weights (jaxpar's parameters) and the same shardings
(written out by hand here, not read from jaxpar's rules), timed interleaved in one process:
each round times a block of jaxpar calls and a block of hand-written calls, and the ratio is
the median over rounds of jaxpar / hand-written seconds per call. Goal: within 2% (ratio <= 1.02).

  python benchmarks/overhead.py [--config configs/default.yaml] [--set k=v ...] [--rounds 7]

Prints a table and writes JSON to benchmarks/results/overhead.json.
"""

import math
import os
import pathlib
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import parser, time_block, write_json  # noqa: E402
from jaxpar import config as config_lib  # noqa: E402
from jaxpar import emulate_cpu_devices  # noqa: E402
from jaxpar.cli import pick_devices  # noqa: E402


def hand_written_forward(mesh, cfg):
  """GPT-2 forward with explicit NamedShardings: Megatron layout, batch over data."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  def ns(*spec):
    return NamedSharding(mesh, P(*spec))

  layer_rep = ns("stage", None)
  params = {
      "wte": ns("model", None), "wpe": ns(None, None),
      "ln_f": {"scale": ns(None), "bias": ns(None)},
      "blocks": {
          "ln_1": {"scale": layer_rep, "bias": layer_rep},
          "ln_2": {"scale": layer_rep, "bias": layer_rep},
          "attn": {"w_q": ns("stage", "model", None), "w_k": ns("stage", "model", None),
                   "w_v": ns("stage", "model", None), "b_q": ns("stage", "model"),
                   "b_k": ns("stage", "model"), "b_v": ns("stage", "model"),
                   "w_o": ns("stage", None, "model"), "b_o": layer_rep},
          "mlp": {"w_up": ns("stage", "model", None), "b_up": ns("stage", "model"),
                  "w_down": ns("stage", None, "model"), "b_down": layer_rep},
      },
  }
  act = ns("data", None, None)
  eps, V = cfg.layer_norm_eps, cfg.vocab_size

  def ln(x, p):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]

  def block(x, p):
    a = p["attn"]
    h = ln(x, p["ln_1"])
    B, T, _ = h.shape
    split = lambda y: y.reshape(B, T, cfg.n_heads, cfg.head_dim)
    q = split(h @ a["w_q"].T + a["b_q"])
    k = split(h @ a["w_k"].T + a["b_k"])
    v = split(h @ a["w_v"].T + a["b_v"])
    q = jax.lax.with_sharding_constraint(q, ns("data", None, "model", None))
    s = jnp.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(q.shape[-1])
    s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, jnp.finfo(jnp.float32).min)
    o = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, axis=-1), v).reshape(B, T, -1)
    x = x + jax.lax.with_sharding_constraint(o @ a["w_o"].T + a["b_o"], act)
    m = p["mlp"]
    h = jax.nn.gelu(jnp.einsum("btd,fd->btf", ln(x, p["ln_2"]), m["w_up"]) + m["b_up"],
                    approximate=True)
    h = jax.lax.with_sharding_constraint(h, ns("data", None, "model"))
    x = x + jax.lax.with_sharding_constraint(
        jnp.einsum("btf,df->btd", h, m["w_down"]) + m["b_down"], act)
    return x, None

  def forward(p, tokens):
    x = jnp.take(p["wte"], tokens, axis=0) + p["wpe"][:tokens.shape[1]]
    x = jax.lax.with_sharding_constraint(x, act)
    x, _ = jax.lax.scan(block, x, p["blocks"])
    logits = jnp.einsum("btd,vd->btv", ln(x, p["ln_f"]), p["wte"])
    return jnp.where(jnp.arange(logits.shape[-1]) < V, logits, jnp.finfo(jnp.float32).min)

  return jax.jit(forward, in_shardings=(params, ns("data", None)),
                 out_shardings=ns("data", None, "model"))


def main() -> None:
  args = parser(__doc__, config="default.yaml", out="overhead.json", rounds=21,
                calls=5).parse_args()
  config = config_lib.load(args.config, args.set)
  emulate_cpu_devices(config.mesh.cpu_devices)

  import jax
  import numpy as np

  from jaxpar import inspect
  from jaxpar.mesh import describe, make_mesh
  from jaxpar.runtime import inference

  devices, note = pick_devices(config.mesh, "auto")
  if note:
    print(note)
  mesh = make_mesh(config.mesh, devices=devices)
  fwd = inference.build(config, mesh)
  tokens = fwd.tokens(inference.seeded_tokens(config))
  fwd.compile(tokens)
  hand = hand_written_forward(mesh, config.model)
  with jax.set_mesh(mesh):
    hand_compiled = hand.lower(fwd.params, tokens).compile()
  ours = inference.unpad(fwd(tokens), config.model.vocab_size)
  theirs = inference.unpad(hand_compiled(fwd.params, tokens), config.model.vocab_size)
  max_diff = float(np.abs(ours - theirs).max())
  census_ours = inspect.hlo_census(fwd.compiled.as_text()).counts()
  census_hand = inspect.hlo_census(hand_compiled.as_text()).counts()

  def block(fn) -> float:
    return time_block(fn, args.calls)

  run_ours = lambda: fwd(tokens)
  run_hand = lambda: hand_compiled(fwd.params, tokens)
  ours_s, hand_s = [], []
  for r in range(args.rounds):
    first, second = (run_ours, run_hand) if r % 2 == 0 else (run_hand, run_ours)
    a, b = block(first), block(second)
    ours_s.append(a if first is run_ours else b)
    hand_s.append(b if first is run_ours else a)
  ratios = [o / h for o, h in zip(ours_s, hand_s)]
  tokens_per_call = config.run.batch * config.run.seq_len
  result = {
      "benchmark": "overhead",
      "config": os.path.relpath(args.config, ROOT), "overrides": args.set,
      "mesh": dict(mesh.shape), "platform": devices[0].platform,
      "device_kind": devices[0].device_kind,
      "batch": config.run.batch, "seq_len": config.run.seq_len,
      "rounds": args.rounds, "calls_per_round": args.calls,
      "jaxpar_s": statistics.median(ours_s), "hand_s": statistics.median(hand_s),
      "ratio_median": statistics.median(ratios), "ratios": ratios,
      "max_abs_diff": max_diff,
      "collectives_jaxpar": census_ours, "collectives_hand": census_hand,
  }
  rows = [("jaxpar", f"{result['jaxpar_s'] * 1e3:.2f}",
           f"{tokens_per_call / result['jaxpar_s']:,.0f}", str(census_ours)),
          ("hand-written jit", f"{result['hand_s'] * 1e3:.2f}",
           f"{tokens_per_call / result['hand_s']:,.0f}", str(census_hand))]
  print(f"mesh {describe(mesh)}; batch {config.run.batch} x {config.run.seq_len}; "
        f"{args.rounds} interleaved rounds of {args.calls} calls")
  print(inspect.format_table(("forward", "ms/call (median)", "tokens/s", "collectives"), rows))
  print(f"ratio jaxpar / hand-written: median {result['ratio_median']:.3f} "
        f"(rounds: {', '.join(f'{r:.3f}' for r in ratios)}); max |logits diff| {max_diff:.2e}")
  write_json(args.out, result)


if __name__ == "__main__":
  main()
