"""Sharded image classification with the CNN: build, compile, classify, verify.

`build` turns a `Config` (its `cnn` and `run` sections) and a mesh into a `Classifier`:
born-sharded parameters plus a jitted forward whose images, activations and logits are all
laid out by the one rule table. Every layout mistake (an image size the spatial split does not
divide, channels the `model` axis does not divide, a mesh axis nothing uses) is a `UserError`
naming the config key, raised before anything compiles.
"""

import dataclasses
import math
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxpar import axes
from jaxpar.config import Config, MeshConfig
from jaxpar.distributed import tree_to_host
from jaxpar.errors import UserError
from jaxpar.mesh import single_device_mesh
from jaxpar.models import cnn, cnn_config
from jaxpar.rules import Rules, check_tree, tree_shardings, use_rules
from jaxpar.runtime import state

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclasses.dataclass
class Classifier(state.ShardedModel):
  """The CNN on a mesh: `fn(params, images) -> logits` [B, K] float32."""

  def images(self, images_BHWI: np.ndarray) -> jax.Array:
    """Places host images [B, H, W, I] (float32 in [0, 1]) on the mesh."""
    sharding = self.rules.sharding(cnn.IMAGE_NAMES, self.mesh, what="images")
    return jax.device_put(jnp.asarray(images_BHWI, jnp.float32), sharding)



def image_shape(config: Config) -> tuple[int, int, int, int]:
  c = config.section("cnn")
  return (config.run.batch, c.image_size, c.image_size, c.in_channels)


def _ways(rules: Rules, name: str, mesh_shape) -> tuple[int, str]:
  split = [a for a in rules.mesh_axes(name) if a in mesh_shape]
  return (math.prod(mesh_shape[a] for a in split),
          " x ".join(f"mesh.{a}={mesh_shape[a]}" for a in split))


def check_layout(config: Config, mesh: Mesh, rules: Rules) -> None:
  """UserErrors, naming config keys, for layouts the CNN cannot run on. Needs no compiling."""
  c, shape = config.section("cnn"), dict(mesh.shape)
  used = {a for name in cnn_config.NAMES for a in rules.mesh_axes(name)}
  for axis, size in shape.items():
    if size > 1 and axis not in used:
      hint = {axes.STAGE: "rules.height=stage (image strips)", axes.MODEL: "rules.filters=model",
              axes.DATA: "rules.batch=data"}.get(axis, f"rules.NAME={axis}")
      raise UserError(f"mesh.{axis}={size}: no dim of the CNN is split over {axis!r}, so its "
                      f"{size} device groups would repeat the same work; set {hint} or "
                      f"mesh.{axis}=1")
  rules.check(image_shape(config), cnn.IMAGE_NAMES, shape, what="images",
              keys=cnn.CONFIG_KEYS)
  halvings = 2 ** (c.stages - 1)
  for name in (axes.HEIGHT, axes.WIDTH):
    ways, over = _ways(rules, name, shape)
    if c.image_size % (ways * halvings):
      raise UserError(
          f"cnn.image_size={c.image_size} does not split over {over} (rules.{name}): every "
          f"stage's {name} ({', '.join(map(str, cnn.stage_sizes(c)))} pixels in the "
          f"{c.stages} stages) must cut into {ways} equal strips; use a multiple of "
          f"{ways * halvings} or set rules.{name}=null")
  for name in (axes.CHANNELS, axes.ACT_CHANNELS, axes.FILTERS):
    ways, over = _ways(rules, name, shape)
    if c.width % ways:
      raise UserError(
          f"cnn.width={c.width} does not split over {over} (rules.{name}): the {name} of the "
          f"stages ({', '.join(map(str, cnn.stage_widths(c)))}) must divide evenly; use a "
          f"multiple of {ways} or set rules.{name}=null")


