"""Hugging Face checkpoint files, read without JAX: config.json, generation_config.json and
safetensors (one file, or several with `model.safetensors.index.json`).

Tensors are memory-mapped: `SafeTensors.read(name, box)` touches only the bytes of the
requested rectangle, so a device that needs one slice of a tensor never reads the rest.
bfloat16 tensors are read as `ml_dtypes.bfloat16` (numpy has no bfloat16 of its own).
"""

import json
import os
import struct
from typing import Any

import ml_dtypes
import numpy as np

from jaxpar.errors import UserError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


def read_json(checkpoint: str, name: str, *, required: bool = True) -> dict | None:
  """The parsed JSON object `checkpoint`/`name` (None when absent and not `required`)."""
  path = os.path.join(checkpoint, name)
  if not os.path.isfile(path):
    if required:
      raise UserError(f"checkpoint {checkpoint}: no {name} in the directory; save the model "
                      f"with save_pretrained, which writes {name} next to the weights")
    return None
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    where = f" at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
    raise UserError(f"checkpoint {checkpoint}: {path} is not valid JSON{where}; re-save it with "
                    f"save_pretrained") from None
  if not isinstance(raw, dict):
    raise UserError(f"checkpoint {checkpoint}: {path} holds a {type(raw).__name__}, expected a "
                    f"JSON object")
  return raw


def read_config(checkpoint: str) -> dict:
  """`checkpoint`/config.json, checked to be a directory with one."""
  if not os.path.isdir(checkpoint):
    raise UserError(f"model.checkpoint={checkpoint!r}: no such directory; pass a directory "
                    f"written by save_pretrained (config.json + model.safetensors)")
  return read_json(checkpoint, "config.json")


def eos_ids(checkpoint: str, raw: dict, vocab_size: int) -> tuple[int, ...]:
  """End-of-text ids: generation_config.json's, else config.json's (an int or a list), keeping
  those inside the vocabulary (an id outside it can never be produced)."""
  generation = read_json(checkpoint, "generation_config.json", required=False) or {}
  value = generation.get("eos_token_id", raw.get("eos_token_id"))
  values = value if isinstance(value, list) else [value]
  return tuple(v for v in values if isinstance(v, int) and not isinstance(v, bool)
               and 0 <= v < vocab_size)


class SafeTensors:
  """The tensors of a checkpoint directory, by name, across one or several files."""

  def __init__(self, checkpoint: str):
    self.checkpoint = checkpoint
    index = read_json(checkpoint, INDEX, required=False)
    if index is not None:
      weight_map = index.get("weight_map")
      if not isinstance(weight_map, dict):
        raise UserError(f"checkpoint {checkpoint}: {INDEX} has no 'weight_map' object; re-save "
                        f"the model with save_pretrained")
      files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(checkpoint, SINGLE)):
      files = [SINGLE]
    else:
      raise UserError(f"checkpoint {checkpoint}: no {SINGLE} (or {INDEX}) in the directory; "
                      f"save the model with save_pretrained (safe_serialization, the default)")
    self.entries: dict[str, tuple[str, dict, int]] = {}  # name -> (file, header entry, start)
    for name in files:
      path = os.path.join(checkpoint, name)
      header, start = self._header(path)
      for key, entry in header.items():
        if key != "__metadata__":
          self.entries[key] = (path, entry, start)
    self._maps: dict[str, np.memmap] = {}

  def _header(self, path: str) -> tuple[dict, int]:
    def broken(why: str) -> UserError:
      return UserError(f"checkpoint {self.checkpoint}: {path} is not a readable safetensors "
                       f"file ({why}); re-save it with save_pretrained")
    if not os.path.isfile(path):
      raise broken("missing: the index names it")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise broken("too short")
      (n,) = struct.unpack("<Q", head)
      if n > size - 8:
        raise broken("header larger than the file")
      try:
        header = json.loads(f.read(n))
      except (json.JSONDecodeError, UnicodeDecodeError):
        raise broken("header is not JSON") from None
    if not isinstance(header, dict):
      raise broken("header is not a JSON object")
    for key, entry in header.items():
      if key == "__metadata__":
        continue
      begin, end = entry.get("data_offsets", (0, -1))
      if 8 + n + end > size:
        raise broken(f"tensor {key} runs past the end of the file: truncated")
    return header, 8 + n

  def keys(self) -> set[str]:
    return set(self.entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.entries[name][1]["shape"])

  def dtype(self, name: str) -> str:
    return self.entries[name][1]["dtype"]

  def array(self, name: str) -> np.ndarray:
    """Tensor `name` as a read-only memory-mapped array (nothing read until indexed)."""
    path, entry, start = self.entries[name]
    if entry["dtype"] not in _DTYPES:
      raise UserError(f"checkpoint {self.checkpoint}: tensor {name} has dtype {entry['dtype']}, "
                      f"expected a float type ({', '.join(_DTYPES)})")
    if path not in self._maps:
      self._maps[path] = np.memmap(path, np.uint8, mode="r")
    begin, end = entry["data_offsets"]
    raw = self._maps[path][start + begin:start + end]
    return raw.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])

  def release(self) -> None:
    """Unmaps the files (each is mapped again when next read): the pages read so far stop
    counting in this process's memory."""
    self._maps.clear()

  def read(self, name: str, box: tuple[slice, ...]) -> np.ndarray:
    """The rectangle `box` of tensor `name`, as float32."""
    return np.asarray(self.array(name)[box], np.float32)


def check_keys(raw: dict, checkpoint: str, *, handled: set, fixed: dict, ignored: set,
               family: str) -> None:
  """The allow-list of a family's config.json: every key is `handled` (read into the model
  config), `ignored` (no effect on inference), or `fixed` at the only value jaxpar runs
  ({key: allowed values}); anything else is an error naming it."""
  for key, value in raw.items():
    if key in handled or key in ignored:
      continue
    if key in fixed:
      if value not in fixed[key]:
        allowed = " or ".join(json.dumps(v) for v in fixed[key])
        raise UserError(f"checkpoint {checkpoint}: config.json {key}={json.dumps(value)}; "
                        f"jaxpar's {family} supports only {key}={allowed}")
      continue
    raise UserError(f"checkpoint {checkpoint}: config.json has {key}={json.dumps(value)}, which "
                    f"jaxpar's {family} does not implement; remove it if it is at its default, "
                    f"or use a model without it")


def number(raw: dict, key: str, checkpoint: str, kind: type = int, default: Any = None) -> Any:
  """config.json's `key` as an int or float (a UserError naming it otherwise)."""
  if key not in raw or raw[key] is None:
    if default is not None:
      return default
    raise UserError(f"checkpoint {checkpoint}: config.json has no {key!r}; add it")
  value = raw[key]
  ok = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
  if isinstance(value, bool) or not ok:
    raise UserError(f"checkpoint {checkpoint}: config.json {key}={value!r} is not "
                    f"{'a number' if kind is float else 'an integer'}; fix config.json")
  return kind(value)


_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  """Writes `tensors` as one safetensors file (float32/float16/bfloat16 arrays, in name
  order), the format `SafeTensors` reads: an 8-byte header length, a JSON header, raw data."""
  header, offset = {}, 0
  for name in sorted(tensors):
    array = tensors[name]
    header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
  header["__metadata__"] = {"format": "pt"}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob)
    for name in sorted(tensors):
      f.write(np.ascontiguousarray(tensors[name]).tobytes())
