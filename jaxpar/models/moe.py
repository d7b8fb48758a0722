"""A mixture-of-experts MLP (Mixtral, Qwen3-MoE), dropless, over the `expert` mesh axis.

Each token's router picks `top_k` of `E` SwiGLU experts (softmax over all experts in float32,
the top k kept, renormalised when `norm_topk`) and its output is the weighted sum of theirs.
Expert weights are stacked [E, F, D] / [E, D, F], the experts split over the mesh axes of
logical `experts` (default `expert`), each expert's width over those of `mlp` (`model`, as a
dense MLP's is: column-parallel gate and up, row-parallel down).

The experts run by hand, in a `shard_map` over the batch, expert and width axes:

    route: each device sorts its tokens' (token, expert) pairs by expert
    if the batch is split over the expert axes (the default rules):
        all-to-all: the rows for each device's experts go to it (chunks padded to the pair
                    count, so nothing is ever dropped), with the per-expert counts (one
                    buffer: two collectives could meet the wrong partners on XLA:CPU)
        grouped MLP on the rows received
        all-to-all back; each pair's output returns to its token's device
    else (tokens replicated over the expert axes, e.g. rules.batch=data for batch-1 decode):
        grouped MLP on the pairs whose expert is local; sum over the expert axes
    combine: sum of the k outputs weighted by the router; sum over the width axes

The grouped MLP is a loop over tiles of rows of one expert (rows sorted by expert, each
expert's run padded to whole tiles), run only as many times as there are tiles that hold
rows, so only the chosen experts' weights are read (XLA:CPU's `lax.ragged_dot` multiplies
every row by every expert, 7x slower here). A step of few pairs (decode) runs one row a trip,
the product XLA:CPU streams fastest; a prefill, tiles of up to TILE rows. The loop's trip
count depends on the routing, so this forward pass is not differentiable in reverse mode.
"""

import math

import jax
import jax.numpy as jnp
from jax import lax
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxpar import axes, quant
from jaxpar.axes import EMBED, EXPERTS, MLP
from jaxpar.config import ModelConfig
from jaxpar.models import base, taps
from jaxpar.parallel import ring
from jaxpar.rules import active_rules

TILE = 128  # most rows of one expert multiplied together
# Steps of at most this many (token, expert) pairs run one row a trip. Measured (XLA:CPU, 2
# cores, 8 experts of 1024 x 1024): 8 one-row trips 2.9 ms, 8 two-row trips 8.1 ms.
ONE_ROW = 32


def route(logits_NE: jax.Array, top_k: int, norm_topk: bool) -> tuple[jax.Array, jax.Array]:
  """(weights [..., k] float32, experts [..., k] int32): the top `top_k` of a float32 softmax
  over the experts, renormalised to sum to 1 when `norm_topk` (as Hugging Face's routers)."""
  probs = jax.nn.softmax(logits_NE.astype(jnp.float32), axis=-1)
  weights, experts = lax.top_k(probs, top_k)
  if norm_topk:
    weights = weights / weights.sum(-1, keepdims=True)
  return weights, experts.astype(jnp.int32)


def swiglu(x_RD: jax.Array, w_gate_FD, w_up_FD, w_down_DF) -> jax.Array:
  """One expert on rows x, its weights [out, in] float or int8 (`base.project`, as a dense
  MLP multiplies). One row: x @ w.T, XLA:CPU's fastest matrix-vector product; with int8
  weights (weight-only) the int8 matrix converted inside it and the product scaled per row:
  8 experts of 1024 x 1024 in 1.3 ms against 4.7 through Qwix (measured, 2 cores)."""
  if x_RD.shape[0] == 1:
    if not quant.is_quantized(w_gate_FD):
      return (jax.nn.silu(x_RD @ w_gate_FD.T) * (x_RD @ w_up_FD.T)) @ w_down_DF.T
    if w_gate_FD.mode == "int8":
      times = lambda x, w: (x @ w.values.T.astype(x.dtype)) * w.scale[:, 0].astype(x.dtype)
      return times(jax.nn.silu(times(x_RD, w_gate_FD)) * times(x_RD, w_up_FD), w_down_DF)
  project = lambda x, w: base.project(x[None], w)[0]
  return project(jax.nn.silu(project(x_RD, w_gate_FD)) * project(x_RD, w_up_FD), w_down_DF)


def _expert(w, g):
  """Expert `g` of stacked weights [G, out, in], float or int8 (`quant.QWeight`)."""
  if quant.is_quantized(w):
    return quant.QWeight(w.values[g], w.scale[g], w.mode)
  return w[g]


def _exclusive_cumsum(x: jax.Array) -> jax.Array:
  return jnp.cumsum(x) - x


