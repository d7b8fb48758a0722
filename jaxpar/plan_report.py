"""Plans checked and shown: the top plans compiled on the devices at hand (figures from
`jaxpar.inspect`, as `forward --json` reports them), the ranking and predicted against
compiled as text tables, and a PNG chart of both.
"""

import dataclasses
import time

import jax

from jaxpar import inspect
from jaxpar.config import Config
from jaxpar.plan import Plan


def compile_plan(config: Config, plan: Plan, devices: list) -> dict:
  """Compiles the plan's forward (parameters abstract: nothing is created) on `devices` and
  reads back what `forward --json` reports: `param_bytes_per_device` (XLA's argument bytes
  less the tokens'), `collectives` (the HLO census; `collectives_in_loop`: of them those in
  loop bodies), `memory_per_device`, `compile_s`."""
  from jaxpar.mesh import make_mesh
  from jaxpar.runtime import inference
  cfg = plan.candidate.config(config)
  mesh = make_mesh(cfg.mesh, devices=devices)
  fwd = inference.build(cfg, mesh, abstract=True)
  tokens = fwd.tokens(inference.seeded_tokens(cfg))
  start = time.perf_counter()
  compiled = fwd.compile(tokens)
  compile_s = time.perf_counter() - start
  mem = inspect.memory(compiled)
  census = inspect.hlo_census(compiled.as_text())
  token_bytes = tokens.addressable_shards[0].data.nbytes
  return {"param_bytes_per_device": mem["argument"] - token_bytes,
          "collectives": census.counts(), "collectives_in_loop": census.counts(in_loop=True),
          "memory_per_device": mem, "compile_s": compile_s}


def _collectives_text(table: dict) -> str:
  if not table:
    return "none"
  return ", ".join(f"{v['count']} {k} ({inspect.human(v['bytes'])})"
                   for k, v in sorted(table.items()))


def _ms(seconds: float) -> str:
  """A duration in s, ms or us, three significant digits."""
  for scale, unit in ((1, "s"), (1e-3, "ms")):
    if seconds >= scale:
      return f"{seconds / scale:.3g} {unit}"
  return f"{seconds * 1e6:.3g} us"


def format_ranking(plans: list[Plan], *, limit: int = 20) -> str:
  """The ranked plans, one row each."""
  rows = []
  for i, plan in enumerate(plans[:limit]):
    p, c = plan.predicted, plan.candidate
    pipe = f"M={c.microbatches} R={c.repeats}" if c.stage > 1 else "-"
    layout = (f"{c.data} x {c.stage} x {c.model}" + (f" x expert {c.expert}" if c.expert > 1
                                                       else "") + (" fsdp" if c.fsdp else ""))
    rows.append((i + 1, layout, pipe, f"{p['bubble']:.1%}",
                 inspect.human(p["param_bytes_per_device"]),
                 inspect.human(p["kv_cache_bytes_per_device"]),
                 inspect.human(p["bytes_per_device"]), "yes" if p["fits"] else "NO",
                 _ms(p["prefill"]["step_s"]), _ms(p["decode"]["step_s"]),
                 _collectives_text(p["collectives"])))
  text = inspect.format_table(
      ("rank", "data x stage x model", "pipeline", "bubble", "params", "KV cache",
       "total", "fits", "prefill", "decode/token", "collectives in the HLO"), rows)
  if len(plans) > limit:
    text += f"\n... {len(plans) - limit} more plans (--json lists them all)"
  return text


def format_checked(plans: list[Plan]) -> str:
  """Predicted beside compiled, for the plans that were compiled."""
  rows = []
  for i, plan in enumerate(plans):
    if plan.compiled is None:
      continue
    p, k, c = plan.predicted, plan.compiled, plan.candidate
    mem = k["memory_per_device"]
    rows.append((i + 1, c.label(), inspect.human(p["param_bytes_per_device"]),
                 inspect.human(k["param_bytes_per_device"]),
                 inspect.human(p["output_bytes_per_device"]), inspect.human(mem["output"]),
                 inspect.human(p["temp_bytes_per_device"]), inspect.human(mem["temp"]),
                 _collectives_text(p["collectives"]), _collectives_text(k["collectives"])))
  return inspect.format_table(
      ("rank", "plan", "params predicted", "compiled", "outputs predicted", "compiled",
       "temporaries predicted", "compiled", "collectives predicted",
       "compiled (HLO census)"), rows)


