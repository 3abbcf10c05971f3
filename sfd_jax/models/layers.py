"""Building blocks shared by the SFD networks: the dtype policy, attention, norms, SwiGLU, position tables,
timestep embedding.

The dtype policy is the same in every network (DiT, DINOv2, SemVAE, texture VAE): parameters, and so the
optimiser state, are float32; matmuls and the activations between layers run in the module's `dtype` (the
config's `model.dtype`, bfloat16 on accelerators); softmax, the statistics of every norm, RoPE and the timestep
features are computed in float32 and cast back once, inside the same fusion, so they cost no extra memory traffic.

Fixed tables (2-D sin-cos, RoPE) are computed in numpy at trace time: they are constants, not parameters, and
they reproduce the official float64 (sin-cos) and float32 (RoPE) recipes exactly.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sfd_jax.errors import UserError
from sfd_jax.models import tpu_attention

Dtype = Any


def dense(features: int, dtype: Dtype, name: str | None = None, kernel_init=nn.initializers.lecun_normal(),
          use_bias: bool = True) -> nn.Dense:
  """A Dense layer under the dtype policy: float32 parameters, the matmul in `dtype`."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init,
                  name=name)


def cast_kernels(variables, dtype):
  """`variables` with every matmul weight (the `kernel` leaves of Dense and Conv) in the compute `dtype`: what
  each layer casts it to anyway, done once, e.g. before a sampler's ODE loop rather than in every model call."""
  def cast(path, x):
    return x.astype(dtype) if getattr(path[-1], "key", None) == "kernel" else x
  return jax.tree_util.tree_map_with_path(cast, variables)


# The attention implementations a model can ask for; `auto` takes the platform's fused kernel where it has one.
ATTENTION = ("auto", "xla", "pallas", "cudnn")
# What each kernel needs of the device (the sentence of the error when it is asked for elsewhere).
_KERNEL_NEEDS = {"pallas": "a TPU", "cudnn": "an NVIDIA GPU of compute capability 8.0 or later (Ampere, e.g. A100, "
                                              "L4, H100; not a T4 or V100)"}
# The matmul precisions a model can run at: `default` leaves the platform's choice (on TPU one bfloat16 pass for
# float32 operands, TF32 on Ampere and later GPUs, full float32 on CPU) and any `jax_default_matmul_precision` the
# program sets; `high` is three bfloat16 passes on TPU (about float32's accuracy); `highest` is full float32.
MATMUL_PRECISIONS = ("default", "high", "highest")
# Two attention outputs (or gradients) agree when they differ by bfloat16 rounding: a relative L2 error up to a few
# of its units. A kernel that is wrong (a head dropped, a wrong scale, a misplaced block) is off by far more.
BF16_ROUNDING = 2.0 ** -8
ATTENTION_TOLERANCE = 4 * BF16_ROUNDING


def _cuda_capability(device) -> tuple[int, ...] | None:
  """(major, minor) of an NVIDIA GPU, None for other devices (a ROCm GPU reports no numeric capability)."""
  try:
    return tuple(int(v) for v in str(device.compute_capability).split(".")[:2])
  except (AttributeError, ValueError):
    return None


def attention_kernel(requested: str, device) -> str:
  """The attention that `requested` (one of `ATTENTION`) runs on `device` (a jax Device, or anything with its
  `platform`, `device_kind` and, on GPUs, `compute_capability`): 'xla', 'pallas' or 'cudnn'.

  `auto` picks the Pallas kernels on TPU and cuDNN's fused attention on NVIDIA GPUs of compute capability 8.0 or
  later (what cuDNN's flash attention supports), XLA's elsewhere; a kernel the device lacks is a user error.
  """
  if requested not in ATTENTION:
    raise UserError(f"model.attention={requested!r} is not one of {ATTENTION}")
  capability = _cuda_capability(device) if device.platform == "gpu" else None
  available = {"pallas": device.platform == "tpu", "cudnn": capability is not None and capability >= (8, 0)}
  if requested == "auto":
    return next((kernel for kernel, ok in available.items() if ok), "xla")
  if requested != "xla" and not available[requested]:
    raise UserError(f"model.attention={requested!r} needs {_KERNEL_NEEDS[requested]}, and this device is a "
                    f"{getattr(device, 'device_kind', device.platform)}: use model.attention='auto' or 'xla'")
  return requested


def matmul_precision(name: str):
  """The context a network's matmuls and convolutions are traced in (`jax.default_matmul_precision`), so that every
  one of them, and its gradient, carries the precision of `name` (one of `MATMUL_PRECISIONS`)."""
  if name not in MATMUL_PRECISIONS:
    raise ValueError(f"matmul_precision {name!r} is not one of {MATMUL_PRECISIONS}")
  return contextlib.nullcontext() if name == "default" else jax.default_matmul_precision(name)


def _cudnn_fits(dtype, head_dim: int) -> bool:
  """cuDNN's flash attention: bfloat16 or float16, head_dim a multiple of 8 up to 128 (the bound of Ampere)."""
  return dtype in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128


