"""Pipelined decoding: groups of sequences rotate through the stages, one group per stage.

With S stages the B prompts form G = S groups (strided, so each group keeps the `data`
split). Every stage keeps the KV cache of its own layers for all groups,
[Lc, G, B/G, T, K, H], on its own devices. Two programs, each a tick function on the stage ring
(`jaxpar.parallel.ring`; `data` and `model` stay automatic). Every stage runs its layers
through `run_blocks`, the same way as the unpipelined path, and computes the positions of
group g's tokens itself from the prompt lengths (rotary positions are needed in every block):

    # prefill: GPipe over the groups, G + S - 1 ticks
    for t in range(G + S - 1):
      g = t - s                                  # idle unless 0 <= g < G
      x = embed(prompt[g]) if s == 0 else msg
      y = layers(x, cache[:, g], slots 0..T0-1)  # writes group g's cache slice only
      if s == S-1: first[g] = sample(head(y[:, -1]))
      msg = ppermute(y, s -> s+1)
    first += ppermute(first, S-1 -> 0)           # stage 0 starts decoding with these

    # decode: N - 1 steps for every group, (N-1)*G + S - 1 ticks, no stalls
    for t in range((N-1)*G + S - 1):
      i = t - s; g, n = i % G, i // G            # idle unless 0 <= i < (N-1)*G
      token = (first[g] if n == 0 else ring_token) if s == 0 else -
      x = embed(token, position=len[g] + n) if s == 0 else msg
      y = layers(x, cache[:, g], slot T0 + n)
      if s == S-1: out[g, n+1] = sample(head(y))  # a row that stopped repeats its EOS
      msg, ring_token = ppermute((y, out[g, n+1]), s -> (s+1) % S)

The last stage finishes group g's step n at tick n*G + g + S - 1 and its token reaches
stage 0 at the next tick, exactly when group g's step n + 1 starts there: with G = S no stage
waits. Bubble ticks compute on zeros and write back the cache slice they read, so they change
nothing. Logits are computed only on the last stage (a `lax.cond` on the stage index).
"""

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxpar.axes import BATCH, STAGE
from jaxpar.models.base import Step, cache_leaf, run_blocks
from jaxpar.parallel import pipeline, ring
from jaxpar.rules import constrain, use_rules
from jaxpar.runtime.decoding import is_eos, prompt_step, token_step
from jaxpar.runtime.sampling import row_keys, sample


def _groups(x, G: int, ways: int):
  """[B, ...] -> [G, B/G, ...]: group g takes rows [g*r, (g+1)*r) of every batch shard."""
  B, rest = x.shape[0], x.shape[1:]
  rows = B // (ways * G)
  return jnp.swapaxes(x.reshape(ways, G, rows, *rest), 0, 1).reshape(G, ways * rows, *rest)


def _ungroup(x, ways: int):
  G, Bg, rest = x.shape[0], x.shape[1], x.shape[2:]
  rows = Bg // ways
  return jnp.swapaxes(x.reshape(G, ways, rows, *rest), 0, 1).reshape(G * Bg, *rest)


