"""The image-generation application: SFD models → image files (one PNG per image, an ADM-style .npz) or a grid.

Image i is a pure function of (seed, i): its noise is `normal(fold_in(key, i))` and its label comes from i, so a
re-run skips the PNGs already written and fills in the rest, with any batch size or device count (dopri5 uses
the per-sample error norm). Every process generates its rows of each global batch and writes their PNGs (the
output must be on a filesystem all hosts share); process 0 packs `samples.npz` (`arr_0` uint8 N×H×W×3, `arr_1`
labels) once all N exist. Models are exported directories (`python -m sfd_jax.cli.convert`); the DiT may also
be an official checkpoint with a preset or official kwargs. Latent stats: a stats.json or the official
latents_stats.pt. `python -m sfd_jax.cli.sample` is the command line of `run(Settings(...))`.
"""
from __future__ import annotations

import dataclasses
import json
import time
import zipfile

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image, ImageDraw
from tqdm import tqdm

from sfd_jax import sharding, storage
from sfd_jax.console import say
from sfd_jax.convert import export
from sfd_jax.convert.dit import load_dit, official_sfd_kwargs
from sfd_jax.convert.io import load_state_dict, select_state_dict
from sfd_jax.data import extract as extract_lib, latents as latents_lib
from sfd_jax.diffusion import sampler, schedule as schedule_lib
from sfd_jax.errors import UserError
from sfd_jax.models import dit as dit_lib, layers
from sfd_jax.models.texture_vae import denormalize_texture, to_uint8

DEMO_CLASSES = (106, 22, 279, 975, 388, 15, 36, 979)  # the official demo labels
OFFICIAL_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".npz")


@dataclasses.dataclass
class Settings:
  """Everything a sampling run needs (the flags of this tool, one for one)."""
  model: str
  vae: str
  stats: str
  out: str
  step: int | None = None              # a training workdir's checkpoint (default: the newest complete one)
  preset: str = "XL"
  model_kwargs: dict | None = None
  guide_model: str | None = None
  guide_preset: str = "B"
  guide_model_kwargs: dict | None = None
  guide_step: int | None = None        # a training workdir guide's checkpoint (default: the newest complete one)
  num_images: int = 50_000
  batch_size: int = 64
  seed: int = 0
  labels: str | None = None            # default: 'balanced'; with demo, classes that fit the model
  fid_num: int | None = None
  method: str = "dopri5"
  num_steps: int = 250
  shift: float = 0.0
  rtol: float = 1e-3
  atol: float = 1e-6
  error_norm: str = "per_sample"
  delta_t: float | None = None         # overrides Δ of a model with an offset or random_offset schedule
  cfg_scale: float = 1.0
  cfg_scale_tex: float | None = None
  cfg_scale_sem: float | None = None
  cfg_interval_start: float = 0.0
  cfg_interval_mode: str | None = None
  latent_multiplier: float = 1.0
  dtype: str = "float32"
  attention: str | None = None         # the DiTs' attention (layers.ATTENTION); None: each model's own
  matmul_precision: str | None = None  # of the DiTs and the decoder (layers.MATMUL_PRECISIONS); None: the model's
  attention_check: bool = True         # the first batch compares the attention kernel with XLA's (accelerators)
  demo: bool = False
  npz: bool = True


# --------------------------------------------------------------------------------------------------------------
# Loading.


