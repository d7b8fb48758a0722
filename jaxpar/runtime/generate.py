"""Autoregressive generation with a sharded KV cache, the whole decode loop compiled.

Prompts of different lengths are left-padded into one [B, T0] batch with a mask; each row's
positions count its real tokens only, so every row decodes as if it were alone. The cache
holds T0 + max_new_tokens slots per layer, laid out by the rules like any activation: batch
over `data`, heads over `model`. Two compiled programs: `prefill` (the prompt through every
block, filling the cache, and the first new token) and `decode` (a `lax.while_loop` over the
remaining tokens that stops when every row has produced EOS; rows that stopped emit EOS).
"""

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jaxpar import axes
from jaxpar.axes import BATCH, HEAD_DIM, HEADS, LAYERS, SEQ
from jaxpar.config import Config
from jaxpar.errors import UserError
from jaxpar.rules import constrain, use_rules
from jaxpar.models import gpt
from jaxpar.runtime import inference, pipelined_generate
from jaxpar.runtime.sampling import Sampling, sample


def pad_prompts(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token id lists into tokens [B, T0] (pad id 0) and a bool mask [B, T0]."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise UserError("prompts: every prompt needs at least one token")
  T0 = max(len(p) for p in prompts)
  tokens = np.zeros((len(prompts), T0), np.int32)
  mask = np.zeros((len(prompts), T0), bool)
  for b, p in enumerate(prompts):
    tokens[b, T0 - len(p):] = p
    mask[b, T0 - len(p):] = True
  return tokens, mask


@dataclasses.dataclass
class Result:
  tokens: np.ndarray   # int32 [B, max_new_tokens]; after EOS every position holds EOS
  steps: int           # decode steps executed (<= max_new_tokens; fewer if all rows stopped)
  prefill_s: float
  decode_s: float
  compile_s: float


def use_scan(config: Config, platform: str) -> bool:
  """model.scan_layers, or the measured default: unrolled on CPU, scan elsewhere."""
  if config.model.scan_layers is not None:
    return config.model.scan_layers
  return platform != "cpu"


@dataclasses.dataclass
class Generator:
  """A model on a mesh, ready to generate. Build with `build`."""
  forward: inference.Forward
  scan: bool
  eos_id: int  # -1: none
  # Unrolled layers: the blocks' parameters as one dict per layer (separate buffers), and
  # the other parameters. They replace `forward.params` (set to None, so the weights are not
  # held twice); the stacked blocks are rebuilt inside the programs only for `nnx.merge` and
  # never used, so XLA drops them.
  layers: tuple | None = None
  rest: dict | None = None
  _compiled: dict = dataclasses.field(default_factory=dict)

  @property
  def mesh(self):
    return self.forward.mesh

  def padded_batch(self, n_prompts: int) -> int:
    """The batch the programs run: `n_prompts` rounded up so it splits over the batch axes
    (and, pipelined, into one group per stage); extra rows repeat the first prompt and are
    dropped from the result."""
    unit = math.prod(self.mesh.shape[a] for a in self.forward.rules.mesh_axes(BATCH))
    if self.forward.schedule is not None:
      unit *= self.forward.schedule.stages
    return -(-n_prompts // unit) * unit

  def natural_params(self) -> dict:
    """The parameters on the host in the model's own layout (blocks stacked [L, ...])."""
    if self.layers is None:
      return self.forward.natural_params()
    blocks = jax.tree.map(lambda *xs: np.stack(xs), *jax.device_get(self.layers))
    return {**jax.device_get(self.rest), "blocks": blocks}

  @property
  def params(self) -> tuple:
    """What the compiled programs take: (parameters, per-layer blocks or None)."""
    if self.layers is None:
      return self.forward.params, None
    return self.rest, self.layers

  def cache_bytes_per_device(self, batch: int, length: int) -> int:
    m, mesh = self.forward.config.model, self.mesh
    rules = self.forward.rules
    shape = (m.n_layers, batch, length, m.n_heads, m.head_dim)
    spec = rules.spec((LAYERS, BATCH, SEQ, HEADS, HEAD_DIM), mesh_axis_names=mesh.axis_names)
    per = jax.sharding.NamedSharding(mesh, spec).shard_shape(shape)
    return 2 * int(np.prod(per)) * jnp.dtype(m.dtype).itemsize

  def _fns(self, batch: int, prompt_len: int, max_new: int, sampling: Sampling,
           progress: bool):
    fwd, scan, eos = self.forward, self.scan, self.eos_id
    rules, graphdef, m = fwd.rules, fwd.graphdef, fwd.config.model
    S = prompt_len + max_new
    dtype = jnp.dtype(m.dtype)

    def caches_for(batch):
      shape = (batch, S, m.n_heads, m.head_dim)
      names = (BATCH, SEQ, HEADS, HEAD_DIM)
      if scan:
        shape, names = (m.n_layers, *shape), (LAYERS, *names)
      zeros = lambda: constrain(jnp.zeros(shape, dtype), names)
      if scan:
        return {"k": zeros(), "v": zeros()}
      return tuple({"k": zeros(), "v": zeros()} for _ in range(m.n_layers))

    def model_of(params):
      rest, layers = params
      if layers is None:
        return nnx.merge(graphdef, rest), None
      stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
      return nnx.merge(graphdef, {**rest, "blocks": stacked}), layers

    def prefill(params, tokens_BT, mask_BT, key):
      with use_rules(rules, keys=gpt.CONFIG_KEYS):
        model, layers = model_of(params)
        positions_BT = jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0)
        valid_BS = jnp.concatenate([mask_BT, jnp.ones((batch, max_new), bool)], axis=1)
        causal_TS = jnp.arange(S)[None, :] <= jnp.arange(prompt_len)[:, None]
        mask_BTS = causal_TS[None] & valid_BS[:, None, :]
        x_BTD = model.embed(tokens_BT, positions_BT)
        x_BTD, caches = model.cached_blocks(x_BTD, caches_for(batch), 0, mask_BTS, scan=scan,
                                            layers=layers)
        logits_BV = model.logits(x_BTD[:, -1:])[:, 0]
        token_B = sample(logits_BV, jax.random.fold_in(key, 0), sampling)
        return token_B, caches

    def decode(params, caches, first_B, mask_BT, key):
      with use_rules(rules, keys=gpt.CONFIG_KEYS):
        model, layers = model_of(params)
        lengths_B = mask_BT.sum(axis=1).astype(jnp.int32)
        valid_BS = jnp.concatenate([mask_BT, jnp.ones((batch, max_new), bool)], axis=1)
        fill = eos if eos >= 0 else 0
        out_BN = jnp.full((batch, max_new), fill, jnp.int32).at[:, 0].set(first_B)
        done_B = first_B == eos

        def cond(carry):
          i, _, _, _, done_B = carry
          return (i < max_new) & ~jnp.all(done_B)

        def step(carry):
          i, token_B, caches, out_BN, done_B = carry
          slot = prompt_len + i - 1  # where the previous token's keys and values go
          x_BTD = model.embed(token_B[:, None], (lengths_B + i - 1)[:, None])
          mask_B1S = (jnp.arange(S) <= slot)[None, None, :] & valid_BS[:, None, :]
          x_BTD, caches = model.cached_blocks(x_BTD, caches, slot, mask_B1S, scan=scan,
                                              layers=layers)
          token_B = sample(model.logits(x_BTD)[:, 0], jax.random.fold_in(key, i), sampling)
          token_B = jnp.where(done_B, fill, token_B)
          out_BN = lax.dynamic_update_slice_in_dim(out_BN, token_B[:, None], i, axis=1)
          if progress:
            jax.debug.callback(_report, i + 1, max_new)
          return i + 1, token_B, caches, out_BN, done_B | (token_B == eos)

        i, _, _, out_BN, _ = lax.while_loop(cond, step, (1, first_B, caches, out_BN, done_B))
        return out_BN, i

    token_sharding = rules.sharding((axes.BATCH, axes.SEQ), self.mesh, what="prompts")
    param_shardings = jax.tree.map(lambda a: a.sharding, self.params)
    prefill_jit = jax.jit(prefill, in_shardings=(param_shardings, token_sharding,
                                                 token_sharding, None))
    decode_jit = jax.jit(decode)
    return prefill_jit, decode_jit

  def generate(self, prompts: list[list[int]], *, max_new_tokens: int,
               sampling: Sampling = Sampling(), seed: int = 0,
               progress: bool = False) -> Result:
    """Generates `max_new_tokens` for each prompt (token id lists of any lengths)."""
    n_prompts = len(prompts)
    prompts = list(prompts) + [prompts[0]] * (self.padded_batch(n_prompts) - n_prompts)
    tokens_host, mask_host = pad_prompts(prompts)
    B, T0 = tokens_host.shape
    m = self.forward.config.model
    if T0 + max_new_tokens > m.max_seq_len:
      raise UserError(f"prompt length {T0} + max_new_tokens {max_new_tokens} exceeds "
                      f"model.max_seq_len={m.max_seq_len} (the position table); shorten the "
                      f"prompt or ask for fewer tokens")
    self.forward.rules.check((B, T0), (BATCH, SEQ), self.mesh.shape, what="prompts",
                             keys={BATCH: "number of prompts"})
    sharding = self.forward.rules.sharding((BATCH, SEQ), self.mesh, what="prompts")
    tokens = jax.device_put(jnp.asarray(tokens_host), sharding)
    mask = jax.device_put(jnp.asarray(mask_host), sharding)
    key = jax.random.key(seed)
    params = self.params
    signature = (B, T0, max_new_tokens, sampling, progress)
    with jax.set_mesh(self.mesh):
      start = time.perf_counter()
      if signature not in self._compiled:
        if self.forward.schedule is not None:
          prefill, decode = pipelined_generate.programs(self, B, T0, max_new_tokens, sampling)
        else:
          prefill, decode = self._fns(B, T0, max_new_tokens, sampling, progress)
        prefill_c = prefill.lower(params, tokens, mask, key).compile()
        first, caches = jax.eval_shape(prefill, params, tokens, mask, key)
        self._compiled[signature] = (prefill_c,
                                     decode.lower(params, caches, first, mask, key).compile())
      prefill_c, decode_c = self._compiled[signature]
      compile_s = time.perf_counter() - start
      start = time.perf_counter()
      first, caches = prefill_c(params, tokens, mask, key)
      first.block_until_ready()
      prefill_s = time.perf_counter() - start
      if progress:
        print(f"prefill: {B} prompts x {T0} tokens in {prefill_s:.3f} s; decoding "
              f"{max_new_tokens} tokens...", flush=True)
      start = time.perf_counter()
      out, steps = decode_c(params, caches, first, mask, key)
      out = np.asarray(jax.device_get(out))
      decode_s = time.perf_counter() - start
    return Result(out[:n_prompts], int(steps), prefill_s, decode_s, compile_s)


def _report(done, total) -> None:
  """Progress from inside the compiled decode loop (a host callback)."""
  done, every = int(done), max(1, total // 8)
  if done % every == 0 or done == total:
    print(f"  decoded {done}/{total} tokens", flush=True)


def build(config: Config, mesh, *, eos_id: int | None = None) -> Generator:
  """A Generator for `config` on `mesh` (parameters seeded, or from model.checkpoint).

  With mesh.stage > 1 decoding is pipelined (`pipelined_generate`): the prompts form one group
  per stage, so run.batch (the number of prompts) must be a multiple of stage x data.
  """
  stages = mesh.shape[axes.STAGE]
  if stages > 1:
    if config.pipeline.repeats != 1:
      raise UserError(f"pipeline.repeats={config.pipeline.repeats}: pipelined decoding runs "
                      f"contiguous stages; use --set pipeline.repeats=1 for generate")
    config = dataclasses.replace(config, pipeline=dataclasses.replace(
        config.pipeline, microbatches=stages))
  fwd = inference.build(config, mesh)
  platform = mesh.devices.flat[0].platform
  if eos_id is None:
    eos_id = config.generate.eos_id
  if eos_id is None:
    eos_id = getattr(config.model, "eos_token_id", -1)
  scan = use_scan(config, platform) or stages > 1  # a stage scans its own layers
  generator = Generator(fwd, scan, -1 if eos_id is None else eos_id)
  if not scan:
    blocks = fwd.params["blocks"]
    split = lambda a: jax.device_put(a, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(*a.sharding.spec[1:])))
    with jax.set_mesh(mesh):
      generator.layers = tuple(jax.tree.map(lambda a: split(a[l]), blocks)
                               for l in range(config.model.n_layers))
    generator.rest = {k: v for k, v in fwd.params.items() if k != "blocks"}
    fwd.params = None  # the per-layer buffers replace the stack
  return generator


def seeded_prompts(config: Config) -> list[list[int]]:
  rng = np.random.default_rng(config.run.seed)
  shape = (config.run.batch, config.generate.prompt_len)
  return rng.integers(0, config.model.vocab_size, shape).tolist()

