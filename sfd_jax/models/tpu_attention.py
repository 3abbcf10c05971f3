"""Multi-head self-attention as one Pallas kernel per direction on TPU, for sequences that fit on chip.

At the sequence lengths of SFD (256 tokens at 256 px, 261 for DINOv2 at 224 px) a whole head's scores fit in
VMEM, so neither kernel tiles the sequence. The forward kernel reads the qkv projection (B, N, 3·D) and writes the
output (B, N, D); the backward kernel reads qkv and the output's cotangent and writes d(qkv). Nothing else
reaches HBM: not the scores and probabilities (XLA's einsum-softmax-einsum writes and reads them in float32,
three times per layer in training), not q, k, v split into heads (a (…, head_dim) layout pads head_dim, 72 for
XL, to 128 lanes), and for the DiT not the QK-norm and RoPE either, which both kernels apply to q and k in VMEM
(the backward kernel recomputes them and also returns the norm weights' gradients per sample). The backward
kernel recomputes the softmax and uses rowsum(p·dp) for rowsum(o·do) (they are equal), so the forward pass saves
nothing but its input.

RoPE's pair rotation (x[2i], x[2i+1]) → (−x[2i+1], x[2i]) is a signed permutation, applied as a matmul with a
(head_dim × head_dim) ±1 matrix on the MXU, the float32 operand split into two bfloat16 parts (to 2⁻¹⁷ of it).

One grid step handles one sample. Each `pallas_call` carries a `pl.CostEstimate` (matmul FLOPs, exponentials, HBM
bytes) so that XLA's cost model, and the plan tool with it, sees the attention. The kernels see one device's
shard: `attention` wraps them in `jax.shard_map` over the batch axes of the mesh in context (Mosaic kernels are
not partitioned automatically), so the batch must split evenly over those devices (`splits`).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from sfd_jax import sharding as shd
from sfd_jax.errors import UserError

# A sample's qkv, output and cotangents, double-buffered, and one head's scores stay in VMEM.
_VMEM_LIMIT = 32 * 2 ** 20
_VMEM_BUDGET = 24 * 2 ** 20
_F32 = jnp.float32


def fits(n: int, width: int, itemsize: int) -> bool:
  """Whether the backward kernel's working set for N tokens of width D fits the VMEM budget."""
  blocks = 2 * (3 + 1 + 3) * n * width * itemsize  # qkv, do in; dqkv out; double-buffered
  return blocks + 4 * n * n * 4 <= _VMEM_BUDGET     # s, p, dp, ds of one head, float32


def splits(batch: int) -> bool:
  """Whether the kernels can run on a batch of `batch` samples under the mesh in context: each of its devices takes
  an equal share of the rows. A batch smaller than the device count (what the sampler's per-sample vmap traces:
  one sample, or its guided pair) runs whole on each device, and vmap splits the samples over the devices; a larger
  one must divide evenly. Without a mesh the kernels see the whole batch, as on one device."""
  mesh = jax.sharding.get_abstract_mesh()
  return mesh.empty or batch < shd.batch_devices(mesh) or batch % shd.batch_devices(mesh) == 0


def rotation(head_dim: int) -> np.ndarray:
  """R with x·R = rot(x): rot(x)[2i] = −x[2i+1], rot(x)[2i+1] = x[2i] (RoPE's pairs)."""
  r = np.zeros((head_dim, head_dim), np.float32)
  i = np.arange(0, head_dim, 2)
  r[i + 1, i], r[i, i + 1] = -1.0, 1.0
  return r


def _dot(a, b, dims, precision=None):
  """a·b with float32 accumulation, float32 operands at `precision` (the model's `matmul_precision`; None: the
  program's default). bfloat16 operands take the MXU's native precision, which is exact for them (Mosaic refuses a
  float32 contract precision on bfloat16, as a global `jax_default_matmul_precision` asks)."""
  precision = jax.lax.Precision.DEFAULT if a.dtype == jnp.bfloat16 else precision
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=_F32)


# The kernels' float32 matmul precision for a model's `matmul_precision`: None takes the program's default; Mosaic
# has no three-pass ('high') float32 matmul, so 'high' runs at 'highest' (at least the precision asked for).
_KERNEL_PRECISION = {"default": None, "high": jax.lax.Precision.HIGHEST, "highest": jax.lax.Precision.HIGHEST}

