"""Model sizes from a Hugging Face GPT-2 checkpoint's `config.json` (pure Python, no JAX).

`model.checkpoint: DIR` names a directory as `save_pretrained` writes it (`config.json` plus
`model.safetensors`); `jaxpar.config` calls `model_sizes(DIR)` so the config the rest of the
code sees already has the checkpoint's sizes. The weights are read by `jaxpar.runtime.hf`.
"""

import json
import os
from typing import Any

from jaxpar.errors import UserError

# config.json key -> ModelConfig field. n_inner may be null (then 4 * n_embd).
SIZE_KEYS = {"vocab_size": "vocab_size", "n_embd": "d_model", "n_head": "n_heads",
             "n_layer": "n_layers", "n_positions": "max_seq_len",
             "layer_norm_epsilon": "layer_norm_eps"}
# Activations with GPT-2's tanh-approximate GELU (the same function under two names).
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
# Options that would change the numerics: (config.json key, the only value jaxpar runs).
_FIXED = (("tie_word_embeddings", True), ("scale_attn_weights", True),
          ("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False))


def read_config(checkpoint: str) -> dict:
  """The parsed config.json of `checkpoint`, checked to be a GPT-2 we can run."""
  if not os.path.isdir(checkpoint):
    raise UserError(f"model.checkpoint={checkpoint!r}: no such directory; pass a directory "
                    f"written by save_pretrained (config.json + model.safetensors)")
  path = os.path.join(checkpoint, "config.json")
  if not os.path.isfile(path):
    raise UserError(f"checkpoint {checkpoint}: no config.json in the directory; save the model "
                    f"with save_pretrained, which writes config.json next to model.safetensors")
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    where = f" at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
    raise UserError(f"checkpoint {checkpoint}: {path} is not valid JSON{where}; re-save it with "
                    f"save_pretrained") from None
  if not isinstance(raw, dict):
    raise UserError(f"checkpoint {checkpoint}: {path} holds a {type(raw).__name__}, expected a "
                    f"JSON object of GPT-2 settings")
  model_type = raw.get("model_type")
  if model_type != "gpt2":
    raise UserError(f"checkpoint {checkpoint}: config.json model_type={model_type!r}; only "
                    f"GPT-2 checkpoints (model_type 'gpt2') are supported")
  activation = raw.get("activation_function", "gelu_new")
  if activation not in TANH_GELU:
    raise UserError(f"checkpoint {checkpoint}: config.json activation_function={activation!r}; "
                    f"jaxpar's GPT-2 uses tanh-approximate GELU ('gelu_new') only")
  for key, value in _FIXED:
    if key in raw and raw[key] != value:
      raise UserError(f"checkpoint {checkpoint}: config.json {key}={raw[key]!r}; jaxpar's GPT-2 "
                      f"supports only {key}={json.dumps(value)}")
  return raw


def _size(checkpoint: str, raw: dict, key: str, kind: type) -> Any:
  if key not in raw:
    raise UserError(f"checkpoint {checkpoint}: config.json has no {key!r}; add it (GPT-2 "
                    f"configs name vocab_size, n_embd, n_head, n_layer, n_positions)")
  value = raw[key]
  ok = (isinstance(value, (int, float)) if kind is float else isinstance(value, int))
  if isinstance(value, bool) or not ok:
    raise UserError(f"checkpoint {checkpoint}: config.json {key}={value!r} is not "
                    f"{'a number' if kind is float else 'an integer'}; fix config.json")
  return kind(value)


def model_sizes(checkpoint: str) -> dict:
  """{ModelConfig field: value} read from `checkpoint`/config.json: the sizes, d_ff and
  eos_token_id (-1 when absent or outside the vocabulary, as no token can then be it)."""
  raw = read_config(checkpoint)
  sizes = {field: _size(checkpoint, raw, key, float if field == "layer_norm_eps" else int)
           for key, field in SIZE_KEYS.items() if key != "layer_norm_epsilon"}
  sizes["layer_norm_eps"] = (_size(checkpoint, raw, "layer_norm_epsilon", float)
                             if "layer_norm_epsilon" in raw else 1e-5)
  n_inner = raw.get("n_inner")
  sizes["d_ff"] = 4 * sizes["d_model"] if n_inner is None else _size(checkpoint, raw,
                                                                        "n_inner", int)
  eos = raw.get("eos_token_id")
  if isinstance(eos, list):  # newer configs may list several; GPT-2 has one
    eos = eos[0] if eos else None
  ok = isinstance(eos, int) and not isinstance(eos, bool) and 0 <= eos < sizes["vocab_size"]
  sizes["eos_token_id"] = eos if ok else -1
  return sizes
