"""The readable outputs of `jaxpar.inspect`: the schedule picture and grid, memory figures."""

import math
import re

import jax
import numpy as np
import pytest
from PIL import Image

from jaxpar import inspect


def circular_grid(stages: int, microbatches: int, repeats: int) -> np.ndarray:
  """Built by hand: stage s runs item t - s at tick t while 0 <= t - s < R*M."""
  ticks = repeats * microbatches + stages - 1
  grid = np.full((stages, ticks), -1, np.int64)
  for s in range(stages):
    for item in range(repeats * microbatches):
      grid[s, s + item] = item
  return grid


def expected_size(stages: int, ticks: int, microbatches: int, repeats: int) -> tuple:
  cell = inspect.PNG_CELL
  plot_w = max(ticks * cell, inspect.PNG_MIN_PLOT)
  lines = 2 + repeats * math.ceil(microbatches / (plot_w // cell))
  width = inspect.PNG_LEFT + plot_w + inspect.PNG_PAD
  height = (inspect.PNG_TOP + stages * cell + inspect.PNG_AXIS + lines * inspect.PNG_LINE
            + inspect.PNG_PAD)
  return width, height


def cell_pixels(image: Image.Image, s: int, t: int) -> np.ndarray:
  """The inside of cell (s, t), without its 1 px border."""
  cell = inspect.PNG_CELL
  x0, y0 = inspect.PNG_LEFT + t * cell, inspect.PNG_TOP + s * cell
  return np.asarray(image)[y0 + 1:y0 + cell - 2, x0 + 1:x0 + cell - 2]


@pytest.mark.parametrize("stages,microbatches,repeats", [(4, 8, 2), (2, 4, 1), (3, 30, 2)])
def test_schedule_png_size(tmp_path, stages, microbatches, repeats):
  grid = circular_grid(stages, microbatches, repeats)
  path = tmp_path / "schedule.png"
  assert inspect.save_schedule_png(grid, str(path), microbatches=microbatches) is None
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with Image.open(path) as image:
    image.load()
    assert image.format == "PNG"
    assert image.size == expected_size(stages, grid.shape[1], microbatches, repeats)
  assert inspect.PNG_CELL >= 28  # room for the cell text


def test_schedule_png_bubbles_differ_from_busy_cells(tmp_path):
  grid = circular_grid(4, 8, 2)
  path = tmp_path / "schedule.png"
  inspect.save_schedule_png(grid, str(path), microbatches=8)
  image = Image.open(path).convert("RGB")
  bubble = cell_pixels(image, 3, 0)  # stage 3 waits at tick 0
  assert grid[3, 0] == -1
  assert np.all(bubble[..., 0] == bubble[..., 1]) and np.all(bubble[..., 1] == bubble[..., 2])
  assert len(np.unique(bubble.reshape(-1, 3), axis=0)) >= 2  # hatched, not flat
  assert bubble.min() > 150  # light

  def corner(s, t):  # away from the centred text
    return cell_pixels(image, s, t)[1, 1].astype(int)

  busy = corner(0, 0)
  assert not (busy[0] == busy[1] == busy[2])  # coloured, not grey
  assert not np.array_equal(busy, corner(0, 1))  # microbatches 0 and 1 differ
  assert corner(0, 8).sum() < busy.sum()  # b0 (repeat 1) is darker than a0
  # The cell text is drawn: a busy cell holds more than its fill colour.
  assert len(np.unique(cell_pixels(image, 0, 0).reshape(-1, 3), axis=0)) > 2


def test_schedule_title_by_hand():
  stages, microbatches, repeats = 4, 8, 2
  grid = circular_grid(stages, microbatches, repeats)
  bubble = (stages - 1) / (repeats * microbatches + stages - 1)  # 3 / 19
  title = inspect.schedule_title(grid, microbatches)
  assert title == (f"pipeline: S=4 stages, M=8 microbatches, R=2 repeats, "
                   f"bubble {bubble:.1%}")
  assert "bubble 15.8%" in title
  one = inspect.schedule_title(circular_grid(2, 4, 1), 4)
  assert "S=2 stages" in one and "M=4 microbatches" in one and "R=1 repeats" in one
  assert f"bubble {1 / 5:.1%}" in one


def test_format_schedule_keeps_small_output():
  out = inspect.format_schedule(circular_grid(2, 4, 2), microbatches=4)
  assert out.splitlines() == ["tick      0  1  2  3  4  5  6  7  8",
                              "stage 0  a0 a1 a2 a3 b0 b1 b2 b3  .",
                              "stage 1   . a0 a1 a2 a3 b0 b1 b2 b3"]


# (17, 9, 1): one-character cells, so the columns must widen for the two-digit ticks.
@pytest.mark.parametrize("stages,microbatches,repeats", [(4, 22, 1), (4, 11, 2), (17, 9, 1)])
def test_format_schedule_header_aligns_with_25_ticks(stages, microbatches, repeats):
  grid = circular_grid(stages, microbatches, repeats)
  assert grid.shape[1] == 25
  header, *rows = inspect.format_schedule(grid, microbatches=microbatches).splitlines()
  numbers = [(int(m.group()), m.end()) for m in re.finditer(r"\d+", header)]
  assert [n for n, _ in numbers] == list(range(25))
  assert len({len(header)} | {len(r) for r in rows}) == 1
  for s, row in enumerate(rows):
    cells = [(m.group(), m.end()) for m in re.finditer(r"\S+", row)][2:]  # past "stage s"
    assert len(cells) == 25
    # Right-aligned: each number ends where its column's cell ends.
    assert [end for _, end in cells] == [end for _, end in numbers]
    for t, (text, _) in enumerate(cells):
      item = grid[s, t]
      if item < 0:
        assert text == "."
      else:
        assert text.endswith(str(item % microbatches))


def test_memory_peak_covers_the_buffers_and_format_says_so():
  x = np.ones((64, 64), np.float32)
  compiled = jax.jit(lambda x: (x @ x.T).sum()).lower(x).compile()
  mem = inspect.memory(compiled)
  assert mem["argument"] == x.nbytes
  assert mem["output"] == 4
  live = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
  assert mem["peak"] >= live
  assert mem["peak"] == max(mem["xla_peak"], live)
  line = inspect.format_memory(mem)
  assert line.startswith("per device: ")
  assert f"arguments {inspect.human(mem['argument'])} (parameters and inputs)" in line
  assert f"outputs {inspect.human(mem['output'])}" in line
  assert f"temporaries {inspect.human(mem['temp'])}" in line
  assert f"total live at most {inspect.human(live)}" in line


class _Stats:
  """memory_analysis() as XLA:CPU gave it to a user: peak below the temporaries."""
  argument_size_in_bytes = 1_258_291
  output_size_in_bytes = 524_288
  alias_size_in_bytes = 0
  temp_size_in_bytes = 3_460_300
  generated_code_size_in_bytes = 0
  peak_memory_in_bytes = 400_486


class _Compiled:
  def memory_analysis(self):
    return _Stats()


def test_memory_peak_never_below_temporaries():
  mem = inspect.memory(_Compiled())
  assert mem["xla_peak"] == 400_486
  assert mem["peak"] == 1_258_291 + 524_288 + 3_460_300
  assert inspect.format_memory(mem) == (
      "per device: arguments 1.2 MiB (parameters and inputs), outputs 512.0 KiB, "
      "temporaries 3.3 MiB, total live at most 5.0 MiB")


def test_format_memory_mentions_aliasing():
  mem = {"argument": 2048, "output": 1024, "alias": 1024, "temp": 0, "xla_peak": 0}
  line = inspect.format_memory(mem)
  assert "outputs 1.0 KiB (1.0 KiB of them reusing argument buffers)" in line
  assert line.endswith("total live at most 2.0 KiB")
  # A larger XLA peak would make "at most" untrue: the line reports it.
  line = inspect.format_memory({**mem, "xla_peak": 4096})
  assert line.endswith("total live at most 2.0 KiB (XLA reports a peak of 4.0 KiB)")
