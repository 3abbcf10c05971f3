"""Inception features of an image source, in fixed-size batches split over every device of a mesh.

Each process reads only its own rows of every global batch (`host_rows`), the jitted network runs on all
devices, and the features come back whole to every process (`to_host`). The last batch is padded with black
images in the rows past the source's end, which are cut off the features, so one compiled program serves a whole
source; reading the next batch overlaps with the device computing this one.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from tqdm.auto import tqdm

from sfd_jax.data.images import ArrayImages, image_shape, read_images
from sfd_jax.errors import UserError
from sfd_jax.models.inception import InceptionV3
from sfd_jax.sharding import batch_sharding, check_batch_size, host_rows, make_mesh, replicated, shard_batch, to_host

SPATIAL_CHANNELS = 7  # sFID uses the first 7 of the 192 channels of mixed_6/conv (Nash et al. 2021, ADM)


@dataclasses.dataclass(frozen=True)
class Activations:
  """Per-image features: `pool` (N, 2048) for FID and precision/recall, `spatial` (N, 17·17·7) for sFID
  (flattened in (h, w, c) order, as ADM reshapes the NHWC map), `logits` (N, 1008) unbiased, for IS."""
  pool: np.ndarray
  spatial: np.ndarray
  logits: np.ndarray

  def __len__(self):
    return len(self.pool)


def _features(model: InceptionV3, variables, pixels):
  out = model.apply(variables, pixels)
  spatial = out["spatial"][..., :SPATIAL_CHANNELS]
  return {"pool": out["pool"], "spatial": spatial.reshape(spatial.shape[0], -1), "logits": out["logits_unbiased"]}


class FeatureExtractor:
  """Callable: image source (see `sfd_jax.data.images`) or uint8 (N, H, W, 3) array of images → `Activations`, with
  a progress bar on process 0."""

  def __init__(self, model: InceptionV3, variables, mesh=None, per_device_batch: int = 32):
    self.mesh = mesh if mesh is not None else make_mesh()
    self.batch_size = per_device_batch * self.mesh.devices.size
    check_batch_size(self.mesh, self.batch_size)
    self.rows = host_rows(self.mesh, self.batch_size)
    self.variables = jax.device_put(variables, replicated(self.mesh))
    self._apply = jax.jit(functools.partial(_features, model), out_shardings=batch_sharding(self.mesh, 2))

  def _local_batch(self, source, start: int, shape) -> np.ndarray:
    rows = start + self.rows
    real = rows < len(source)
    padded = np.zeros((len(rows), *shape), np.uint8)
    padded[real] = read_images(source, rows[real].tolist(), shape)
    return padded

  def __call__(self, source, desc: str = "Inception features") -> Activations:
    if hasattr(source, "shape") and hasattr(source, "dtype"):  # samples in memory, as `open_images` takes them
      source = ArrayImages(np.asarray(source), name="the image array")
    n = len(source)
    if n == 0:
      raise UserError(f"{getattr(source, 'name', 'the image source')} holds no images")
    chunks, pending, shape = [], None, image_shape(source)
    with tqdm(total=n, desc=desc, unit="img", disable=jax.process_index() != 0) as bar:
      for start in range(0, n, self.batch_size):
        result = self._apply(self.variables, shard_batch(self.mesh, self._local_batch(source, start, shape)))
        if pending is not None:
          chunks.append(self._collect(*pending, bar))
        pending = (result, min(self.batch_size, n - start))
      chunks.append(self._collect(*pending, bar))
    return Activations(**{k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]})

  @staticmethod
  def _collect(result, count: int, bar) -> dict:
    bar.update(count)
    return {k: np.asarray(v)[:count] for k, v in to_host(result).items()}
