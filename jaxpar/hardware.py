"""Hardware presets for the planner (`jaxpar.plan`): one device's peak FLOP/s, memory
bandwidth, link bandwidth and memory, as a small table. Imports no JAX, so the command line
can list the presets before JAX starts.
"""

import dataclasses

from jaxpar.errors import UserError

GB = 1e9
GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Hardware:
  """One device: peak FLOP/s (TFLOP/s), HBM bandwidth and one-way link bandwidth to a
  neighbour (GB/s), memory (GiB)."""
  name: str
  tflops: float
  hbm_gbps: float
  link_gbps: float
  memory_gib: float


# Dense bf16 peaks, HBM and one-way link bandwidth from the vendors' sheets. The CPU row is
# this 2-core machine: ~465 GFLOP/s (float32 einsum at 512 rows) and ~40 GB/s (copy), both
# measured in JAX_NOTES; its link figure (emulated devices exchange through host memory) is
# an assumption, not a measurement; its memory is replaced by each device's share of the
# host's available memory when planning for this machine (`for_devices`).
PRESETS = {
    "h100": Hardware("NVIDIA H100 SXM", 989.0, 3350.0, 450.0, 80.0),
    "h200": Hardware("NVIDIA H200", 989.0, 4800.0, 450.0, 141.0),
    "tpu-v5e": Hardware("TPU v5e", 197.0, 819.0, 45.0, 16.0),
    "cpu": Hardware("this CPU (emulated devices)", 0.4, 40.0, 20.0, 64.0),
}


def hardware(preset: str = "cpu", *, tflops: float | None = None, hbm_gbps: float | None = None,
             link_gbps: float | None = None, memory_gib: float | None = None) -> Hardware:
  """A preset with any figure replaced."""
  if preset not in PRESETS:
    raise UserError(f"--hardware {preset}: unknown preset; use one of {', '.join(PRESETS)}")
  base = PRESETS[preset]
  given = {"tflops": tflops, "hbm_gbps": hbm_gbps, "link_gbps": link_gbps,
           "memory_gib": memory_gib}
  flags = {"tflops": "--flops", "hbm_gbps": "--hbm-gbps", "link_gbps": "--link-gbps",
           "memory_gib": "--device-memory"}
  for key, value in given.items():
    if value is not None and value <= 0:
      raise UserError(f"{flags[key]} {value:g}: must be positive")
  return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


def host_available_bytes() -> int:
  """The host's available memory (MemAvailable: free plus what the kernel can reclaim)."""
  with open("/proc/meminfo") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def for_devices(preset: str, n_devices: int, **figures) -> Hardware:
  """`hardware(preset, **figures)` for `n_devices` devices: emulated CPU devices share one
  host, so each gets its share of the host's available memory (not the preset's 64 GiB)
  unless `memory_gib` is given."""
  if preset == "cpu" and figures.get("memory_gib") is None:
    figures["memory_gib"] = host_available_bytes() / GIB / n_devices
  return hardware(preset, **figures)


def hardware_for(device_kind: str, platform: str) -> str:
  """The preset for a JAX device (`device_kind`, `platform`): by name, else `cpu`."""
  kind = device_kind.lower()
  for key, words in (("h200", ("h200",)), ("h100", ("h100",)), ("tpu-v5e", ("v5e", "v5 lite"))):
    if any(w in kind for w in words):
      return key
  return "cpu" if platform == "cpu" else "h100"
