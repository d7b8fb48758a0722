"""The Llama family's side of the config, JAX-free: its own options (`LlamaOptions`, the
`model.KEY` keys only llama, mistral, qwen2, qwen3, mixtral and qwen3_moe have), their check,
and the config.json readers, registered by family name (`jaxpar.families`). Mixtral is Mistral
with a mixture-of-experts MLP in every block, Qwen3-MoE is Qwen3 with one.

The model is in `jaxpar.models.llama`.
"""

import dataclasses

from jaxpar import families, hf_files
from jaxpar.errors import UserError

ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaOptions:
  """What a Llama-family model has beyond the shared sizes (`model.options`)."""
  rope_theta: float = 10000.0
  rope_type: str = "default"  # default | linear | llama3 (rotary position scaling)
  rope_factor: float = 1.0    # linear and llama3: how much longer the context is made
  rope_low_freq_factor: float = 1.0   # llama3 only
  rope_high_freq_factor: float = 4.0  # llama3 only
  rope_original_max_len: int = 8192   # llama3 only: the pre-training context
  sliding_window: int = 0    # attend to the last N positions only (Mistral); 0: everything
  attn_bias: bool = False    # biases on q, k and v (Qwen2)
  qk_norm: bool = False      # RMSNorm of every q and k head before rotary (Qwen3)
  tie_embeddings: bool = True  # logits from the token embedding; false: a separate head
  # Mixture of experts (mixtral, qwen3_moe): every block's MLP is `n_experts` SwiGLU experts
  # of width `expert_d_ff` (0: d_ff), `experts_per_token` of them per token, their router
  # weights renormalised to sum to 1 when `norm_topk` (jaxpar.models.moe).
  n_experts: int = 0
  experts_per_token: int = 2
  expert_d_ff: int = 0
  norm_topk: bool = True

MOE_FAMILIES = ("mixtral", "qwen3_moe")


def check(cfg) -> None:
  o = cfg.options
  if o.rope_type not in ROPE_TYPES:
    raise UserError(f"model.rope_type={o.rope_type!r}: jaxpar runs rope types "
                    f"{', '.join(ROPE_TYPES)}")
  if cfg.head_size % 2:
    raise UserError(f"model.head_dim={cfg.head_size}: rotary positions need an even head width")
  if o.rope_type == "llama3" and o.rope_high_freq_factor <= o.rope_low_freq_factor:
    raise UserError(f"model.rope_high_freq_factor={o.rope_high_freq_factor} must exceed "
                    f"model.rope_low_freq_factor={o.rope_low_freq_factor} for rope_type llama3")
  moe = cfg.family in MOE_FAMILIES
  if moe and o.n_experts < 1:
    raise UserError(f"model.n_experts={o.n_experts}: model.family={cfg.family} needs at least "
                    f"one expert")
  if not moe and o.n_experts:
    raise UserError(f"model.n_experts={o.n_experts}: model.family={cfg.family} has a dense "
                    f"MLP; use model.family mixtral or qwen3_moe for experts")
  if moe and not 1 <= o.experts_per_token <= o.n_experts:
    raise UserError(f"model.experts_per_token={o.experts_per_token}: must be 1 to "
                    f"model.n_experts={o.n_experts}")
  if o.expert_d_ff < 0:
    raise UserError(f"model.expert_d_ff={o.expert_d_ff}: must be 0 (model.d_ff) or positive")
  if o.sliding_window < 0:
    raise UserError(f"model.sliding_window={o.sliding_window}: must be 0 (everything) or "
                    f"positive")


# ---- config.json ----

_IGNORED = {"architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
            "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache",
            "attention_dropout", "_name_or_path", "tokenizer_class", "max_window_layers",
            "layer_types"}
_FIXED = {"hidden_act": ("silu",), "pretraining_tp": (1,), "mlp_bias": (False,),
          "use_sliding_window": (False,), "use_mrope": (False,), "partial_rotary_factor": (1.0,)}
SIZES = {"vocab_size": "vocab_size", "hidden_size": "d_model",
         "num_attention_heads": "n_heads", "num_hidden_layers": "n_layers",
         "intermediate_size": "d_ff", "max_position_embeddings": "max_seq_len"}


def _rope(raw: dict, checkpoint: str) -> dict:
  """Rotary settings from `rope_parameters` (current transformers) or `rope_theta` +
  `rope_scaling` (files on the Hub)."""
  params = raw.get("rope_parameters") or dict(raw.get("rope_scaling") or {})
  if "rope_theta" in raw:
    params = {**params, "rope_theta": raw["rope_theta"]}
  kind = params.get("rope_type", params.get("type", "default"))
  if kind not in ROPE_TYPES:
    raise UserError(f"checkpoint {checkpoint}: config.json rope type {kind!r}; jaxpar runs "
                    f"{', '.join(ROPE_TYPES)}")
  known = {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
           "original_max_position_embeddings", "partial_rotary_factor"}
  for key in set(params) - known:
    raise UserError(f"checkpoint {checkpoint}: config.json rope setting {key!r} is not one "
                    f"jaxpar implements")
  out = {"rope_type": kind, "rope_theta": hf_files.number(params, "rope_theta", checkpoint,
                                                          float, 10000.0)}
  if kind != "default":
    out["rope_factor"] = hf_files.number(params, "factor", checkpoint, float)
  if kind == "llama3":
    out["rope_low_freq_factor"] = hf_files.number(params, "low_freq_factor", checkpoint, float)
    out["rope_high_freq_factor"] = hf_files.number(params, "high_freq_factor", checkpoint, float)
    out["rope_original_max_len"] = hf_files.number(params, "original_max_position_embeddings",
                                                   checkpoint)
  return out


