"""What a user wants to see before and after compiling.

- `param_table`: per parameter, its path, shape, logical names, PartitionSpec and the bytes one
  device holds (from the sharding, so it works on abstract shapes too).
- `hlo_census`: the collectives in compiled HLO text (kind, count, bytes), which computation
  each sits in, and the while loops with their trip counts.
- `memory`: `compiled.memory_analysis()` per device, as a dict.
"""

import dataclasses
import math
import re
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxpar.rules import Rules, is_logical

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all",
               "collective-broadcast")

_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
                "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s+=\s+(.*?)\s+([a-z][a-z0-9\-]*)\(")
_WHILE_BODY = re.compile(r"body=%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass(frozen=True)
class ParamRow:
  path: str
  shape: tuple
  names: tuple
  spec: Any
  bytes_per_device: int


def param_table(values: Any, names: Any, rules: Rules, mesh: Mesh) -> list[ParamRow]:
  """One row per parameter; `values` may hold arrays or ShapeDtypeStructs."""
  rows = []
  flat_names = jax.tree.leaves_with_path(names, is_leaf=is_logical)
  flat_values = jax.tree.leaves(values)
  for (path, logical), value in zip(flat_names, flat_values, strict=True):
    what = "/".join(str(getattr(k, "key", k)) for k in path)
    sharding = rules.sharding(logical.names, mesh, what=what)
    shard = sharding.shard_shape(tuple(value.shape))
    nbytes = math.prod(shard) * np.dtype(value.dtype).itemsize
    rows.append(ParamRow(what, tuple(value.shape), logical.names, sharding.spec, nbytes))
  return rows


def _bytes(shape_text: str, op: str) -> int:
  """Bytes of an instruction's result; for async starts, the payload the op delivers."""
  arrays = [(d, [int(x) for x in dims.split(",") if x]) for d, dims in _ARRAY.findall(shape_text)]
  arrays = [(d, dims) for d, dims in arrays if d in _DTYPE_BYTES]
  if op.endswith("-start") and len(arrays) > 1:
    # (operand, result[, contexts]) tuples: count the result (the largest non-scalar).
    arrays = [max((a for a in arrays if a[1]), key=lambda a: math.prod(a[1]))]
  return sum(_DTYPE_BYTES[d] * math.prod(dims) for d, dims in arrays)


@dataclasses.dataclass(frozen=True)
class Collective:
  kind: str          # one of COLLECTIVES
  bytes: int         # result bytes per device
  computation: str   # the HLO computation it sits in
  in_loop: bool      # inside a while body (runs once per iteration)


@dataclasses.dataclass
class Census:
  collectives: list[Collective]
  loops: dict[str, int]  # while body name -> known trip count (-1 if unknown)

  def counts(self, *, in_loop: bool | None = None) -> dict[str, dict[str, int]]:
    """{kind: {count, bytes}} over the program (or only inside/outside loops)."""
    out: dict[str, dict[str, int]] = {}
    for c in self.collectives:
      if in_loop is None or c.in_loop == in_loop:
        entry = out.setdefault(c.kind, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += c.bytes
    return out

  def count(self, kind: str, *, in_loop: bool | None = None) -> int:
    return self.counts(in_loop=in_loop).get(kind, {}).get("count", 0)


def hlo_census(hlo_text: str) -> Census:
  """Parses compiled HLO text (`compiled.as_text()`) for collectives and loops."""
  found = []  # (kind, bytes, computation)
  loops: dict[str, int] = {}
  computation = ""
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      computation = header.group(1)
      continue
    instr = _INSTR.match(line)
    if not instr:
      continue
    shape_text, op = instr.group(2), instr.group(3)
    if op == "while":
      body = _WHILE_BODY.search(line)
      trip = _TRIP.search(line)
      if body:
        loops[body.group(1)] = int(trip.group(1)) if trip else -1
      continue
    kind = op.removesuffix("-start")
    if kind in COLLECTIVES and not op.endswith("-done"):
      found.append((kind, _bytes(shape_text, op), computation))
  return Census([Collective(k, b, c, c in loops) for k, b, c in found], loops)


def memory(compiled) -> dict[str, int]:
  """Per-device bytes from `compiled.memory_analysis()`."""
  stats = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")
  out = {f.removesuffix("_size_in_bytes"): int(getattr(stats, f, 0) or 0) for f in fields}
  out["peak"] = int(getattr(stats, "peak_memory_in_bytes", 0) or 0) or (
      out["argument"] + out["output"] - out["alias"] + out["temp"])
  return out


def human(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  raise AssertionError


def format_table(headers: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
  """A plain left-aligned text table."""
  headers = list(headers)
  rows = [[str(c) for c in row] for row in rows]
  widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
            for i, h in enumerate(headers)]
  lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
  lines.append("  ".join("-" * w for w in widths))
  lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
  return "\n".join(lines)


def format_params(rows: list[ParamRow]) -> str:
  total = sum(r.bytes_per_device for r in rows)
  body = [(r.path, "x".join(map(str, r.shape)), ", ".join(str(n) for n in r.names),
           str(r.spec).removeprefix("PartitionSpec"), human(r.bytes_per_device)) for r in rows]
  body.append(("total", "", "", "", human(total)))
  return format_table(("parameter", "shape", "logical names", "spec", "per device"), body)


def format_census(census: Census) -> str:
  if not census.collectives:
    return "no collectives"
  rows = []
  for kind in COLLECTIVES:
    inside, outside = census.count(kind, in_loop=True), census.count(kind, in_loop=False)
    if inside or outside:
      nbytes = census.counts()[kind]["bytes"]
      rows.append((kind, inside + outside, inside, outside, human(nbytes)))
  loops = ", ".join(f"{n} iterations" for n in census.loops.values())
  return (format_table(("collective", "count", "in loop body", "outside loops", "bytes"), rows)
          + (f"\n(loop bodies run {loops})" if loops else ""))


def format_schedule(grid: np.ndarray, *, microbatches: int) -> str:
  """The stage x tick picture of a pipeline: each cell the microbatch a stage works on
  (prefixed by its repeat's letter when there are several), '.' when idle."""
  repeats = (int(grid.max()) // microbatches + 1) if grid.max() >= 0 else 1

  def cell(i: int) -> str:
    if i < 0:
      return "."
    r, m = divmod(int(i), microbatches)
    return f"{chr(ord('a') + r)}{m}" if repeats > 1 else str(m)

  cells = [[cell(i) for i in row] for row in grid]
  width = max(len(c) for row in cells for c in row)
  ticks = " ".join(str(t % 10).rjust(width) for t in range(grid.shape[1]))
  lines = [f"tick     {ticks}"]
  lines += [f"stage {s:<2} " + " ".join(c.rjust(width) for c in row)
            for s, row in enumerate(cells)]
  return "\n".join(lines)


def save_schedule_png(grid: np.ndarray, path: str, *, microbatches: int,
                      cell: int = 16) -> None:
  """Writes the schedule grid as a PNG: one colour per microbatch, darker for later repeats,
  white when idle. Plain zlib, no plotting library."""
  import struct
  import zlib
  stages, ticks = grid.shape
  rgb = np.full((stages * cell, ticks * cell, 3), 255, np.uint8)
  for s in range(stages):
    for t in range(ticks):
      i = int(grid[s, t])
      if i < 0:
        continue
      r, m = divmod(i, microbatches)
      hue = m / max(microbatches, 1)
      color = np.array([0.5 + 0.5 * np.cos(2 * np.pi * (hue + k / 3)) for k in range(3)])
      color = (color * 200 * (0.6 ** r) + 30).clip(0, 255).astype(np.uint8)
      rgb[s * cell + 1:(s + 1) * cell - 1, t * cell + 1:(t + 1) * cell - 1] = color
  raw = b"".join(b"\x00" + row.tobytes() for row in rgb)

  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

  header = struct.pack(">IIBBBBB", rgb.shape[1], rgb.shape[0], 8, 2, 0, 0, 0)
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))
