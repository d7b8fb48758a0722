"""Continuous batching on a pipeline (mesh.stage = S > 1): the slots form G = S groups that
rotate through the stages, and the pipeline never drains between engine steps.

Slot b is row r = b % Bg of group g = b // Bg (Bg = slots / G). Each stage keeps the KV cache
of its own layers for every slot, [Lc, G, Bg, length + 1, K, H]; position `length` is a trash
slot that no query sees, where writes that must not land go. One engine step is one *round*,
G ticks of the steady-state pipeline on the stage ring (`jaxpar.parallel.ring`), and the
activations and tokens in flight are carried from one round to the next:

    # a round; msg[s], ring: what each stage received at the end of the previous round
    for t in range(G):
      g = (t - s) % G                       # the group stage s works on
      w = cur if t >= s else prev           # entered stage 0 this round, or the round before
      x = embed(inject[g] ? inject_token[g] : ring, pos[w][g]) if s == 0 else msg
      y = layers(x, cache[:, g], index = write[w][g] ? pos[w][g] : trash)
      if s == S-1: out[g] = sample(head(y), settings[w][g], key(seed, count)[w][g])
      msg, ring = ppermute((y, out[g]), s -> (s+1) % S)

Group g enters stage 0 at tick g and leaves the last stage at tick g + S - 1: in this round
for g = 0, in the next for the others, so the host reads each token one round late (`exits`)
and a request that has finished has one more step in flight, whose token it drops. Its
token reaches stage 0 through `ring` exactly when the group's next step starts, so the device
never waits for the host. The host says, per row, which slot states hold for the tokens that
entered this round (`cur`) and the round before (`prev`): when a slot changes hands between
rounds, the old request's step still in flight writes to the trash slot (`write` false), not
over the new request's prompt. A new request's prompt is prefilled through the stages one
after the other (S ticks) straight into its slot, and its first token joins the ring at its
group's next turn (`inject`): the other groups never stop.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxpar.axes import ACT_EMBED, BATCH, SEQ, STAGE
from jaxpar.models.base import Step, cache_leaf, run_blocks
from jaxpar.parallel import pipeline, ring
from jaxpar.rules import constrain, use_rules
from jaxpar.runtime.generate import Generator
from jaxpar.runtime.sampling import Sampling, likeliest, sample
from jaxpar.runtime.decoder import request_keys

_ROW_FIELDS = ("positions", "write", "temperature", "top_k", "top_p", "seeds", "counts")


@dataclasses.dataclass
class Rows:
  """What the host says about every slot for one round's entries, each [G, Bg]."""
  positions: object
  write: object
  temperature: object
  top_k: object
  top_p: object
  seeds: object
  counts: object


jax.tree_util.register_dataclass(Rows, data_fields=list(_ROW_FIELDS), meta_fields=[])


