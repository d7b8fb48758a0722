"""The registry of what each model family adds to the config, JAX-free.

`jaxpar.config` keeps the sizes every family shares; a family's own options (Llama's rotary
settings, Mistral's window, ...) are a frozen dataclass beside its model, registered here by
name with a check and the readers of its Hugging Face config.json. The config finds a family
here, never by importing `jaxpar.models`: the built-in families register when `jaxpar` is
imported (`jaxpar/models/__init__.py` imports their JAX-free `*_config` modules), a user's
family when `jaxpar.models.registry.register` is called. A model that is not a decoder (the
CNN) registers a config section of its own the same way (`register_section`).

This module imports nothing from jaxpar but `errors`, so every module may import it.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

from jaxpar.errors import UserError


@dataclasses.dataclass(frozen=True)
class NoOptions:
  """The options of a family that has none beyond the shared sizes (GPT-2, your own)."""


def _no_check(model: Any) -> None:
  del model


@dataclasses.dataclass(frozen=True)
class Spec:
  """A family as the config sees it.

  - `options`: a frozen dataclass of the family's own options (`model.options`); its fields
    are the `model.KEY` keys a config may set for this family.
  - `check(model)`: one-line UserErrors for values this family cannot run (no JAX).
  - `model_types`: config.json `model_type`s read as this family.
  - `from_hf(raw, checkpoint)`: config.json (a dict) -> model fields, shared and own alike.
  - `to_hf(model)`: the config.json `from_hf` reads back; None: no Hugging Face form.
  """
  name: str
  options: type = NoOptions
  check: Callable[[Any], None] = _no_check
  model_types: tuple[str, ...] = ()
  from_hf: Callable[[dict, str], dict] | None = None
  to_hf: Callable[[Any], dict] | None = None


@dataclasses.dataclass(frozen=True)
class Section:
  """A config section a non-decoder model adds (e.g. `cnn`): its dataclass and its check."""
  name: str
  options: type
  check: Callable[[Any], None] = _no_check


FAMILIES: dict[str, Spec] = {}
SECTIONS: dict[str, Section] = {}


def register(spec: Spec) -> Spec:
  """Adds a family so that `model.family` can name it. Returns it."""
  if spec.name in FAMILIES and FAMILIES[spec.name] != spec:
    raise UserError(f"model family {spec.name!r} is already registered; pick another name")
  FAMILIES[spec.name] = spec
  return spec


def register_section(section: Section) -> Section:
  """Adds a config section (`NAME.KEY` keys) for a model that is not a decoder."""
  if section.name in SECTIONS and SECTIONS[section.name] != section:
    raise UserError(f"config section {section.name!r} is already registered; pick another name")
  SECTIONS[section.name] = section
  return section


def family(name: str) -> Spec:
  """The family `model.family` names."""
  if name not in FAMILIES:
    raise UserError(f"model.family={name!r}: unknown family; jaxpar has "
                    f"{', '.join(FAMILIES)}")
  return FAMILIES[name]


def option_names(name: str) -> tuple[str, ...]:
  """The `model.KEY` keys family `name` adds to the shared ones."""
  return tuple(f.name for f in dataclasses.fields(family(name).options))


def owners(key: str) -> list[str]:
  """The registered families that have option `key`."""
  return [n for n, s in FAMILIES.items() if key in {f.name for f in dataclasses.fields(s.options)}]


def by_model_type() -> dict[str, Spec]:
  """config.json `model_type` -> the family that reads it."""
  return {t: s for s in FAMILIES.values() for t in s.model_types}
