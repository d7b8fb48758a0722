"""Config loading, overrides and the rule table: values and one-line errors."""

import re

import jax
import jax.numpy as jnp
import pytest

from jaxpar import axes
from jaxpar import config as config_lib
from jaxpar import config_parse
from jaxpar.config import MeshConfig
from jaxpar.errors import UserError
from jaxpar.mesh import make_mesh
from jaxpar.rules import Rules, constrain, use_rules


def test_load_and_override(root):
  config = config_lib.load(root / "configs" / "default.yaml",
                           ["model.n_layers=6", "run.verify=false", "rules.mlp=null",
                            "model.init_std=1"])
  assert config.model.n_layers == 6 and config.run.verify is False
  assert config.model.init_std == 1.0 and isinstance(config.model.init_std, float)
  assert dict(config.rules)["mlp"] is None
  assert [name for name, _ in config.rules] == [name for name, _ in axes.DEFAULT_RULES]


@pytest.mark.parametrize("n,sizes,expected", [
    (8, (-1, 1, 4), (2, 1, 1, 4)), (8, (2, 1, -1), (2, 1, 1, 4)), (8, (8, 1, 1), (8, 1, 1, 1)),
    (1, (-1, 1, 1), (1, 1, 1, 1)), (8, (1, -1, 2), (1, 4, 1, 2)),
    (8, (1, 1, 2, -1), (1, 1, 4, 2))])
def test_mesh_shape_fills_minus_one(n, sizes, expected):
  shape = MeshConfig(*sizes).shape(n)
  assert tuple(shape.values()) == expected and tuple(shape) == axes.MESH_AXES


@pytest.mark.parametrize("sizes,message", [
    ((3, 1, 1), "needs 3 devices but 8 are present"),
    ((-1, 1, 3), "mesh.data=-1 cannot fill 8 devices"),
    ((-1, -1, 1), "at most one axis may be -1")])
def test_mesh_shape_errors(sizes, message):
  with pytest.raises(UserError, match=message):
    MeshConfig(*sizes).shape(8)


def test_make_mesh_has_auto_axes(devices):
  mesh = make_mesh(MeshConfig(data=2, stage=1, model=4), devices=devices)
  assert mesh.axis_names == axes.MESH_AXES
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("raw,message", [
    ({"model": {"n_head": 4}}, "model.n_head: unknown key"),
    ({"modle": {}}, "modle: unknown config section"),
    ({"model": {"n_layers": "two"}}, r"model.n_layers='two' is a str, expected int"),
    ({"model": {"n_layers": True}}, "expected int"),
    ({"run": {"verify": 1}}, "expected bool"),
    ({"model": {"d_model": 65}}, "model.d_model=65 is not divisible by model.n_heads=4"),
    ({"mesh": {"model": 0}}, "mesh.model=0"),
    ({"rules": {"foo": "model"}}, "unknown logical name 'foo'"),
    ({"rules": {"mlp": "tensor"}}, "'tensor' is not a mesh axis"),
    ({"rules": ["batch"]}, "expected a mapping"),
    ({"serve": {"step_tokens": 8}}, r"serve.step_tokens=8: must be 0 \(no limit\) or at least "
                                    r"serve.min_bucket=16"),
    ({"serve": {"step_tokens": -1}}, "serve.step_tokens=-1"),
])
def test_bad_config_values(raw, message):
  with pytest.raises(UserError, match=message):
    config_lib.from_dict(raw)


@pytest.mark.parametrize("text", ["model", "model.n_layers", "=3", "n_layers=3"])
def test_bad_override_syntax(text):
  with pytest.raises(UserError, match="expected section.key=value"):
    config_parse.parse_override(text)


def test_rules_map_names_in_order():
  rules = Rules()
  assert rules.spec(("batch", "seq", "vocab")) == jax.sharding.PartitionSpec(
      ("data", "expert"), None, "model")
  two_axes = Rules((("batch", ("data", "stage")), ("embed", None)))
  assert two_axes.spec(("batch", "embed")) == jax.sharding.PartitionSpec(("data", "stage"),
                                                                         None)


def test_rules_report_conflicts_missing_names_and_indivisible_dims():
  rules = Rules(tuple((n, "model" if n == "embed" else t) for n, t in axes.DEFAULT_RULES))
  with pytest.raises(UserError, match="rule conflict .* 'heads' and 'embed' both map to mesh "
                                      "axis 'model'"):
    rules.spec(("heads", "head_dim", "embed"), what="w_q")
  with pytest.raises(UserError, match="logical name 'mlp' of w_up has no rule"):
    Rules((("embed", None),)).spec(("mlp", "embed"), what="w_up")
  with pytest.raises(UserError, match=r"model.n_heads=12 does not split over mesh.model=8"):
    Rules().check((12, 64), ("heads", "head_dim"), {"data": 1, "stage": 1, "expert": 1, "model": 8},
                  keys={"heads": "model.n_heads"})
  with pytest.raises(UserError, match="shape .* but 1 logical names"):
    Rules().check((12, 64), ("heads",), {"data": 1, "stage": 1, "expert": 1, "model": 1})


def test_constrain_never_silently_does_nothing(devices):
  mesh = make_mesh(MeshConfig(data=8, stage=1, model=1), devices=devices)
  x = jnp.zeros((8, 4))
  with jax.set_mesh(mesh):
    with pytest.raises(RuntimeError, match="no rule table is active"):
      jax.jit(lambda x: constrain(x, ("batch", "embed")))(x)
    with use_rules(Rules()):
      y = jax.jit(lambda x: constrain(x, ("batch", "embed")))(x)
      expected = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
      assert y.sharding.is_equivalent_to(expected, 2)
      with pytest.raises(UserError, match=r"shape \(8, 4\) but 3 logical names"):
        jax.jit(lambda x: constrain(x, ("batch", "seq", "embed")))(x)
      with pytest.raises(UserError, match="does not split over mesh.data=8"):
        jax.jit(lambda x: constrain(x, ("batch", "embed")))(jnp.zeros((6, 4)))
  with use_rules(Rules()), pytest.raises(RuntimeError, match="needs a mesh"):
    jax.jit(lambda x: constrain(x, ("batch", "embed")))(x)


def test_family_options_route_to_the_family_in_any_order(root):
  a = config_lib.load(root / "configs" / "tiny.yaml",
                      ["model.sliding_window=8", "model.family=mistral"])
  b = config_lib.load(root / "configs" / "tiny.yaml",
                      ["model.family=mistral", "model.sliding_window=8"])
  assert a == b and a.model.options.sliding_window == 8
  assert config_lib.to_dict(a)["model"]["sliding_window"] == 8


@pytest.mark.parametrize("override,message", [
    ("model.sliding_window=4", "model.sliding_window=4: model.family=gpt2 has no such option; "
                               "drop it, or pick a family that has it (llama, mistral"),
    ("model.rope_thta=2", "model.rope_thta: unknown key; known keys of 'model'"),
])
def test_a_key_the_family_lacks_is_one_line(root, override, message):
  with pytest.raises(UserError, match=re.escape(message)):
    config_lib.load(root / "configs" / "tiny.yaml", [override])
