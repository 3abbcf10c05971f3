"""The LDM KL autoencoder that makes SFD's texture latents: SD-VAE f16d32 by default.

Images are NHWC in [-1, 1]; latents are NHWC. The layout follows the official `Encoder` / `Decoder` so the
converter is a name mapping: levels are numbered as in the state dict (`down_i`, `up_i`, with `up_0` the
full-resolution level), and attention placement uses the *nominal* resolution (`resolution` halved per level),
never the real input size, so a 64 px image through a `resolution=256` model attends where a 256 px one would.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sfd_jax.models.layers import MATMUL_PRECISIONS, matmul_precision

Dtype = Any

LOGVAR_RANGE = (-30.0, 20.0)  # the official DiagonalGaussianDistribution clamp


def _norm(dtype, name):
  # Two-pass variance, as torch's GroupNorm; the one-pass E[x²]−E[x]² loses digits on large activations.
  return nn.GroupNorm(num_groups=32, epsilon=1e-6, dtype=dtype, use_fast_variance=False, name=name)


def _conv(features, kernel, dtype, name, strides=1, padding=None):
  padding = kernel // 2 if padding is None else padding
  return nn.Conv(features, (kernel, kernel), strides=strides, padding=padding, dtype=dtype,
                 param_dtype=jnp.float32, name=name)


class ResnetBlock(nn.Module):
  """x + conv(swish(GN(conv(swish(GN(x)))))), with a 1×1 `nin_shortcut` when the width changes."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = _conv(self.features, 3, self.dtype, "conv1")(nn.swish(_norm(self.dtype, "norm1")(x)))
    h = _conv(self.features, 3, self.dtype, "conv2")(nn.swish(_norm(self.dtype, "norm2")(h)))
    if x.shape[-1] != self.features:
      x = _conv(self.features, 1, self.dtype, "nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all H·W positions with 1×1 q/k/v/proj_out convs and a residual."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = _norm(self.dtype, "norm")(x)
    q, k, v = (_conv(c, 1, self.dtype, name)(y).reshape(b, h * w, 1, c) for name in ("q", "k", "v"))
    out = jax.nn.dot_product_attention(q, k, v)  # scale C^-1/2, softmax over keys
    return x + _conv(c, 1, self.dtype, "proj_out")(out.reshape(b, h, w, c))


class Downsample(nn.Module):
  """Halves H and W: zero-pad right and bottom by one, then a stride-2 VALID 3×3 conv (or 2×2 average pool)."""
  with_conv: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if not self.with_conv:
      return nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(x.shape[-1], 3, self.dtype, "conv", strides=2, padding="VALID")(x)


class Upsample(nn.Module):
  """Doubles H and W by nearest-neighbour repetition, then (optionally) a 3×3 conv."""
  with_conv: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(x.shape[-1], 3, self.dtype, "conv")(x) if self.with_conv else x


class Encoder(nn.Module):
  """images (B, H, W, in_channels) → (B, H/f, W/f, (2 if double_z else 1)·z_channels), f = 2^(len(ch_mult) − 1)."""
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = (16,)
  resolution: int = 256
  in_channels: int = 3
  z_channels: int = 32
  double_z: bool = True
  resamp_with_conv: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = _conv(self.ch, 3, self.dtype, "conv_in")(x.astype(self.dtype))
    nominal = self.resolution
    for i, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        h = ResnetBlock(self.ch * mult, self.dtype, name=f"down_{i}_block_{j}")(h)
        if nominal in self.attn_resolutions:
          h = AttnBlock(self.dtype, name=f"down_{i}_attn_{j}")(h)
      if i != len(self.ch_mult) - 1:
        h = Downsample(self.resamp_with_conv, self.dtype, name=f"down_{i}_downsample")(h)
        nominal //= 2
    h = _mid(h, self.dtype)
    h = nn.swish(_norm(self.dtype, "norm_out")(h))
    return _conv((2 if self.double_z else 1) * self.z_channels, 3, self.dtype, "conv_out")(h)


class Decoder(nn.Module):
  """The mirror of `Encoder`: latents (B, h, w, z_channels) → images (B, h·f, w·f, out_ch)."""
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = (16,)
  resolution: int = 256
  out_ch: int = 3
  resamp_with_conv: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    h = _conv(self.ch * self.ch_mult[-1], 3, self.dtype, "conv_in")(z.astype(self.dtype))
    h = _mid(h, self.dtype)
    nominal = self.resolution // 2 ** (len(self.ch_mult) - 1)
    for i in reversed(range(len(self.ch_mult))):
      for j in range(self.num_res_blocks + 1):
        h = ResnetBlock(self.ch * self.ch_mult[i], self.dtype, name=f"up_{i}_block_{j}")(h)
        if nominal in self.attn_resolutions:
          h = AttnBlock(self.dtype, name=f"up_{i}_attn_{j}")(h)
      if i != 0:
        h = Upsample(self.resamp_with_conv, self.dtype, name=f"up_{i}_upsample")(h)
        nominal *= 2
    h = nn.swish(_norm(self.dtype, "norm_out")(h))
    return _conv(self.out_ch, 3, self.dtype, "conv_out")(h)


def _mid(h, dtype):
  """The bottleneck both halves share: ResnetBlock → AttnBlock → ResnetBlock at constant width."""
  h = ResnetBlock(h.shape[-1], dtype, name="mid_block_1")(h)
  h = AttnBlock(dtype, name="mid_attn_1")(h)
  return ResnetBlock(h.shape[-1], dtype, name="mid_block_2")(h)


class AutoencoderKL(nn.Module):
  """Encoder + 1×1 `quant_conv` → diagonal Gaussian posterior; 1×1 `post_quant_conv` + Decoder back to images.

  `encode(images)` → (mean, logvar), `decode(latents)` → images, all NHWC float32 whatever the compute `dtype`;
  `__call__` decodes the posterior mean so that `init` creates every parameter. `matmul_precision` (one of
  `layers.MATMUL_PRECISIONS`) is that of every convolution and attention matmul: sampling decodes at the DiT's
  (`generate`), so that 'highest' gives float32 images end to end on TPUs and GPUs too.
  """
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = (16,)
  resolution: int = 256
  in_channels: int = 3
  out_ch: int = 3
  z_channels: int = 32
  embed_dim: int = 32
  double_z: bool = True
  resamp_with_conv: bool = True
  dtype: Dtype = jnp.float32
  matmul_precision: str = "default"

  def setup(self):
    if self.matmul_precision not in MATMUL_PRECISIONS:
      raise ValueError(f"matmul_precision {self.matmul_precision!r} is not one of {MATMUL_PRECISIONS}")
    if not self.double_z:
      raise ValueError("AutoencoderKL needs double_z=True: the encoder must output both mean and log-variance")
    if any(self.ch * m % 32 for m in self.ch_mult):
      raise ValueError(f"every width ch·ch_mult = {[self.ch * m for m in self.ch_mult]} must be a multiple of 32 "
                       "(GroupNorm with 32 groups)")
    levels = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                  attn_resolutions=tuple(self.attn_resolutions), resolution=self.resolution,
                  resamp_with_conv=self.resamp_with_conv, dtype=self.dtype)
    self.encoder = Encoder(in_channels=self.in_channels, z_channels=self.z_channels, double_z=True, **levels)
    self.quant_conv = _conv(2 * self.embed_dim, 1, self.dtype, "quant_conv")
    self.post_quant_conv = _conv(self.z_channels, 1, self.dtype, "post_quant_conv")
    self.decoder = Decoder(out_ch=self.out_ch, **levels)

  def moments(self, images):
    """quant_conv(encoder(images)): [mean | logvar] along channels, before the clamp, float32."""
    with matmul_precision(self.matmul_precision):
      return self.quant_conv(self.encoder(images)).astype(jnp.float32)

  def encode(self, images):
    """The posterior of images (B, H, W, in_channels) in [-1, 1]: (mean, logvar), logvar clamped to [-30, 20]."""
    mean, logvar = jnp.split(self.moments(images), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, latents):
    """images (B, H, W, out_ch), float32, roughly in [-1, 1], from texture latents (B, h, w, embed_dim)."""
    with matmul_precision(self.matmul_precision):
      return self.decoder(self.post_quant_conv(latents.astype(self.dtype))).astype(jnp.float32)

  def __call__(self, images):
    return self.decode(self.encode(images)[0])

  def dummy_inputs(self, batch: int = 1):
    """Arguments for `init` / `jax.eval_shape`: a zero image at the nominal resolution."""
    return (jnp.zeros((batch, self.resolution, self.resolution, self.in_channels), jnp.float32),)


