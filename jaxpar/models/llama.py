"""The Llama family in Flax NNX: Llama 2 / 3.x, Mistral, Qwen2 / 2.5 and Qwen3, with the
numerics of Hugging Face's implementations. Four `Family` entries share one model:

- Llama: RMSNorm, SwiGLU MLP, rotary positions in float32 (`rope_type` default, linear or
  llama3), grouped-query attention, tied or untied head.
- Mistral: the same with a sliding attention window (`sliding_window`).
- Qwen2 / 2.5: biases on q, k and v (`attn_bias`).
- Qwen3: RMSNorm of every q and k head before rotary (`qk_norm`), an explicit `head_dim`.

Tensor parallelism is Megatron's: q/k/v, gate and up column-parallel, o and down row-parallel,
embedding and head vocab-parallel. Key/value heads have their own logical name (`kv_heads`);
when the `model` axis is wider than them, each is stored `Layout.kv_repeat` times so every
device holds the one its query heads read (no weight is gathered, the cache stays split).

Hugging Face layout (weights [out, in], as the model stores them):

    embed[v, d]  = model.embed_tokens.weight[v, d]; head = lm_head.weight (or embed if tied)
    w_q = model.layers.l.self_attn.q_proj.weight; w_k, w_v row e*H + h = k_proj row (e//R)*H + h
    w_gate, w_up, w_down = model.layers.l.mlp.{gate,up,down}_proj.weight
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar import hf_files
from jaxpar.axes import ACT_EMBED, BATCH, EMBED, HEAD_DIM, HEADS, KV_HEADS, LAYERS, MLP, SEQ, VOCAB
from jaxpar.config import ModelConfig
from jaxpar.errors import UserError
from jaxpar.models import base
from jaxpar.models.base import HFTensor, Layout, Step
from jaxpar.rules import constrain

CONFIG_KEYS = {
    BATCH: "run.batch", SEQ: "run.seq_len", EMBED: "model.d_model (hidden_size)",
    ACT_EMBED: "model.d_model (hidden_size)",
    HEADS: "model.n_heads (num_attention_heads)",
    KV_HEADS: "model.n_kv_heads (num_key_value_heads)", HEAD_DIM: "model.head_dim",
    MLP: "model.d_ff (intermediate_size)", VOCAB: "model.vocab_size (padded)",
    LAYERS: "model.n_layers (num_hidden_layers)",
}
ROPE_TYPES = ("default", "linear", "llama3")


class RMSNorm(nnx.Module):

  def __init__(self, width: int, names: tuple, eps: float, dtype):
    self.eps = eps
    self.scale = base.const((width,), names, 1.0, dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return base.rms_norm(x, self.scale[...], self.eps)


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, layout: Layout, dtype, *, rngs: nnx.Rngs):
    N, H, D = cfg.n_heads, cfg.head_size, cfg.d_model
    KH = cfg.kv_heads * layout.kv_repeat * H
    self.head_size, self.window = H, cfg.sliding_window
    self.inv_freq = tuple(float(f) for f in base.rope_frequencies(cfg))  # static, hashable
    std = cfg.init_std
    self.w_q = base.param(rngs, (N * H, D), (HEADS, EMBED), std, dtype)
    self.w_k = base.param(rngs, (KH, D), (KV_HEADS, EMBED), std, dtype)
    self.w_v = base.param(rngs, (KH, D), (KV_HEADS, EMBED), std, dtype)
    if layout.kv_repeat > 1:  # copies of a head start equal, as loaded weights are
      R, K = layout.kv_repeat, cfg.kv_heads
      copy = lambda w: jnp.repeat(w[...].reshape(K, R, H, D)[:, :1], R, axis=1).reshape(KH, D)
      self.w_k = nnx.Param(copy(self.w_k), out_sharding=(KV_HEADS, EMBED))
      self.w_v = nnx.Param(copy(self.w_v), out_sharding=(KV_HEADS, EMBED))
    self.b_q = base.const((N * H,), (HEADS,), 0.0, dtype) if cfg.attn_bias else None
    self.b_k = base.const((KH,), (KV_HEADS,), 0.0, dtype) if cfg.attn_bias else None
    self.b_v = base.const((KH,), (KV_HEADS,), 0.0, dtype) if cfg.attn_bias else None
    self.w_o = base.param(rngs, (D, N * H), (EMBED, HEADS), std / math.sqrt(2 * cfg.n_layers),
                          dtype)
    norm = lambda: RMSNorm(H, (HEAD_DIM,), cfg.norm_eps, dtype)
    self.q_norm = norm() if cfg.qk_norm else None
    self.k_norm = norm() if cfg.qk_norm else None

  def _heads(self, x_BTD, w, b, norm, name: str) -> jax.Array:
    B, T, _ = x_BTD.shape
    y = base.project(x_BTD, w[...], None if b is None else b[...])
    y_BTNH = constrain(y.reshape(B, T, -1, self.head_size), (BATCH, SEQ, name, HEAD_DIM))
    if norm is not None:
      y_BTNH = norm(y_BTNH)
    return y_BTNH

  def __call__(self, x_BTD: jax.Array, step: Step, cache: dict | None):
    q_BTNH = self._heads(x_BTD, self.w_q, self.b_q, self.q_norm, HEADS)
    k_BTKH = self._heads(x_BTD, self.w_k, self.b_k, self.k_norm, KV_HEADS)
    v_BTKH = self._heads(x_BTD, self.w_v, self.b_v, None, KV_HEADS)
    q_BTNH = base.rope(q_BTNH, step.positions_BT, self.inv_freq)
    k_BTKH = base.rope(k_BTKH, step.positions_BT, self.inv_freq)
    k_BKHS, v_BKSH, cache = base.write_cache(cache, k_BTKH, v_BTKH, step.index)
    out_BTK = base.attend(q_BTNH, k_BKHS, v_BKSH, step, window=self.window)
    return base.residual(base.project(out_BTK, self.w_o[...])), cache


class Mlp(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)); gate and up column-parallel, down row-parallel."""

  def __init__(self, cfg: ModelConfig, dtype, *, rngs: nnx.Rngs):
    F, D, std = cfg.d_ff, cfg.d_model, cfg.init_std
    self.w_gate = base.param(rngs, (F, D), (MLP, EMBED), std, dtype)
    self.w_up = base.param(rngs, (F, D), (MLP, EMBED), std, dtype)
    self.w_down = base.param(rngs, (D, F), (EMBED, MLP), std / math.sqrt(2 * cfg.n_layers),
                             dtype)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    gate_BTF = base.project(x_BTD, self.w_gate[...])
    h_BTF = constrain(jax.nn.silu(gate_BTF) * base.project(x_BTD, self.w_up[...]),
                      (BATCH, SEQ, MLP))
    return base.residual(base.project(h_BTF, self.w_down[...]))


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, layout: Layout, dtype, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, (EMBED,), cfg.norm_eps, dtype)
    self.attn = Attention(cfg, layout, dtype, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, (EMBED,), cfg.norm_eps, dtype)
    self.mlp = Mlp(cfg, dtype, rngs=rngs)

  def __call__(self, x_BTD: jax.Array, step: Step, cache: dict | None = None):
    with jax.named_scope("attn"):
      attn_BTD, cache = self.attn(self.attn_norm(x_BTD), step, cache)
      x_BTD = x_BTD + attn_BTD
    with jax.named_scope("mlp"):
      x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD))
    return x_BTD, cache