_NN = (((1,), (0,)), ((), ()))  # a·b
_NT = (((1,), (1,)), ((), ()))  # a·bᵀ
_TN = (((0,), (0,)), ((), ()))  # aᵀ·b


def _exact_dot(x, r, transpose: bool = False):
  """x·R (or x·Rᵀ) for a ±1 permutation R to 2⁻¹⁷ of |x| in two bfloat16 matmuls: hi is x with its mantissa cut to
  bfloat16's 8 bits (masked, so that no compiler may fold the split away as it may a float32 → bfloat16 → float32
  round trip), lo the rest rounded to bfloat16; R only moves and negates them."""
  hi = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(x, jnp.int32) & jnp.int32(-65536), _F32)
  lo = (x - hi).astype(jnp.bfloat16)
  hi = hi.astype(jnp.bfloat16)
  dims = _NT if transpose else _NN
  return _dot(hi, r, dims) + _dot(lo, r, dims)


def _norm_rope(x, w, cos, sin, r, eps):
  """RMS-normalise rows of x (times w), then RoPE; float32. Also returns (n, 1/rms) for the backward pass."""
  x = x.astype(_F32)
  inv = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  n = x * inv
  y = n * w
  return y * cos + _exact_dot(y, r) * sin, n, inv


def _norm_rope_vjp(dout, n, inv, w, cos, sin, r):
  """(dx, dw) of `_norm_rope` from the cotangent of its output."""
  dy = dout * cos + _exact_dot(dout * sin, r, transpose=True)
  dn = dy * w
  dx = inv * (dn - n * jnp.mean(dn * n, axis=-1, keepdims=True))
  return dx, jnp.sum(dy * n, axis=0, keepdims=True)


def _softmax(s):
  p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
  return p / jnp.sum(p, axis=-1, keepdims=True)


def _heads(qkv_ref, heads: int):
  """Per head: the column slices of q, k, v in the (N, 3·D) block."""
  d = qkv_ref.shape[-1] // 3
  hd = d // heads
  return [(slice(h * hd, (h + 1) * hd), slice(d + h * hd, d + (h + 1) * hd),
           slice(2 * d + h * hd, 2 * d + (h + 1) * hd), slice(h * hd, (h + 1) * hd)) for h in range(heads)]


def _forward_kernel(*refs, heads: int, scale: float, norm: bool, eps: float, precision):
  if norm:
    qkv_ref, wq_ref, wk_ref, cos_ref, sin_ref, r_ref, o_ref = refs
  else:
    qkv_ref, o_ref = refs
  dtype = qkv_ref.dtype
  for qs, ks, vs, os_ in _heads(qkv_ref, heads):
    q, k, v = qkv_ref[0, :, qs], qkv_ref[0, :, ks], qkv_ref[0, :, vs]
    if norm:
      tables = (cos_ref[...], sin_ref[...], r_ref[...])
      q = _norm_rope(q, wq_ref[...], *tables, eps)[0].astype(dtype)
      k = _norm_rope(k, wk_ref[...], *tables, eps)[0].astype(dtype)
    p = _softmax(_dot(q, k, _NT, precision) * scale)
    o_ref[0, :, os_] = _dot(p.astype(dtype), v, _NN, precision).astype(o_ref.dtype)


