"""DINOv2 ViT/14 with register tokens: the frozen feature extractor of SFD.

The network of `facebookresearch/dinov2` (`dinov2_vit{s,b,l,g}14_reg`) and of transformers'
`Dinov2WithRegistersModel`: patch embedding, [cls | registers | patches] tokens, pre-norm blocks with layer scale
(GELU MLP, or fused SwiGLU for g), a final LayerNorm. Parameter names follow facebookresearch/dinov2.

The position table is trained on a 37×37 grid (518 px); other input sizes interpolate it to the patch grid with
torch's antialiased bicubic resize, as both reference implementations do in their forward pass. The REPA recipe
instead resamples the table once at load time with timm's `resample_abs_pos_embed` (the same antialiased bicubic
resize, cls row kept) to 16·(res // 256) patches and then feeds exactly that grid: the same single resize, so
`repa_features` interpolates in the forward pass and needs no params transform. (REPA revisions from before its
512 px support hard-code a 16×16 table and so resize twice at 512 px, 37 → 16 → 32; at SFD's 256 px every
revision computes the same features.)

Resizing is written as separable matmuls with numpy weight matrices that reproduce
`torch.nn.functional.interpolate(mode="bicubic", align_corners=False)` (coordinates in float32 as torch computes
them), so it runs as two small matmuls on any accelerator.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sfd_jax.models.layers import SwiGLU, attention, dense

Dtype = Any

# Widths, depths and heads of the official ViT/14 models (`vit_small` ... `vit_giant2`); g uses a fused SwiGLU.
PRESETS = {
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
    "g": dict(hidden_size=1536, depth=40, num_heads=24, swiglu=True),
}
_PRESET_ALIASES = {f"dinov2_vit{k.lower()}14_reg": k for k in PRESETS}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _cubic_near(x, a):
  """Keys' cubic convolution kernel for |x| ≤ 1."""
  return ((a + 2) * x - (a + 3)) * x * x + 1


def _cubic_far(x, a):
  """Keys' cubic convolution kernel for 1 < |x| < 2."""
  return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int, antialias: bool = False) -> np.ndarray:
  """(out_size, in_size) float32 weights of torch's 1-D bicubic resize (align_corners=False).

  Without antialias: Keys a = −0.75 on 4 taps around src = (i + 0.5)·in/out − 0.5, indices clamped to the
  border. With antialias (torch's PIL-style path): Keys a = −0.5 stretched by the scale when downsizing, taps cut
  at the border and the weights renormalised. The arithmetic follows torch's CPU kernels step by step in float32:
  with float64 coordinates a 256 → 224 resize already differs from torch by 1e-4.
  """
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  weights = np.zeros((out_size, in_size), f32)
  if antialias:
    a = f32(-0.5)
    support = f32(2.0 * float(scale)) if scale >= 1 else f32(2.0)
    inv_scale = f32(1) / scale if scale >= 1 else f32(1)
    for i in range(out_size):
      center = f32(float(scale) * (i + 0.5))
      lo = max(int(float(center - support) + 0.5), 0)
      hi = min(int(float(center + support) + 0.5), in_size)
      x = np.abs((((np.arange(lo, hi, dtype=f32) - center).astype(np.float64) + 0.5) * float(inv_scale)).astype(f32))
      w = np.where(x < 1, _cubic_near(x, a), np.where(x < 2, _cubic_far(x, a), f32(0)))
      weights[i, lo:hi] = w / w.sum(dtype=f32)
  else:
    a = f32(-0.75)
    src = scale * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5)
    base = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    t = np.clip(src - base.astype(f32), f32(0), f32(1))
    taps = (_cubic_far(t + f32(1), a), _cubic_near(t, a), _cubic_near(f32(1) - t, a),
            _cubic_far((f32(1) - t) + f32(1), a))
    for k, w in enumerate(taps):
      np.add.at(weights, (np.arange(out_size), np.clip(base - 1 + k, 0, in_size - 1)), w)
  weights.flags.writeable = False
  return weights