def _experts(raw: dict, checkpoint: str, family: str) -> dict:
  """The mixture-of-experts options of a Mixtral or Qwen3-MoE config.json."""
  n = hf_files.number(raw, "num_local_experts" if "num_local_experts" in raw else
                      "num_experts", checkpoint)
  out = {"n_experts": n, "experts_per_token": hf_files.number(raw, "num_experts_per_tok",
                                                               checkpoint)}
  if family == "qwen3_moe":
    out["expert_d_ff"] = hf_files.number(raw, "moe_intermediate_size", checkpoint)
    out["norm_topk"] = bool(raw.get("norm_topk_prob", False))
    step, dense = raw.get("decoder_sparse_step", 1), raw.get("mlp_only_layers") or []
    if step != 1 or dense:
      raise UserError(f"checkpoint {checkpoint}: config.json decoder_sparse_step={step}, "
                      f"mlp_only_layers={dense}: some layers have a dense MLP; jaxpar runs "
                      f"Qwen3-MoE models whose every layer has experts")
  return out


_MOE_KEYS = {"num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
             "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"}
_TRAINING_ONLY = {"router_aux_loss_coef", "output_router_logits", "router_jitter_noise"}


def _reader(family: str, *, window: bool, biases: bool, qk_norm: bool):
  """config.json -> model fields for `family` (see `hf_files.check_keys`)."""
  def from_hf(raw: dict, checkpoint: str) -> dict:
    handled = {*SIZES, "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
               "rope_scaling", "rope_parameters", "tie_word_embeddings", "attention_bias",
               "sliding_window"}
    moe = family in MOE_FAMILIES
    if moe:
      handled |= _MOE_KEYS
    hf_files.check_keys(raw, checkpoint, handled=handled, fixed=_FIXED,
                        ignored=_IGNORED | (_TRAINING_ONLY if moe else set()), family=family)
    out = {field: hf_files.number(raw, key, checkpoint) for key, field in SIZES.items()}
    out["n_kv_heads"] = hf_files.number(raw, "num_key_value_heads", checkpoint, int,
                                        out["n_heads"])
    out["head_dim"] = hf_files.number(raw, "head_dim", checkpoint, int,
                                      out["d_model"] // out["n_heads"])
    out["norm_eps"] = hf_files.number(raw, "rms_norm_eps", checkpoint, float, 1e-6)
    out["tie_embeddings"] = bool(raw.get("tie_word_embeddings", False))
    out["attn_bias"] = biases or bool(raw.get("attention_bias", False))
    out["qk_norm"] = qk_norm
    # Mistral's window applies everywhere; Qwen's only with use_sliding_window (refused).
    out["sliding_window"] = (hf_files.number(raw, "sliding_window", checkpoint, int, 0)
                             if window else 0)
    if moe:
      out |= _experts(raw, checkpoint, family)
    return {"family": family, **out, **_rope(raw, checkpoint)}
  return from_hf


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def _writer(family: str):
  """ModelConfig -> the config.json `_reader(family)` reads back (rope_parameters style)."""
  def to_hf(cfg) -> dict:
    o = cfg.options
    rope = {"rope_type": o.rope_type, "rope_theta": o.rope_theta}
    if o.rope_type != "default":
      rope["factor"] = o.rope_factor
    if o.rope_type == "llama3":
      rope |= {"low_freq_factor": o.rope_low_freq_factor,
               "high_freq_factor": o.rope_high_freq_factor,
               "original_max_position_embeddings": o.rope_original_max_len}
    out = {"model_type": family, "architectures": [_ARCHITECTURES[family]],
           **{key: getattr(cfg, field) for key, field in SIZES.items()},
           "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size,
           "rms_norm_eps": cfg.norm_eps, "rope_parameters": rope, "hidden_act": "silu",
           "tie_word_embeddings": o.tie_embeddings}
    if family in ("llama", "qwen3", "qwen3_moe"):
      out["attention_bias"] = o.attn_bias
    if family in ("mistral", "mixtral"):
      out["sliding_window"] = o.sliding_window or None
    if family in MOE_FAMILIES:
      out |= {"num_local_experts": o.n_experts, "num_experts_per_tok": o.experts_per_token}
    if family == "qwen3_moe":
      out |= {"moe_intermediate_size": o.expert_d_ff or cfg.d_ff,
              "norm_topk_prob": o.norm_topk}
    return out
  return to_hf


def _spec(name: str, **reads) -> families.Spec:
  return families.register(families.Spec(
      name=name, options=LlamaOptions, check=check, model_types=(name,),
      from_hf=_reader(name, **reads), to_hf=_writer(name)))


LLAMA = _spec("llama", window=False, biases=False, qk_norm=False)
MISTRAL = _spec("mistral", window=True, biases=False, qk_norm=False)
QWEN2 = _spec("qwen2", window=False, biases=True, qk_norm=False)
QWEN3 = _spec("qwen3", window=False, biases=False, qk_norm=True)
MIXTRAL = _spec("mixtral", window=True, biases=False, qk_norm=False)
QWEN3_MOE = _spec("qwen3_moe", window=False, biases=False, qk_norm=True)
