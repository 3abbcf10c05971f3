"""The pieces of the SFD objective: the offset's training times, torch-exact cosine, REPA modes, per-sample draws."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the torch extra; only the Python 3.13 tier runs without it

from sfd_jax.diffusion.loss import cosine_similarity, repa_loss, sample_draws
from sfd_jax.diffusion.schedule import Offset
from sfd_jax.diffusion.time import interpolate, sample_base_time
from sfd_jax.training.config import base_config


def test_offset_train_times_and_delta_zero():
  t = jnp.array([0.0, 0.1, 0.5, 0.9, 1.0])
  t_tex, t_sem = Offset(0.3).train_times(t)
  np.testing.assert_allclose(t_sem, np.minimum(1.3 * t, 1), atol=1e-7)
  np.testing.assert_allclose(t_tex, np.maximum(1.3 * t - 0.3, 0), atol=1e-7)
  t_tex, t_sem = Offset(0.0).train_times(t)  # synchronous flow matching
  np.testing.assert_array_equal(t_tex, t)
  np.testing.assert_array_equal(t_sem, t)
  x1, x0 = jnp.ones((5, 2, 2, 4)), jnp.zeros((5, 2, 2, 4))
  x = interpolate(x1, x0, t_tex, t_sem, semantic_channels=1)
  np.testing.assert_allclose(x[:, 0, 0, :], np.repeat(np.asarray(t)[:, None], 4, 1))


def test_cosine_matches_torch_including_zero_vectors():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(4, 6)).astype(np.float32), rng.normal(size=(4, 6)).astype(np.float32)
  a[0] = 0.0  # a fresh model's velocity is exactly zero
  ta, tb = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
  value = torch.nn.functional.cosine_similarity(ta, tb, dim=-1, eps=1e-8)
  value.sum().backward()
  np.testing.assert_allclose(cosine_similarity(a, b), value.detach().numpy(), atol=1e-6)
  ga, gb = jax.grad(lambda x, y: cosine_similarity(x, y).sum(), (0, 1))(a, b)
  np.testing.assert_allclose(ga, ta.grad.numpy(), rtol=1e-5)
  np.testing.assert_allclose(gb, tb.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_repa_modes():
  rng = np.random.default_rng(1)
  z, f = rng.normal(size=(2, 5, 3)).astype(np.float32), rng.normal(size=(2, 5, 3)).astype(np.float32)
  cos = np.mean(1 - np.sum(z * f, -1) / np.linalg.norm(z, axis=-1) / np.linalg.norm(f, axis=-1), axis=1)
  mse = np.mean((z - f) ** 2, axis=(1, 2))
  np.testing.assert_allclose(repa_loss(z, f, "cos"), cos, rtol=1e-5)
  np.testing.assert_allclose(repa_loss(z, f, "mse"), mse, rtol=1e-5)
  np.testing.assert_allclose(repa_loss(z, f, "cos_mse"), (cos + mse) / 2, rtol=1e-5)  # their mean, not their sum
  with pytest.raises(ValueError, match="repa_mode"):
    repa_loss(z, f, "l1")


def test_draws_depend_only_on_the_sample_position():
  cfg = base_config().loss
  rng = jax.random.key(3)
  x0, t, drop = sample_draws(rng, jnp.arange(8), (8, 2, 2, 4), cfg)
  x0_b, t_b, drop_b = sample_draws(rng, jnp.arange(5, 8), (3, 2, 2, 4), cfg)
  np.testing.assert_array_equal(x0[5:], x0_b)
  np.testing.assert_array_equal(t[5:], t_b)
  np.testing.assert_array_equal(drop[5:], drop_b)


def test_time_and_dropout_distributions():
  n = 200_000
  t = np.asarray(sample_base_time(jax.random.key(0), (n,), "logit_normal", 0.0, 1.0))
  logit = np.log(t / (1 - t))
  assert abs(logit.mean()) < 0.01 and abs(logit.std() - 1) < 0.01
  u = np.asarray(sample_base_time(jax.random.key(0), (n,), "uniform"))
  assert abs(u.mean() - 0.5) < 0.005 and u.min() >= 0 and u.max() < 1
  cfg = ml_collections.ConfigDict(dict(base_config().loss))
  _, _, drop = sample_draws(jax.random.key(1), jnp.arange(20_000), (20_000, 1, 1, 1), cfg)
  assert abs(float(np.mean(drop)) - cfg.class_dropout) < 0.01
