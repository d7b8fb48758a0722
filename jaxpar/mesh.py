"""Builds the device mesh, in one place, from a `MeshConfig`.

The mesh always has the four axes of `jaxpar.axes.MESH_AXES` (size 1 where unused) and
`AxisType.Auto` axes, so GSPMD inserts the tensor-parallel collectives. Over many processes
the devices are laid out process by process, so `data` (outermost), then `stage`, cross
processes first and `model` (innermost, after `expert`) stays inside one where the counts allow.
"""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jaxpar import axes
from jaxpar.config import MeshConfig


def make_mesh(config: MeshConfig, *, devices: list | None = None) -> Mesh:
  """A (data, stage, expert, model) mesh over `devices` (default: all devices).

  The product of the axis sizes must equal the number of devices (a -1 axis takes what is
  left); JAX itself would silently accept a smaller mesh.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = config.shape(len(devices))
  shape = tuple(sizes[name] for name in axes.MESH_AXES)
  types = (AxisType.Auto,) * len(shape)
  if len({d.process_index for d in devices}) > 1:  # jax.make_mesh may order by topology
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(ordered).reshape(shape), axes.MESH_AXES, axis_types=types)
  return jax.make_mesh(shape, axes.MESH_AXES, axis_types=types,
                       devices=devices)


def single_device_mesh(device) -> Mesh:
  """A one-device mesh on `device`: where reference results are computed."""
  return make_mesh(MeshConfig(data=1, stage=1, model=1), devices=[device])


def describe(mesh: Mesh) -> str:
  """'data=2 x stage=1 x model=4 (8 cpu devices)' (`expert` shown where it splits)."""
  dims = " x ".join(f"{name}={size}" for name, size in mesh.shape.items()
                    if name != axes.EXPERT or size > 1)
  platform, n = mesh.devices.flat[0].platform, mesh.devices.size
  where = ""
  if processes(mesh) > 1:
    crossing = cross_process_axes(mesh)
    verb = "crosses" if len(crossing) == 1 else "cross"
    where = f" in {processes(mesh)} processes; {' and '.join(crossing) or 'no axis'} {verb} them"
  return f"{dims} ({n} {platform} device{'s' if n != 1 else ''}{where})"


def processes(mesh: Mesh) -> int:
  """How many processes hold the mesh's devices."""
  return len({d.process_index for d in mesh.devices.flat})


def cross_process_axes(mesh: Mesh) -> list[str]:
  """The mesh axes along which neighbouring devices sit in different processes: their
  collectives leave the host (gloo over TCP on CPU, the network between hosts)."""
  owner = np.vectorize(lambda d: d.process_index)(mesh.devices)
  return [name for i, name in enumerate(mesh.axis_names)
          if owner.shape[i] > 1 and (np.diff(owner, axis=i) != 0).any()]
