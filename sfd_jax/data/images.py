"""Image sources and the ADM crops: what extraction, SemVAE training and evaluation read.

A source is a random-access sequence of records `{"image": uint8 (H, W, 3) RGB, "label": int, "index": int}` at
the image's own size, with `len`, a `name` and `where(i)` for messages, and `describe()` for provenance: a prepared
tfds dataset read with `tfds.data_source` (no TensorFlow), a folder of images (ImageNet-style class folders give
labels), an ADM `.npz` batch (streamed), an array, or scikit-learn's 8×8 digits upscaled (the demo's embedded data
set).
`Subset` and `CenterCropped` wrap a source. A record that cannot be decoded raises `UnreadableImage`, so a
caller can skip and list it (extraction, training) or stop naming it (evaluation).

The crops are ADM's (guided-diffusion `image_datasets.py`), with PIL exactly as ADM calls it: halve with a box
filter while the short side is at least twice the target, bicubic-resize the short side to the target, then cut
the centre square (`adm_center_crop`, what LightningDiT's extraction and the reference batches use) or a random
square after resizing the short side to a random size (`adm_random_crop`). `resize_center_crop` is torchvision's
Resize + CenterCrop instead, the official SemVAE features' preprocessing.
"""
from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import threading
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import grain
import numpy as np
from PIL import Image

from sfd_jax import storage
from sfd_jax.data import latents as latents_lib
from sfd_jax.errors import UserError

# torchvision's ImageFolder extensions (lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SOURCES = ("folder", "tfds", "digits")
CROPS = ("center", "random", "resize_center")


class UnreadableImage(ValueError):
  """An image that cannot be decoded (corrupt, truncated, not an image)."""

  def __init__(self, index: int, where: str, reason: str):
    super().__init__(f"image {index} ({where}) cannot be read: {reason}")
    self.index, self.where, self.reason = index, where, reason


# ----------------------------------------------------------------------------------------------------------- crops

def _resize_short_side(image: Image.Image, short: int) -> np.ndarray:
  """ADM: box-halve while the short side ≥ 2·short, then bicubic-resize so the short side is `short`."""
  while min(image.size) >= 2 * short:
    image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
  scale = short / min(image.size)
  return np.asarray(image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC))


def _as_pil(image) -> Image.Image:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
  return Image.fromarray(image)


def adm_center_crop(image, size: int) -> np.ndarray:
  """ADM's `center_crop_arr` of a uint8 (H, W, 3) image: (size, size, 3) uint8."""
  arr = _resize_short_side(_as_pil(image), size)
  top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  return arr[top:top + size, left:left + size]


def adm_random_crop(image, size: int, rng: np.random.Generator, min_crop_frac: float = 0.8,
                    max_crop_frac: float = 1.0) -> np.ndarray:
  """ADM's `random_crop_arr`: the short side is resized to a uniform integer in [⌈size/max⌉, ⌈size/min⌉], then a
  uniformly placed (size, size) square is cut. Draws (short side, top, left) from `rng` in that order."""
  short = int(rng.integers(math.ceil(size / max_crop_frac), math.ceil(size / min_crop_frac) + 1))
  arr = _resize_short_side(_as_pil(image), short)
  top = int(rng.integers(arr.shape[0] - size + 1))
  left = int(rng.integers(arr.shape[1] - size + 1))
  return arr[top:top + size, left:left + size]


def resize_center_crop(image, size: int, resize: int) -> np.ndarray:
  """torchvision's `Resize(resize, bicubic)` of a PIL image (PIL's antialiased bicubic, the long side
  int(resize·long/short)) then `CenterCrop(size)` (offsets round((H − size)/2)): the ImageNet evaluation transform
  the official SemVAE features were extracted with. (size, size, 3) uint8."""
  pil = _as_pil(image)
  w, h = pil.size
  if min(w, h) != resize:
    scaled = int(resize * max(w, h) / min(w, h))
    w, h = (resize, scaled) if w <= h else (scaled, resize)
    pil = pil.resize((w, h), resample=Image.BICUBIC)
  if min(w, h) < size:
    raise ValueError(f"a {resize} px resize is smaller than the {size} px centre crop")
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return np.asarray(pil)[top:top + size, left:left + size]


def hflip(image) -> np.ndarray:
  """The horizontal mirror of an (H, W, C) image (what the official extraction stores as `*_flip`)."""
  return np.ascontiguousarray(np.asarray(image)[:, ::-1])


