"""The Semantic VAE objective and its training task.

The loss is the official train.py's (`tokenizer/semvae/train.py` with `ch16.yaml`), between the DINOv2 patch
tokens f of an image, (L, D) per sample, and their reconstruction f̂ from a posterior sample s = μ + σ·ε:
L = 1·L_MSE + 0·L_1 + 1·L_cos + 1e-7·L_KL, where
- L_MSE and L_1: the means of (f̂ − f)² and |f̂ − f| over samples, tokens and channels (`F.mse_loss`,
  `F.l1_loss`);
- L_cos: 1 − the mean of torch's `cosine_similarity(f̂, f)` with its default dim=1, which on (B, L, D) tokens is
  the token axis: each channel's profile over the L tokens of a sample is compared, not each token's vector;
- L_KL: each sample's KL to N(0, I) summed over its latent (tokens × channels), averaged over samples (diffusers'
  `DiagonalGaussianDistribution.kl()`).
The held-out evaluation reports the official evaluation's metric instead: the cosine similarity of each token's
feature vector (over channels), averaged over tokens, beside the MSE and KL.
ε of the sample at batch position p comes from fold_in(rng, p), so a sample's loss does not depend on how the
batch is split over devices or micro-batches.

The features are the official ones (`extract_dinov2_feature.py`): DINOv2's final-norm patch tokens of each image
resized (torchvision `Resize(256)`, bicubic, antialiased) and centre-cropped to 224 px, no random crops or flips,
as float16. They come from one of (`data.source`):
- 'images' (sfd_jax's own path, no 0.5 TB file): each host decodes and crops its rows of every batch, and the
  frozen DINOv2 computes the tokens on the devices in the loop's `preprocess` hook, rounded to float16 as the
  official file stores them;
- 'features': the official feature file (`sfd_jax.data.features`), memory-mapped.
A seeded random subset of the images (or file rows) is held out of training; the periodic evaluation reports
reconstruction MSE, the official per-token cosine similarity and KL on it (posterior mean decoded), and the export
records them next to the weights.
"""
from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sfd_jax import sharding as shd, storage
from sfd_jax.convert.export import save_model
from sfd_jax.data import extract as extract_lib, features as features_lib, images as images_lib
from sfd_jax.diffusion.loss import cosine_similarity
from sfd_jax.errors import UserError
from sfd_jax.models.dinov2 import DINOv2
from sfd_jax.models.layers import attention_kernel, posterior_std
from sfd_jax.models.semvae import SemVAE
from sfd_jax.training import checkpoint as ckpt_lib, config as config_lib, loop

DATA_SOURCES = ("images", "features")


def base_config() -> ml_collections.ConfigDict:
  """The official recipe (train.py with ch16.yaml): DINOv2-B/14-reg tokens of Resize-256 + CenterCrop-224
  images, hidden 768, 4 + 4 blocks, 6 heads, 16 channels; loss 1·MSE + 0·L1 + 1·cos + 1e-7·KL; AdamW 5e-5 with
  torch's defaults (betas 0.9/0.999, eps 1e-8, weight decay 0.01), no clipping, bfloat16 compute, batch 64, 1M
  steps; LR: torch's LinearLR 0.01 → 1 over 500 steps, constant to step 800,500, cosine to 0.1× at 1M; no EMA
  (the raw weights are exported).

  Our choices: the features computed from the images on the fly (data.source='images'; 'features' reads the
  official file); 1,024 images held out for evaluation (the official evaluates on 500 validation images);
  checkpoints every 20,000 steps, for resuming (the official saves every 100,000).
  """
  base = config_lib.base_config()
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_from = ""             # a new run's params and EMA from this training workdir's newest checkpoint
  c.model = dict(latent_channels=16, hidden_size=768, encoder_depth=4, decoder_depth=4, num_heads=6, mlp_ratio=4.0,
                 dtype="bfloat16",   # compute (accelerate's mixed_precision bf16); params and the loss are float32
                 attention="auto")  # auto | xla | pallas (TPU) | cudnn (NVIDIA, compute capability ≥ 8.0)
  c.dino = config_lib.dino_config()
  c.loss = dict(mse_weight=1.0, l1_weight=0.0, cos_weight=1.0, kl_weight=1e-7)
  c.optim = ml_collections.ConfigDict(base.optim.to_dict())
  c.optim.update(lr=5e-5, weight_decay=0.01, schedule="cosine", warmup_steps=500, warmup_start_factor=0.01,
                 constant_steps=800_000, decay_steps=199_500, end_lr=5e-6,
                 ema_decay=0.0)  # no EMA: the EMA copy is the weights themselves
  c.batch_size = 64              # global, over all hosts and devices
  c.total_steps = 1_000_000
  c.nan_policy = "stop"
  c.data = dict(
      source="images",           # images: DINOv2 tokens computed on the devices | features: read from features_path
      images="folder",           # folder | tfds | digits (see sfd_jax.data.images.open_source)
      path="",                   # folder: root of the class folders; tfds: data_dir
      tfds_name="imagenet2012",
      split="train",
      digits_size=256,
      resize=256,                # torchvision Resize of the short side (bicubic, antialiased), then ...
      resolution=224,            # ... CenterCrop, which DINOv2 reads as is (a multiple of its patch size)
      features_path="",          # a .safetensors file of `patch_tokens` (N, L, D) and `class_indices` (N,)
      heldout_images=1024,       # images (file rows) held out of training (seeded), for the evaluation
      num_workers=0,             # grain worker processes (0: threads in the training process)
      prefetch=16,
  )
  c.eval_batch_size = 64
  c.log_every = 100
  c.ckpt_every = 20_000
  c.keep_checkpoints = 3
  c.keep_period = 0
  c.sample_every = 10_000        # steps between held-out evaluations (the loop's periodic hook; 0: never)
  c.mesh = ml_collections.ConfigDict(base.mesh.to_dict())
  c.sharding = ml_collections.ConfigDict(base.sharding.to_dict())
  c.lock()
  return c


