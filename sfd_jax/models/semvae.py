"""Semantic VAE (SemVAE): compresses vision-foundation-model patch features into a compact semantic latent.

Paper §3.2.1, A.1 and Table 7: encoder = input Linear → 4 Transformer blocks → LayerNorm → Linear to 2·C_s
(mean, log-variance) per token; the decoder mirrors it back to the VFM width; hidden 768, 6 heads, C_s = 16;
about 29M parameters per side on DINOv2-B features (768-d).

The official code does not release the Semantic VAE. These choices are ours, each the plain ViT default:
- pre-norm ViT blocks (LayerNorm eps 1e-6, qkv with bias, MLP ratio 4 with exact GELU), no dropout;
- a fixed 2-D sin-cos position table added after the input projection of both encoder and decoder, so the
  layout of the token grid is known to the network (the paper stresses that SemVAE keeps the spatial layout);
- the log-variance is clamped to [-30, 20] as in the LDM KL autoencoder;
- features and latents are NHWC grids: (B, h, w, C_in) ↔ (B, h, w, C_s), one token per DINOv2 patch.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sfd_jax.models.layers import attention, dense, posterior_sample, sincos_2d

Dtype = Any


class Block(nn.Module):
  """Pre-norm Transformer block: x += Attn(LN x); x += MLP(LN x)."""
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    linear = lambda f, name: dense(f, self.dtype, name, nn.initializers.xavier_uniform())
    norm = lambda name: nn.LayerNorm(1e-6, dtype=self.dtype, param_dtype=jnp.float32, name=name)
    x = x + linear(d, "proj")(attention(linear(3 * d, "qkv")(norm("norm1")(x)), self.num_heads))
    h = nn.gelu(linear(int(d * self.mlp_ratio), "fc1")(norm("norm2")(x)), approximate=False)
    return x + linear(d, "fc2")(h)


class Tower(nn.Module):
  """Linear → + sin-cos positions → blocks → LayerNorm → Linear, on an NHWC token grid."""
  out_features: int
  hidden_size: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, _ = x.shape
    x = dense(self.hidden_size, self.dtype, "proj_in")(x.reshape(b, h * w, -1).astype(self.dtype))
    x = x + jnp.asarray(sincos_2d(self.hidden_size, h, w), self.dtype)[None]
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_ratio, self.dtype, name=f"blocks_{i}")(x)
    x = nn.LayerNorm(1e-6, dtype=self.dtype, param_dtype=jnp.float32, name="norm")(x)
    x = dense(self.out_features, self.dtype, "proj_out")(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32)).reshape(b, h, w, self.out_features)


class SemVAE(nn.Module):
  """features (B, h, w, feature_dim) ↔ semantic latent (B, h, w, latent_channels)."""
  feature_dim: int = 768
  latent_channels: int = 16
  hidden_size: int = 768
  encoder_depth: int = 4
  decoder_depth: int = 4
  num_heads: int = 6
  mlp_ratio: float = 4.0
  grid_size: int = 16
  dtype: Dtype = jnp.float32

  def setup(self):
    self.encoder = Tower(2 * self.latent_channels, self.hidden_size, self.encoder_depth, self.num_heads,
                         self.mlp_ratio, self.dtype)
    self.decoder = Tower(self.feature_dim, self.hidden_size, self.decoder_depth, self.num_heads,
                         self.mlp_ratio, self.dtype)

  def encode(self, features):
    """(mean, logvar) of the posterior, each (B, h, w, latent_channels), logvar clamped to [-30, 20]."""
    if features.shape[-1] != self.feature_dim:
      raise ValueError(f"SemVAE expects features (..., {self.feature_dim}), got {features.shape}")
    mean, logvar = jnp.split(self.encoder(features), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, latents):
    return self.decoder(latents)

  def __call__(self, features, rng=None):
    """(reconstruction, mean, logvar); the latent is a posterior sample when `rng` is given, else the mean."""
    mean, logvar = self.encode(features)
    latents = mean if rng is None else posterior_sample(mean, logvar, rng)
    return self.decode(latents), mean, logvar

  def dummy_inputs(self, batch: int = 1):
    return (jnp.zeros((batch, self.grid_size, self.grid_size, self.feature_dim), jnp.float32),)
