"""Official SFD (LightningDiT-layout) latent shards → the latent dataset format (`sfd_jax.data.latents`).

The official training data is a directory of `*.safetensors` shards, read in sorted order, holding
per image the NCHW arrays `latents` / `latents_flip` (texture, (n, 32, 16, 16)), `latents_sv` / `latents_sv_flip`
(semantic, (n, 16, 16, 16)), optionally `feats_dino` / `feats_dino_flip` (DINOv2 tokens as (n, 768, 16, 16) maps)
and `labels` (n,), with `latents_stats.pt` / `latents_sv_stats.pt` ({'mean', 'std'}, each (1, C, 1, 1)) next to
them. The 2025-12-21 release's `extract_features.py` writes them as `latents_rank{r:02d}_shard{k:03d}.safetensors`
of 1,000 images, DINO maps in float16 (maps of 32×32 at 512 px). Each official shard becomes one of ours: latents
NHWC, DINO maps flattened row-major to (h·w, D) tokens (token h·16 + w at 256 px, as the official loss reads them),
`index` the running position over all shards. The official
stats files, when present, become the dataset's stats (the released models were trained with them); otherwise the
stats are computed from the latents.

Shards are memory-mapped and copied in chunks, never loaded whole (an official shard with DINO features of 10,000
images is about 8 GB), and bfloat16 arrays are read as well. An import is resumable like an extraction.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm import tqdm

from sfd_jax.data import latents as latents_lib
from sfd_jax.errors import UserError

TEXTURE_KEYS = ("latents", "latents_flip")
SEMANTIC_KEYS = ("latents_sv", "latents_sv_flip")
DINO_KEYS = ("feats_dino", "feats_dino_flip")
LABEL_KEY = "labels"
STATS_FILES = {"texture": "latents_stats.pt", "semantic": "latents_sv_stats.pt"}
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path) -> dict[str, np.ndarray]:
  """The arrays of a .safetensors file, memory-mapped (read-only, nothing loaded until sliced)."""
  path = Path(path)
  not_safetensors = (f"{path} is not a .safetensors file (an HTML error page of a failed download, a truncated or "
                     "corrupt file?); download it again")
  try:
    size = path.stat().st_size
    with path.open("rb") as f:
      header_size = int.from_bytes(f.read(8), "little")
      if size < 8 or header_size > size - 8:  # the length an HTML page's first 8 bytes spell is some 10^18
        raise latents_lib.DatasetError(not_safetensors)
      header = json.loads(f.read(header_size))
  except (OSError, ValueError) as e:
    raise latents_lib.DatasetError(f"cannot read {path}: it is corrupt or not a .safetensors file ({e})") from e
  if not isinstance(header, dict):
    raise latents_lib.DatasetError(not_safetensors)
  header.pop("__metadata__", None)
  if not all(isinstance(entry, dict) and {"dtype", "shape", "data_offsets"} <= entry.keys()
             for entry in header.values()):
    raise latents_lib.DatasetError(not_safetensors)
  arrays = {}
  for key, entry in header.items():
    if entry.get("dtype") not in _DTYPES:
      raise latents_lib.DatasetError(f"{path}: array {key!r} has the unsupported dtype {entry.get('dtype')!r}")
    dtype, shape = np.dtype(_DTYPES[entry["dtype"]]), tuple(entry["shape"])
    begin, end = entry["data_offsets"]
    if end - begin != math.prod(shape) * dtype.itemsize or 8 + header_size + end > size:
      raise latents_lib.DatasetError(f"{path}: array {key!r} does not fit its header (truncated or corrupt file)")
    if end == begin:
      arrays[key] = np.zeros(shape, dtype)
    else:
      arrays[key] = np.memmap(path, dtype=dtype, mode="r", offset=8 + header_size + begin, shape=shape or (1,))
      arrays[key] = arrays[key].reshape(shape)
  return arrays


def _shard_layout(path: Path, arrays: dict) -> dict:
  """Shapes of one official shard, checked for the keys and sizes the format needs."""
  missing = [k for k in TEXTURE_KEYS + SEMANTIC_KEYS + (LABEL_KEY,) if k not in arrays]
  if missing:
    raise latents_lib.DatasetError(f"{path} has no {', '.join(missing)} (it holds {sorted(arrays)}); an SFD shard "
                                   f"needs {', '.join(TEXTURE_KEYS + SEMANTIC_KEYS)} and {LABEL_KEY}")
  dino = [k for k in DINO_KEYS if k in arrays]
  if len(dino) == 1:
    raise latents_lib.DatasetError(f"{path} holds {dino[0]} without its pair; it needs both {DINO_KEYS} or neither")
  n = arrays[LABEL_KEY].shape[0]
  layout = {"count": n, "texture": arrays["latents"].shape[1:], "semantic": arrays["latents_sv"].shape[1:],
            "dino": arrays["feats_dino"].shape[1:] if dino else None}
  shapes = {**dict.fromkeys(TEXTURE_KEYS, layout["texture"]), **dict.fromkeys(SEMANTIC_KEYS, layout["semantic"]),
            **dict.fromkeys(dino, layout["dino"])}
  for key, shape in shapes.items():
    if arrays[key].shape != (n, *shape):
      raise latents_lib.DatasetError(f"{path}: {key} has shape {arrays[key].shape}, expected {(n, *shape)} (NCHW, "
                                     "one row per label)")
  if len(layout["texture"]) != 3 or layout["texture"][1:] != layout["semantic"][1:]:
    raise latents_lib.DatasetError(f"{path}: texture {layout['texture']} and semantic {layout['semantic']} latents "
                                   "must be (C, H, W) maps of the same size")
  if dino and len(layout["dino"]) != 3:
    raise latents_lib.DatasetError(f"{path}: feats_dino must be (n, D, h, w) maps, got {arrays['feats_dino'].shape}")
  return layout


def official_stats(path, channels: int) -> dict:
  """An official `{'mean', 'std'}` stats file ((1, C, 1, 1) each) → {'mean', 'std', 'source'} lists."""
  from sfd_jax.convert.io import load_state_dict
  raw = load_state_dict(path)
  if "mean" not in raw or "std" not in raw:
    raise latents_lib.DatasetError(f"{path} must hold 'mean' and 'std' tensors, found {sorted(raw)}")
  mean, std = (np.asarray(raw[k], np.float64).reshape(-1) for k in ("mean", "std"))
  if mean.shape != (channels,) or std.shape != (channels,):
    raise latents_lib.DatasetError(f"{path} holds stats of {mean.size} channels but the latents have {channels}; "
                                   "pass the stats file of these latents")
  return {"mean": mean.tolist(), "std": std.tolist(), "source": str(Path(path).absolute())}


def _records(arrays: dict, start: int, stop: int, offset: int, with_dino: bool):
  """Records of rows [start, stop) of an official shard, NCHW → NHWC, DINO maps → row-major tokens."""
  nhwc = lambda key: np.asarray(arrays[key][start:stop]).transpose(0, 2, 3, 1)
  chunk = {key: nhwc(official) for key, official in
           (("texture", "latents"), ("texture_flip", "latents_flip"), ("semantic", "latents_sv"),
            ("semantic_flip", "latents_sv_flip"))}
  if with_dino:
    for key, official in (("dino", "feats_dino"), ("dino_flip", "feats_dino_flip")):
      maps = nhwc(official)
      chunk[key] = maps.reshape(maps.shape[0], -1, maps.shape[-1])
  labels = np.asarray(arrays[LABEL_KEY][start:stop]).astype(np.int64).reshape(-1)
  for row in range(stop - start):
    yield {**{key: value[row] for key, value in chunk.items()}, "label": labels[row], "index": offset + start + row}


def import_official(src, out, *, texture_stats=None, semantic_stats=None, dino_dtype: str | None = "float16",
                    latent_dtype: str = "float32", chunk: int = 256,
                    progress: bool = True) -> dict:
  """Writes the latent dataset of the official shards in `src` under `out`; returns {'directory', 'records',
  'stats'}. Stats files default to `latents_stats.pt` / `latents_sv_stats.pt` in `src` where present;
  `dino_dtype=None` leaves the DINO features out."""
  src = Path(src)
  files = sorted(src.glob("*.safetensors"))
  if not files:
    raise UserError(f"no .safetensors shards in {src}; pass the directory of the official latents "
                    "(e.g. outputs/dataset/imagenet1k-latents/.../imagenet_train_256)")
  shards = [read_safetensors(f) for f in files]
  layouts = [_shard_layout(f, a) for f, a in zip(files, shards)]
  first = layouts[0]
  for f, layout in zip(files, layouts):
    if {k: v for k, v in layout.items() if k != "count"} != {k: v for k, v in first.items() if k != "count"}:
      raise latents_lib.DatasetError(f"{f} holds arrays of other shapes than {files[0]} ({layout} vs {first})")
  with_dino = first["dino"] is not None and dino_dtype is not None
  (ct, h, w), cs = first["texture"], first["semantic"][0]
  if h != w:
    raise latents_lib.DatasetError(f"{files[0]}: latents are {h}×{w}; the format holds square latents")
  dino_dim, gh, gw = first["dino"] if first["dino"] is not None else (768, 0, 0)
  spec = latents_lib.record_spec(h, ct, cs, gh * gw if with_dino else None, dino_dim, latent_dtype,
                                 dino_dtype if with_dino else None)
  given = {"texture": texture_stats, "semantic": semantic_stats}
  for key, name in STATS_FILES.items():
    if given[key] is None and (src / name).exists():
      given[key] = src / name
  stats = {key: official_stats(path, spec[f"{key}_channels"])
           for key, path in given.items() if path is not None}
  counts = [layout["count"] for layout in layouts]
  offsets = np.concatenate([[0], np.cumsum(counts)]).tolist()
  meta = {"source": {"official_shards": str(src.absolute()), "files": [f.name for f in files], "counts": counts},
          "stats_from": {key: stats[key]["source"] if key in stats else "computed" for key in STATS_FILES}}
  writer = latents_lib.LatentWriter(out, len(files), spec, meta)
  writer.check_plan({"source": meta["source"], "record": spec, "stats_from": meta["stats_from"]})
  todo = [i for i in range(len(files)) if not writer.is_done(i)]
  with tqdm(total=sum(counts[i] for i in todo), unit="img", disable=not progress, desc=f"import → {out}") as bar:
    for i in todo:
      with writer.shard(i) as shard:
        for start in range(0, counts[i], chunk):
          stop = min(start + chunk, counts[i])
          for record in _records(shards[i], start, stop, offsets[i], with_dino):
            shard.write(record)
          bar.update(stop - start)
  merged = writer.finish(stats)
  records = writer.count_records()
  if records != offsets[-1]:
    raise latents_lib.DatasetError(f"{writer.directory} holds {records} records but the official shards hold "
                                   f"{offsets[-1]}; delete it and import again")
  return {"directory": str(writer.directory), "records": records, "stats": merged}