# ------------------------------------------------------------------------------------------------------ objective

def kl_divergence(mean, logvar):
  """KL(N(mean, exp(logvar)) ‖ N(0, I)) of each sample, summed over all its latent elements (Eq. 9): (B,)."""
  axes = tuple(range(1, mean.ndim))
  return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=axes)


def _tokens(grid):
  """(B, h, w, D) → (B, h·w, D), the official token sequences (row-major)."""
  return grid.reshape(grid.shape[0], -1, grid.shape[-1])


def cosine_over_tokens(recon, features):
  """Per sample, 1 − the cosine similarity of each channel's values over the tokens, averaged over channels:
  (B,). Its batch mean is train.py's `1 − F.cosine_similarity(recon, x).mean()` on (B, L, D) tokens."""
  cos = cosine_similarity(jnp.swapaxes(_tokens(recon), 1, 2), jnp.swapaxes(_tokens(features), 1, 2))
  return jnp.mean(1.0 - cos, axis=-1)


def cosine_over_channels(recon, features):
  """Per sample, the cosine similarity of each token's feature vector, averaged over tokens: (B,), the official
  evaluation's metric (`cosine_similarity` of `view(-1, D)` rows)."""
  return jnp.mean(cosine_similarity(_tokens(recon), _tokens(features)), axis=-1)


def loss_terms(recon, features, mean, logvar) -> dict:
  """Per-sample terms of train.py's loss, (B,) each: `mse`, `l1`, `cos` (`cosine_over_tokens`) and `kl`; each
  one's batch mean is the official term of the batch."""
  axes = tuple(range(1, features.ndim))
  error = recon - features
  return {"mse": jnp.mean(jnp.square(error), axis=axes), "l1": jnp.mean(jnp.abs(error), axis=axes),
          "cos": cosine_over_tokens(recon, features), "kl": kl_divergence(mean, logvar)}


def objective(model: SemVAE, params, features, noise, loss_cfg):
  """(loss, metrics) of a batch of DINO token grids (B, h, w, D), the latent sampled with `noise` (ε, shaped as
  the latent): the weighted sum of the batch means of `loss_terms`, as train.py's total."""
  mean, logvar = model.apply({"params": params}, features, method="encode")
  latents = mean + posterior_std(logvar) * noise
  terms = loss_terms(model.apply({"params": params}, latents, method="decode"), features, mean, logvar)
  loss = jnp.mean(sum(loss_cfg[f"{name}_weight"] * term for name, term in terms.items()))
  return loss, {"loss": loss, **{f"loss_{name}": jnp.mean(term) for name, term in terms.items()},
                "latent_std": jnp.std(latents)}


def semvae_loss(model: SemVAE, params, features, rng, positions, loss_cfg):
  """`objective` with the noise of row i drawn from fold_in(rng, positions[i])."""
  shape = (*features.shape[1:3], model.latent_channels)
  noise = jax.vmap(lambda p: jax.random.normal(jax.random.fold_in(rng, p), shape, jnp.float32))(positions)
  return objective(model, params, features, noise, loss_cfg)


def semvae_loss_fn(model: SemVAE, loss_cfg):
  """The SemVAE objective as a `loss_fn(params, batch, rng, positions)` for the train step (batch['features'])."""
  def loss_fn(params, batch, rng, positions):
    return semvae_loss(model, params, batch["features"], rng, positions, loss_cfg)
  return loss_fn


