"""The CNN's side of the config, JAX-free: its `cnn` section (`CnnConfig`, the `cnn.KEY`
keys) and their check, registered as a section (`jaxpar.families`); the logical names it
uses (spelled in `jaxpar.axes`, the one vocabulary, so a YAML rules table of the CNN
validates before any model is imported).

The model is in `jaxpar.models.cnn`.
"""

import dataclasses

from jaxpar import families
from jaxpar.axes import (ACT_CHANNELS, BATCH, CHANNELS, CLASSES, COLOR, FILTERS, HEIGHT,
                         KERNEL, WIDTH)
from jaxpar.errors import UserError

# Every logical name a CNN parameter or activation carries.
NAMES = (BATCH, HEIGHT, WIDTH, COLOR, CHANNELS, ACT_CHANNELS, FILTERS, KERNEL, CLASSES)


@dataclasses.dataclass(frozen=True)
class CnnConfig:
  """A ResNet-style image classifier (`jaxpar.models.cnn`): a stem convolution, `stages`
  stages of `blocks` residual blocks (each later stage halves the image and doubles the
  width), global average pooling and a linear head. Runs on `run.batch` images."""
  image_size: int = 32   # images are resized to image_size x image_size pixels
  in_channels: int = 3   # 3: RGB, 1: grey
  width: int = 16        # channels of the first stage; stage s has width * 2**s
  stages: int = 3
  blocks: int = 1        # residual blocks per stage
  num_classes: int = 10
  norm_eps: float = 1e-5


def check(c: CnnConfig) -> None:
  positive = [("cnn.image_size", c.image_size), ("cnn.width", c.width),
              ("cnn.stages", c.stages), ("cnn.blocks", c.blocks),
              ("cnn.num_classes", c.num_classes)]
  for key, value in positive:
    if value < 1:
      raise UserError(f"{key}={value}: must be at least 1")
  if c.in_channels not in (1, 3):
    raise UserError(f"cnn.in_channels={c.in_channels}: expected 1 (grey) or 3 (RGB)")
  if c.norm_eps <= 0:
    raise UserError(f"cnn.norm_eps={c.norm_eps}: must be positive")
  halvings = 2 ** (c.stages - 1)
  if c.image_size % halvings:
    raise UserError(f"cnn.image_size={c.image_size} cannot be halved {c.stages - 1} times "
                    f"(cnn.stages={c.stages}); use a multiple of {halvings}")


SECTION = families.register_section(families.Section(name="cnn", options=CnnConfig,
                                                     check=check))
