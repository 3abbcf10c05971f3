"""ReDi-style semantic channels: a PCA of DINOv2 tokens, the alternative to the Semantic VAE's latents.

A fitted PCA maps a DINO token x (D,) to k channels z = components · ((x − mean) / std): tokens are standardised
per dimension by the mean and std of the fitting sample (a constant dimension keeps std 1, as sklearn's
StandardScaler), and the components are the top-k eigenvectors of the standardised tokens' covariance (their
correlation matrix), largest eigenvalue first, each signed so that its entry of largest magnitude is positive
(sklearn's `svd_flip` convention; of entries equal in magnitude up to rounding, the first): the same sample always
gives the same numbers. The fit is exact, not
randomised: the mean and centred scatter are accumulated in float64 over every token of the sample (merged batch by
batch, Chan et al.) and the correlation matrix is eigendecomposed (`numpy.linalg.eigh`).

The PCA is data, never a pickle: one safetensors file holding `mean`, `std` (D,), `components` (k, D),
`explained_variance` and `explained_variance_ratio` (k,), all float32, with the header's metadata naming the
format, the number of tokens fitted on, the DINOv2 weights that made them (`dino_sha256`, when known) and what
they were read from. The official extraction's `dino_pca_ch8` source reads a pickled sklearn PCA instead; sfd_jax
does not load pickles, so fit the PCA here (`python -m sfd_jax.cli.fit_pca`).
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from sfd_jax import storage
from sfd_jax.errors import UserError

FORMAT = "sfd_jax.dino_pca"
VERSION = "1"
ARRAYS = ("mean", "std", "components", "explained_variance", "explained_variance_ratio")
FIT_HINT = "fit one with `python -m sfd_jax.cli.fit_pca`"


class PCAFileError(UserError):
  """A PCA file that is missing, not one sfd_jax wrote, or inconsistent."""


@dataclasses.dataclass(frozen=True)
class Projection:
  """The static shape of a PCA's projection (what jit specialises on); its arrays are `PCA.variables()`."""
  feature_dim: int
  latent_channels: int

  def apply(self, variables, tokens):
    """(..., D) tokens → (..., k) channels; the matmul at full float32 precision (TPUs default to bfloat16)."""
    params = variables["params"]
    standardised = (tokens.astype(jnp.float32) - params["mean"]) / params["std"]
    return jnp.einsum("...d,kd->...k", standardised, params["components"], precision=jax.lax.Precision.HIGHEST)


@dataclasses.dataclass(frozen=True)
class PCA:
  """A fitted PCA of D-dim tokens to k channels (float32 arrays) and where its tokens came from."""
  mean: np.ndarray                      # (D,)
  std: np.ndarray                       # (D,)
  components: np.ndarray                # (k, D), rows orthonormal
  explained_variance: np.ndarray        # (k,) eigenvalues of the standardised tokens' covariance
  explained_variance_ratio: np.ndarray  # (k,) their share of the total (the number of non-constant dimensions)
  num_tokens: int
  dino_sha256: str | None = None        # the DINOv2 weights whose tokens it was fitted on
  fitted_on: dict = dataclasses.field(default_factory=dict)

  @property
  def projection(self) -> Projection:
    return Projection(feature_dim=self.components.shape[1], latent_channels=self.components.shape[0])

  def variables(self) -> dict:
    return {"params": {k: np.asarray(getattr(self, k), np.float32) for k in ("mean", "std", "components")}}

  def info(self) -> dict:
    """What meta.json records of it (beside its path and digest)."""
    return {"num_tokens": self.num_tokens, "fitted_on": self.fitted_on,
            "explained_variance_ratio": [float(v) for v in self.explained_variance_ratio],
            **({"trained_on": {"dino_sha256": self.dino_sha256}} if self.dino_sha256 else {})}


class TokenMoments:
  """Count, mean and centred scatter matrix (float64) of D-dim tokens, mergeable batch by batch (Chan et al.)."""

  def __init__(self, dim: int):
    self.count, self.mean, self.scatter = 0, np.zeros(dim), np.zeros((dim, dim))

  def update(self, tokens) -> None:
    x = np.asarray(tokens, np.float64).reshape(-1, self.mean.shape[0])
    if not x.shape[0]:
      return
    n, batch_mean = x.shape[0], x.mean(0)
    centred = x - batch_mean
    total = self.count + n
    delta = batch_mean - self.mean
    self.scatter += centred.T @ centred + np.outer(delta, delta) * (self.count * n / total)
    self.mean += delta * (n / total)
    self.count = total


def fit(token_batches: Iterable, channels: int, *, dino_sha256: str | None = None,
        fitted_on: Mapping | None = None) -> PCA:
  """The exact PCA to `channels` components of every token in `token_batches` (arrays (..., D))."""
  moments = None
  for tokens in token_batches:
    tokens = np.asarray(tokens)
    moments = moments or TokenMoments(tokens.shape[-1])
    moments.update(tokens)
  if moments is None or moments.count < 2:
    raise UserError("the PCA needs at least two DINO tokens to fit; give it images or features")
  dim = moments.mean.shape[0]
  if not 1 <= channels <= dim:
    raise UserError(f"the PCA's channels={channels} must be between 1 and the DINO token width {dim}")
  covariance = moments.scatter / (moments.count - 1)
  variance = np.diag(covariance).copy()
  std = np.sqrt(np.where(variance > 0, variance, 1.0))
  values, vectors = np.linalg.eigh(covariance / np.outer(std, std))  # ascending eigenvalues
  order = np.argsort(values)[::-1][:channels]
  components = vectors[:, order].T
  # The first entry within rounding of the largest magnitude: entries of equal size (a component (e_i − e_j)/√2)
  # would otherwise leave the sign to the last bits of eigh's output, which differ between numpy builds.
  magnitude = np.abs(components)
  leading = np.argmax(magnitude >= magnitude.max(1, keepdims=True) * (1 - 1e-6), axis=1)
  components = components * np.sign(components[np.arange(channels), leading])[:, None]
  explained = values[order]
  return PCA(mean=moments.mean.astype(np.float32), std=std.astype(np.float32),
             components=components.astype(np.float32), explained_variance=explained.astype(np.float32),
             explained_variance_ratio=(explained / values.sum()).astype(np.float32), num_tokens=moments.count,
             dino_sha256=dino_sha256, fitted_on=dict(fitted_on or {}))


