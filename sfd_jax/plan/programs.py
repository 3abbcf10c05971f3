"""The programs a plan compiles, built exactly as the trainer, the sampler and the extractor build them: the train
step, one Dopri5 and one Euler step of the guided sampling field, and the extraction step, each with abstract
sharded arguments (nothing allocated) and the model FLOPs and images of one call."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import diffrax
import jax
import jax.numpy as jnp

from sfd_jax import generate as generate_lib, sharding as shd
from sfd_jax.convert.files import SD_VAE_F16D32
from sfd_jax.data import extract as extract_lib
from sfd_jax.diffusion import sampler, schedule as schedule_lib
from sfd_jax.models.dinov2 import dinov2
from sfd_jax.models.semvae import SemVAE
from sfd_jax.models.texture_vae import AutoencoderKL
from sfd_jax.training import config as config_lib, state as state_lib, step as step_lib


@dataclasses.dataclass
class Program:
  """One program to compile: a jitted function, its abstract (sharded) arguments, and what one call does."""
  name: str
  fn: Callable                               # jitted: shardings and donation as the real code sets them
  args: tuple
  images_per_step: int                       # images the whole slice processes per call
  model_flops: float                         # model FLOPs of one call over the whole slice
  full_run_steps: float | None = None        # calls of a full run (a recipe, a 50K-image evaluation)
  full_run: str = ""                         # what that full run is
  note: str = ""


def abstract_batch(cfg, mesh) -> dict:
  """The train step's batch as the data pipeline delivers it: float32 latents, int32 labels, float32 DINO tokens."""
  m, b = cfg.model, cfg.batch_size
  grid = m.input_size // m.patch_size
  batch = {"x": ((b, m.input_size, m.input_size, m.in_channels), jnp.float32), "y": ((b,), jnp.int32)}
  if m.use_repa:
    batch["dino"] = ((b, grid * grid, m.repa_z_dim), jnp.float32)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=shd.batch_sharding(mesh, len(shape)))
          for k, (shape, dtype) in batch.items()}


def train_program(cfg, mesh) -> Program:
  """The train step of `cfg` exactly as the trainer builds it, with the abstract sharded state and batch."""
  model = config_lib.build_model(cfg.model)
  tx = state_lib.make_optimizer(cfg.optim)
  abstract, shardings = state_lib.abstract_train_state(model, tx, mesh, cfg.sharding)
  step = step_lib.make_train_step(step_lib.sfd_loss_fn(model, cfg), tx, cfg, mesh, shardings)
  flops = 3.0 * model.forward_flops(with_repa=cfg.model.use_repa) * cfg.batch_size
  return Program("train_step", step, (abstract, abstract_batch(cfg, mesh)), cfg.batch_size, flops,
                 cfg.total_steps, f"{cfg.total_steps:,} steps × {cfg.batch_size} images")


def _replicated(tree, mesh):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shd.replicated(mesh)), tree)


