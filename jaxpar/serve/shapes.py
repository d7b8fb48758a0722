"""What a serving runner's programs are compiled for (prompt buckets, attention spans) and
what a request puts into its row (its seed and sampling settings, as the host's arrays)."""

import jax
import numpy as np

from jaxpar.runtime.sampling import BAN, NO_TOKEN, Bias, Sampling
from jaxpar.serve import grammar
from jaxpar.serve.request import MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS, Params, Stream


def buckets(length: int, smallest: int = 16) -> tuple[int, ...]:
  """Prompt length buckets: `smallest` times 1, 1.5, 2, 3, 4, 6, 8, ... (a prompt pads by
  less than a third), then `length` itself."""
  out, t = set(), smallest
  while t < length:
    out.update((t, t * 3 // 2))
    t *= 2
  return tuple(sorted(b for b in out if b < length)) + (length,)


SPAN_SLICE = 8 << 20  # bytes of one cache leaf's slice a span (but the shortest) may read


def spans(length: int, smallest: int, position_bytes: int = 0) -> tuple[int, ...]:
  """The decode step's attention spans: doubling from `smallest` or length / 8 up to three
  quarters of `length` (at most four programs), then `length` itself; past the shortest,
  only those whose slice of a cache leaf (`position_bytes` a position, on a device) is at
  most SPAN_SLICE. A span reads a slice of every layer's cache, which XLA:CPU copies first,
  and a slice over about 8 MiB cost more than reading the whole cache: 8 slots, 4 layers, one
  CPU device, ms per step against the whole cache's, 12 key/value heads of 64 (24 KiB a
  position): 512 of 1024 positions 1.33x, 1024 of 2048 1.76x, 256 of 1024 0.82x; 4 heads:
  2048 of 4096 1.47x, 1024 of 4096 0.63x (`python benchmarks/serve_spans.py`)."""
  out, t = [], max(smallest, length // 8)
  while 4 * t <= 3 * length:
    if not out or t * position_bytes <= SPAN_SLICE:
      out.append(t)
    t *= 2
  return (*out, length)


ALWAYS = 2**30  # a `Bias` entry's `until` that never comes


def bias_entries(eos_ids) -> int:
  """The `Bias` entries a row holds: its logit_bias, and the bans of its stop tokens (EOS
  and stop_token_ids) until it has made min_tokens."""
  return MAX_LOGIT_BIAS + MAX_STOP_TOKEN_IDS + len(eos_ids)


def settings(stream: Stream, eos_ids, entries: int, width: int) -> tuple[np.uint32, Sampling]:
  """A request's sampling seed (its id unless it gives one) and settings for its first
  token, as the host's scalars (its `Bias`: `entries` of it; its grammar's mask: `width`
  words)."""
  p = stream.params
  seed = np.uint32(stream.id if p.seed is None else p.seed)
  bias = [(t, b, ALWAYS) for t, b in p.logit_bias]
  if p.min_tokens:
    stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_ids))
    bias += [(t, BAN, p.min_tokens) for t in sorted(stops)]
  bias += [(NO_TOKEN, 0.0, 0)] * (entries - len(bias))
  ids, values, until = zip(*bias)
  table = Bias(np.asarray(ids, np.int32), np.asarray(values, np.float32),
               np.asarray(until, np.int32))
  allowed = grammar.masks([stream.matcher], width)[0]
  return seed, Sampling(np.float32(p.temperature), np.int32(p.top_k), np.float32(p.top_p),
                        np.float32(p.min_p), np.float32(p.presence_penalty),
                        np.float32(p.frequency_penalty), np.float32(p.repetition_penalty),
                        table, allowed)


def scalar(dtype) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((), dtype)


def abstract_sampling(entries: int, width: int) -> Sampling:
  """The shapes of `settings`' Sampling."""
  _, host = settings(Stream(0, [0], Params(), None), (), entries, width)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), host)
