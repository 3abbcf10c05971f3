"""Image sources for evaluation: ADM `.npz` batches, image folders, tfds splits and in-memory arrays.

A source has a length, an image shape (H, W, 3) and `read(indices)` → uint8 (n, H, W, 3) for ascending indices.
`.npz` batches are streamed from the zip member, so a 50,000-image batch (9.8 GB at 256 px) is never held whole.
Folders and tfds splits of mixed sizes are brought to one size with the ADM centre crop.
"""
from __future__ import annotations

import hashlib
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from sfd_jax.data.images import adm_center_crop

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
_FORMS = "an ADM .npz batch (arr_0: uint8 N×H×W×3), a folder of images, or tfds:NAME[:SPLIT]"


def _check_images(images, what: str) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{what}: expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}; convert "
                     "samples with clip(127.5·x + 128, 0, 255).astype(uint8) in NHWC")
  return images


class ArrayImages:
  """An in-memory uint8 (N, H, W, 3) array."""

  def __init__(self, images, name: str = "array"):
    self.images = _check_images(images, name)
    self.name = name
    self.shape = self.images.shape[1:]

  def __len__(self):
    return len(self.images)

  def read(self, indices) -> np.ndarray:
    return self.images[np.asarray(indices, np.int64)]


class NpzImages:
  """The `arr_0` array of an npz file, streamed in increasing index order (reading backwards reopens the file)."""

  def __init__(self, path, key: str = "arr_0"):
    self.path, self.name = Path(path), str(path)
    self._member = f"{key}.npy"
    try:
      with zipfile.ZipFile(self.path) as zf:
        if self._member not in zf.namelist():
          raise ValueError(f"{path} has no '{key}' array (it holds {sorted(zf.namelist())}); an ADM batch stores "
                           f"its images as {key}")
    except (zipfile.BadZipFile, OSError) as e:
      raise ValueError(f"cannot read {path}: it is corrupt or not an .npz file ({e})") from e
    self._open()
    if self._fortran or self._dtype != np.uint8 or len(self._shape) != 4 or self._shape[-1] != 3:
      self.close()
      raise ValueError(f"{path}: {key} is {self._dtype} {self._shape}{' (Fortran order)' if self._fortran else ''};"
                       " the ADM format stores uint8 images (N, H, W, 3) in C order")
    self.shape = tuple(self._shape[1:])
    self._row_bytes = int(np.prod(self.shape))

  def _open(self):
    self._zip = zipfile.ZipFile(self.path)
    self._stream = self._zip.open(self._member)
    version = np.lib.format.read_magic(self._stream)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read_header:
      raise ValueError(f"{self.path}: unsupported .npy format version {version} for {self._member}")
    self._shape, self._fortran, self._dtype = read_header[version](self._stream)
    self._next = 0

  def close(self):
    self._stream.close()
    self._zip.close()

  def __len__(self):
    return self._shape[0]

  def _read_rows(self, count: int) -> bytes:
    data = self._stream.read(count * self._row_bytes)
    if len(data) != count * self._row_bytes:
      raise ValueError(f"{self.path}: {self._member} ends early at row {self._next}; the file is truncated")
    self._next += count
    return data

  def read(self, indices) -> np.ndarray:
    indices = np.asarray(indices, np.int64)
    if len(indices) and indices[0] < self._next:
      self.close()
      self._open()
    runs = np.split(indices, np.flatnonzero(np.diff(indices) != 1) + 1) if len(indices) else []
    chunks = []
    for run in runs:
      while self._next < run[0]:  # skip forward in bounded reads
        self._read_rows(min(run[0] - self._next, 64))
      chunks.append(np.frombuffer(self._read_rows(len(run)), np.uint8).reshape(len(run), *self.shape))
    return np.concatenate(chunks) if chunks else np.zeros((0, *self.shape), np.uint8)


def _load_image(path: Path, size: int | None) -> np.ndarray:
  try:
    with Image.open(path) as image:
      rgb = np.asarray(image.convert("RGB"))
      return adm_center_crop(rgb, size) if size else rgb
  except OSError as e:
    raise ValueError(f"cannot read image {path}: {e}") from e


