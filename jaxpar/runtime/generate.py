"""Autoregressive generation with a sharded KV cache, the whole decode loop compiled, for any
decoder family (`jaxpar.models.base`): a driver of the slot decoder.

The prompts are right-padded into the rows of a `decoder.Decoder` (each row's tokens at the
cache slots equal to their positions, so every row decodes as if it were alone); the cache
holds T0 + max_new_tokens slots per layer, laid out by the rules like any activation: batch
over `data`, key/value heads over `model`. Two compiled programs: the decoder's prefill (every
prompt through every block, filling the cache, and the first new token) and `decode` (a
`lax.while_loop` of the decoder's step that stops when every row has produced an EOS id; a
row that stopped repeats its EOS). With mesh.stage > 1 the decoder is pipelined (its rows form
one group per stage) and the same two programs run on its stage ring.
"""

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpar import axes
from jaxpar.axes import BATCH, LAYERS, SEQ
from jaxpar.config import Config
from jaxpar.distributed import say, to_host, tree_to_host
from jaxpar.errors import UserError
from jaxpar.models.base import cache_leaf
from jaxpar.rules import Logical, is_logical, tree_shardings
from jaxpar.parallel import pipeline
from jaxpar.runtime import decode_loop, inference, state
from jaxpar.runtime.sampling import Sampling
from jaxpar.runtime.speculative import Speculation, draft_config


