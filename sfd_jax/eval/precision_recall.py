"""Improved precision and recall (Kynkäänniemi et al. 2019) with the ADM evaluator's batching and float16 distances.

Each set's manifold is the union of balls around its points whose squared radius is the distance to the k-th
nearest other point (k = 3). Precision: the fraction of samples inside the reference manifold; recall: the
fraction of reference points inside the sample manifold. As in ADM, squared distances of a 10,000 × 10,000 block
are computed from float16 features (float32 accumulation, float16 results) and the whole block falls back to
float32 when that overflows. Blocks run on the default JAX device.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

BATCH = 10000  # ADM's row and column batch sizes; they decide which blocks fall back to float32


def _round_f16(x):
  return x.astype(jnp.float16).astype(jnp.float32)


def _squared_distances(u, v, rounding):
  """max(‖u‖² − 2 u·v + ‖v‖², 0), rounding every intermediate result with `rounding` as ADM's graph does."""
  norm_u = rounding(jnp.sum(rounding(u * u), axis=1))
  norm_v = rounding(jnp.sum(rounding(v * v), axis=1))
  dots = rounding(jnp.dot(u, v.T, precision="highest"))
  d = rounding(rounding(norm_u[:, None] - rounding(2 * dots)) + norm_v[None, :])
  return jnp.maximum(d, 0.0)


@functools.partial(jax.jit, static_argnames="float16")
def pairwise_distances(u, v, float16: bool = True):
  """Squared distances (len(u), len(v)) in float32; with `float16`, ADM's half-precision block and fallback."""
  u, v = jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32)
  exact = lambda: _squared_distances(u, v, lambda x: x)
  if not float16:
    return exact()
  half = _squared_distances(_round_f16(u), _round_f16(v), _round_f16)
  return jax.lax.cond(jnp.all(jnp.isfinite(half)), lambda: half, exact)


@functools.partial(jax.jit, static_argnames=("count", "float16"))
def _merge_smallest(best, u, v, count: int, float16: bool):
  """The `count` smallest distances per row of u, over v's block and the running `best`."""
  d = pairwise_distances(u, v, float16)
  return -jax.lax.top_k(-jnp.concatenate([best, d], axis=1), count)[0]


@functools.partial(jax.jit, static_argnames="float16")
def _coverage(ref, ref_radii, samples, sample_radii, float16: bool):
  d = pairwise_distances(ref, samples, float16)
  ref_in = jnp.any(d <= sample_radii[None, :], axis=1)
  samples_in = jnp.any(d <= ref_radii[:, None], axis=0)
  return ref_in, samples_in


def manifold_radii(features, k: int = 3, row_batch: int = BATCH, col_batch: int = BATCH,
                   float16: bool = True) -> np.ndarray:
  """Squared distance of each point to its k-th nearest neighbour in the set (itself, at 0, not counted)."""
  features = np.asarray(features, np.float32)
  n = len(features)
  if n <= k:
    raise ValueError(f"precision/recall with k={k} needs more than {k} images per set, got {n}")
  radii = np.empty(n, np.float32)
  for r0 in range(0, n, row_batch):
    rows = features[r0:r0 + row_batch]
    best = jnp.full((len(rows), k + 1), jnp.inf, jnp.float32)
    for c0 in range(0, n, col_batch):
      best = _merge_smallest(best, rows, features[c0:c0 + col_batch], k + 1, float16)
    radii[r0:r0 + len(rows)] = np.asarray(best[:, k])
  return radii


@dataclasses.dataclass(frozen=True)
class PrecisionRecall:
  precision: float
  recall: float


def precision_recall(ref_features, sample_features, k: int = 3, row_batch: int = BATCH, col_batch: int = BATCH,
                     float16: bool = True) -> PrecisionRecall:
  """ADM's `compute_prec_recall`: radii of both sets, then who lies inside whose manifold, block by block."""
  ref = np.asarray(ref_features, np.float32)
  samples = np.asarray(sample_features, np.float32)
  if ref.ndim != 2 or samples.ndim != 2 or ref.shape[1] != samples.shape[1]:
    raise ValueError(f"precision/recall needs two (N, D) feature sets of the same D, got {ref.shape} and "
                     f"{samples.shape}")
  ref_radii = manifold_radii(ref, k, row_batch, col_batch, float16)
  sample_radii = manifold_radii(samples, k, row_batch, col_batch, float16)
  ref_in = np.zeros(len(ref), bool)
  samples_in = np.zeros(len(samples), bool)
  for r0 in range(0, len(ref), row_batch):
    r1 = r0 + row_batch
    for c0 in range(0, len(samples), col_batch):
      c1 = c0 + col_batch
      a, b = _coverage(ref[r0:r1], ref_radii[r0:r1], samples[c0:c1], sample_radii[c0:c1], float16)
      ref_in[r0:r1] |= np.asarray(a)
      samples_in[c0:c1] |= np.asarray(b)
  return PrecisionRecall(precision=float(samples_in.mean()), recall=float(ref_in.mean()))
