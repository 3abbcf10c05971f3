"""SemVAE: the released configuration's tensors, shapes, posterior sampling, torch's MultiheadAttention, and a
numerical gradient check."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64
from jax.test_util import check_grads

from sfd_jax.convert.semvae import semvae_to_torch
from sfd_jax.models.layers import posterior_sample
from sfd_jax.models.semvae import SemVAE


def test_released_configuration_has_108_tensors_and_57_9m_parameters():
  """The released SemVAE (DINOv2-B tokens 768 → 16 channels, hidden 768, 6 heads, 4 blocks a side): its state
  dict names, and per side the sizes that follow from them."""
  model = SemVAE()
  shapes = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())
  state_dict = semvae_to_torch(model, jax.tree.map(lambda s: np.zeros(s.shape, np.int8), shapes))
  assert len(state_dict) == 108
  assert sum(math.prod(v.shape) for v in state_dict.values()) == 57_924_896
  for side, d_in, d_out in (("encoder", 768, 32), ("decoder", 16, 768)):
    assert state_dict[f"{side}.0.weight"].shape == (768, d_in)
    assert state_dict[f"{side}.4.attn.in_proj_weight"].shape == (3 * 768, 768)
    assert state_dict[f"{side}.4.mlp.0.weight"].shape == (3072, 768)
    assert state_dict[f"{side}.5.weight"].shape == (768,)  # the LayerNorm
    assert state_dict[f"{side}.6.weight"].shape == (d_out, 768)


def _tiny(**kw):
  return SemVAE(**{**dict(feature_dim=24, latent_channels=4, hidden_size=16, encoder_depth=1, decoder_depth=2,
                          num_heads=2, grid_size=3), **kw})


def test_shapes_and_sampling():
  model = _tiny()
  features = jax.random.normal(jax.random.key(0), (2, 3, 5, 24))  # a non-square grid
  variables = jax.jit(model.init)(jax.random.key(1), features)
  forward, decode = jax.jit(model.apply), jax.jit(lambda v, z: model.apply(v, z, method=model.decode))
  recon, mean, logvar = forward(variables, features)
  assert recon.shape == (2, 3, 5, 24) and mean.shape == logvar.shape == (2, 3, 5, 4)
  np.testing.assert_allclose(decode(variables, mean), recon, atol=1e-6)
  noise = jax.random.normal(jax.random.key(7), mean.shape)
  sample = posterior_sample(mean, logvar, jax.random.key(7))
  np.testing.assert_allclose(sample, mean + jnp.exp(0.5 * logvar) * noise, atol=1e-6)
  recon_s, _, _ = forward(variables, features, jax.random.key(7))
  np.testing.assert_allclose(recon_s, decode(variables, sample), atol=1e-6)


def test_gradients_match_finite_differences():
  # float64 everywhere except the softmax of jax.nn.dot_product_attention (float32): tolerance 1e-3.
  with enable_x64():
    model = _tiny(dtype=jnp.float64)
    features = jax.random.normal(jax.random.key(0), (2, 3, 3, 24), jnp.float64)
    variables = jax.tree.map(lambda p: p.astype(jnp.float64), jax.jit(model.init)(jax.random.key(1), features))

    def loss(v, f):
      recon, mean, logvar = model.apply(v, f, jax.random.key(2))
      return jnp.mean((recon - f) ** 2) + 1e-3 * jnp.mean(mean ** 2 + jnp.exp(logvar) - logvar)

    check_grads(jax.jit(loss), (variables, features), order=1, modes=("rev",), eps=1e-3, atol=1e-3, rtol=1e-3)


def test_no_positions_tokens_are_a_set():
  """No position embedding (the official module has none): permuting the tokens permutes the outputs."""
  model = _tiny()
  features = jax.random.normal(jax.random.key(0), (1, 3, 3, 24))
  variables = jax.jit(model.init)(jax.random.key(1), features)
  order = np.random.default_rng(0).permutation(9)
  permuted = features.reshape(1, 9, 24)[:, order].reshape(1, 3, 3, 24)
  forward = jax.jit(model.apply)
  recon, mean, _ = forward(variables, features)
  recon_p, mean_p, _ = forward(variables, permuted)
  np.testing.assert_allclose(mean_p.reshape(1, 9, -1), mean.reshape(1, 9, -1)[:, order], atol=1e-5)
  np.testing.assert_allclose(recon_p.reshape(1, 9, -1), recon.reshape(1, 9, -1)[:, order], atol=1e-5)


def test_inputs_of_another_width_are_refused():
  model = _tiny()
  variables = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 3, 3, 24)))
  with pytest.raises(ValueError, match=r"SemVAE expects features \(B, h, w, 24\), got \(1, 3, 3, 16\)"):
    model.apply(variables, jnp.zeros((1, 3, 3, 16)), method="encode")


def test_matmul_precision_reaches_every_matmul():
  """'highest' (float32 on TPUs and GPUs too) is the precision of each matmul of encode and decode."""
  model = _tiny(matmul_precision="highest")
  features = jnp.zeros((1, 3, 3, 24))
  variables = jax.eval_shape(model.init, jax.random.key(1), features)
  for method, x in (("encode", features), ("decode", jnp.zeros((1, 3, 3, 4)))):
    text = str(jax.make_jaxpr(lambda v, x: model.apply(v, x, method=method))(variables, x))
    dots = text.count("dot_general")
    assert dots >= 8 and text.count("precision=(Precision.HIGHEST, Precision.HIGHEST)") == dots, method
  with pytest.raises(ValueError, match="matmul_precision 'fast' is not one of"):
    _tiny(matmul_precision="fast").init(jax.random.key(0), features)