def sample_programs(cfg, mesh, batch: int, guidance: str = "cfg", guide_preset: str = "B",
                    num_images: int = 50_000) -> list[Program]:
  """One Dopri5 step and one Euler step of the guided three-phase field on a batch split over every device, with
  the EMA params replicated: the program `sfd_jax.generate` runs (its velocity, `generate.guided_velocity`, traced
  with the mesh in context, so that the platform's attention kernel runs on each device's samples; Dopri5 solves
  each sample on its own, vmapped over the devices)."""
  model = config_lib.build_model(cfg.model).clone(remat_policy="none")
  init = lambda m: _replicated(jax.eval_shape(lambda k: m.init(k, *m.dummy_inputs()), jax.random.key(0)), mesh)
  params, guide_model, guide_params = init(model), None, None
  if guidance == "autoguidance":
    guide_model = config_lib.build_model(config_lib.model_config(
        guide_preset, dtype=cfg.model.dtype, attention=cfg.model.attention,
        matmul_precision=cfg.model.matmul_precision))
    guide_params = init(guide_model)
  c_sem = cfg.loss.semantic_channels
  scale = cfg.sample.cfg_scale if cfg.sample.cfg_scale > 1 else 1.5
  interval = cfg.sample.cfg_interval_start

  def field(variables, guide_variables, y):
    """dx/dτ in the middle phase (both streams move), where a solve takes most of its steps."""
    scales = {"scale": scale, "scale_tex": scale, "scale_sem": scale, "interval_start": interval}
    velocity = generate_lib.guided_velocity(model, variables, guide_model, guide_variables, guidance, scales, "both",
                                            c_sem)
    schedule = schedule_lib.from_config(cfg.loss)
    rates = sampler.rate_vector(1.0, 1.0, model.in_channels, c_sem)

    def f(tau, x, args):
      t_tex, t_sem = schedule.times(jnp.full((x.shape[0],), tau, jnp.float32))
      return rates * velocity(x, t_tex, t_sem, y)
    return f

  def dopri5_step(variables, guide_variables, x, y, tau, f0):
    """One step of each sample's solve: the field at the step's start comes from the last one (first-same-as-last)."""
    def one(x, y, f0):
      term = diffrax.ODETerm(field(variables, guide_variables, y[None]))
      x1, error, _, (_, f1), _ = diffrax.Dopri5().step(term, tau, tau + 0.01, x[None], None,
                                                       (jnp.array(False), f0[None]), made_jump=False)
      return x1[0], error[0], f1[0]
    return jax.vmap(one, spmd_axis_name=shd.BATCH_AXES)(x, y, f0)

  def euler_step(variables, guide_variables, x, y, tau, f0):
    del f0
    return x + 0.004 * field(variables, guide_variables, y)(tau, x, None)

  dopri5_step, euler_step = (jax.jit(shd.traced_with_mesh(mesh, step)) for step in (dopri5_step, euler_step))
  latent = jax.ShapeDtypeStruct((batch, model.input_size, model.input_size, model.in_channels), jnp.float32,
                                sharding=shd.batch_sharding(mesh, 4))
  args = (params, guide_params, latent, jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=shd.batch_sharding(mesh)),
          jax.ShapeDtypeStruct((), jnp.float32, sharding=shd.replicated(mesh)), latent)
  per_image = model.forward_flops(with_repa=False)
  if guidance == "cfg":
    per_image *= 2
  elif guidance == "autoguidance":
    per_image += guide_model.forward_flops(with_repa=False)
  what = {"cfg": f"CFG scale {scale} (the batch doubled)", "autoguidance": f"AutoGuidance by {guide_preset}",
          "none": "no guidance"}[guidance]
  euler_steps = cfg.sample.num_steps - 1
  return [
      Program("sample_step", dopri5_step, args, batch, 6 * per_image * batch, None, "",
              f"one Dopri5 step of a solve (6 field evaluations), {what}, {batch} images"),
      Program("sample_step_euler", euler_step, args, batch, per_image * batch, euler_steps * num_images / batch,
              f"{num_images:,} images × {euler_steps} Euler steps", f"one Euler step, {what}, {batch} images"),
  ]


def extract_program(mesh, batch: int, dtype: str = "float32", resolution: int = 256,
                    num_images: int = 1_281_167) -> Program:
  """The extraction step (`data.extract.encode_images`: texture VAE, DINOv2-B/14 with registers and SemVAE encoders
  on an image and its mirror image) on a batch split over every device, weights replicated."""
  texture_kwargs = {k: v for k, v in SD_VAE_F16D32.items() if k != "dropout"}
  texture_kwargs["ch_mult"] = tuple(texture_kwargs["ch_mult"])
  texture_kwargs["attn_resolutions"] = tuple(texture_kwargs["attn_resolutions"])
  compute = jnp.dtype(dtype)
  texture = AutoencoderKL(**texture_kwargs, embed_dim=32, dtype=compute)
  dino = dinov2("B", dtype=compute)
  grid = resolution // 16
  semvae = SemVAE(feature_dim=dino.hidden_size, grid_size=grid, dtype=compute)
  variables = {kind: _replicated(jax.eval_shape(lambda k, m=m: m.init(k, *m.dummy_inputs()), jax.random.key(0)),
                                 mesh)
               for kind, m in (("texture", texture), ("dino", dino), ("semvae", semvae))}
  images = jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jnp.uint8, sharding=shd.batch_sharding(mesh, 4))
  indices = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=shd.batch_sharding(mesh, 1))
  seed = jax.ShapeDtypeStruct((), jnp.int32, sharding=shd.replicated(mesh))
  fn = jax.jit(lambda v, x, i, s: extract_lib.encode_images(
      v, x, i, s, texture=texture, dino=dino, semvae=semvae, texture_mode="sample", semantic_mode="sample",
      dino_dtype=jnp.dtype(jnp.float16)))
  return Program("extract_step", fn, (variables, images, indices, seed), batch, 0.0, num_images / batch,
                 f"{num_images:,} images (ImageNet train)", f"texture VAE + DINOv2-B/14 + SemVAE encoders at "
                 f"{resolution} px, image and mirror image, {dtype}")
