"""The Semantic VAE objective and its training task (paper §3.2.1, A.1 and Table 7; no official code).

L = L_MSE + L_cos + λ_kl·L_KL between the DINOv2 patch tokens f of an image and their reconstruction f̂ from a
posterior sample s = μ + σ·ε (Eq. 6–10):
- L_MSE: the mean of (f̂ − f)² over samples, tokens and channels (torch's `F.mse_loss`);
- L_cos: the mean over samples and tokens of 1 − cos(f̂, f), each token's feature vector compared as a whole
  (Eq. 8: "directional alignment of the feature vectors"), with torch's `cosine_similarity` clamp;
- L_KL: Eq. 9 summed over every latent element of a sample (tokens × channels), averaged over samples (the
  LDM / diffusers `DiagonalGaussianDistribution.kl()` convention), weighted λ_kl = 1e-7.
ε of the sample at batch position p comes from fold_in(rng, p), so a sample's loss does not depend on how the
batch is split over devices or micro-batches.

Training reads images, not stored features: each host decodes and randomly crops its rows of every batch (ADM's
random crop: the paper's random-cropping augmentation), and the frozen DINOv2 computes the tokens on the devices
in the loop's `preprocess` hook, with the REPA recipe the extraction uses. A seeded random subset of the images is
held out of training; the periodic evaluation reports reconstruction MSE and cosine similarity on it (posterior
mean decoded), and the export records them next to the weights.
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
from sfd_jax.data import extract as extract_lib, images as images_lib
from sfd_jax.diffusion.loss import cosine_similarity
from sfd_jax.errors import UserError
from sfd_jax.models.dinov2 import DINOv2
from sfd_jax.models.layers import posterior_std
from sfd_jax.models.semvae import SemVAE
from sfd_jax.training import checkpoint as ckpt_lib, config as config_lib, loop


def base_config() -> ml_collections.ConfigDict:
  """Table 7: DINOv2-B-reg tokens of 256 px random crops, hidden 768, 4 + 4 blocks, 6 heads, 16 channels, KL
  weight 1e-7; AdamW 5e-5, (0.9, 0.999), batch 64, 1M steps: 500 warmup, 800K constant, cosine to 5e-6.

  Not in the paper, our choices: weight decay 0.01 (torch's AdamW default), no gradient clipping, the raw (not
  EMA) weights exported, 1,024 images held out for evaluation.
  """
  base = config_lib.base_config()
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_from = ""             # a new run's params and EMA from this training workdir's newest checkpoint
  c.model = dict(latent_channels=16, hidden_size=768, encoder_depth=4, decoder_depth=4, num_heads=6, mlp_ratio=4.0,
                 dtype="float32")
  c.dino = config_lib.dino_config()
  c.loss = dict(mse_weight=1.0, cos_weight=1.0, kl_weight=1e-7)
  c.optim = ml_collections.ConfigDict(base.optim.to_dict())
  c.optim.update(lr=5e-5, weight_decay=0.01, schedule="cosine", warmup_steps=500, constant_steps=800_000,
                 decay_steps=199_500, end_lr=5e-6)
  c.batch_size = 64              # global, over all hosts and devices
  c.total_steps = 1_000_000
  c.nan_policy = "stop"
  c.data = dict(
      source="folder",           # folder | tfds | digits (see sfd_jax.data.images.open_source)
      path="",                   # folder: root of the class folders; tfds: data_dir
      tfds_name="imagenet2012",
      split="train",
      digits_size=256,
      resolution=256,            # the crop size
      dino_grid=0,               # DINO tokens per side; DINOv2 sees dino_grid·patch px (0: REPA's 224·(res/256))
      crop="random",             # random (ADM random crop, short side in [res, res/min_crop_frac]) | center
      min_crop_frac=0.8,
      flip=False,                # a horizontal flip with probability 1/2 after the random crop
      heldout_images=1024,       # held out of training (seeded), for the evaluation
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


def reconstruction_terms(recon, features):
  """Per-sample (MSE, 1 − cos) of reconstructed feature grids (B, h, w, D) against the targets: (B,) each."""
  mse = jnp.mean(jnp.square(recon - features), axis=tuple(range(1, features.ndim)))
  cos = jnp.mean(1.0 - cosine_similarity(recon, features), axis=tuple(range(1, features.ndim - 1)))
  return mse, cos


def semvae_loss(model: SemVAE, params, features, rng, positions, loss_cfg):
  """(loss, metrics) of a batch of DINO token grids (B, h, w, D); the latent of row i is sampled with noise from
  fold_in(rng, positions[i])."""
  mean, logvar = model.apply({"params": params}, features, method="encode")
  noise = jax.vmap(lambda p: jax.random.normal(jax.random.fold_in(rng, p), mean.shape[1:], mean.dtype))(positions)
  latents = mean + posterior_std(logvar) * noise
  recon = model.apply({"params": params}, latents, method="decode")
  mse, cos = reconstruction_terms(recon, features)
  kl = kl_divergence(mean, logvar)
  loss = jnp.mean(loss_cfg.mse_weight * mse + loss_cfg.cos_weight * cos + loss_cfg.kl_weight * kl)
  return loss, {"loss": loss, "loss_mse": jnp.mean(mse), "loss_cos": jnp.mean(cos), "loss_kl": jnp.mean(kl),
                "latent_std": jnp.std(latents)}


def semvae_loss_fn(model: SemVAE, loss_cfg):
  """The SemVAE objective as a `loss_fn(params, batch, rng, positions)` for the train step (batch['features'])."""
  def loss_fn(params, batch, rng, positions):
    return semvae_loss(model, params, batch["features"], rng, positions, loss_cfg)
  return loss_fn


def evaluation_sums(model: SemVAE, params, features) -> dict:
  """Sums over a batch of the held-out metrics, the posterior mean decoded: squared error (per element, averaged
  per sample), cosine similarity (averaged over tokens), KL, and the sample count."""
  mean, logvar = model.apply({"params": params}, features, method="encode")
  mse, cos = reconstruction_terms(model.apply({"params": params}, mean, method="decode"), features)
  return {"mse": jnp.sum(mse), "cosine": jnp.sum(1.0 - cos), "kl": jnp.sum(kl_divergence(mean, logvar)),
          "count": jnp.asarray(features.shape[0], jnp.float32)}


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
  """Everything a SemVAE run needs: the model, the frozen DINOv2, the mesh, and the train / held-out images."""
  cfg: ml_collections.ConfigDict
  model: SemVAE
  dino: extract_lib.Encoder
  mesh: Mesh
  train_images: images_lib.Subset
  heldout_images: images_lib.Subset

  @functools.cached_property
  def _features(self):
    """uint8 image batch (sharded) → DINO token grids, jitted; the DINO params are an argument, not constants."""
    grid = functools.partial(extract_lib.dino_grid, self.dino.model, grid=self.cfg.data.dino_grid or None)
    return jax.jit(grid, out_shardings=shd.batch_sharding(self.mesh, 4))

  def preprocess(self, batch) -> dict:
    return {"features": self._features(self.dino.variables, batch["image"])}

  def make_data(self, shard_index: int, shard_count: int, start_step: int):
    d = self.cfg.data
    return images_lib.image_pipeline(
        self.train_images, global_batch_size=self.cfg.batch_size, seed=self.cfg.seed, resolution=d.resolution,
        crop=d.crop, min_crop_frac=d.min_crop_frac, flip=d.flip, shard_index=shard_index, shard_count=shard_count,
        start_batch=start_step, num_workers=d.num_workers, prefetch=d.prefetch)

  @functools.cached_property
  def _evaluation_sums(self):
    return jax.jit(functools.partial(evaluation_sums, self.model), out_shardings=NamedSharding(self.mesh, P()))

  def evaluate(self, params) -> dict:
    """Held-out reconstruction: MSE, cosine similarity and KL per image, over whole evaluation batches."""
    batches = images_lib.image_pipeline(
        self.heldout_images, global_batch_size=self.cfg.eval_batch_size, seed=self.cfg.seed,
        resolution=self.cfg.data.resolution, crop="center", shuffle=False, num_epochs=1,
        shard_index=jax.process_index(), shard_count=jax.process_count(), prefetch=self.cfg.data.prefetch)
    totals = None
    for batch in batches:
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
            f"{scalars['eval_mse']:.5g}, cosine similarity {scalars['eval_cosine']:.4f}, KL {scalars['eval_kl']:.4g}",
            flush=True)

  def task(self) -> loop.Task:
    return loop.Task(model=self.model, loss_fn=semvae_loss_fn(self.model, self.cfg.loss), make_data=self.make_data,
                     periodic=self.periodic if len(self.heldout_images) else None, preprocess=self.preprocess,
                     dataset_size=len(self.train_images))

  def export(self, workdir, out, step: int | None = None):
    """Writes the params of checkpoint `step` (default: the newest) of `workdir` as an exported SemVAE, with
    what it was trained on (the DINOv2 digest that extraction checks) and its held-out metrics."""
    checkpointer = ckpt_lib.Checkpointer(storage.path(workdir) / "checkpoints")
    try:
      step, _, params = checkpointer.readable_params(lambda config: self.model, step, which="params")
    finally:
      checkpointer.close()
    params = jax.device_put(params, shd.replicated(self.mesh))
    heldout = self.evaluate(params) if len(self.heldout_images) else {}
    trained_on = {"dino_sha256": self.dino.info["sha256"], "dino_path": self.dino.info.get("path"),
                  "resolution": self.cfg.data.resolution, "step": step, "workdir": str(storage.path(workdir))}
    return save_model(out, self.model, {"params": params}, extra={"trained_on": trained_on, "heldout": heldout})


def prepare(cfg) -> SemVAETraining:
  """Opens the images, splits off the held-out set, loads the DINOv2 and sizes the SemVAE to its tokens."""
  config_lib.check_values(cfg)
  d = cfg.data
  source = images_lib.open_source(d.source, d.path, d.tfds_name, d.split, d.digits_size)
  train, heldout = images_lib.heldout_split(len(source), d.heldout_images, cfg.seed)
  if d.heldout_images and d.heldout_images < cfg.eval_batch_size:
    raise UserError(f"data.heldout_images {d.heldout_images} is fewer than one evaluation batch "
                    f"(eval_batch_size {cfg.eval_batch_size}); hold out more images or evaluate in smaller batches")
  mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
  shd.check_batch_size(mesh, cfg.eval_batch_size, "eval_batch_size")
  dino = load_dino(cfg.dino, mesh, cfg.seed)
  images = jax.ShapeDtypeStruct((1, d.resolution, d.resolution, 3), jnp.uint8)
  grid = jax.eval_shape(functools.partial(extract_lib.dino_grid, dino.model, grid=d.dino_grid or None),
                        dino.variables, images)
  model = build_semvae(cfg.model, feature_dim=grid.shape[-1], grid_size=grid.shape[1])
  logging.info("SemVAE on %d training images (%d held out), DINO tokens %s", len(train), len(heldout), grid.shape[1:])
  return SemVAETraining(cfg, model, dino, mesh, images_lib.Subset(source, train), images_lib.Subset(source, heldout))
