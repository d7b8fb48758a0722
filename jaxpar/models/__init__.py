"""Model families behind one interface (`jaxpar.models.base.Family`).

`model.family` names one of `FAMILIES`; a Hugging Face checkpoint names its own by
config.json's `model_type`. A family is one module here (or your own, added by `register`);
nothing outside `models/` names one.
"""

import os

from jaxpar import checkpoint_meta, hf_files
from jaxpar.errors import UserError
from jaxpar.models import base, gpt, llama

FAMILIES: dict[str, base.Family] = {
    f.name: f for f in (gpt.FAMILY, llama.LLAMA, llama.MISTRAL, llama.QWEN2, llama.QWEN3)}


def register(new: base.Family) -> base.Family:
  """Adds a family (e.g. your own model, defined outside jaxpar) so that `model.family` can
  name it; every command and runtime function then runs it. Returns it."""
  if new.name in FAMILIES and FAMILIES[new.name] is not new:
    raise UserError(f"model family {new.name!r} is already registered; pick another name")
  FAMILIES[new.name] = new
  return new


def family(name: str) -> base.Family:
  """The family `model.family` names."""
  if name not in FAMILIES:
    raise UserError(f"model.family={name!r}: unknown family; jaxpar has "
                    f"{', '.join(FAMILIES)}")
  return FAMILIES[name]


def checkpoint_config(checkpoint: str) -> dict:
  """ModelConfig fields from a checkpoint directory: a jaxpar (Orbax) checkpoint's recorded
  family and sizes, or a Hugging Face directory's family (by config.json's model_type), sizes
  and end-of-text ids."""
  if os.path.isdir(checkpoint) and checkpoint_meta.is_jaxpar(checkpoint):
    fields = checkpoint_meta.model_fields(checkpoint)
    family(fields["family"])  # a family this jaxpar has
    return fields
  raw = hf_files.read_config(checkpoint)
  model_type = raw.get("model_type")
  by_type = {t: f for f in FAMILIES.values() for t in f.model_types}
  if model_type not in by_type:
    raise UserError(f"checkpoint {checkpoint}: config.json model_type={model_type!r} is not "
                    f"supported; jaxpar reads {', '.join(sorted(by_type))}")
  fields = by_type[model_type].from_hf(raw, checkpoint)
  fields["eos_token_ids"] = hf_files.eos_ids(checkpoint, raw, fields["vocab_size"])
  return fields
