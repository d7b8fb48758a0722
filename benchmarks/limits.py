"""The limits a decode benchmark is held to, measured in the same run as the decode.

- `speed_of_light`: tokens/s of a compiled program that only multiplies the model's own
  weights (every 2-D weight of every layer, then the vocabulary head) in a chain, as one
  decode step per token does, at the decode's batch: the fastest of `LAYOUTS`, the ways of
  laying out the same products (XLA:CPU runs them at different speeds, and which is fastest
  depends on the batch), so that no decode can beat it by choosing another.
- `prefill_limit`: the same products once at the prefill's size (batch x prompt rows through
  the layers, the head on the last row of each prompt).
- `read_bandwidth`: a compiled `jnp.sum`'s read rate, kept for reference only (a sum streams
  memory slower than a matrix-vector product on XLA:CPU, so it bounds nothing).
"""

import time

def weight_matrices(generator, experts: int | None = None) -> tuple[list, object]:
  """The 2-D weights a decode step multiplies by, per layer ([out, in] as stored), and the
  vocabulary head (the largest 2-D parameter outside the blocks). Of a mixture of experts'
  stacked experts ([L, E, out, in]) the first `experts` (default: the experts one token
  reads, `experts_per_token`): a step reads only the experts its tokens chose."""
  import jax
  params = generator.natural_params()
  blocks = params["blocks"]
  chosen = experts or getattr(generator.config.model.options, "experts_per_token", 1)
  mats = [[a[l] for a in jax.tree.leaves(blocks) if a.ndim == 3] +
          [a[l, e] for a in jax.tree.leaves(blocks) if a.ndim == 4 for e in range(chosen)]
          for l in range(generator.config.model.n_layers)]
  rest = {k: v for k, v in params.items() if k != "blocks"}
  head = max((a for a in jax.tree.leaves(rest) if a.ndim == 2), key=lambda a: a.size)
  return mats, head