def evaluation_sums(model: SemVAE, params, features) -> dict:
  """Sums over a batch of the held-out metrics, the posterior mean decoded: squared error (per element, averaged
  per sample), the official evaluation's per-token cosine similarity (`cosine_over_channels`), KL, and the
  sample count."""
  mean, logvar = model.apply({"params": params}, features, method="encode")
  recon = model.apply({"params": params}, mean, method="decode")
  mse = jnp.mean(jnp.square(recon - features), axis=tuple(range(1, features.ndim)))
  return {"mse": jnp.sum(mse), "cosine": jnp.sum(cosine_over_channels(recon, features)),
          "kl": jnp.sum(kl_divergence(mean, logvar)), "count": jnp.asarray(features.shape[0], jnp.float32)}


# ----------------------------------------------------------------------------------------------------------- task

def build_semvae(model_cfg, feature_dim: int, grid_size: int) -> SemVAE:
  """The SemVAE a `model` config describes, for DINO tokens of `feature_dim` on a grid_size² grid."""
  fields = dict(model_cfg)
  fields["dtype"] = jnp.dtype(fields["dtype"])
  return SemVAE(feature_dim=feature_dim, grid_size=grid_size, **fields)


def load_dino(dino_cfg, mesh: Mesh, seed: int = 0) -> extract_lib.Encoder:
  """The frozen DINOv2 of `dino_cfg`, its params replicated over `mesh`."""
  replicated = NamedSharding(mesh, P())
  if dino_cfg.random_init:
    model = DINOv2(**dino_cfg.random_fields, dtype=jnp.dtype(dino_cfg.dtype))
    variables = jax.jit(model.init, out_shardings=replicated)(jax.random.key(seed), *model.dummy_inputs())
    return extract_lib.make_encoder(model, variables, path="random init (tests and smoke runs only)")
  if not dino_cfg.path:
    raise UserError("config.dino.path is empty: set it to the DINOv2-B/14-reg weights (an exported model "
                    "from `python -m sfd_jax.cli.convert --kind=dinov2`, a Hugging Face directory, or "
                    "the facebookresearch dinov2_vitb14_reg4 .pth)")
  dino = extract_lib.load_encoder("dino", dino_cfg.path, dtype=dino_cfg.dtype)
  return dataclasses.replace(dino, variables=jax.device_put(dino.variables, replicated))


@dataclasses.dataclass
class SemVAETraining:
  """Everything a SemVAE run needs: the model, the mesh, the train / held-out records (images or file rows) and,
  for images, the frozen DINOv2."""
  cfg: ml_collections.ConfigDict
  model: SemVAE
  dino: extract_lib.Encoder | None
  mesh: Mesh
  train_set: images_lib.Subset
  heldout_set: images_lib.Subset

  @functools.cached_property
  def _features(self):
    """uint8 image batch (sharded) → DINO token grids rounded to float16 (as the official file stores them) and
    read back as float32, jitted; the DINO params are an argument, not constants."""
    grid = self.cfg.data.resolution // self.dino.model.patch_size
    def features(variables, images):
      tokens = extract_lib.dino_grid(self.dino.model, variables, images, grid)
      return tokens.astype(jnp.float16).astype(jnp.float32)
    return jax.jit(features, out_shardings=shd.batch_sharding(self.mesh, 4))

  def preprocess(self, batch) -> dict:
    return {"features": self._features(self.dino.variables, batch["image"])}

  def _pipeline(self, records, global_batch_size: int, **options):
    d = self.cfg.data
    if d.source == "features":
      return features_lib.feature_pipeline(records, global_batch_size=global_batch_size, seed=self.cfg.seed,
                                           prefetch=d.prefetch, **options)
    return images_lib.image_pipeline(records, global_batch_size=global_batch_size, seed=self.cfg.seed,
                                     resolution=d.resolution, crop="resize_center", resize=d.resize,
                                     prefetch=d.prefetch, **options)

  def make_data(self, rows, start_step: int):
    return self._pipeline(self.train_set, self.cfg.batch_size, rows=rows, start_batch=start_step,
                          num_workers=self.cfg.data.num_workers)

  @functools.cached_property
  def _evaluation_sums(self):
    return jax.jit(functools.partial(evaluation_sums, self.model), out_shardings=NamedSharding(self.mesh, P()))

  def evaluate(self, params) -> dict:
    """Held-out reconstruction: MSE, the official per-token cosine similarity and KL per sample, over whole
    evaluation batches."""
    batches = self._pipeline(self.heldout_set, self.cfg.eval_batch_size, shuffle=False, num_epochs=1,
                             rows=shd.host_rows(self.mesh, self.cfg.eval_batch_size))
    totals = None
    for batch in batches:
      if self.dino is None:
        features = shd.shard_batch(self.mesh, {"features": batch["features"]})["features"]
      else:
        features = self.preprocess(shd.shard_batch(self.mesh, {"image": batch["image"]}))["features"]
      sums = self._evaluation_sums(params, features)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {"eval_mse": float(totals["mse"]) / count, "eval_cosine": float(totals["cosine"]) / count,
            "eval_kl": float(totals["kl"]) / count, "eval_images": count}

  def periodic(self, state, step: int, writer) -> None:
    scalars = self.evaluate(state.params)
    writer.write_scalars(step, scalars)
    if jax.process_index() == 0:
      print(f"step {step}: held-out ({scalars['eval_images']:.0f} images) reconstruction MSE "
            f"{scalars['eval_mse']:.5g}, per-token cosine similarity {scalars['eval_cosine']:.4f}, "
            f"KL {scalars['eval_kl']:.4g}", flush=True)

  def task(self) -> loop.Task:
    return loop.Task(model=self.model, loss_fn=semvae_loss_fn(self.model, self.cfg.loss), make_data=self.make_data,
                     periodic=self.periodic if len(self.heldout_set) else None,
                     preprocess=None if self.dino is None else self.preprocess, dataset_size=len(self.train_set))

  def export(self, workdir, out, step: int | None = None):
    """Writes the params of checkpoint `step` (default: the newest) of `workdir` as an exported SemVAE computing
    in float32 (bfloat16 was the training's choice), with what it was trained on (the DINOv2 digest that
    extraction checks, or the feature file) and its held-out metrics."""
    checkpointer = ckpt_lib.Checkpointer(storage.path(workdir) / "checkpoints")
    try:
      step, _, params = checkpointer.readable_params(lambda config: self.model, step, which="params")
    finally:
      checkpointer.close()
    params = jax.device_put(params, shd.replicated(self.mesh))
    heldout = self.evaluate(params) if len(self.heldout_set) else {}
    d = self.cfg.data
    if self.dino is None:
      source = {"features_path": str(self.train_set.source.path)}
    else:
      source = {"dino_sha256": self.dino.info["sha256"], "dino_path": self.dino.info.get("path"),
                "resize": d.resize, "resolution": d.resolution}
    trained_on = {**source, "step": step, "workdir": str(storage.path(workdir))}
    return save_model(out, self.model.clone(dtype=jnp.float32), {"params": params},
                      extra={"trained_on": trained_on, "heldout": heldout})