def _backward_kernel(*refs, heads: int, scale: float, norm: bool, eps: float, precision):
  if norm:
    qkv_ref, wq_ref, wk_ref, cos_ref, sin_ref, r_ref, do_ref, dqkv_ref, dw_ref = refs
    tables = (cos_ref[...], sin_ref[...], r_ref[...])
    dwq = dwk = jnp.zeros((1, wq_ref.shape[-1]), _F32)
  else:
    qkv_ref, do_ref, dqkv_ref = refs
  dtype = qkv_ref.dtype
  for qs, ks, vs, os_ in _heads(qkv_ref, heads):
    q, k, v, do = qkv_ref[0, :, qs], qkv_ref[0, :, ks], qkv_ref[0, :, vs], do_ref[0, :, os_]
    if norm:
      q, nq, iq = _norm_rope(q, wq_ref[...], *tables, eps)
      k, nk, ik = _norm_rope(k, wk_ref[...], *tables, eps)
      q, k = q.astype(dtype), k.astype(dtype)
    p = _softmax(_dot(q, k, _NT, precision) * scale)
    dp = _dot(do, v, _NT, precision)
    ds = (p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True)) * scale).astype(dtype)
    dq = _dot(ds, k, _NN, precision)
    dk = _dot(ds, q, _TN, precision)
    if norm:
      dq, dwq_h = _norm_rope_vjp(dq, nq, iq, wq_ref[...], *tables)
      dk, dwk_h = _norm_rope_vjp(dk, nk, ik, wk_ref[...], *tables)
      dwq, dwk = dwq + dwq_h, dwk + dwk_h
    dqkv_ref[0, :, qs] = dq.astype(dqkv_ref.dtype)
    dqkv_ref[0, :, ks] = dk.astype(dqkv_ref.dtype)
    dqkv_ref[0, :, vs] = _dot(p.astype(dtype), do, _TN, precision).astype(dqkv_ref.dtype)
  if norm:
    dw_ref[0, 0:1, :] = dwq
    dw_ref[0, 1:2, :] = dwk


def _cost(qkv, heads: int, backward: bool, norm: bool) -> pl.CostEstimate:
  """Per sample: 2 (forward) or 5 (backward) attention matmuls, the RoPE rotations, exp and rsqrt; the bytes of
  qkv, the output and (backward) the cotangent and d(qkv)."""
  b, n, three_d = qkv.shape
  d = three_d // 3
  hd = d // heads
  matmuls = 5 if backward else 2
  flops = 2 * matmuls * n * n * d
  if norm:  # x·R for q and k, hi and lo parts, each 2·n·hd² per head; backward: recomputed, plus the vjp's
    flops += (2 if backward else 1) * 2 * 2 * 2 * n * hd * d
  arrays = (3 + 1 + 3) if backward else (3 + 1)
  return pl.CostEstimate(flops=b * flops, transcendentals=b * heads * (n * n + (2 * n if norm else 0)),
                         bytes_accessed=arrays * b * n * d * jnp.dtype(qkv.dtype).itemsize)


def _pallas(kernel, qkv, extra, tail, out_shapes, heads, backward, norm, interpret):
  """One kernel over the batch: grid step i reads sample i of qkv (and of the arrays in `tail`), the whole of
  each array in `extra` (weights, tables), and writes sample i of every output."""
  b, n, _ = qkv.shape
  sample = lambda x: pl.BlockSpec((1, *x.shape[1:]), lambda i: (i,) + (0,) * (x.ndim - 1))
  whole = lambda x: pl.BlockSpec(x.shape, lambda i: (0,) * x.ndim)
  return pl.pallas_call(
      kernel, grid=(b,),
      in_specs=[sample(qkv)] + [whole(x) for x in extra] + [sample(x) for x in tail],
      out_specs=[sample(s) for s in out_shapes], out_shape=out_shapes,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",), vmem_limit_bytes=_VMEM_LIMIT),
      cost_estimate=_cost(qkv, heads, backward, norm), interpret=interpret)(qkv, *extra, *tail)