def attention(qkv, num_heads: int, norm_rope=None, eps: float = 1e-6, implementation: str = "auto",
              precision: str = "default"):
  """Multi-head self-attention of a fused qkv projection (B, N, 3·D), [q | k | v] each head-major → (B, N, D),
  softmax(q·kᵀ/√head_dim)·v in qkv's dtype with a float32 softmax.

  `norm_rope` = (q_weight, k_weight, cos, sin): q and k are first RMS-normalised per head, times the (head_dim,)
  weights shared by all heads, and rotated by RoPE with (N, head_dim) tables (the DiT's QK-norm), in float32.

  The one attention of every network here; `implementation` (one of `ATTENTION`, a model's `attention` field)
  chooses it in this one place. `auto`, for the platform the program is compiled for: on TPU the Pallas kernels
  of `tpu_attention` (QK-norm, RoPE and scores kept in VMEM), when a mesh is in context
  (`sharding.traced_with_mesh`; the jitted steps enter theirs), the batch splits evenly over its devices and a
  sample's working set fits on chip; on NVIDIA GPUs of compute capability ≥ 8.0 cuDNN flash attention where it
  applies (bfloat16/float16, head_dim a multiple of 8 up to 128); otherwise XLA's einsum-softmax-einsum (CPU, where
  the parity tests check it). `xla` is always XLA's; `pallas` and `cudnn` ask for that kernel, and a shape it
  cannot take is a user error. `precision` (one of `MATMUL_PRECISIONS`, the model's) is also handed to the Pallas
  kernels, whose backward pass is traced outside the model's `matmul_precision` context.
  """
  b, n, three_d = qkv.shape
  head_dim = three_d // 3 // num_heads
  if implementation not in ATTENTION:
    raise UserError(f"model.attention={implementation!r} is not one of {ATTENTION}")

  def split_heads(qkv):
    qkv = qkv.reshape(b, n, 3, num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if norm_rope is not None:
      wq, wk, cos, sin = norm_rope
      q = apply_rope(rms_normalize(q, eps) * wq, cos, sin).astype(qkv.dtype)
      k = apply_rope(rms_normalize(k, eps) * wk, cos, sin).astype(qkv.dtype)
    return q, k, v

  def xla(qkv):
    return jax.nn.dot_product_attention(*split_heads(qkv), implementation="xla").reshape(b, n, -1)

  def cudnn(qkv):
    return jax.nn.dot_product_attention(*split_heads(qkv), implementation="cudnn").reshape(b, n, -1)

  def kernels(qkv):
    return tpu_attention.attention(qkv, num_heads, norm_rope, eps, precision=precision)

  fits_chip = tpu_attention.fits(n, three_d // 3, jnp.dtype(qkv.dtype).itemsize)
  if implementation == "xla":
    return xla(qkv)
  if implementation == "cudnn":
    if not _cudnn_fits(qkv.dtype, head_dim):
      raise UserError(f"model.attention='cudnn' takes bfloat16 or float16 (model.dtype) and a head width that is a "
                      f"multiple of 8 up to 128, not {jnp.dtype(qkv.dtype).name} and {head_dim}: use "
                      "model.attention='auto' or 'xla'")
    return cudnn(qkv)
  if implementation == "pallas":
    if not fits_chip:
      raise UserError(f"model.attention='pallas': {n} tokens of width {three_d // 3} do not fit the kernel's VMEM "
                      "budget (a sample's scores stay on chip): use model.attention='auto' or 'xla'")
    return kernels(qkv)
  if (jax.default_backend() == "gpu" and attention_kernel("auto", jax.devices()[0]) == "cudnn"
      and _cudnn_fits(qkv.dtype, head_dim)):
    return cudnn(qkv)
  if fits_chip and not jax.sharding.get_abstract_mesh().empty and tpu_attention.splits(b):
    return jax.lax.platform_dependent(qkv, tpu=kernels, default=xla)
  return xla(qkv)


def attention_error(got, want) -> float:
  """‖got − want‖ / ‖want‖ over all elements, in float32: how far an attention output (or gradient) is from XLA's."""
  got, want = jnp.asarray(got, jnp.float32), jnp.asarray(want, jnp.float32)
  return float(jnp.linalg.norm(got - want) / jnp.maximum(jnp.linalg.norm(want), jnp.finfo(jnp.float32).tiny))


def compare_attention(outputs: dict, reference: dict, implementation: str, where: str) -> None:
  """Stops (a user error) when an output of the `implementation` kernel, named by its key in `outputs`, differs
  from XLA attention's (`reference`) beyond bfloat16 rounding (`ATTENTION_TOLERANCE`); the message says how to go
  on without the kernel."""
  for name, want in reference.items():
    error = attention_error(outputs[name], want)
    if not error <= ATTENTION_TOLERANCE:
      raise UserError(f"the {implementation} attention kernel's {name} differs from XLA attention's on {where} by "
                      f"{error:.3g} (relative L2; bfloat16 rounding allows {ATTENTION_TOLERANCE:.3g}): the kernel is "
                      "wrong on this platform; set model.attention='xla' (--config.model.attention=xla, or "
                      "--attention=xla when sampling) to run without it")


def rms_normalize(x, eps: float = 1e-6):
  """x·rsqrt(mean(x²) + eps) over the last axis, in float32 (returned as float32)."""
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
  """y = x·rsqrt(mean(x²) + eps) · weight (init 1), computed in float32 and returned in `dtype` (float32 for a
  caller that goes on computing in float32, such as adaLN modulation or RoPE)."""
  eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    return (rms_normalize(x, self.eps) * scale).astype(self.dtype)


class NormWeight(nn.Module):
  """A norm's learnable per-channel weight `scale` (init 1), for a caller that applies the norm itself (the
  DiT's QK-norm, fused into the attention kernel)."""
  features: int

  @nn.compact
  def __call__(self):
    return self.param("scale", nn.initializers.ones, (self.features,), jnp.float32)


def swiglu_hidden(width: int, mlp_ratio: float) -> int:
  """The official SwiGLU hidden width: int(2/3 · int(width · mlp_ratio))."""
  return int(2 / 3 * int(width * mlp_ratio))


class SwiGLU(nn.Module):
  """out = w3(silu(a) · b) with [a | b] = w12(x); the state-dict names are `w12` and `w3`."""
  hidden: int
  dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    a, b = jnp.split(dense(2 * self.hidden, self.dtype, "w12", self.kernel_init)(x), 2, axis=-1)
    return dense(x.shape[-1], self.dtype, "w3", self.kernel_init)(nn.silu(a) * b)


def modulate(x, shift, scale):
  """adaLN modulation of token features (B, N, D) by per-sample (B, D) shift and scale."""
  return x * (1 + scale[:, None]) + shift[:, None]


def timestep_embedding(t, dim: int = 256, max_period: float = 10000.0):
  """[cos(t·f) | sin(t·f)], f_k = exp(−ln(max_period)·k/half), always float32; t is the raw time (not ×1000)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """MAE 1-D table in float64: [sin(pos·ω) | cos(pos·ω)], ω_k = 10000^(−k/(dim/2))."""
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_size: int, grid_width: int | None = None) -> np.ndarray:
  """MAE 2-D table (h·w, dim), float32, row-major. Channels [0, dim/2) encode the column w, [dim/2, dim) the row h."""
  width = grid_size if grid_width is None else grid_width
  h, w = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij")
  return np.concatenate([sincos_1d(dim // 2, w), sincos_1d(dim // 2, h)], axis=1).astype(np.float32)


def rope_2d(head_dim: int, grid_size: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
  """2-D RoPE tables (cos, sin), each (grid_size², head_dim), float32, as `VisionRotaryEmbeddingFast(head_dim/2)`.

  The first head_dim/2 dims rotate with the row h, the rest with the column w; each frequency covers an
  adjacent pair of dims (f0, f0, f1, f1, ...).
  """
  dim = head_dim // 2
  freqs = (1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float32)[: dim // 2] / np.float32(dim))).astype(np.float32)
  pos = (np.arange(grid_size, dtype=np.float32) / np.float32(grid_size) * np.float32(grid_size)).astype(np.float32)
  f = np.repeat(np.einsum("l,f->lf", pos, freqs), 2, axis=-1)  # (L, dim), interleaved pairs
  angles = np.concatenate([np.broadcast_to(f[:, None, :], (grid_size, grid_size, dim)),
                           np.broadcast_to(f[None, :, :], (grid_size, grid_size, dim))], axis=-1)
  angles = angles.reshape(grid_size * grid_size, head_dim)
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x, cos, sin):
  """x·cos + rot(x)·sin with rot pairing adjacent dims: rot(x)[2i] = −x[2i+1], rot(x)[2i+1] = x[2i]; float32.

  x: (B, N, heads, head_dim); cos, sin: (N, head_dim). Written as shifts by one lane and sign-folded sine tables
  (exactly the same sums) so that XLA fuses it with the norm before it instead of materialising the pairs.
  """
  x = x.astype(jnp.float32)
  even = np.arange(x.shape[-1]) % 2 == 0
  sin = np.asarray(sin, np.float32)
  sin_next = np.where(even, -sin, 0).astype(np.float32)[:, None, :]  # multiplies x[i+1] at even i
  sin_prev = np.where(even, 0, sin).astype(np.float32)[:, None, :]   # multiplies x[i−1] at odd i
  pad = [(0, 0)] * (x.ndim - 1)
  x_next = jnp.pad(x[..., 1:], pad + [(0, 1)])
  x_prev = jnp.pad(x[..., :-1], pad + [(1, 0)])
  return x * np.asarray(cos, np.float32)[:, None, :] + x_next * sin_next + x_prev * sin_prev


def posterior_std(logvar):
  """exp(logvar / 2), the standard deviation of a diagonal Gaussian posterior."""
  return jnp.exp(0.5 * logvar)


def posterior_sample(mean, logvar, rng):
  """The reparameterised sample mean + std·ε, ε ~ N(0, I) (what the official texture extraction stores)."""
  return mean + posterior_std(logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
