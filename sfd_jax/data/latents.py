"""The latent dataset: writing it, its statistics, and the grain input pipeline that reads it.

A dataset is a directory that `tfds.data_source` / `tfds.builder_from_directory` opens: a tfds dataset named
`sfd_latents` in ArrayRecord format with one record per image, latents NHWC and raw (not normalised):

  key                          shape (256 px, f16 texture VAE)   dtype
  texture, texture_flip        (16, 16, 32)                      float16 or float32
  semantic, semantic_flip      (16, 16, 16)                      float16 or float32
  dino, dino_flip (optional)   (256, 768)                        float16 or bfloat16 (stored as uint16 bits)
  image (without dino)         (256, 256, 3)                     uint8 (the centre crop)
  label, index                 ()                                int64 (index: position in the source)

plus `stats.json` (per-channel mean and unbiased std of the un-flipped texture and semantic latents, and the
number of samples) and `meta.json` (the encoders, their digests, resolution, crop and skipped images that
produced it). Shapes follow the resolution. It is written without TensorFlow, shard by shard, each shard atomically
(a half-written shard never looks finished), so an extraction can stop anywhere and resume.

The pipeline (grain) shuffles with a seed (a new order every epoch, no repeats inside one), picks the stored
flipped copy with probability 1/2 per sample, normalises with the dataset's stats, concatenates
`[texture | semantic]`, and batches; each host reads only its rows of every global batch. A resumed run starts it
at its step: the order of every epoch is a function of the seed, so the step is the whole position.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import grain
import ml_dtypes
import numpy as np

from sfd_jax import storage
from sfd_jax.errors import UserError

NAME = "sfd_latents"
VERSION = "1.0.0"
FILE_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
DINO_DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


class DatasetError(UserError):
  """A latent dataset that is missing, incomplete or inconsistent."""


# ---------------------------------------------------------------------------------------------------------- layout

def record_spec(latent_size: int, texture_channels: int = 32, semantic_channels: int = 16,
                dino_tokens: int | None = 256, dino_dim: int = 768, latent_dtype: str = "float16",
                dino_dtype: str | None = "float16", image_size: int | None = None) -> dict:
  """The JSON-able description of a record (what `meta.json` stores under `record`).

  `image_size` stores the centre-cropped uint8 image (`image`, its flip being the mirror), from which a train
  step can compute the DINO tokens itself when they are not stored (dino_dtype None).
  """
  if dino_dtype is not None and dino_dtype not in DINO_DTYPES:
    raise DatasetError(f"dino_dtype {dino_dtype!r} is not one of {sorted(DINO_DTYPES)} or None (not stored)")
  return dict(latent_size=latent_size, texture_channels=texture_channels, semantic_channels=semantic_channels,
              dino_tokens=dino_tokens if dino_dtype else None, dino_dim=dino_dim, latent_dtype=latent_dtype,
              dino_dtype=dino_dtype, image_size=image_size)


def _features(spec: Mapping):
  import tensorflow_datasets as tfds
  s, dtype = spec["latent_size"], np.dtype(spec["latent_dtype"])
  feats = {"label": tfds.features.Scalar(dtype=np.int64), "index": tfds.features.Scalar(dtype=np.int64)}
  for key, channels in (("texture", spec["texture_channels"]), ("semantic", spec["semantic_channels"])):
    for name in (key, f"{key}_flip"):
      feats[name] = tfds.features.Tensor(shape=(s, s, channels), dtype=dtype)
  if spec["dino_dtype"]:
    # tfds cannot serialise bfloat16: it is stored as its uint16 bits and viewed back on reading.
    dino = np.uint16 if spec["dino_dtype"] == "bfloat16" else np.dtype(spec["dino_dtype"])
    for name in ("dino", "dino_flip"):
      feats[name] = tfds.features.Tensor(shape=(spec["dino_tokens"], spec["dino_dim"]), dtype=dino)
  if spec.get("image_size"):
    feats["image"] = tfds.features.Tensor(shape=(spec["image_size"], spec["image_size"], 3), dtype=np.uint8)
  return tfds.features.FeaturesDict(feats)


def _shard_path(directory: Path, shard: int, num_shards: int) -> Path:
  return directory / f"{NAME}-train.array_record-{shard:05d}-of-{num_shards:05d}"


# --------------------------------------------------------------------------------------------------------- writing

class ChannelStats:
  """Per-channel count, mean and M2 (float64), mergeable across shards (Chan et al.)."""

  def __init__(self, channels: int):
    self.count, self.mean, self.m2 = 0, np.zeros(channels), np.zeros(channels)

  def update(self, x):
    x = np.asarray(x, np.float64).reshape(-1, self.mean.shape[0])
    other = ChannelStats(self.mean.shape[0])
    other.count, other.mean = x.shape[0], x.mean(0)
    other.m2 = ((x - other.mean) ** 2).sum(0)
    self.merge(other)

  def merge(self, other: ChannelStats):
    n = self.count + other.count
    if other.count:
      delta = other.mean - self.mean
      self.mean = self.mean + delta * other.count / n
      self.m2 = self.m2 + other.m2 + delta ** 2 * self.count * other.count / n
      self.count = n

  @property
  def std(self):
    """Unbiased (n − 1) standard deviation, as the official stats."""
    return np.sqrt(self.m2 / max(self.count - 1, 1))

  def to_dict(self):
    return {"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

  @classmethod
  def from_dict(cls, d):
    stats = cls(len(d["mean"]))
    stats.count, stats.mean, stats.m2 = d["count"], np.asarray(d["mean"]), np.asarray(d["m2"])
    return stats


def _sidecar(shard_path):
  """The `.stats.json` beside a shard file: its record count, channel statistics and skipped images."""
  return shard_path.with_name(f"{shard_path.name}.stats.json")


class ShardWriter:
  """Records of one shard being written (to a local file that `LatentWriter.shard` publishes) with their running
  channel statistics."""

  def __init__(self, writer: LatentWriter, shard: int, local: Path):
    from array_record.python.array_record_module import ArrayRecordWriter
    self.writer, self.shard = writer, shard
    self.count, self.skipped = 0, []
    self.texture = ChannelStats(writer.spec["texture_channels"])
    self.semantic = ChannelStats(writer.spec["semantic_channels"])
    self._out = ArrayRecordWriter(str(local), "group_size:1")

  def write(self, record: Mapping) -> None:
    w = self.writer
    self._out.write(w._serializer.serialize_example(w._features.encode_example(w._encode(record))))
    self.texture.update(record["texture"])
    self.semantic.update(record["semantic"])
    self.count += 1

  def skip(self, index: int, file: str, reason: str) -> None:
    """Lists a source image left out of the dataset, naming its file (it goes into meta.json)."""
    self.skipped.append({"index": int(index), "file": str(file), "reason": str(reason)})

  def close(self) -> None:
    self._out.close()

  def stats(self) -> dict:
    return {"records": self.count, "texture": self.texture.to_dict(), "semantic": self.semantic.to_dict(),
            "skipped": self.skipped}


class LatentWriter:
  """Writes a latent dataset shard by shard; `finish()` adds the tfds metadata, stats.json and meta.json.

  Shards are independent (any host may write any shard) and atomic: a shard file and its `.stats.json`
  sidecar appear only when complete, so `is_done(shard)` tells a resumed extraction what to skip; a shard
  interrupted anywhere (even by SIGKILL) leaves only a hidden temporary file, which the next attempt overwrites.
  The directory may be a bucket (`gs://...`): each shard is written locally and copied there whole.
  """

  def __init__(self, directory, num_shards: int, spec: Mapping, meta: Mapping | None = None):
    self.directory = storage.path(directory) / NAME / VERSION
    self.num_shards, self.spec, self.meta = num_shards, dict(spec), dict(meta or {})
    self.directory.mkdir(parents=True, exist_ok=True)
    self._features = _features(self.spec)
    from tensorflow_datasets.core import example_serializer
    self._serializer = example_serializer.ExampleSerializer(self._features.get_serialized_info())

  def is_done(self, shard: int) -> bool:
    path = _shard_path(self.directory, shard, self.num_shards)
    return path.exists() and _sidecar(path).exists()

  def check_plan(self, plan: Mapping, write: bool = True) -> None:
    """A resumed run must make the same dataset: `plan` (what fixes the content: source, encoders, settings) is
    stored by the first run (when `write`) and compared on every later one."""
    path = self.directory / "plan.json"
    plan = json.loads(json.dumps(plan))
    if path.exists():
      started = json.loads(path.read_text())
      differ = sorted(k for k in set(started) | set(plan) if started.get(k) != plan.get(k))
      if differ:
        raise DatasetError(f"{self.directory} holds a dataset started with another {', '.join(differ)}; resume "
                           "it with the same inputs and settings, or write to a new output directory")
    elif write:
      storage.write_json(path, plan)

  @contextlib.contextmanager
  def shard(self, shard: int):
    """`with writer.shard(i) as out: out.write(record) ...`: the shard appears complete when the block ends
    without an exception; on an exception nothing is published and the exception propagates."""
    path = _shard_path(self.directory, shard, self.num_shards)
    with storage.staged_file(path) as local:
      out = ShardWriter(self, shard, local)
      try:
        yield out
      finally:
        out.close()
    storage.write_json(_sidecar(path), out.stats())

  def write_shard(self, shard: int, records: Iterable[Mapping]) -> int:
    """Writes one whole shard (records in order); returns the number of records."""
    with self.shard(shard) as out:
      for record in records:
        out.write(record)
    return out.count

  def _encode(self, record: Mapping) -> dict:
    out = {"label": int(record["label"]), "index": int(record["index"])}
    dtype = np.dtype(self.spec["latent_dtype"])
    for key in ("texture", "texture_flip", "semantic", "semantic_flip"):
      out[key] = np.asarray(record[key]).astype(dtype)
    if self.spec["dino_dtype"]:
      for key in ("dino", "dino_flip"):
        value = np.asarray(record[key]).astype(DINO_DTYPES[self.spec["dino_dtype"]])
        out[key] = value.view(np.uint16) if self.spec["dino_dtype"] == "bfloat16" else value
    if self.spec.get("image_size"):
      out["image"] = np.asarray(record["image"], np.uint8)
    return out

  def _sidecars(self) -> list[dict]:
    return [json.loads(_sidecar(_shard_path(self.directory, i, self.num_shards)).read_text())
            for i in range(self.num_shards)]

  def finish(self, stats: Mapping | None = None) -> dict:
    """Checks every shard is there, writes the metadata and the stats; returns the stats.

    The stats are the exact merge of the shards' (mean and unbiased std of the un-flipped latents), except those
    `stats` gives ({'texture': {'mean', 'std', 'source'}, 'semantic': ...}, e.g. the official stats files that
    released models were trained with). meta.json lists the skipped source images of every shard.
    """
    import tensorflow_datasets as tfds
    missing = [i for i in range(self.num_shards) if not self.is_done(i)]
    if missing:
      raise DatasetError(f"{self.directory}: shards {missing[:5]} are not written yet; run the extraction again")
    shard_stats = self._sidecars()
    lengths = [s["records"] for s in shard_stats]
    num_bytes = sum(_shard_path(self.directory, i, self.num_shards).stat().length for i in range(self.num_shards))
    tfds.folder_dataset.write_metadata(
        data_dir=self.directory, features=self._features, filename_template=FILE_TEMPLATE, check_data=False,
        split_infos=[tfds.core.SplitInfo(name="train", shard_lengths=lengths, num_bytes=num_bytes)])
    merged = {"num_samples": sum(lengths)}
    for key in ("texture", "semantic"):
      channels = ChannelStats(self.spec[f"{key}_channels"])
      for s in shard_stats:
        channels.merge(ChannelStats.from_dict(s[key]))
      merged[key] = {"mean": channels.mean.tolist(), "std": channels.std.tolist()}
      if key in (stats or {}):
        merged[key] = {"mean": [float(v) for v in stats[key]["mean"]], "std": [float(v) for v in stats[key]["std"]],
                       "source": stats[key].get("source", "given")}
    skipped = sorted((item for s in shard_stats for item in s.get("skipped", ())), key=lambda item: item["index"])
    storage.write_json(self.directory / "stats.json", merged)
    meta = {**self.meta, "record": self.spec, "num_records": sum(lengths), "skipped": skipped}
    storage.write_json(self.directory / "meta.json", meta)
    return merged

  def count_records(self) -> int:
    """The records actually in the shard files (read from each file, not from the metadata); raises if a shard
    holds another number than its sidecar says. In a bucket the sidecars' counts (reading every shard back
    would download the dataset; each shard and its sidecar were published from the same local write)."""
    if storage.is_remote(self.directory):
      return sum(sidecar["records"] for sidecar in self._sidecars())
    from array_record.python.array_record_module import ArrayRecordReader
    total = 0
    for i, sidecar in enumerate(self._sidecars()):
      reader = ArrayRecordReader(str(_shard_path(self.directory, i, self.num_shards)))
      count = reader.num_records()
      reader.close()
      if count != sidecar["records"]:
        raise DatasetError(f"shard {i} of {self.directory} holds {count} records but was written with "
                           f"{sidecar['records']}; delete it and its .stats.json and run the extraction again")
      total += count
    return total


# --------------------------------------------------------------------------------------------------------- reading

class LatentSource:
  """Random access to the records of a written dataset (grain's data-source protocol), bf16 DINO viewed back."""

  def __init__(self, directory):
    import tensorflow_datasets as tfds
    self.directory = find_dataset(directory)
    self.stats = json.loads((self.directory / "stats.json").read_text())
    self.meta = json.loads((self.directory / "meta.json").read_text())
    self.spec = self.meta["record"]
    builder = tfds.builder_from_directory(str(self.directory))
    self._shard_ends = np.cumsum(builder.info.splits["train"].shard_lengths)
    self._source = builder.as_data_source(split="train")

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    try:
      record = dict(self._source[index])
    except RuntimeError as e:  # array_record / Riegeli: a truncated shard, or one whose bytes changed
      shard = _shard_path(self.directory, int(np.searchsorted(self._shard_ends, index, side="right")),
                          len(self._shard_ends))
      raise DatasetError(
          f"record {index} of the latent dataset cannot be read: shard {shard} is truncated or corrupt "
          f"({str(e).splitlines()[0][:200]}); re-extract it: delete it and {shard.name}.stats.json, then run the "
          "same extraction (or import_official) command again, which rewrites only the missing shard") from None
    if self.spec["dino_dtype"] == "bfloat16":
      for key in ("dino", "dino_flip"):
        record[key] = record[key].view(ml_dtypes.bfloat16)
    return record


def find_dataset(directory) -> Path:
  """The versioned directory of a latent dataset given it or one of its parents; clear errors otherwise."""
  directory = storage.filesystem_path(directory, "the latent dataset")
  for candidate in (directory, directory / VERSION, directory / NAME / VERSION):
    if (candidate / "dataset_info.json").exists():
      for required in ("stats.json", "meta.json"):
        if not (candidate / required).exists():
          raise DatasetError(f"latent dataset {candidate} has no {required}: its extraction did not finish; "
                             "run it again to complete it")
      return candidate
  if not directory.exists():
    raise UserError(f"latent dataset directory {directory} does not exist; set config.data.path to the "
                    "directory written by `python -m sfd_jax.cli.extract`")
  raise DatasetError(f"{directory} is not a latent dataset (no {NAME}/{VERSION}/dataset_info.json under it); "
                     "write one with `python -m sfd_jax.cli.extract`")


class SyntheticLatents:
  """An in-memory source with the record layout of a dataset (deterministic per index), for tests/benchmarks."""

  def __init__(self, num_records: int, spec: Mapping, num_classes: int = 1000, seed: int = 0):
    self.num_records, self.spec, self.num_classes, self.seed = num_records, dict(spec), num_classes, seed
    self.stats = {"num_samples": num_records,
                  "texture": {"mean": [0.5] * spec["texture_channels"], "std": [2.0] * spec["texture_channels"]},
                  "semantic": {"mean": [-1.0] * spec["semantic_channels"],
                               "std": [0.5] * spec["semantic_channels"]}}
    self.meta = {"synthetic": True, "record": self.spec}

  def __len__(self):
    return self.num_records

  def __getitem__(self, index):
    rng = np.random.default_rng([self.seed, int(index)])
    s = self.spec["latent_size"]
    record = {"label": np.int64(rng.integers(self.num_classes)), "index": np.int64(index)}
    for key in ("texture", "semantic"):
      stats = self.stats[key]
      shape = (s, s, self.spec[f"{key}_channels"])
      record[key] = (np.asarray(stats["mean"]) + np.asarray(stats["std"]) * rng.normal(size=shape)).astype(
          self.spec["latent_dtype"])
      record[f"{key}_flip"] = record[key][:, ::-1]
    if self.spec["dino_dtype"]:
      dino = rng.normal(size=(self.spec["dino_tokens"], self.spec["dino_dim"]))
      record["dino"] = dino.astype(DINO_DTYPES[self.spec["dino_dtype"]])
      record["dino_flip"] = record["dino"]
    if self.spec.get("image_size"):
      record["image"] = rng.integers(0, 256, (self.spec["image_size"],) * 2 + (3,), dtype=np.uint8)
    return record


def normalizer(stats: Mapping, use_dino: bool, use_images: bool = False, use_semantic: bool = True):
  """record (+ flip choice) → {'x': (h, w, C) float32 normalised [texture | semantic] (texture alone without
  `use_semantic`: the plain LightningDiT), 'y', 'index', and 'dino' (stored tokens) and/or 'image' (the stored
  uint8 image, mirrored for the flipped copy)}."""
  tex_mean, tex_std = (np.asarray(stats["texture"][k], np.float32) for k in ("mean", "std"))
  sem_mean, sem_std = (np.asarray(stats["semantic"][k], np.float32) for k in ("mean", "std"))

  def normalize(item):
    record, flip = item
    suffix = "_flip" if flip else ""
    tex = (np.asarray(record["texture" + suffix], np.float32) - tex_mean) / tex_std
    sem = (np.asarray(record["semantic" + suffix], np.float32) - sem_mean) / sem_std if use_semantic else tex[..., :0]
    out = {"x": np.concatenate([tex, sem], axis=-1), "y": np.int32(record["label"]),
           "index": np.int64(record["index"])}
    if use_dino:
      out["dino"] = np.asarray(record["dino" + suffix], np.float32)
    if use_images:
      image = np.asarray(record["image"], np.uint8)
      out["image"] = np.ascontiguousarray(image[:, ::-1]) if flip else image
    return out
  return normalize


def host_batches(flat: grain.MapDataset, global_batch_size: int, *, rows: Sequence[int] | None = None,
                 start_batch: int = 0, transform=None, num_workers: int = 0,
                 prefetch: int = 8) -> grain.DatasetIterator:
  """An iterator over this host's rows of global batches `start_batch`, `start_batch + 1`, ... of `flat`, each row
  mapped by `transform` first.

  Position k of `flat` is the k-th element of one global sequence (any per-element randomness must already be
  drawn there, from the position); global batch b is positions [b·G, (b+1)·G) and a host reads only `rows` of
  it (`sharding.host_rows`: the rows its devices hold, in that order; default all). The batches a run sees
  therefore do not depend on how many hosts read them or how the mesh orders their devices, and a run resumed at
  step s on any number of hosts starts at batch s: the position needs no checkpoint. A last partial batch is
  dropped.
  """
  rows = np.arange(global_batch_size) if rows is None else np.asarray(rows, np.int64)
  if not rows.size or np.unique(rows).size != rows.size or rows.min() < 0 or rows.max() >= global_batch_size:
    raise ValueError(f"rows must be distinct indices into a global batch of {global_batch_size}")
  if len(flat) < global_batch_size:
    raise DatasetError(f"{len(flat)} records are fewer than one batch ({global_batch_size}); use a smaller "
                       "batch or more data")
  local = len(rows)
  num_batches = len(flat) // global_batch_size
  position = lambda k: (k // local) * global_batch_size + int(rows[k % local])
  ds = grain.MapDataset.range(start_batch * local, num_batches * local).map(lambda k: flat[position(k)])
  if transform is not None:
    ds = ds.map(transform)
  ds = ds.batch(local, drop_remainder=True)
  threads = 0 if num_workers else prefetch
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch))
  if num_workers:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(it)


