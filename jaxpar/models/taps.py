"""What a block may report besides its output, while it is traced: `tap(value)` hands an
array to `run_blocks(taps=True)` (`jaxpar.models.base`), which returns it per layer. A block
asks `tapping()` first, so nothing is computed for a program that does not collect them."""

import contextlib
import contextvars

import jax

_TAPS: contextvars.ContextVar[list | None] = contextvars.ContextVar("taps", default=None)


def tapping() -> bool:
  """Whether the block being traced is asked for its taps."""
  return _TAPS.get() is not None


def tap(value: jax.Array) -> None:
  """Gives `value` to the `run_blocks(taps=True)` tracing this block (only while
  `tapping()`)."""
  _TAPS.get().append(value)


@contextlib.contextmanager
def collecting():
  """The list the blocks traced inside it tap into."""
  taps = []
  token = _TAPS.set(taps)
  try:
    yield taps
  finally:
    _TAPS.reset(token)