def grouped_mlp(x_RD: jax.Array, group_R: jax.Array, counts_G: jax.Array, w_gate_GFD,
                w_up_GFD, w_down_GDF, *, tile: int) -> jax.Array:
  """Row r through expert `group_R[r]` (G: no expert, output 0); `counts_G` rows per expert.

  Rows are sorted by expert into a buffer where each expert's run starts at a multiple of
  `tile`; a loop multiplies one tile by its expert's weights per trip, for the tiles that
  hold rows only."""
  R, D = x_RD.shape
  G = counts_G.shape[0]
  order = jnp.argsort(group_R, stable=True)
  group_S = group_R[order]
  tiles_G = -(-counts_G // tile)
  padded_start_G = _exclusive_cumsum(tiles_G) * tile
  rank_S = jnp.arange(R) - _exclusive_cumsum(counts_G)[jnp.minimum(group_S, G - 1)]
  slots = -(-(R + G * (tile - 1)) // tile) * tile  # any routing fits
  where_S = jnp.where(group_S < G, padded_start_G[jnp.minimum(group_S, G - 1)] + rank_S, slots)
  xp = jnp.zeros((slots, D), x_RD.dtype).at[where_S].set(x_RD[order], mode="drop")
  tile_expert = jnp.searchsorted(jnp.cumsum(tiles_G), jnp.arange(slots // tile), side="right")
  tile_expert = jnp.minimum(tile_expert, G - 1)

  def body(i, yp):
    g = tile_expert[i]
    rows = lax.dynamic_slice_in_dim(xp, i * tile, tile)
    out = swiglu(rows, *(_expert(w, g) for w in (w_gate_GFD, w_up_GFD, w_down_GDF)))
    out = out.astype(yp.dtype)
    return lax.dynamic_update_slice_in_dim(yp, out, i * tile, 0)

  yp = lax.fori_loop(0, tiles_G.sum(), body, jnp.zeros_like(xp))
  y_S = yp.at[where_S].get(mode="fill", fill_value=0)
  return jnp.zeros_like(y_S).at[order].set(y_S)


def _tile(rows: int, groups: int) -> int:
  """Rows per tile: 1 for a step of at most ONE_ROW (token, expert) pairs (a decode step: a
  one-row product streams the weights fastest on XLA:CPU, and only the chosen experts are
  read), else the power of two near the rows an expert gets on average, at most TILE."""
  if rows <= ONE_ROW:
    return 1
  return min(TILE, 1 << max(0, math.ceil(math.log2(rows / groups))))


def _local(x_ND, experts_A, weights, n_local: int, first) -> jax.Array:
  """[A, D]: each (token, expert) pair through its expert where it is one of the `n_local`
  experts from `first` here; 0 elsewhere."""
  local_A = experts_A - first
  local_A = jnp.where((local_A >= 0) & (local_A < n_local), local_A, n_local)
  counts = jnp.bincount(local_A, length=n_local + 1)[:n_local]
  k = experts_A.shape[0] // x_ND.shape[0]
  rows = jnp.repeat(x_ND, k, axis=0)
  return grouped_mlp(rows, local_A, counts, *weights, tile=_tile(rows.shape[0], n_local))


def _exchange(x_ND, experts_A, weights, n_local: int, devices: int, axis) -> jax.Array:
  """[A, D]: each pair through its expert on the device that holds it (all-to-all there, with
  the per-expert counts, and back over `axis`, `devices` wide; each chunk has room for every
  pair: dropless)."""
  A, D = experts_A.shape[0], x_ND.shape[1]
  k = A // x_ND.shape[0]
  order = jnp.argsort(experts_A, stable=True)
  expert_S = experts_A[order]
  counts_E = jnp.bincount(experts_A, length=devices * n_local)
  to_X = counts_E.reshape(devices, n_local).sum(1)
  dest_S = expert_S // n_local
  slot_S = jnp.arange(A) - _exclusive_cumsum(to_X)[dest_S]
  send = jnp.zeros((devices, A, D), x_ND.dtype).at[dest_S, slot_S].set(x_ND[order // k])
  # One all-to-all for the rows and their counts: XLA:CPU runs independent collectives in
  # any order on each device, so two could meet the wrong partners.
  out = (send, counts_E.reshape(devices, n_local))
  recv, counts = ring.unpack(lax.all_to_all(ring.pack(out), axis, 0, 0, tiled=True), out)
  # Source s sent its rows sorted by expert: row j of its chunk is for the local expert whose
  # running count first exceeds j (n_local: padding).
  ends = jnp.cumsum(counts, axis=1)
  local_R = (jnp.arange(A)[None, :, None] >= ends[:, None, :]).sum(-1).reshape(-1)
  y = grouped_mlp(recv.reshape(devices * A, D), local_R, counts.sum(0), *weights,
                  tile=_tile(A, n_local))
  back = lax.all_to_all(y.reshape(devices, A, D), axis, 0, 0, tiled=True)
  y_S = back[dest_S, slot_S]
  return jnp.zeros_like(y_S).at[order].set(y_S)


def _axes(name: str, mesh) -> tuple[str, ...]:
  """The mesh axes of logical `name` that split something here: wider than 1 and not yet
  manual (a pipeline's `stage`), in mesh order."""
  wanted = active_rules().mesh_axes(name)
  return tuple(a for a, size, t in zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types)
               if a in wanted and size > 1 and t != jax.sharding.AxisType.Manual)


def experts_mlp(x_BTD: jax.Array, router_ED: jax.Array, w_gate_EFD, w_up_EFD, w_down_EDF, *,
                top_k: int, norm_topk: bool, route_fn=None, counts: bool = False):
  """The MoE MLP of x on the mesh (module docstring): each token through its top_k experts
  (`route(x @ router.T)`, or `route_fn(x_ND)` -> (weights, experts) [N, k]), weighted.
  `counts`: (y, int32 [B, E]: how many of each row's tokens chose each expert)."""
  mesh = jax.sharding.get_abstract_mesh()
  batch, expert, width = _axes(axes.BATCH, mesh), _axes(axes.EXPERTS, mesh), _axes(axes.MLP, mesh)
  devices = math.prod(mesh.shape[a] for a in expert)
  exchange = devices > 1 and set(expert) <= set(batch)  # else disjoint (config_check)
  E = w_gate_EFD.shape[0]  # a QWeight's too
  n_local = E // devices

  def per_device(x_BTD, router, w_gate, w_up, w_down):
    B, T, D = x_BTD.shape
    x_ND = x_BTD.reshape(B * T, D)
    if route_fn is None:  # routed here, on each device's own tokens (GSPMD gathers top_k's)
      w_Nk, e_Nk = route(jnp.einsum("nd,ed->ne", x_ND, router), top_k, norm_topk)
    else:
      w_Nk, e_Nk = route_fn(x_ND)
    e_A = e_Nk.reshape(-1)
    weights = (w_gate, w_up, w_down)
    if exchange:
      y_AD = _exchange(x_ND, e_A, weights, n_local, devices, expert)
    else:
      first = lax.axis_index(expert) * n_local if devices > 1 else 0
      y_AD = _local(x_ND, e_A, weights, n_local, first)
    y_ND = jnp.einsum("nkd,nk->nd", y_AD.reshape(B * T, top_k, D).astype(jnp.float32), w_Nk)
    summed = width + (() if exchange else expert)
    y_ND = lax.psum(y_ND, summed) if summed else y_ND
    y_BTD = y_ND.astype(x_BTD.dtype).reshape(B, T, D)
    if not counts:
      return y_BTD
    row_A = jnp.arange(e_A.shape[0]) // (T * top_k)
    return y_BTD, jnp.zeros((B, E), jnp.int32).at[row_A, e_A].add(1)

  args = (x_BTD, router_ED, w_gate_EFD, w_up_EFD, w_down_EDF)
  manual = set(batch) | set(expert) | set(width)
  if not manual:
    return per_device(*args)
  tokens = P(batch or None)
  spec_in, spec_out = P(expert or None, width or None), P(expert or None, None, width or None)
  if quant.is_quantized(w_down_EDF):  # an int8 weight's scales are [E, out, 1]
    spec_in = quant.QWeight(spec_in, spec_in, w_gate_EFD.mode)
    spec_out = quant.QWeight(spec_out, P(expert or None), w_down_EDF.mode)
  mapped = jax.shard_map(per_device, in_specs=(tokens, P(), spec_in, spec_in, spec_out),
                         out_specs=(tokens, tokens) if counts else tokens, axis_names=manual,
                         check_vma=False)
  return mapped(*args)


class MoeMlp(nnx.Module):
  """The mixture-of-experts MLP of a block: a router [E, D] (replicated) and E SwiGLU experts."""

  def __init__(self, cfg: ModelConfig, dtype, *, rngs: nnx.Rngs):
    o = cfg.options
    E, F, D, std = o.n_experts, o.expert_d_ff or cfg.d_ff, cfg.d_model, cfg.init_std
    self.top_k, self.norm_topk = o.experts_per_token, o.norm_topk
    self.router = base.param(rngs, (E, D), (None, EMBED), std, dtype)
    self.w_gate = base.param(rngs, (E, F, D), (EXPERTS, MLP, EMBED), std, dtype)
    self.w_up = base.param(rngs, (E, F, D), (EXPERTS, MLP, EMBED), std, dtype)
    self.w_down = base.param(rngs, (E, D, F), (EXPERTS, EMBED, MLP),
                             std / math.sqrt(2 * cfg.n_layers), dtype)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    """The layer's output; `taps.tap`s each row's tokens per expert [B, E] when asked."""
    out = experts_mlp(x_BTD, self.router[...], self.w_gate[...], self.w_up[...],
                      self.w_down[...], top_k=self.top_k, norm_topk=self.norm_topk,
                      counts=taps.tapping())
    if taps.tapping():
      out, counts_BE = out
      taps.tap(counts_BE)
    return base.residual(out)