class FolderImages:
  """Image files under a folder (recursively, sorted by relative path); `image_size` applies the ADM centre crop."""

  def __init__(self, root, image_size: int | None = None, workers: int = 8):
    self.root, self.name = Path(root), str(root)
    self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not self.files:
      raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    self.image_size = image_size
    self.workers = workers
    self.shape = _load_image(self.files[0], image_size).shape

  def __len__(self):
    return len(self.files)

  def read(self, indices) -> np.ndarray:
    files = [self.files[i] for i in indices]
    with ThreadPoolExecutor(self.workers) as pool:
      images = list(pool.map(lambda p: _load_image(p, self.image_size), files))
    for path, image in zip(files, images):
      if image.shape != self.shape:
        raise ValueError(f"{path} is {image.shape[1]}×{image.shape[0]} but {self.files[0]} is "
                         f"{self.shape[1]}×{self.shape[0]}; pass an image size to centre-crop them all alike")
    return np.stack(images) if images else np.zeros((0, *self.shape), np.uint8)


class TfdsImages:
  """The `image` feature of a prepared tfds split (array_record format), read with `tfds.data_source`."""

  def __init__(self, name: str, split: str = "train", data_dir=None, image_size: int | None = None):
    import tensorflow_datasets as tfds
    self.name = f"tfds:{name}:{split}"
    try:
      self.source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises many types for a missing or unprepared dataset
      raise ValueError(f"cannot open {self.name} (data_dir={data_dir}): {e}. Prepare it first, in array_record "
                       "format, e.g. `tfds build NAME --file_format=array_record`") from e
    self.image_size = image_size
    self.shape = self._convert(self.source[0]["image"]).shape

  def _convert(self, image) -> np.ndarray:
    image = np.asarray(image)
    return adm_center_crop(image, self.image_size) if self.image_size else image

  def __len__(self):
    return len(self.source)

  def read(self, indices) -> np.ndarray:
    images = [self._convert(self.source[int(i)]["image"]) for i in indices]
    for i, image in zip(indices, images):
      if image.shape != self.shape:
        raise ValueError(f"{self.name}[{i}] has shape {image.shape}, the first image {self.shape}; pass an image "
                         "size to centre-crop them all alike")
    return np.stack(images) if images else np.zeros((0, *self.shape), np.uint8)


class Subset:
  """The images of `source` at ascending `indices` (e.g. a random draw for a reference batch)."""

  def __init__(self, source, indices):
    self.source, self.indices = source, np.sort(np.asarray(indices, np.int64))
    self.name, self.shape = f"{source.name}[{len(self.indices)} images]", source.shape

  def __len__(self):
    return len(self.indices)

  def read(self, indices) -> np.ndarray:
    return self.source.read(self.indices[np.asarray(indices, np.int64)])


def open_images(spec, image_size: int | None = None, tfds_data_dir=None):
  """A source from an array, an `.npz` path, a folder, or `tfds:NAME[:SPLIT]` (a source is returned as is)."""
  if hasattr(spec, "read"):
    return spec
  if isinstance(spec, np.ndarray):
    return ArrayImages(spec)
  spec = str(spec)
  if spec.startswith("tfds:"):
    name, _, split = spec[len("tfds:"):].partition(":")
    return TfdsImages(name, split or "train", tfds_data_dir, image_size)
  path = Path(spec)
  if path.is_dir():
    return FolderImages(path, image_size)
  if not path.exists():
    raise FileNotFoundError(f"{spec} does not exist; give {_FORMS}")
  if path.suffix == ".npz":
    source = NpzImages(path)
    if image_size and source.shape[:2] != (image_size, image_size):
      raise ValueError(f"{spec} holds {source.shape[1]}×{source.shape[0]} images, not {image_size}×{image_size};"
                       " .npz batches are used as they are")
    return source
  raise ValueError(f"{spec} is neither a folder nor an .npz file; give {_FORMS}")


def _hash_files(files, root: Path | None = None) -> str:
  h = hashlib.sha256()
  for f in files:
    if root is not None:
      h.update(str(f.relative_to(root)).encode() + b"\0")
    with open(f, "rb") as stream:
      while block := stream.read(1 << 24):
        h.update(block)
  return h.hexdigest()


def digest(item) -> str | None:
  """SHA-256 of an input: a file's bytes, an array's bytes, a folder's image files (relative names and bytes, in
  order). None for tfds splits and subsets, which are named rather than hashed."""
  if isinstance(item, ArrayImages):
    return hashlib.sha256(np.ascontiguousarray(item.images).tobytes()).hexdigest()
  if isinstance(item, FolderImages):
    return _hash_files(item.files, item.root)
  if isinstance(item, NpzImages):
    return _hash_files([item.path])
  if isinstance(item, (TfdsImages, Subset)):
    return None
  return _hash_files([Path(item)])
