"""What a jaxpar (Orbax) checkpoint directory says about itself, read without JAX: `params/`
(Orbax) and `jaxpar.json` (family, sizes, logical names), which is written last and so marks
the checkpoint complete. Saving and restoring are in `jaxpar.runtime.checkpoint`."""

import os

from jaxpar import families, hf_files
from jaxpar.errors import UserError

META, PARAMS, FORMAT = "jaxpar.json", "params", "jaxpar-orbax/1"


PARTIAL = ".partial"  # where a conversion writes until it is complete (then renamed)


def is_jaxpar(path: str) -> bool:
  """A jaxpar checkpoint directory, complete or not (recognised by its contents: Orbax writes
  `params` under a temporary name first)."""
  if os.path.normpath(path).endswith(PARTIAL) or os.path.isfile(os.path.join(path, META)):
    return True
  return os.path.isdir(path) and any(n.startswith(PARAMS) for n in os.listdir(path))


def read_meta(path: str) -> dict:
  meta_path = os.path.join(path, META)
  if os.path.normpath(path).endswith(PARTIAL):
    raise UserError(f"checkpoint {path}: incomplete (an unfinished conversion's folder; the "
                    f"finished checkpoint is renamed without {PARTIAL}); run convert again")
  if not os.path.isfile(meta_path):
    raise UserError(f"checkpoint {path}: incomplete (no {META}: the conversion that wrote it did "
                    f"not finish); run convert again")
  meta = hf_files.read_json(path, META)
  if meta.get("format") != FORMAT:
    raise UserError(f"checkpoint {path}: {META} has format {meta.get('format')!r}, expected "
                    f"{FORMAT!r}; convert the model again with this jaxpar")
  return meta


# What a checkpoint folder holds besides its weights that `generate` and `serve` read: the
# tokenizer and the chat template (conversion copies them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja")


def check_out(out: str, *, overwrite: bool, source: str = "") -> str:
  """`out` (absolute) if a new checkpoint may be written there, else a UserError: its folder
  must exist; an existing checkpoint is replaced only with `overwrite`, anything else never,
  and never the checkpoint being read (`source`)."""
  out = os.path.abspath(out)
  if source and os.path.realpath(out) == os.path.realpath(source):
    raise UserError(f"--out {out} is the checkpoint being read (model.checkpoint); write the "
                    f"new one to another path")
  parent = os.path.dirname(out)
  if not os.path.isdir(parent):
    raise UserError(f"--out {out}: folder {parent} does not exist; create it or choose another "
                    f"path")
  if os.path.exists(out):
    is_checkpoint = is_jaxpar(out) or os.path.isfile(os.path.join(out, "config.json"))
    if not overwrite or not (is_checkpoint or (os.path.isdir(out) and not os.listdir(out))):
      what = "a checkpoint" if is_checkpoint else "and is not a checkpoint"
      fix = ("pass --overwrite to replace it" if is_checkpoint else
             "choose another path (jaxpar replaces only checkpoints)")
      raise UserError(f"--out {out}: already exists ({what}); {fix}")
  return out


def model_fields(path: str) -> dict:
  """Model fields (family, sizes and the family's options, flat) recorded in a jaxpar
  checkpoint."""
  fields = dict(read_meta(path)["model"])
  fields["eos_token_ids"] = tuple(fields.get("eos_token_ids", ()))
  return fields


def checkpoint_config(checkpoint: str) -> dict:
  """Model fields (`model.KEY` -> value, flat) from a checkpoint directory: a jaxpar (Orbax)
  checkpoint's recorded family and sizes, or a Hugging Face directory's family (by
  config.json's model_type, read by that family's registered reader), sizes and end-of-text
  ids."""
  if os.path.isdir(checkpoint) and is_jaxpar(checkpoint):
    fields = model_fields(checkpoint)
    families.family(fields["family"])  # a family this jaxpar has
    return fields
  raw = hf_files.read_config(checkpoint)
  model_type = raw.get("model_type")
  by_type = families.by_model_type()
  if model_type not in by_type:
    raise UserError(f"checkpoint {checkpoint}: config.json model_type={model_type!r} is not "
                    f"supported; jaxpar reads {', '.join(sorted(by_type))}")
  fields = by_type[model_type].from_hf(raw, checkpoint)
  fields["eos_token_ids"] = hf_files.eos_ids(checkpoint, raw, fields["vocab_size"])
  return fields
