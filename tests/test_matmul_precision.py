"""model.matmul_precision: every matmul and convolution of the DiT (dense, conv, attention: XLA's and the Pallas
kernels, forward and gradients) and of the texture VAE carries it, in the jaxpr and in the HLO a TPU compiler
receives; 'highest' computes float32 products (a float64 reference to float32 rounding).

CPU computes float32 matmuls exactly whatever the precision, so the values cannot tell the precisions apart here:
what a TPU or GPU does with them is what the program it receives says, checked in its jaxpr and TPU lowering.
"""
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sfd_jax import sharding as shd
from sfd_jax.models import dit, layers
from sfd_jax.models.texture_vae import AutoencoderKL
from tests.programs import matmuls, tpu_kernel_calls, tpu_slice

TINY = dict(input_size=4, patch_size=2, hidden_size=64, depth=2, num_heads=2, num_classes=10, repa_depth=1,
            repa_projector_dim=32, repa_z_dim=16)
VAE = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=32, z_channels=8, embed_dim=8)
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other test processes may hold libtpu
EXPECTED = {"default": None, "high": (jax.lax.Precision.HIGH,) * 2, "highest": (jax.lax.Precision.HIGHEST,) * 2}
# Inside the Pallas kernels: Mosaic has no three-pass float32 matmul, so 'high' asks for 'highest' there.
IN_KERNELS = {**EXPECTED, "high": EXPECTED["highest"]}


@pytest.fixture(autouse=True)
def platform_default_precision():
  """The tests' global 'highest' (conftest) off, so that a model's 'default' shows as what it is."""
  with jax.default_matmul_precision(None):
    yield


def _dit_training_jaxpr(precision, attention):
  """The gradient of a loss of the tiny DiT's velocity and REPA output: the matmuls of a train step."""
  model = dit.lightningdit("S", **TINY, matmul_precision=precision, attention=attention)
  x, t, _, y = model.dummy_inputs(2)
  params = jax.eval_shape(model.clone(attention="xla").init, jax.random.key(0), x, t, t, y)["params"]

  def loss(params):
    v, z = model.apply({"params": params}, x, t, t, y, return_repa=True)
    return jnp.sum(v ** 2) + jnp.sum(z ** 2)
  return jax.make_jaxpr(shd.traced_with_mesh(shd.make_mesh(1, 1), jax.grad(loss)))(params).jaxpr


@pytest.mark.parametrize("precision", sorted(EXPECTED))
@pytest.mark.parametrize("attention", ["xla", "pallas"])
def test_every_dit_matmul_and_its_gradient_carries_the_precision(precision, attention):
  found = list(matmuls(_dit_training_jaxpr(precision, attention)))
  assert {name for name, *_ in found} == {"dot_general", "conv_general_dilated"} and len(found) > 40
  assert any(in_kernel for *_, in_kernel in found) == (attention == "pallas")
  # The Pallas kernels' RoPE rotation multiplies bfloat16 halves of a float32 (exact at the MXU's native pass).
  float32 = [(p, in_kernel) for _, dtype, p, in_kernel in found if dtype != jnp.bfloat16]
  assert float32 and all(p == (IN_KERNELS if in_kernel else EXPECTED)[precision] for p, in_kernel in float32), (
      sorted(set(map(str, float32))))


@pytest.mark.parametrize("precision", sorted(EXPECTED))
def test_every_vae_convolution_and_attention_matmul_carries_the_precision(precision):
  vae = AutoencoderKL(**VAE, matmul_precision=precision)
  params = jax.eval_shape(vae.init, jax.random.key(0), *vae.dummy_inputs())
  latents = jnp.zeros((1, 16, 16, 8))
  found = list(matmuls(jax.make_jaxpr(lambda p: vae.apply(p, latents, method=vae.decode))(params).jaxpr))
  found += matmuls(jax.make_jaxpr(lambda p: vae.apply(p, *vae.dummy_inputs(), method=vae.encode))(params).jaxpr)
  assert {name for name, *_ in found} == {"dot_general", "conv_general_dilated"}
  assert all(p == EXPECTED[precision] for _, _, p, _ in found)


def test_the_tpu_compiler_receives_highest_on_every_dot_and_convolution():
  """The StableHLO lowered for TPU (what XLA's TPU compiler gets) of the DiT's forward pass."""
  model = dit.lightningdit("S", **TINY, matmul_precision="highest")
  params = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs(2))
  text = jax.jit(model.apply).trace(params, *model.dummy_inputs(2)).lower(lowering_platforms=("tpu",)).as_text()
  ops = [line for line in text.splitlines() if re.search(r"stablehlo\.(dot_general|convolution)", line)]
  assert len(ops) > 10
  for line in ops:
    assert re.search(r"precision = \[HIGHEST, HIGHEST\]|precision_config = \[#stablehlo<precision HIGHEST>, "
                     r"#stablehlo<precision HIGHEST>\]", line), line


@pytest.mark.parametrize("precision", sorted(EXPECTED))
def test_the_tpu_kernel_compiler_takes_every_precision(precision):
  """The Pallas kernels, forward and backward, float32, compiled for a v5e slice by libtpu (Mosaic refuses a
  float32 matmul precision it does not have)."""
  mesh = shd.make_mesh(4, 1, devices=tpu_slice())
  qkv = jax.ShapeDtypeStruct((4, 64, 3 * 64), jnp.float32, sharding=NamedSharding(mesh, P(shd.BATCH_AXES)))
  cos, sin = layers.rope_2d(32, 8)
  weights = jnp.ones((32,), jnp.float32)

  def loss(qkv):
    with layers.matmul_precision(precision):
      out = layers.attention(qkv, 2, (weights, weights, cos, sin), implementation="pallas", precision=precision)
    return jnp.sum(out ** 2)
  compiled = jax.jit(shd.traced_with_mesh(mesh, jax.grad(loss))).trace(qkv).lower().compile()
  assert tpu_kernel_calls(compiled) == 2


def test_highest_is_float32_arithmetic():
  """A dense layer and the attention at 'highest' against float64 numpy, to float32 rounding."""
  rng = np.random.default_rng(0)
  x, w, b = rng.normal(size=(4, 96)), rng.normal(size=(96, 48)) / 10, rng.normal(size=48)
  with layers.matmul_precision("highest"):
    got = nn.Dense(48).apply({"params": {"kernel": jnp.float32(w), "bias": jnp.float32(b)}}, jnp.float32(x))
  np.testing.assert_allclose(got, x @ w + b, rtol=2e-6, atol=2e-6 * np.abs(x @ w).max())

  heads, qkv = 2, rng.normal(size=(2, 16, 3 * 2 * 8))
  with layers.matmul_precision("highest"):
    got = layers.attention(jnp.float32(qkv), heads, implementation="xla", precision="highest")
  q, k, v = qkv.reshape(2, 16, 3, heads, 8).transpose(2, 0, 3, 1, 4)
  s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(8)
  p = np.exp(s - s.max(-1, keepdims=True))
  want = ((p / p.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(2, 16, -1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_an_unknown_precision_is_refused():
  with pytest.raises(ValueError, match="matmul_precision 'float32' is not one of"):
    layers.matmul_precision("float32")