@dataclasses.dataclass
class PipelinedPrograms:
  generator: Generator
  slots: int
  length: int
  buckets: tuple[int, ...]

  def __post_init__(self):
    mesh, rules = self.generator.mesh, self.generator.forward.rules
    self.S = self.G = mesh.shape[STAGE]
    ways = math.prod(mesh.shape[a] for a in rules.mesh_axes(BATCH))
    if self.slots % (self.G * ways):
      from jaxpar.errors import UserError
      raise UserError(f"serve.max_slots={self.slots}: with mesh.stage={self.S} the slots form "
                      f"{self.G} groups, each split over the {ways} devices of the batch "
                      f"axes; use a multiple of {self.G * ways}")
    self.Bg = self.slots // self.G
    m = self.generator.forward.config.model
    self.width, self.dtype = m.d_model, jnp.dtype(m.dtype)
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
    m = g.forward.config.model
    return {k: cache_leaf(v, m) for k, v in
            g.family.kv_cache(m, g.forward.layout, batch, length).items()}

  def _new_caches(self):
    return {k: ring.varying(constrain(jnp.zeros((self.Lc, self.G, *shape), dtype),
                                  (None, None, *names)))
            for k, (shape, names, dtype) in self._spec(self.Bg, self.length + 1).items()}

  def _blocks(self, graphdef, blocks, x_BTD, step: Step, caches):
    """This stage's layers (identity padding passes its input on, uneven stages)."""
    on = None if self.active is None else jnp.asarray(self.active[:, 0])[ring.stage()]
    return run_blocks(graphdef, blocks, x_BTD, step, caches, scan=True, active=on)

  def _token(self, model, s, y_BD, keys_B, sampling, greedy: bool):
    """The next tokens on the last stage (zeros elsewhere); only all-reduces inside."""
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
    out = jnp.zeros((G, self.Bg), jnp.int32)

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
      keys_B = request_keys(row.seeds, row.counts)
      sampling = Sampling(row.temperature, row.top_k, row.top_p)
      new_B = self._token(model, s, y_B1D[:, 0], keys_B, sampling, greedy)
      out = ring.put(out, g, new_B, s == S - 1)
      return (caches, out), (y_B1D, new_B)

    (caches, out), (msg, ring_token) = ring.run(tick, (caches, out), (msg[0], ring_token[0]),
                                                ticks=G, stages=S)
    return caches, msg[None], ring_token[None], out[None]

  def _prefill(self, bucket: int, rest, blocks_local, caches, tokens_1T, length, g, r,
               sampling, seed):
    S = self.S
    model, graphdef, blocks = self._model(rest, blocks_local)
    positions_1T = jnp.arange(bucket, dtype=jnp.int32)[None]
    step = Step(positions_1T, jnp.tril(jnp.ones((1, bucket, bucket), bool)), 0)
    embedded = model.embed(tokens_1T, positions_1T)

    def tick(t, s, carry, msg):
      caches, first = carry
      row = {k: jnp.zeros((self.Lc, *shape), dtype)  # [Lc, 1, ...]
             for k, (shape, _, dtype) in self._spec(1, bucket).items()}
      x_1TD = jnp.where(s == 0, embedded, msg)
      y_1TD, row = self._blocks(graphdef, blocks, x_1TD, step, ring.varying(row))
      mine = t == s  # stage s holds the prompt at tick s
      for k in caches:  # only this slot's first `bucket` positions, and only on tick s
        update = row[k][:, None].astype(caches[k].dtype)  # [Lc, 1, 1, ...]
        start = (0, g, r) + (0,) * (caches[k].ndim - 3)
        old = lax.dynamic_slice(caches[k], start, update.shape)
        caches[k] = lax.dynamic_update_slice(caches[k], jnp.where(mine, update, old), start)
      last_11D = lax.dynamic_slice_in_dim(y_1TD, length - 1, 1, axis=1)
      keys_1 = request_keys(seed[None], jnp.zeros((1,), jnp.int32))
      token_1 = self._token(model, s, last_11D[:, 0], keys_1, sampling, greedy=False)
      return (caches, jnp.where(mine & (s == S - 1), token_1, first)), y_1TD

    (caches, first), _ = ring.run(tick, (caches, jnp.zeros((1,), jnp.int32)),
                                  jnp.zeros_like(embedded), ticks=S, stages=S)
    return caches, first[None]

  # ---- the programs ----

  def _map(self, fn, in_specs, out_specs, *, one_row: bool = False):
    g = self.generator
    rules, keys = g.forward.rules, g.family.config_keys
    if one_row:  # a single row does not split over `data`: every data group computes it
      rules = rules.replace(BATCH, None)

    def wrapped(*args):
      with use_rules(rules, keys=keys):
        return fn(*args)
    return ring.shard(wrapped, mesh=g.mesh, in_specs=in_specs, out_specs=out_specs)

  def _cache_specs(self):
    return {k: P(STAGE) for k in self._spec(1, 1)}

  def empty_state(self, *, abstract: bool = False):
    """(caches, msg, ring): zeroed, every stage's own, sharded over `stage`."""
    g = self.generator
    mapped = self._map(lambda: (
        self._new_caches(),
        ring.varying(constrain(jnp.zeros((1, self.Bg, 1, self.width), self.dtype),
                           (None, BATCH, SEQ, ACT_EMBED))),
        ring.varying(constrain(jnp.zeros((1, self.Bg), jnp.int32), (None, BATCH)))),
                       in_specs=(), out_specs=(self._cache_specs(), P(STAGE), P(STAGE)))
    with jax.set_mesh(g.mesh):
      state = jax.jit(mapped)()
    if not abstract:
      return state
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                        state)

  def state_shardings(self):
    if not hasattr(self, "_state_shardings"):
      self._state_shardings = jax.tree.map(lambda a: a.sharding,
                                           self.empty_state(abstract=True))
    return self._state_shardings

  def round(self, *, greedy: bool):
    spec = self._cache_specs()
    mapped = self._map(lambda *a: self._round(greedy, *a),
                       in_specs=(P(), P(STAGE), spec, P(STAGE), P(STAGE), P(), P(), P()),
                       out_specs=(spec, P(STAGE), P(STAGE), P(STAGE)))

    def run(params, state, inject, inject_token, rows):
      (params, _), (caches, msg, ring) = params, state
      rest = {k: v for k, v in params.items() if k != "blocks"}
      caches, msg, ring, out = mapped(rest, params["blocks"], caches, msg, ring, inject,
                                      inject_token, rows)
      return out[self.S - 1], (caches, msg, ring)
    return jax.jit(run, donate_argnums=(1,), out_shardings=(None, self.state_shardings()))

  def prefill(self, bucket: int):
    spec = self._cache_specs()
    mapped = self._map(lambda *a: self._prefill(bucket, *a),
                       in_specs=(P(), P(STAGE), spec, P(), P(), P(), P(), P(), P()),
                       out_specs=(spec, P(STAGE)), one_row=True)

    def run(params, state, tokens_1T, length, slot, sampling, seed):
      (params, _), (caches, msg, ring) = params, state
      rest = {k: v for k, v in params.items() if k != "blocks"}
      sampling = Sampling(*(jnp.reshape(v, (1,)) for v in dataclasses.astuple(sampling)))
      caches, first = mapped(rest, params["blocks"], caches, tokens_1T, length,
                             slot // self.Bg, slot % self.Bg, sampling, seed)
      return first[self.S - 1, 0], (caches, msg, ring)
    return jax.jit(run, donate_argnums=(1,), out_shardings=(None, self.state_shardings()))
