"""Typed configuration: YAML files in `configs/` loaded into frozen dataclasses.

A config has sections `mesh`, `model`, `run` and an optional `rules` table. Unknown keys,
wrong types and values out of range are `UserError`s that name the key, the value and the
fix. `key=value` overrides (`--set model.n_layers=4`) go through the same checks. This module
imports no JAX, so the CLI can validate a config before JAX starts.
"""

import dataclasses
import math
import os
import typing
from typing import Any

import yaml

from jaxpar import axes, checkpoint_meta, config_parse, families
from jaxpar.config_check import validate
from jaxpar.errors import UserError


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes; one of them may be -1 to take the remaining devices. `auto`
  (`mesh: auto` in a config, `--set mesh=auto`): the planner (`jaxpar.plan`) picks the sizes
  and the pipeline schedule when the command starts."""
  data: int = -1
  stage: int = 1
  model: int = 1
  expert: int = 1   # experts of mixture-of-experts models split over this many devices
  cpu_devices: int = 8  # emulated CPU devices when no accelerator is present
  auto: bool = False

  def shape(self, n_devices: int) -> dict[str, int]:
    """Resolves -1 and checks the product against `n_devices`; returns {axis: size}."""
    if self.auto:
      raise UserError("mesh: auto is chosen by the planner when a decoder command starts; "
                      "this command needs explicit sizes (mesh.data, mesh.stage, mesh.model)")
    sizes = {name: getattr(self, name) for name in axes.MESH_AXES}
    free = [name for name, size in sizes.items() if size == -1]
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if len(free) > 1:
      raise UserError(f"mesh: {', '.join(f'mesh.{n}=-1' for n in free)}: at most one axis "
                      f"may be -1; set the others to explicit sizes")
    if free:
      if n_devices % fixed:
        raise UserError(f"mesh.{free[0]}=-1 cannot fill {n_devices} devices: the other axes "
                        f"take {fixed}, which does not divide {n_devices}; fix the sizes so their "
                        f"product divides the device count")
      sizes[free[0]] = n_devices // fixed
    elif fixed != n_devices:
      desc = " x ".join(f"{n}={s}" for n, s in sizes.items())
      raise UserError(f"mesh {desc} needs {fixed} devices but {n_devices} are present; set one "
                      f"axis to -1 (e.g. --set mesh.data=-1) or run with --devices {fixed}")
    return sizes


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only transformer; `family` picks the architecture (`jaxpar.families`).

  The sizes here are shared by every family (and read by the runtime, the planner and the
  loaders); a family's own options are `options`, its dataclass beside its model (e.g.
  `LlamaOptions` in `jaxpar.models.llama_config`). In YAML and `--set` both are `model.KEY`:
  the loader routes an option key to the family's dataclass, and refuses a key the family
  does not have. With `checkpoint` set, the family and sizes come from its config.json.
  """
  family: str = "gpt2"       # gpt2 | llama | mistral | qwen2 | qwen3 (jaxpar.families)
  vocab_size: int = 256
  d_model: int = 64
  n_heads: int = 4
  n_kv_heads: int = 0        # key/value heads (grouped-query attention); 0: n_heads
  head_dim: int = 0          # width of one head; 0: d_model / n_heads
  n_layers: int = 2
  d_ff: int = 256
  max_seq_len: int = 128
  norm_eps: float = 1e-5
  init_std: float = 0.02
  dtype: str = "float32"
  # Run the layer stack with a lax.scan (compile time independent of depth) or unrolled
  # (faster decoding on XLA:CPU, which copies each layer's weights out of a scanned stack
  # every step). null: unrolled for generation on CPU, scan otherwise.
  scan_layers: bool | None = None
  # A Hugging Face directory (config.json + safetensors, as save_pretrained writes it). When
  # set, the family and sizes above come from its config.json and the weights from its files.
  checkpoint: str = ""
  eos_token_ids: tuple = ()  # end-of-text tokens (from generation_config.json / config.json)
  # none | int8 (weights int8, one scale per output channel, activations float) |
  # int8-dynamic (weights and activations int8, activations scaled per token at run time).
  # Applied on the mesh after loading or initialising (jaxpar.quant).
  quantize: str = "none"
  kv_cache_dtype: str = ""   # "" (model.dtype) | int8 (one scale per token and head)
  # The family's own options: an instance of `jaxpar.families.family(family).options`.
  options: Any = families.NoOptions()

  @property
  def kv_heads(self) -> int:
    """Key/value heads (n_kv_heads, or n_heads when 0)."""
    return self.n_kv_heads or self.n_heads

  @property
  def head_size(self) -> int:
    """Width of one head (head_dim, or d_model / n_heads when 0)."""
    return self.head_dim or self.d_model // self.n_heads


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """The batch a command runs on and how it is timed."""
  batch: int = 8
  seq_len: int = 64
  seed: int = 0
  verify: bool = False  # recompute on one device and report the max difference
  warmup: int = 1       # untimed calls after compiling
  iters: int = 5        # timed calls for steady-state throughput


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """Autoregressive generation (`scripts/run.py generate`)."""
  max_new_tokens: int = 32
  temperature: float = 0.0  # 0: greedy
  top_k: int = 0            # 0: no top-k filter
  top_p: float = 1.0        # 1: no nucleus filter
  min_p: float = 0.0        # 0: no min-p filter
  presence_penalty: float = 0.0   # penalties as vLLM applies them (see README: serving)
  frequency_penalty: float = 0.0
  repetition_penalty: float = 1.0
  eos_id: int | None = None  # stop token; null: the checkpoint's EOS ids, if any; -1: none
  prompt_len: int = 32      # length of the seeded prompts when none are given


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
  """Speculative decoding (`generate`): `k` proposed tokens per row checked by the model in
  one pass; greedy output is the same token for token."""
  method: str = "none"  # none | ngram (prompt lookup) | draft (a smaller model) | self (tests)
  k: int = 4            # tokens proposed per pass
  ngram_max: int = 3    # ngram: the longest suffix of a row's tokens looked up in them
  ngram_min: int = 2    # ... the shortest (no match: a plain one-token step)
  draft: str = ""       # draft: checkpoint folder of a model with the same vocabulary


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  """The serving engine and HTTP server (`scripts/run.py serve`)."""
  max_slots: int = 8        # requests decoded together (a multiple of the data axis)
  max_len: int = 0          # positions per slot: prompt + max_tokens; 0: see serve.build
  max_tokens: int = 256     # the most new tokens a request may ask for (and the default)
  max_queue: int = 256      # requests waiting for a slot before new ones get 429
  min_bucket: int = 16      # prompts pad to 16, 24, 32, 48, 64, ... tokens (a program each)
  policy: str = "continuous"  # continuous: refill slots every step; static: whole batches
  prefix_reuse: bool = True  # a prompt starts from the longest prefix a slot's cache holds
  step_tokens: int = 4096   # prompt tokens computed between two decode steps, less the rows
                            # decoding; a longer prompt is prefilled in chunks; 0: no limit
  precompile: bool = True   # compile every program at start; false: each on first use
  shutdown_timeout: float = 10.0  # on SIGTERM, seconds in-flight requests get to finish
  model_name: str = ""      # the name clients ask for; "": the checkpoint's folder name


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """The schedule over the `stage` axis (used when mesh.stage > 1)."""
  microbatches: int = 4  # a multiple of mesh.stage that divides run.batch
  repeats: int = 1       # 1: GPipe; R > 1: circular, each stage holds R chunks of layers


