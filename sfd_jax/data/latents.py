"""The latent dataset (DESIGN.md §6): writing it, its statistics, and the grain input pipeline that reads it.

A dataset is a directory that `tfds.data_source` / `tfds.builder_from_directory` opens: a tfds dataset named
`sfd_latents` in ArrayRecord format with one record per image ({texture, texture_flip, semantic,
semantic_flip, [dino, dino_flip], label, index}, latents NHWC and raw, not normalised), plus `stats.json`
(per-channel mean and unbiased std of the un-flipped texture and semantic latents) and `meta.json` (what
produced it). It is written without TensorFlow, shard by shard, each shard atomically (a half-written shard
never looks finished), so an extraction can stop anywhere and resume.

The pipeline (grain) shuffles with a seed (a new order every epoch, no repeats inside one), picks the stored
flipped copy with probability 1/2 per sample, normalises with the dataset's stats, concatenates
`[texture | semantic]`, and batches; each host reads only its rows of every global batch. Its iterator state
goes into every checkpoint.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import grain
import ml_dtypes
import numpy as np

NAME = "sfd_latents"
VERSION = "1.0.0"
FILE_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
DINO_DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


class DatasetError(ValueError):
  """A latent dataset that is missing, incomplete or inconsistent."""


# ---------------------------------------------------------------------------------------------------------- layout

def record_spec(latent_size: int, texture_channels: int = 32, semantic_channels: int = 16,
                dino_tokens: int | None = 256, dino_dim: int = 768, latent_dtype: str = "float16",
                dino_dtype: str | None = "float16") -> dict:
  """The JSON-able description of a record (what `meta.json` stores under `record`)."""
  if dino_dtype is not None and dino_dtype not in DINO_DTYPES:
    raise DatasetError(f"dino_dtype {dino_dtype!r} is not one of {sorted(DINO_DTYPES)} or None (not stored)")
  return dict(latent_size=latent_size, texture_channels=texture_channels, semantic_channels=semantic_channels,
              dino_tokens=dino_tokens if dino_dtype else None, dino_dim=dino_dim, latent_dtype=latent_dtype,
              dino_dtype=dino_dtype)


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

  def merge(self, other: "ChannelStats"):
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


class LatentWriter:
  """Writes a latent dataset shard by shard; `finish()` adds the tfds metadata, stats.json and meta.json.

  Shards are independent (any host may write any shard) and atomic: a shard file and its `.stats.json`
  sidecar appear only when complete, so `is_done(shard)` tells a resumed extraction what to skip.
  """

  def __init__(self, directory, num_shards: int, spec: Mapping, meta: Mapping | None = None):
    self.directory = Path(directory) / NAME / VERSION
    self.num_shards, self.spec, self.meta = num_shards, dict(spec), dict(meta or {})
    self.directory.mkdir(parents=True, exist_ok=True)
    self._features = _features(self.spec)
    from tensorflow_datasets.core import example_serializer
    self._serializer = example_serializer.ExampleSerializer(self._features.get_serialized_info())

  def is_done(self, shard: int) -> bool:
    path = _shard_path(self.directory, shard, self.num_shards)
    return path.exists() and Path(f"{path}.stats.json").exists()

  def write_shard(self, shard: int, records: Sequence[Mapping]) -> int:
    """Writes one whole shard (records in order); returns the number of records."""
    from array_record.python.array_record_module import ArrayRecordWriter
    path = _shard_path(self.directory, shard, self.num_shards)
    tmp = path.with_name(f".{path.name}.tmp")
    texture, semantic = ChannelStats(self.spec["texture_channels"]), ChannelStats(self.spec["semantic_channels"])
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    for record in records:
      writer.write(self._serializer.serialize_example(self._features.encode_example(self._encode(record))))
      texture.update(record["texture"])
      semantic.update(record["semantic"])
    writer.close()
    os.replace(tmp, path)
    stats = {"records": len(records), "texture": texture.to_dict(), "semantic": semantic.to_dict()}
    _write_json_atomic(Path(f"{path}.stats.json"), stats)
    return len(records)

  def _encode(self, record: Mapping) -> dict:
    out = {"label": int(record["label"]), "index": int(record["index"])}
    dtype = np.dtype(self.spec["latent_dtype"])
    for key in ("texture", "texture_flip", "semantic", "semantic_flip"):
      out[key] = np.asarray(record[key]).astype(dtype)
    if self.spec["dino_dtype"]:
      for key in ("dino", "dino_flip"):
        value = np.asarray(record[key]).astype(DINO_DTYPES[self.spec["dino_dtype"]])
        out[key] = value.view(np.uint16) if self.spec["dino_dtype"] == "bfloat16" else value
    return out

  def finish(self) -> dict:
    """Checks every shard is there, writes the metadata and the merged stats; returns the stats."""
    import tensorflow_datasets as tfds
    missing = [i for i in range(self.num_shards) if not self.is_done(i)]
    if missing:
      raise DatasetError(f"{self.directory}: shards {missing[:5]} are not written yet; run the extraction again")
    shard_stats = [json.loads(Path(f"{_shard_path(self.directory, i, self.num_shards)}.stats.json").read_text())
                   for i in range(self.num_shards)]
    lengths = [s["records"] for s in shard_stats]
    num_bytes = sum(_shard_path(self.directory, i, self.num_shards).stat().st_size for i in range(self.num_shards))
    tfds.folder_dataset.write_metadata(
        data_dir=self.directory, features=self._features, filename_template=FILE_TEMPLATE, check_data=False,
        split_infos=[tfds.core.SplitInfo(name="train", shard_lengths=lengths, num_bytes=num_bytes)])
    stats = {"num_samples": sum(lengths)}
    for key in ("texture", "semantic"):
      merged = ChannelStats(self.spec[f"{key}_channels"])
      for s in shard_stats:
        merged.merge(ChannelStats.from_dict(s[key]))
      stats[key] = {"mean": merged.mean.tolist(), "std": merged.std.tolist()}
    _write_json_atomic(self.directory / "stats.json", stats)
    _write_json_atomic(self.directory / "meta.json", {**self.meta, "record": self.spec})
    return stats


def _write_json_atomic(path: Path, obj):
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(obj, indent=1))
  os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------- reading

class LatentSource:
  """Random access to the records of a written dataset (grain's data-source protocol), bf16 DINO viewed back."""

  def __init__(self, directory):
    import tensorflow_datasets as tfds
    self.directory = find_dataset(directory)
    self.stats = json.loads((self.directory / "stats.json").read_text())
    self.meta = json.loads((self.directory / "meta.json").read_text())
    self.spec = self.meta["record"]
    self._source = tfds.builder_from_directory(str(self.directory)).as_data_source(split="train")

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    record = dict(self._source[index])
    if self.spec["dino_dtype"] == "bfloat16":
      for key in ("dino", "dino_flip"):
        record[key] = record[key].view(ml_dtypes.bfloat16)
    return record


def find_dataset(directory) -> Path:
  """The versioned directory of a latent dataset given it or one of its parents; clear errors otherwise."""
  directory = Path(directory)
  for candidate in (directory, directory / VERSION, directory / NAME / VERSION):
    if (candidate / "dataset_info.json").exists():
      for required in ("stats.json", "meta.json"):
        if not (candidate / required).exists():
          raise DatasetError(f"latent dataset {candidate} has no {required}: its extraction did not finish; "
                             "run it again to complete it")
      return candidate
  if not directory.exists():
    raise FileNotFoundError(f"latent dataset directory {directory} does not exist; set config.data.path to the "
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
    return record


def normalizer(stats: Mapping, use_dino: bool):
  """record (+ flip choice) → {'x': (h, w, C) float32 normalised [texture | semantic], 'y', 'dino', 'index'}."""
  tex_mean, tex_std = (np.asarray(stats["texture"][k], np.float32) for k in ("mean", "std"))
  sem_mean, sem_std = (np.asarray(stats["semantic"][k], np.float32) for k in ("mean", "std"))

  def normalize(item):
    record, flip = item
    suffix = "_flip" if flip else ""
    tex = (np.asarray(record["texture" + suffix], np.float32) - tex_mean) / tex_std
    sem = (np.asarray(record["semantic" + suffix], np.float32) - sem_mean) / sem_std
    out = {"x": np.concatenate([tex, sem], axis=-1), "y": np.int32(record["label"]),
           "index": np.int64(record["index"])}
    if use_dino:
      out["dino"] = np.asarray(record["dino" + suffix], np.float32)
    return out
  return normalize


def latent_pipeline(source, stats: Mapping, *, global_batch_size: int, seed: int, shuffle: bool = True,
                    flip: bool = True, use_dino: bool = True, num_epochs: int | None = None,
                    shard_index: int = 0, shard_count: int = 1, num_workers: int = 0,
                    prefetch: int = 8) -> grain.DatasetIterator:
  """A checkpointable iterator over this host's rows of each global batch (global_batch_size / shard_count).

  The record order (seeded shuffle, new each epoch, no repeats inside one) and the flip choices are fixed per
  position in one global sequence, and global batch b is positions [b·G, (b+1)·G): host i reads only its rows
  of it. The batches a run sees therefore do not depend on how many hosts read them.
  `num_epochs=None` repeats forever.
  """
  if use_dino and not getattr(source, "spec", {}).get("dino_dtype", "float16"):
    raise DatasetError("this dataset stores no DINO tokens but the loss needs them (REPA weight > 0); "
                       "re-extract with DINO tokens or set loss.repa_weight=0")
  if global_batch_size % shard_count:
    raise DatasetError(f"global batch {global_batch_size} cannot be split evenly over {shard_count} hosts")
  if len(source) < global_batch_size:
    raise DatasetError(f"the dataset has {len(source)} records, fewer than one batch ({global_batch_size}); "
                       "use a smaller batch or more data")
  local = global_batch_size // shard_count
  flat = grain.MapDataset.source(source).seed(seed)
  if shuffle:
    flat = flat.shuffle()
  flat = flat.repeat(num_epochs)
  flat = flat.random_map(lambda record, rng: (record, bool(flip and rng.random() < 0.5)))
  num_batches = len(flat) // global_batch_size
  position = lambda k: (k // local) * global_batch_size + shard_index * local + k % local
  ds = grain.MapDataset.range(num_batches * local).map(lambda k: flat[position(k)])
  ds = ds.map(normalizer(stats, use_dino)).batch(local, drop_remainder=True)
  threads = 0 if num_workers else prefetch
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch))
  if num_workers:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(it)
