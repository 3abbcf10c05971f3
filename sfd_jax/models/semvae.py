"""Semantic VAE (SemVAE): compresses DINOv2 patch tokens into the compact semantic latent of SFD.

The official module (`tokenizer/semvae/models/vae.py`, `create_semantic_autoencoder('transformer', is_vae=True,
...)`), exactly, so that the released `semantic_ae_final.pt` converts by name (`sfd_jax.convert.semvae`):
- encoder = Sequential(0: Linear(feature_dim → hidden), 1..depth: TransformerBlock, depth+1: LayerNorm,
  depth+2: Linear(hidden → 2·latent_channels)); the decoder mirrors it from latent_channels back to feature_dim;
- TransformerBlock: x += MHA(LN1 x); x += MLP(LN2 x), with torch's `nn.MultiheadAttention` (one fused in_proj
  whose output is [q | k | v], each split into heads in order; softmax(q·kᵀ/√head_dim)·v; out_proj), an MLP of
  Linear(hidden → mlp_ratio·hidden), exact GELU, Linear back, and LayerNorms of eps 1e-5 (torch's default);
- no position embedding, no cls token: each token sees the others only through attention;
- the encoder's output channels are [mean | logvar], logvar clamped to [-30, 20] (diffusers'
  `DiagonalGaussianDistribution`).
Submodules are named by their Sequential index (`encoder/1/attn/in_proj`), as the official state dict is.
Features and latents are NHWC grids: (B, h, w, feature_dim) ↔ (B, h, w, latent_channels), one token per DINOv2
patch, row-major as the official (B, h·w, C) token sequences.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sfd_jax.models.layers import MATMUL_PRECISIONS, attention, dense, matmul_precision, posterior_sample

Dtype = Any
LAYER_NORM_EPS = 1e-5  # torch nn.LayerNorm's default, which the official module keeps


def _layer_norm(dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(LAYER_NORM_EPS, dtype=dtype, param_dtype=jnp.float32, name=name)


class MultiheadAttention(nn.Module):
  """torch `nn.MultiheadAttention(d, num_heads, batch_first=True)` as self-attention, at eval (no dropout)."""
  num_heads: int
  dtype: Dtype = jnp.float32
  attention: str = "auto"  # layers.ATTENTION
  matmul_precision: str = "default"  # handed to the attention kernels, which trace their passes outside the model

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    qkv = dense(3 * d, self.dtype, "in_proj", nn.initializers.xavier_uniform())(x)
    out = attention(qkv, self.num_heads, implementation=self.attention, precision=self.matmul_precision)
    return dense(d, self.dtype, "out_proj")(out)


class Mlp(nn.Module):
  """Sequential(0: Linear(d → hidden), 1: GELU (exact), 2: Linear(hidden → d))."""
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(dense(self.hidden, self.dtype, "0")(x), approximate=False)
    return dense(x.shape[-1], self.dtype, "2")(h)


class TransformerBlock(nn.Module):
  """Pre-norm block: x += MHA(LN1 x); x += MLP(LN2 x)."""
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  attention: str = "auto"
  matmul_precision: str = "default"

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    attn = MultiheadAttention(self.num_heads, self.dtype, self.attention, self.matmul_precision, name="attn")
    x = x + attn(_layer_norm(self.dtype, "norm1")(x))
    return x + Mlp(int(d * self.mlp_ratio), self.dtype, name="mlp")(_layer_norm(self.dtype, "norm2")(x))


class Tower(nn.Module):
  """The official encoder or decoder: Linear → `depth` blocks → LayerNorm → Linear, on token sequences."""
  out_features: int
  hidden_size: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  attention: str = "auto"
  matmul_precision: str = "default"

  @nn.compact
  def __call__(self, tokens):
    x = dense(self.hidden_size, self.dtype, "0")(tokens.astype(self.dtype))
    for i in range(1, self.depth + 1):
      x = TransformerBlock(self.num_heads, self.mlp_ratio, self.dtype, self.attention, self.matmul_precision,
                           name=str(i))(x)
    x = _layer_norm(self.dtype, str(self.depth + 1))(x)
    x = dense(self.out_features, self.dtype, str(self.depth + 2))(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class SemVAE(nn.Module):
  """features (B, h, w, feature_dim) ↔ semantic latent (B, h, w, latent_channels); the released one is the
  default: DINOv2-B/14-reg tokens (768) → 16 channels, hidden 768, 6 heads, 4 blocks a side.

  `matmul_precision` (one of `layers.MATMUL_PRECISIONS`) is that of every matmul: 'highest' gives float32 latents
  on TPUs and GPUs too, 'default' the platform's faster passes for float32 operands.
  """
  feature_dim: int = 768
  latent_channels: int = 16
  hidden_size: int = 768
  encoder_depth: int = 4
  decoder_depth: int = 4
  num_heads: int = 6
  mlp_ratio: float = 4.0
  grid_size: int = 16  # the token grid of `dummy_inputs` only: the network itself takes any grid
  dtype: Dtype = jnp.float32
  attention: str = "auto"  # the implementation of every attention (layers.ATTENTION; 'xla': without kernels)
  matmul_precision: str = "default"

  def setup(self):
    if self.matmul_precision not in MATMUL_PRECISIONS:
      raise ValueError(f"matmul_precision {self.matmul_precision!r} is not one of {MATMUL_PRECISIONS}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} does not split into {self.num_heads} heads")
    options = (self.dtype, self.attention, self.matmul_precision)
    self.encoder = Tower(2 * self.latent_channels, self.hidden_size, self.encoder_depth, self.num_heads,
                         self.mlp_ratio, *options)
    self.decoder = Tower(self.feature_dim, self.hidden_size, self.decoder_depth, self.num_heads, self.mlp_ratio,
                         *options)

  def _tokens(self, tower, grid, width: int, what: str):
    if grid.ndim != 4 or grid.shape[-1] != width:
      raise ValueError(f"SemVAE expects {what} (B, h, w, {width}), got {grid.shape}")
    b, h, w, _ = grid.shape
    with matmul_precision(self.matmul_precision):
      return tower(grid.reshape(b, h * w, width)).reshape(b, h, w, -1)

  def encode(self, features):
    """(mean, logvar) of the posterior, each (B, h, w, latent_channels), logvar clamped to [-30, 20]."""
    mean, logvar = jnp.split(self._tokens(self.encoder, features, self.feature_dim, "features"), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, latents):
    return self._tokens(self.decoder, latents, self.latent_channels, "latents")

  def __call__(self, features, rng=None):
    """(reconstruction, mean, logvar); the latent is a posterior sample when `rng` is given, else the mean."""
    mean, logvar = self.encode(features)
    latents = mean if rng is None else posterior_sample(mean, logvar, rng)
    return self.decode(latents), mean, logvar

  def dummy_inputs(self, batch: int = 1):
    return (jnp.zeros((batch, self.grid_size, self.grid_size, self.feature_dim), jnp.float32),)