@dataclasses.dataclass(frozen=True)
class Config:
  mesh: MeshConfig = MeshConfig()
  model: ModelConfig = ModelConfig()
  run: RunConfig = RunConfig()
  pipeline: PipelineConfig = PipelineConfig()
  generate: GenerateConfig = GenerateConfig()
  serve: ServeConfig = ServeConfig()
  speculative: SpeculativeConfig = SpeculativeConfig()
  # Ordered (logical name, mesh axis | tuple of mesh axes | None) pairs.
  rules: tuple = axes.DEFAULT_RULES
  # (name, dataclass) of each section a non-decoder model registers (e.g. `cnn`;
  # `jaxpar.families.register_section`), in registration order.
  sections: tuple = dataclasses.field(default_factory=lambda: _default_sections())

  def section(self, name: str) -> Any:
    """The registered section `name` (e.g. `config.section("cnn")`)."""
    for key, value in self.sections:
      if key == name:
        return value
    raise UserError(f"{name}: no such config section; registered sections: "
                    f"{', '.join(families.SECTIONS) or 'none'}")


def _default_sections() -> tuple:
  return tuple((name, s.options()) for name, s in families.SECTIONS.items())


_SECTIONS = {"mesh": MeshConfig, "model": ModelConfig, "run": RunConfig,
             "pipeline": PipelineConfig, "generate": GenerateConfig, "serve": ServeConfig,
             "speculative": SpeculativeConfig}
