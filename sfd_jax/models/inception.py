"""The FID InceptionV3: the 2015 TensorFlow graph (`classify_image_graph_def.pb`) that the ADM evaluator runs.

It is torchvision's InceptionV3 with the changes pytorch-fid and torch-fidelity make to match that graph: average
pools that do not count padding, a max pool in the last block, BatchNorm eps 1e-3, no conv biases, 1008 classes.
The model takes raw pixels of any size, like the graph does from its `ExpandDims` node: TF1 bilinear resize to
299 (`align_corners=False`, no half-pixel centres), then (x − 128)/128. Module names follow the torchvision
state dict (`Mixed_6d.branch1x1.conv`), so the converter is a name-for-name map. The network is frozen: BatchNorm
statistics are plain parameters, never updated.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sfd_jax.models.layers import MATMUL_PRECISIONS, matmul_precision

Dtype = Any

INPUT_SIZE = 299
NUM_CLASSES = 1008  # the 2015 graph's softmax has 1008 outputs (1000 classes and 8 unused)
BN_EPS = 1e-3
# The precision of the features' matmuls and convolutions unless asked otherwise (`cli.evaluate --matmul_precision`;
# evaluation during training takes it too): the ADM evaluator's graph computes in float32, which a TPU's one
# bfloat16 pass ('default') or a GPU's TF32 does not reproduce.
FID_MATMUL_PRECISION = "highest"


def _tf1_source_index(in_size: int, out_size: int):
  """Per output pixel: lower and upper source index and the lerp weight, as TF1's legacy (corner) scaler."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.arange(out_size, dtype=np.float32) * scale
  lower = np.floor(src)
  upper = np.minimum(np.ceil(src), in_size - 1).astype(np.int32)
  return lower.astype(np.int32), upper, (src - lower).astype(np.float32)


def resize_tf1_bilinear(images, size: int = INPUT_SIZE):
  """Bilinear resize of NHWC float32 images exactly as TF1 `ResizeBilinear(align_corners=False)`.

  The source coordinate is out·(in/out) (no half-pixel shift) and the lerps run in TF's order, first along x,
  then along y, in float32. pytorch-fid's `F.interpolate` uses half-pixel centres instead, which moves FID.
  """
  h, w = images.shape[1:3]
  if (h, w) == (size, size):
    return images
  y0, y1, dy = _tf1_source_index(h, size)
  x0, x1, dx = _tf1_source_index(w, size)
  top, bottom = images[:, y0], images[:, y1]
  dx = dx[None, None, :, None]
  top = top[:, :, x0] + (top[:, :, x1] - top[:, :, x0]) * dx
  bottom = bottom[:, :, x0] + (bottom[:, :, x1] - bottom[:, :, x0]) * dx
  return top + (bottom - top) * dy[None, :, None, None]


def preprocess(pixels, size: int = INPUT_SIZE):
  """Pixels in [0, 255] (uint8 or float, NHWC, any size) → the network input, as the graph computes it."""
  x = resize_tf1_bilinear(jnp.asarray(pixels, jnp.float32), size)
  return (x - 128.0) / 128.0  # the graph multiplies by 1/128, which is the same float32 operation


class FrozenBatchNorm(nn.Module):
  """Inference BatchNorm (x − mean)/sqrt(var + eps)·scale + bias, folded into one multiply-add like torch's."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    mean = self.param("mean", nn.initializers.zeros, (c,), jnp.float32)
    var = self.param("var", nn.initializers.ones, (c,), jnp.float32)
    alpha = scale * jax.lax.rsqrt(var + BN_EPS)
    return x * alpha.astype(self.dtype) + (bias - mean * alpha).astype(self.dtype)


class BasicConv2d(nn.Module):
  """Conv (no bias) → BatchNorm → ReLU. `padding` is (pad_h, pad_w), symmetric, as torch's."""
  features: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: tuple[int, int] = (0, 0)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, self.kernel, strides=self.stride, use_bias=False,
                padding=[(p, p) for p in self.padding], dtype=self.dtype, param_dtype=jnp.float32, name="conv")(x)
    return nn.relu(FrozenBatchNorm(self.dtype, name="bn")(x))


