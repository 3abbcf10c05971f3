"""Image sources and the ADM crops: what extraction and SemVAE training read.

A source is a random-access sequence of records `{"image": uint8 (H, W, 3) RGB, "label": int, "index": int}` at
the image's own size: a prepared tfds dataset read with `tfds.data_source` (no TensorFlow), ImageNet-style class
folders, or scikit-learn's 8×8 digits upscaled (the demo's embedded data set). A record that cannot be decoded
raises `UnreadableImage`, so a caller can skip and list it instead of crashing.

The crops are ADM's (guided-diffusion `image_datasets.py`), with PIL exactly as ADM calls it: halve with a box
filter while the short side is at least twice the target, bicubic-resize the short side to the target, then cut
the centre square (`adm_center_crop`, what LightningDiT's extraction and the reference batches use) or a random
square after resizing the short side to a random size (`adm_random_crop`, the augmentation of SemVAE training).
"""
from __future__ import annotations

import hashlib

import io
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import grain
import numpy as np
from PIL import Image

from sfd_jax.data import latents as latents_lib

# torchvision's ImageFolder extensions (lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SOURCES = ("folder", "tfds", "digits")


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
  """ImageNet-style class folders: `root/<class>/<image>`; sorted folder names are the labels 0, 1, ...

  Images are ordered by (class, file name), so an index names the same image on every host and every run.
  """

  def __init__(self, root):
    self.root = Path(root)
    if not self.root.is_dir():
      raise FileNotFoundError(f"image folder {self.root} does not exist; pass a directory of class folders "
                              "(root/<class>/<image>)")
    self.class_names = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
    self.files, self.labels = [], []
    for label, name in enumerate(self.class_names):
      files = sorted(e.name for e in os.scandir(self.root / name)
                     if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)
      self.files += [f"{name}/{f}" for f in files]
      self.labels += [label] * len(files)
    if not self.files:
      raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders under {self.root}; "
                              "the layout is root/<class>/<image>")

  def __len__(self):
    return len(self.files)

  def __getitem__(self, index):
    index = int(index)
    image = _decode(self.root / self.files[index], index, str(self.root / self.files[index]))
    return {"image": image, "label": self.labels[index], "index": index}

  def describe(self) -> dict:
    return {"source": "folder", "path": str(self.root.absolute()), "num_images": len(self),
            "class_names": self.class_names}


class TfdsImages:
  """A split of a prepared tfds dataset (array_record format), read with `tfds.data_source`: no TensorFlow.

  The image bytes are decoded here, not by tfds, so a corrupt image raises `UnreadableImage` for its record only.
  """

  def __init__(self, name: str, split: str = "train", data_dir: str | None = None, image_key: str = "image",
               label_key: str = "label"):
    import tensorflow_datasets as tfds
    self.name, self.split, self.data_dir = name, split, data_dir or None
    self.image_key, self.label_key = image_key, label_key
    try:
      builder = tfds.builder(name, data_dir=self.data_dir)
      self._source = builder.as_data_source(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
    except Exception as e:  # tfds raises many types for a missing, unprepared or non-array_record dataset
      raise FileNotFoundError(
          f"cannot open the tfds dataset {name!r} split {split!r} in data_dir={data_dir!r} ({type(e).__name__}: "
          f"{e}); prepare it in array_record format first (`tfds build {name} --file_format=array_record`) and "
          "pass its data_dir") from e
    label = builder.info.features[label_key] if label_key in builder.info.features else None
    self.class_names = list(label.names) if getattr(label, "names", None) else None

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    index = int(index)
    record = self._source[index]
    image = _decode(io.BytesIO(record[self.image_key]), index, f"tfds {self.name}/{self.split}[{index}]")
    return {"image": image, "label": int(record[self.label_key]), "index": index}

  def describe(self) -> dict:
    return {"source": "tfds", "name": self.name, "split": self.split, "data_dir": self.data_dir,
            "num_images": len(self), "class_names": self.class_names}


class DigitsImages:
  """scikit-learn's 1,797 8×8 handwritten digits (ten classes), grey levels 0–16 → uint8 RGB, bicubic-upscaled to
  `size` px: a small labelled image set that ships with the install, for the demo and tests."""

  def __init__(self, size: int = 256):
    from sklearn.datasets import load_digits
    digits = load_digits()
    self.size = size
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


def open_source(source: str, path: str = "", tfds_name: str = "imagenet2012", split: str = "train",
                digits_size: int = 256):
  """The image source a config or command line names: 'folder' (path = root of class folders), 'tfds'
  (tfds_name, split, path = data_dir) or 'digits' (digits_size px)."""
  if source == "folder":
    if not path:
      raise FileNotFoundError("the folder source needs a path: the root of the class folders (root/<class>/<image>)")
    return FolderImages(path)
  if source == "tfds":
    return TfdsImages(tfds_name, split, path or None)
  if source == "digits":
    return DigitsImages(digits_size)
  raise ValueError(f"image source {source!r} is not one of {SOURCES}")


class Subset:
  """The records of `source` at `indices` (their `index` stays the position in `source`)."""

  def __init__(self, source, indices: Sequence[int]):
    self.source, self.indices = source, np.asarray(indices, np.int64)

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[int(i)])]

  def describe(self) -> dict:
    return {**self.source.describe(), "subset": len(self), "subset_sha256": hashlib.sha256(
        self.indices.tobytes()).hexdigest()}