_CORE_KEYS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name != "options")


def _refuse_option(family: str, key: str, value: Any) -> None:
  """The one-line error for `model.KEY` that family `family` does not have."""
  owners = families.owners(key)
  if owners:
    raise UserError(f"model.{key}={value!r}: model.family={family} has no such option; drop "
                    f"it, or pick a family that has it ({', '.join(owners)})")
  known = sorted({*_CORE_KEYS, *families.option_names(family)})
  raise UserError(f"model.{key}: unknown key; known keys of 'model' (model.family={family}): "
                  f"{', '.join(known)}")


def _options_for(model: ModelConfig, family: str) -> Any:
  """`model.options` as family `family`'s dataclass: kept when the class is the same; else
  the new class's defaults, with every value set away from the old defaults carried over
  (or refused, when the new family has no such option)."""
  cls = families.family(family).options
  if isinstance(model.options, cls):
    return model.options
  old, fresh = model.options, type(model.options)()
  carried = {}
  for f in dataclasses.fields(old):
    value = getattr(old, f.name)
    if value != getattr(fresh, f.name):
      if f.name not in {g.name for g in dataclasses.fields(cls)}:
        _refuse_option(family, f.name, value)
      carried[f.name] = value
  return cls(**carried)


def replace_model(model: ModelConfig, **fields: Any) -> ModelConfig:
  """`model` with `fields` (`model.KEY` names, shared sizes and family options alike)
  replaced: the family first, then each key routed to the core or to the family's options
  (the order of keys never matters). A key the family does not have is a UserError."""
  family = fields.get("family", model.family)
  options = _options_for(model, family)
  core, own = {}, {}
  for key, value in fields.items():
    if key in _CORE_KEYS:
      core[key] = value
    elif key in families.option_names(family):
      own[key] = value
    else:
      _refuse_option(family, key, value)
  return dataclasses.replace(model, **core, options=dataclasses.replace(options, **own))


def model_fields(model: ModelConfig) -> dict:
  """The flat `model.KEY` -> value view (shared sizes, then the family's options): what a
  config file writes and a checkpoint records."""
  core = {key: getattr(model, key) for key in _CORE_KEYS}
  return {**core, **dataclasses.asdict(model.options)}


def _model_section(raw: Any, base: ModelConfig) -> ModelConfig:
  """The `model` section: typed like any section, each key checked against the family's
  options once the family (which may come last) is known."""
  if raw is None:
    return base
  raw = config_parse.mapping("model", raw)
  hints = typing.get_type_hints(ModelConfig)
  family = raw.get("family", base.family)
  if "family" in raw:
    family = config_parse.check_type("model.family", family, str)
  spec = families.family(family)
  hints |= typing.get_type_hints(spec.options)
  values = {}
  for key, value in raw.items():
    if key not in hints or key == "options":
      _refuse_option(family, key, value)
    values[key] = config_parse.check_type(f"model.{key}", value, hints[key])
  if values.get("checkpoint"):  # ~ and ~user, as a shell would
    values["checkpoint"] = os.path.expanduser(values["checkpoint"])
  return replace_model(base, **values)


def _sections(raw: Any, base: Config) -> tuple:
  """`base.sections` with each registered section in `raw` updated."""
  parse = lambda name, value: config_parse.section(name, families.SECTIONS[name].options,
                                                   raw[name], value)
  return tuple((name, parse(name, value) if name in raw else value)
               for name, value in base.sections)