def load_diffusion_model(path, preset: str = "XL", model_kwargs: dict | None = None, dtype=jnp.float32,
                         step: int | None = None):
  """(model, variables, official kwargs or {}) of a DiT: an exported directory, a training workdir (EMA weights of
  its newest checkpoint), or an official weight file. The kwargs of a training run or an export also hold the
  `schedule` it was trained with (a `diffusion.schedule.Schedule`; `sampling_schedule` reads it).

  Official files take their `ema` weights, with the official constructor kwargs of `preset` unless
  `model_kwargs` (official kwargs, e.g. a yaml's or fixture's) are given. New sources go here.
  """
  path = storage.path(path)
  if step is not None and not (path / "checkpoints").is_dir():
    raise UserError(f"{path} is not a training workdir (with checkpoints/): only a workdir has a step to choose; "
                    "leave the step out")
  if (path / "model.json").exists():
    model, variables, meta = export.load_model(path, dtype=dtype)
    stored = {"schedule": schedule_lib.from_metadata(meta["schedule"])} if "schedule" in meta else {}
    return model, variables, {**meta.get("official_kwargs", {}), **stored}
  if (path / "checkpoints").is_dir():
    return load_training_run(path, dtype, step)
  if path.is_dir() or path.suffix.lower() not in OFFICIAL_SUFFIXES:
    raise UserError(f"{path} is neither an exported model directory (with model.json) nor an official "
                    f"weight file ({', '.join(OFFICIAL_SUFFIXES)}); export one with "
                    "`python -m sfd_jax.cli.convert --kind=dit`")
  kwargs = model_kwargs or official_sfd_kwargs(preset)
  weights = select_state_dict(load_state_dict(path))
  weights = {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v for k, v in weights.items()}
  model, variables = load_dit(kwargs, weights, dtype=dtype)
  return model, variables, kwargs


def load_training_run(workdir, dtype=jnp.float32, step: int | None = None):
  """(model, EMA variables, official-style kwargs and the run's `schedule`) of a training run: checkpoint `step`,
  or the newest one that reads (a truncated newest checkpoint, e.g. of a killed run, is passed over with a
  warning). The schedule is the run config's (`loss.delta_t`, `loss.schedule`); a learned one's parameters come
  from the checkpoint's train state."""
  from ml_collections import ConfigDict

  from sfd_jax.training import checkpoint as ckpt_lib, config as config_lib
  checkpointer = ckpt_lib.Checkpointer(storage.path(workdir) / "checkpoints")
  try:
    def model_of(config):
      return config_lib.build_model(ConfigDict(config).model).clone(dtype=dtype)
    step, config, params = checkpointer.readable_params(model_of, step)
    loss = ConfigDict(config).loss
    learned_raw = None
    if "schedule" in loss and loss.schedule.kind == "learned":
      learned_raw = checkpointer.restore_params(step, jax.ShapeDtypeStruct((loss.schedule.cells,), jnp.float32),
                                                "schedule_raw")
  finally:
    checkpointer.close()
  # A run saved before the schedule was configurable trained SFD's offset by loss.delta_t.
  schedule = (schedule_lib.from_config(loss, learned_raw) if "schedule" in loss
              else schedule_lib.Offset(loss.delta_t))
  say(f"model: EMA weights of step {step} of {workdir}")
  return model_of(config), {"params": params}, {"semfirst_delta_t": loss.delta_t,
                                                "semantic_chans": loss.semantic_channels,
                                                "schedule": schedule}


def sampling_schedule(official: dict, model, delta_t: float | None = None) -> schedule_lib.Schedule:
  """The schedule a model is sampled with: the one stored with it (a training run's or an export's `schedule`),
  else, for official weights, SFD's offset by their `semfirst_delta_t` (0.3 where they do not say; 0 for a model
  without the dual timestep). `delta_t` overrides Δ, only of an offset or random_offset schedule."""
  if "schedule" in official:
    schedule = official["schedule"]
  else:
    schedule = schedule_lib.Offset(float(official.get("semfirst_delta_t", 0.3 if model.dual_timestep else 0.0)))
  if delta_t is None:
    return schedule
  if not isinstance(schedule, schedule_lib.Offset):
    raise UserError(f"--delta_t={delta_t:g} sets Δ of an offset or random_offset schedule, but this model was "
                    f"trained with a {schedule.to_metadata()['kind']} schedule: leave --delta_t out to sample with "
                    "it")
  return eqx.tree_at(lambda s: s.delta, schedule, float(delta_t))