def to_uint8(images):
  """NHWC images in [-1, 1] → uint8 as the official `clamp(127.5·x + 128, 0, 255)` cast (truncation)."""
  return jnp.clip(127.5 * images.astype(jnp.float32) + 128.0, 0, 255).astype(jnp.uint8)


def denormalize_texture(latents, mean, std, multiplier: float = 1.0, texture_channels: int = 32):
  """x·std/multiplier + mean on the first `texture_channels` of a composite NHWC latent (the decoder's input).

  `mean` and `std` hold one value per texture channel in any shape (e.g. the official (1, 32, 1, 1) stats).
  """
  mean = jnp.asarray(mean, jnp.float32).reshape(-1)
  std = jnp.asarray(std, jnp.float32).reshape(-1)
  if mean.shape != (texture_channels,) or std.shape != (texture_channels,):
    raise ValueError(f"texture stats must hold {texture_channels} values each (one per channel), got mean "
                     f"{mean.shape[0]} and std {std.shape[0]}; pass the stats of the texture latents")
  if latents.shape[-1] < texture_channels:
    raise ValueError(f"latents {latents.shape} have fewer than {texture_channels} channels; they must be NHWC "
                     "with the texture channels first")
  return latents[..., :texture_channels].astype(jnp.float32) * std / multiplier + mean
