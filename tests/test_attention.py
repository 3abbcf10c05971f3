"""The one attention function: the TPU kernels (run as jaxpr by Pallas' interpreter) against XLA's attention, and
which implementation each platform's lowering gets."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfd_jax import sharding as shd
from sfd_jax.models import layers, tpu_attention

MESH = shd.make_mesh(1, 1)


def _xla(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, implementation="xla")


@pytest.mark.parametrize("shape", [(2, 256, 2, 72), (2, 261, 3, 64)], ids=["dit_xl_heads", "dinov2_tokens"])
def test_kernels_match_xla_attention_and_its_gradients(shape):
  """Forward and all three input gradients in float32 (the kernels' arithmetic on any platform)."""
  q, k, v, w = (jax.random.normal(key, shape, jnp.float32) for key in jax.random.split(jax.random.key(0), 4))
  kernel = shd.traced_with_mesh(MESH, lambda q, k, v: tpu_attention.attention(q, k, v, interpret=True))
  loss = lambda fn: jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))
  (value, grads), (ref_value, ref_grads) = loss(kernel)(q, k, v), loss(_xla)(q, k, v)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, atol=2e-5 * float(jnp.abs(want).max()), rtol=0)


def test_bfloat16_kernel_is_close():
  q, k, v = (jax.random.normal(key, (2, 256, 2, 72), jnp.bfloat16) for key in jax.random.split(jax.random.key(1), 3))
  kernel = shd.traced_with_mesh(MESH, lambda q, k, v: tpu_attention.attention(q, k, v, interpret=True))
  got = jax.jit(kernel)(q, k, v).astype(jnp.float32)
  want = _xla(*(x.astype(jnp.float32) for x in (q, k, v)))
  assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-2


def _lowered(fn, platform):
  q = jax.ShapeDtypeStruct((2, 256, 2, 72), jnp.bfloat16)
  return jax.jit(fn).trace(q).lower(lowering_platforms=(platform,)).as_text()


def test_each_platform_gets_its_implementation():
  """TPU: the Pallas kernels (forward and backward) when a mesh is in context; CPU, or no mesh: XLA's."""
  attend = lambda q: layers.attention(q, q, q)
  train = lambda q: jax.grad(lambda q: jnp.sum(attend(q).astype(jnp.float32) ** 2))(q)
  assert _lowered(shd.traced_with_mesh(MESH, train), "tpu").count("tpu_custom_call") == 2
  assert "tpu_custom_call" not in _lowered(shd.traced_with_mesh(MESH, attend), "cpu")
  assert "tpu_custom_call" not in _lowered(attend, "tpu")


def test_kernel_cost_estimate_counts_the_attention():
  """XLA's cost model must see the kernel's FLOPs: 4·N²·width per sample forward."""
  from jax.experimental import pallas as pl  # noqa: F401  (the cost estimate is a pallas_call parameter)
  q = jnp.zeros((2, 256, 2 * 72), jnp.bfloat16)
  jaxpr = jax.make_jaxpr(lambda q: tpu_attention._call(
      lambda *refs: None, (q, q, q), 1, heads=2, matmuls=2, interpret=True))(q)
  (eqn,) = [e for e in jaxpr.eqns if e.primitive.name == "pallas_call"]
  cost = eqn.params["cost_estimate"]
  assert cost.flops == 2 * 2 * 2 * 256 * 256 * 144
  assert cost.bytes_accessed == 4 * 2 * 256 * 144 * 2
