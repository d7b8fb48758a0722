"""What a user wants to see before and after compiling.

- `param_table`: per parameter, its path, shape, logical names, PartitionSpec and the bytes one
  device holds (from the sharding, so it works on abstract shapes too).
- `hlo_census`: the collectives in compiled HLO text (kind, count, bytes), which computation
  each sits in, and the while loops with their trip counts.
- `memory`: `compiled.memory_analysis()` per device, as a dict; `format_memory` says it in words.
- `format_schedule`, `save_schedule_png`: a pipeline schedule as text or as a labelled picture.
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
  loop_copies: list[int] = dataclasses.field(default_factory=list)  # bytes of each copy
  # inside a while body (a buffer copied every iteration: a loop-carried array not updated
  # in place)

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
  copies = []  # (bytes, computation)
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
    elif op == "copy":
      copies.append((_bytes(shape_text, op), computation))
  return Census([Collective(k, b, c, c in loops) for k, b, c in found], loops,
                [b for b, c in copies if c in loops])


def memory(compiled) -> dict[str, int]:
  """Per-device bytes from `compiled.memory_analysis()`.

  `peak` is never below argument + output - alias + temp: on XLA:CPU `peak_memory_in_bytes`
  can count only the temporaries' heap, so it may read smaller than the temporaries alone.
  XLA's own figure stays under `xla_peak` (0 when XLA reports none).
  """
  stats = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")
  out = {f.removesuffix("_size_in_bytes"): int(getattr(stats, f, 0) or 0) for f in fields}
  out["xla_peak"] = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
  out["peak"] = max(out["xla_peak"], _live_bound(out))
  return out


def _live_bound(mem: dict) -> int:
  """Bytes if every buffer were live at once: arguments + outputs - aliased + temporaries."""
  return mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]


def format_memory(mem: dict) -> str:
  """One line from `memory`'s dict, each figure saying what it counts."""
  total = _live_bound(mem)
  outputs = f"outputs {human(mem['output'])}"
  if mem["alias"]:
    outputs += f" ({human(mem['alias'])} of them reusing argument buffers)"
  line = (f"per device: arguments {human(mem['argument'])} (parameters and inputs), {outputs}, "
          f"temporaries {human(mem['temp'])}, total live at most {human(total)}")
  if mem.get("xla_peak", 0) > total:  # then the sum is not an upper bound: say so
    line += f" (XLA reports a peak of {human(mem['xla_peak'])})"
  return line


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
  loops = ", ".join(f"{n} iterations" if n >= 0 else "a data-dependent count (a while loop)"
                    for n in census.loops.values())
  return (format_table(("collective", "count", "in loop body", "outside loops", "bytes"), rows)
          + (f"\n(loop bodies run {loops})" if loops else ""))


