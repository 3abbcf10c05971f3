"""Images → the latent dataset (`sfd_jax.data.latents`): texture latents, DINOv2 tokens and semantic latents of
every image and of its mirror image, written shard by shard.

What the official `extract_features.py` (release of 2025-12-21) computes, for each image (ADM centre crop at
`resolution`) and its horizontal flip:
- texture latent: the texture VAE's posterior sample of the image x in [-1, 1] (`VA_VAE.encode_images`), or its
  mean;
- DINO tokens (`dino_grid`): DINOv2's final-norm patch tokens (no cls or registers) of Normalize(ImageNet mean/std)
  ((x + 1)/2), resized bicubically without antialiasing to 224 px (torch's `F.interpolate(mode='bicubic')`); a
  512 px image is cut into 2×2 tiles of 256 px, each read so, and the four 16×16 grids put back as one 32×32 grid.
  They are the REPA targets, stored as float16 (default, as the official), bfloat16, or not at all, in which case
  the cropped image is stored so a train step can compute them;
- semantic latent: the SemVAE posterior sample of that token grid (the official `semvae.encode(tokens)[0]`; at
  512 px of each tile's grid, put back as the DINO tokens are), or its mean; or, ReDi-style (the official
  `--semantic_feat_type dino_pca_ch8`), the k channels of a PCA of the tokens (`sfd_jax.data.pca`), deterministic,
  given in the 'semvae' slot of the encoders as `load_encoder('pca', FILE)`.
Every random draw comes from fold_in(key(seed), image index), so a record does not depend on its batch, the
number of devices or the number of hosts, and a resumed extraction continues the same dataset. (The official
draws from torch's generator seeded 42 + rank: the same distributions, not the same numbers.)

Shards are runs of `shard_size` consecutive source images; shard i is written by host i mod process_count, its
batches split over that host's devices. A rerun skips finished shards and redoes a half-written one; unreadable
images are skipped, logged and listed in meta.json. The run ends with stats.json (merged exactly over shards)
and a count of the records actually in the shard files.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import math
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from sfd_jax import sharding as shd, storage
from sfd_jax.convert import export, files
from sfd_jax.convert.dinov2 import load_dinov2
from sfd_jax.convert.io import load_state_dict
from sfd_jax.convert.texture_vae import load_texture_vae
from sfd_jax.data import images as images_lib, latents as latents_lib, pca as pca_lib
from sfd_jax.errors import UserError
from sfd_jax.models.dinov2 import DINOv2, repa_features
from sfd_jax.models.layers import posterior_std
from sfd_jax.models.semvae import SemVAE
from sfd_jax.models.texture_vae import AutoencoderKL

LATENT_MODES = ("sample", "mean")
ENCODER_CLASSES = {"texture": AutoencoderKL, "dino": DINOv2, "semvae": SemVAE}
DINO_RECIPE = ("official extract_features.py: tiles of 256 px, ImageNet mean/std, bicubic resize (no antialias) "
               "to tile grid × patch px (224 at 256 px), final-norm patch tokens")
TILE = 256  # px: the official extraction reads DINOv2 on 256 px tiles (2×2 of them at 512 px)


# -------------------------------------------------------------------------------------------------------- encoders

@dataclasses.dataclass(frozen=True)
class Encoder:
  """A frozen model, its variables, and what identifies it in meta.json (path, class, fields, sha256)."""
  model: Any
  variables: Any
  info: dict


def params_sha256(params) -> str:
  """A digest of a params tree (names, dtypes, shapes and values): which weights made a dataset."""
  digest = hashlib.sha256()
  for path, leaf in sorted(flax.traverse_util.flatten_dict(flax.core.unfreeze(jax.device_get(params)),
                                                           sep="/").items()):
    leaf = np.ascontiguousarray(leaf)
    digest.update(f"{path}:{leaf.dtype}:{leaf.shape};".encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def make_encoder(model, variables, **info) -> Encoder:
  """An Encoder of in-memory weights (its sha256 computed here)."""
  return Encoder(model, variables, {"class": type(model).__name__, "fields": export.model_fields(model),
                                    "sha256": params_sha256(variables["params"]), **info})


def load_encoder(kind: str, path, *, dtype: str | None = None) -> Encoder:
  """The `kind` ('texture', 'dino' or 'semvae') encoder from an exported model directory (`cli.convert`,
  `cli.train_semvae`), or for 'dino' a Hugging Face directory / facebookresearch .pth, for 'texture' the
  official LDM checkpoint (SD-VAE f16d32 layout). `dtype` overrides the compute dtype (params stay float32).
  Kind 'pca' is a PCA file (`sfd_jax.data.pca`), the semantic encoder in place of a SemVAE (it computes in
  float32)."""
  if kind == "pca":
    fitted = pca_lib.load(path)
    return make_encoder(fitted.projection, fitted.variables(), path=str(storage.path(path).absolute()),
                        **fitted.info())
  if kind not in ENCODER_CLASSES:
    raise ValueError(f"encoder kind {kind!r} is not one of {sorted(ENCODER_CLASSES)} or 'pca'")
  path = storage.path(path)
  if not path.exists():
    what = {"texture": "an exported texture VAE or the official LDM .ckpt",
            "dino": "an exported DINOv2, a Hugging Face directory or the facebookresearch .pth",
            "semvae": ("the SemVAE that `python -m sfd_jax.cli.convert --kind=semvae` (the released "
                       "semantic_ae_final.pt) or `python -m sfd_jax.cli.train_semvae` exported")}[kind]
    raise UserError(f"the {kind} encoder {path} does not exist; pass {what}")
  extra = {}
  if (path / "model.json").exists():
    model, variables, meta = export.load_model(path)
    extra = {k: v for k, v in meta.items() if k not in ("class", "fields")}
  elif kind == "dino":
    model, variables = load_dinov2(path)
  elif kind == "texture":
    model, variables = load_texture_vae(files.SD_VAE_F16D32, 32, load_state_dict(path))
  else:
    raise UserError(f"{path} is not an exported SemVAE (no model.json); convert the released one with `python -m "
                    "sfd_jax.cli.convert --kind=semvae --checkpoint=semantic_ae_final.pt --out=DIR`, or train one "
                    "(`python -m sfd_jax.cli.train_semvae` exports it to <workdir>/semvae)")
  if not isinstance(model, ENCODER_CLASSES[kind]):
    raise UserError(f"{path} holds a {type(model).__name__}, not the {ENCODER_CLASSES[kind].__name__} expected "
                    f"as the {kind} encoder; check the order of the paths")
  if dtype:
    model = model.clone(dtype=jnp.dtype(dtype))
  return make_encoder(model, variables, path=str(path.absolute()), **extra)


def tiles_per_side(resolution: int) -> int:
  """How many tiles of `TILE` px a side of the image is cut into for DINOv2: resolution // 256, at least 1."""
  return max(resolution // TILE, 1)


def to_tiles(x, t: int):
  """(B, H, W, C) → (B·t², H/t, W/t, C), tile (p1, p2) of image b at b·t² + p1·t + p2: the official
  `b c (p1 h) (p2 w) -> (b p1 p2) c h w`."""
  b, h, w, c = x.shape
  if h % t or w % t:
    raise ValueError(f"a {h}×{w} grid does not split into {t}×{t} tiles")
  return x.reshape(b, t, h // t, t, w // t, c).transpose(0, 1, 3, 2, 4, 5).reshape(b * t * t, h // t, w // t, c)


def from_tiles(x, t: int):
  """The inverse of `to_tiles`: the official `(b p1 p2) d h w -> b d (p1 h) (p2 w)`."""
  n, h, w, c = x.shape
  return x.reshape(n // (t * t), t, t, h, w, c).transpose(0, 1, 3, 2, 4, 5).reshape(n // (t * t), t * h, t * w, c)


def dino_grid(model: DINOv2, variables, images, grid: int | None = None):
  """DINO tokens of uint8 NHWC images as the (B, g, g, D) grid a SemVAE reads (row-major), as the official
  extraction computes them: the image cut into t×t tiles (`to_tiles`, t = `tiles_per_side(W)`), each read the REPA
  way (`repa_features`, g/t tokens a side; by default REPA's 16 for a 256 px tile and DINOv2/14) and put back in
  place (`from_tiles`). `images` / 127.5 − 1 being the texture VAE's input x, `repa_features`' /255 is the
  official (x + 1)/2 up to float32 rounding."""
  t = tiles_per_side(images.shape[2])
  if grid is not None and grid % t:
    raise ValueError(f"a {grid}-token grid does not split into {t}×{t} tiles")
  tokens = repa_features(model, variables, to_tiles(images, t), None if grid is None else grid // t)
  g = math.isqrt(tokens.shape[1])
  return from_tiles(tokens.reshape(tokens.shape[0], g, g, tokens.shape[2]), t)


def latent_layout(texture: Encoder, dino: Encoder, semvae: Encoder, resolution: int) -> dict:
  """Latent size and channels, DINO tokens and width at `resolution`; errors when the three do not fit."""
  images = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.uint8)
  tex = jax.eval_shape(lambda v, x: texture.model.apply(v, x.astype(jnp.float32), method="encode")[0],
                       texture.variables, images)
  g, t = tex.shape[1], tiles_per_side(resolution)  # DINOv2 reads (g/t)·patch px a tile, so that its tokens
  if resolution % t or g % t:                       # line up with the texture latent
    raise UserError(f"at {resolution} px the texture latent is {g}×{g}, which does not split into the {t}×{t} tiles "
                    f"of {TILE} px that DINOv2 reads; extract at a multiple of {TILE} px")
  tokens = jax.eval_shape(lambda v, x: dino_grid(dino.model, v, x, g), dino.variables, images)
  n, d = tokens.shape[1] * tokens.shape[2], tokens.shape[3]
  name = "PCA" if isinstance(semvae.model, pca_lib.Projection) else "SemVAE"
  problems = []
  if tex.shape[1] != tex.shape[2]:
    problems.append(f"the texture latent is {tex.shape[1]}×{tex.shape[2]}; square images make square latents")
  if semvae.model.feature_dim != d:
    problems.append(f"the {name} reads {semvae.model.feature_dim}-d features but DINOv2 gives {d}-d tokens; "
                    f"use the DINOv2 the {name} was trained on")
  trained_on = (semvae.info.get("trained_on") or {}).get("dino_sha256")
  if trained_on and trained_on != dino.info["sha256"]:
    problems.append(f"the {name} was trained on features of DINOv2 weights {trained_on[:12]}…, not of the given "
                    f"ones ({dino.info['sha256'][:12]}…); pass the DINOv2 it was trained with")
  if problems:
    raise UserError("the encoders do not fit together: " + "; ".join(problems))
  return dict(latent_size=g, texture_channels=tex.shape[-1], semantic_channels=semvae.model.latent_channels,
              dino_tokens=n, dino_dim=d)


# ----------------------------------------------------------------------------------------------------- the encoding

def _latent(mean, logvar, keys, stream: int, mode: str):
  """The posterior mean, or a sample whose noise for row i comes from fold_in(keys[i], stream)."""
  if mode == "mean":
    return mean
  noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, stream), mean.shape[1:], mean.dtype))(keys)
  return mean + posterior_std(logvar) * noise


