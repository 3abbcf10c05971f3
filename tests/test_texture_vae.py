"""Texture VAE: official sizes, converter strictness and round trip, Lightning checkpoints, posterior and pixel helpers.

Apart from one tiny compiled model (clamp and bfloat16 checks), everything here runs on shapes (`jax.eval_shape`)
or numpy, so the file costs almost no compilation.
"""
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the torch extra; only the Python 3.13 tier runs without it

from sfd_jax.convert import ConversionError, load_state_dict, load_texture_vae, select_state_dict, texture_vae_to_torch
from sfd_jax.convert.texture_vae import texture_vae_kwargs
from sfd_jax.models.layers import posterior_sample
from sfd_jax.models.texture_vae import AutoencoderKL, denormalize_texture, to_uint8

# Official Encoder/Decoder kwargs of a tiny two-level model: widths 32 → 64, attention at nominal 16 (level 1).
TINY_KWARGS = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16], dropout=0.0,
                   resamp_with_conv=True, in_channels=3, resolution=32, z_channels=4, double_z=True, out_ch=3)
TINY_EMBED_DIM = 3


class Hyperparameters:
  """Stands for the arbitrary Python objects a Lightning checkpoint may pickle next to its weights."""


def _count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _random_params(vae, seed, scale=1.0):
  """Random float32 params shaped like `vae`'s, made in numpy (no compilation)."""
  template = jax.eval_shape(vae.init, jax.random.key(0), *vae.dummy_inputs())["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda leaf: scale * rng.standard_normal(leaf.shape).astype(np.float32), template)


def test_default_is_sd_vae_f16d32_with_official_parameter_counts():
  # Spec §4: 28.4M encoder + 41.4M decoder = 69.8M. The 1×1 quant convs (4,160 and 1,056) are below that
  # rounding, so the spec's encoder/decoder counts hold with or without them.
  vae = AutoencoderKL()
  params = jax.eval_shape(vae.init, jax.random.key(0), *vae.dummy_inputs())["params"]
  encoder, decoder = _count(params["encoder"]), _count(params["decoder"])
  quant, post_quant = _count(params["quant_conv"]), _count(params["post_quant_conv"])
  assert (quant, post_quant) == (64 * 64 + 64, 32 * 32 + 32)
  for got, want in ((encoder, 28.4e6), (encoder + quant, 28.4e6), (decoder, 41.4e6), (decoder + post_quant, 41.4e6),
                    (_count(params), 69.8e6)):
    assert abs(got - want) < 0.05e6, (got, want)
  # Nominal-resolution rule: with resolution 256 and 5 levels, attention only at level 4 (16 px) and in mid.
  attn = sorted(name for half in ("encoder", "decoder") for name in params[half] if "attn" in name)
  assert attn == ["down_4_attn_0", "down_4_attn_1", "mid_attn_1", "mid_attn_1", "up_4_attn_0", "up_4_attn_1",
                  "up_4_attn_2"]
  latent = jax.eval_shape(lambda p, x: vae.apply({"params": p}, x, method=vae.encode), params, *vae.dummy_inputs())[0]
  assert latent.shape == (1, 16, 16, 32)


@pytest.fixture(scope="module")
def tiny():
  """(model, variables, official state dict) of the tiny model with random weights: no compilation needed."""
  vae = AutoencoderKL(**texture_vae_kwargs(TINY_KWARGS), embed_dim=TINY_EMBED_DIM)
  variables = {"params": _random_params(vae, seed=0)}
  return vae, variables, texture_vae_to_torch(vae, variables)


def _assert_same_params(a, b):
  flat_a, flat_b = (flax.traverse_util.flatten_dict(flax.core.unfreeze(x)) for x in (a, b))
  assert flat_a.keys() == flat_b.keys()
  for path in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[path]), np.asarray(flat_b[path]), err_msg="/".join(path))