# --------------------------------------------------------------------------------------------------------- sources

def _decode(data, index: int, where: str) -> np.ndarray:
  """A file path or encoded bytes → uint8 RGB array; any decoding failure → UnreadableImage."""
  try:
    with Image.open(data) as image:
      return np.asarray(image.convert("RGB"))
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError... per damage
    raise UnreadableImage(index, where, f"{type(e).__name__}: {e}") from e


class FolderImages:
  """Image files under `root`, found recursively and ordered by their relative path (the same order on every
  host and every run). In ImageNet-style class folders (`root/<class>/<image>`) the sorted first-level folder
  names are the labels 0, 1, ...; an image directly under `root` (e.g. a folder of samples) has label -1."""

  def __init__(self, root):
    self.root, self.name = storage.filesystem_path(root, "the image folder"), str(root)
    if not self.root.is_dir():
      raise UserError(f"image folder {self.root} does not exist; pass a directory of images (or of class folders "
                      "root/<class>/<image>)")
    files = [Path(dirpath, name).relative_to(self.root).as_posix() for dirpath, _, names in os.walk(self.root)
             for name in names if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and not name.startswith(".")]
    self.files = sorted(files, key=lambda f: f.split("/"))
    if not self.files:
      raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
    self.class_names = sorted(e.name for e in os.scandir(self.root) if e.is_dir())  # as torchvision's ImageFolder
    classes = {name: i for i, name in enumerate(self.class_names)}
    self.labels = [classes[f.split("/")[0]] if "/" in f else -1 for f in self.files]

  def __len__(self):
    return len(self.files)

  def where(self, index) -> str:
    return str(self.root / self.files[int(index)])

  def __getitem__(self, index):
    index = int(index)
    return {"image": _decode(self.root / self.files[index], index, self.where(index)), "label": self.labels[index],
            "index": index}

  def describe(self) -> dict:
    return {"source": "folder", "path": str(self.root.absolute()), "num_images": len(self),
            "class_names": self.class_names}


class _Named:
  """`where(i)`: how messages name image i of a source without files of its own."""

  def where(self, index) -> str:
    return f"{self.name}[{int(index)}]"


