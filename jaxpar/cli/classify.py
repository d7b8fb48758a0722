"""`scripts/run.py classify`: sharded CNN image classification of image files or a seeded batch,
timed per batch, optionally checked against one device."""

import os
import time

from jaxpar import config as config_lib
from jaxpar import distributed
from jaxpar.cli import prologue, report
from jaxpar.cli.prologue import say


def add_parser(commands) -> None:
  sub = prologue.add_command(commands, "classify", "sharded CNN image classification",
                             "configs/cnn.yaml")
  prologue.add_verify_option(sub)
  sub.add_argument("--images", metavar="DIR|FILE",
                   help="classify the .png/.jpg files of DIR, or one FILE (default: a seeded "
                        "random batch)")
  sub.add_argument("--save-logits", metavar="OUT.npy",
                   help="write float32 logits [N, classes] (batch padding removed)")


def run(args, config: config_lib.Config) -> dict:
  import numpy as np

  from jaxpar.rules import Rules
  from jaxpar.runtime import vision

  mesh = prologue.open_mesh(config, args)
  vision.check_layout(config, mesh, Rules(config.rules))
  files, images = [], None
  if args.images:
    files = vision.list_images(args.images)
    images = vision.load_images(files, config)  # every file decoded before compiling
  prologue.say_mesh(mesh)
  c = config.section("cnn")
  say(f"model: ResNet image_size={c.image_size} in_channels={c.in_channels} "
      f"width={c.width} stages={c.stages} blocks={c.blocks} classes={c.num_classes}; "
      f"batch {config.run.batch}")
  clf = _build(config, mesh)
  work = _work(args, config, files, images)
  compiled = report.compile_report(clf, clf.images(work[0][0]), clf.params)
  logits, result = _classify(config, clf, work)
  logits = np.concatenate(logits) if files else logits[0]
  result = {**prologue.header("classify", mesh), **compiled, **result}
  if files:
    result["predictions"] = _predictions(files, logits)
  first, n = work[0]
  result.update(report.verify(
      args, config, logits[:n], lambda: vision.reference_logits(clf, first)[:n],
      over=f"the first batch's logits {list(logits[:n].shape)}"))
  if args.save_logits:
    report.save_npy(args.save_logits, logits.astype(np.float32), "logits")
  return result


def _build(config: config_lib.Config, mesh):
  """The sharded classifier, its parameters said."""
  from jaxpar import inspect
  from jaxpar.runtime import vision
  clf, seconds = prologue.timed_build(vision.build, config, mesh)
  say(f"parameters initialised sharded in {seconds:.2f} s")
  say(inspect.format_params(inspect.param_table(clf.params, clf.names, clf.rules, mesh)))
  return clf


def _work(args, config: config_lib.Config, files: list, images) -> list:
  """[(images, n real ones)] per batch: the loaded files, else seeded images run.iters times."""
  from jaxpar.runtime import vision
  batch = config.run.batch
  if images is None:
    work = [(vision.seeded_images(config), batch)] * config.run.iters
    say(f"{config.run.iters} batches of {batch} seeded random images")
    return work
  work = list(vision.batches(images, batch))
  say(f"{len(files)} images from {args.images} in {len(work)} batches of {batch}")
  return work


def _classify(config: config_lib.Config, clf, work: list) -> tuple[list, dict]:
  """Each batch's logits (padding rows dropped) after the warm-up, and the timings."""
  batch, warmup = config.run.batch, config.run.warmup
  for _ in range(warmup):
    clf(clf.images(work[0][0])).block_until_ready()
  logits, seconds = [], 0.0
  for i, (chunk, n) in enumerate(work):
    start = time.perf_counter()
    out = clf(clf.images(chunk))
    out.block_until_ready()
    took = time.perf_counter() - start
    seconds += took
    logits.append(distributed.to_host(out)[:n])
    padding = f" + {batch - n} padding" if n < batch else ""
    say(f"batch {i + 1}/{len(work)}: {n} images{padding} in {took * 1e3:.2f} ms")
  n_images = sum(n for _, n in work)
  say(f"classify: {n_images / seconds:,.1f} images/s ({n_images} images, {len(work)} batches, "
      f"after {warmup} warm-up)")
  return logits, {"images": n_images, "batches": len(work), "step_s": seconds / len(work),
                  "images_per_s": n_images / seconds}


def _predictions(files: list, logits) -> dict:
  """{file name: class}, each said."""
  top = logits.argmax(-1)
  for path, k in zip(files, top):
    say(f"{os.path.basename(path)}: class {k}")
  return {os.path.basename(p): int(k) for p, k in zip(files, top)}
