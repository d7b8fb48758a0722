"""Many processes, one program: joining a cluster, and what only process 0 does.

Every process runs the same code on its own devices (JAX's multi-controller runtime,
`jax.distributed`): the mesh spans all processes' devices (`jaxpar.mesh`), the compiled
programs are the same everywhere and their collectives cross processes (gloo on CPU, NCCL on
GPU). Two rules keep the processes in step:

- host copies of sharded arrays come from `to_host`, a collective: every process calls it;
- process 0 prints (`say`) and writes files (`is_main`); the others stay quiet.

A cluster is joined from flags (`Cluster.from_flags`) or from what SLURM, Open MPI or
Kubernetes set in the environment (`Cluster.from_environment`, JAX's own detection).
"""

import dataclasses
import math
import os
import socket
import sys
import threading

from jaxpar import axes
from jaxpar.errors import UserError

_LOOPBACK = ("127.", "localhost", "::1", "[::1]")

# Over many processes, XLA:CPU (jax 0.10, gloo) deadlocks once more than 32 programs with
# collectives are queued on a device (a device's launches wait on a semaphore of 32 while the
# queued programs wait for that launch's collective). A loop of calls waits for a result at
# least this often there.
MAX_QUEUED = 16


@dataclasses.dataclass(frozen=True)
class Cluster:
  """Where this process sits: `processes` in all, this one `process_id`. `coordinator` is
  process 0's HOST:PORT (None: JAX reads it from the environment, `source`)."""
  coordinator: str | None
  processes: int
  process_id: int
  source: str = "flags"

  @staticmethod
  def from_flags(coordinator: str | None, processes: int | None,
                 process_id: int | None) -> "Cluster | None":
    """The cluster the flags name (None: no flag given); UserError on an incomplete or
    inconsistent set, before anything starts."""
    if coordinator is None and processes is None and process_id is None:
      return None
    if coordinator is None:
      given = "--num-processes" if processes is not None else "--process-id"
      raise UserError(f"{given} without --coordinator: pass process 0's address too, e.g. "
                      f"--coordinator 127.0.0.1:1234 (the same on every process)")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise UserError(f"--coordinator {coordinator}: expected HOST:PORT, e.g. 127.0.0.1:1234 "
                      f"(process 0's address and a free port)")
    if processes is None or process_id is None:
      missing = "--num-processes N" if processes is None else "--process-id I"
      raise UserError(f"--coordinator {coordinator} needs {missing} too: every process is told "
                      f"the process count and its own id (0 to N-1)")
    if processes < 1:
      raise UserError(f"--num-processes {processes}: must be at least 1")
    if not 0 <= process_id < processes:
      raise UserError(f"--process-id {process_id} is outside 0..{processes - 1} for "
                      f"--num-processes {processes}; number the processes 0 to N-1")
    return Cluster(coordinator, processes, process_id)

  @staticmethod
  def from_environment() -> "Cluster | None":
    """The cluster SLURM (srun), Open MPI (mpirun) or Kubernetes describe, as JAX's
    `jax.distributed.initialize()` would detect it; None outside one, or with one process."""
    try:  # JAX's own detectors (private: the public API joins at once, and fails outside)
      from jax._src import clusters
      detectors = clusters.ClusterEnv._cluster_types
    except (ImportError, AttributeError):  # a JAX that moved them: flags still work
      return None
    for env in detectors:
      if env.opt_in_only_method or not env.is_env_present():
        continue
      processes = env.get_process_count()
      if processes > 1:
        return Cluster(None, processes, env.get_process_id(), source=env.__name__)
      return None
    return None

  def local_devices(self, devices: int | None, cpu_devices: int) -> int:
    """Emulated CPU devices for this process: `--devices`, else the config's total
    (mesh.cpu_devices) shared evenly between the processes."""
    if devices is not None:
      return devices
    if cpu_devices % self.processes:
      raise UserError(f"mesh.cpu_devices={cpu_devices} does not split evenly over "
                      f"{self.processes} processes; pass --devices N (emulated CPU devices per "
                      f"process)")
    return cpu_devices // self.processes