class TfdsImages(_Named):
  """A split of a prepared tfds dataset (array_record format), read with `tfds.data_source`: no TensorFlow.

  The image bytes are decoded here, not by tfds, so a corrupt image raises `UnreadableImage` for its record only.
  """

  def __init__(self, name: str, split: str = "train", data_dir: str | None = None, image_key: str = "image",
               label_key: str = "label"):
    import tensorflow_datasets as tfds
    self.tfds_name, self.split = name, split
    self.data_dir = str(storage.filesystem_path(data_dir, "the tfds data_dir")) if data_dir else None
    self.name = f"tfds:{name}:{split}"
    self.image_key, self.label_key = image_key, label_key
    try:
      builder = tfds.builder(name, data_dir=self.data_dir)
      self._source = builder.as_data_source(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
    except Exception as e:  # tfds raises many types for a missing, unprepared or non-array_record dataset
      raise UserError(f"cannot open the tfds dataset {name!r} split {split!r} in data_dir={data_dir!r} "
                      f"({type(e).__name__}: {e}); prepare it in array_record format first (`tfds build {name} "
                      "--file_format=array_record`) and pass its data_dir") from None
    label = builder.info.features[label_key] if label_key in builder.info.features else None
    self.class_names = list(label.names) if getattr(label, "names", None) else []

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    index = int(index)
    record = self._source[index]
    image = _decode(io.BytesIO(record[self.image_key]), index, self.where(index))
    label = int(record[self.label_key]) if self.label_key in record else -1
    return {"image": image, "label": label, "index": index}

  def describe(self) -> dict:
    return {"source": "tfds", "name": self.tfds_name, "split": self.split, "data_dir": self.data_dir,
            "num_images": len(self), "class_names": self.class_names}


class DigitsImages(_Named):
  """scikit-learn's 1,797 8×8 handwritten digits (ten classes), grey levels 0–16 → uint8 RGB, bicubic-upscaled to
  `size` px: a small labelled image set that ships with the install, for the demo and tests."""

  def __init__(self, size: int = 256):
    from sklearn.datasets import load_digits
    digits = load_digits()
    self.size, self.name = size, f"digits at {size} px"
    self._pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    self._labels = digits.target.astype(np.int64)
    self.class_names = [str(d) for d in range(10)]

  def __len__(self):
    return len(self._labels)

  def __getitem__(self, index):
    index = int(index)
    grey = Image.fromarray(self._pixels[index]).resize((self.size, self.size), resample=Image.BICUBIC)
    return {"image": np.asarray(grey.convert("RGB")), "label": int(self._labels[index]), "index": index}

  def describe(self) -> dict:
    return {"source": "digits", "size": self.size, "num_images": len(self), "class_names": self.class_names}


class ArrayImages(_Named):
  """An in-memory uint8 (N, H, W, 3) array (labels -1 unless given)."""

  def __init__(self, images, labels=None, name: str = "array"):
    self.images = check_images(images, name)
    self.labels = np.full(len(self.images), -1) if labels is None else np.asarray(labels, np.int64)
    self.name = name

  def __len__(self):
    return len(self.images)

  def __getitem__(self, index):
    return {"image": self.images[int(index)], "label": int(self.labels[int(index)]), "index": int(index)}

  def describe(self) -> dict:
    return {"source": "array", "num_images": len(self), "shape": list(self.images.shape[1:])}


class NpzImages(_Named):
  """The `arr_0` images (and `arr_1` labels, if stored) of an ADM-style `.npz` batch, streamed from the zip member:
  a 50,000-image batch (9.8 GB at 256 px) is never held whole. Reading in increasing index order is one pass;
  going back reopens the member."""

  def __init__(self, path, key: str = "arr_0"):
    self.path, self.name = storage.path(path), str(path)
    self._member, self._lock = f"{key}.npy", threading.Lock()
    try:
      with zipfile.ZipFile(self.path.open("rb")) as zf:
        if self._member not in zf.namelist():
          raise UserError(f"{path} has no '{key}' array (it holds {sorted(zf.namelist())}); an ADM batch stores "
                          f"its images as {key}")
        labels = np.load(zf.open("arr_1.npy")) if "arr_1.npy" in zf.namelist() else None
    except (zipfile.BadZipFile, OSError, ValueError) as e:
      raise UserError(f"cannot read {path}: it is corrupt or not an .npz file ({e})") from None
    self._open()
    if self._fortran or self._dtype != np.uint8 or len(self._shape) != 4 or self._shape[-1] != 3:
      self.close()
      raise UserError(f"{path}: {key} is {self._dtype} {self._shape}{' (Fortran order)' if self._fortran else ''};"
                      " the ADM format stores uint8 images (N, H, W, 3) in C order")
    self.shape = tuple(self._shape[1:])
    self._row_bytes = int(np.prod(self.shape))
    ok = labels is not None and labels.shape == (self._shape[0],)
    self.labels = labels.astype(np.int64) if ok else np.full(self._shape[0], -1)

  def _open(self):
    self._zip = zipfile.ZipFile(self.path.open("rb"))
    self._stream = self._zip.open(self._member)
    version = np.lib.format.read_magic(self._stream)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read_header:
      raise UserError(f"{self.path}: unsupported .npy format version {version} for {self._member}")
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
      raise UserError(f"{self.path}: {self._member} ends early at row {self._next}; the file is truncated")
    self._next += count
    return data

  def __getitem__(self, index):
    index = int(index)
    with self._lock:
      if index < self._next:
        self.close()
        self._open()
      while self._next < index:  # skip forward in bounded reads
        self._read_rows(min(index - self._next, 64))
      image = np.frombuffer(self._read_rows(1), np.uint8).reshape(self.shape)
    return {"image": image, "label": int(self.labels[index]), "index": index}

  def describe(self) -> dict:
    return {"source": "npz", "path": str(self.path), "num_images": len(self)}


class Subset:
  """The records of `source` at `indices` (their `index` stays the position in `source`)."""

  def __init__(self, source, indices: Sequence[int]):
    self.source, self.indices = source, np.asarray(indices, np.int64)
    self.name = f"{source.name}[{len(self.indices)} images]"

  def __len__(self):
    return len(self.indices)

  def where(self, i) -> str:
    return self.source.where(int(self.indices[int(i)]))

  def __getitem__(self, i):
    return self.source[int(self.indices[int(i)])]

  def describe(self) -> dict:
    return {**self.source.describe(), "subset": len(self), "subset_sha256": hashlib.sha256(
        self.indices.tobytes()).hexdigest()}


class CenterCropped:
  """The records of `source` with their images ADM-centre-cropped to `size` (sources of mixed sizes made alike)."""

  def __init__(self, source, size: int):
    self.source, self.size = source, size
    self.name = f"{source.name} (centre crop {size})"

  def __len__(self):
    return len(self.source)

  def where(self, index) -> str:
    return self.source.where(index)

  def __getitem__(self, index):
    record = self.source[index]
    return {**record, "image": adm_center_crop(record["image"], self.size)}

  def describe(self) -> dict:
    return {**self.source.describe(), "crop": f"ADM centre crop {self.size}"}


def open_source(source: str, path: str = "", tfds_name: str = "imagenet2012", split: str = "train",
                digits_size: int = 256):
  """The labelled image source a config or command line names: 'folder' (path = root of class folders), 'tfds'
  (tfds_name, split, path = data_dir) or 'digits' (digits_size px)."""
  if source == "folder":
    if not path:
      raise UserError("the folder source needs a path: the root of the class folders (root/<class>/<image>)")
    images = FolderImages(path)
    if not images.class_names or min(images.labels) < 0:
      raise UserError(f"{path} must hold class folders with the images in them (root/<class>/<image>): the "
                      "folder names are the labels")
    return images
  if source == "tfds":
    return TfdsImages(tfds_name, split, path or None)
  if source == "digits":
    return DigitsImages(digits_size)
  raise UserError(f"image source {source!r} is not one of {SOURCES}")


_FORMS = "an ADM .npz batch (arr_0: uint8 N×H×W×3), a folder of images, or tfds:NAME[:SPLIT]"


def open_images(spec, image_size: int | None = None, tfds_data_dir=None):
  """The source a command line names: an `.npz` batch, a folder, or `tfds:NAME[:SPLIT]` (also an array, or a source
  as is); `image_size` centre-crops folder and tfds images (an `.npz` batch must already have that size)."""
  if hasattr(spec, "__getitem__") and hasattr(spec, "describe"):
    return spec
  if isinstance(spec, np.ndarray):
    return ArrayImages(spec)
  spec = str(spec)
  if spec.startswith("tfds:"):
    name, _, split = spec[len("tfds:"):].partition(":")
    source = TfdsImages(name, split or "train", tfds_data_dir)
  elif storage.path(spec).is_dir():
    source = FolderImages(spec)
  elif not storage.path(spec).exists():
    raise UserError(f"{spec} does not exist; give {_FORMS}")
  elif spec.endswith(".npz"):
    source = NpzImages(spec)
    if image_size and source.shape[:2] != (image_size, image_size):
      raise UserError(f"{spec} holds {source.shape[1]}×{source.shape[0]} images, not {image_size}×{image_size};"
                      " .npz batches are used as they are")
    return source
  else:
    raise UserError(f"{spec} is neither a folder nor an .npz file; give {_FORMS}")
  return CenterCropped(source, image_size) if image_size else source


def check_images(images, what: str) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise UserError(f"{what}: expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}; convert "
                    "samples with clip(127.5·x + 128, 0, 255).astype(uint8) in NHWC")
  return images


def read_images(source, indices, shape=None) -> np.ndarray:
  """The images of `source` at `indices` as one uint8 (n, H, W, 3) array; every image must have the shape of the
  first (or `shape`), and an unreadable image is an error naming it (evaluation cannot skip images)."""
  images = []
  for i in indices:
    try:
      image = np.asarray(source[int(i)]["image"])
    except UnreadableImage as e:
      raise UserError(f"{e}; replace or remove it") from None
    shape = shape or image.shape
    if image.shape != tuple(shape):
      raise UserError(f"image {int(i)} of {source.name} is {image.shape[1]}×{image.shape[0]}, the first is "
                      f"{shape[1]}×{shape[0]}; pass an image size to centre-crop them all alike")
    images.append(image)
  return np.stack(images) if images else np.zeros((0, *(shape or (0, 0, 3))), np.uint8)


def image_shape(source) -> tuple:
  """(H, W, 3) of the first image (what a fixed-shape consumer of the whole source expects)."""
  return tuple(read_images(source, [0]).shape[1:])


def _hash_files(paths) -> str:
  h = hashlib.sha256()
  for name, path in paths:
    if name is not None:
      h.update(str(name).encode() + b"\0")
    with storage.path(path).open("rb") as stream:
      while block := stream.read(1 << 24):
        h.update(block)
  return h.hexdigest()


def digest(item) -> str | None:
  """SHA-256 of an input: a file's bytes, an array's bytes, a folder's image files (relative names and bytes, in
  order). None for tfds splits, subsets and crops, which are named rather than hashed."""
  if isinstance(item, ArrayImages):
    return hashlib.sha256(np.ascontiguousarray(item.images).tobytes()).hexdigest()
  if isinstance(item, FolderImages):
    return _hash_files((f, item.root / f) for f in item.files)
  if isinstance(item, NpzImages):
    return _hash_files([(None, item.path)])
  if isinstance(item, (TfdsImages, Subset, CenterCropped, DigitsImages)):
    return None
  return _hash_files([(None, Path(item))])


def heldout_split(num_images: int, heldout: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(train, held-out) sorted indices: `heldout` images drawn at random (seeded), the rest for training."""
  if not 0 <= heldout < num_images:
    raise UserError(f"cannot hold out {heldout} of {num_images} images; hold out fewer (data.heldout_images)")
  order = np.random.default_rng(seed).permutation(num_images)
  return np.sort(order[heldout:]), np.sort(order[:heldout])


class SkipUnreadable:
  """Reads past unreadable images: record i is the first readable one of i, i+1, ... (cyclically).

  Training needs a record at every position of its fixed sequence; standing in the next readable image keeps the
  sequence (and so the run) deterministic. Each unreadable image is logged once per process.
  """

  def __init__(self, source):
    self.source = source
    self._logged = set()

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    n = len(self.source)
    for step in range(n):
      try:
        return self.source[(int(index) + step) % n]
      except UnreadableImage as e:
        if e.index not in self._logged:
          self._logged.add(e.index)
          logging.warning("%s; the next readable image stands in for it", e)
    raise UnreadableImage(int(index), "every image", "no image of the source can be read")


# -------------------------------------------------------------------------------------------------------- pipeline

def view(record: Mapping, rng: np.random.Generator | None, *, resolution: int, crop: str = "center",
         min_crop_frac: float = 0.8, flip: bool = False, resize: int = 0) -> dict:
  """A record cropped to `resolution` ('center': ADM centre crop; 'random': ADM random crop, then a flip with
  probability 1/2 if `flip`; 'resize_center': `resize_center_crop` after a `resize` px resize) → {'image',
  'label', 'index'}."""
  if crop == "center":
    image = adm_center_crop(record["image"], resolution)
  elif crop == "resize_center":
    image = resize_center_crop(record["image"], resolution, resize)
  elif crop == "random":
    image = adm_random_crop(record["image"], resolution, rng, min_crop_frac)
    if flip and rng.random() < 0.5:
      image = hflip(image)
  else:
    raise UserError(f"crop {crop!r} is not one of {CROPS}")
  return {"image": image, "label": np.int32(record["label"]), "index": np.int64(record["index"])}


def image_pipeline(source, *, global_batch_size: int, seed: int, resolution: int, crop: str = "random",
                   min_crop_frac: float = 0.8, flip: bool = False, resize: int = 0, shuffle: bool = True,
                   num_epochs: int | None = None, rows: Sequence[int] | None = None,
                   start_batch: int = 0, num_workers: int = 0, prefetch: int = 8) -> grain.DatasetIterator:
  """An iterator over this host's `rows` (`sharding.host_rows`; default all) of each global batch of cropped
  images, from `start_batch`
  ({'image': uint8 (b, res, res, 3), 'label', 'index'}); unreadable images are stood in for (`SkipUnreadable`).

  Order and crops are fixed per position of one global sequence (as `latents.latent_pipeline`), so the batches
  do not depend on the number of hosts; `num_epochs=None` repeats forever.
  """
  if crop not in CROPS:
    raise UserError(f"crop {crop!r} is not one of {CROPS}")
  flat = grain.MapDataset.source(SkipUnreadable(source)).seed(seed)
  if shuffle:
    flat = flat.shuffle()
  flat = flat.repeat(num_epochs)
  flat = flat.random_map(lambda record, rng: view(record, rng, resolution=resolution, crop=crop,
                                                  min_crop_frac=min_crop_frac, flip=flip, resize=resize))
  return latents_lib.host_batches(flat, global_batch_size, rows=rows, start_batch=start_batch,
                                  num_workers=num_workers, prefetch=prefetch)
