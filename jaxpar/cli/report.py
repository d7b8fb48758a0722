"""What commands report at the end of a run: the compiled program, the check against one
device, and the arrays they save."""

import time

from jaxpar import distributed

say = distributed.say  # process 0 only


def compile_report(model, x, params) -> dict:
  """Compiles `model` for `x`, prints its collectives and per-device bytes; returns those
  figures as the JSON result's fields."""
  import jax

  from jaxpar import inspect
  from jaxpar.runtime import state
  say("compiling...")
  start = time.perf_counter()
  compiled = model.compile(x)
  compile_s = time.perf_counter() - start
  census = inspect.hlo_census(compiled.as_text())
  mem = inspect.memory(compiled)
  say(f"compiled in {compile_s:.2f} s; collectives in the compiled program:")
  say(inspect.format_census(census))
  param_bytes = state.param_bytes_per_device(params)
  total_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
  say(f"parameters: {inspect.human(param_bytes)} per device (of {inspect.human(total_bytes)} "
      f"in all)")
  say(inspect.format_memory(mem))
  return {"param_bytes_per_device": param_bytes, "param_bytes_total": total_bytes,
          "collectives": census.counts(), "memory_per_device": mem, "compile_s": compile_s}


def verify(args, config, logits, reference, *, over: str) -> dict:
  """When asked (--verify, else run.verify): says the max difference between the sharded
  `logits` and `reference()` (the same on one device), and returns it as a JSON field."""
  import numpy as np
  if not (config.run.verify if args.verify is None else args.verify):
    return {}
  diff = float(np.max(np.abs(logits - reference())))
  say(f"verify: max |sharded - single-device| = {diff:.3e} over {over}")
  return {"verify_max_abs_diff": diff}


def save_npy(path: str, array, what: str) -> None:
  """Writes `array` to exactly `path` (np.save would add .npy to a path without it), once:
  from process 0; says so."""
  import numpy as np
  if distributed.is_main():
    with open(path, "wb") as f:
      np.save(f, array)
  say(f"saved {what} {list(array.shape)} {array.dtype} to {path}")


def count(n: int, word: str) -> str:
  """'1 prompt', '3 prompts'."""
  return f"{n} {word}{'' if n == 1 else 's'}"
