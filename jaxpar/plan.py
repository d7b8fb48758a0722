"""Plan before compiling: every layout the model, batch and devices allow, ranked by the cost
model (`jaxpar.plan_cost`: per-device bytes, collectives, pipeline bubble, step time).

A plan is a (data, stage, model) mesh (and `expert`, for a mixture of experts), a pipeline
schedule (microbatches M, repeats R) and, where `data` > 1 without a pipeline, the choice of
FSDP (`rules.embed=data`: parameters split over `data` too, each layer's weights gathered just
before use; with a pipeline XLA would gather every stage's layers at once, so it is not offered
there). Plans are ranked by predicted prefill time among those that fit the device memory, then
by bytes per device.
`jaxpar.plan_report` compiles the best to check the predictions.
"""

import dataclasses

from jaxpar import axes
from jaxpar.config import Config
from jaxpar.errors import UserError
from jaxpar.hardware import PRESETS, Hardware, for_devices, hardware, hardware_for  # noqa: F401
from jaxpar.models import registry
from jaxpar.plan_cost import (GB, GIB, Candidate, MeshShape, hlo_collectives,  # noqa: F401
                              param_bytes, predict, step_collectives)
from jaxpar.rules import Rules


def factorisations(n: int) -> list[tuple[int, int, int]]:
  """Every (data, stage, model) with product n."""
  divisors = [d for d in range(1, n + 1) if n % d == 0]
  return [(d, s, n // (d * s)) for d in divisors for s in divisors if (n // d) % s == 0]


def expert_splits(config: Config, n: int) -> list[tuple[int, int, int, int]]:
  """Every (data, stage, model, expert) with product n, `expert` > 1 only where it divides
  the model's experts (a dense model: expert 1)."""
  experts = getattr(config.model.options, "n_experts", 0)
  out = []
  splits = [x for x in range(1, n + 1) if n % x == 0 and (x == 1 or experts and not experts % x)]
  for e in splits:
    out += [(d, s, m, e) for d, s, m in factorisations(n // e)]
  return out


def candidates(config: Config, n_devices: int) -> tuple[list[Candidate], dict]:
  """The plans the model, batch and devices allow, and {label: why not} for the meshes that
  none of their schedules allows."""
  from jaxpar.runtime import inference  # the runtime's own checks decide what runs
  family = registry.family(config.model.family)
  rules, out, rejected = Rules(config.rules), [], {}
  L, B = config.model.n_layers, config.run.batch
  for d, s, m, x in expert_splits(config, n_devices):
    mesh = MeshShape({axes.DATA: d, axes.STAGE: s, axes.EXPERT: x, axes.MODEL: m})
    schedules = [(1, 1)] if s == 1 else [
        (M, R) for M in range(s, B + 1, s) for R in range(1, L // s + 1) if B % M == 0]
    found = None
    for M, R in schedules:
      c = Candidate(d, s, m, M, R, expert=x)
      try:
        cfg = c.config(config)
        inference.layout_for(cfg, mesh, rules, family)
        schedule = inference.make_schedule(cfg, mesh, rules, None)
        inference.check_batch(cfg, mesh, rules, family, schedule)
      except UserError as e:
        found = found or str(e)
        continue
      out.append(c)
      if s == 1 and d > 1 and not rules.mesh_axes(axes.EMBED):
        out += _fsdp(config, c)
    if s > 1 and not schedules:
      found = (f"model.n_layers={L} and run.batch={B} allow no schedule over {s} stages")
    if found and not any(c.mesh == mesh.shape for c in out):
      rejected[f"data={d} stage={s} model={m}" + (f" expert={x}" if x > 1 else "")] = found
  return out, rejected


@dataclasses.dataclass
class Plan:
  candidate: Candidate
  predicted: dict
  compiled: dict | None = None

  def as_dict(self) -> dict:
    c = self.candidate
    out = {"mesh": c.mesh, "pipeline": {"microbatches": c.microbatches, "repeats": c.repeats},
           "fsdp": c.fsdp, "predicted": self.predicted}
    if self.compiled is not None:
      out["compiled"] = self.compiled
    return out


def _fsdp(config: Config, c: Candidate) -> list[Candidate]:
  """The FSDP variant of `c`, if the parameters' widths split over `data`."""
  fsdp = dataclasses.replace(c, fsdp=True)
  try:
    param_bytes(config, fsdp)
  except UserError:
    return []
  return [fsdp]


def rank(config: Config, n_devices: int, hw: Hardware) -> tuple[list[Plan], dict]:
  """(every plan, best first: those that fit, by predicted prefill time; then the rest by
  bytes per device), and {mesh: why not} for meshes no schedule allows."""
  found, rejected = candidates(config, n_devices)
  if not found:
    reasons = "; ".join(f"{k}: {v}" for k, v in rejected.items())
    raise UserError(f"no layout of {n_devices} devices runs this model and batch ({reasons})")
  plans = [Plan(c, predict(config, c, hw)) for c in found]

  def key(plan: Plan):
    p, c = plan.predicted, plan.candidate
    return (not p["fits"], p["prefill"]["step_s"] if p["fits"] else p["bytes_per_device"],
            p["decode"]["step_s"], p["bytes_per_device"], c.stage, c.model)
  return sorted(plans, key=key), rejected


def check_fits(plans: list[Plan], hw: Hardware) -> None:
  """A UserError saying by how much the smallest plan misses, when none fits."""
  if plans and not plans[0].predicted["fits"]:
    best = min(plans, key=lambda p: p.predicted["bytes_per_device"])
    need = best.predicted["bytes_per_device"]
    raise UserError(
        f"no layout fits {hw.memory_gib:g} GiB per device: the smallest, "
        f"{best.candidate.label()}, needs {need / GIB:.2f} GiB per device (parameters "
        f"{best.predicted['param_bytes_per_device'] / GIB:.2f}, KV cache "
        f"{best.predicted['kv_cache_bytes_per_device'] / GIB:.2f}, temporaries "
        f"{best.predicted['temp_bytes_per_device'] / GIB:.2f}), "
        f"{(need - hw.memory_gib * GIB) / GIB:.2f} GiB too many; use more devices, a smaller "
        f"batch or sequence, or bfloat16")