def load_texture_stats(path):
  """(mean, std) of the texture latents, one value per channel, from a latent dataset directory, its stats.json,
  or an official stats .pt."""
  path = storage.path(path)
  if not path.exists():
    raise UserError(f"latent stats {path} do not exist; pass the latent dataset directory, its stats.json, "
                    "or the official latents_stats.pt")
  if path.is_dir():
    path = latents_lib.find_dataset(storage.filesystem_path(path, "the latent dataset")) / "stats.json"
  if path.suffix == ".json":
    stats = json.loads(path.read_text())
    if "texture" not in stats:
      raise UserError(f"{path} has no 'texture' stats (keys: {sorted(stats)}); make it with "
                      "`python -m sfd_jax.cli.convert --kind=stats`")
    stats = stats["texture"]
  else:
    stats = load_state_dict(path)
  if "mean" not in stats or "std" not in stats:
    raise UserError(f"{path} must hold the texture 'mean' and 'std', found {sorted(stats)}")
  return (np.asarray(stats["mean"], np.float32).reshape(-1), np.asarray(stats["std"], np.float32).reshape(-1))


# --------------------------------------------------------------------------------------------------------------
# Labels and the jitted generator.


def parse_labels(spec: str | None, num_classes: int, demo: bool = False):
  """'random', 'balanced', or a comma list of class ids (image i gets entry i mod length). None is 'balanced', or
  for a demo grid the official demo classes (ImageNet models) or 0, 1, ... (models of other datasets)."""
  if spec is None:
    if not demo:
      return "balanced"
    return DEMO_CLASSES if num_classes == 1000 else tuple(range(num_classes))
  if spec in ("random", "balanced"):
    return spec
  try:
    labels = tuple(int(v) for v in spec.split(","))
  except ValueError:
    raise UserError(f"--labels={spec!r}: use 'random', 'balanced' or comma-separated class ids") from None
  if not all(0 <= c < num_classes for c in labels):
    raise UserError(f"--labels={spec!r}: class ids must lie in [0, {num_classes}) for this model")
  return labels


def labels_of(key, indices, labels, num_classes: int, fid_num: int):
  """The class label of each image index (a pure function of the index)."""
  if labels == "random":
    return sampler.random_labels(key, indices, num_classes)
  if labels == "balanced":
    return sampler.balanced_labels(key, indices, fid_num, num_classes)
  return jnp.asarray(labels, jnp.int32)[indices % len(labels)]


def run_keys(seed: int):
  """(noise key, label key) of a run: image i uses `fold_in(noise key, i)` and `fold_in(label key, i)`."""
  key = jax.random.key(seed)
  return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)


GUIDANCE = ("none", "cfg", "autoguidance")


def guidance_of(s: Settings, guide_model) -> str:
  """The guidance rule of a run: AutoGuidance by `guide_model` where there is one, classifier-free guidance where
  `cfg_scale` is above 1, else none. It is the structure of the compiled program (the scales are its inputs)."""
  if guide_model is not None:
    return "autoguidance"
  return "cfg" if s.cfg_scale > 1.0 else "none"


def guidance_scales(s: Settings) -> dict:
  """The guidance numbers of a run as float32 scalars, inputs of the compiled generator (a new scale reuses it):
  `scale` (CFG), `scale_tex`, `scale_sem` (AutoGuidance; default `scale`) and `interval_start`. Host values, which
  every process of a pod holds alike."""
  f32 = lambda v: np.asarray(v, np.float32)
  return {"scale": f32(s.cfg_scale), "scale_tex": f32(s.cfg_scale_tex or s.cfg_scale),
          "scale_sem": f32(s.cfg_scale_sem or s.cfg_scale), "interval_start": f32(s.cfg_interval_start)}


def guided_velocity(model, variables, guide_model, guide_variables, guidance: str, scales: dict, interval_mode: str,
                    semantic_channels: int):
  """The velocity a run samples (the planner costs the same one), by the rule `guidance` (`GUIDANCE`) with the
  `scales` of `guidance_scales` (traced values are fine)."""
  if guidance == "autoguidance":
    return sampler.autoguidance_velocity(model, variables, guide_model, guide_variables, scales["scale_tex"],
                                         scales["scale_sem"], scales["interval_start"], interval_mode,
                                         semantic_channels)
  if guidance == "cfg":
    return sampler.cfg_velocity(model, variables, scales["scale"], model.num_classes, scales["interval_start"],
                                interval_mode, semantic_channels)
  if guidance == "none":
    return sampler.model_velocity(model, variables)
  raise ValueError(f"guidance {guidance!r} is not one of {GUIDANCE}")


