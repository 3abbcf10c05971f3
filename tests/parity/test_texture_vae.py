"""Texture VAE parity with the official LDM KL autoencoder: golden `vae_tiny`, sizes from its config.json.

The fixtures are NCHW; everything is moved to NHWC at the boundary. One jitted encoder and one jitted decoder
(the posterior mean and the inference latent share a shape) serve every test.
"""
import jax
import numpy as np
import pytest

from sfd_jax.convert.texture_vae import load_texture_vae
from sfd_jax.models.layers import posterior_std
from sfd_jax.models.texture_vae import denormalize_texture, to_uint8
from tests.golden import load_golden, nchw_to_nhwc

ATOL = 1e-4  # golden README, "VAE"; an independent float64 port is within 2e-6 (posterior) and 1.4e-5 (decoded).
UINT8_FLIP_FRACTION = 5e-3  # pixels whose 127.5·x + 128 lies within float32 noise of an integer may differ by 1


@pytest.fixture(scope="module")
def golden():
  config, arrays = load_golden("vae_tiny")
  return config, arrays["state_dict"], arrays["vae"]


@pytest.fixture(scope="module")
def vae(golden):
  """(model, variables, encode, decode): the official weights with the two halves jitted once."""
  config, state_dict, _ = golden
  model, variables = load_texture_vae(config["encoder_decoder_kwargs"], config["autoencoder_kwargs"]["embed_dim"],
                                      state_dict)

  @jax.jit
  def encode(images):
    return model.apply(variables, images, method=model.moments), model.apply(variables, images, method=model.encode)

  decode = jax.jit(lambda latents: model.apply(variables, latents, method=model.decode))
  return model, variables, encode, decode


@pytest.fixture(scope="module")
def encoded(golden, vae):
  moments, (mean, logvar) = vae[2](nchw_to_nhwc(golden[2]["image"]))
  return np.asarray(moments), np.asarray(mean), np.asarray(logvar)


def _check(name, got, want, atol=ATOL):
  err = np.abs(np.asarray(got, np.float64) - want).max()
  assert got.shape == want.shape, f"{name}: shape {got.shape} != golden {want.shape}"
  assert err <= atol, f"{name}: max |error| {err:.3g} > {atol}"


def test_moments(golden, encoded):
  _check("moments", encoded[0], nchw_to_nhwc(golden[2]["moments"]))


def test_posterior(golden, encoded):
  ref = golden[2]
  _, mean, logvar = encoded
  _check("posterior_mean", mean, nchw_to_nhwc(ref["posterior_mean"]))
  _check("posterior_logvar", logvar, nchw_to_nhwc(ref["posterior_logvar"]))
  _check("posterior_std", np.asarray(posterior_std(logvar)), nchw_to_nhwc(ref["posterior_std"]))


@pytest.fixture(scope="module")
def decoded(golden, vae):
  """Decoder output of the official posterior mean, so decoder error is measured on its own."""
  return np.asarray(vae[3](nchw_to_nhwc(golden[2]["posterior_mean"])))


def test_decoded_mean(golden, decoded):
  _check("decoded_mean", decoded, nchw_to_nhwc(golden[2]["decoded_mean"]))


def test_encode_decode_chain(golden, vae, encoded):
  _check("decode(encode(image))", np.asarray(vae[3](encoded[1])), nchw_to_nhwc(golden[2]["decoded_mean"]))


def test_uint8(golden, decoded):
  want = golden[2]["decoded_uint8_nhwc"]
  # The formula alone is exact: the official float image gives the official bytes.
  np.testing.assert_array_equal(np.asarray(to_uint8(nchw_to_nhwc(golden[2]["decoded_mean"]))), want)
  got = np.asarray(to_uint8(decoded))
  assert got.dtype == np.uint8 and got.shape == want.shape
  diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
  flips = int((diff > 0).sum())
  assert diff.max() <= 1, f"uint8 differs by up to {diff.max()}"
  assert flips <= UINT8_FLIP_FRACTION * diff.size, f"{flips} of {diff.size} uint8 values differ by 1"


def test_inference_decode_chain(golden, vae):
  ref = golden[2]
  mean, std = ref["pipe_latent_mean"], ref["pipe_latent_std"]
  composite = nchw_to_nhwc(ref["pipe_latent_composite"])
  latents = denormalize_texture(composite, mean, std, float(ref["pipe_latent_multiplier"]),
                                texture_channels=mean.size)
  official = (ref["pipe_latent_composite"][:, :mean.size] * std / ref["pipe_latent_multiplier"] + mean)
  _check("denormalised latent", np.asarray(latents), nchw_to_nhwc(official), atol=1e-6)
  _check("pipe_decoded", np.asarray(vae[3](latents)), nchw_to_nhwc(ref["pipe_decoded"]))