def _on_shards(fn, batch: int, n_rows: int, n_args: int, outputs: int):
  """fn on each device's rows of the batch: the first `n_rows` arguments (qkv, the cotangent) are split by rows,
  the rest (weights, tables) replicated. A batch the devices do not divide is refused rather than computed whole on
  every device (`layers.attention` gives it to XLA's attention instead)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:  # one program over the whole batch (one device, or an initialisation's dummy batch)
    return fn
  devices = shd.batch_devices(mesh)
  if not splits(batch):
    raise UserError(f"the Pallas attention kernels split the batch over the mesh's {devices} devices, and {batch} "
                    f"samples do not divide evenly: use a batch that is a multiple of {devices}, or "
                    "model.attention='auto' (XLA's attention for such a batch)")  # rather than all of it everywhere
  rows = P(shd.BATCH_AXES) if devices > 1 and batch >= devices else P()
  in_specs = (*([rows] * n_rows), *([P()] * (n_args - n_rows)))
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=(rows,) * outputs, check_vma=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def _attention(qkv, wq, wk, cos, sin, heads, scale, norm, eps, interpret, precision):
  return _attention_fwd(qkv, wq, wk, cos, sin, heads, scale, norm, eps, interpret, precision)[0]


def _extra(wq, wk, cos, sin, norm):
  """The whole-array kernel inputs: norm weights (1, head_dim), RoPE tables (N, head_dim), the rotation R."""
  if not norm:
    return ()
  return (wq[None], wk[None], cos, sin, jnp.asarray(rotation(wq.shape[-1]), jnp.bfloat16))


def _attention_fwd(qkv, wq, wk, cos, sin, heads, scale, norm, eps, interpret, precision):
  kernel = functools.partial(_forward_kernel, heads=heads, scale=scale, norm=norm, eps=eps, precision=precision)

  def forward(qkv, *extra):
    out = jax.ShapeDtypeStruct((*qkv.shape[:-1], qkv.shape[-1] // 3), qkv.dtype)
    return tuple(_pallas(kernel, qkv, extra, (), [out], heads, False, norm, interpret))

  extra = _extra(wq, wk, cos, sin, norm)
  out = _on_shards(forward, qkv.shape[0], 1, 1 + len(extra), 1)(qkv, *extra)[0]
  return out, (qkv, wq, wk, cos, sin)


def _attention_bwd(heads, scale, norm, eps, interpret, precision, residuals, do):
  qkv, wq, wk, cos, sin = residuals
  kernel = functools.partial(_backward_kernel, heads=heads, scale=scale, norm=norm, eps=eps, precision=precision)

  def backward(qkv, do, *extra):
    outs = [jax.ShapeDtypeStruct(qkv.shape, qkv.dtype)]
    if norm:
      outs.append(jax.ShapeDtypeStruct((qkv.shape[0], 2, wq.shape[-1]), _F32))
    return tuple(_pallas(kernel, qkv, extra, (do,), outs, heads, True, norm, interpret))

  extra = _extra(wq, wk, cos, sin, norm)
  out = _on_shards(backward, qkv.shape[0], 2, 2 + len(extra), 1 + norm)(qkv, do, *extra)
  zeros = lambda x: jnp.zeros_like(x)
  if not norm:
    return out[0], zeros(wq), zeros(wk), zeros(cos), zeros(sin)
  dw = jnp.sum(out[1], axis=0)  # the norm weights are shared by every sample and head
  return out[0], dw[0].astype(wq.dtype), dw[1].astype(wk.dtype), zeros(cos), zeros(sin)


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(qkv, heads: int, norm_rope=None, eps: float = 1e-6, interpret: bool = False,
              precision: str = "default"):
  """Self-attention of the qkv projection (B, N, 3·D) ([q | k | v], each head-major) → (B, N, D) with the kernels
  above; `norm_rope` = (q_weight, k_weight, cos, sin) applies the QK-norm and RoPE first (see
  `layers.attention`). Under a mesh in context (`sharding.traced_with_mesh`), whose devices must divide the batch
  (`splits`), each device runs them on its rows; without one they see the whole batch. `precision` ('default',
  'high', 'highest': the model's `matmul_precision`) sets the kernels' float32 matmuls (`_KERNEL_PRECISION`).
  `interpret` runs the kernels' jaxpr on any platform (tests)."""
  hd = qkv.shape[-1] // 3 // heads
  precision = _KERNEL_PRECISION[precision]
  if norm_rope is None:
    w, table = jnp.ones((hd,), _F32), jnp.zeros((qkv.shape[1], hd), _F32)
    return _attention(qkv, w, w, table, table, heads, 1.0 / math.sqrt(hd), False, eps, interpret, precision)
  wq, wk, cos, sin = norm_rope
  cos, sin = jnp.asarray(cos, _F32), jnp.asarray(sin, _F32)
  return _attention(qkv, wq.astype(_F32), wk.astype(_F32), cos, sin, heads, 1.0 / math.sqrt(hd), True, eps,
                    interpret, precision)