@functools.partial(jax.jit, static_argnames=("texture", "dino", "semvae", "texture_mode",
                                             "semantic_mode", "dino_dtype"))
def encode_images(variables, images, indices, seed, *, texture, dino, semvae, texture_mode,
                  semantic_mode, dino_dtype):
  """uint8 (B, H, W, 3) centre crops → {texture, texture_flip, semantic, semantic_flip[, dino, dino_flip]}.

  `variables` = {'texture', 'dino', 'semvae'}; `indices` (B,) are the images' source indices, which with `seed`
  fix every random draw (streams: 0/1 texture/flip, 2/3 semantic/flip). A PCA `Projection` as `semvae` makes
  the semantic channels the PCA of the tokens (no posterior: `semantic_mode` does not apply).
  """
  b = images.shape[0]
  both = jnp.concatenate([images, images[:, :, ::-1]])
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(indices)
  pixels = (both.astype(jnp.float32) / 255.0 - 0.5) / 0.5  # ToTensor + Normalize(0.5, 0.5), as torchvision
  mean, logvar = texture.apply(variables["texture"], pixels, method="encode")
  tex = jnp.concatenate([_latent(mean[:b], logvar[:b], keys, 0, texture_mode),
                         _latent(mean[b:], logvar[b:], keys, 1, texture_mode)])
  t = tiles_per_side(images.shape[2])  # the SemVAE, too, reads each tile on its own
  grid = dino_grid(dino, variables["dino"], both, tex.shape[1])
  tokens = grid.reshape(2 * b, -1, grid.shape[-1])
  if isinstance(semvae, pca_lib.Projection):  # token by token: tiles do not matter
    sem = semvae.apply(variables["semvae"], grid)
  else:
    mean, logvar = (from_tiles(m, t) for m in semvae.apply(variables["semvae"], to_tiles(grid, t), method="encode"))
    sem = jnp.concatenate([_latent(mean[:b], logvar[:b], keys, 2, semantic_mode),
                           _latent(mean[b:], logvar[b:], keys, 3, semantic_mode)])
  out = {"texture": tex[:b], "texture_flip": tex[b:], "semantic": sem[:b], "semantic_flip": sem[b:]}
  if dino_dtype:
    tokens = tokens.astype(dino_dtype)
    out.update(dino=tokens[:b], dino_flip=tokens[b:])
  return out