class _Stage:
  """What one stage runs inside the shard_map, for a batch of G groups of Bg rows."""

  def __init__(self, gen, G: int, Bg: int, prompt_len: int, max_new: int, sampling):
    self.gen, self.G, self.Bg = gen, G, Bg
    self.prompt_len, self.max_new, self.sampling = prompt_len, max_new, sampling
    self.S = gen.mesh.shape[STAGE]
    m = gen.forward.config.model
    self.width, self.dtype = m.d_model, jnp.dtype(m.dtype)  # the activations between stages
    self.active = pipeline.active(m.n_layers, stages=self.S)  # None, or [S, 1, Lc] (uneven)

  def model(self, rest, blocks_local):
    blocks = jax.tree.map(lambda a: a[0, 0], blocks_local)  # [Lc, ...]: this stage's layers
    model, graphdef, _ = self.gen.model_parts(({**rest, "blocks": blocks}, None))
    return model, graphdef, blocks

  def empty_caches(self):
    m = self.gen.forward.config.model
    Lc = pipeline.per_chunk(m.n_layers, stages=self.S)  # identity padding included
    spec = self.gen.family.kv_cache(m, self.gen.forward.layout, self.Bg,
                                    self.prompt_len + self.max_new)
    spec = {k: cache_leaf(v, m) for k, v in spec.items()}
    return {k: ring.varying(constrain(jnp.zeros((Lc, self.G, *shape), dtype), (None, None, *names)))
            for k, (shape, names, dtype) in spec.items()}

  def layers(self, graphdef, blocks, x_BTD, step: Step, caches, g, valid):
    """This stage's layers on group g; writes back only group g's cache slice. Identity
    padding layers (uneven stages) write only their own cache slots, which nothing reads."""
    on = None if self.active is None else jnp.asarray(self.active[:, 0])[ring.stage()]
    y_BTD, new = run_blocks(graphdef, blocks, x_BTD, step, ring.pick(caches, g, axis=1),
                            scan=True, active=on)
    caches = ring.put(caches, g, new, valid, axis=1)
    return y_BTD, caches

  def token(self, model, s, y_BD, keys_B):
    """The next tokens [Bg] on the last stage (zeros elsewhere: the head runs only there).
    Inside the `lax.cond` only all-reduces may run (see `sampling._search`)."""
    def compute():
      return ring.varying(sample(model.head(y_BD[:, None])[:, 0], keys_B, self.sampling))
    return lax.cond(s == self.S - 1, compute,
                    lambda: ring.varying(jnp.zeros((self.Bg,), jnp.int32)))


def _prefill_stage(st: _Stage, rest, blocks_local, tokens_GBT, mask_GBT, rows_GB, key):
  G, S = st.G, st.S
  model, graphdef, blocks = st.model(rest, blocks_local)
  msg = jnp.zeros((st.Bg, st.prompt_len, st.width), st.dtype)
  first = jnp.zeros((G, st.Bg), jnp.int32)

  def tick(t, s, carry, msg):
    caches, first = carry
    i = t - s
    valid = (i >= 0) & (i < G)
    g = jnp.clip(i, 0, G - 1)
    step = prompt_step(ring.pick(mask_GBT, g), st.max_new)
    x_BTD = model.embed(ring.pick(tokens_GBT, g), step.positions_BT)
    x_BTD = jnp.where(valid, jnp.where(s == 0, x_BTD, msg), 0.0)
    y_BTD, caches = st.layers(graphdef, blocks, x_BTD, step, caches, g, valid)
    token_B = st.token(model, s, y_BTD[:, -1], row_keys(key, ring.pick(rows_GB, g), 0))
    return (caches, ring.put(first, g, token_B, valid)), y_BTD

  (caches, first), _ = ring.run(tick, (st.empty_caches(), first), msg, ticks=G + S - 1,
                                stages=S)
  # Stage 0 starts the decode with the first tokens; the last stage keeps them too.
  first = first + ring.send(first, [(S - 1, 0)])
  return caches, first[None]


