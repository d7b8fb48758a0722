"""The CNN classifier: sharded logits equal one device for data, channel and spatial layouts
and their combinations; the compiled HLO holds the minimum of collectives (none for data
parallel, one all-reduce per block for channels, halo collective-permutes and no gather of an
image for strips); `classify` runs on a folder of images and stops on bad input in one line."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from jaxpar import cli, inspect
from jaxpar import config as config_lib
from jaxpar.mesh import make_mesh
from jaxpar.runtime import vision

SPATIAL = ["rules.height=stage"]
# (data, stage, model, overrides): data only, channels over model, image strips over stage,
# strips over stage and columns over model (2-D spatial), and combinations.
LAYOUTS = [
    (8, 1, 1, []), (1, 1, 4, []), (2, 1, 4, []), (1, 4, 1, SPATIAL), (1, 8, 1, SPATIAL),
    (2, 2, 2, SPATIAL), (1, 2, 4, SPATIAL),
    (1, 2, 4, SPATIAL + ["rules.width=model", "rules.filters=null"]),
]


@pytest.fixture(scope="session")
def cnn_tiny(root) -> config_lib.Config:
  """configs/cnn_tiny.yaml: 16x16 RGB, widths 8 and 16, one block per stage."""
  return config_lib.load(root / "configs" / "cnn_tiny.yaml")


def build(config, devices, data, stage, model, overrides=(), params=None):
  config = config_lib.apply_overrides(
      config, [f"mesh.data={data}", f"mesh.stage={stage}", f"mesh.model={model}", *overrides])
  mesh = make_mesh(config.mesh, devices=devices[:data * stage * model])
  return vision.build(config, mesh, params=params)


@pytest.fixture(scope="module")
def single(cnn_tiny, devices):
  """Seeded params, images and logits on one device (the reference for every layout)."""
  clf = build(cnn_tiny, devices, 1, 1, 1)
  images = vision.seeded_images(cnn_tiny)
  return jax.device_get(clf.params), images, np.asarray(clf(clf.images(images)))


@pytest.fixture(scope="module")
def compiled(cnn_tiny, devices, single):
  """{layout: (classifier, compiled)} built from the reference params, compiled once."""
  params, images, _ = single
  cache = {}

  def get(data, stage, model, overrides=()):
    key = (data, stage, model, tuple(overrides))
    if key not in cache:
      clf = build(cnn_tiny, devices, data, stage, model, overrides, params=params)
      cache[key] = clf, clf.compile(clf.images(images))
    return cache[key]
  return get


def test_logits_are_not_trivial(cnn_tiny, single):
  _, _, logits = single
  assert logits.shape == (cnn_tiny.run.batch, cnn_tiny.section("cnn").num_classes)
  assert np.abs(logits).max() > 0.3
  assert np.ptp(logits, axis=0).max() > 1e-3  # images give different logits


@pytest.mark.parametrize("data,stage,model,overrides", LAYOUTS)
def test_sharded_logits_equal_single_device(single, compiled, data, stage, model, overrides):
  _, images, expected = single
  clf, _ = compiled(data, stage, model, overrides)
  logits = clf(clf.images(images))
  assert logits.sharding.spec == jax.sharding.PartitionSpec(("data", "expert"), None)
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=1e-5)


def test_seeded_init_does_not_depend_on_the_mesh(cnn_tiny, devices, single):
  params, _, _ = single
  clf = build(cnn_tiny, devices, 2, 2, 2, SPATIAL)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(jax.device_get(clf.params))):
    np.testing.assert_array_equal(a, b)


def census(compiled, *layout):
  return inspect.hlo_census(compiled(*layout)[1].as_text())


def test_data_parallel_inference_has_no_collectives(compiled):
  assert census(compiled, 8, 1, 1).collectives == []


def test_channel_parallel_has_one_all_reduce_per_block(cnn_tiny, compiled):
  # Column-parallel conv1, row-parallel conv2: one all-reduce of [B/data, H, W, C] per block.
  counts = census(compiled, 2, 1, 4).counts()
  c, B = cnn_tiny.section("cnn"), cnn_tiny.run.batch // 2
  stream = [B * s * s * (c.width * 2 ** i) * 4 for i, s in enumerate([16, 8])]
  assert counts == {"all-reduce": {"count": 2, "bytes": sum(stream)}}


@pytest.mark.parametrize("data,stage,model", [(1, 4, 1), (2, 2, 2)])
def test_spatial_layout_exchanges_halos_not_images(cnn_tiny, compiled, data, stage, model):
  found = census(compiled, data, stage, model, SPATIAL)
  counts = found.counts()
  # One halo exchange per neighbour per 3x3 conv: the stem and 3 stride-1 convs need the
  # rows above and below (2 each), the stride-2 conv only the row above (1).
  assert counts["collective-permute"]["count"] == 9
  assert "all-gather" not in counts and "all-to-all" not in counts
  # All-reduces: the global average pool's [B, C] sum over strips, plus one per block when
  # the filters are split too.
  assert counts["all-reduce"]["count"] == 1 + (2 if model > 1 else 0)
  # Every permuted buffer is a few rows, never a whole image.
  B = cnn_tiny.run.batch // data
  row = B * 16 * cnn_tiny.section("cnn").width * 4  # one row of the widest-resolution stream
  assert max(x.bytes for x in found.collectives if x.kind == "collective-permute") <= row


# --- the command line -----------------------------------------------------------------------


@pytest.fixture
def no_compiling(monkeypatch):
  """Fails the test if anything reaches jax.jit: errors must come before compiling."""
  def jit(*args, **kwargs):
    raise AssertionError("jax.jit was reached before the user error was raised")
  monkeypatch.setattr(jax, "jit", jit)


BAD = [
    (["--set", "cnn.image_size=24", "--set", "mesh.stage=8", "--set", "mesh.data=1", "--set",
      "rules.height=stage"],
     "cnn.image_size=24 does not split over mesh.stage=8 (rules.height)"),
    (["--set", "cnn.width=12", "--set", "mesh.model=8", "--set", "mesh.data=1"],
     "cnn.width=12 does not split over mesh.model=8 (rules.filters)"),
    (["--set", "mesh.stage=2", "--set", "mesh.data=4"],
     "mesh.stage=2: no dim of the CNN is split over 'stage'"),
    (["--set", "run.batch=3"], "run.batch=3 does not split over mesh.data=8"),
    (["--set", "cnn.image_size=15"], "cnn.image_size=15 cannot be halved 1 times"),
    (["--set", "cnn.in_channels=4"], "cnn.in_channels=4: expected 1 (grey) or 3 (RGB)"),
    (["--set", "cnn.widht=8"], "cnn.widht: unknown key"),
    (["--images", "no/such/dir"], "--images no/such/dir: no such file or folder"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_gives_one_line_error(root, monkeypatch, capsys, no_compiling, args,
                                        message):
  monkeypatch.chdir(root)
  code = cli.main(["classify", "--config", "configs/cnn_tiny.yaml", *args])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2
  assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_unreadable_or_missing_images(root, tmp_path, capsys, no_compiling):
  config = str(root / "configs" / "cnn_tiny.yaml")
  Image.new("RGB", (20, 12), (10, 200, 30)).save(tmp_path / "a.png")
  (tmp_path / "b.jpg").write_bytes(b"not a jpeg at all")
  assert cli.main(["classify", "--config", config, "--images", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"cannot read {tmp_path / 'b.jpg'} as an image" in err[0], err
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "notes.txt").write_text("no images here")
  assert cli.main(["classify", "--config", config, "--images", str(empty)]) == 2
  assert "no .png/.jpg/.jpeg files" in capsys.readouterr().err


def test_classify_a_folder_of_images(root, tmp_path, capsys, cnn_tiny, devices):
  """5 images in batches of 4 on data=2 x stage=2 x model=2: the last batch is padded."""
  folder = tmp_path / "images"
  folder.mkdir()
  rng = np.random.default_rng(1)
  for i, (size, mode, suffix) in enumerate([((16, 16), "RGB", "png"), ((40, 30), "RGB", "jpg"),
                                            ((16, 16), "L", "png"), ((9, 23), "RGBA", "png"),
                                            ((64, 64), "RGB", "jpeg")]):
    channels = len(mode)
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(
        folder / f"img{i}.{suffix}")
  out = tmp_path / "logits.npy"
  code = cli.main(["classify", "--config", str(root / "configs" / "cnn_tiny.yaml"),
                   "--images", str(folder), "--set", "run.batch=4", "--set", "mesh.data=2",
                   "--set", "mesh.stage=2", "--set", "mesh.model=2", "--set",
                   "rules.height=stage",
                   "--verify", "--save-logits", str(out), "--json"])
  stdout = capsys.readouterr().out
  assert code == 0
  result = json.loads(stdout.strip().splitlines()[-1])
  assert result["images"] == 5 and result["batches"] == 2 and result["images_per_s"] > 0
  assert result["mesh"] == {"data": 2, "stage": 2, "expert": 1, "model": 2}
  assert result["verify_max_abs_diff"] < 1e-5
  assert "batch 2/2: 1 images + 3 padding" in stdout
  assert sorted(result["predictions"]) == [f"img{i}.{s}" for i, s in
                                           enumerate(["png", "jpg", "png", "png", "jpeg"])]
  saved = np.load(out)
  assert saved.dtype == np.float32 and saved.shape == (5, cnn_tiny.section("cnn").num_classes)
  # The same files, decoded by the library and classified on one device.
  files = vision.list_images(str(folder))
  single_config = config_lib.apply_overrides(cnn_tiny, ["run.batch=5", "mesh.data=1"])
  clf = vision.build(single_config, make_mesh(single_config.mesh, devices=devices[:1]))
  expected = np.asarray(clf(clf.images(vision.load_images(files, single_config))))
  np.testing.assert_allclose(saved, expected, rtol=0, atol=1e-5)