def pad_right(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token id lists into tokens [B, T0] (pad id 0) and their lengths [B]: each
  row's tokens at the cache slots equal to their positions."""
  T0 = max(len(p) for p in prompts)
  tokens = np.zeros((len(prompts), T0), np.int32)
  for b, p in enumerate(prompts):
    tokens[b, :len(p)] = p
  return tokens, np.asarray([len(p) for p in prompts], np.int32)


@dataclasses.dataclass
class Result:
  tokens: np.ndarray   # int32 [B, max_new_tokens]; after an EOS id the row repeats it
  steps: int           # tokens per row made (<= max_new_tokens; fewer if all rows stopped)
  prefill_s: float
  decode_s: float
  compile_s: float
  passes: int = 0      # passes of the model over every row: the prefill's and each round's
  proposed: int = 0    # speculation: tokens proposed to the model, over the prompts' rows
  accepted: int = 0    # ... and those it kept


def use_scan(config: Config, platform: str) -> bool:
  """model.scan_layers, or the measured default: unrolled on CPU, scan elsewhere."""
  if config.model.scan_layers is not None:
    return config.model.scan_layers
  return platform != "cpu"


@dataclasses.dataclass
class Generator:
  """A model on a mesh, ready to generate: the first two of `inference`'s build steps (the
  placement and the parameters), from which it makes its decoders. Build with `build`."""
  placement: inference.Placement
  scan: bool
  eos_ids: tuple[int, ...]  # () : no end-of-text token
  # Scanned: the parameters, blocks stacked. Unrolled: the blocks' parameters as one dict per
  # layer (separate buffers, each sharded like the stack minus its `layers` dim) in `layers`,
  # and the other parameters in `rest`; the stacked blocks are rebuilt inside the programs
  # only for `nnx.merge` and never used, so XLA drops them.
  stacked: dict | None = None
  layers: tuple | None = None
  rest: dict | None = None
  init_timings: dict = dataclasses.field(default_factory=dict)
  notes: list = dataclasses.field(default_factory=list)  # what `build` changed, said once
  _compiled: dict = dataclasses.field(default_factory=dict)

  mesh = property(lambda self: self.placement.mesh)
  config = property(lambda self: self.placement.config)
  rules = property(lambda self: self.placement.rules)
  family = property(lambda self: self.placement.family)
  layout = property(lambda self: self.placement.layout)
  graphdef = property(lambda self: self.placement.graphdef)
  schedule = property(lambda self: self.placement.schedule)

  def padded_batch(self, n_prompts: int) -> int:
    """The batch the programs run: `n_prompts` rounded up so it splits over the batch axes
    (and, pipelined, into one group per stage); extra rows repeat the first prompt and are
    dropped from the result."""
    unit = math.prod(self.mesh.shape[a] for a in self.rules.mesh_axes(BATCH))
    if self.schedule is not None:
      unit *= self.schedule.stages
    return -(-n_prompts // unit) * unit

  def natural_params(self) -> dict:
    """The parameters on the host in the model's own layout (blocks stacked [L, ...])."""
    if self.layers is None:
      host = tree_to_host(self.stacked)
      if self.schedule is None:
        return host
      return {**host, "blocks": pipeline.from_stages(host["blocks"],
                                                     n_layers=self.config.model.n_layers)}
    blocks = jax.tree.map(lambda *xs: np.stack(xs), *tree_to_host(self.layers))
    return {**tree_to_host(self.rest), "blocks": blocks}

  @property
  def params(self) -> tuple:
    """What the compiled programs take: (parameters, per-layer blocks or None)."""
    if self.layers is None:
      return self.stacked, None
    return self.rest, self.layers

  def param_bytes_per_device(self) -> int:
    return state.param_bytes_per_device(self.params)

  def cache_bytes_per_device(self, batch: int, length: int) -> int:
    """Bytes of the KV cache one device holds (all its layers; copied key/value heads
    counted). On a pipeline a stage holds the cache of its own layer slots, identity padding
    of uneven stages included (`pipeline.per_chunk`)."""
    m, mesh, rules = self.config.model, self.mesh, self.rules
    total = 0
    for leaf in self.family.kv_cache(m, self.layout, batch, length).values():
      shape, names, dtype = cache_leaf(leaf, m)
      if self.schedule is None:  # [L, ...], split as the rules say
        shape, names, slots = (m.n_layers, *shape), (LAYERS, *names), 1
      else:  # each stage's own slots
        slots = pipeline.per_chunk(m.n_layers, stages=self.schedule.stages)
      per = rules.sharding(names, mesh, what="the KV cache").shard_shape(shape)
      total += slots * math.prod(per) * jnp.dtype(dtype).itemsize
    return total

  def model_parts(self, params):
    """(model, the blocks' graphdef, the layers run_blocks takes) inside a program."""
    rest, layers = params
    graphdef = self.graphdef
    if layers is None:
      model = nnx.merge(graphdef, rest)
      return model, nnx.graphdef(model.blocks), rest["blocks"]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    model = nnx.merge(graphdef, {**rest, "blocks": stacked})
    return model, nnx.graphdef(model.blocks), layers

  def generate(self, prompts: list[list[int]], *, max_new_tokens: int,
               sampling: Sampling = Sampling(), seed: int = 0, progress: bool = False,
               speculation: Speculation = Speculation()) -> Result:
    """Generates `max_new_tokens` for each prompt (token id lists of any lengths);
    `speculation`: proposals checked k at a time (greedy: the same tokens; sampled: the same
    distribution)."""
    n_prompts = len(prompts)
    prompts = list(prompts) + [prompts[0]] * (self.padded_batch(n_prompts) - n_prompts)
    if not prompts or any(len(p) == 0 for p in prompts):
      raise UserError("prompts: every prompt needs at least one token")
    B, T0 = len(prompts), max(len(p) for p in prompts)
    m = self.config.model
    if T0 + max_new_tokens > m.max_seq_len:
      raise UserError(f"prompt length {T0} + max_new_tokens {max_new_tokens} exceeds "
                      f"model.max_seq_len={m.max_seq_len}; shorten the prompts "
                      f"(generate.prompt_len for seeded ones) or lower "
                      f"generate.max_new_tokens")
    self.rules.check((B, T0), (BATCH, SEQ), self.mesh.shape, what="prompts",
                             keys={BATCH: "number of prompts"})
    with jax.set_mesh(self.mesh):
      out, steps, seconds, passes, checked = self._run(prompts, max_new_tokens, sampling, seed,
                                                       progress, speculation)
    proposed, accepted = checked[:n_prompts].sum(axis=0).tolist()
    return Result(out[:n_prompts], steps, *seconds, passes, proposed, accepted)

  def _compile(self, signature, make):
    """The compiled programs for `signature` (made by `make()` once), and the seconds it
    took (0 when they were already compiled)."""
    start = time.perf_counter()
    if signature not in self._compiled:
      self._compiled[signature] = make()
    return self._compiled[signature], time.perf_counter() - start

  def _run(self, prompts, max_new: int, sampling: Sampling, seed: int, progress: bool,
           spec: Speculation):
    """Right-padded prompts prefilled into a `Decoder`'s rows (and a draft's), then its
    rounds in a loop."""
    tokens_host, lengths = pad_right(prompts)
    B, T0 = tokens_host.shape
    tokens = jax.device_put(jnp.asarray(tokens_host),
                            self.rules.sharding((BATCH, SEQ), self.mesh, what="prompts"))
    params = self.params
    args = (tokens, np.int32(0), lengths, np.int32(0), np.int32(0),
            sampling.rows(B),
            np.full(B, seed, np.uint32), np.arange(B, dtype=np.int32))

    draft_params = spec.draft.params if spec.uses_draft else None

    def make():
      decoder, prefill, decode, draft_prefill = decode_loop.programs(self, B, T0, max_new, sampling,
                                                               progress, spec)
      abstract = lambda tree, shardings: jax.tree.map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)
      shapes = jax.eval_shape(prefill, params, None, *args)
      prefill = prefill.lower(params, None, *args).compile()
      first, state = abstract(shapes, (prefill.output_shardings[0],
                                       decoder.state_shardings()))
      aux = None
      if draft_prefill is not None:
        draft_shapes = jax.eval_shape(draft_prefill, draft_params, None, *args)[1].caches
        draft_prefill = draft_prefill.lower(draft_params, None, *args).compile()
        aux = abstract(draft_shapes, draft_prefill.output_shardings[1].caches)
      decode = decode.lower(params, state, first, draft_params, aux).compile()
      return decoder, prefill, decode, draft_prefill
    (decoder, prefill, decode, draft_prefill), compile_s = self._compile(
        (B, T0, max_new, sampling, progress, spec.key()), make)
    start = time.perf_counter()
    first, state = prefill(params, None, *args)
    aux = draft_prefill(draft_params, None, *args)[1].caches if draft_prefill else None
    first.block_until_ready()
    prefill_s = time.perf_counter() - start
    if progress:
      how = (f", pipelined: {decoder.G} groups over {decoder.S} stages, "
             f"{decode_loop.loop_steps(decoder, max_new)} rounds of {decoder.G} ticks"
             if decoder.pipelined else "")
      say(f"prefill: {B} prompt{'s' if B != 1 else ''} x {T0} tokens in "
          f"{prefill_s:.3f} s; decoding {max_new} tokens{how}...")
    start = time.perf_counter()
    out, steps, passes, checked = decode(params, state, first, draft_params, aux)
    out = to_host(out)  # gathered from every process
    return (out, int(steps), (prefill_s, time.perf_counter() - start, compile_s), int(passes),
            to_host(checked))


def _per_layer(pl: inference.Placement, params: dict, names: dict) -> tuple[tuple, dict]:
  """The stacked blocks as one parameter dict per layer, each sharded by the rules as the
  stack is (`names`: the parameters' own, quantised ones included), minus its `layers` dim;
  and the other parameters."""
  names = jax.tree.map(lambda n: Logical(n.names[1:]), names["blocks"], is_leaf=is_logical)
  shardings = tree_shardings(names, pl.rules, pl.mesh)
  blocks = params["blocks"]
  with jax.set_mesh(pl.mesh):
    layers = tuple(jax.tree.map(lambda a, s: jax.device_put(a[l], s), blocks, shardings)
                   for l in range(pl.config.model.n_layers))
  return layers, {k: v for k, v in params.items() if k != "blocks"}


def build(config: Config, mesh, *, eos_id: int | None = None) -> Generator:
  """A Generator for `config` on `mesh` (parameters seeded, or from model.checkpoint): the
  placement and parameters of `inference`, no forward program (nothing of run.batch,
  run.seq_len or pipeline.microbatches applies).

  With mesh.stage > 1 decoding is pipelined (`decoder.Decoder`) over contiguous stages: the
  prompts form one group per stage, so the batch is padded to a multiple of stage x data.
  `eos_id` (default: generate.eos_id, else the checkpoint's EOS ids; -1: none) stops a row.
  """
  stages, notes = mesh.shape[axes.STAGE], []
  if stages > 1 and config.pipeline.repeats != 1:
    notes.append(f"note: pipelined decoding runs contiguous stages; pipeline.repeats="
                 f"{config.pipeline.repeats} (the circular schedule) applies to forward only")
  placement = inference.place(config, mesh, pipelined=stages > 1, repeats=1)
  params, names, timings = inference.load_params(placement)
  if eos_id is None:
    eos_id = config.generate.eos_id
  eos_ids = config.model.eos_token_ids if eos_id is None else (
      () if eos_id < 0 else (eos_id,))
  scan = use_scan(config, mesh.devices.flat[0].platform) or stages > 1  # a stage scans
  generator = Generator(placement, scan, tuple(eos_ids), init_timings=timings, notes=notes)
  if scan:
    generator.stacked = params
  else:  # the per-layer buffers replace the stack
    generator.layers, generator.rest = _per_layer(placement, params, names)
  return generator


def speculation(config: Config, generator: Generator, mesh) -> Speculation:
  """`config.speculative` for `generator` on `mesh`, the draft's generator built (method
  draft: from its checkpoint, in the model's dtype and quantisation, on the same mesh)."""
  s = config.speculative
  draft = None
  if s.method == "self":
    draft = generator
  elif s.method == "draft":
    draft = build(draft_config(config), mesh, eos_id=-1)
  return Speculation(s.method, s.k, s.ngram_min, s.ngram_max, draft)


def seeded_prompts(config: Config) -> list[list[int]]:
  rng = np.random.default_rng(config.run.seed)
  shape = (config.run.batch, config.generate.prompt_len)
  return rng.integers(0, config.model.vocab_size, shape).tolist()
