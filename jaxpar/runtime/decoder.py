"""The slot decoder: one KV cache of `slots` rows and every row's decoding state, and the two
programs that advance them. `generate` drives it (prefill every prompt, then a compiled loop
of its step) and the server runs it (prefill a request into a free row, one step of every row
per engine iteration); a capability of decoding is written here once.

The state is (caches, slots), both on the devices and donated to every call, so they update
in place. The cache holds `slots` rows of `length` positions per layer, laid out by the rules
(rows over `data`, key/value heads over `model`). A row's tokens sit at the cache slots equal
to their positions (prompts are right-padded, never left-padded), so each row writes at its
own position: a step's `Step.index` is the [B] vector of row positions. `Slots` holds each
row's last token, position, token count, sampling settings and random key, [B] each and split
like the rows: a step reads them and writes the next, so the host sends nothing per step.

    prefill[R, T](params, state, tokens_RT, start, lengths_R, src, slot, sampling_R,
                  seeds_R, rows_R) -> first_R, state
        R prompts, right-padded to T tokens, through every block at positions
        start..start+T-1, into rows slot..slot+R-1. With start = 0 each attends over its own
        T slots of a zeroed row; with start > 0 (one prompt, `reuse`) over a copy of row
        `src`, whose slots 0..start-1 hold the prompt's first `start` tokens (a prefix
        another request left there). Entries past a prompt's length are never visible (a row
        sees slots <= its position, and decoding overwrites them in order). The first new
        token comes from each prompt's last position.
    step[span](params, caches, slots) -> next_B, caches, slots
        each row's last token at its position; attention reads the first `span` slots of
        every row only (the least span that holds every running row, so short requests do not
        stream a long cache); rows that hold no request compute too (their output is ignored)

Random draws are keyed by (seed, prompt row, token number), (seed, token number) when the
row is -1: a request's tokens depend on neither its slot nor its neighbours, and generate's
on no mesh.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxpar.axes import BATCH, LAYERS
from jaxpar.models.base import Step, cache_leaf, run_blocks
from jaxpar.rules import constrain, use_rules
from jaxpar.runtime.sampling import Sampling, likeliest, sample


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Slots:
  """Every row's decoding state on the devices: the last token (the next step's input), its
  position, how many tokens the row has made (its draws' counter), its sampling settings,
  and its random key's data."""
  tokens: jax.Array
  positions: jax.Array
  counts: jax.Array
  sampling: Sampling
  keys: jax.Array  # uint32 [B, key size]: `jax.random.key_data`


def base_keys(seeds_R: jax.Array, rows_R: jax.Array) -> jax.Array:
  """Key data [R, ...] of key(seed), folded with the prompt row where it is >= 0."""
  def one(seed, row):
    key = jax.random.key(seed)
    with_row = jax.random.fold_in(key, jnp.maximum(row, 0))
    return jnp.where(row >= 0, jax.random.key_data(with_row), jax.random.key_data(key))
  return jax.vmap(one)(seeds_R, rows_R)


def token_keys(keys_B: jax.Array, counts_B: jax.Array) -> jax.Array:
  """The key of each row's token number `counts_B[b]` (0: the first)."""
  return jax.vmap(lambda k, n: jax.random.fold_in(jax.random.wrap_key_data(k), n))(
      keys_B, counts_B)


def request_keys(seeds_B: jax.Array, counts_B: jax.Array) -> jax.Array:
  """The key of token number `counts_B[b]` of the request seeded `seeds_B[b]` (no row)."""
  return token_keys(base_keys(seeds_B, jnp.full(seeds_B.shape, -1, jnp.int32)), counts_B)


def choose(logits_BV: jax.Array, keys_B: jax.Array, counts_B: jax.Array,
           sampling: Sampling, *, greedy: bool) -> jax.Array:
  """Next tokens [B]: the likeliest (`greedy`, every row greedy), or drawn per row."""
  if greedy:
    return likeliest(logits_BV)
  return sample(logits_BV, token_keys(keys_B, counts_B), sampling)


def new_caches(gen, batch: int, length: int, *, scan: bool) -> object:
  """Zeroed KV caches laid out by the rules: stacked [L, ...] for a scan, else one per layer
  (each leaf in the dtype its spec gives)."""
  m = gen.config.model
  spec = {k: cache_leaf(v, m) for k, v in
          gen.family.kv_cache(m, gen.layout, batch, length).items()}
  if scan:
    return {k: constrain(jnp.zeros((m.n_layers, *shape), dtype), (LAYERS, *names))
            for k, (shape, names, dtype) in spec.items()}
  return tuple({k: constrain(jnp.zeros(shape, dtype), names) for k, (shape, names, dtype) in
                spec.items()} for _ in range(m.n_layers))


def _rows(caches, src, count: int, *, scan: bool, split: bool):
  """Rows src..src+count-1 of every cache. Rows `split` over devices: a masked sum over the
  rows (one row only), so each device reads its own and one row is all-reduced (a dynamic
  slice would all-gather every row)."""
  axis = 1 if scan else 0  # a scan's caches are stacked [L, B, ...]

  def take(c):
    if not split:
      return lax.dynamic_slice_in_dim(c, src, count, axis=axis)
    mine = lax.broadcasted_iota(jnp.int32, c.shape, axis) == src
    return jnp.sum(jnp.where(mine, c, 0), axis=axis, keepdims=True, dtype=c.dtype)
  return jax.tree.map(take, caches)


def _insert(caches, rows, slot, *, scan: bool):
  """Writes `rows` into rows slot, slot+1, ... of every cache."""
  axis = 1 if scan else 0
  return jax.tree.map(lambda c, r: lax.dynamic_update_slice_in_dim(c, r, slot, axis=axis),
                      caches, rows)


def _empty_slots(B: int) -> Slots:
  zeros = lambda dtype: jnp.zeros((B,), dtype)
  key_shape = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape
  return Slots(zeros(jnp.int32), zeros(jnp.int32), zeros(jnp.int32),
               Sampling(zeros(jnp.float32), zeros(jnp.int32), jnp.ones((B,), jnp.float32)),
               jnp.zeros((B, *key_shape), jnp.uint32))


@dataclasses.dataclass
class Decoder:
  """`slots` rows of `length` positions for a `Generator`'s model (a mesh without stages)."""
  generator: object  # jaxpar.runtime.generate.Generator
  slots: int
  length: int

  @property
  def data_ways(self) -> int:
    g = self.generator
    return math.prod(g.mesh.shape[a] for a in g.rules.mesh_axes(BATCH))

  def cache_shardings(self):
    """The caches' shardings by the rules (a tree like `new_caches` makes)."""
    g = self.generator
    m, rules = g.config.model, g.rules
    spec = {k: cache_leaf(v, m)[1] for k, v in
            g.family.kv_cache(m, g.layout, self.slots, self.length).items()}
    if g.scan:
      return {k: rules.sharding((LAYERS, *names), g.mesh, what="the KV cache")
              for k, names in spec.items()}
    one = {k: rules.sharding(names, g.mesh, what="the KV cache") for k, names in spec.items()}
    return tuple(one for _ in range(m.n_layers))

  def state_shardings(self):
    """(caches, slots) shardings: the caches' by the rules, the slots' rows like the batch."""
    g = self.generator
    rows = g.rules.sharding((BATCH,), g.mesh, what="decoder slots")
    slots = jax.tree.map(lambda _: rows, _empty_slots(1))
    return self.cache_shardings(), slots

  def empty_state(self, *, abstract: bool = False):
    """(zeroed caches, empty slots) for every row (shapes and shardings only, when
    `abstract`)."""
    g = self.generator

    def make():
      with use_rules(g.rules, keys=g.family.config_keys):
        caches = new_caches(g, self.slots, self.length, scan=g.scan)
        return caches, _empty_slots(self.slots)
    shardings = self.state_shardings()
    with jax.set_mesh(g.mesh):
      fn = jax.jit(make, out_shardings=shardings)
      if not abstract:
        return fn()
      return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          jax.eval_shape(fn), shardings)

  def prefill(self, rows: int, bucket: int, *, greedy: bool = False, reuse: bool = False):
    """The jitted prefill of `rows` prompts of up to `bucket` tokens (see the module
    docstring); `reuse`: one prompt that may continue a cached prefix (start > 0). With
    rows = slots the state passed may be None: the prompts' rows become the whole state."""
    g, S, scan = self.generator, self.length, self.generator.scan
    rules = g.rules
    if rows % self.data_ways:  # rows that do not split over `data`: every group computes
      rules = rules.replace(BATCH, None)  # them, and the group holding the slot keeps them
    split = self.data_ways > 1

    def run(params, state, tokens_RT, start, lengths_R, src, slot, sampling, seeds_R, rows_R):
      caches = None if state is None else state[0]
      with use_rules(rules, keys=g.family.config_keys):
        model, graphdef, layers = g.model_parts(params)
        positions_RT = jnp.broadcast_to(start + jnp.arange(bucket, dtype=jnp.int32),
                                        (rows, bucket))
        x_RTD = model.embed(tokens_RT, positions_RT)

        def through(cache, width: int):  # the chunk over the first `width` slots of `cache`
          mask_1TS = (jnp.arange(width)[None, :] <= positions_RT[0, :, None])[None]
          return run_blocks(graphdef, layers, x_RTD, Step(positions_RT, mask_1TS, start),
                            cache, scan=scan)
        fresh = lambda: through(new_caches(g, rows, S, scan=scan), bucket)
        if reuse:  # a prompt that continues a cached prefix attends over all S slots
          x_RTD, new = lax.cond(start == 0, fresh, lambda: through(
              _rows(caches, src, rows, scan=scan, split=split), S))
        else:
          x_RTD, new = fresh()
        last_RD = jnp.take_along_axis(x_RTD, (lengths_R - 1 - start)[:, None, None], axis=1)
        keys_R = base_keys(seeds_R, rows_R)
        first_R = choose(model.head(last_RD)[:, 0], keys_R, jnp.zeros((rows,), jnp.int32),
                         sampling, greedy=greedy)
      fresh = Slots(first_R, lengths_R, jnp.ones((rows,), jnp.int32), sampling, keys_R)
      if state is None:  # every row prefilled: the new rows are the state
        return first_R, (new, fresh)
      at = slot + jnp.arange(rows)
      slots = jax.tree.map(lambda a, v: a.at[at].set(v.astype(a.dtype)), state[1], fresh)
      return first_R, (_insert(caches, new, slot, scan=scan), slots)

    return jax.jit(run, donate_argnums=(1,), out_shardings=(None, self.state_shardings()))

  def step_fn(self, *, greedy: bool, span: int):
    """One decode step of every row, traced (a loop or a program calls it):
    (params, caches, slots) -> (next_B, caches, slots)."""
    g, S = self.generator, self.length

    def step(params, caches, slots: Slots):
      positions_B = slots.positions
      model, graphdef, layers = g.model_parts(params)
      mask_B1S = (jnp.arange(span)[None, :] <= positions_B[:, None])[:, None, :]
      x_B1D = model.embed(slots.tokens[:, None], positions_B[:, None])
      x_B1D, caches = run_blocks(graphdef, layers, x_B1D,
                                 Step(positions_B[:, None], mask_B1S, positions_B), caches,
                                 scan=g.scan)
      next_B = choose(model.head(x_B1D)[:, 0], slots.keys, slots.counts, slots.sampling,
                      greedy=greedy)
      # A row past its request's end (the host drops its token) stays inside the cache.
      slots = dataclasses.replace(slots, tokens=next_B, counts=slots.counts + 1,
                                  positions=jnp.minimum(positions_B + 1, S - 1))
      return next_B, caches, slots
    return step

  def step(self, *, greedy: bool, span: int):
    """The jitted step: (params, state) -> (next_B, state), the state donated."""
    g, fn = self.generator, self.step_fn(greedy=greedy, span=span)

    def run(params, state):
      with use_rules(g.rules, keys=g.family.config_keys):
        next_B, caches, slots = fn(params, *state)
      return next_B, (caches, slots)
    return jax.jit(run, donate_argnums=(1,), out_shardings=(None, self.state_shardings()))
