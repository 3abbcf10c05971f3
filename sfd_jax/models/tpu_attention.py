"""Softmax attention as one Pallas kernel per direction on TPU, for sequences that fit on chip.

At the sequence lengths of SFD (256 tokens at 256 px, 261 for DINOv2 at 224 px) a whole head's scores fit in
VMEM, so neither kernel tiles the sequence: the forward kernel reads q, k, v and writes the output, the backward
kernel reads q, k, v and the output's cotangent and writes dq, dk, dv; the scores and probabilities never reach
HBM (XLA's einsum-softmax-einsum writes and reads them in float32, three times per layer in training). The
backward kernel recomputes the softmax from q and k and uses rowsum(p·dp) for rowsum(o·do) (they are equal), so
the forward pass saves nothing beyond its inputs.

Both kernels take (B, N, heads·head_dim) arrays, the layout the qkv projection writes and the output projection
reads, and slice the heads inside VMEM: a (…, head_dim) layout would pad head_dim (72 for XL) to 128 lanes in HBM.
One grid step handles one sample. Each `pallas_call` carries a `pl.CostEstimate` (its matmul FLOPs, exponentials
and HBM bytes) so that XLA's cost model, and with it the plan tool, still sees the attention.

The kernels see one device's shard: `attention` wraps them in `jax.shard_map` over the batch axes of the mesh in
context (Mosaic kernels are not partitioned automatically).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from sfd_jax import sharding as shd

# The kernels keep a sample's q, k, v, output (and cotangents), double-buffered, and one head's scores in VMEM.
_VMEM_LIMIT = 32 * 2 ** 20
_VMEM_BUDGET = 24 * 2 ** 20


def fits(q) -> bool:
  """Whether the backward kernel's working set for (B, N, heads, head_dim) q fits the VMEM budget."""
  _, n, h, d = q.shape
  blocks = 2 * 7 * n * h * d * jnp.dtype(q.dtype).itemsize  # q, k, v, do in; dq, dk, dv out; double-buffered
  scores = 4 * n * n * 4                                     # s, p, dp, ds of one head, float32
  return blocks + scores <= _VMEM_BUDGET


def _scores(q, k, scale):
  return jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale


def _softmax(s):
  p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
  return p / jnp.sum(p, axis=-1, keepdims=True)


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, *, heads: int, scale: float):
  d = q_ref.shape[-1] // heads
  for h in range(heads):
    cols = slice(h * d, (h + 1) * d)
    v = v_ref[0, :, cols]
    p = _softmax(_scores(q_ref[0, :, cols], k_ref[0, :, cols], scale))
    o_ref[0, :, cols] = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(o_ref.dtype)


def _backward_kernel(q_ref, k_ref, v_ref, do_ref, dq_ref, dk_ref, dv_ref, *, heads: int, scale: float):
  d = q_ref.shape[-1] // heads
  t = (((0,), (0,)), ((), ()))  # contract the rows of both operands: aᵀ·b
  for h in range(heads):
    cols = slice(h * d, (h + 1) * d)
    q, k, v, do = q_ref[0, :, cols], k_ref[0, :, cols], v_ref[0, :, cols], do_ref[0, :, cols]
    p = _softmax(_scores(q, k, scale))
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds = (p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True)) * scale).astype(q.dtype)
    dv_ref[0, :, cols] = jax.lax.dot_general(p.astype(do.dtype), do, t, preferred_element_type=jnp.float32
                                             ).astype(dv_ref.dtype)
    dq_ref[0, :, cols] = jnp.dot(ds, k, preferred_element_type=jnp.float32).astype(dq_ref.dtype)
    dk_ref[0, :, cols] = jax.lax.dot_general(ds, q, t, preferred_element_type=jnp.float32).astype(dk_ref.dtype)


def _call(kernel, inputs, outputs: int, heads: int, matmuls: int, interpret: bool):
  """One kernel over the batch: grid step i reads and writes sample i of every (B, N, D) array."""
  b, n, width = inputs[0].shape
  spec = pl.BlockSpec((1, n, width), lambda i: (i, 0, 0))
  itemsize = jnp.dtype(inputs[0].dtype).itemsize
  cost = pl.CostEstimate(flops=2 * matmuls * b * n * n * width, transcendentals=b * heads * n * n,
                         bytes_accessed=(len(inputs) + outputs) * b * n * width * itemsize)
  out = pl.pallas_call(
      kernel, grid=(b,), in_specs=[spec] * len(inputs), out_specs=[spec] * outputs,
      out_shape=[jax.ShapeDtypeStruct(inputs[0].shape, inputs[0].dtype)] * outputs,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",), vmem_limit_bytes=_VMEM_LIMIT),
      cost_estimate=cost, interpret=interpret)(*inputs)
  return out


def _on_shards(fn, mesh, batch: int):
  """fn on each device's rows of the batch (every device computes all of a batch the devices do not divide)."""
  spec = P(shd.BATCH_AXES) if batch % shd.batch_devices(mesh) == 0 else P()
  return jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attention(q, k, v, heads, scale, interpret):
  kernel = functools.partial(_forward_kernel, heads=heads, scale=scale)
  forward = lambda args: _call(kernel, args, 1, heads, 2, interpret)[0]
  return _on_shards(forward, jax.sharding.get_abstract_mesh(), q.shape[0])((q, k, v))


def _attention_fwd(q, k, v, heads, scale, interpret):
  return _attention(q, k, v, heads, scale, interpret), (q, k, v)


def _attention_bwd(heads, scale, interpret, residuals, do):
  kernel = functools.partial(_backward_kernel, heads=heads, scale=scale)
  backward = lambda args: tuple(_call(kernel, args, 3, heads, 5, interpret))
  return _on_shards(backward, jax.sharding.get_abstract_mesh(), do.shape[0])((*residuals, do))


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v, interpret: bool = False):
  """softmax(q·kᵀ/√head_dim)·v of (B, N, heads, head_dim) arrays with the kernels above; needs a mesh in context
  (`jax.sharding.use_abstract_mesh`) and `fits(q)`. `interpret` runs the kernels' jaxpr anywhere (tests)."""
  b, n, h, d = q.shape
  flat = lambda x: x.reshape(b, n, h * d)
  return _attention(flat(q), flat(k), flat(v), h, 1.0 / math.sqrt(d), interpret).reshape(b, n, h, d)
