"""Builds the device mesh, in one place, from a `MeshConfig`.

The mesh always has the three axes of `jaxpar.axes.MESH_AXES` (size 1 where unused) and
`AxisType.Auto` axes, so GSPMD inserts the tensor-parallel collectives.
"""

import jax
from jax.sharding import AxisType, Mesh

from jaxpar import axes
from jaxpar.config import MeshConfig


def make_mesh(config: MeshConfig, *, devices: list | None = None) -> Mesh:
  """A (data, stage, model) mesh over `devices` (default: all devices).

  The product of the axis sizes must equal the number of devices (a -1 axis takes what is
  left); JAX itself would silently accept a smaller mesh.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = config.shape(len(devices))
  shape = tuple(sizes[name] for name in axes.MESH_AXES)
  return jax.make_mesh(shape, axes.MESH_AXES, axis_types=(AxisType.Auto,) * len(shape),
                       devices=devices)


def single_device_mesh(device) -> Mesh:
  """A 1 x 1 x 1 mesh on `device`: where reference results are computed."""
  return make_mesh(MeshConfig(data=1, stage=1, model=1), devices=[device])


def describe(mesh: Mesh) -> str:
  """'data=2 x stage=1 x model=4 (8 cpu devices)'."""
  dims = " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
  platform, n = mesh.devices.flat[0].platform, mesh.devices.size
  return f"{dims} ({n} {platform} device{'s' if n != 1 else ''})"
