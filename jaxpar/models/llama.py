"""The Llama family in Flax NNX: Llama 2 / 3.x, Mistral, Qwen2 / 2.5 and Qwen3, with the
numerics of Hugging Face's implementations. Four `Family` entries share one model; their
options (`LlamaOptions`), checks and config.json readers are in `jaxpar.models.llama_config`:

- Llama: RMSNorm, SwiGLU MLP, rotary positions in float32 (`rope_type` default, linear or
  llama3), grouped-query attention, tied or untied head.
- Mistral: the same with a sliding attention window (`sliding_window`).
- Qwen2 / 2.5: biases on q, k and v (`attn_bias`).
- Qwen3: RMSNorm of every q and k head before rotary (`qk_norm`), an explicit `head_dim`.
- Mixtral (Mistral) and Qwen3-MoE (Qwen3) with a mixture-of-experts MLP in every block
  (`n_experts`; `jaxpar.models.moe`), experts split over the `expert` mesh axis.

Tensor parallelism is Megatron's: q/k/v, gate and up column-parallel, o and down row-parallel,
embedding and head vocab-parallel. Key/value heads have their own logical name (`kv_heads`);
when the `model` axis is wider than them, each is stored `Layout.kv_repeat` times so every
device holds the one its query heads read (no weight is gathered, the cache stays split).

Hugging Face layout (weights [out, in], as the model stores them):

    embed[v, d]  = model.embed_tokens.weight[v, d]; head = lm_head.weight (or embed if tied)
    w_q = model.layers.l.self_attn.q_proj.weight; w_k, w_v row e*H + h = k_proj row (e//R)*H + h
    w_gate, w_up, w_down = model.layers.l.mlp.{gate,up,down}_proj.weight
    experts: router = mlp.gate.weight [E, D]; w_gate[e] = mlp.experts.e.gate_proj.weight, ...
    (Mixtral: block_sparse_moe.gate, block_sparse_moe.experts.e.{w1 (gate), w3 (up), w2 (down)})
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.axes import ACT_EMBED, BATCH, EMBED, HEAD_DIM, HEADS, KV_HEADS, LAYERS, MLP, SEQ, VOCAB
from jaxpar.config import ModelConfig
from jaxpar.models import attention, base, llama_config, moe
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
    self.head_size, self.window = H, cfg.options.sliding_window
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
    self.b_q = base.const((N * H,), (HEADS,), 0.0, dtype) if cfg.options.attn_bias else None
    self.b_k = base.const((KH,), (KV_HEADS,), 0.0, dtype) if cfg.options.attn_bias else None
    self.b_v = base.const((KH,), (KV_HEADS,), 0.0, dtype) if cfg.options.attn_bias else None
    self.w_o = base.param(rngs, (D, N * H), (EMBED, HEADS), std / math.sqrt(2 * cfg.n_layers),
                          dtype)
    norm = lambda: RMSNorm(H, (HEAD_DIM,), cfg.norm_eps, dtype)
    self.q_norm = norm() if cfg.options.qk_norm else None
    self.k_norm = norm() if cfg.options.qk_norm else None

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
    k_BKHS, v_BKSH, cache = attention.write_cache(cache, k_BTKH, v_BTKH, step)
    out_BTK = attention.attend(q_BTNH, k_BKHS, v_BKSH, step, window=self.window)
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
    self.mlp = (moe.MoeMlp(cfg, dtype, rngs=rngs) if cfg.options.n_experts else
                Mlp(cfg, dtype, rngs=rngs))

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
    self.lm_head = (None if cfg.options.tie_embeddings else
                    base.embedding(rngs, cfg, layout, (VOCAB, EMBED), dtype))

  def embed(self, tokens_BT: jax.Array, positions_BT: jax.Array) -> jax.Array:
    del positions_BT  # positions enter every block as rotary angles
    dtype = self.norm.scale[...].dtype
    return base.residual(base.embed_rows(self.embed_table[...], tokens_BT, dtype))

  def head(self, x_BTD: jax.Array) -> jax.Array:
    table = self.embed_table if self.lm_head is None else self.lm_head
    logits_BTV = base.vocab_logits(self.norm(x_BTD), table[...], self.vocab_size)
    return constrain(logits_BTV, (BATCH, SEQ, VOCAB))


def weights(cfg: ModelConfig, layout: Layout) -> dict:
  V, D, F, H = cfg.vocab_size, cfg.d_model, cfg.d_ff, cfg.head_size
  NH, KH = cfg.n_heads * H, cfg.kv_heads * H
  at = lambda name, shape, **kw: HFTensor(f"model.layers.{{l}}.{name}", shape, **kw)
  kv_rows = lambda r: base.expand_kv_rows(r, kv_repeat=layout.kv_repeat, head_dim=H)
  attn = {"w_q": at("self_attn.q_proj.weight", (NH, D)),
          "w_k": at("self_attn.k_proj.weight", (KH, D), rows=kv_rows),
          "w_v": at("self_attn.v_proj.weight", (KH, D), rows=kv_rows),
          "w_o": at("self_attn.o_proj.weight", (D, NH))}
  if cfg.options.attn_bias:
    attn |= {"b_q": at("self_attn.q_proj.bias", (NH,)),
             "b_k": at("self_attn.k_proj.bias", (KH,), rows=kv_rows),
             "b_v": at("self_attn.v_proj.bias", (KH,), rows=kv_rows)}
  if cfg.options.qk_norm:
    attn |= {"q_norm": {"scale": at("self_attn.q_norm.weight", (H,))},
             "k_norm": {"scale": at("self_attn.k_norm.weight", (H,))}}
  mlp = {"w_gate": at("mlp.gate_proj.weight", (F, D)), "w_up": at("mlp.up_proj.weight", (F, D)),
         "w_down": at("mlp.down_proj.weight", (D, F))}
  if cfg.options.n_experts:
    mlp = _experts(cfg, at)
  out = {"embed_table": HFTensor("model.embed_tokens.weight", (V, D)),
         "norm": {"scale": HFTensor("model.norm.weight", (D,))},
         "blocks": {"attn_norm": {"scale": at("input_layernorm.weight", (D,))},
                    "attn": attn, "mlp": mlp,
                    "mlp_norm": {"scale": at("post_attention_layernorm.weight", (D,))}}}
  if not cfg.options.tie_embeddings:
    out["lm_head"] = HFTensor("lm_head.weight", (V, D))
  return out


def _experts(cfg: ModelConfig, at) -> dict:
  """The HF tensors of a mixture-of-experts MLP, one per expert stacked on the first dim."""
  E, D, F = cfg.options.n_experts, cfg.d_model, cfg.options.expert_d_ff or cfg.d_ff
  where, names = (("block_sparse_moe", ("w1", "w3", "w2")) if cfg.family == "mixtral" else
                  ("mlp", ("gate_proj", "up_proj", "down_proj")))
  one = lambda name, shape: at(f"{where}.experts.{{e}}.{name}.weight", shape, experts=E)
  return {"router": at(f"{where}.gate.weight", (E, D)), "w_gate": one(names[0], (F, D)),
          "w_up": one(names[1], (F, D)), "w_down": one(names[2], (D, F))}


def _family(spec) -> base.Family:
  return base.Family(
      spec=spec, make=lambda cfg, layout, rngs: Llama(cfg, layout, rngs=rngs),
      weights=weights, kv_cache=attention.attention_cache, config_keys=CONFIG_KEYS)


LLAMA = _family(llama_config.LLAMA)
MISTRAL = _family(llama_config.MISTRAL)
QWEN2 = _family(llama_config.QWEN2)
QWEN3 = _family(llama_config.QWEN3)
MIXTRAL = _family(llama_config.MIXTRAL)
QWEN3_MOE = _family(llama_config.QWEN3_MOE)