def schedule_jit(fn, method: str, mesh=None):
  """`fn(schedule, *args)` compiled once for every schedule of the same kind and shapes: the schedule's numbers
  (Δ, knots, learned parameters) are float32 inputs, so a Δ sweep does not recompile. The official fixed grids
  ('euler', 'heun') are computed on the host from the schedule's numbers, so there each schedule compiles once.
  Traced with `mesh` in context when given (`sharding.traced_with_mesh`)."""
  traced = fn if mesh is None else sharding.traced_with_mesh(mesh, fn)
  if method not in sampler.FIXED_GRIDS:
    compiled = jax.jit(traced)
    return lambda schedule, *args: compiled(jax.tree.map(lambda x: np.asarray(x, np.float32), schedule), *args)
  per_schedule = {}

  def on_grid(schedule, *args):
    schedule = jax.tree.map(np.asarray, schedule)  # host numbers, which the sampler reads while tracing
    leaves, treedef = jax.tree.flatten(schedule)
    key = (treedef, tuple((x.shape, x.dtype.str, x.tobytes()) for x in leaves))
    if key not in per_schedule:
      per_schedule[key] = jax.jit(lambda *args: traced(schedule, *args))  # the schedule a constant
    return per_schedule[key](*args)
  return on_grid


def make_generator(s: Settings, model, vae, guide_model, semantic_channels: int, interval_mode: str, fid_num: int,
                   mesh=None):
  """(schedule, scales, params…, indices) → (uint8 images, labels, model calls): noise → ODE → texture → decode.

  The schedule (`sampling_schedule`) and the guidance scales (`guidance_scales`) are inputs: one compiled
  generator serves a Δ sweep and every scale of the run's guidance rule (`guidance_of`; `schedule_jit` says where
  a schedule compiles again). Traced with `mesh` in context when given (the samples stay split over its devices,
  the TPU attention kernels run on each device's samples)."""
  noise_key, label_key = run_keys(s.seed)
  labels = parse_labels(s.labels, model.num_classes, s.demo)
  latent_shape = (model.input_size, model.input_size, model.in_channels)
  guidance = guidance_of(s, guide_model)

  def generate(schedule, scales, dit_vars, guide_vars, vae_vars, mean, std, indices):
    z = sampler.noise(noise_key, indices, latent_shape)
    y = labels_of(label_key, indices, labels, model.num_classes, fid_num)
    velocity = guided_velocity(model, dit_vars, guide_model, guide_vars, guidance, scales, interval_mode,
                               semantic_channels)
    final, stats = sampler.sample(velocity, z, y, schedule=schedule, method=s.method, num_steps=s.num_steps,
                                  shift=s.shift, rtol=s.rtol, atol=s.atol, error_norm=s.error_norm,
                                  semantic_channels=semantic_channels)
    texture = denormalize_texture(final, mean, std, s.latent_multiplier, model.in_channels - semantic_channels)
    images = to_uint8(vae.apply(vae_vars, texture, method=vae.decode))
    return images, y, stats["model_calls"]

  return schedule_jit(generate, s.method, mesh)


def with_model_options(s: Settings, model):
  """`model` with the attention and matmul precision of the settings where they are given."""
  if s.attention is not None and s.attention not in layers.ATTENTION:
    raise UserError(f"--attention={s.attention!r} is not one of {layers.ATTENTION}")
  if s.matmul_precision is not None and s.matmul_precision not in layers.MATMUL_PRECISIONS:
    raise UserError(f"--matmul_precision={s.matmul_precision!r} is not one of {layers.MATMUL_PRECISIONS}")
  options = {"attention": s.attention, "matmul_precision": s.matmul_precision}
  return model.clone(**{k: v for k, v in options.items() if v is not None})


