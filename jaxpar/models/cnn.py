"""A ResNet-style image classifier in Flax NNX, NHWC, for inference.

A 3x3 stem convolution, then `stages` stages of `blocks` basic residual blocks (3x3 conv,
norm, ReLU, 3x3 conv, norm, add, ReLU), global average pooling and a linear head. The first
block of each later stage halves the image (stride-2 conv) and doubles the width; its shortcut
is a 2x2 average pool with zero-padded channels (the parameter-free CIFAR ResNet shortcut).
Norms are BatchNorm with frozen statistics: a per-channel scale and shift, exact whatever
splits the channels or the image.

Every parameter and activation carries logical names only (`jaxpar.axes`). With the default
table a block's first conv is column-parallel (output `filters` over `model`) and its second
row-parallel (input `filters` over `model`), so the residual stream (`channels`) stays whole
and each block costs one all-reduce; images are split over `data`, and `rules.height=stage`
cuts every image into strips of rows (XLA exchanges the halo rows of each 3x3 window between
neighbouring strips).

Its config section (`cnn`, `CnnConfig`) and the logical names it uses are in
`jaxpar.models.cnn_config`, registered JAX-free.

Shape letters: B batch, H height, W width, I image channels, C channels (residual stream),
F filters (inside a block), X/Y kernel rows/columns, K classes.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.axes import (ACT_CHANNELS, BATCH, CHANNELS, CLASSES, COLOR, FILTERS, HEIGHT, KERNEL,
                         WIDTH)
from jaxpar.models.cnn_config import CnnConfig
from jaxpar.rules import active_rules, constrain

# The config key that sets each logical size, so layout errors can name it.
CONFIG_KEYS = {
    BATCH: "run.batch", HEIGHT: "cnn.image_size", WIDTH: "cnn.image_size",
    COLOR: "cnn.in_channels", CHANNELS: "cnn.width (x 2**stage)",
    ACT_CHANNELS: "cnn.width (x 2**stage)",
    FILTERS: "cnn.width (x 2**stage)", KERNEL: "the 3x3 kernel", CLASSES: "cnn.num_classes",
}

IMAGE_NAMES = (BATCH, HEIGHT, WIDTH, COLOR)
STREAM_NAMES = (BATCH, HEIGHT, WIDTH, ACT_CHANNELS)
HIDDEN_NAMES = (BATCH, HEIGHT, WIDTH, FILTERS)
LOGITS_NAMES = (BATCH, CLASSES)


def stage_widths(cfg: CnnConfig) -> list[int]:
  return [cfg.width * 2 ** s for s in range(cfg.stages)]


def stage_sizes(cfg: CnnConfig) -> list[int]:
  """Image rows (and columns) inside each stage."""
  return [cfg.image_size // 2 ** s for s in range(cfg.stages)]


def is_split(name: str) -> bool:
  """Whether the active rules split logical dim `name` over a mesh axis of size > 1."""
  mesh = jax.sharding.get_abstract_mesh()
  return any(mesh.shape.get(axis, 1) > 1 for axis in active_rules().mesh_axes(name))


def shifted_conv(x_BHWI, w_XYIO, stride: int):
  """A 3x3 convolution (padding 1) as nine shifted matmuls, rows shifted first.

  XLA's SPMD partitioner (jaxlib 0.10.2, Shardy and GSPMD alike) miscompiles a convolution
  whose input is split over image rows while its kernel is split over output channels: the
  result is off by O(10). Written this way the program partitions correctly, and shifting the
  rows before the columns costs the minimum of halo exchanges: one collective-permute of one
  row per neighbour (two for stride 1, one for stride 2).
  """
  B, H, W, _ = x_BHWI.shape
  H_out, W_out = (H - 1) // stride + 1, (W - 1) // stride + 1
  rows = jnp.pad(x_BHWI, ((0, 0), (1, 1), (0, 0), (0, 0)))
  out_BHWO = 0.0
  for i in range(3):
    row = jax.lax.slice_in_dim(rows, i, i + (H_out - 1) * stride + 1, stride, axis=1)
    cols = jnp.pad(row, ((0, 0), (0, 0), (1, 1), (0, 0)))
    for j in range(3):
      tap_BHWI = jax.lax.slice_in_dim(cols, j, j + (W_out - 1) * stride + 1, stride, axis=2)
      out_BHWO = out_BHWO + jnp.einsum("bhwi,io->bhwo", tap_BHWI, w_XYIO[i, j])
  return out_BHWO


class Conv(nnx.Module):
  """A bias-free 3x3 convolution (padding 1), weight [X, Y, in, out] (HWIO), He-initialised."""

  def __init__(self, c_in: int, c_out: int, names: tuple, *, stride: int = 1,
               rngs: nnx.Rngs):
    self.stride = stride
    self.out_name = names[-1]
    std = math.sqrt(2.0 / (9 * c_in))
    w = jax.random.normal(rngs.params(), (3, 3, c_in, c_out), jnp.float32) * std
    self.w = nnx.Param(w, out_sharding=(KERNEL, KERNEL, *names))

  def __call__(self, x):
    if is_split(self.out_name) and (is_split(HEIGHT) or is_split(WIDTH)):
      return shifted_conv(x, self.w[...], self.stride)  # see shifted_conv: an XLA bug
    return jax.lax.conv_general_dilated(
        x, self.w[...], window_strides=(self.stride, self.stride), padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class FrozenNorm(nnx.Module):
  """BatchNorm at inference: (x - mean) / sqrt(var + eps) * scale + bias, per channel."""

  def __init__(self, size: int, name: str, eps: float, *, rngs: nnx.Rngs):
    self.eps = eps
    # Random statistics, so a test exercises every term (a trained model loads real ones);
    # one draw, as each random call costs XLA:CPU about 0.15 s of compiling.
    r = 0.1 * jax.random.normal(rngs.params(), (4, size), jnp.float32)
    self.scale = nnx.Param(1.0 + r[0], out_sharding=(name,))
    self.bias = nnx.Param(r[1], out_sharding=(name,))
    self.mean = nnx.BatchStat(r[2], out_sharding=(name,))
    self.var = nnx.BatchStat(1.0 + jnp.abs(r[3]), out_sharding=(name,))

  def __call__(self, x):
    inv = jax.lax.rsqrt(self.var[...] + self.eps) * self.scale[...]
    return (x - self.mean[...]) * inv + self.bias[...]


class Block(nnx.Module):
  """conv (column-parallel) -> norm -> ReLU -> conv (row-parallel) -> norm -> + shortcut."""

  def __init__(self, c_in: int, c_out: int, cfg: CnnConfig, *, stride: int, rngs: nnx.Rngs):
    self.stride = stride
    self.pad = c_out - c_in
    self.conv1 = Conv(c_in, c_out, (CHANNELS, FILTERS), stride=stride, rngs=rngs)
    self.norm1 = FrozenNorm(c_out, FILTERS, cfg.norm_eps, rngs=rngs)
    self.conv2 = Conv(c_out, c_out, (FILTERS, CHANNELS), rngs=rngs)
    self.norm2 = FrozenNorm(c_out, CHANNELS, cfg.norm_eps, rngs=rngs)

  def shortcut(self, x_BHWC):
    if self.stride > 1:
      B, H, W, C = x_BHWC.shape
      x_BHWC = x_BHWC.reshape(B, H // 2, 2, W // 2, 2, C).mean((2, 4))
    if self.pad:
      x_BHWC = jnp.pad(x_BHWC, ((0, 0), (0, 0), (0, 0), (0, self.pad)))
    return x_BHWC

  def __call__(self, x_BHWC):
    h_BHWF = jax.nn.relu(self.norm1(self.conv1(x_BHWC)))
    h_BHWF = constrain(h_BHWF, HIDDEN_NAMES)
    y_BHWC = self.norm2(self.conv2(h_BHWF))
    y_BHWC = constrain(y_BHWC, STREAM_NAMES)
    shortcut_BHWC = constrain(self.shortcut(x_BHWC), STREAM_NAMES)
    return jax.nn.relu(y_BHWC + shortcut_BHWC)


class ResNet(nnx.Module):
  """Images [B, H, W, I] in [0, 1] -> logits [B, K] (float32)."""

  def __init__(self, cfg: CnnConfig, *, rngs: nnx.Rngs):
    widths = stage_widths(cfg)
    self.stem = Conv(cfg.in_channels, widths[0], (COLOR, CHANNELS), rngs=rngs)
    self.stem_norm = FrozenNorm(widths[0], CHANNELS, cfg.norm_eps, rngs=rngs)
    blocks = []
    for s, width in enumerate(widths):
      for b in range(cfg.blocks):
        first = s > 0 and b == 0
        c_in = widths[s - 1] if first else width
        blocks.append(Block(c_in, width, cfg, stride=2 if first else 1, rngs=rngs))
    self.blocks = nnx.List(blocks)
    std = 1.0 / math.sqrt(widths[-1])
    w = jax.random.normal(rngs.params(), (widths[-1], cfg.num_classes), jnp.float32) * std
    self.head_w = nnx.Param(w, out_sharding=(CHANNELS, CLASSES))
    self.head_b = nnx.Param(jnp.zeros((cfg.num_classes,), jnp.float32),
                            out_sharding=(CLASSES,))

  def __call__(self, images_BHWI: jax.Array) -> jax.Array:
    x_BHWI = constrain(images_BHWI.astype(jnp.float32) - 0.5, IMAGE_NAMES)
    with jax.named_scope("stem"):
      x_BHWC = jax.nn.relu(self.stem_norm(self.stem(x_BHWI)))
      x_BHWC = constrain(x_BHWC, STREAM_NAMES)
    for i, block in enumerate(self.blocks):
      with jax.named_scope(f"block{i}"):
        x_BHWC = block(x_BHWC)
    with jax.named_scope("head"):
      pooled_BC = x_BHWC.mean((1, 2))
      logits_BK = pooled_BC @ self.head_w[...] + self.head_b[...]
      return constrain(logits_BK, LOGITS_NAMES)
