"""Parsing of config values: one key's value checked against its declared type, the rule
table, a section's keys. Each failure is a one-line `UserError` naming the key, the value and
the fix. Imports no JAX."""

import dataclasses
import re
import types
import typing
from typing import Any

import yaml

from jaxpar import axes
from jaxpar.errors import UserError

# YAML 1.1 reads `1e-05` (no dot) as a string: numbers in any usual notation are floats here.
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def check_type(key: str, value: Any, kind: Any) -> Any:
  """Returns `value` as `kind` (int, float, bool, str, tuple of ints, or X | None) or raises
  a UserError."""
  if isinstance(kind, types.UnionType):
    inner = [k for k in typing.get_args(kind) if k is not type(None)]
    if value is None:
      return None
    kind = inner[0]
  if kind is tuple:
    items = value if isinstance(value, (list, tuple)) else [value]
    return tuple(check_type(f"{key}[{i}]", v, int) for i, v in enumerate(items))
  if kind is float and isinstance(value, str) and _FLOAT.match(value.strip()):
    return float(value)
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if kind is int and isinstance(value, bool) or not isinstance(value, kind):
    raise UserError(f"{key}={value!r} is a {type(value).__name__}, expected {kind.__name__}; "
                    f"fix the value in the config or the --set override")
  return value


def rule_value(key: str, value: Any) -> Any:
  """A rule's target: a mesh axis, a list of mesh axes, or null."""
  targets = value if isinstance(value, (list, tuple)) else [value]
  if value is None:
    return None
  for target in targets:
    if target not in axes.MESH_AXES:
      raise UserError(f"{key}={value!r}: {target!r} is not a mesh axis; use one of "
                      f"{', '.join(axes.MESH_AXES)}, a list of them, or null (replicated)")
  return tuple(targets) if isinstance(value, (list, tuple)) else value


def rule_table(key: str, value: Any) -> tuple:
  if not isinstance(value, dict):
    raise UserError(f"{key} is a {type(value).__name__}, expected a mapping of logical names to "
                    f"mesh axes, e.g. 'rules: {{batch: data, mlp: model}}'")
  table = []
  for name, target in value.items():
    if name not in axes.LOGICAL_NAMES:
      raise UserError(f"{key}.{name}: unknown logical name {name!r}; known names: "
                      f"{', '.join(axes.LOGICAL_NAMES)}")
    table.append((name, rule_value(f"{key}.{name}", target)))
  return tuple(table)


def mapping(name: str, raw: Any) -> dict:
  if not isinstance(raw, dict):
    raise UserError(f"{name} is a {type(raw).__name__}, expected a mapping of keys to values")
  return raw


def section(name: str, cls: type, raw: Any, base: Any) -> Any:
  if raw is None:  # every key commented out
    return base
  hints = typing.get_type_hints(cls)
  fields = {f.name for f in dataclasses.fields(cls)}
  values = {}
  for key, value in mapping(name, raw).items():
    if key not in fields:
      raise UserError(f"{name}.{key}: unknown key; known keys of '{name}': "
                      f"{', '.join(sorted(fields))}")
    values[key] = check_type(f"{name}.{key}", value, hints[key])
  return dataclasses.replace(base, **values)


def parse_override(text: str) -> tuple[list[str], Any]:
  """'model.n_layers=4' -> (['model', 'n_layers'], 4). Values are parsed as YAML scalars."""
  key, sep, value = text.partition("=")
  if key.strip() == "mesh" and sep:
    if value.strip() == "auto":
      return ["mesh"], "auto"
    raise UserError(f"--set {text!r}: the whole mesh takes only 'auto' (the planner picks the "
                    f"sizes); set sizes with mesh.data=, mesh.stage=, mesh.model=")
  if not sep or not key or "." not in key:
    raise UserError(f"--set {text!r}: expected section.key=value, e.g. --set model.n_layers=4")
  try:
    parsed = yaml.safe_load(value) if value else None
  except yaml.YAMLError:
    raise UserError(f"--set {text!r}: the value {value!r} is not valid YAML; quote it") from None
  return key.split("."), parsed