@functools.partial(jax.jit, static_argnames=("dino",))
def _dino_tokens(variables, images, *, dino):
  grid = dino_grid(dino, variables, images)
  return grid.reshape(-1, grid.shape[-1])


def image_tokens(source, dino: Encoder, indices, *, resolution: int = 256, batch_size: int = 32,
                 num_threads: int = 16) -> Iterator[np.ndarray]:
  """The DINO tokens (n, D) float32 of the images `indices` of `source`, read as the extraction reads them (ADM
  centre crop at `resolution`, tiles of 256 px), batch by batch on this process's default device; unreadable images
  are skipped with a warning. For fitting a PCA (`sfd_jax.data.pca.fit`)."""
  load = functools.partial(_load, source, resolution=resolution)
  chunks = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
  with ThreadPoolExecutor(num_threads) as pool:
    for rows in _prefetched(pool, load, chunks):
      good = [r[1] for r in rows if r[1] is not None]
      for index, _, _, skipped in (r for r in rows if r[1] is None):
        logging.warning("skipped unreadable image %d (%s): %s", index, skipped["file"], skipped["reason"])
      if good:  # padded to a full batch: one compilation
        tokens = _dino_tokens(dino.variables, np.stack(good + [good[-1]] * (batch_size - len(good))), dino=dino.model)
        yield np.asarray(tokens[:len(good) * (tokens.shape[0] // batch_size)])


# ------------------------------------------------------------------------------------------------------ extraction

@dataclasses.dataclass(frozen=True)
class Settings:
  """What an extraction makes (all but `batch_size` and `num_threads` fix the dataset's content)."""
  resolution: int = 256
  shard_size: int = 1000             # source images per shard (about 0.85 GB per shard with fp16 DINO tokens)
  texture_latent: str = "sample"     # sample (official) | mean
  semantic_latent: str = "sample"    # sample (official) | mean, of a SemVAE (a PCA has no posterior)
  latent_dtype: str = "float16"      # float16 | float32
  dino_dtype: str | None = "float16"  # float16 | bfloat16 | None (not stored: the cropped image is stored instead)
  seed: int = 0
  max_images: int = 0                # the first N source images (0: all)
  batch_size: int = 32               # images per step on this host, split over its devices
  num_threads: int = 16              # image decoding threads


def _check_settings(s: Settings, local_devices: int):
  for name in ("texture_latent", "semantic_latent"):
    if getattr(s, name) not in LATENT_MODES:
      raise UserError(f"{name} {getattr(s, name)!r} is not one of {LATENT_MODES}")
  if s.latent_dtype not in ("float16", "float32"):
    raise UserError(f"latent_dtype {s.latent_dtype!r} is not one of ('float16', 'float32')")
  if s.batch_size <= 0 or s.batch_size % local_devices:
    raise UserError(f"batch_size {s.batch_size} must be a positive multiple of this host's {local_devices} "
                    "devices")
  if s.shard_size <= 0:
    raise UserError(f"shard_size {s.shard_size} must be positive")


def _load(source, index: int, resolution: int):
  """(index, centre crop or None, label, None or {'file', 'reason'} of a skipped image)."""
  try:
    record = source[index]
  except images_lib.UnreadableImage as e:
    return index, None, None, {"file": e.where, "reason": e.reason}
  try:  # a decoded image can still fail the crop (e.g. a 0-pixel side)
    return index, images_lib.adm_center_crop(record["image"], resolution), int(record["label"]), None
  except Exception as e:
    return index, None, None, {"file": source.where(index), "reason": f"{type(e).__name__}: {e}"}


def _prefetched(pool, load, chunks, ahead: int = 2) -> Iterator[list]:
  """[load(i) for i in chunk] for each chunk, decoding up to `ahead` chunks in advance on `pool`."""
  chunks = iter(chunks)
  queue = collections.deque([pool.submit(load, i) for i in chunk] for chunk in itertools.islice(chunks, ahead))
  while queue:
    futures = queue.popleft()
    queue.extend([pool.submit(load, i) for i in chunk] for chunk in itertools.islice(chunks, 1))
    yield [f.result() for f in futures]


class _Extraction:
  """The device side (encoders replicated over this host's devices, batches split over them) and the records."""

  def __init__(self, encoders: Mapping[str, Encoder], settings: Settings, spec: Mapping):
    devices = jax.local_devices()
    self.mesh = shd.make_mesh(devices=devices)
    self.settings, self.spec = settings, spec
    replicated = NamedSharding(self.mesh, P())
    self.variables = jax.device_put({k: encoders[k].variables for k in ENCODER_CLASSES}, replicated)
    self.static = dict(texture=encoders["texture"].model, dino=encoders["dino"].model,
                       semvae=encoders["semvae"].model, texture_mode=settings.texture_latent,
                       semantic_mode=settings.semantic_latent,
                       dino_dtype=settings.dino_dtype and jnp.dtype(latents_lib.DINO_DTYPES[settings.dino_dtype]))
    self.seed = jax.device_put(np.int32(settings.seed), replicated)

  def dispatch(self, rows):
    """Starts encoding the readable images of `rows` (padded to a full batch: one compilation)."""
    good = [r for r in rows if r[1] is not None]
    if not good:
      return rows, None
    pad = self.settings.batch_size - len(good)
    images = np.stack([r[1] for r in good] + [good[-1][1]] * pad)
    indices = np.asarray([r[0] for r in good] + [good[-1][0]] * pad, np.int32)
    put = lambda x: jax.device_put(x, shd.batch_sharding(self.mesh, x.ndim))
    return rows, encode_images(self.variables, put(images), put(indices), self.seed, **self.static)

  def write(self, out: latents_lib.ShardWriter, dispatched) -> int:
    """Writes the records of a dispatched batch in index order, lists its unreadable images; returns the rows."""
    rows, outputs = dispatched
    host = jax.device_get(outputs) if outputs is not None else {}
    k = 0
    for index, image, label, skipped in rows:
      if image is None:
        logging.warning("skipped unreadable image %d (%s): %s", index, skipped["file"], skipped["reason"])
        out.skip(index, **skipped)
        continue
      record = {key: value[k] for key, value in host.items()}
      record.update(label=label, index=index)
      if self.spec["image_size"]:
        record["image"] = image
      out.write(record)
      k += 1
    return len(rows)


def extract(source, encoders: Mapping[str, Encoder], out, settings: Settings = Settings(), *,
            progress: bool = True) -> dict | None:
  """Writes the latent dataset of `source` (an `images` source: records and `describe()`) under `out`;
  resumable. Every host calls it.

  `encoders` = {'texture', 'dino', 'semvae'}, 'semvae' being a SemVAE or a PCA (`load_encoder('pca', FILE)`),
  whose channels become the dataset's semantic latents. Returns on process 0 {'directory', 'records', 'skipped',
  'stats'} after the final count, elsewhere None.
  """
  _check_settings(settings, jax.local_device_count())
  layout = latent_layout(encoders["texture"], encoders["dino"], encoders["semvae"], settings.resolution)
  num_images = min(len(source), settings.max_images) if settings.max_images else len(source)
  if not num_images:
    raise UserError("the image source holds no images; check its path")
  num_shards = math.ceil(num_images / settings.shard_size)
  spec = latents_lib.record_spec(**layout, latent_dtype=settings.latent_dtype, dino_dtype=settings.dino_dtype,
                                 image_size=None if settings.dino_dtype else settings.resolution)
  content = {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("batch_size", "num_threads")}
  meta = {"source": source.describe(), "num_images": num_images, **content, "crop": "ADM centre crop",
          "flip": "horizontal", "dino_recipe": DINO_RECIPE, "encoders": {k: encoders[k].info for k in ENCODER_CLASSES}}
  writer = latents_lib.LatentWriter(out, num_shards, spec, meta)
  # The tiles are in the plan where there are several, so that a 512 px dataset of an sfd_jax that read DINOv2 on
  # the whole image is not continued with tiles.
  tiles = tiles_per_side(settings.resolution)
  writer.check_plan({"source": meta["source"], "num_images": num_images, **content, "record": spec,
                     "encoders": {k: encoders[k].info["sha256"] for k in ENCODER_CLASSES},
                     **({"dino_tiles": tiles} if tiles > 1 else {})},
                    write=jax.process_index() == 0)

  mine = [s for s in range(num_shards) if s % jax.process_count() == jax.process_index() and not writer.is_done(s)]
  shard_chunks = {s: [list(range(start, min(start + settings.batch_size, stop)))
                      for start in range(s * settings.shard_size, stop, settings.batch_size)]
                  for s in mine for stop in [min((s + 1) * settings.shard_size, num_images)]}
  if mine:
    extraction = _Extraction(encoders, settings, spec)
    bar = tqdm(total=sum(len(c) for s in mine for c in shard_chunks[s]), unit="img", smoothing=0.05,
               dynamic_ncols=True, disable=not progress or jax.process_index() != 0,
               desc=f"extract → {writer.directory.parent.parent}")
    load = functools.partial(_load, source, resolution=settings.resolution)
    pool = ThreadPoolExecutor(settings.num_threads)
    skipped = 0
    try:  # images are decoded ahead across shard boundaries; each shard is published after its last batch
      batches = _prefetched(pool, load, [chunk for s in mine for chunk in shard_chunks[s]])
      for shard in mine:
        with writer.shard(shard) as shard_out:
          pending = None
          for _ in shard_chunks[shard]:  # the device encodes batch k while batch k − 1 is written
            dispatched = extraction.dispatch(next(batches))
            if pending is not None:
              bar.update(extraction.write(shard_out, pending))
            pending = dispatched
          bar.update(extraction.write(shard_out, pending))
          skipped += len(shard_out.skipped)
        bar.set_postfix(shard=shard, skipped=skipped)
    finally:
      pool.shutdown(wait=True, cancel_futures=True)
      bar.close()
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("sfd_jax extraction: all shards written")
  if jax.process_index() != 0:
    return None
  stats = writer.finish()
  records = writer.count_records()
  skipped = json.loads((writer.directory / "meta.json").read_text())["skipped"]
  if records + len(skipped) != num_images:
    raise latents_lib.DatasetError(
        f"{writer.directory} holds {records} records and lists {len(skipped)} skipped images, but the source has "
        f"{num_images}; delete the dataset directory and extract again")
  return {"directory": str(writer.directory), "records": records, "skipped": skipped, "stats": stats}