def from_dict(raw: dict, *, base: Config | None = None, check: bool = True) -> Config:
  """Builds a Config from a nested dict (as parsed from YAML) on top of `base`; `check`
  validates the result (off while a series of overrides is applied)."""
  base = base or Config()
  if raw is None:
    raw = {}
  known = [*_SECTIONS, "rules", *families.SECTIONS]
  if not isinstance(raw, dict):
    raise UserError(f"config is a {type(raw).__name__}, expected a mapping with sections "
                    f"{', '.join(known)}")
  updates = {}
  for name, value in raw.items():
    if name == "rules":  # a partial table changes those rules, in place, and keeps the rest
      rules = dict(base.rules)
      rules.update(config_parse.rule_table("rules", {} if value is None else value))
      updates["rules"] = tuple(rules.items())
    elif name == "mesh" and value == "auto":
      updates[name] = dataclasses.replace(base.mesh, auto=True)
    elif name == "model":
      updates[name] = _model_section(value, base.model)
    elif name in _SECTIONS:
      updates[name] = config_parse.section(name, _SECTIONS[name], value, getattr(base, name))
      if name == "mesh" and set(value or {}) & set(axes.MESH_AXES) and "auto" not in value:
        updates[name] = dataclasses.replace(updates[name], auto=False)  # sizes given
    elif name not in families.SECTIONS:
      raise UserError(f"{name}: unknown config section; known sections: {', '.join(known)}")
  updates["sections"] = _sections(raw, base)
  config = dataclasses.replace(base, **updates)
  if "model" in raw and config.model.checkpoint:
    config = dataclasses.replace(config, model=_checkpoint_sizes(config.model,
                                                                 raw["model"] or {}))
  if check:
    validate(config)
  return config


def _checkpoint_sizes(model: ModelConfig, given: dict) -> ModelConfig:
  """The model with the family, sizes and options of `model.checkpoint` (its config.json,
  read by the family's registered reader, or a jaxpar checkpoint's record). Values set
  earlier (e.g. by the base YAML) are replaced; a value `given` with the checkpoint, or after
  it, must agree with the checkpoint."""
  sizes = checkpoint_meta.checkpoint_config(model.checkpoint)
  current = model_fields(model)
  for key, value in sizes.items():
    if key in given and current.get(key) != value:
      raise UserError(f"model.{key}={current.get(key)!r} disagrees with model.checkpoint="
                      f"{model.checkpoint} (its config.json gives {value!r}); the checkpoint "
                      f"sets the model sizes: drop model.{key}")
  return replace_model(model, **sizes)


def apply_overrides(config: Config, overrides: list[str]) -> Config:
  """Applies `section.key=value` overrides; `rules.NAME=AXIS` sets one rule.

  `model.checkpoint=` goes first, whatever its place, so every size override is checked
  against the checkpoint rather than silently replaced by it. The other `model.` overrides
  go in together, so `model.family` may come after the options of the family it names.
  """
  keys = [t.partition("=")[0].strip() for t in overrides]
  sizes = [k for k in keys if k in [f"mesh.{a}" for a in axes.MESH_AXES]]
  if "mesh" in keys and sizes:  # either order would drop one of them
    raise UserError(f"--set mesh=auto with --set {', '.join(sizes)}: auto picks every mesh "
                    f"size; drop one of them")
  first = [t for t in overrides if t.partition("=")[0].strip() == "model.checkpoint"]
  model = {}
  for text in first + [t for t in overrides if t not in first]:
    path, value = config_parse.parse_override(text)
    section, key = path[0], ".".join(path[1:])
    if section == "rules":
      config = from_dict({"rules": {key: value}}, base=config, check=False)
    elif section == "mesh" and not key:  # mesh=auto
      config = from_dict({"mesh": value}, base=config, check=False)
    elif section == "model" and text not in first:
      model[key] = value
    else:
      config = from_dict({section: {key: value}}, base=config, check=False)
  if model:
    config = from_dict({"model": model}, base=config, check=False)
  validate(config)  # once, so the order of overrides never matters
  return config


def load(path: str | os.PathLike, overrides: list[str] = ()) -> Config:
  """Loads a YAML config (safe_load) and applies overrides; every error is a UserError."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise UserError(f"--config {path}: no such file; pass a YAML file such as "
                    f"configs/default.yaml")
  try:
    with open(path) as f:
      raw = yaml.safe_load(f)
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark else ""
    raise UserError(f"--config {path}: not valid YAML{where}; fix the syntax") from None
  return apply_overrides(from_dict(raw, check=False), list(overrides))


def to_dict(config: Config) -> dict:
  """A plain dict (rules as an ordered mapping) for printing and JSON."""
  out = {name: dataclasses.asdict(getattr(config, name)) for name in _SECTIONS}
  out["model"] = model_fields(config.model)
  out |= {name: dataclasses.asdict(value) for name, value in config.sections}
  out["rules"] = {name: list(t) if isinstance(t, tuple) else t for name, t in config.rules}
  return out
