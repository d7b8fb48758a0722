"""The serving engine's compiled programs: prefill one request into a slot, and one decode step
of every slot.

The state is (caches, slots), both on the devices and donated to every call, so they update
in place. The KV cache holds `slots` rows of `length` positions per layer, laid out by the
rules like generation's (rows over `data`, key/value heads over `model`). `Slots` holds each
row's last token, position, token count and sampling settings, [B] each and split like the
rows: a decode step reads them and writes the next, so the host sends nothing per step and can
queue step t+1 before it has read step t's tokens. A row's tokens sit at the cache slots equal
to their positions (no left padding), so each row has its own write index: the decode step's
`Step.index` is the [B] vector of row positions.

    prefill[T](params, state, tokens_1T, start, length, src, slot, sampling, seed)
            -> first token, state
        prompt tokens start..length-1, right-padded to the bucket T, through every block at
        positions start..start+T-1, over a copy of cache row `src` whose slots 0..start-1
        hold the prompt's first `start` tokens (a prefix another request left there: prefix
        reuse); with start = 0, over its own T slots of a zeroed row instead (a branch of its
        own, so a fresh prompt does not attend over the whole row). The row, the new entries
        written at start, replaces row `slot` (entries past `length` are never visible: a row
        sees slots <= its position, and decoding overwrites them in order), and row `slot` of
        `Slots` is set to the request (its first token at position `length`)
    decode[span](params, state) -> next_B, state
        each row's last token at its position; attention reads the first `span` slots of
        every row only (one program per span in `spans`, 2x apart: the engine takes the least
        that holds every running row's position, so short requests do not stream a long
        cache); rows that hold no request compute too (their output is ignored and their
        cache row is rewritten by the next prefill)

Sampling is per row (`Sampling` of [B] arrays) with the draw keyed by (request seed, token
number) only, so a request's tokens do not depend on its slot or its neighbours. Greedy and
sampled decode steps are two programs: a step with every row greedy skips the filters.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxpar.axes import BATCH, LAYERS
from jaxpar.models.base import Step, cache_leaf, run_blocks
from jaxpar.rules import use_rules
from jaxpar.runtime.generate import Generator, new_caches
from jaxpar.runtime.sampling import Sampling, likeliest, sample


def request_keys(seeds_B: jax.Array, counts_B: jax.Array) -> jax.Array:
  """The key of token number `counts_B[b]` (0 = the first) of the request seeded `seeds_B[b]`."""
  return jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(seeds_B, counts_B)


def _row(caches, src, *, scan: bool, split: bool):
  """Row `src` of every cache, as a one-row cache. Rows `split` over devices: a masked sum
  over the rows, so each device reads its own and one row is all-reduced (a dynamic slice
  would all-gather every row)."""
  batch_axis = 1 if scan else 0  # a scan's caches are stacked [L, B, ...]

  def take(c):
    if not split:
      return lax.dynamic_slice_in_dim(c, src, 1, axis=batch_axis)
    mine = lax.broadcasted_iota(jnp.int32, c.shape, batch_axis) == src
    return jnp.sum(jnp.where(mine, c, 0), axis=batch_axis, keepdims=True, dtype=c.dtype)
  return jax.tree.map(take, caches)


def _insert(caches, row, slot, *, scan: bool):
  """Writes a one-row cache into row `slot`."""
  batch_axis = 1 if scan else 0
  return jax.tree.map(lambda c, r: lax.dynamic_update_slice_in_dim(c, r, slot, axis=batch_axis),
                      caches, row)


@dataclasses.dataclass
class Slots:
  """Every decode row's state on the devices, [B] each: the last token (the next step's
  input), its position, how many tokens the request has (the sampling key's counter), and the
  request's sampling settings and seed."""
  tokens: jax.Array
  positions: jax.Array
  counts: jax.Array
  sampling: Sampling
  seeds: jax.Array

  def set(self, b, token, position, sampling: Sampling, seed) -> "Slots":
    """Row `b` set to a new request (scalars)."""
    return jax.tree.map(lambda a, v: a.at[b].set(jnp.asarray(v, a.dtype)), self,
                        Slots(token, position, 1, sampling, seed))


jax.tree_util.register_dataclass(Slots, data_fields=["tokens", "positions", "counts",
                                                     "sampling", "seeds"], meta_fields=[])


def _empty_slots(B: int) -> Slots:
  zeros = lambda dtype: jnp.zeros((B,), dtype)
  return Slots(zeros(jnp.int32), zeros(jnp.int32), zeros(jnp.int32),
               Sampling(zeros(jnp.float32), zeros(jnp.int32), jnp.ones((B,), jnp.float32)),
               zeros(jnp.uint32))


@dataclasses.dataclass
class Programs:
  """The jitted programs for `slots` rows of `length` positions (compile with `compile`)."""
  generator: Generator
  slots: int
  length: int
  buckets: tuple[int, ...]
  spans: tuple[int, ...]

  def cache_shardings(self):
    """The caches' shardings by the rules (a tree like `new_caches` makes)."""
    g = self.generator
    m, rules = g.forward.config.model, g.forward.rules
    spec = {k: cache_leaf(v, m)[1] for k, v in
            g.family.kv_cache(m, g.forward.layout, self.slots, self.length).items()}
    if g.scan:
      return {k: rules.sharding((LAYERS, *names), g.mesh, what="the KV cache")
              for k, names in spec.items()}
    one = {k: rules.sharding(names, g.mesh, what="the KV cache") for k, names in spec.items()}
    return tuple(one for _ in range(m.n_layers))

  def state_shardings(self):
    """(caches, slots) shardings: the caches' by the rules, the slots' rows like the batch."""
    g = self.generator
    rows = g.forward.rules.sharding((BATCH,), g.mesh, what="serve slots")
    return self.cache_shardings(), jax.tree.map(lambda _: rows, _empty_slots(1))

  def empty_state(self, *, abstract: bool = False):
    """(zeroed caches, empty slots) for every row (shapes and shardings only, when
    `abstract`)."""
    g = self.generator

    def make():
      with use_rules(g.forward.rules, keys=g.family.config_keys):
        return new_caches(g, self.slots, self.length, scan=g.scan), _empty_slots(self.slots)
    shardings = self.state_shardings()
    with jax.set_mesh(g.mesh):
      fn = jax.jit(make, out_shardings=shardings)
      if not abstract:
        return fn()
      return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          jax.eval_shape(fn), shardings)

  def prefill(self, bucket: int):
    g = self.generator
    # One row does not split over `data`: every data group computes it (reading the source
    # row is the only collective, `_row`), and the group that holds row `slot` keeps it.
    # The engine keeps start + bucket <= length.
    rules = g.forward.rules.replace(BATCH, None)
    keys, scan, S = g.family.config_keys, g.scan, self.length
    split = math.prod(g.mesh.shape[a] for a in g.forward.rules.mesh_axes(BATCH)) > 1

    def run(params, state, tokens_1T, start, length, src, slot, sampling, seed):
      caches, slots = state
      with use_rules(rules, keys=keys):
        model, graphdef, layers = g.model_parts(params)
        positions_1T = start + jnp.arange(bucket, dtype=jnp.int32)[None]
        x_1TD = model.embed(tokens_1T, positions_1T)

        def through(row, width: int):  # the chunk over the first `width` slots of `row`
          mask_1TS = (jnp.arange(width)[None, :] <= positions_1T[0, :, None])[None]
          return run_blocks(graphdef, layers, x_1TD, Step(positions_1T, mask_1TS, start), row,
                            scan=scan)
        # A fresh prompt (start 0) attends over its own T slots of a zeroed row; one that
        # continues a cached prefix, over all S slots of a copy of row `src`.
        x_1TD, row = lax.cond(
            start == 0, lambda: through(new_caches(g, 1, S, scan=scan), bucket),
            lambda: through(_row(caches, src, scan=scan, split=split), S))
        last_11D = lax.dynamic_slice_in_dim(x_1TD, length - 1 - start, 1, axis=1)
        logits_1V = model.head(last_11D)[:, 0]
        keys_1 = request_keys(seed[None], jnp.zeros((1,), jnp.int32))
        token_1 = sample(logits_1V, keys_1, Sampling(*(jnp.reshape(v, (1,)) for v in
                                                       dataclasses.astuple(sampling))))
      slots = slots.set(slot, token_1[0], length, sampling, seed)
      return token_1[0], (_insert(caches, row, slot, scan=scan), slots)

    return jax.jit(run, donate_argnums=(1,), out_shardings=(None, self.state_shardings()))

  def decode(self, *, greedy: bool, span: int):
    g = self.generator
    rules, keys, scan, S = g.forward.rules, g.family.config_keys, g.scan, self.length

    def run(params, state):
      caches, slots = state
      positions_B = slots.positions
      with use_rules(rules, keys=keys):
        model, graphdef, layers = g.model_parts(params)
        mask_B1S = (jnp.arange(span)[None, :] <= positions_B[:, None])[:, None, :]
        step = Step(positions_B[:, None], mask_B1S, positions_B)
        x_B1D = model.embed(slots.tokens[:, None], step.positions_BT)
        x_B1D, caches = run_blocks(graphdef, layers, x_B1D, step, caches, scan=scan)
        logits_BV = model.head(x_B1D)[:, 0]
        if greedy:
          next_B = likeliest(logits_BV)
        else:
          next_B = sample(logits_BV, request_keys(slots.seeds, slots.counts), slots.sampling)
      # A row past its request's end (the host drops its token) stays inside the cache.
      slots = dataclasses.replace(slots, tokens=next_B, counts=slots.counts + 1,
                                  positions=jnp.minimum(positions_B + 1, S - 1))
      return next_B, (caches, slots)

    return jax.jit(run, donate_argnums=(1,), out_shardings=(None, self.state_shardings()))
