"""The training tasks the loop runs: SFD (LightningDiT on latents) and the Semantic VAE (on DINOv2 tokens)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sfd_jax import generate, sharding as shd
from sfd_jax.data import extract as extract_lib, latents as latents_lib
from sfd_jax.diffusion import sampler
from sfd_jax.errors import UserError
from sfd_jax.models import dit, layers
from sfd_jax.models.texture_vae import denormalize_texture, to_uint8
from sfd_jax.training import config as config_lib, evaluation, loop, step as step_lib


def latent_source(data_cfg, model_cfg, loss_cfg):
  """The records a run reads: a written latent dataset, or the synthetic in-memory one."""
  if data_cfg.source == "latents":
    if not data_cfg.path:
      raise UserError("config.data.path is empty: set it to a latent dataset directory "
                      "(written by `python -m sfd_jax.cli.extract`), or use data.source='synthetic'")
    source = latents_lib.LatentSource(data_cfg.path)
    _check_layout(source.spec, model_cfg, loss_cfg, data_cfg.path)
    return source
  if data_cfg.source == "synthetic":
    grid = model_cfg.input_size // model_cfg.patch_size
    spec = latents_lib.record_spec(model_cfg.input_size, model_cfg.in_channels - loss_cfg.semantic_channels,
                                   loss_cfg.semantic_channels, grid * grid, model_cfg.repa_z_dim)
    return latents_lib.SyntheticLatents(data_cfg.synthetic_records, spec, model_cfg.num_classes)
  raise UserError(f"config.data.source {data_cfg.source!r} is not one of ('latents', 'synthetic')")


def _check_layout(spec, model_cfg, loss_cfg, path):
  """The dataset's latents must be the model's input; with loss.semantic_channels=0 (the plain LightningDiT) its
  texture latents alone, whatever semantic latents it also stores."""
  semantic = spec["semantic_channels"] if loss_cfg.semantic_channels else 0
  channels = spec["texture_channels"] + semantic
  problems = []
  if spec["latent_size"] != model_cfg.input_size:
    problems.append(f"latent size {spec['latent_size']} ≠ model.input_size {model_cfg.input_size}")
  if channels != model_cfg.in_channels:
    problems.append(f"{channels} channels ≠ model.in_channels {model_cfg.in_channels}")
  if semantic != loss_cfg.semantic_channels:
    problems.append(f"{spec['semantic_channels']} semantic channels ≠ loss.semantic_channels "
                    f"{loss_cfg.semantic_channels}")
  if spec["dino_dtype"] and spec["dino_dim"] != model_cfg.repa_z_dim:
    problems.append(f"DINO width {spec['dino_dim']} ≠ model.repa_z_dim {model_cfg.repa_z_dim}")
  if problems:
    raise UserError(f"the latent dataset {path} does not fit the model: {'; '.join(problems)}")


def sfd_task(cfg, eval_metrics: evaluation.Metrics | None = None) -> loop.Task:
  """SFD training of the LightningDiT of `cfg.model` on the latents of `cfg.data`; evaluated every `eval_every`
  steps with the FID Inception, or with `eval_metrics` (`eval.features='task'`)."""
  config_lib.check_values(cfg)
  model = config_lib.build_model(cfg.model)
  source = latent_source(cfg.data, cfg.model, cfg.loss)
  use_repa = cfg.model.use_repa
  stored_tokens = bool(source.spec.get("dino_dtype"))
  use_images = use_repa and not stored_tokens

  def make_data(rows, start_step):
    return latents_lib.latent_pipeline(
        source, source.stats, global_batch_size=cfg.batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle,
        flip=cfg.data.flip, use_dino=use_repa and stored_tokens, use_images=use_images,
        use_semantic=cfg.loss.semantic_channels > 0, rows=rows,
        start_batch=start_step, num_workers=cfg.data.num_workers, prefetch=cfg.data.prefetch)

  preprocess, flops = None, model.forward_flops()
  if use_images:
    preprocess, dino_flops = dino_preprocess(cfg, source.spec["image_size"])
    flops += dino_flops / 3  # the loop counts 3× the per-sample FLOPs; DINOv2 only runs forward
  return loop.Task(model=model, loss_fn=step_lib.sfd_loss_fn(model, cfg), make_data=make_data,
                   flops_per_sample=flops, periodic=sample_hook(cfg, model, source.stats), preprocess=preprocess,
                   dataset_size=len(source), check_kernels=attention_check(cfg, model),
                   evaluate=evaluation.for_run(cfg, model, source.stats, eval_metrics, len(source)))


def attention_check(cfg, model):
  """The first step's comparison of the DiT's attention kernel with XLA's attention (`dit.check_attention`, forward
  and gradients) on the batch's first sample per device at t = 0.5; None where the DiT runs XLA's attention (CPU,
  model.attention='xla') or cfg.attention_check is off. An attention the device lacks is a user error here."""
  device = jax.devices()[0]
  if layers.attention_kernel(model.attention, device) == "xla" or not cfg.attention_check:
    return None

  def check(params, batch, mesh):
    t = jnp.full(batch["y"].shape, 0.5, jnp.float32)
    dit.check_attention(model, {"params": params}, batch["x"], t, t, batch["y"], mesh, gradients=True,
                        where=f"the first training batch on {device.device_kind}")
  return check


def dino_preprocess(cfg, image_size: int):
  """(preprocess, DINOv2 FLOPs per sample): the REPA targets computed on device from the stored images, one
  token per DiT token, as the extraction would have stored them (`extract.dino_grid`)."""
  from sfd_jax.training.semvae import load_dino
  mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
  dino = load_dino(cfg.dino, mesh, cfg.seed)
  grid = cfg.model.input_size // cfg.model.patch_size
  features = jax.jit(lambda variables, images: extract_lib.dino_grid(dino.model, variables, images, grid).reshape(
                         images.shape[0], grid * grid, -1),
                     out_shardings=shd.batch_sharding(mesh, 3))
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8)
  flops = float(features.lower(dino.variables, images).cost_analysis().get("flops", 0.0))

  def preprocess(batch):
    batch = dict(batch)
    batch["dino"] = features(dino.variables, batch.pop("image"))
    return batch
  return preprocess, flops


def sample_hook(cfg, model, stats):
  """Every `sample_every` steps: samples from fixed noise and labels with the EMA params and the run's schedule
  (`evaluation.run_schedule`); a PNG grid through the texture VAE when one is configured, else the latents'
  statistics and a picture of three texture channels."""
  n, c_sem = cfg.sample.num_images, cfg.loss.semantic_channels
  c_tex = model.in_channels - c_sem  # the latent is [texture | semantic]; c_sem = 0 is the plain LightningDiT
  labels = np.asarray([cfg.sample.labels[i % len(cfg.sample.labels)] if cfg.sample.labels else i % model.num_classes
                       for i in range(n)], np.int32)
  z = sampler.noise(jax.random.key(cfg.sample.seed), jnp.arange(n),
                    (model.input_size, model.input_size, model.in_channels))
  vae = extract_lib.load_encoder("texture", cfg.sample.texture_vae) if cfg.sample.texture_vae else None
  mean, std = (np.asarray(stats["texture"][k], np.float32) for k in ("mean", "std"))

  def sample_fixed(schedule, ema_params, vae_variables):
    variables = {"params": ema_params}
    velocity = (sampler.cfg_velocity(model, variables, cfg.sample.cfg_scale, model.num_classes,
                                     cfg.sample.cfg_interval_start, "both", c_sem)
                if cfg.sample.cfg_scale > 1 else sampler.model_velocity(model, variables))
    final, _ = sampler.sample(velocity, z, jnp.asarray(labels), schedule=schedule, method=cfg.sample.method,
                              num_steps=cfg.sample.num_steps, shift=cfg.sample.shift, rtol=cfg.sample.rtol,
                              atol=cfg.sample.atol, semantic_channels=c_sem)
    if vae is None:
      return final
    texture = denormalize_texture(final, mean, std, 1.0, c_tex)
    return to_uint8(vae.model.apply(vae_variables, texture, method=vae.model.decode))

  sample_fixed = generate.schedule_jit(sample_fixed, cfg.sample.method)

  def periodic(state, step, writer):
    schedule = evaluation.run_schedule(cfg.loss, state)
    out = shd.to_host(sample_fixed(schedule, state.ema_params, None if vae is None else vae.variables))
    if vae is not None:
      writer.write_image(step, "samples", np.asarray(generate.demo_grid(out, labels, min(n, 8))))
      return
    streams = {"texture": out[..., :c_tex], "semantic": out[..., c_tex:]}
    writer.write_scalars(step, {f"sample/{name}_{stat}": getattr(x, stat)() for name, x in streams.items()
                                if x.size for stat in ("mean", "std")})
    picture = np.clip((out[..., :3] + 2.5) / 5 * 255, 0, 255).astype(np.uint8)
    writer.write_image(step, "sample_latents", np.asarray(generate.demo_grid(picture, labels, min(n, 8))))

  return periodic
