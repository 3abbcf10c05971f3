"""The one attention function: the TPU kernels (run as jaxpr by Pallas' interpreter) against the XLA path, with
and without the DiT's QK-norm and RoPE, and which implementation each platform's lowering gets."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfd_jax import sharding as shd
from sfd_jax.models import dit, layers, tpu_attention

MESH = shd.make_mesh(1, 1)


def _xla(qkv, heads, norm_rope):
  """layers.attention without a mesh in context: XLA's attention, norm and RoPE (what the parity tests check)."""
  return layers.attention(qkv, heads, norm_rope)


def _inputs(n, heads, head_dim, norm, dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  qkv = jax.random.normal(keys[0], (2, n, 3 * heads * head_dim), dtype)
  w = jax.random.normal(keys[1], (2, n, heads * head_dim), jnp.float32)
  if not norm:
    return qkv, w, None
  grid = int(round(n ** 0.5))
  cos, sin = layers.rope_2d(head_dim, grid)
  weights = 1 + 0.1 * jax.random.normal(keys[2], (2, head_dim))
  return qkv, w, (weights[0], weights[1], cos, sin)


@pytest.mark.parametrize("n, heads, head_dim, norm", [(256, 2, 72, True), (261, 3, 64, False)],
                         ids=["dit_xl_heads_qknorm_rope", "dinov2_tokens"])
def test_kernels_match_the_xla_path_and_its_gradients(n, heads, head_dim, norm):
  """Forward and the gradients of qkv and of the norm weights, in float32 (the kernels' arithmetic anywhere)."""
  qkv, w, norm_rope = _inputs(n, heads, head_dim, norm)
  weights = norm_rope[:2] if norm else ()

  def loss(fn):
    def f(qkv, *weights):
      nr = (*weights, *norm_rope[2:]) if norm else None
      return jnp.sum(fn(qkv, nr) * w)
    return jax.jit(jax.value_and_grad(f, argnums=tuple(range(1 + len(weights)))))(qkv, *weights)

  kernel = shd.traced_with_mesh(MESH, lambda qkv, nr: tpu_attention.attention(qkv, heads, nr, interpret=True))
  (value, grads), (ref_value, ref_grads) = loss(kernel), loss(lambda qkv, nr: _xla(qkv, heads, nr))
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, atol=2e-5 * float(jnp.abs(want).max()), rtol=0)


def test_bfloat16_kernel_is_close():
  qkv, _, norm_rope = _inputs(256, 2, 72, True, jnp.bfloat16, seed=1)
  kernel = shd.traced_with_mesh(MESH, lambda qkv: tpu_attention.attention(qkv, 2, norm_rope, interpret=True))
  got = jax.jit(kernel)(qkv).astype(jnp.float32)
  want = _xla(qkv.astype(jnp.float32), 2, norm_rope)
  assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-2


def test_rope_rotation_matrix():
  x = np.arange(8, dtype=np.float32)[None]
  np.testing.assert_array_equal(x @ tpu_attention.rotation(8), [[-1, 0, -3, 2, -5, 4, -7, 6]])


def _lowered(fn, platform):
  qkv = jax.ShapeDtypeStruct((2, 256, 3 * 144), jnp.bfloat16)
  return jax.jit(fn).trace(qkv).lower(lowering_platforms=(platform,)).as_text()


def test_each_platform_gets_its_implementation():
  """TPU: the Pallas kernels (forward and backward) when a mesh is in context; CPU, or no mesh: XLA's."""
  attend = lambda qkv: layers.attention(qkv, 2)
  train = lambda qkv: jax.grad(lambda qkv: jnp.sum(attend(qkv).astype(jnp.float32) ** 2))(qkv)
  assert _lowered(shd.traced_with_mesh(MESH, train), "tpu").count("tpu_custom_call") == 2
  assert "tpu_custom_call" not in _lowered(shd.traced_with_mesh(MESH, attend), "cpu")
  assert "tpu_custom_call" not in _lowered(attend, "tpu")


