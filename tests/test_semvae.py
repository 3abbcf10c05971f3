"""SemVAE: sizes of the paper's configuration, shapes, posterior sampling, and a numerical gradient check."""
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import enable_x64
from jax.test_util import check_grads

from sfd_jax.models.layers import posterior_sample
from sfd_jax.models.semvae import SemVAE


def test_paper_configuration_has_29m_parameters_per_side():
  model = SemVAE()  # Table 7: DINOv2-B features (768), hidden 768, 4+4 blocks, 6 heads, 16 channels
  shapes = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())["params"]
  counts = {side: sum(math.prod(x.shape) for x in jax.tree.leaves(shapes[side])) for side in ("encoder", "decoder")}
  assert 28.5e6 < counts["encoder"] < 29.5e6 and 28.5e6 < counts["decoder"] < 29.5e6, counts
  assert shapes["encoder"]["proj_out"]["kernel"].shape == (768, 32)
  assert shapes["decoder"]["proj_out"]["kernel"].shape == (768, 768)


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