def check_attention(s: Settings, mesh, models, indices, fid_num: int):
  """Before the first batch: each DiT's attention kernel against XLA's on the batch's first samples (its noise and
  labels; `dit.check_attention`), where the model runs a kernel and `s.attention_check` is on. An attention the
  device lacks is a user error even without the check."""
  device = jax.devices()[0]
  noise_key, label_key = run_keys(s.seed)
  for model, variables in models:
    if layers.attention_kernel(model.attention, device) == "xla" or not s.attention_check:
      continue
    rows = jnp.asarray(np.resize(indices, sharding.batch_devices(mesh)))  # one sample per device
    x = sampler.noise(noise_key, rows, (model.input_size, model.input_size, model.in_channels))
    y = labels_of(label_key, rows, parse_labels(s.labels, model.num_classes, s.demo), model.num_classes, fid_num)
    t = jnp.full(rows.shape, 0.5, jnp.float32)
    dit_lib.check_attention(model, variables, x, t, t, y, mesh, gradients=False,
                            where=f"the first sampling batch on {device.device_kind}")


# --------------------------------------------------------------------------------------------------------------
# Files.


def png_path(out, index: int):
  return out / "images" / f"{index:06d}.png"


def pending_indices(out, num_images: int) -> np.ndarray:
  """Indices in [0, num_images) whose PNG does not exist yet (one listing of the directory, also in a bucket)."""
  written = {p.name for p in (out / "images").iterdir()} if (out / "images").exists() else set()
  return np.array([i for i in range(num_images) if png_path(out, i).name not in written], np.int64)


def _read_png(path) -> np.ndarray:
  with path.open("rb") as f:
    return np.asarray(Image.open(f).convert("RGB"))