def _avg_pool_same(x):
  """3×3 stride-1 average pool whose border windows divide by the pixels inside, as TF's SAME pool does."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride=2, pad=0):
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class _Block(nn.Module):
  """Shared fields of the mixed blocks; `conv` builds a named BasicConv2d."""
  dtype: Dtype = jnp.float32

  def conv(self, name, features, kernel, stride=1, padding=(0, 0)):
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    return BasicConv2d(features, kernel, stride, padding, self.dtype, name=name)


class InceptionA(_Block):
  """35×35 block (Mixed_5b/c/d): 1×1, 5×5, double 3×3 and pooled branches."""
  pool_features: int = 32

  @nn.compact
  def __call__(self, x):
    b1 = self.conv("branch1x1", 64, 1)(x)
    b5 = self.conv("branch5x5_2", 64, 5, padding=(2, 2))(self.conv("branch5x5_1", 48, 1)(x))
    b3 = self.conv("branch3x3dbl_1", 64, 1)(x)
    b3 = self.conv("branch3x3dbl_3", 96, 3, padding=(1, 1))(self.conv("branch3x3dbl_2", 96, 3, padding=(1, 1))(b3))
    bp = self.conv("branch_pool", self.pool_features, 1)(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """35×35 → 17×17 reduction (Mixed_6a)."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3", 384, 3, stride=2)(x)
    bd = self.conv("branch3x3dbl_2", 96, 3, padding=(1, 1))(self.conv("branch3x3dbl_1", 64, 1)(x))
    bd = self.conv("branch3x3dbl_3", 96, 3, stride=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class InceptionC(_Block):
  """17×17 block (Mixed_6b–e) with factorised 7×7 convolutions.

  Returns the block output and its 1×1 branch: at Mixed_6d that branch is the graph's `mixed_6/conv`, whose first
  seven channels are the sFID features.
  """
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = self.conv("branch1x1", 192, 1)(x)
    b7 = self.conv("branch7x7_1", c7, 1)(x)
    b7 = self.conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
    bd = self.conv("branch7x7dbl_1", c7, 1)(x)
    bd = self.conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd)
    bd = self.conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd)
    bd = self.conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd)
    bd = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
    bp = self.conv("branch_pool", 192, 1)(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(_Block):
  """17×17 → 8×8 reduction (Mixed_7a)."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3_2", 320, 3, stride=2)(self.conv("branch3x3_1", 192, 1)(x))
    b7 = self.conv("branch7x7x3_1", 192, 1)(x)
    b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
    b7 = self.conv("branch7x7x3_4", 192, 3, stride=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(_Block):
  """8×8 block (Mixed_7b/c). The graph's last block pools with max instead of average (`max_pool=True`)."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = self.conv("branch1x1", 320, 1)(x)
    b3 = self.conv("branch3x3_1", 384, 1)(x)
    b3 = jnp.concatenate([self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                          self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)], axis=-1)
    bd = self.conv("branch3x3dbl_2", 384, 3, padding=(1, 1))(self.conv("branch3x3dbl_1", 448, 1)(x))
    bd = jnp.concatenate([self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
                          self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd)], axis=-1)
    pooled = _max_pool(x, stride=1, pad=1) if self.max_pool else _avg_pool_same(x)
    bp = self.conv("branch_pool", 192, 1)(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Classifier(nn.Module):
  """The 1008-way softmax layer; returns pool·W (what the ADM Inception Score uses) and pool·W + b."""

  @nn.compact
  def __call__(self, pool):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (pool.shape[-1], NUM_CLASSES), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (NUM_CLASSES,), jnp.float32)
    unbiased = jnp.dot(pool, kernel)
    return unbiased, unbiased + bias


class InceptionV3(nn.Module):
  """Raw pixels (B, H, W, 3) in [0, 255] → the graph's features.

  Returns a dict: `pool` (B, 2048) = `pool_3`; `spatial` (B, 17, 17, 192) = `mixed_6/conv`; `logits_unbiased`
  (B, 1008) = `softmax/logits/MatMul`, which the ADM Inception Score uses; `logits` = the same plus the fc bias.
  `matmul_precision` (one of `layers.MATMUL_PRECISIONS`) is that of every convolution and matmul:
  `FID_MATMUL_PRECISION` unless asked otherwise.
  """
  dtype: Dtype = jnp.float32
  matmul_precision: str = FID_MATMUL_PRECISION

  def __post_init__(self):
    if self.matmul_precision not in MATMUL_PRECISIONS:
      raise ValueError(f"matmul_precision {self.matmul_precision!r} is not one of {MATMUL_PRECISIONS}")
    super().__post_init__()

  @nn.compact
  def __call__(self, pixels):
    with matmul_precision(self.matmul_precision):
      kw = dict(dtype=self.dtype)
      conv = lambda name, f, k, s=1, p=(0, 0): BasicConv2d(f, (k, k), s, p, name=name, **kw)
      x = preprocess(pixels).astype(self.dtype)
      x = conv("Conv2d_1a_3x3", 32, 3, 2)(x)
      x = conv("Conv2d_2a_3x3", 32, 3)(x)
      x = _max_pool(conv("Conv2d_2b_3x3", 64, 3, p=(1, 1))(x))
      x = conv("Conv2d_3b_1x1", 80, 1)(x)
      x = _max_pool(conv("Conv2d_4a_3x3", 192, 3)(x))
      for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
        x = InceptionA(pool_features=pool_features, name=name, **kw)(x)
      x = InceptionB(name="Mixed_6a", **kw)(x)
      for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        x, branch1x1 = InceptionC(channels_7x7=c7, name=name, **kw)(x)
        if name == "Mixed_6d":
          spatial = branch1x1
      x = InceptionD(name="Mixed_7a", **kw)(x)
      x = InceptionE(name="Mixed_7b", **kw)(x)
      x = InceptionE(max_pool=True, name="Mixed_7c", **kw)(x)
      pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
      logits_unbiased, logits = Classifier(name="fc")(pool)
      return {"pool": pool, "spatial": spatial.astype(jnp.float32), "logits_unbiased": logits_unbiased,
              "logits": logits}

  def dummy_inputs(self):
    return (jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.uint8),)