def build(config: Config, mesh: Mesh, *, params: dict | None = None) -> Classifier:
  """Checks the layout, creates (or places) the parameters and jits the classifier.

  `params` (a dict in the model's structure, e.g. gathered from another mesh) replaces the
  seeded initialisation; it is placed on this mesh's shardings.
  """
  rules = Rules(config.rules)
  check_layout(config, mesh, rules)
  make = lambda rngs: cnn.ResNet(config.section("cnn"), rngs=rngs)
  graphdef, shapes, names = state.abstract(make)
  check_tree(shapes, names, rules, mesh, keys=cnn.CONFIG_KEYS)
  param_shardings = tree_shardings(names, rules, mesh)
  image_sharding = rules.sharding(cnn.IMAGE_NAMES, mesh, what="images")
  logits_sharding = rules.sharding(cnn.LOGITS_NAMES, mesh, what="logits")

  def forward(params: dict, images_BHWI: jax.Array) -> jax.Array:
    with use_rules(rules, keys=cnn.CONFIG_KEYS):
      return nnx.merge(graphdef, params)(images_BHWI)

  # Trace once abstractly: every activation's layout is checked before anything compiles.
  with jax.set_mesh(mesh):
    jax.eval_shape(forward, shapes, jax.ShapeDtypeStruct(image_shape(config), jnp.float32))

  if params is None:
    params = state.create(make, seed=config.run.seed, mesh=mesh, shardings=param_shardings)
  else:
    params = jax.device_put(params, param_shardings)
  fn = jax.jit(forward, in_shardings=(param_shardings, image_sharding),
               out_shardings=logits_sharding)
  return Classifier(config, mesh, rules, graphdef, params, names, fn)


def seeded_images(config: Config) -> np.ndarray:
  """The seeded batch of random images [run.batch, S, S, I] in [0, 1)."""
  rng = np.random.default_rng(config.run.seed)
  return rng.random(image_shape(config), dtype=np.float32)


def list_images(folder: str) -> list[str]:
  """The PNG/JPEG files of `folder` (sorted by name), or `folder` itself if it is one."""
  if os.path.isfile(folder):
    if not folder.lower().endswith(IMAGE_SUFFIXES):
      raise UserError(f"--images {folder}: not a {'/'.join(IMAGE_SUFFIXES)} file; pass an image "
                      f"or a folder of them")
    return [folder]
  if not os.path.isdir(folder):
    raise UserError(f"--images {folder}: no such file or folder; pass an image or a folder of "
                    f".png/.jpg files")
  files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES)
                 and os.path.isfile(os.path.join(folder, f)))
  if not files:
    raise UserError(f"--images {folder}: no {'/'.join(IMAGE_SUFFIXES)} files in the folder; "
                    f"add images or run without --images for a seeded random batch")
  return [os.path.join(folder, f) for f in files]


def load_image(path: str, *, size: int, channels: int) -> np.ndarray:
  """Decodes, converts (RGB or grey) and resizes one file to [size, size, channels] in [0, 1]."""
  from PIL import Image  # only the --images path needs Pillow

  try:
    with Image.open(path) as image:
      image = image.convert("RGB" if channels == 3 else "L")
      image = image.resize((size, size), Image.Resampling.BILINEAR)
      pixels = np.asarray(image, np.float32) / 255.0
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    reason = (str(e).splitlines() or [type(e).__name__])[0]
    raise UserError(f"--images: cannot read {path} as an image ({reason}); remove or replace "
                    f"the file") from None
  return pixels.reshape(size, size, channels)


def load_images(paths: list[str], config: Config) -> np.ndarray:
  """All files decoded to [N, S, S, I] (float32 in [0, 1])."""
  c = config.section("cnn")
  return np.stack([load_image(p, size=c.image_size, channels=c.in_channels) for p in paths])


def batches(images_NHWI: np.ndarray, batch: int) -> Iterator[tuple[np.ndarray, int]]:
  """(images [batch, ...], real count): the last batch padded with black images."""
  for start in range(0, len(images_NHWI), batch):
    chunk = images_NHWI[start:start + batch]
    n = len(chunk)
    if n < batch:
      chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), chunk.dtype)])
    yield chunk, n


def reference_logits(classifier: Classifier, images_BHWI: np.ndarray) -> np.ndarray:
  """The same parameters and images on one device (this process's first of the mesh)."""
  one = single_device_mesh(classifier.mesh.local_devices[0])
  config = dataclasses.replace(classifier.config, mesh=MeshConfig(1, 1, 1))
  single = build(config, one, params=tree_to_host(classifier.params))
  return np.asarray(single(single.images(images_BHWI)))