def open_records(data_cfg):
  """The feature file or the image source `data_cfg` names."""
  if data_cfg.source == "features":
    if not data_cfg.features_path:
      raise UserError("config.data.features_path is empty: set it to the .safetensors file of DINOv2 features, "
                      "or train from images with config.data.source='images'")
    return features_lib.FeatureFile(data_cfg.features_path)
  if data_cfg.source != "images":
    raise UserError(f"config.data.source {data_cfg.source!r} is not one of {DATA_SOURCES}")
  if data_cfg.resize < data_cfg.resolution:
    raise UserError(f"config.data.resize {data_cfg.resize} is smaller than the {data_cfg.resolution} px centre crop "
                    "(config.data.resolution)")
  return images_lib.open_source(data_cfg.images, data_cfg.path, data_cfg.tfds_name, data_cfg.split,
                                data_cfg.digits_size)


def prepare(cfg) -> SemVAETraining:
  """Opens the records, splits off the held-out set, loads the DINOv2 (images) and sizes the SemVAE to the
  tokens."""
  config_lib.check_values(cfg)
  d = cfg.data
  records = open_records(d)
  train, heldout = images_lib.heldout_split(len(records), d.heldout_images, cfg.seed)
  if d.heldout_images and d.heldout_images < cfg.eval_batch_size:
    raise UserError(f"data.heldout_images {d.heldout_images} is fewer than one evaluation batch "
                    f"(eval_batch_size {cfg.eval_batch_size}); hold out more images or evaluate in smaller batches")
  mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
  shd.check_batch_size(mesh, cfg.eval_batch_size, "eval_batch_size")
  dino = None
  if d.source == "features":
    grid = records.grid
  else:
    dino = load_dino(cfg.dino, mesh, cfg.seed)
    patch = dino.model.patch_size
    if d.resolution % patch:
      raise UserError(f"config.data.resolution {d.resolution} is not a multiple of DINOv2's {patch} px patches")
    images = jax.ShapeDtypeStruct((1, d.resolution, d.resolution, 3), jnp.uint8)
    grid = jax.eval_shape(functools.partial(extract_lib.dino_grid, dino.model, grid=d.resolution // patch),
                          dino.variables, images).shape[1:]
  model = build_semvae(cfg.model, feature_dim=grid[-1], grid_size=grid[0])
  attention_kernel(model.attention, mesh.devices.flat[0])  # a kernel these devices lack is a user error
  logging.info("SemVAE on %d training records (%d held out) of %s, DINO tokens %s", len(train), len(heldout),
               d.source, grid)
  return SemVAETraining(cfg, model, dino, mesh, images_lib.Subset(records, train), images_lib.Subset(records, heldout))
