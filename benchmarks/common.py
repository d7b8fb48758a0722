"""What every benchmark shares: its command line, one timed block, the JSON it writes."""

import argparse
import json
import pathlib
import time
from collections.abc import Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parser(doc: str, *, config: str, out: str, rounds: int = 5,
           calls: int = 3) -> argparse.ArgumentParser:
  """--config, --set, --rounds, --calls and --out, with this benchmark's defaults."""
  p = argparse.ArgumentParser(description=doc.split("\n")[0])
  p.add_argument("--config", default=str(ROOT / "configs" / config))
  p.add_argument("--set", action="append", default=[], help="config overrides, key=value")
  p.add_argument("--rounds", type=int, default=rounds, help="interleaved timing rounds")
  p.add_argument("--calls", type=int, default=calls, help="calls per timed block")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / out))
  return p


def time_block(fn: Callable, calls: int) -> float:
  """Seconds per call of `fn()` (which returns a jax.Array), after one untimed call."""
  fn().block_until_ready()
  start = time.perf_counter()
  for _ in range(calls):
    out = fn()
  out.block_until_ready()
  return (time.perf_counter() - start) / calls


def write_json(path: str, result: dict) -> None:
  out = pathlib.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2))
  print(f"wrote {out}")