def _repeats(grid: np.ndarray, microbatches: int) -> int:
  return (int(grid.max()) // microbatches + 1) if grid.size and grid.max() >= 0 else 1


def _cell_text(i: int, microbatches: int, repeats: int) -> str:
  """The microbatch, prefixed by its repeat's letter when there are several; '.' when idle."""
  if i < 0:
    return "."
  r, m = divmod(int(i), microbatches)
  return f"{chr(ord('a') + r)}{m}" if repeats > 1 else str(m)


def format_schedule(grid: np.ndarray, *, microbatches: int) -> str:
  """The stage x tick picture of a pipeline: each cell the microbatch a stage works on
  (prefixed by its repeat's letter when there are several), '.' when idle."""
  repeats = _repeats(grid, microbatches)
  cells = [[_cell_text(i, microbatches, repeats) for i in row] for row in grid]
  # Wide enough for the longest cell and the largest tick number, so the header lines up.
  width = max([len(c) for row in cells for c in row] + [len(str(grid.shape[1] - 1))])
  labels = [f"stage {s:<2} " for s in range(grid.shape[0])]
  pad = max([len(x) for x in labels] + [len("tick ")])
  ticks = " ".join(str(t).rjust(width) for t in range(grid.shape[1]))
  lines = ["tick".ljust(pad) + ticks]
  lines += [label.ljust(pad) + " ".join(c.rjust(width) for c in row)
            for label, row in zip(labels, cells)]
  return "\n".join(lines)


def schedule_title(grid: np.ndarray, microbatches: int) -> str:
  """E.g. 'pipeline: S=4 stages, M=8 microbatches, R=2 repeats, bubble 15.8%'."""
  stages = grid.shape[0]
  bubble = float(np.mean(grid < 0)) if grid.size else 0.0
  return (f"pipeline: S={stages} stages, M={microbatches} microbatches, "
          f"R={_repeats(grid, microbatches)} repeats, bubble {bubble:.1%}")


# The schedule picture's geometry in pixels (tests rebuild the image size from these).
PNG_CELL = 32        # one stage x tick cell; room for 'a15' in the default font
PNG_LEFT = 72        # the y axis: its rotated label and the 'stage N' row names
PNG_TOP = 30         # the title line
PNG_AXIS = 36        # under the grid: tick numbers, then the x axis label
PNG_LINE = 22        # one legend line
PNG_PAD = 10         # right and bottom margins
PNG_MIN_PLOT = 420   # the least plot width, so the title and legend text fit

_BUBBLE_BG, _BUBBLE_HATCH = (236, 236, 236), (190, 190, 190)


def _png_layout(stages: int, ticks: int, microbatches: int, repeats: int,
                cell: int) -> dict:
  """Where things go: plot width, swatches per legend line, legend top, image size."""
  plot_w = max(ticks * cell, PNG_MIN_PLOT)
  per_line = max(1, plot_w // cell)
  swatch_lines = repeats * math.ceil(microbatches / per_line)
  legend_top = PNG_TOP + stages * cell + PNG_AXIS
  height = legend_top + PNG_LINE * (2 + swatch_lines) + PNG_PAD
  return {"plot_w": plot_w, "per_line": per_line, "legend_top": legend_top,
          "size": (PNG_LEFT + plot_w + PNG_PAD, height)}


def _cell_color(i: int, microbatches: int, repeats: int) -> tuple:
  """One hue per microbatch; later repeats darker (down to 45% brightness)."""
  r, m = divmod(int(i), microbatches)
  hue = m / max(microbatches, 1)
  base = np.array([0.5 + 0.5 * np.cos(2 * np.pi * (hue + k / 3)) for k in range(3)])
  shade = 1.0 - 0.55 * r / max(repeats - 1, 1)
  return tuple(int(v) for v in ((70 + 185 * base) * shade).clip(0, 255))


def _text_center(draw, box: tuple, text: str, font, fill) -> None:
  """Centres text in box by its measured bounds (bitmap fonts take no anchors)."""
  left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
  x = (box[0] + box[2] - (right - left)) / 2 - left
  y = (box[1] + box[3] - (bottom - top)) / 2 - top
  draw.text((x, y), text, font=font, fill=fill)


def _ink(color: tuple) -> tuple:
  """Black text on light cells, white on dark ones."""
  return (0, 0, 0) if 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2] > 120 else (
      255, 255, 255)


def _bubble_tile(width: int, height: int):
  """Light grey with diagonal hatching: an idle (bubble) cell."""
  from PIL import Image
  y, x = np.mgrid[:height, :width]
  tile = np.where(((x + y) % 6 == 0)[..., None], _BUBBLE_HATCH, _BUBBLE_BG)
  return Image.fromarray(tile.astype(np.uint8), "RGB")


def _draw_cells(image, draw, grid: np.ndarray, microbatches: int, repeats: int,
                cell: int, font) -> None:
  """The stage x tick cells, 1 px of white between them."""
  tile = _bubble_tile(cell - 2, cell - 2)
  for (s, t), i in np.ndenumerate(grid):
    x0, y0 = PNG_LEFT + t * cell, PNG_TOP + s * cell
    box = (x0 + 1, y0 + 1, x0 + cell - 2, y0 + cell - 2)
    if i < 0:
      image.paste(tile, box[:2])
      continue
    color = _cell_color(i, microbatches, repeats)
    draw.rectangle(box, fill=color)
    _text_center(draw, box, _cell_text(i, microbatches, repeats), font, _ink(color))


def _draw_axes(image, draw, stages: int, ticks: int, cell: int, font) -> None:
  """Row names and the rotated 'stage' label on the left; tick numbers and 'tick' below."""
  from PIL import Image, ImageDraw
  grid_bottom = PNG_TOP + stages * cell
  for s in range(stages):
    y0 = PNG_TOP + s * cell
    _text_center(draw, (18, y0, PNG_LEFT - 4, y0 + cell), f"stage {s}", font, (0, 0, 0))
  for t in range(ticks):
    x0 = PNG_LEFT + t * cell
    _text_center(draw, (x0, grid_bottom + 2, x0 + cell, grid_bottom + 16), str(t), font,
                 (0, 0, 0))
  _text_center(draw, (PNG_LEFT, grid_bottom + 18, PNG_LEFT + ticks * cell, grid_bottom + 34),
               "tick", font, (0, 0, 0))
  # Pillow draws text horizontally only: draw the y label on its own strip, then turn it.
  strip = Image.new("RGB", (max(stages * cell, 40), 16), "white")
  _text_center(ImageDraw.Draw(strip), (0, 0) + strip.size, "stage", font, (0, 0, 0))
  strip = strip.rotate(90, expand=True)
  image.paste(strip, (0, PNG_TOP + (stages * cell - strip.size[1]) // 2))


def _draw_legend(image, draw, layout: dict, microbatches: int, repeats: int, cell: int,
                 font) -> None:
  """A line of what the colours mean, a line of swatches per repeat, then the bubble cell."""
  y = layout["legend_top"]
  meaning = "colour: one per microbatch (cell text)"
  if repeats > 1:
    meaning += "; darker: later repeat (the letter)"
  draw.text((PNG_LEFT, y + 5), meaning, font=font, fill=(0, 0, 0))
  y += PNG_LINE
  for r in range(repeats):
    label = f"repeat {chr(ord('a') + r)}" if repeats > 1 else "microbatch"
    draw.text((4, y + 5), label, font=font, fill=(0, 0, 0))
    for m in range(microbatches):
      if m and m % layout["per_line"] == 0:
        y += PNG_LINE
      x0 = PNG_LEFT + (m % layout["per_line"]) * cell
      box = (x0 + 1, y + 1, x0 + cell - 2, y + PNG_LINE - 2)
      i = r * microbatches + m
      color = _cell_color(i, microbatches, repeats)
      draw.rectangle(box, fill=color)
      _text_center(draw, box, _cell_text(i, microbatches, repeats), font, _ink(color))
    y += PNG_LINE
  image.paste(_bubble_tile(cell - 2, PNG_LINE - 2), (PNG_LEFT + 1, y + 1))
  draw.text((PNG_LEFT + cell + 4, y + 5), "idle: a bubble (the stage waits)", font=font,
            fill=(0, 0, 0))


def save_schedule_png(grid: np.ndarray, path: str, *, microbatches: int,
                      cell: int = PNG_CELL) -> None:
  """Writes the schedule as a labelled PNG: title with S, M, R and the bubble, stage rows,
  tick columns, each busy cell coloured by microbatch and showing its text, idle cells
  hatched grey, and a legend."""
  from PIL import Image, ImageDraw, ImageFont
  grid = np.asarray(grid)
  stages, ticks = grid.shape
  repeats = _repeats(grid, microbatches)
  layout = _png_layout(stages, ticks, microbatches, repeats, cell)
  image = Image.new("RGB", layout["size"], "white")
  draw = ImageDraw.Draw(image)
  font = ImageFont.load_default()
  draw.text((PNG_LEFT, 9), schedule_title(grid, microbatches), font=font, fill=(0, 0, 0))
  _draw_cells(image, draw, grid, microbatches, repeats, cell, font)
  _draw_axes(image, draw, stages, ticks, cell, font)
  _draw_legend(image, draw, layout, microbatches, repeats, cell, font)
  image.save(path, format="PNG")
