"""ADM reference batches: `.npz` files with images (`arr_0`, uint8 N×H×W×3) and/or Inception statistics (`mu`,
`sigma` of pool_3; `mu_s`, `sigma_s` of the spatial features). We read ADM's and write our own in that format."""
from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from sfd_jax import storage
from sfd_jax.data.images import NpzImages, image_shape, read_images
from sfd_jax.errors import UserError
from sfd_jax.eval.features import Activations, FeatureExtractor
from sfd_jax.eval.fid import Statistics, statistics

ADM_IMAGENET256 = ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
                   "VIRTUAL_imagenet256_labeled.npz")


@dataclasses.dataclass
class ReferenceBatch:
  """What a reference file holds: statistics (None if absent) and its images (None if absent)."""
  path: Path
  stats: Statistics | None
  spatial_stats: Statistics | None
  images: NpzImages | None


def read_reference(path) -> ReferenceBatch:
  """Opens an ADM reference batch; images are streamed later, statistics are read now."""
  path = storage.path(path)
  if not path.is_file():
    raise UserError(f"reference batch {path} not found. ADM's ImageNet 256×256 batch is {ADM_IMAGENET256}; "
                    "or write one from your own images with `python -m sfd_jax.cli.evaluate --write_ref`")
  try:
    with path.open("rb") as stream, np.load(stream) as f:
      keys = set(f.files)
      arrays = {k: f[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in keys}
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise UserError(f"cannot read reference batch {path}: it is corrupt or not an .npz file ({e})") from e

  def pair(mu, sigma):
    if (mu in arrays) != (sigma in arrays):
      raise UserError(f"reference batch {path} has {mu if mu in arrays else sigma} without "
                      f"{sigma if mu in arrays else mu}; rewrite it with both")
    return Statistics(arrays[mu], arrays[sigma]) if mu in arrays else None

  batch = ReferenceBatch(path, pair("mu", "sigma"), pair("mu_s", "sigma_s"),
                         NpzImages(path) if "arr_0" in keys else None)
  if batch.images is None and (batch.stats is None or batch.spatial_stats is None):
    raise UserError(f"reference batch {path} holds neither images (arr_0) nor both statistics (mu, sigma, mu_s, "
                    f"sigma_s); it has {sorted(keys)}")
  return batch


def _write_npy(zf: zipfile.ZipFile, name: str, array: np.ndarray):
  with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
    np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


def write_reference(path, source, extractor: FeatureExtractor, chunk: int = 256) -> Activations:
  """Writes `arr_0` (the source's images) and their statistics to a new ADM-format `.npz`; returns the features.

  Every process computes features; process 0 writes the file, which appears only when complete (local or gs://).
  """
  path = storage.path(path)
  if path.exists():
    raise UserError(f"{path} already exists; choose another path for the reference batch")
  acts = extractor(source, desc="reference features")
  if jax.process_index() == 0:
    shape = image_shape(source)
    stats, spatial = statistics(acts.pool), statistics(acts.spatial)
    with storage.staged_file(path) as partial, zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED,
                                                                allowZip64=True) as zf:
      with zf.open("arr_0.npy", "w", force_zip64=True) as f:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": (len(source), *shape)}
        np.lib.format.write_array_header_2_0(f, header)
        for start in range(0, len(source), chunk):
          f.write(read_images(source, range(start, min(start + chunk, len(source))), shape).tobytes())
      for name, array in (("mu", stats.mu), ("sigma", stats.sigma), ("mu_s", spatial.mu),
                          ("sigma_s", spatial.sigma)):
        _write_npy(zf, name, array)
  multihost_utils.sync_global_devices("sfd_jax.eval.write_reference")
  return acts