def why(plan: Plan, runner_up: Plan | None) -> str:
  """One line: why this plan won."""
  p, c = plan.predicted, plan.candidate
  pre = p["prefill"]
  bound = "compute" if pre["compute_s"] >= pre["memory_s"] else "memory"
  line = (f"{c.label()}: predicted prefill {_ms(pre['step_s'])} ({bound}-bound, "
          f"collectives {_ms(pre['collective_s'])}), decode {_ms(p['decode']['step_s'])} per "
          f"token, {inspect.human(p['bytes_per_device'])} per device")
  if runner_up is not None:
    r = runner_up.predicted["prefill"]
    line += (f"; next best {runner_up.candidate.label()} at {_ms(r['step_s'])} (collectives "
             f"{_ms(r['collective_s'])})")
  return line


def save_chart(plans: list[Plan], path: str, *, limit: int = 12) -> None:
  """A PNG: predicted step-time terms of the top plans (stacked bars), and predicted against
  compiled parameter bytes per device for those compiled."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  shown = plans[:limit]
  labels = [f"{i + 1}: {p.candidate.data}x{p.candidate.stage}x{p.candidate.model}"
            + (f"e{p.candidate.expert}" if p.candidate.expert > 1 else "")
            + (f" M{p.candidate.microbatches}R{p.candidate.repeats}"
               if p.candidate.stage > 1 else "") + (" fsdp" if p.candidate.fsdp else "")
            for i, p in enumerate(shown)]
  fig, (left, right) = plt.subplots(1, 2, figsize=(13, 0.45 * len(shown) + 2.2))
  y = list(range(len(shown)))[::-1]
  compute = [max(p.predicted["prefill"]["compute_s"], p.predicted["prefill"]["memory_s"]) * 1e3
             for p in shown]
  comms = [p.predicted["prefill"]["collective_s"] * 1e3 for p in shown]
  left.barh(y, compute, color="#4c72b0", label="max(compute, memory)")
  left.barh(y, comms, left=compute, color="#dd8452", label="collectives")
  left.set_yticks(y, labels)
  left.set_xlabel("predicted prefill step (ms)")
  left.set_title("ranking (best at the top)")
  left.legend(loc="best")
  checked = [(lab, p) for lab, p in zip(labels, shown) if p.compiled is not None]
  ys = list(range(len(checked)))[::-1]
  pred = [p.predicted["param_bytes_per_device"] / 2 ** 20 for _, p in checked]
  comp = [p.compiled["param_bytes_per_device"] / 2 ** 20 for _, p in checked]
  right.barh([v + 0.2 for v in ys], pred, height=0.4, color="#55a868", label="predicted")
  right.barh([v - 0.2 for v in ys], comp, height=0.4, color="#c44e52", label="compiled")
  right.set_yticks(ys, [lab for lab, _ in checked])
  right.set_xlabel("parameter MiB per device")
  right.set_title("predicted against compiled")
  right.legend(loc="best")
  fig.tight_layout()
  fig.savefig(path, format="png", dpi=100)
  plt.close(fig)


def summary(plans: list[Plan]) -> list[dict]:
  """The JSON form, best first."""
  return [plan.as_dict() for plan in plans]



def run(config: Config, *, n_devices: int, hw, compile_top: int, chart: str | None,
        say) -> dict:
  """The `plan` command: rank, say why, compile the top `compile_top` on the devices at hand,
  print predicted beside compiled; returns {"plans": [...]} (best first)."""
  from jaxpar import plan as plan_lib
  plans, rejected = plan_lib.rank(config, n_devices, hw)
  say(f"hardware: {hw.name}: {hw.tflops:g} TFLOP/s, HBM {hw.hbm_gbps:g} GB/s, link "
      f"{hw.link_gbps:g} GB/s, {hw.memory_gib:g} GiB per device")
  say(f"{len(plans)} plans for {n_devices} devices (model {config.model.family}, "
      f"{config.model.n_layers} layers; batch {config.run.batch} x {config.run.seq_len} "
      f"tokens, {config.generate.max_new_tokens} new):")
  say(format_ranking(plans))
  for mesh, reason in rejected.items():
    say(f"not possible: {mesh}: {reason}")
  plan_lib.check_fits(plans, hw)
  say("best: " + why(plans[0], plans[1] if len(plans) > 1 else None))
  devices = jax.devices() if len(jax.devices()) == n_devices else jax.devices("cpu")
  if compile_top and len(devices) < n_devices:
    say(f"note: {len(devices)} devices here, {n_devices} planned for: nothing compiled (run "
        f"with --devices {n_devices} to compile on emulated CPU devices)")
    compile_top = 0
  for plan in [p for p in plans if p.predicted["fits"]][:compile_top]:
    say(f"compiling {plan.candidate.label()}...")
    plan.compiled = compile_plan(config, plan, devices[:n_devices])
  if compile_top:
    say("predicted against compiled (per device):")
    say(format_checked(plans))
  if chart:
    save_chart(plans, chart)
    say(f"saved the chart to {chart}")
  return {"devices": n_devices, "hardware": dataclasses.asdict(hw), "plans": summary(plans),
          "not_possible": rejected}
