"""A pre-extracted DINOv2 feature file, as the official `extract_dinov2_feature.py` writes it, for SemVAE training.

One safetensors file holding `patch_tokens` (N, L, D) float16 (DINOv2's final-norm patch tokens, L = 16² at
224 px), `cls_tokens` (N, D) and `class_indices` (N,). The file is memory-mapped (`official.read_safetensors`
checks its header against its size) and read row by row, never loaded whole: ImageNet's is about 0.5 TB. Records
are {'features': float32 (h, w, D) token grid (row-major, as the official (L, D) sequences), 'label', 'index'},
the float16 values read back exactly (the official `.float()`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import grain
import numpy as np

from sfd_jax import storage
from sfd_jax.data import latents as latents_lib
from sfd_jax.data.official import read_safetensors

TOKENS_KEY, LABELS_KEY = "patch_tokens", "class_indices"


class FeatureFile:
  """Random access to the token grids of a feature file (grain's data-source protocol).

  The memory map is opened in each process that reads (grain workers receive the path, not the mapped arrays).
  """

  def __init__(self, path):
    self.path = storage.filesystem_path(path, "the feature file").absolute()  # memory-mapped: local files
    if not self.path.exists():
      raise latents_lib.DatasetError(f"the feature file {self.path} does not exist; pass the .safetensors file of "
                                     "DINOv2 features (patch_tokens, class_indices) to train on")
    arrays = read_safetensors(self.path)
    missing = [k for k in (TOKENS_KEY, LABELS_KEY) if k not in arrays]
    if missing:
      raise latents_lib.DatasetError(f"{self.path} has no {', '.join(missing)} (it holds {sorted(arrays)}); a "
                                     f"feature file needs {TOKENS_KEY} (N, L, D) and {LABELS_KEY} (N,)")
    tokens, labels = arrays[TOKENS_KEY], arrays[LABELS_KEY]
    side = math.isqrt(tokens.shape[1]) if tokens.ndim == 3 else 0
    if tokens.ndim != 3 or side * side != tokens.shape[1] or labels.shape != tokens.shape[:1]:
      raise latents_lib.DatasetError(f"{self.path}: {TOKENS_KEY} {tokens.shape} and {LABELS_KEY} {labels.shape} "
                                     "are not (N, L, D) tokens of a square grid and their N labels")
    self.grid = (side, side, tokens.shape[2])
    self.name = str(self.path)
    self._size = tokens.shape[0]
    self._arrays = None

  def _open(self):
    if self._arrays is None:
      self._arrays = read_safetensors(self.path)
    return self._arrays

  def __getstate__(self):
    return {**self.__dict__, "_arrays": None}

  def __len__(self):
    return self._size

  def where(self, index) -> str:
    return f"row {index} of {self.path}"

  def __getitem__(self, index):
    arrays, index = self._open(), int(index)
    return {"features": np.asarray(arrays[TOKENS_KEY][index], np.float32).reshape(self.grid),
            "label": np.int32(arrays[LABELS_KEY][index]), "index": np.int64(index)}

  def describe(self) -> dict:
    return {"features": str(self.path), "records": len(self), "grid": list(self.grid)}


def feature_pipeline(source, *, global_batch_size: int, seed: int, shuffle: bool = True,
                     num_epochs: int | None = None, rows: Sequence[int] | None = None, start_batch: int = 0,
                     num_workers: int = 0, prefetch: int = 8) -> grain.DatasetIterator:
  """An iterator over this host's `rows` (`sharding.host_rows`; default all) of each global batch of records
  ({'features': float32 (b, h, w, D), 'label', 'index'}) of a `FeatureFile` (or a `Subset` of one), from
  `start_batch`, in the fixed order of one global sequence as `images.image_pipeline`'s."""
  flat = grain.MapDataset.source(source).seed(seed)
  if shuffle:
    flat = flat.shuffle()
  return latents_lib.host_batches(flat.repeat(num_epochs), global_batch_size, rows=rows, start_batch=start_batch,
                                  num_workers=num_workers, prefetch=prefetch)