def write_npz(path, out, num_images: int, labels: np.ndarray):
  """`arr_0` (N, H, W, 3) uint8 streamed from the PNGs (never all in memory) and `arr_1` the labels."""
  first = _read_png(png_path(out, 0))
  with storage.staged_file(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
    with zf.open("arr_0.npy", "w", force_zip64=True) as f:
      header = {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False,
                "shape": (num_images, *first.shape)}
      np.lib.format.write_array_header_2_0(f, header)
      for i in range(num_images):
        image = _read_png(png_path(out, i))
        if image.shape != first.shape:
          raise UserError(f"{png_path(out, i)} is {image.shape}, image 0 is {first.shape}: the output directory "
                          "mixes runs of different resolutions; use a fresh --out")
        f.write(image.tobytes())
    with zf.open("arr_1.npy", "w") as f:
      np.lib.format.write_array(f, labels.astype(np.int64))


def demo_grid(images: np.ndarray, labels: np.ndarray, columns: int, min_width: int = 64) -> Image.Image:
  """Images in rows of `columns`, each with its class id written underneath; images narrower than `min_width`
  are enlarged (nearest neighbour, an integer factor) so that the captions fit."""
  scale = -(-min_width // images.shape[2])
  images = images.repeat(scale, axis=1).repeat(scale, axis=2) if scale > 1 else images
  n, h, w, _ = images.shape
  rows, caption = -(-n // columns), 14
  grid = Image.new("RGB", (columns * w, rows * (h + caption)), "white")
  draw = ImageDraw.Draw(grid)
  for i, (image, label) in enumerate(zip(images, labels)):
    x, y = (i % columns) * w, (i // columns) * (h + caption)
    grid.paste(Image.fromarray(image), (x, y))
    draw.text((x + 2, y + h + 1), f"class {int(label)}", fill="black")
  return grid


def _local_rows(array) -> tuple[np.ndarray, np.ndarray]:
  """(row indices, rows) of a batch-sharded global array that live on this process."""
  shards = {s.index[0].start or 0: np.asarray(s.data) for s in array.addressable_shards}
  starts = sorted(shards)
  rows = np.concatenate([shards[k] for k in starts])
  index = np.concatenate([np.arange(k, k + len(shards[k])) for k in starts])
  return index, rows


# --------------------------------------------------------------------------------------------------------------
# The run.


def run(s: Settings):
  """Generates the images of `s` (skipping those already written) and returns the output directory."""
  out = storage.path(s.out)
  dtype = jnp.dtype(s.dtype)
  model, dit_vars, official = load_diffusion_model(s.model, s.preset, s.model_kwargs, dtype, s.step)
  model = with_model_options(s, model)
  guide_model, guide_vars = None, None
  if s.guide_model:
    guide_model, guide_vars, _ = load_diffusion_model(s.guide_model, s.guide_preset, s.guide_model_kwargs, dtype,
                                                      s.guide_step)
    guide_model = with_model_options(s, guide_model)
  vae = extract_lib.load_encoder("texture", s.vae, dtype=s.dtype)
  # The decoder runs at the DiT's matmul precision: one precision for the whole of a sampling run.
  vae, vae_vars = vae.model.clone(matmul_precision=model.matmul_precision), vae.variables
  mean, std = load_texture_stats(s.stats)
  schedule = sampling_schedule(official, model, s.delta_t)
  semantic_channels = int(official.get("semantic_chans", 16))
  interval_mode = s.cfg_interval_mode or official.get("semfirst_infer_interval_mode", "both")
  fid_num = s.fid_num or s.num_images

  mesh = sharding.make_mesh()
  sharding.check_batch_size(mesh, s.batch_size, "--batch_size")
  generate = make_generator(s, model, vae, guide_model, semantic_channels, interval_mode, fid_num, mesh)
  params = jax.device_put((dit_vars, guide_vars, vae_vars, mean, std), sharding.replicated(mesh))
  scales = guidance_scales(s)
  models = [(model, params[0])] + ([(guide_model, params[1])] if guide_model is not None else [])

  if s.demo:
    indices = np.arange(s.num_images)
    padded = np.resize(indices, -(-len(indices) // s.batch_size) * s.batch_size)
    check_attention(s, mesh, models, padded, fid_num)
    images, labels = [], []
    for start in range(0, len(padded), s.batch_size):
      batch = sharding.shard_batch(mesh, padded[start:start + s.batch_size][sharding.host_rows(mesh, s.batch_size)])
      imgs, ys, _ = generate(schedule, scales, *params, batch)
      images.append(sharding.to_host(imgs))
      labels.append(sharding.to_host(ys))
    if jax.process_index() == 0:
      out.mkdir(parents=True, exist_ok=True)
      classes = parse_labels(s.labels, model.num_classes, demo=True)
      columns = min(len(indices), len(classes) if isinstance(classes, tuple) and len(classes) <= 16 else 8)
      grid = demo_grid(np.concatenate(images)[:len(indices)], np.concatenate(labels)[:len(indices)], columns)
      storage.write_png(out / "demo.png", np.asarray(grid))
    return out

  (out / "images").mkdir(parents=True, exist_ok=True)
  pending = pending_indices(out, s.num_images)
  multihost_utils.sync_global_devices("sfd_sample: pending listed")
  say(f"sampling {len(pending)} of {s.num_images} images ({s.num_images - len(pending)} already in {out / 'images'}) "
      f"in batches of {s.batch_size} on {jax.device_count()} devices")
  if len(pending):
    check_attention(s, mesh, models, pending, fid_num)
  bar = tqdm(total=len(pending), unit="img", disable=jax.process_index() != 0 or not len(pending))
  for start in range(0, len(pending), s.batch_size):
    chunk = pending[start:start + s.batch_size]
    padded = np.concatenate([chunk, np.full(s.batch_size - len(chunk), chunk[-1])])  # last batch: repeat
    batch = sharding.shard_batch(mesh, padded[sharding.host_rows(mesh, s.batch_size)])
    tick = time.perf_counter()
    images, _, calls = generate(schedule, scales, *params, batch)
    rows, local = _local_rows(images)
    for row, image in zip(rows, local):
      if row < len(chunk):
        storage.write_png(png_path(out, int(padded[row])), image)  # whole or not at all
    bar.set_postfix(NFE=int(calls), batch_s=f"{time.perf_counter() - tick:.1f}")
    bar.update(len(chunk))
  bar.close()
  multihost_utils.sync_global_devices("sfd_sample: images written")
  if s.npz and jax.process_index() == 0:
    labels = labels_of(run_keys(s.seed)[1], jnp.arange(s.num_images),
                       parse_labels(s.labels, model.num_classes), model.num_classes, fid_num)
    write_npz(out / "samples.npz", out, s.num_images, np.asarray(labels))
  return out