def sample_indices(total: int, num: int, seed: int) -> np.ndarray:
  """`num` distinct indices of `total` (all when `num` is 0 or at least `total`), drawn by `seed`, in order."""
  if not num or num >= total:
    return np.arange(total)
  return np.sort(np.random.default_rng(seed).permutation(total)[:num])


# ------------------------------------------------------------------------------------------------------------ files

def to_bytes(pca: PCA) -> bytes:
  metadata = {"format": FORMAT, "version": VERSION, "num_tokens": str(pca.num_tokens),
              "dino_sha256": pca.dino_sha256 or "", "fitted_on": json.dumps(pca.fitted_on)}
  return safetensors.numpy.save({k: np.ascontiguousarray(getattr(pca, k), np.float32) for k in ARRAYS},
                                metadata=metadata)


def save(pca: PCA, path) -> None:
  """Writes `pca` as one safetensors file (local or gs://), whole or not at all."""
  storage.write_bytes(path, to_bytes(pca))


def load(path) -> PCA:
  """The PCA `save` wrote at `path`; a missing, foreign or inconsistent file is a `PCAFileError`."""
  path = storage.path(path)
  if not path.exists():
    raise PCAFileError(f"the PCA file {path} does not exist; {FIT_HINT}")
  if path.is_dir():
    raise PCAFileError(f"{path} is a directory; pass the PCA's .safetensors file ({FIT_HINT})")
  data = path.read_bytes()
  size = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
  try:
    if not 0 < size <= len(data) - 8:
      raise ValueError("no safetensors header")
    metadata = json.loads(data[8:8 + size]).get("__metadata__") or {}
  except ValueError:
    raise PCAFileError(f"{path} is not a PCA file of sfd_jax (not safetensors: a pickled sklearn PCA such as the "
                       f"official redi_pcs/dino_pca_model.pth is not read); {FIT_HINT}") from None
  if metadata.get("format") != FORMAT:
    raise PCAFileError(f"{path} is a safetensors file but not a PCA of sfd_jax (its metadata has no format "
                       f"{FORMAT!r}); {FIT_HINT}")
  if metadata.get("version") != VERSION:
    raise PCAFileError(f"{path} is a PCA file of version {metadata.get('version')!r}, which this sfd_jax (version "
                       f"{VERSION}) does not read; fit it again with `python -m sfd_jax.cli.fit_pca`")
  try:
    arrays = safetensors.numpy.load(data)
  except Exception as e:  # safetensors' own error type for a truncated or corrupt file
    raise PCAFileError(f"{path} is truncated or corrupt ({e}); {FIT_HINT}") from None
  missing = [k for k in ARRAYS if k not in arrays]
  if missing:
    raise PCAFileError(f"{path} has no {', '.join(missing)}; {FIT_HINT}")
  k, d = arrays["components"].shape if arrays["components"].ndim == 2 else (0, 0)
  shapes_fit = (k and arrays["mean"].shape == arrays["std"].shape == (d,)
                and arrays["explained_variance"].shape == arrays["explained_variance_ratio"].shape == (k,))
  if not shapes_fit or not all(np.isfinite(a).all() for a in arrays.values()) or not (arrays["std"] > 0).all():
    raise PCAFileError(f"{path} holds inconsistent arrays ({ {n: a.shape for n, a in arrays.items()} }, or "
                       f"non-finite values, or a std ≤ 0); {FIT_HINT}")
  return PCA(**{n: arrays[n] for n in ARRAYS}, num_tokens=int(metadata.get("num_tokens") or 0),
             dino_sha256=metadata.get("dino_sha256") or None, fitted_on=json.loads(metadata.get("fitted_on", "{}")))


# ----------------------------------------------------------------------------------------------- stored features

def stored_tokens(path, num_images: int = 0, seed: int = 0, batch_size: int = 64):
  """(token batches (n, D) float32 of `num_images` records drawn by `seed`, the DINOv2 digest or None, a
  description) of stored DINO tokens: a DINOv2 feature file (`sfd_jax.data.features`, .safetensors) or a latent
  dataset that stores its DINO tokens."""
  from sfd_jax.data import features as features_lib, latents as latents_lib
  if str(path).endswith(".safetensors"):
    source, key, dino_sha256 = features_lib.FeatureFile(path), "features", None
  else:
    source, key = latents_lib.LatentSource(path), "dino"
    if not source.spec["dino_dtype"]:
      raise UserError(f"the latent dataset {path} stores no DINO tokens (it was extracted with --dino_dtype=none); "
                      "fit the PCA from its images instead (--source, --path and --dino)")
    dino_sha256 = source.meta.get("encoders", {}).get("dino", {}).get("sha256")
  indices = sample_indices(len(source), num_images, seed)

  def batches():
    for start in range(0, len(indices), batch_size):
      rows = [np.asarray(source[int(i)][key], np.float32) for i in indices[start:start + batch_size]]
      yield np.stack(rows).reshape(-1, rows[0].shape[-1])
  return batches(), dino_sha256, {"features": str(path), "records": len(indices), "seed": seed}