class Llama(nnx.Module):
  """A Llama-family decoder (`jaxpar.models.base.Decoder`)."""

  def __init__(self, cfg: ModelConfig, layout: Layout, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    self.vocab_size = cfg.vocab_size
    self.embed_table = base.embedding(rngs, cfg, layout, (VOCAB, EMBED), dtype)
    self.blocks = base.stack(lambda r: Block(cfg, layout, dtype, rngs=r), cfg.n_layers, rngs)
    self.norm = RMSNorm(cfg.d_model, (EMBED,), cfg.norm_eps, dtype)
    self.lm_head = (None if cfg.tie_embeddings else
                    base.embedding(rngs, cfg, layout, (VOCAB, EMBED), dtype))

  def embed(self, tokens_BT: jax.Array, positions_BT: jax.Array) -> jax.Array:
    del positions_BT  # positions enter every block as rotary angles
    dtype = self.norm.scale[...].dtype
    return base.residual(base.embed_rows(self.embed_table[...], tokens_BT, dtype))

  def head(self, x_BTD: jax.Array) -> jax.Array:
    table = self.embed_table if self.lm_head is None else self.lm_head
    logits_BTV = base.vocab_logits(self.norm(x_BTD), table[...], self.vocab_size)
    return constrain(logits_BTV, (BATCH, SEQ, VOCAB))


def check(cfg: ModelConfig) -> None:
  if cfg.rope_type not in ROPE_TYPES:
    raise UserError(f"model.rope_type={cfg.rope_type!r}: jaxpar runs rope types "
                    f"{', '.join(ROPE_TYPES)}")
  if cfg.head_size % 2:
    raise UserError(f"model.head_dim={cfg.head_size}: rotary positions need an even head width")
  if cfg.rope_type == "llama3" and cfg.rope_high_freq_factor <= cfg.rope_low_freq_factor:
    raise UserError(f"model.rope_high_freq_factor={cfg.rope_high_freq_factor} must exceed "
                    f"model.rope_low_freq_factor={cfg.rope_low_freq_factor} for rope_type llama3")


# ---- config.json ----

_IGNORED = {"architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
            "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache",
            "attention_dropout", "_name_or_path", "tokenizer_class", "max_window_layers",
            "layer_types"}
_FIXED = {"hidden_act": ("silu",), "pretraining_tp": (1,), "mlp_bias": (False,),
          "use_sliding_window": (False,), "use_mrope": (False,), "partial_rotary_factor": (1.0,)}
_SIZES = {"vocab_size": "vocab_size", "hidden_size": "d_model",
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


def _reader(family: str, *, window: bool, biases: bool, qk_norm: bool):
  """config.json -> ModelConfig fields for `family` (see `hf_files.check_keys`)."""
  def from_hf(raw: dict, checkpoint: str) -> dict:
    handled = {*_SIZES, "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
               "rope_scaling", "rope_parameters", "tie_word_embeddings", "attention_bias",
               "sliding_window"}
    hf_files.check_keys(raw, checkpoint, handled=handled, fixed=_FIXED, ignored=_IGNORED,
                        family=family)
    out = {field: hf_files.number(raw, key, checkpoint) for key, field in _SIZES.items()}
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
    return {"family": family, **out, **_rope(raw, checkpoint)}
  return from_hf


def weights(cfg: ModelConfig, layout: Layout) -> dict:
  V, D, F, H = cfg.vocab_size, cfg.d_model, cfg.d_ff, cfg.head_size
  NH, KH = cfg.n_heads * H, cfg.kv_heads * H
  at = lambda name, shape, **kw: HFTensor(f"model.layers.{{l}}.{name}", shape, **kw)
  kv_rows = lambda r: base.expand_kv_rows(r, kv_repeat=layout.kv_repeat, head_dim=H)
  attn = {"w_q": at("self_attn.q_proj.weight", (NH, D)),
          "w_k": at("self_attn.k_proj.weight", (KH, D), rows=kv_rows),
          "w_v": at("self_attn.v_proj.weight", (KH, D), rows=kv_rows),
          "w_o": at("self_attn.o_proj.weight", (D, NH))}
  if cfg.attn_bias:
    attn |= {"b_q": at("self_attn.q_proj.bias", (NH,)),
             "b_k": at("self_attn.k_proj.bias", (KH,), rows=kv_rows),
             "b_v": at("self_attn.v_proj.bias", (KH,), rows=kv_rows)}
  if cfg.qk_norm:
    attn |= {"q_norm": {"scale": at("self_attn.q_norm.weight", (H,))},
             "k_norm": {"scale": at("self_attn.k_norm.weight", (H,))}}
  mlp = {"w_gate": at("mlp.gate_proj.weight", (F, D)), "w_up": at("mlp.up_proj.weight", (F, D)),
         "w_down": at("mlp.down_proj.weight", (D, F))}
  out = {"embed_table": HFTensor("model.embed_tokens.weight", (V, D)),
         "norm": {"scale": HFTensor("model.norm.weight", (D,))},
         "blocks": {"attn_norm": {"scale": at("input_layernorm.weight", (D,))},
                    "attn": attn, "mlp": mlp,
                    "mlp_norm": {"scale": at("post_attention_layernorm.weight", (D,))}}}
  if not cfg.tie_embeddings:
    out["lm_head"] = HFTensor("lm_head.weight", (V, D))
  return out


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _writer(family: str):
  """ModelConfig -> the config.json `_reader(family)` reads back (rope_parameters style)."""
  def to_hf(cfg: ModelConfig) -> dict:
    rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type != "default":
      rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
      rope |= {"low_freq_factor": cfg.rope_low_freq_factor,
               "high_freq_factor": cfg.rope_high_freq_factor,
               "original_max_position_embeddings": cfg.rope_original_max_len}
    out = {"model_type": family, "architectures": [_ARCHITECTURES[family]],
           **{key: getattr(cfg, field) for key, field in _SIZES.items()},
           "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size,
           "rms_norm_eps": cfg.norm_eps, "rope_parameters": rope, "hidden_act": "silu",
           "tie_word_embeddings": cfg.tie_embeddings}
    if family in ("llama", "qwen3"):
      out["attention_bias"] = cfg.attn_bias
    if family == "mistral":
      out["sliding_window"] = cfg.sliding_window or None
    return out
  return to_hf


def _family(name: str, **options) -> base.Family:
  return base.Family(
      name=name, model_types=(name,), make=lambda cfg, layout, rngs: Llama(cfg, layout,
                                                                           rngs=rngs),
      check=check, from_hf=_reader(name, **options), weights=weights,
      kv_cache=base.attention_cache, config_keys=CONFIG_KEYS, to_hf=_writer(name))


LLAMA = _family("llama", window=False, biases=False, qk_norm=False)
MISTRAL = _family("mistral", window=True, biases=False, qk_norm=False)
QWEN2 = _family("qwen2", window=False, biases=True, qk_norm=False)
QWEN3 = _family("qwen3", window=False, biases=False, qk_norm=True)
