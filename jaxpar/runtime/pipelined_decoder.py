"""The slot decoder on a pipeline (mesh.stage = S > 1): the rows, state and programs of
`decoder.Decoder`, run as tick functions on the stage ring (`jaxpar.parallel.ring`; `data`
and `model` stay automatic). `generate` drives it (prefill every prompt, then a compiled loop
of rounds) and the server runs it (prefill a request into a free row, one round per engine
iteration).

The slots form G = S groups that rotate through the stages: slot b is row r = b % Bg of
group g = b // Bg (Bg = slots / G). Each stage keeps the KV cache of its own layers for
every slot, [Lc, G, Bg, length + 1, K, H]; position `length` is a trash slot no query sees,
where writes that must not land go. Like the plain decoder, a row's tokens sit at the cache
slots equal to their positions (prompts right-padded).

    # prefill: n groups of R prompts (right-padded to T) into rows slot.., GPipe, n + S - 1 ticks
    for t in range(n + S - 1):
      i = t - s                                  # idle unless 0 <= i < n
      x = embed(prompt[i], 0..T-1) if s == 0 else msg
      y = layers(x, fresh cache of T slots)      # then copied into group g0 + i's rows
      if s == S-1: first[i] = sample(head(y[length - 1]), key(seed, row, 0))
      msg = send(y, s -> s+1)

    # a round: every slot's next step enters the pipeline, G ticks of the steady state;
    # msg[s], ring: what each stage received at the end of the previous round
    for t in range(G):
      g = (t - s) % G                       # the group stage s works on
      w = cur if t >= s else prev           # entered stage 0 this round, or the round before
      x = embed(inject[g] ? inject_token[g] : ring, pos[w][g]) if s == 0 else msg
      y = layers(x, cache[:, g], index = write[w][g] ? pos[w][g] : trash)
      if s == S-1: out[g] = sample(head(y), settings[w][g], key(seed, row, count)[w][g])
      msg, ring = send((y, out[g]), s -> (s+1) % S)

(`send` is the move `jaxpar.parallel.ring.run` makes after every tick: the tick functions
here never permute anything themselves.) Group g enters stage 0 at tick g and leaves the
last stage at tick g + S - 1: in this round for g = 0, in the next for the others (`late`),
so its token is read one round late, and a request that has finished has one more step in
flight, whose token is dropped. Its token reaches stage 0 through `ring` exactly when the
group's next step starts, so no stage waits (G = S). The caller says, per row, which slot
states hold for the tokens that entered this round (`cur`) and the round before (`prev`):
when a slot changes hands between rounds, the old request's step still in flight writes to
the trash slot (`write` false), not over the new request's prompt. A new prompt joins the
ring at its group's next turn (`inject`): the other groups never stop. Random draws are
keyed like the plain decoder's: (seed, row, token number), (seed, token number) where the
row is -1.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxpar.axes import ACT_EMBED, BATCH, SEQ, STAGE
from jaxpar.errors import UserError
from jaxpar.models.base import Step, cache_leaf, causal_step, run_blocks
from jaxpar.parallel import pipeline, ring
from jaxpar.rules import constrain, use_rules
from jaxpar.runtime.decoder import base_keys, token_keys
from jaxpar.runtime.sampling import Sampling, likeliest, sample


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Rows:
  """What the caller says about every slot for one round's entries, each [G, Bg]: the
  input token's position, whether its keys and values are kept, the sampling settings, the
  random seed, the row folded into the key (-1: none) and the new token's number."""
  positions: object
  write: object
  temperature: object
  top_k: object
  top_p: object
  seeds: object
  fold: object
  counts: object


def _keys(seeds, fold, counts):
  return token_keys(base_keys(seeds, fold), counts)