def _decode_stage(st: _Stage, rest, blocks_local, caches, first_GB, mask_GBT, rows_GB, key):
  G, S, Bg, N = st.G, st.S, st.Bg, st.max_new
  eos_ids = st.gen.eos_ids
  first_GB = first_GB[0]
  model, graphdef, blocks = st.model(rest, blocks_local)
  out = jnp.zeros((G, Bg, N), jnp.int32)
  done = jnp.zeros((G, Bg), bool)
  msg = (jnp.zeros((Bg, 1, st.width), st.dtype), jnp.zeros((Bg,), jnp.int32))

  def tick(t, s, carry, msg):
    caches, out, done = carry
    msg, ring_token = msg
    i = t - s
    valid = (i >= 0) & (i < (N - 1) * G)
    i = jnp.clip(i, 0, max(N - 1, 1) * G - 1)
    g, n = i % G, i // G  # group g makes its new token n + 1
    first_B = ring.pick(first_GB, g)
    token_B = jnp.where(n == 0, first_B, ring_token)
    step = token_step(ring.pick(mask_GBT, g), N, n + 1)
    x_BTD = model.embed(token_B[:, None], step.positions_BT)
    x_BTD = jnp.where(valid, jnp.where(s == 0, x_BTD, msg), 0.0)
    y_BTD, caches = st.layers(graphdef, blocks, x_BTD, step, caches, g, valid)
    new_B = st.token(model, s, y_BTD[:, 0], row_keys(key, ring.pick(rows_GB, g), n + 1))
    # Rows that produced EOS (the prefill's first token included) repeat it.
    stopped_B = ring.pick(done, g) | is_eos(first_B, eos_ids)
    previous_B = jnp.where(n == 0, first_B, ring.pick(ring.pick(out, g), n, axis=1))
    new_B = jnp.where(stopped_B, previous_B, new_B)
    keep = valid & (s == S - 1)
    out = ring.put(out, g, ring.put(ring.pick(out, g), n + 1, new_B, keep, axis=1))
    done = ring.put(done, g, stopped_B | is_eos(new_B, eos_ids), keep)
    return (caches, out, done), (y_BTD, new_B)

  if N > 1:
    (_, out, _), _ = ring.run(tick, (caches, out, done), msg, ticks=(N - 1) * G + S - 1,
                              stages=S)
  return ring.varying(out)[None]


def programs(gen, batch: int, prompt_len: int, max_new: int, sampling, progress: bool):
  """(prefill, decode) jitted for this shape; see the module docstring. No progress lines
  from inside the ticks: in jax 0.10 `jax.debug.callback` fails to lower inside a shard_map
  with more than one automatic axis; `Generator.generate` says when decoding starts."""
  del progress
  fwd = gen.forward
  mesh, rules = fwd.mesh, fwd.rules
  S = G = mesh.shape[STAGE]
  ways = math.prod(mesh.shape[a] for a in rules.mesh_axes(BATCH))
  st = _Stage(gen, G, batch // G, prompt_len, max_new, sampling)
  keys = gen.family.config_keys
  cache_specs = {k: P(STAGE) for k in gen.family.kv_cache(fwd.config.model, fwd.layout, 1, 1)}

  def in_rules(fn):
    def wrapped(*args):
      with use_rules(rules, keys=keys):
        return fn(st, *args)
    return wrapped

  prefill_map = ring.shard(
      in_rules(_prefill_stage), mesh=mesh, in_specs=(P(), P(STAGE), P(), P(), P(), P()),
      out_specs=(cache_specs, P(STAGE)))
  decode_map = ring.shard(
      in_rules(_decode_stage), mesh=mesh,
      in_specs=(P(), P(STAGE), cache_specs, P(STAGE), P(), P(), P()),
      out_specs=P(STAGE))
  rows_GB = _groups(jnp.arange(batch), G, ways)

  def split(params):
    params, _ = params  # (parameters, None): the Generator's calling convention
    return {k: v for k, v in params.items() if k != "blocks"}, params["blocks"]

  def prefill(params, tokens_BT, mask_BT, key):
    rest, blocks = split(params)
    caches, first = prefill_map(rest, blocks, _groups(tokens_BT, G, ways),
                                _groups(mask_BT, G, ways), rows_GB, key)
    return first, caches

  def decode(params, caches, first, mask_BT, key):
    rest, blocks = split(params)
    out = decode_map(rest, blocks, caches, first, _groups(mask_BT, G, ways), rows_GB, key)
    out_GBN = out.reshape(S, G, batch // G, max_new)[S - 1]
    first_GB = first.reshape(S, G, batch // G)[S - 1]
    out_GBN = out_GBN.at[:, :, 0].set(first_GB)
    return _ungroup(out_GBN, ways), max_new  # every step runs (no early stop across stages)

  return jax.jit(prefill), jax.jit(decode)