def heldout_split(num_images: int, heldout: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(train, held-out) sorted indices: `heldout` images drawn at random (seeded), the rest for training."""
  if not 0 <= heldout < num_images:
    raise ValueError(f"cannot hold out {heldout} of {num_images} images; hold out fewer (data.heldout_images)")
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
         min_crop_frac: float = 0.8, flip: bool = False) -> dict:
  """A record cropped to `resolution` ('center': ADM centre crop; 'random': ADM random crop, then a flip with
  probability 1/2 if `flip`) → {'image', 'label', 'index'}."""
  if crop == "center":
    image = adm_center_crop(record["image"], resolution)
  elif crop == "random":
    image = adm_random_crop(record["image"], resolution, rng, min_crop_frac)
    if flip and rng.random() < 0.5:
      image = hflip(image)
  else:
    raise ValueError(f"crop {crop!r} is not one of ('center', 'random')")
  return {"image": image, "label": np.int32(record["label"]), "index": np.int64(record["index"])}


def image_pipeline(source, *, global_batch_size: int, seed: int, resolution: int, crop: str = "random",
                   min_crop_frac: float = 0.8, flip: bool = False, shuffle: bool = True,
                   num_epochs: int | None = None, shard_index: int = 0, shard_count: int = 1,
                   num_workers: int = 0, prefetch: int = 8) -> grain.DatasetIterator:
  """A checkpointable iterator over this host's rows of each global batch of cropped images
  ({'image': uint8 (b, res, res, 3), 'label', 'index'}); unreadable images are stood in for (`SkipUnreadable`).

  Order and crops are fixed per position of one global sequence (as `latents.latent_pipeline`), so the batches
  do not depend on the number of hosts; `num_epochs=None` repeats forever.
  """
  if crop not in ("center", "random"):
    raise ValueError(f"crop {crop!r} is not one of ('center', 'random')")
  flat = grain.MapDataset.source(SkipUnreadable(source)).seed(seed)
  if shuffle:
    flat = flat.shuffle()
  flat = flat.repeat(num_epochs)
  flat = flat.random_map(lambda record, rng: view(record, rng, resolution=resolution, crop=crop,
                                                  min_crop_frac=min_crop_frac, flip=flip))
  return latents_lib.host_batches(flat, global_batch_size, shard_index=shard_index, shard_count=shard_count,
                                  num_workers=num_workers, prefetch=prefetch)