@dataclasses.dataclass
class PipelinedDecoder:
  """`slots` rows of `length` positions for a `Generator`'s model on a mesh with stages."""
  generator: object  # jaxpar.runtime.generate.Generator
  slots: int
  length: int

  def __post_init__(self):
    g = self.generator
    self.S = self.G = g.mesh.shape[STAGE]
    self.data_ways = math.prod(g.mesh.shape[a] for a in g.rules.mesh_axes(BATCH))
    if self.slots % (self.G * self.data_ways):
      raise UserError(f"serve.max_slots={self.slots}: with mesh.stage={self.S} the slots form "
                      f"{self.G} groups, each split over the {self.data_ways} devices of the "
                      f"batch axes; use a multiple of {self.G * self.data_ways}")
    self.Bg = self.slots // self.G
    m = g.config.model
    self.width, self.dtype = m.d_model, jnp.dtype(m.dtype)  # the activations between stages
    self.Lc = pipeline.per_chunk(m.n_layers, stages=self.S)  # identity padding included
    self.active = pipeline.active(m.n_layers, stages=self.S)  # None, or [S, 1, Lc] (uneven)

  # ---- inside the shard_map ----

  def _model(self, rest, blocks_local):
    blocks = jax.tree.map(lambda a: a[0, 0], blocks_local)  # this stage's layers [Lc, ...]
    model, graphdef, _ = self.generator.model_parts(({**rest, "blocks": blocks}, None))
    return model, graphdef, blocks

  def _spec(self, batch: int, length: int) -> dict:
    """{leaf: (shape, names, dtype)} of one layer's cache."""
    g = self.generator
    m = g.config.model
    return {k: cache_leaf(v, m) for k, v in
            g.family.kv_cache(m, g.layout, batch, length).items()}

  def _blocks(self, graphdef, blocks, x_BTD, step: Step, caches):
    """This stage's layers (identity padding passes its input on, uneven stages)."""
    on = None if self.active is None else jnp.asarray(self.active[:, 0])[ring.stage()]
    return run_blocks(graphdef, blocks, x_BTD, step, caches, scan=True, active=on)

  def _token(self, model, s, y_BD, keys_B, sampling, greedy: bool):
    """The next tokens on the last stage (zeros elsewhere: the head runs only there). Inside
    the `lax.cond` only all-reduces may run (see `sampling._search`)."""
    def compute():
      logits_BV = model.head(y_BD[:, None])[:, 0]
      if greedy:
        return ring.varying(likeliest(logits_BV))
      return ring.varying(sample(logits_BV, keys_B, sampling))
    return lax.cond(s == self.S - 1, compute,
                    lambda: ring.varying(jnp.zeros((y_BD.shape[0],), jnp.int32)))

  def _round(self, greedy: bool, rest, blocks_local, caches, msg, ring_token, inject,
             inject_token, rows: Rows):
    G, S, length = self.G, self.S, self.length
    model, graphdef, blocks = self._model(rest, blocks_local)

    def tick(t, s, carry, msg):
      caches, out = carry
      msg, ring_token = msg
      g = (t - s) % G
      w = (t >= s).astype(jnp.int32)  # 1: entered this round; 0: the round before
      row = ring.pick(ring.pick(rows, w), g)
      index_B = jnp.where(row.write, row.positions, length)
      mask_B1S = (jnp.arange(length + 1)[None, :] <= row.positions[:, None])[:, None, :]
      step = Step(row.positions[:, None], mask_B1S, index_B)
      token_B = jnp.where(ring.pick(inject, g), ring.pick(inject_token, g), ring_token)
      x_B1D = jnp.where(s == 0, model.embed(token_B[:, None], step.positions_BT), msg)
      y_B1D, new = self._blocks(graphdef, blocks, x_B1D, step, ring.pick(caches, g, axis=1))
      caches = ring.put(caches, g, new, axis=1)
      sampling = Sampling(row.temperature, row.top_k, row.top_p)
      new_B = self._token(model, s, y_B1D[:, 0], _keys(row.seeds, row.fold, row.counts),
                          sampling, greedy)
      out = ring.put(out, g, new_B, s == S - 1)
      return (caches, out), (y_B1D, new_B)

    out = jnp.zeros((G, self.Bg), jnp.int32)
    (caches, out), (msg, ring_token) = ring.run(tick, (caches, out), (msg[0], ring_token[0]),
                                                ticks=G, stages=S)
    return caches, msg[None], ring_token[None], out[None]

  def _prefill(self, greedy: bool, rest, blocks_local, caches, tokens_NRT, lengths_NR, g0,
               r0, sampling, seeds_NR, fold_NR):
    S, (n, R, T) = self.S, tokens_NRT.shape
    model, graphdef, blocks = self._model(rest, blocks_local)
    step = causal_step(R, T)

    def tick(t, s, carry, msg):
      caches, first = carry
      i = t - s
      valid = (i >= 0) & (i < n)
      i = jnp.clip(i, 0, n - 1)
      fresh = {k: jnp.zeros((self.Lc, *shape), dtype)  # [Lc, R, T, ...]
               for k, (shape, _, dtype) in self._spec(R, T).items()}
      x_RTD = jnp.where(s == 0, model.embed(ring.pick(tokens_NRT, i), step.positions_BT), msg)
      y_RTD, new = self._blocks(graphdef, blocks, x_RTD, step, ring.varying(fresh))
      for k in caches:  # group g0 + i's rows r0.., their first T slots, on valid ticks only
        update = new[k][:, None].astype(caches[k].dtype)  # [Lc, 1, R, T, ...]
        start = (0, g0 + i, r0) + (0,) * (caches[k].ndim - 3)
        old = lax.dynamic_slice(caches[k], start, update.shape)
        caches[k] = lax.dynamic_update_slice(caches[k], jnp.where(valid, update, old), start)
      lengths_R = ring.pick(lengths_NR, i)
      last_RD = jnp.take_along_axis(y_RTD, (lengths_R - 1)[:, None, None], axis=1)[:, 0]
      keys_R = _keys(ring.pick(seeds_NR, i), ring.pick(fold_NR, i), jnp.zeros((R,), jnp.int32))
      token_R = self._token(model, s, last_RD, keys_R, ring.pick(sampling, i), greedy)
      return (caches, ring.put(first, i, token_R, valid & (s == S - 1))), y_RTD

    first = jnp.zeros((n, R), jnp.int32)
    (caches, first), _ = ring.run(tick, (caches, first),
                                  jnp.zeros((R, T, self.width), self.dtype),
                                  ticks=n + S - 1, stages=S)
    return caches, first[None]

  # ---- the programs ----

  def _map(self, fn, in_specs, out_specs, *, rows: int | None = None):
    """`fn` on the ring under the model's rules; `rows` that do not split over the batch
    axes are computed by every data group."""
    g = self.generator
    rules, keys = g.rules, g.family.config_keys
    if rows is not None and rows % self.data_ways:
      rules = rules.replace(BATCH, None)

    def wrapped(*args):
      with use_rules(rules, keys=keys):
        return fn(*args)
    return ring.shard(wrapped, mesh=g.mesh, in_specs=in_specs, out_specs=out_specs)

  def _cache_specs(self):
    return {k: P(STAGE) for k in self._spec(1, 1)}

  def empty_state(self, *, abstract: bool = False):
    """(caches, msg, ring): zeroed, every stage's own, sharded over `stage`."""
    def make():
      caches = {k: ring.varying(constrain(jnp.zeros((self.Lc, self.G, *shape), dtype),
                                          (None, None, *names)))
                for k, (shape, names, dtype) in self._spec(self.Bg, self.length + 1).items()}
      msg = constrain(jnp.zeros((1, self.Bg, 1, self.width), self.dtype),
                      (None, BATCH, SEQ, ACT_EMBED))
      tokens = constrain(jnp.zeros((1, self.Bg), jnp.int32), (None, BATCH))
      return caches, ring.varying(msg), ring.varying(tokens)
    if not hasattr(self, "_empty"):
      self._empty = jax.jit(self._map(make, in_specs=(),
                                      out_specs=(self._cache_specs(), P(STAGE), P(STAGE))))
    with jax.set_mesh(self.generator.mesh):
      state = self._empty()
    if not abstract:
      return state
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                        state)

  def state_shardings(self):
    if not hasattr(self, "_state_shardings"):
      self._state_shardings = jax.tree.map(lambda a: a.sharding,
                                           self.empty_state(abstract=True))
    return self._state_shardings

  def round_fn(self, *, greedy: bool):
    """One round, traced (a loop or a program calls it): (params, state, inject [G, Bg],
    inject_token [G, Bg], rows: Rows of [2, G, Bg] (prev, cur)) -> (out [G, Bg], state):
    `out[g]` is the token of this round's entry for the groups that are not `late`, of the
    previous round's for the others."""
    spec = self._cache_specs()
    mapped = self._map(lambda *a: self._round(greedy, *a),
                       in_specs=(P(), P(STAGE), spec, P(STAGE), P(STAGE), P(), P(), P()),
                       out_specs=(spec, P(STAGE), P(STAGE), P(STAGE)))

    def run(params, state, inject, inject_token, rows):
      (params, _), (caches, msg, ring_token) = params, state
      rest = {k: v for k, v in params.items() if k != "blocks"}
      caches, msg, ring_token, out = mapped(rest, params["blocks"], caches, msg, ring_token,
                                            inject, inject_token, rows)
      return out[self.S - 1], (caches, msg, ring_token)
    return run

  def late(self) -> jax.Array:
    """[G] bool: the groups whose round's token leaves the pipeline in the next round."""
    return jnp.arange(self.G) + self.S - 1 >= self.G

  def round(self, *, greedy: bool):
    """The jitted round (`round_fn`), the state donated."""
    return jax.jit(self.round_fn(greedy=greedy), donate_argnums=(1,),
                   out_shardings=(None, self.state_shardings()))

  def prefill(self, groups: int, rows: int, bucket: int, *, greedy: bool = False):
    """The jitted prefill of `groups` x `rows` prompts of up to `bucket` tokens, into the
    rows from `slot` on: (params, state, tokens [n, R, T], lengths [n, R], slot,
    sampling [n, R], seeds [n, R], fold [n, R]) -> (first [n, R], state). A group fills
    group slot // Bg + i, rows slot % Bg ..; its prompts start at position 0."""
    spec = self._cache_specs()
    mapped = self._map(lambda *a: self._prefill(greedy, *a),
                       in_specs=(P(), P(STAGE), spec) + (P(),) * 7,
                       out_specs=(spec, P(STAGE)), rows=rows)

    def run(params, state, tokens, lengths, slot, sampling, seeds, fold):
      (params, _), (caches, msg, ring_token) = params, state
      rest = {k: v for k, v in params.items() if k != "blocks"}
      caches, first = mapped(rest, params["blocks"], caches, tokens, lengths,
                             slot // self.Bg, slot % self.Bg, sampling, seeds, fold)
      return first[self.S - 1], (caches, msg, ring_token)
    return jax.jit(run, donate_argnums=(1,), out_shardings=(None, self.state_shardings()))
