"""LightningDiT-SFD: the velocity network of Semantic-First Diffusion (spec §1).

A LightningDiT (adaLN blocks with RMSNorm, QK-norm, SwiGLU, 2-D RoPE on top of a fixed 2-D sin-cos table) with two
timestep embedders of width D/2, one per stream, whose outputs are concatenated `[sem | tex]`, and a REPA
projector on the hidden states after block `repa_depth`. Inputs are NHWC latents with channels
`[texture | semantic]`. The model is deterministic: label dropout belongs to the loss, which replaces labels.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sfd_jax.errors import UserError
from sfd_jax.models.layers import (RMSNorm, SwiGLU, apply_rope, modulate, rope_2d, sincos_2d, swiglu_hidden,
                                   timestep_embedding)

Dtype = Any

# depth, hidden width, heads of the official factories (spec §1.2); patch size is a separate field.
PRESETS = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
    "XXL": dict(depth=24, hidden_size=1536, num_heads=24),  # the official "1p0B"
    "1p6B": dict(depth=28, hidden_size=1792, num_heads=28),
}

# What `nn.remat` saves for the backward pass: names usable in configs.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _dense(features, dtype, name=None, zero=False):
  init = nn.initializers.zeros if zero else nn.initializers.xavier_uniform()
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=init, name=name)


class TimestepEmbedder(nn.Module):
  """Sinusoidal features of t (256, float32) → Linear → SiLU → Linear."""
  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    init = nn.initializers.normal(0.02)
    h = nn.Dense(self.width, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=init, name="mlp_0")(
        timestep_embedding(t, 256))
    return nn.Dense(self.width, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=init, name="mlp_2")(
        nn.silu(h))


class Attention(nn.Module):
  """Multi-head self-attention with per-head RMSNorm on q and k (one weight shared by all heads) and 2-D RoPE."""
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, rope_cos, rope_sin):
    b, n, d = x.shape
    head_dim = d // self.num_heads
    qkv = _dense(3 * d, self.dtype, "qkv")(x).reshape(b, n, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = apply_rope(RMSNorm(dtype=self.dtype, name="q_norm")(q), rope_cos, rope_sin)
    k = apply_rope(RMSNorm(dtype=self.dtype, name="k_norm")(k), rope_cos, rope_sin)
    out = jax.nn.dot_product_attention(q, k, v.astype(q.dtype))  # scale 1/sqrt(head_dim)
    return _dense(d, self.dtype, "proj")(out.reshape(b, n, d))


class LightningDiTBlock(nn.Module):
  """x += g1·Attn(mod(norm1 x)); x += g2·SwiGLU(mod(norm2 x)); modulation from Linear(SiLU(c)) → 6D."""
  num_heads: int
  mlp_hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c, rope_cos, rope_sin):
    d = x.shape[-1]
    mod = _dense(6 * d, self.dtype, "adaLN_modulation", zero=True)(nn.silu(c))
    sh1, sc1, g1, sh2, sc2, g2 = jnp.split(mod, 6, axis=-1)
    h = modulate(RMSNorm(dtype=self.dtype, name="norm1")(x), sh1, sc1)
    x = x + g1[:, None] * Attention(self.num_heads, self.dtype, name="attn")(h, rope_cos, rope_sin)
    h = modulate(RMSNorm(dtype=self.dtype, name="norm2")(x), sh2, sc2)
    return x + g2[:, None] * SwiGLU(self.mlp_hidden, self.dtype, name="mlp")(h)


class FinalLayer(nn.Module):
  """Linear(mod(RMSNorm x)) with (shift, scale) from Linear(SiLU(c)); projects to p²·C per token."""
  out_features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c):
    shift, scale = jnp.split(_dense(2 * x.shape[-1], self.dtype, "adaLN_modulation", zero=True)(nn.silu(c)), 2, -1)
    x = modulate(RMSNorm(dtype=self.dtype, name="norm_final")(x), shift, scale)
    return _dense(self.out_features, self.dtype, "linear", zero=True)(x)


class REPAProjector(nn.Module):
  """Per-token MLP D → P → P → z (SiLU between) mapping hidden states onto the DINOv2 feature space."""
  projector_dim: int
  z_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.silu(_dense(self.projector_dim, self.dtype, "fc_0")(x))
    x = nn.silu(_dense(self.projector_dim, self.dtype, "fc_2")(x))
    return _dense(self.z_dim, self.dtype, "fc_4")(x)


class LightningDiT(nn.Module):
  """The SFD velocity network. `__call__(x, t_tex, t_sem, y)` → velocity (B, H, W, C), float32.

  `dual_timestep=False` is the plain LightningDiT time conditioning (one embedder of width D fed with t_sem,
  which equals t_tex when Δ = 0), for checkpoints trained without the semantic-first offset.
  """
  input_size: int = 16
  patch_size: int = 1
  in_channels: int = 48
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  dual_timestep: bool = True
  use_repa: bool = True
  repa_depth: int = 2
  repa_projector_dim: int = 2048
  repa_z_dim: int = 768
  remat_policy: str = "none"
  dtype: Dtype = jnp.float32

  @property
  def grid_size(self) -> int:
    return self.input_size // self.patch_size

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def setup(self):
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy {self.remat_policy!r} is not one of {sorted(REMAT_POLICIES)}")
    if self.hidden_size % self.num_heads or self.head_dim % 4:
      raise ValueError(f"hidden_size {self.hidden_size} must split into {self.num_heads} heads of a width "
                       "divisible by 4 (2-D RoPE)")
    if self.use_repa and not 1 <= self.repa_depth <= self.depth:
      raise ValueError(f"repa_depth {self.repa_depth} must lie in [1, depth={self.depth}]")
    p, d = self.patch_size, self.hidden_size
    # xavier over the kernel viewed as (p·p·C → D), as the official init of the patch-embed conv.
    patch_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3)
    self.x_embedder = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                              param_dtype=jnp.float32, kernel_init=patch_init, name="x_embedder")
    if self.dual_timestep:
      self.t_embedder_sem = TimestepEmbedder(d // 2, self.dtype)
      self.t_embedder_tex = TimestepEmbedder(d // 2, self.dtype)
    else:
      self.t_embedder = TimestepEmbedder(d, self.dtype)
    self.y_embedder = nn.Embed(self.num_classes + 1, d, param_dtype=jnp.float32,
                               embedding_init=nn.initializers.normal(0.02), name="y_embedder")
    block = LightningDiTBlock
    if self.remat_policy != "none":
      block = nn.remat(LightningDiTBlock, policy=REMAT_POLICIES[self.remat_policy])
    hidden = swiglu_hidden(d, self.mlp_ratio)
    self.blocks = [block(self.num_heads, hidden, self.dtype, name=f"blocks_{i}") for i in range(self.depth)]
    self.final_layer = FinalLayer(p * p * self.in_channels, self.dtype)
    if self.use_repa:
      self.repa_projector = REPAProjector(self.repa_projector_dim, self.repa_z_dim, self.dtype)

  def condition(self, t_tex, t_sem, y):
    """The adaLN condition c = [emb_sem | emb_tex] + label embedding, (B, D)."""
    if self.dual_timestep:
      emb = jnp.concatenate([self.t_embedder_sem(t_sem), self.t_embedder_tex(t_tex)], axis=-1)
    else:
      emb = self.t_embedder(t_sem)
    return emb + self.y_embedder(y).astype(emb.dtype)

  def __call__(self, x, t_tex, t_sem, y, return_repa: bool = False):
    b, h, w, c_in = x.shape
    if (h, w, c_in) != (self.input_size, self.input_size, self.in_channels):
      raise ValueError(f"LightningDiT expects latents (B, {self.input_size}, {self.input_size}, "
                       f"{self.in_channels}) NHWC, got {x.shape}")
    if return_repa and not self.use_repa:
      raise ValueError("return_repa=True needs a model built with use_repa=True")
    p, g = self.patch_size, self.grid_size
    tokens = self.x_embedder(x.astype(self.dtype)).reshape(b, g * g, self.hidden_size)
    tokens = tokens + jnp.asarray(sincos_2d(self.hidden_size, g), self.dtype)[None]
    c = self.condition(t_tex, t_sem, y)
    rope_cos, rope_sin = rope_2d(self.head_dim, g)
    z = None
    for i, block in enumerate(self.blocks):
      tokens = block(tokens, c, rope_cos, rope_sin)
      if self.use_repa and i + 1 == self.repa_depth:
        z = self.repa_projector(tokens).astype(jnp.float32)
    out = self.final_layer(tokens, c).astype(jnp.float32)
    # Per-token outputs are laid out (i, j, c) with c fastest: the official unpatchify.
    v = out.reshape(b, g, g, p, p, self.in_channels).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, self.in_channels)
    return (v, z) if return_repa else v

  def forward_flops(self, with_repa: bool = True) -> int:
    """Model FLOPs of one forward pass for one sample (a multiply-add counts 2), for throughput and MFU.

    Training costs 3× this (forward + backward); rematerialisation adds compute but not model FLOPs.
    """
    n, d, c = self.grid_size ** 2, self.hidden_size, self.in_channels
    f, p = swiglu_hidden(d, self.mlp_ratio), self.patch_size
    block = 2 * d * 6 * d + 2 * n * d * (3 * d + d + 3 * f) + 2 * 2 * n * n * d
    flops = 2 * n * c * p * p * d + self.depth * block + 2 * d * 2 * d + 2 * n * d * p * p * c
    flops += 2 * 2 * (256 * d // 2 + (d // 2) ** 2) if self.dual_timestep else 2 * (256 * d + d * d)
    if self.use_repa and with_repa:
      q = self.repa_projector_dim
      flops += 2 * n * (d * q + q * q + q * self.repa_z_dim)
    return flops

  def dummy_inputs(self, batch: int = 1):
    """Arguments for `init` / `jax.eval_shape`."""
    x = jnp.zeros((batch, self.input_size, self.input_size, self.in_channels), jnp.float32)
    t = jnp.zeros((batch,), jnp.float32)
    return x, t, t, jnp.zeros((batch,), jnp.int32)


def preset_fields(preset: str) -> dict:
  """depth, hidden_size and num_heads of an official size (`S`, `B`, `L`, `XL`, `XXL`/`1p0B`, `1p6B`)."""
  name = {"1p0B": "XXL"}.get(preset, preset)
  if name not in PRESETS:
    raise UserError(f"unknown LightningDiT preset {preset!r}; choose one of {sorted(PRESETS)} (or 1p0B)")
  return dict(PRESETS[name])


def lightningdit(preset: str, **kwargs) -> LightningDiT:
  """A LightningDiT of an official size; kwargs set any other field."""
  return LightningDiT(**{**preset_fields(preset), **kwargs})
