"""Range checks of a whole config that need no devices (mesh divisibility is checked in
`jaxpar.rules`; what a program splits, by the program). One-line `UserError`s naming the key,
the value and the fix. Imports neither JAX nor `jaxpar.config` (whose loader calls these)."""

from typing import Any

from jaxpar import axes, families
from jaxpar.errors import UserError

_DTYPES = ("float32", "bfloat16", "float16")
QUANTIZE_MODES = ("none", "int8", "int8-dynamic")
KV_CACHE_DTYPES = ("", "int8")


def validate(config: Any) -> None:
  """Range checks of a `jaxpar.config.Config` that need no devices."""
  m, r = config.model, config.run
  positive = [("model.vocab_size", m.vocab_size), ("model.d_model", m.d_model),
              ("model.n_heads", m.n_heads), ("model.n_layers", m.n_layers),
              ("model.d_ff", m.d_ff), ("model.max_seq_len", m.max_seq_len),
              ("run.batch", r.batch), ("run.seq_len", r.seq_len), ("run.iters", r.iters),
              ("mesh.cpu_devices", config.mesh.cpu_devices),
              ("pipeline.microbatches", config.pipeline.microbatches),
              ("pipeline.repeats", config.pipeline.repeats),
              ("generate.max_new_tokens", config.generate.max_new_tokens),
              ("generate.prompt_len", config.generate.prompt_len),
              ("serve.max_slots", config.serve.max_slots),
              ("serve.max_tokens", config.serve.max_tokens),
              ("serve.max_queue", config.serve.max_queue),
              ("serve.min_bucket", config.serve.min_bucket)]
  for key, value in positive:
    if value < 1:
      raise UserError(f"{key}={value}: must be at least 1")
  g = config.generate
  if g.temperature < 0 or g.top_k < 0 or not 0 < g.top_p <= 1:
    raise UserError(f"generate.temperature={g.temperature}, generate.top_k={g.top_k}, "
                    f"generate.top_p={g.top_p}: need temperature >= 0, top_k >= 0 and "
                    f"0 < top_p <= 1")
  for key, value, low, high in [("min_p", g.min_p, 0, 1), ("presence_penalty",
                                 g.presence_penalty, -2, 2), ("frequency_penalty",
                                 g.frequency_penalty, -2, 2), ("repetition_penalty",
                                 g.repetition_penalty, 0, 2)]:
    if not low <= value <= high or (key == "repetition_penalty" and value == 0):
      raise UserError(f"generate.{key}={value}: expected a number from {low} to {high}"
                      f"{' (not 0)' if key == 'repetition_penalty' else ''}")
  if config.serve.policy not in ("continuous", "static"):
    raise UserError(f"serve.policy={config.serve.policy!r}: expected 'continuous' (refill slots "
                    f"every step) or 'static' (whole batches)")
  if 0 < config.serve.step_tokens < config.serve.min_bucket or config.serve.step_tokens < 0:
    raise UserError(f"serve.step_tokens={config.serve.step_tokens}: must be 0 (no limit) or at "
                    f"least serve.min_bucket={config.serve.min_bucket} (the smallest chunk)")
  if config.serve.max_len < 0 or config.serve.shutdown_timeout < 0:
    raise UserError(f"serve.max_len={config.serve.max_len}, serve.shutdown_timeout="
                    f"{config.serve.shutdown_timeout}: must be 0 or more")
  _check_speculative(config)
  if r.warmup < 0:
    raise UserError(f"run.warmup={r.warmup}: must be 0 or more")
  for name in axes.MESH_AXES:
    size = getattr(config.mesh, name)
    if size == 0 or size < -1:
      raise UserError(f"mesh.{name}={size}: must be a positive size or -1 (fill)")
  _check_model(m)
  names = [name for name, _ in config.rules]
  for name in set(names):
    if names.count(name) > 1:
      raise UserError(f"rules.{name}: listed {names.count(name)} times; give each logical name "
                      f"one rule")
  split = lambda target: set(target if isinstance(target, (list, tuple)) else [target]) - {None}
  table = dict(config.rules)
  experts, batch = split(table.get(axes.EXPERTS)), split(table.get(axes.BATCH))
  if experts & batch and not experts <= batch:  # the MoE exchanges tokens over them, or sums
    raise UserError(f"rules.experts={sorted(experts)} and rules.batch={sorted(batch)}: the "
                    f"experts' mesh axes must all split the batch, or none of them; change one "
                    f"rule")
  for name, section in config.sections:
    families.SECTIONS[name].check(section)


SPECULATIVE_METHODS = ("none", "ngram", "draft", "self")


def _check_speculative(config: Any) -> None:
  s = config.speculative
  if s.method not in SPECULATIVE_METHODS:
    raise UserError(f"speculative.method={s.method!r}: expected one of "
                    f"{', '.join(SPECULATIVE_METHODS)}")
  if s.k < 1 or not 1 <= s.ngram_min <= s.ngram_max:
    raise UserError(f"speculative.k={s.k}, speculative.ngram_min={s.ngram_min}, "
                    f"speculative.ngram_max={s.ngram_max}: need k >= 1 and "
                    f"1 <= ngram_min <= ngram_max")
  if (s.method == "draft") != bool(s.draft):
    raise UserError(f"speculative.method={s.method}, speculative.draft={s.draft!r}: a draft "
                    f"checkpoint goes with method draft only; set both or neither")


def _check_model(m: Any) -> None:
  if not m.head_dim and m.d_model % m.n_heads:
    raise UserError(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; "
                    f"pick a head count that divides the width, or set model.head_dim")
  if m.n_kv_heads < 0 or m.head_dim < 0:
    raise UserError(f"model.n_kv_heads={m.n_kv_heads}, model.head_dim={m.head_dim}: must be 0 "
                    f"(default) or positive")
  if m.n_heads % m.kv_heads:
    raise UserError(f"model.n_heads={m.n_heads} is not a multiple of model.n_kv_heads="
                    f"{m.n_kv_heads}: every key/value head serves a whole group of query heads")
  _check_family(m)
  if m.dtype not in _DTYPES:
    raise UserError(f"model.dtype={m.dtype!r}: expected one of {', '.join(_DTYPES)}")
  if m.quantize not in QUANTIZE_MODES:
    raise UserError(f"model.quantize={m.quantize!r}: expected one of "
                    f"{', '.join(QUANTIZE_MODES)}")
  if m.kv_cache_dtype not in KV_CACHE_DTYPES:
    raise UserError(f"model.kv_cache_dtype={m.kv_cache_dtype!r}: expected one of "
                    f"{', '.join(repr(d) for d in KV_CACHE_DTYPES)} ('' is model.dtype)")


def _check_family(m: Any) -> None:
  """The family's own checks, on options of the family's own class."""
  spec = families.family(m.family)
  if not isinstance(m.options, spec.options):
    raise UserError(f"model.options is a {type(m.options).__name__}, but model.family="
                    f"{m.family} takes {spec.options.__name__}; change the family with "
                    f"jaxpar.config.replace_model (or a config key), not dataclasses.replace")
  spec.check(m)
