"""GPT-2 with the numerics of Hugging Face's, in Flax NNX: one `Family` (`jaxpar.models.base`).

Pre-LayerNorm blocks, tanh-approximate GELU, learned positions, biases, causal attention and
logits tied to the token embedding. Every parameter and activation carries logical names only
(`jaxpar.axes`); the rule table decides the layout. With the default table that is Megatron
tensor parallelism: q/k/v and the first MLP matmul column-parallel, the attention output and
the second MLP matmul row-parallel, embedding and logits vocab-parallel. Projections are 2-D
[out, in] with the heads fused into one dim of N*H (split over `model` in whole heads):
XLA:CPU multiplies these in place, while 3-D [N, H, D] weights made it transpose every weight
on every decode step.

Hugging Face layout (Conv1D weights stored [in, out], q|k|v packed in c_attn):

    wte[v, d] = wte.weight[v, d]        rows v >= V (vocab padding) are 0; lm_head is wte
    w_q[k, d] = h.l.attn.c_attn.weight[d, 0*K + k]   (w_k: 1*K + k, w_v: 2*K + k)
    w_o[d, k] = h.l.attn.c_proj.weight[k, d];  w_up, w_down from mlp.c_fc, mlp.c_proj
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.axes import ACT_EMBED, BATCH, EMBED, HEAD_DIM, HEADS, KV_HEADS, LAYERS, MLP, SEQ, VOCAB
from jaxpar.config import ModelConfig
from jaxpar.models import attention, base, gpt_config
from jaxpar.models.base import HFTensor, Layout, Step
from jaxpar.rules import constrain

# The config key that sets each logical size, so layout errors can name it.
CONFIG_KEYS = {
    BATCH: "run.batch", SEQ: "run.seq_len", EMBED: "model.d_model",
    ACT_EMBED: "model.d_model", HEADS: "model.n_heads",
    KV_HEADS: "model.n_heads", HEAD_DIM: "model.d_model / model.n_heads", MLP: "model.d_ff",
    VOCAB: "model.vocab_size (padded)", LAYERS: "model.n_layers",
}


class LayerNorm(nnx.Module):

  def __init__(self, cfg: ModelConfig, dtype):
    self.eps = cfg.norm_eps
    self.scale = base.const((cfg.d_model,), (EMBED,), 1.0, dtype)
    self.bias = base.const((cfg.d_model,), (EMBED,), 0.0, dtype)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    return base.layer_norm(x_BTD, self.scale[...], self.bias[...], self.eps)


class Attention(nnx.Module):
  """Causal multi-head self-attention: q/k/v column-parallel, output row-parallel."""

  def __init__(self, cfg: ModelConfig, dtype, *, rngs: nnx.Rngs):
    NH, D = cfg.n_heads * cfg.head_size, cfg.d_model
    self.n_heads = cfg.n_heads
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
    self.w_q = base.param(rngs, (NH, D), (HEADS, EMBED), std, dtype)
    self.w_k = base.param(rngs, (NH, D), (KV_HEADS, EMBED), std, dtype)
    self.w_v = base.param(rngs, (NH, D), (KV_HEADS, EMBED), std, dtype)
    self.b_q = base.const((NH,), (HEADS,), 0.0, dtype)
    self.b_k = base.const((NH,), (KV_HEADS,), 0.0, dtype)
    self.b_v = base.const((NH,), (KV_HEADS,), 0.0, dtype)
    self.w_o = base.param(rngs, (D, NH), (EMBED, HEADS), out_std, dtype)
    self.b_o = base.const((D,), (EMBED,), 0.0, dtype)

  def __call__(self, x_BTD: jax.Array, step: Step, cache: dict | None):
    B, T, _ = x_BTD.shape
    heads = lambda y, name: constrain(y.reshape(B, T, self.n_heads, -1),
                                      (BATCH, SEQ, name, HEAD_DIM))
    q_BTNH = heads(base.project(x_BTD, self.w_q[...], self.b_q[...]), HEADS)
    k_BTNH = heads(base.project(x_BTD, self.w_k[...], self.b_k[...]), KV_HEADS)
    v_BTNH = heads(base.project(x_BTD, self.w_v[...], self.b_v[...]), KV_HEADS)
    k_BNHS, v_BNSH, cache = attention.write_cache(cache, k_BTNH, v_BTNH, step)
    out_BTK = attention.attend(q_BTNH, k_BNHS, v_BNSH, step)
    return base.residual(base.project(out_BTK, self.w_o[...], self.b_o[...])), cache


class Mlp(nnx.Module):
  """Column-parallel up projection, tanh GELU, row-parallel down projection."""

  def __init__(self, cfg: ModelConfig, dtype, *, rngs: nnx.Rngs):
    F, D = cfg.d_ff, cfg.d_model
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    self.w_up = base.param(rngs, (F, D), (MLP, EMBED), cfg.init_std, dtype)
    self.b_up = base.const((F,), (MLP,), 0.0, dtype)
    self.w_down = base.param(rngs, (D, F), (EMBED, MLP), out_std, dtype)
    self.b_down = base.const((D,), (EMBED,), 0.0, dtype)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    h_BTF = base.project(x_BTD, self.w_up[...], self.b_up[...])
    h_BTF = constrain(jax.nn.gelu(h_BTF, approximate=True), (BATCH, SEQ, MLP))
    return base.residual(base.project(h_BTF, self.w_down[...], self.b_down[...]))


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, dtype, *, rngs: nnx.Rngs):
    self.ln_1 = LayerNorm(cfg, dtype)
    self.attn = Attention(cfg, dtype, rngs=rngs)
    self.ln_2 = LayerNorm(cfg, dtype)
    self.mlp = Mlp(cfg, dtype, rngs=rngs)

  def __call__(self, x_BTD: jax.Array, step: Step, cache: dict | None = None):
    with jax.named_scope("attn"):
      attn_BTD, cache = self.attn(self.ln_1(x_BTD), step, cache)
      x_BTD = x_BTD + attn_BTD
    with jax.named_scope("mlp"):
      x_BTD = x_BTD + self.mlp(self.ln_2(x_BTD))
    return x_BTD, cache


class GPT(nnx.Module):
  """GPT-2 (`jaxpar.models.base.Decoder`)."""

  def __init__(self, cfg: ModelConfig, layout: Layout, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    self.vocab_size = cfg.vocab_size
    self.wte = base.embedding(rngs, cfg, layout, (VOCAB, EMBED), dtype)
    self.wpe = base.param(rngs, (cfg.max_seq_len, cfg.d_model), (SEQ, EMBED), cfg.init_std / 2,
                          dtype)
    self.blocks = base.stack(lambda r: Block(cfg, dtype, rngs=r), cfg.n_layers, rngs)
    self.ln_f = LayerNorm(cfg, dtype)

  def embed(self, tokens_BT: jax.Array, positions_BT: jax.Array) -> jax.Array:
    wpe = self.wpe[...]
    x_BTD = base.embed_rows(self.wte[...], tokens_BT, wpe.dtype) + jnp.take(wpe, positions_BT,
                                                                            axis=0)
    return base.residual(x_BTD)

  def head(self, x_BTD: jax.Array) -> jax.Array:
    logits_BTV = base.vocab_logits(self.ln_f(x_BTD), self.wte[...], self.vocab_size)
    return constrain(logits_BTV, (BATCH, SEQ, VOCAB))


def weights(cfg: ModelConfig, layout: Layout) -> dict:
  D, K, F = cfg.d_model, cfg.n_heads * cfg.head_size, cfg.d_ff
  def packed(i: int, name: str, shape: tuple, **kw) -> HFTensor:  # q, k or v of c_attn
    return HFTensor(f"h.{{l}}.attn.c_attn.{name}", shape, rows=lambda r: r + i * K, **kw)
  ln = lambda n: {"scale": HFTensor(f"{n}.weight", (D,)), "bias": HFTensor(f"{n}.bias", (D,))}
  attn = {f"w_{c}": packed(i, "weight", (D, 3 * K), transpose=True) for i, c in enumerate("qkv")}
  attn |= {f"b_{c}": packed(i, "bias", (3 * K,)) for i, c in enumerate("qkv")}
  attn |= {"w_o": HFTensor("h.{l}.attn.c_proj.weight", (K, D), transpose=True),
           "b_o": HFTensor("h.{l}.attn.c_proj.bias", (D,))}
  mlp = {"w_up": HFTensor("h.{l}.mlp.c_fc.weight", (D, F), transpose=True),
         "b_up": HFTensor("h.{l}.mlp.c_fc.bias", (F,)),
         "w_down": HFTensor("h.{l}.mlp.c_proj.weight", (F, D), transpose=True),
         "b_down": HFTensor("h.{l}.mlp.c_proj.bias", (D,))}
  return {"wte": HFTensor("wte.weight", (cfg.vocab_size, D)),
          "wpe": HFTensor("wpe.weight", (cfg.max_seq_len, D)), "ln_f": ln("ln_f"),
          "blocks": {"ln_1": ln("h.{l}.ln_1"), "ln_2": ln("h.{l}.ln_2"), "attn": attn,
                     "mlp": mlp}}


FAMILY = base.Family(
    spec=gpt_config.SPEC, make=lambda cfg, layout, rngs: GPT(cfg, layout, rngs=rngs),
    weights=weights, kv_cache=attention.attention_cache, config_keys=CONFIG_KEYS)
