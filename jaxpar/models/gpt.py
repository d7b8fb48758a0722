"""A decoder-only transformer with the numerics of Hugging Face GPT-2, in Flax NNX.

Pre-LayerNorm blocks, tanh-approximate GELU, learned positions, biases, causal attention and
logits tied to the token embedding. Every parameter and activation carries logical names only
(`jaxpar.axes`); the rule table decides the layout. With the default table that is Megatron
tensor parallelism: q/k/v and the first MLP matmul column-parallel, the attention output and
the second MLP matmul row-parallel, embedding and logits vocab-parallel.

Blocks are stacked on a leading `layers` dim (built with `nnx.vmap`) and run with a
`lax.scan`, so compile time does not grow with depth. Projection weights are stored
[out, in] and contracted on their last dim, which XLA:CPU multiplies fastest.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from flax import nnx

from jaxpar.axes import BATCH, EMBED, HEAD_DIM, HEADS, LAYERS, MLP, SEQ, VOCAB
from jaxpar.config import ModelConfig
from jaxpar.rules import constrain

# The config key that sets each logical size, so layout errors can name it.
CONFIG_KEYS = {
    BATCH: "run.batch", SEQ: "run.seq_len", EMBED: "model.d_model", HEADS: "model.n_heads",
    HEAD_DIM: "model.d_model / model.n_heads", MLP: "model.d_ff",
    VOCAB: "model.vocab_size (padded)", LAYERS: "model.n_layers",
}


def padded_vocab(vocab_size: int, multiple: int) -> int:
  """The vocabulary rounded up to `multiple` rows (GPT-2's 50257 is 29 x 1733)."""
  return -(-vocab_size // multiple) * multiple


def _param(rngs: nnx.Rngs, shape: tuple, names: tuple, std: float, dtype) -> nnx.Param:
  init = jax.random.normal(rngs.params(), shape, jnp.float32) * std
  return nnx.Param(init.astype(dtype), out_sharding=names)


def _const(shape: tuple, names: tuple, value: float, dtype) -> nnx.Param:
  return nnx.Param(jnp.full(shape, value, dtype), out_sharding=names)


class LayerNorm(nnx.Module):

  def __init__(self, cfg: ModelConfig, dtype):
    self.eps = cfg.layer_norm_eps
    self.scale = _const((cfg.d_model,), (EMBED,), 1.0, dtype)
    self.bias = _const((cfg.d_model,), (EMBED,), 0.0, dtype)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    x = x_BTD.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(x_BTD.dtype)


class Attention(nnx.Module):
  """Causal multi-head self-attention: q/k/v column-parallel, output row-parallel.

  Projections are stored as 2-D [out, in] matrices with the heads fused into one dim of
  N*H (split over `model` in whole heads): XLA:CPU multiplies these in place, while 3-D
  [N, H, D] weights made it transpose every weight on every decode step.
  """

  def __init__(self, cfg: ModelConfig, dtype, *, rngs: nnx.Rngs):
    K, D = cfg.n_heads * cfg.head_dim, cfg.d_model
    self.n_heads = cfg.n_heads
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
    self.w_q = _param(rngs, (K, D), (HEADS, EMBED), std, dtype)
    self.w_k = _param(rngs, (K, D), (HEADS, EMBED), std, dtype)
    self.w_v = _param(rngs, (K, D), (HEADS, EMBED), std, dtype)
    self.b_q = _const((K,), (HEADS,), 0.0, dtype)
    self.b_k = _const((K,), (HEADS,), 0.0, dtype)
    self.b_v = _const((K,), (HEADS,), 0.0, dtype)
    self.w_o = _param(rngs, (D, K), (EMBED, HEADS), out_std, dtype)
    self.b_o = _const((D,), (EMBED,), 0.0, dtype)

  def _project(self, x_BTD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    B, T, _ = x_BTD.shape
    heads = lambda y_BTK: constrain(y_BTK.reshape(B, T, self.n_heads, -1),
                                    (BATCH, SEQ, HEADS, HEAD_DIM))
    q_BTK = jnp.einsum("btd,kd->btk", x_BTD, self.w_q[...]) + self.b_q[...]
    k_BTK = jnp.einsum("btd,kd->btk", x_BTD, self.w_k[...]) + self.b_k[...]
    v_BTK = jnp.einsum("btd,kd->btk", x_BTD, self.w_v[...]) + self.b_v[...]
    return heads(q_BTK), heads(k_BTK), heads(v_BTK)

  def _attend(self, q_BTNH, k_BSNH, v_BSNH, mask_BTS: jax.Array) -> jax.Array:
    scores_BNTS = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k_BSNH).astype(jnp.float32)
    scores_BNTS = scores_BNTS / math.sqrt(q_BTNH.shape[-1])
    scores_BNTS = jnp.where(mask_BTS[:, None], scores_BNTS, jnp.finfo(jnp.float32).min)
    probs_BNTS = jax.nn.softmax(scores_BNTS, axis=-1).astype(v_BSNH.dtype)
    out_BTNH = jnp.einsum("bnts,bsnh->btnh", probs_BNTS, v_BSNH)
    B, T, N, H = out_BTNH.shape
    out_BTD = jnp.einsum("btk,dk->btd", out_BTNH.reshape(B, T, N * H), self.w_o[...])
    return constrain(out_BTD + self.b_o[...], (BATCH, SEQ, EMBED))

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    q_BTNH, k_BTNH, v_BTNH = self._project(x_BTD)
    T = x_BTD.shape[1]
    causal_BTS = jnp.tril(jnp.ones((1, T, T), bool))
    return self._attend(q_BTNH, k_BTNH, v_BTNH, causal_BTS)

  def cached(self, x_BTD: jax.Array, cache: dict, index: jax.Array,
             mask_BTS: jax.Array) -> tuple[jax.Array, dict]:
    """Writes this step's keys and values into `cache` {k, v: [B, S, N, H]} at slot `index`
    (T slots) and attends over the whole cache under `mask_BTS`."""
    q_BTNH, k_BTNH, v_BTNH = self._project(x_BTD)
    k_BSNH = lax.dynamic_update_slice_in_dim(cache["k"], k_BTNH.astype(cache["k"].dtype), index,
                                             axis=1)
    v_BSNH = lax.dynamic_update_slice_in_dim(cache["v"], v_BTNH.astype(cache["v"].dtype), index,
                                             axis=1)
    return self._attend(q_BTNH, k_BSNH, v_BSNH, mask_BTS), {"k": k_BSNH, "v": v_BSNH}


class Mlp(nnx.Module):
  """Column-parallel up projection, tanh GELU, row-parallel down projection."""

  def __init__(self, cfg: ModelConfig, dtype, *, rngs: nnx.Rngs):
    F, D = cfg.d_ff, cfg.d_model
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    self.w_up = _param(rngs, (F, D), (MLP, EMBED), cfg.init_std, dtype)
    self.b_up = _const((F,), (MLP,), 0.0, dtype)
    self.w_down = _param(rngs, (D, F), (EMBED, MLP), out_std, dtype)
    self.b_down = _const((D,), (EMBED,), 0.0, dtype)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    h_BTF = jnp.einsum("btd,fd->btf", x_BTD, self.w_up[...]) + self.b_up[...]
    h_BTF = constrain(jax.nn.gelu(h_BTF, approximate=True), (BATCH, SEQ, MLP))
    out_BTD = jnp.einsum("btf,df->btd", h_BTF, self.w_down[...]) + self.b_down[...]
    return constrain(out_BTD, (BATCH, SEQ, EMBED))


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, dtype, *, rngs: nnx.Rngs):
    self.ln_1 = LayerNorm(cfg, dtype)
    self.attn = Attention(cfg, dtype, rngs=rngs)
    self.ln_2 = LayerNorm(cfg, dtype)
    self.mlp = Mlp(cfg, dtype, rngs=rngs)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    with jax.named_scope("attn"):
      x_BTD = x_BTD + self.attn(self.ln_1(x_BTD))
    with jax.named_scope("mlp"):
      x_BTD = x_BTD + self.mlp(self.ln_2(x_BTD))
    return x_BTD

  def cached(self, x_BTD: jax.Array, cache: dict, index: jax.Array,
             mask_BTS: jax.Array) -> tuple[jax.Array, dict]:
    with jax.named_scope("attn"):
      attn_BTD, cache = self.attn.cached(self.ln_1(x_BTD), cache, index, mask_BTS)
      x_BTD = x_BTD + attn_BTD
    with jax.named_scope("mlp"):
      x_BTD = x_BTD + self.mlp(self.ln_2(x_BTD))
    return x_BTD, cache


class GPT(nnx.Module):
  """GPT-2. `vocab_multiple` pads the vocabulary so every vocab-split divides it."""

  def __init__(self, cfg: ModelConfig, *, vocab_multiple: int = 1, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    self.vocab_size = cfg.vocab_size
    V = padded_vocab(cfg.vocab_size, vocab_multiple)
    wte = jax.random.normal(rngs.params(), (V, cfg.d_model), jnp.float32) * cfg.init_std
    wte = jnp.where(jnp.arange(V)[:, None] < cfg.vocab_size, wte, 0.0)  # padding rows are 0
    self.wte = nnx.Param(wte.astype(dtype), out_sharding=(VOCAB, EMBED))
    self.wpe = _param(rngs, (cfg.max_seq_len, cfg.d_model), (SEQ, EMBED), cfg.init_std / 2,
                      dtype)

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS})
    def stack(rngs: nnx.Rngs) -> Block:
      return Block(cfg, dtype, rngs=rngs)

    self.blocks = stack(rngs)
    self.ln_f = LayerNorm(cfg, dtype)

  def embed(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None) -> jax.Array:
    """Token plus position embeddings; positions default to 0..T-1 for every row."""
    if positions_BT is None:
      wpe_BTD = self.wpe[...][None, :tokens_BT.shape[1]]
    else:
      wpe_BTD = jnp.take(self.wpe[...], positions_BT, axis=0)
    x_BTD = jnp.take(self.wte[...], tokens_BT, axis=0) + wpe_BTD
    return constrain(x_BTD, (BATCH, SEQ, EMBED))

  def run_blocks(self, x_BTD: jax.Array) -> jax.Array:
    graphdef, stacked = nnx.split(self.blocks)
    return scan_layers(graphdef, stacked, x_BTD)

  def cached_blocks(self, x_BTD: jax.Array, caches: Any, index: jax.Array, mask_BTS: jax.Array,
                    *, scan: bool, layers: Any = None) -> tuple[jax.Array, Any]:
    """All blocks with KV caches. `scan`: one stacked cache {k, v: [L, B, S, N, H]} and a
    scan over layers; otherwise a tuple of per-layer caches and unrolled layers (on XLA:CPU
    each per-layer cache then updates in place). `layers`, per-layer parameter dicts, replace
    slices of the stack: separate buffers that no step has to cut out of the stack."""
    graphdef, stacked = nnx.split(self.blocks)
    if scan:
      def layer(x_BTD, inputs):
        layer_state, cache = inputs
        with jax.named_scope("block"):
          return nnx.merge(graphdef, layer_state).cached(x_BTD, cache, index, mask_BTS)
      return jax.lax.scan(layer, x_BTD, (stacked, caches))
    new = []
    for l, cache in enumerate(caches):
      block = nnx.merge(graphdef, layers[l] if layers is not None else
                        jax.tree.map(lambda a: a[l], stacked))
      with jax.named_scope(f"block_{l}"):
        x_BTD, cache = block.cached(x_BTD, cache, index, mask_BTS)
      new.append(cache)
    return x_BTD, tuple(new)

  def logits(self, x_BTD: jax.Array) -> jax.Array:
    """Tied, vocab-parallel logits [B, T, V_padded]; padding columns hold the float minimum."""
    x_BTD = self.ln_f(x_BTD)
    logits_BTV = jnp.einsum("btd,vd->btv", x_BTD, self.wte[...]).astype(jnp.float32)
    V = logits_BTV.shape[-1]
    logits_BTV = jnp.where(jnp.arange(V) < self.vocab_size, logits_BTV,
                           jnp.finfo(jnp.float32).min)
    return constrain(logits_BTV, (BATCH, SEQ, VOCAB))

  def __call__(self, tokens_BT: jax.Array) -> jax.Array:
    return self.logits(self.run_blocks(self.embed(tokens_BT)))


def scan_layers(block_graphdef: nnx.GraphDef, stacked: Any, x_BTD: jax.Array) -> jax.Array:
  """Runs blocks whose parameters are stacked on a leading dim, in order, with a scan.

  This is also the pipeline's stage function: a stage runs its chunk of layers this way.
  """
  def layer(x_BTD, layer_state):
    with jax.named_scope("block"):
      return nnx.merge(block_graphdef, layer_state)(x_BTD), None

  x_BTD, _ = jax.lax.scan(layer, x_BTD, stacked)
  return x_BTD


def vocab_multiple(rules, mesh_shape) -> int:
  """How many ways the vocabulary is split on this mesh (the padding multiple)."""
  return math.prod(mesh_shape[a] for a in rules.mesh_axes(VOCAB) if a in mesh_shape)