def latent_pipeline(source, stats: Mapping, *, global_batch_size: int, seed: int, shuffle: bool = True,
                    flip: bool = True, use_dino: bool = True, use_images: bool = False, use_semantic: bool = True,
                    num_epochs: int | None = None, rows: Sequence[int] | None = None,
                    start_batch: int = 0, num_workers: int = 0, prefetch: int = 8) -> grain.DatasetIterator:
  """An iterator over this host's `rows` (`sharding.host_rows`; default all) of each global batch, from
  `start_batch`.

  The record order (seeded shuffle, new each epoch, no repeats inside one) and the flip choices are fixed per
  position in one global sequence (see `host_batches`), so the batches a run sees do not depend on how many
  hosts read them. `use_images` passes the stored images on (for a train step that computes DINO tokens from
  them); `use_semantic=False` leaves the semantic latents out of 'x'. `num_epochs=None` repeats forever.
  """
  spec = getattr(source, "spec", {})
  if use_dino and not spec.get("dino_dtype", "float16"):
    raise DatasetError("this dataset stores no DINO tokens but the loss needs them (model.use_repa); "
                       "re-extract with DINO tokens, compute them from the stored images in the train step, "
                       "or set model.use_repa=False")
  if use_images and not spec.get("image_size"):
    raise DatasetError("this dataset stores no images; re-extract it with --dino_dtype=none (which stores them)")
  if len(source) < global_batch_size:
    raise DatasetError(f"the dataset has {len(source)} records, fewer than one batch ({global_batch_size}); "
                       "use a smaller batch or more data")
  flat = grain.MapDataset.source(source).seed(seed)
  if shuffle:
    flat = flat.shuffle()
  flat = flat.repeat(num_epochs)
  flat = flat.random_map(lambda record, rng: (record, bool(flip and rng.random() < 0.5)))
  return host_batches(flat, global_batch_size, rows=rows, start_batch=start_batch,
                      transform=normalizer(stats, use_dino, use_images, use_semantic), num_workers=num_workers,
                      prefetch=prefetch)
