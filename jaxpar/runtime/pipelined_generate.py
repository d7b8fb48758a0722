"""Pipelined decoding: groups of sequences rotate through the stages, one group per stage.

With S stages the B prompts form G = S groups (strided, so each group keeps the `data`
split). Every stage keeps the KV cache of its own layers for all groups,
[Lc, G, B/G, T, N, H], on its own devices. Two programs, each one `lax.scan` of ticks inside
`jax.shard_map` over `stage` (`data` and `model` stay automatic):

    # prefill: GPipe over the groups, G + S - 1 ticks
    for t in range(G + S - 1):
      g = t - s                                  # idle unless 0 <= g < G
      x = embed(prompt[g]) if s == 0 else msg
      y = layers(x, cache[:, g], slots 0..T0-1)  # writes group g's cache slice only
      if s == S-1: first[g] = sample(logits(y[:, -1]))
      msg = ppermute(y, s -> s+1)
    first += ppermute(first, S-1 -> 0)           # stage 0 starts decoding with these

    # decode: N - 1 steps for every group, (N-1)*G + S - 1 ticks, no stalls
    for t in range((N-1)*G + S - 1):
      i = t - s; g, n = i % G, i // G            # idle unless 0 <= i < (N-1)*G
      token = (first[g] if n == 0 else ring_token) if s == 0 else -
      x = embed(token, position=len[g] + n) if s == 0 else msg
      y = layers(x, cache[:, g], slot T0 + n)
      if s == S-1: out[g, n+1] = sample(logits(y))  # EOS-stopped rows repeat EOS
      msg, ring_token = ppermute((y, out[g, n+1]), s -> (s+1) % S)

The last stage finishes group g's step n at tick n*G + g + S - 1 and its token reaches
stage 0 at the next tick, exactly when group g's step n + 1 starts there: with G = S no stage
waits. Bubble ticks compute on zeros and write back the cache slice they read, so they change
nothing. Logits are computed only on the last stage (a `lax.cond` on the stage index).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxpar.axes import BATCH, HEAD_DIM, HEADS, SEQ, STAGE
from jaxpar.models import gpt
from jaxpar.rules import constrain, use_rules
from jaxpar.runtime.sampling import sample


def _varying_axes(a) -> frozenset:
  aval = jax.typeof(a)
  if hasattr(aval, "vma"):  # jax 0.11
    return frozenset(aval.vma)
  return frozenset(aval.manual_axis_type.varying)  # jax 0.10


def _varying(x):
  """Marks values as varying over `stage` (values made inside the loop body must be)."""
  return jax.tree.map(
      lambda a: a if STAGE in _varying_axes(a) else lax.pcast(a, (STAGE,), to="varying"), x)


def _groups(x, G: int, ways: int):
  """[B, ...] -> [G, B/G, ...]: group g takes rows [g*r, (g+1)*r) of every batch shard."""
  B, rest = x.shape[0], x.shape[1:]
  rows = B // (ways * G)
  return jnp.swapaxes(x.reshape(ways, G, rows, *rest), 0, 1).reshape(G, ways * rows, *rest)


def _ungroup(x, ways: int):
  G, Bg, rest = x.shape[0], x.shape[1], x.shape[2:]
  rows = Bg // ways
  return jnp.swapaxes(x.reshape(G, ways, rows, *rest), 0, 1).reshape(G * Bg, *rest)


def programs(gen, batch: int, prompt_len: int, max_new: int, sampling):
  """(prefill, decode) jitted for this shape; see the module docstring."""
  fwd = gen.forward
  mesh, rules, graphdef, m = fwd.mesh, fwd.rules, fwd.graphdef, fwd.config.model
  S = mesh.shape[STAGE]
  G = S
  ways = math.prod(mesh.shape[a] for a in rules.mesh_axes(BATCH))
  Bg = batch // G
  T = prompt_len + max_new
  Lc = m.n_layers // S
  dtype = jnp.dtype(m.dtype)
  eos = gen.eos_id
  fill = eos if eos >= 0 else 0
  ring = [(k, (k + 1) % S) for k in range(S)]
  cache_names = (None, None, BATCH, SEQ, HEADS, HEAD_DIM)

  def model_and_blocks(rest, blocks_local):
    blocks = jax.tree.map(lambda a: a[0, 0], blocks_local)  # [Lc, ...]: this stage's layers
    return nnx.merge(graphdef, {**rest, "blocks": blocks}), blocks

  def layers(model, blocks, x_BTD, caches, g, index, mask_BTS, valid):
    """This stage's Lc layers on group g; writes back only group g's cache slice."""
    block_graphdef = nnx.graphdef(model.blocks)

    def layer(x_BTD, inputs):
      params, k_GBSNH, v_GBSNH = inputs
      old = {"k": lax.dynamic_index_in_dim(k_GBSNH, g, keepdims=False),
             "v": lax.dynamic_index_in_dim(v_GBSNH, g, keepdims=False)}
      y_BTD, new = nnx.merge(block_graphdef, params).cached(x_BTD, old, index, mask_BTS)
      new = jax.tree.map(lambda a, b: jnp.where(valid, a, b), new, old)
      k_GBSNH = lax.dynamic_update_index_in_dim(k_GBSNH, new["k"], g, 0)
      v_GBSNH = lax.dynamic_update_index_in_dim(v_GBSNH, new["v"], g, 0)
      return y_BTD, (k_GBSNH, v_GBSNH)

    x_BTD, (k, v) = lax.scan(layer, x_BTD, (blocks, caches["k"], caches["v"]))
    return x_BTD, {"k": k, "v": v}

  def last_stage_token(model, s, y_BD, key):
    def compute():
      return _varying(sample(model.logits(y_BD[:, None])[:, 0], key, sampling))
    return lax.cond(s == S - 1, compute, lambda: _varying(jnp.zeros((Bg,), jnp.int32)))

  def prefill_stage(rest, blocks_local, tokens_GBT, mask_GBT, key):
    s = lax.axis_index(STAGE)
    with use_rules(rules, keys=gpt.CONFIG_KEYS):
      model, blocks = model_and_blocks(rest, blocks_local)
      zeros = lambda: _varying(constrain(jnp.zeros((Lc, G, Bg, T, m.n_heads, m.head_dim),
                                                   dtype), cache_names))
      caches = {"k": zeros(), "v": zeros()}
      msg = _varying(jnp.zeros((Bg, prompt_len, m.d_model), dtype))
      first = _varying(jnp.zeros((G, Bg), jnp.int32))
      causal_TS = jnp.arange(T)[None, :] <= jnp.arange(prompt_len)[:, None]

      def tick(carry, t):
        msg, caches, first = carry
        i = t - s
        valid = (i >= 0) & (i < G)
        g = jnp.clip(i, 0, G - 1)
        mask_BT = lax.dynamic_index_in_dim(mask_GBT, g, keepdims=False)
        positions_BT = jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0)
        x_BTD = model.embed(lax.dynamic_index_in_dim(tokens_GBT, g, keepdims=False),
                            positions_BT)
        x_BTD = jnp.where(valid, jnp.where(s == 0, x_BTD, msg), 0.0)
        valid_BS = jnp.concatenate([mask_BT, jnp.ones((Bg, max_new), bool)], axis=1)
        mask_BTS = causal_TS[None] & valid_BS[:, None, :]
        y_BTD, caches = layers(model, blocks, x_BTD, caches, g, 0, mask_BTS, valid)
        token_B = last_stage_token(model, s, y_BTD[:, -1], jax.random.fold_in(key, g))
        old = lax.dynamic_index_in_dim(first, g, keepdims=False)
        first = lax.dynamic_update_index_in_dim(first, jnp.where(valid, token_B, old), g, 0)
        return (lax.ppermute(y_BTD, STAGE, ring), caches, first), None

      (_, caches, first), _ = lax.scan(tick, (msg, caches, first), jnp.arange(G + S - 1))
      # Stage 0 starts the decode with the first tokens; the last stage keeps them too.
      first = first + lax.ppermute(first, STAGE, [(S - 1, 0)])
      return caches, first[None]

  def decode_stage(rest, blocks_local, caches, first_GB, mask_GBT, key):
    s = lax.axis_index(STAGE)
    first_GB = first_GB[0]
    with use_rules(rules, keys=gpt.CONFIG_KEYS):
      model, blocks = model_and_blocks(rest, blocks_local)
      lengths_GB = mask_GBT.sum(axis=2).astype(jnp.int32)
      out = _varying(jnp.full((G, Bg, max_new), fill, jnp.int32))
      done = _varying(jnp.zeros((G, Bg), bool))
      msg = _varying(jnp.zeros((Bg, 1, m.d_model), dtype))
      ring_token = _varying(jnp.zeros((Bg,), jnp.int32))
      ticks = (max_new - 1) * G + S - 1

      def tick(carry, t):
        msg, ring_token, caches, out, done = carry
        i = t - s
        valid = (i >= 0) & (i < (max_new - 1) * G)
        i = jnp.clip(i, 0, max(max_new - 1, 1) * G - 1)
        g, n = i % G, i // G
        mask_BT = lax.dynamic_index_in_dim(mask_GBT, g, keepdims=False)
        token_B = jnp.where(n == 0, lax.dynamic_index_in_dim(first_GB, g, keepdims=False),
                            ring_token)
        position_B = lax.dynamic_index_in_dim(lengths_GB, g, keepdims=False) + n
        x_BTD = model.embed(token_B[:, None], position_B[:, None])
        x_BTD = jnp.where(valid, jnp.where(s == 0, x_BTD, msg), 0.0)
        slot = prompt_len + n
        valid_BS = jnp.concatenate([mask_BT, jnp.ones((Bg, max_new), bool)], axis=1)
        mask_B1S = ((jnp.arange(T) <= slot)[None, :] & valid_BS)[:, None, :]
        y_BTD, caches = layers(model, blocks, x_BTD, caches, g, slot, mask_B1S, valid)
        new_B = last_stage_token(model, s, y_BTD[:, 0],
                                 jax.random.fold_in(jax.random.fold_in(key, g), n + 1))
        # Rows that produced EOS (the prefill's first token included) keep producing EOS.
        was_done_B = lax.dynamic_index_in_dim(done, g, keepdims=False)
        stopped_B = was_done_B | (lax.dynamic_index_in_dim(first_GB, g, keepdims=False) == eos)
        new_B = jnp.where(stopped_B, fill, new_B)
        keep = valid & (s == S - 1)
        row_BN = lax.dynamic_index_in_dim(out, g, keepdims=False)
        old_B = lax.dynamic_index_in_dim(row_BN, n + 1, axis=1, keepdims=False)
        row_BN = lax.dynamic_update_index_in_dim(row_BN, jnp.where(keep, new_B, old_B), n + 1,
                                                 axis=1)
        out = lax.dynamic_update_index_in_dim(out, row_BN, g, 0)
        done_B = jnp.where(keep, stopped_B | (new_B == eos), was_done_B)
        done = lax.dynamic_update_index_in_dim(done, done_B, g, 0)
        msg, ring_token = lax.ppermute((y_BTD, new_B), STAGE, ring)
        return (msg, ring_token, caches, out, done), None

      carry = (msg, ring_token, caches, out, done)
      if max_new > 1:
        carry, _ = lax.scan(tick, carry, jnp.arange(ticks))
      return carry[3][None]

  blocks_spec = P(STAGE)
  prefill_map = jax.shard_map(
      prefill_stage, mesh=mesh, in_specs=(P(), blocks_spec, P(), P(), P()),
      out_specs=({"k": P(STAGE), "v": P(STAGE)}, P(STAGE)), axis_names={STAGE})
  decode_map = jax.shard_map(
      decode_stage, mesh=mesh,
      in_specs=(P(), blocks_spec, {"k": P(STAGE), "v": P(STAGE)}, P(STAGE), P(), P()),
      out_specs=P(STAGE), axis_names={STAGE})

  def prefill(params, tokens_BT, mask_BT, key):
    params, _ = params  # (parameters, None): the Generator's calling convention
    rest = {k: v for k, v in params.items() if k != "blocks"}
    caches, first = prefill_map(rest, params["blocks"], _groups(tokens_BT, G, ways),
                                _groups(mask_BT, G, ways), key)
    return first, caches

  def decode(params, caches, first, mask_BT, key):
    params, _ = params
    rest = {k: v for k, v in params.items() if k != "blocks"}
    out = decode_map(rest, params["blocks"], caches, first, _groups(mask_BT, G, ways), key)
    out_GBN = out.reshape(S, G, Bg, max_new)[S - 1]
    first_GB = first.reshape(S, G, Bg)[S - 1]
    out_GBN = out_GBN.at[:, :, 0].set(first_GB)
    return _ungroup(out_GBN, ways), max_new  # every step runs (no early stop across stages)

  return jax.jit(prefill), jax.jit(decode)