@pytest.mark.parametrize("attention, kernels", [("xla", 0), ("pallas", 2), ("auto", 2)])
def test_model_attention_chooses_what_a_tpu_train_step_runs(attention, kernels):
  """model.attention='xla' is the way back: a DiT's train step lowered for TPU then has no kernel at all."""
  model = dit.lightningdit("S", input_size=16, hidden_size=144, depth=1, num_heads=2, num_classes=10, repa_depth=1,
                           repa_projector_dim=32, repa_z_dim=16, dtype="bfloat16", attention=attention)
  x, t, _, y = model.dummy_inputs(2)
  params = jax.eval_shape(model.clone(attention="xla").init, jax.random.key(0), x, t, t, y)

  def step(params):
    return jax.grad(lambda p: jnp.sum(model.apply(p, x, t, t, y) ** 2))(params)
  text = jax.jit(shd.traced_with_mesh(MESH, step)).trace(params).lower(lowering_platforms=("tpu",)).as_text()
  assert text.count("tpu_custom_call") == kernels


def _xla_flops(fn, *args):
  return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def test_kernel_cost_estimate_counts_the_attention():
  """XLA's cost model must see the kernels: their estimates against XLA's own count of the same products written
  as einsums (2 samples, 256 tokens, 2 heads of 72). Forward: q·kᵀ and p·v; backward: the scores recomputed and
  the vjp of both products; QK-norm/RoPE: x·R for q and k in two parts (4 products), backward recomputed and their
  vjp. Bytes: qkv and the output read and written (backward: qkv, the output's cotangent and d(qkv))."""
  b, n, heads, hd = 2, 256, 2, 72
  q = jax.ShapeDtypeStruct((b, n, heads, hd), jnp.float32)
  probs = jax.ShapeDtypeStruct((b, heads, n, n), jnp.float32)
  rotation = jax.ShapeDtypeStruct((hd, hd), jnp.float32)
  scores = lambda q, k: jnp.einsum("bqhd,bkhd->bhqk", q, k)
  mix = lambda p, v: jnp.einsum("bhqk,bkhd->bqhd", p, v)
  rotate = lambda x, r: jnp.einsum("bnhd,de->bnhe", x, r)
  forward = _xla_flops(scores, q, q) + _xla_flops(mix, probs, q)
  backward = (_xla_flops(scores, q, q) + _xla_flops(lambda q, k, ds: jax.vjp(scores, q, k)[1](ds), q, q, probs)
              + _xla_flops(lambda p, v, do: jax.vjp(mix, p, v)[1](do), probs, q, q))
  rope = 4 * _xla_flops(rotate, q, rotation)
  rope_backward = rope + 4 * _xla_flops(lambda x, r, g: jax.vjp(lambda x: rotate(x, r), x)[1](g), q, rotation, q)
  assert forward == 2 * 2 * 2 * 2 * 256 * 256 * 72  # by hand: samples, heads, products, 2 per multiply-add, n², hd

  qkv = jax.ShapeDtypeStruct((b, n, 3 * heads * hd), jnp.bfloat16)
  cost = lambda backward, norm: tpu_attention._cost(qkv, heads=heads, backward=backward, norm=norm)
  assert cost(False, False).flops == forward and cost(True, False).flops == backward
  assert cost(False, True).flops == forward + rope and cost(True, True).flops == backward + rope_backward
  assert cost(False, False).transcendentals == b * heads * n * n  # one exponential per score
  qkv_bytes, out_bytes = b * n * 3 * heads * hd * 2, b * n * heads * hd * 2
  assert cost(False, False).bytes_accessed == qkv_bytes + out_bytes
  assert cost(True, False).bytes_accessed == 2 * qkv_bytes + out_bytes
  jaxpr = jax.make_jaxpr(shd.traced_with_mesh(MESH, lambda qkv: tpu_attention.attention(qkv, 2)))(qkv)
  assert "cost_estimate" in str(jaxpr)