def test_official_names(tiny):
  state_dict = tiny[2]
  assert len(state_dict) == len(jax.tree.leaves(tiny[1]))
  for key, shape in {"encoder.conv_in.weight": (32, 3, 3, 3), "encoder.down.0.downsample.conv.weight": (32, 32, 3, 3),
                     "encoder.down.1.block.0.nin_shortcut.weight": (64, 32, 1, 1),
                     "encoder.down.1.attn.0.proj_out.weight": (64, 64, 1, 1), "encoder.mid.attn_1.norm.bias": (64,),
                     "encoder.conv_out.weight": (8, 64, 3, 3), "quant_conv.weight": (6, 8, 1, 1),
                     "post_quant_conv.weight": (4, 3, 1, 1), "decoder.up.1.block.1.norm1.weight": (64,),
                     "decoder.up.1.upsample.conv.weight": (64, 64, 3, 3),
                     "decoder.up.0.block.0.nin_shortcut.weight": (32, 64, 1, 1),
                     "decoder.mid.block_2.conv2.bias": (64,), "decoder.conv_out.weight": (3, 32, 3, 3)}.items():
    assert state_dict[key].shape == shape, key
  assert not any(k.startswith(("encoder.down.0.attn", "decoder.up.0.attn", "encoder.down.1.downsample",
                               "decoder.up.0.upsample")) for k in state_dict)


def test_lightning_checkpoint_round_trip_is_exact(tiny, tmp_path):
  vae, variables, state_dict = tiny
  training_loss = {"loss.logvar": np.zeros(()), "loss.discriminator.main.0.weight": np.ones((4, 3, 4, 4))}
  path = tmp_path / "vae.ckpt"
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in {**state_dict, **training_loss}.items()}, "epoch": 3},
             path)
  loaded, loaded_variables = load_texture_vae(TINY_KWARGS, TINY_EMBED_DIM, load_state_dict(path))
  assert loaded == vae
  _assert_same_params(loaded_variables["params"], variables["params"])
  back = texture_vae_to_torch(loaded, loaded_variables)
  assert back.keys() == state_dict.keys()
  for key, value in state_dict.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


@pytest.mark.parametrize("damage, key", [
    ("missing", "decoder.up.0.block.0.nin_shortcut.weight"),
    ("shape", "encoder.mid.attn_1.q.weight"),
    ("unknown", "encoder.down.0.attn.0.q.weight"),  # attention where this configuration has none
])
def test_strict_conversion_names_the_key(tiny, damage, key):
  state_dict = dict(tiny[2])
  if damage == "missing":
    del state_dict[key]
  elif damage == "shape":
    state_dict[key] = state_dict[key][:, :-1]
  else:
    state_dict[key] = np.zeros((32, 32, 1, 1), np.float32)
  with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
    load_texture_vae(TINY_KWARGS, TINY_EMBED_DIM, state_dict)


def test_wrong_embed_dim_is_a_shape_error(tiny):
  with pytest.raises(ConversionError, match=r"quant_conv\.weight"):
    load_texture_vae(TINY_KWARGS, TINY_EMBED_DIM + 1, tiny[2])


@pytest.mark.parametrize("extra, message", [({"use_tanh": True}, "use_tanh"), ({"attn_type": "linear"}, "attn_type")])
def test_unsupported_kwargs_are_refused(tiny, extra, message):
  with pytest.raises(ConversionError, match=message):
    load_texture_vae({**TINY_KWARGS, **extra}, TINY_EMBED_DIM, tiny[2])


def test_lightning_ckpt_reads_with_weights_only(tmp_path):
  path = tmp_path / "last.ckpt"
  weights = {"encoder.conv_in.weight": torch.arange(6.0).reshape(2, 3), "loss.logvar": torch.tensor(0.5)}
  torch.save({"state_dict": weights, "epoch": 3, "global_step": 100}, path)
  state_dict = select_state_dict(load_state_dict(path))
  assert sorted(state_dict) == sorted(weights)
  np.testing.assert_array_equal(state_dict["encoder.conv_in.weight"], np.arange(6.0).reshape(2, 3))


def test_ckpt_with_python_objects_loads_its_tensors_and_runs_nothing(tmp_path):
  path = tmp_path / "pickled.ckpt"
  torch.save({"state_dict": {"quant_conv.bias": torch.ones(2)}, "hyper_parameters": Hyperparameters()}, path)
  np.testing.assert_array_equal(select_state_dict(load_state_dict(path))["quant_conv.bias"], np.ones(2))


