"""The models of the registered families: `model.family` -> `base.Family`.

The config side of each family (its options, check and config.json readers) is registered in
`jaxpar.families`; this module adds the model (JAX) to each name. `register` adds your own
family, defined outside jaxpar, to both.
"""

from jaxpar import families
from jaxpar.errors import UserError
from jaxpar.models import base, gpt, llama

FAMILIES: dict[str, base.Family] = {
    f.name: f for f in (gpt.FAMILY, llama.LLAMA, llama.MISTRAL, llama.QWEN2, llama.QWEN3,
                        llama.MIXTRAL, llama.QWEN3_MOE)}


def register(new: base.Family) -> base.Family:
  """Adds a family (e.g. your own model, defined outside jaxpar) so that `model.family` can
  name it; every command and runtime function then runs it. Returns it."""
  if new.name in FAMILIES and FAMILIES[new.name] is not new:
    raise UserError(f"model family {new.name!r} is already registered; pick another name")
  families.register(new.spec)
  FAMILIES[new.name] = new
  return new


def family(name: str) -> base.Family:
  """The family `model.family` names."""
  families.family(name)  # the error for a name nobody registered
  if name not in FAMILIES:
    raise UserError(f"model.family={name!r} has options registered but no model; register "
                    f"its model with jaxpar.models.registry.register")
  return FAMILIES[name]