def join(cluster: Cluster, *, timeout: float) -> None:
  """`jax.distributed.initialize` for `cluster`; call it before anything asks JAX for devices.

  JAX aborts the process (SIGABRT, a C++ stack) when the coordinator or a peer does not arrive
  in time. A watchdog thread ends the process first, after `timeout` seconds, with one line
  on stderr and status 2, as the CLI ends on a user error.
  """
  import jax
  if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if cluster.coordinator is not None:
    kwargs = dict(coordinator_address=cluster.coordinator, num_processes=cluster.processes,
                  process_id=cluster.process_id)
    if cluster.coordinator.startswith(_LOOPBACK):  # a local cluster stays off the network
      kwargs["coordinator_bind_address"] = cluster.coordinator
    if cluster.process_id == 0:
      _check_port(kwargs.get("coordinator_bind_address", cluster.coordinator))
  watchdog = threading.Timer(timeout, _give_up, (cluster, timeout))
  watchdog.daemon = True
  watchdog.start()
  try:  # JAX's own timeout comes later than the watchdog's, so the watchdog speaks
    jax.distributed.initialize(initialization_timeout=int(timeout) + 30, **kwargs)
  finally:
    watchdog.cancel()


def _check_port(address: str) -> None:
  """UserError when process 0 cannot listen at `address` (JAX crashes with SIGSEGV there)."""
  host, _, port = address.rpartition(":")
  local = host.strip("[]") if address.startswith(_LOOPBACK) else ""
  with socket.socket(socket.AF_INET6 if ":" in local else socket.AF_INET) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closing socket is no obstacle
    try:
      s.bind((local, int(port)))
    except OSError as e:
      raise UserError(f"--coordinator {address}: process 0 cannot listen on port {port} "
                      f"({e.strerror}); choose a free port") from None


def _give_up(cluster: Cluster, timeout: float) -> None:
  where = cluster.coordinator or f"the coordinator {cluster.source} names"
  if cluster.process_id != 0 and cluster.coordinator and not _answers(cluster.coordinator):
    why = (f"--coordinator {cluster.coordinator}: nothing answered there within {timeout:g} s "
           f"(--join-timeout); start process 0 (it hosts the coordinator) or fix the address")
  else:
    why = (f"--num-processes {cluster.processes}: not every process joined {where} within "
           f"{timeout:g} s (--join-timeout); start all of them, process ids 0 to "
           f"{cluster.processes - 1}, with the same --coordinator")
  print(f"error: process {cluster.process_id}: {why}", file=sys.stderr, flush=True)
  os._exit(2)


def _answers(address: str) -> bool:
  host, _, port = address.rpartition(":")
  try:
    socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
    return True
  except OSError:
    return False


def process_index() -> int:
  """This process's index; 0 before JAX has started (nothing can have joined yet)."""
  if "jax" not in sys.modules:
    return 0
  from jax._src import xla_bridge
  if not xla_bridge.backends_are_initialized():
    return 0
  import jax
  return jax.process_index()


def is_main() -> bool:
  """Whether this process prints and writes files (process 0)."""
  return process_index() == 0


def say(text: str) -> None:
  """Prints `text` on process 0 only."""
  if is_main():
    print(text, flush=True)


def to_host(x):
  """The whole of `x` as a NumPy array on this host. Across processes this gathers the
  shards (a collective program): every process must call it, in the same order."""
  import jax
  import numpy as np
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def tree_to_host(tree):
  """`to_host` of every leaf."""
  import jax
  return jax.tree.map(to_host, tree)


def fit_error(error: UserError, mesh_config, processes: int, devices: int) -> UserError:
  """`error` (the mesh does not fit `devices`) said again for `processes` processes, with the
  --devices per process that fits."""
  if processes == 1:
    return error
  sizes = [getattr(mesh_config, name) for name in axes.MESH_AXES]
  needed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:  # any multiple of the fixed axes fills
    fix = f"--devices {needed // math.gcd(needed, processes)}"
  elif needed % processes == 0:
    fix = f"--devices {needed // processes}"
  else:
    fix = None
  fix = (f"run each of the {processes} processes with {fix}" if fix else
         f"use a process count that divides {needed}, or change the mesh")
  what = error.args[0].split(";")[0]
  return UserError(f"{what} ({processes} processes x {devices // processes} devices); {fix}")
