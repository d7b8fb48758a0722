"""The stage ring (`jaxpar.parallel.ring`) equals a sequential simulation of S stages, tick by
tick, and compiles to one collective-permute per tick and no other collective."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpar import inspect
from jaxpar.config import MeshConfig
from jaxpar.mesh import make_mesh
from jaxpar.parallel import ring

B, D = 4, 8


def toy_tick(t, s, carry, msg, w):
  """Any function of the tick, the stage, the carry and the message: the ring must not care."""
  acc, seen = carry
  y = jnp.tanh(msg @ w + acc * 0.5 + (t + 1) * 0.1 - s * 0.01)
  seen = seen.at[t % seen.shape[0]].add(jnp.sum(msg))
  return (acc + y, seen), y


def simulate(w_S, x_S, ticks: int):
  """The ring run by hand: S stages in a Python loop, messages passed on after every tick."""
  S = len(w_S)
  carry = [(np.zeros((B, D), np.float32), np.zeros((3,), np.float32)) for _ in range(S)]
  msg = [x_S[s] for s in range(S)]
  for t in range(ticks):
    outs = []
    for s in range(S):
      state = tuple(jnp.asarray(c) for c in carry[s])
      new, out = toy_tick(t, s, state, jnp.asarray(msg[s]), w_S[s])
      carry[s] = tuple(np.asarray(c) for c in new)
      outs.append(np.asarray(out))
    msg = [outs[(s - 1) % S] for s in range(S)]
  return carry, msg


@pytest.mark.parametrize("data,stages,ticks", [(4, 2, 5), (2, 4, 7), (1, 8, 9), (1, 2, 1)])
def test_ring_equals_sequential_stages(devices, data, stages, ticks):
  mesh = make_mesh(MeshConfig(data=data, stage=stages, model=8 // (data * stages)),
                   devices=devices)
  rng = np.random.default_rng(stages)
  w_S = rng.normal(size=(stages, D, D)).astype(np.float32) / 3
  x_S = rng.normal(size=(stages, B, D)).astype(np.float32)

  def per_stage(w, x):
    carry = (jnp.zeros((B, D)), jnp.zeros((3,)))
    (acc, seen), msg = ring.run(lambda t, s, c, m: toy_tick(t, s, c, m, w[0]), carry, x[0],
                                ticks=ticks, stages=stages)
    return acc[None], seen[None], msg[None]

  program = jax.jit(ring.shard(per_stage, mesh=mesh, in_specs=(P("stage"), P("stage")),
                               out_specs=(P("stage"), P("stage"), P("stage"))))
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P("stage")))
  with jax.set_mesh(mesh):
    acc, seen, msg = program(put(w_S), put(x_S))
    census = inspect.hlo_census(program.lower(put(w_S), put(x_S)).compile().as_text())
  carry, last = simulate(w_S, x_S, ticks)
  for s in range(stages):
    np.testing.assert_allclose(np.asarray(acc[s]), carry[s][0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(seen[s]), carry[s][1], rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(msg[s]), last[s], rtol=0, atol=1e-5)
  assert {k: v["count"] for k, v in census.counts().items()} == {"collective-permute": 1}
  assert census.count("collective-permute", in_loop=True) == (ticks > 1)  # one scan of ticks


def test_put_touches_only_its_slot(devices):
  buffer = jnp.arange(12.0).reshape(3, 4)
  out = ring.put(buffer, 1, jnp.full((3,), -1.0), True, axis=1)
  expected = np.arange(12.0).reshape(3, 4)
  expected[:, 1] = -1
  np.testing.assert_array_equal(np.asarray(out), expected)
  kept = ring.put(buffer, 2, jnp.zeros((4,)), False)
  np.testing.assert_array_equal(np.asarray(kept), np.asarray(buffer))
  np.testing.assert_array_equal(np.asarray(ring.pick(buffer, 3, axis=1)), [3.0, 7.0, 11.0])