def _fit(h, width: int, axis: int = 1):
  """`h` [B, w] cut or tiled to [B, width] (along `axis` 0: [w, B] to [width, B]): feeds
  any weight from the last activation."""
  import jax.numpy as jnp
  if h.shape[axis] < width:
    h = jnp.tile(h, [1, 1][:axis] + [-(-width // h.shape[axis])] + [1][axis:])
  return h[:, :width] if axis == 1 else h[:width]


# The chain's layouts: activations [B, D] times weights stored [out, in] (x @ W.T, as
# jaxpar stores them), the weights times activations [D, B] (W @ h), and activations times
# weights transposed to [in, out] beforehand (x @ W).
LAYOUTS = ("x @ W.T", "W @ h", "x @ W")


def chain_program(mats, head, steps: int, layout: str = "x @ W.T"):
  """The speed-of-light program: per step, every weight of every layer multiplied in one
  chain (each product feeds the next, so none is dead code), then the head; a `tanh`
  between them and nothing else. `layout` (`LAYOUTS`): how each product is laid out; the
  program takes (weights, x) with weights as `chain_weights` gives them and x [B, D], or
  [D, B] for "W @ h"."""
  import jax
  import jax.numpy as jnp
  product = _product(layout)

  def program(weights, x):
    mats, head = weights
    axis = 0 if layout == "W @ h" else 1  # the activations' width
    D = x.shape[axis]

    def step(_, x):
      for layer in mats:
        h = x
        for w in layer:
          h = jnp.tanh(product(h, w))
        x = x + _fit(h, D, axis)
      logits = product(x, head)
      if layout == "W @ h":
        return x + jnp.tanh(logits[:D] + logits[-D:])
      return x + jnp.tanh(logits[:, :D] + logits[:, -D:])
    return jax.lax.fori_loop(0, steps, step, x)
  return jax.jit(program)


def _product(layout: str):
  """(activations, weight) -> their product in `layout`, the activations cut or tiled to
  the weight's input width."""
  import jax.numpy as jnp
  return {"x @ W.T": lambda h, w: jnp.einsum("bi,oi->bo", _fit(h, w.shape[1]), w),
          "x @ W": lambda h, w: jnp.einsum("bi,io->bo", _fit(h, w.shape[0]), w),
          "W @ h": lambda h, w: jnp.einsum("oi,ib->ob", w, _fit(h, w.shape[1], 0))}[layout]


def chain_weights(mats, head, layout: str):
  """The weights as `chain_program(layout)` takes them (transposed beforehand for x @ W)."""
  if layout != "x @ W":
    return mats, head
  return [[w.T.copy() for w in layer] for layer in mats], head.T.copy()


def dot_shapes(compiled_text: str) -> list[str]:
  """The result shapes of the matrix products in a compiled CPU program (plain or inside a
  YNNPACK fusion; each product appears once in the text)."""
  import re
  return re.findall(r"= f32\[([\d,]+)\]\S* dot\(", compiled_text)


def speed_of_light(generator, batch: int, steps: int, repeats: int = 3) -> dict:
  """{layout: tokens/s} of compiled programs that do nothing but stream the model's own
  weights through the matrix-vector products a decode step makes (`chain_program`, each of
  `LAYOUTS`; the best of `repeats` each); the limit of a decode step on these weights on
  this machine is the fastest. Raises if XLA dropped any product (the program would then
  stream fewer bytes than the model). A mixture of experts: the experts `batch` rows may
  read, min(E, batch x experts_per_token) of them (batch 1: exactly the chosen ones)."""
  import jax
  import jax.numpy as jnp
  options = generator.config.model.options
  experts = min(getattr(options, "n_experts", 0), batch * getattr(options,
                                                                  "experts_per_token", 1))
  mats, head = weight_matrices(generator, experts or None)
  D, V = head.shape[1], head.shape[0]
  want = sum(len(layer) for layer in mats) + 1
  out = {}
  for layout in LAYOUTS:
    weights = jax.device_put(chain_weights(mats, head, layout), jax.devices("cpu")[0])
    x = jnp.ones((batch, D) if layout != "W @ h" else (D, batch), jnp.float32)
    chain = chain_program(mats, head, steps, layout).lower(weights, x).compile()
    shapes = dot_shapes(chain.as_text())
    whole = f"{batch},{V}" if layout != "W @ h" else f"{V},{batch}"
    if len(shapes) != want or whole not in shapes:
      raise RuntimeError(f"speed of light ({layout}): compiled matrix products {shapes}, "
                         f"expected {want} with the whole head [{whole}]")
    out[layout] = batch * steps / best_time(lambda: chain(weights, x), repeats)
  return out


def best_time(fn, repeats: int) -> float:
  """The fastest of `repeats` timed calls of `fn()` (a jax.Array), after one untimed call."""
  fn().block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn().block_until_ready()
    best = min(best, time.perf_counter() - start)
  return best


def read_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> float:
  """Bytes per second that a compiled reduction streams from memory (the best of
  `repeats`): decoding reads its weights, it does not copy them."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones(nbytes // 4, jnp.float32)
  total = jax.jit(jnp.sum)
  return nbytes / best_time(lambda: total(x), repeats)


def prefill_limit(generator, batch: int, prompt_len: int, repeats: int = 3) -> dict:
  """{layout: tokens/s} of the prefill's products alone, in each of `LAYOUTS`: every weight
  at batch x prompt rows, the head at `batch` rows (the best of `repeats` each); the limit
  is the fastest. A mixture of experts: `experts_per_token` experts at every row, the
  products its tokens make (the weights of the others, which they also read, left out)."""
  import jax
  import jax.numpy as jnp
  mats, head = weight_matrices(generator)
  out = {}
  for layout in LAYOUTS:
    product, axis = _product(layout), 0 if layout == "W @ h" else 1

    @jax.jit
    def program(weights, x):
      mats, head = weights
      D = x.shape[axis]
      for layer in mats:
        h = x
        for w in layer:
          h = jnp.tanh(product(h, w))
        x = x + _fit(h, D, axis)
      last = x[prompt_len - 1::prompt_len] if axis else x[:, prompt_len - 1::prompt_len]
      return product(last, head)

    weights = jax.device_put(chain_weights(mats, head, layout), jax.devices("cpu")[0])
    M, D = batch * prompt_len, head.shape[1]
    x = jnp.ones((M, D) if axis else (D, M), jnp.float32)
    out[layout] = M / best_time(lambda: program(weights, x), repeats)
  return out