@pytest.fixture(scope="module")
def single_level():
  """A one-level model (no resampling, attention only in mid) small enough to compile in about a second."""
  vae = AutoencoderKL(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), resolution=8, z_channels=4,
                      embed_dim=4)
  return vae, _random_params(vae, seed=1, scale=0.1)


@functools.partial(jax.jit, static_argnums=0)
def _encode(vae, params, images):
  return vae.apply({"params": params}, images, method=vae.encode)


def test_encode_clamps_logvar(single_level):
  vae, params = single_level
  # quant_conv reduced to its bias: mean = 1, logvar = [+50, −50, 5, −5] before the clamp to [−30, 20].
  bias = np.array([1, 1, 1, 1, 50, -50, 5, -5], np.float32)
  params = {**params, "quant_conv": {"kernel": np.zeros_like(params["quant_conv"]["kernel"]), "bias": bias}}
  mean, logvar = _encode(vae, params, np.zeros((2, 8, 8, 3), np.float32))
  np.testing.assert_array_equal(np.asarray(mean), np.ones((2, 8, 8, 4), np.float32))
  np.testing.assert_array_equal(np.asarray(logvar), np.broadcast_to(np.float32([20, -30, 5, -5]), (2, 8, 8, 4)))


def test_bfloat16_compute_keeps_float32_params_and_outputs(single_level):
  vae, params = single_level
  images = np.random.default_rng(2).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  full, half = _encode(vae, params, images), _encode(vae.clone(dtype=jnp.bfloat16), params, images)
  assert all(x.dtype == jnp.float32 for x in half) and all(p.dtype == np.float32 for p in jax.tree.leaves(params))
  for f, h in zip(full, half):
    err = float(jnp.abs(h - f).max())
    assert 0 < err < 3e-2 * float(jnp.abs(f).max()), err


def test_posterior_sample_is_mean_plus_std_times_noise():
  mean = jnp.array([-1.0, 0.0, 2.5], jnp.float32)
  logvar = jnp.array([-2.0, 0.0, 1.5], jnp.float32)
  n = 20000
  rng = jax.random.key(3)
  samples = posterior_sample(jnp.broadcast_to(mean, (n, 1, 1, 3)), jnp.broadcast_to(logvar, (n, 1, 1, 3)), rng)
  noise = jax.random.normal(rng, (n, 1, 1, 3))
  np.testing.assert_allclose(samples, mean + np.exp(0.5 * np.asarray(logvar)) * noise, rtol=1e-6, atol=1e-6)
  std = np.exp(0.5 * np.asarray(logvar))
  flat = np.asarray(samples).reshape(n, 3)
  assert np.all(np.abs(flat.mean(0) - mean) < 5 * std / np.sqrt(n))
  assert np.all(np.abs(flat.std(0) / std - 1) < 5 / np.sqrt(2 * n))


def test_to_uint8_truncates_like_the_official_cast():
  images = np.array([-1.1, -1.0, -0.99607843, -0.5, 0.0, 0.00392157, 0.99, 1.0, 1.2], np.float32)
  got = np.asarray(to_uint8(images.reshape(1, 3, 3, 1))).reshape(-1)
  np.testing.assert_array_equal(got, [0, 0, 1, 64, 128, 128, 254, 255, 255])
  assert got.dtype == np.uint8


def test_denormalize_texture_uses_the_first_channels():
  composite = np.arange(2 * 2 * 2 * 6, dtype=np.float32).reshape(2, 2, 2, 6)
  mean, std = np.array([1.0, -2.0, 0.5, 3.0]), np.array([2.0, 0.5, 1.0, 4.0])
  got = denormalize_texture(composite, mean.reshape(1, 4, 1, 1), std.reshape(1, 4, 1, 1), multiplier=2.0,
                            texture_channels=4)
  np.testing.assert_allclose(got, composite[..., :4] * std / 2.0 + mean, rtol=1e-6)
  with pytest.raises(ValueError, match="4 values each"):
    denormalize_texture(composite, mean[:3], std, texture_channels=4)
