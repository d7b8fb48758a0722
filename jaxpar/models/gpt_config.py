"""GPT-2's side of the config, JAX-free: no options beyond the shared sizes, the check that
refuses other families' options, and the config.json readers (`jaxpar.families`).

The model is in `jaxpar.models.gpt`.
"""

from jaxpar import families, hf_files
from jaxpar.errors import UserError


def check(cfg) -> None:
  """GPT-2 splits its width into n_heads equal heads, each its own key/value head."""
  off = {"n_kv_heads": cfg.n_kv_heads not in (0, cfg.n_heads),
         "head_dim": cfg.head_dim not in (0, cfg.d_model // cfg.n_heads)}
  for key, bad in off.items():
    if bad:
      raise UserError(f"model.{key}={getattr(cfg, key)!r}: GPT-2 (model.family=gpt2) has no "
                      f"such option; drop it, or pick a family that has it (llama, mistral, "
                      f"qwen2, qwen3)")


# config.json keys: read into the config, ignored (no effect on inference), fixed.
SIZES = {"vocab_size": "vocab_size", "n_embd": "d_model", "n_head": "n_heads",
         "n_layer": "n_layers", "n_positions": "max_seq_len"}
_IGNORED = {"architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
            "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache",
            "attn_pdrop", "embd_pdrop", "resid_pdrop", "summary_activation",
            "summary_first_dropout", "summary_proj_to_labels", "summary_type",
            "summary_use_proj", "task_specific_params", "n_ctx", "_name_or_path",
            "reorder_and_upcast_attn", "tokenizer_class"}
_FIXED = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"),
          "tie_word_embeddings": (True,), "scale_attn_weights": (True,),
          "scale_attn_by_inverse_layer_idx": (False,), "add_cross_attention": (False,)}


def from_hf(raw: dict, checkpoint: str) -> dict:
  hf_files.check_keys(raw, checkpoint, handled={*SIZES, "n_inner", "layer_norm_epsilon"},
                      fixed=_FIXED, ignored=_IGNORED, family="GPT-2")
  sizes = {field: hf_files.number(raw, key, checkpoint) for key, field in SIZES.items()}
  sizes["norm_eps"] = hf_files.number(raw, "layer_norm_epsilon", checkpoint, float, 1e-5)
  sizes["d_ff"] = hf_files.number(raw, "n_inner", checkpoint, int, 4 * sizes["d_model"])
  return {"family": "gpt2", **sizes}


def to_hf(cfg) -> dict:
  return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
          **{key: getattr(cfg, field) for key, field in SIZES.items()},
          "n_inner": cfg.d_ff, "layer_norm_epsilon": cfg.norm_eps,
          "activation_function": "gelu_new", "tie_word_embeddings": True}


SPEC = families.register(families.Spec(name="gpt2", check=check, model_types=("gpt2",),
                                       from_hf=from_hf, to_hf=to_hf))