def resize_bicubic(x, size: tuple[int, int], antialias: bool = False):
  """Bicubic resize of NHWC images to `size` = (height, width), float32, as torch's `interpolate(mode="bicubic")`."""
  x = jnp.asarray(x, jnp.float32)
  rows = bicubic_matrix(x.shape[1], size[0], antialias)
  cols = bicubic_matrix(x.shape[2], size[1], antialias)
  highest = jax.lax.Precision.HIGHEST  # image values, not activations: keep them exact on TPU/GPU too
  x = jnp.einsum("oh,bhwc->bowc", rows, x, precision=highest)
  return jnp.einsum("pw,bowc->bopc", cols, x, precision=highest)


class LayerScale(nn.Module):
  """x · gamma, a learned per-channel gain on each residual branch."""
  init_value: float = 1.0

  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],), jnp.float32)
    return x * gamma.astype(x.dtype)


def _dense(features, dtype, name):
  return dense(features, dtype, name, nn.initializers.truncated_normal(0.02))


def _layer_norm(eps, dtype, name):
  # Two-pass variance like torch: the fast E[x²] − E[x]² loses digits on large-mean activations.
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False, name=name)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (output order [q | k | v], each head-major)."""
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    return _dense(d, self.dtype, "proj")(attention(_dense(3 * d, self.dtype, "qkv")(x), self.num_heads))


class Mlp(nn.Module):
  """fc1 → exact (erf) GELU → fc2."""
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(_dense(self.hidden, self.dtype, "fc1")(x), approximate=False)
    return _dense(x.shape[-1], self.dtype, "fc2")(h)


class Block(nn.Module):
  """x += ls1(attn(norm1 x)); x += ls2(mlp(norm2 x))."""
  num_heads: int
  mlp_hidden: int
  swiglu: bool
  layer_norm_eps: float
  layerscale_init: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = _layer_norm(self.layer_norm_eps, self.dtype, "norm1")(x)
    x = x + LayerScale(self.layerscale_init, name="ls1")(Attention(self.num_heads, self.dtype, name="attn")(h))
    h = _layer_norm(self.layer_norm_eps, self.dtype, "norm2")(x)
    mlp = SwiGLU if self.swiglu else Mlp
    return x + LayerScale(self.layerscale_init, name="ls2")(mlp(self.mlp_hidden, self.dtype, name="mlp")(h))


class DINOv2(nn.Module):
  """DINOv2 ViT with registers. `__call__(images)` with NHWC images (already normalised) →
  `{"patch_tokens": (B, N, D), "cls_token": (B, D), "register_tokens": (B, R, D)}`, float32, all after the final
  LayerNorm. N = (H // p)·(W // p) in row-major order; pixels beyond a multiple of the patch are dropped.

  `masks` (B, N) bool replaces those patch embeddings by the learned mask token (the iBOT input masking).
  `image_size` is the size the position table was trained for (518 px: 37×37 patches for p = 14).
  """
  image_size: int = 518
  patch_size: int = 14
  in_channels: int = 3
  hidden_size: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  swiglu: bool = False
  num_registers: int = 4
  layer_norm_eps: float = 1e-6
  layerscale_init: float = 1.0
  dtype: Dtype = jnp.float32

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def mlp_hidden(self) -> int:
    """fc1 width; the fused SwiGLU keeps two thirds of it, rounded up to a multiple of 8 (official recipe)."""
    hidden = int(self.hidden_size * self.mlp_ratio)
    return (int(hidden * 2 / 3) + 7) // 8 * 8 if self.swiglu else hidden

  def position_table(self, pos_embed, grid_h: int, grid_w: int):
    """The (1, 1 + grid_h·grid_w, D) float32 position table for a patch grid: the trained table or its
    antialiased bicubic resize (the cls row is kept as is)."""
    g = self.grid_size
    if (grid_h, grid_w) == (g, g):
      return pos_embed
    patch_pos = pos_embed[:, 1:].reshape(1, g, g, -1)
    patch_pos = resize_bicubic(patch_pos, (grid_h, grid_w), antialias=True).reshape(1, grid_h * grid_w, -1)
    return jnp.concatenate([pos_embed[:, :1], patch_pos], axis=1)

  @nn.compact
  def __call__(self, images, masks=None):
    if images.ndim != 4 or images.shape[-1] != self.in_channels:
      raise ValueError(f"DINOv2 expects NHWC images with {self.in_channels} channels, got shape {images.shape}")
    b, h, w, _ = images.shape
    p, d = self.patch_size, self.hidden_size
    if h < p or w < p:
      raise ValueError(f"DINOv2 needs images of at least one {p}×{p} patch, got {h}×{w}")
    trunc = nn.initializers.truncated_normal(0.02)
    cls_token = self.param("cls_token", trunc, (1, 1, d), jnp.float32)
    pos_embed = self.param("pos_embed", trunc, (1, self.grid_size ** 2 + 1, d), jnp.float32)
    register_tokens = self.param("register_tokens", nn.initializers.zeros, (1, self.num_registers, d), jnp.float32)
    mask_token = self.param("mask_token", nn.initializers.zeros, (1, d), jnp.float32)

    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=trunc, name="patch_embed")(images.astype(self.dtype))
    grid_h, grid_w = x.shape[1], x.shape[2]
    x = x.reshape(b, grid_h * grid_w, d)
    if masks is not None:
      x = jnp.where(masks[..., None], mask_token.astype(x.dtype), x)
    x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(x.dtype), (b, 1, d)), x], axis=1)
    x = x + self.position_table(pos_embed, grid_h, grid_w).astype(x.dtype)
    registers = jnp.broadcast_to(register_tokens.astype(x.dtype), (b, self.num_registers, d))
    x = jnp.concatenate([x[:, :1], registers, x[:, 1:]], axis=1)
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_hidden, self.swiglu, self.layer_norm_eps, self.layerscale_init,
                self.dtype, name=f"blocks_{i}")(x)
    x = _layer_norm(self.layer_norm_eps, self.dtype, "norm")(x).astype(jnp.float32)
    r = self.num_registers
    return {"patch_tokens": x[:, 1 + r:], "cls_token": x[:, 0], "register_tokens": x[:, 1:1 + r]}

  def dummy_inputs(self, batch: int = 1):
    """Arguments for `init` / `jax.eval_shape`: images at the trained size."""
    return (jnp.zeros((batch, self.image_size, self.image_size, self.in_channels), jnp.float32),)


def dinov2(preset: str, **kwargs) -> DINOv2:
  """A DINOv2/14 with 4 registers of an official size (`S`, `B`, `L`, `g`, or `dinov2_vitb14_reg` style names)."""
  preset = _PRESET_ALIASES.get(preset, preset)
  if preset not in PRESETS:
    raise ValueError(f"unknown DINOv2 preset {preset!r}; choose one of {sorted(PRESETS)} "
                     f"or {sorted(_PRESET_ALIASES)}")
  return DINOv2(**{**PRESETS[preset], **kwargs})


def preprocess_repa(images, size: int | None = None):
  """REPA's DINOv2 input from uint8 NHWC images: /255, ImageNet mean/std, bicubic resize (no antialias) to `size`
  px square; by default REPA's 224·(W // 256) for images W px wide."""
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != jnp.uint8:
    raise ValueError(f"preprocess_repa expects uint8 NHWC RGB images, got {images.dtype} {images.shape}")
  size = 224 * (images.shape[2] // 256) if size is None else size
  if size <= 0:
    raise ValueError(f"REPA resizes to 224·(W // 256) px, nothing for {images.shape[2]} px images < 256; give the "
                     "input size (latent grid × patch size)")
  x = images.astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
  return resize_bicubic(x, (size, size))


def repa_features(model: DINOv2, variables, images, grid: int | None = None):
  """REPA targets of uint8 NHWC images: the final-norm patch tokens (B, grid², D), no cls or registers.

  The input is resized to grid·patch px so that the tokens line up with a grid×grid latent; by default REPA's
  224·(W // 256), i.e. the 16·(W/256) grid of an f16 latent for DINOv2/14. Equal to REPA's timm-resampled
  `dinov2_vit*14_reg(...)["x_norm_patchtokens"]`; see the module docstring.
  """
  size = None if grid is None else grid * model.patch_size
  return model.apply(variables, preprocess_repa(images, size))["patch_tokens"]
