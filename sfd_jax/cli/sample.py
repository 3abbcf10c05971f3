"""Samples images from an SFD model: one PNG per image plus an ADM-style .npz, resumable; or a labelled demo grid.

  python -m sfd_jax.cli.sample --model=exports/sfd_xl --vae=exports/vae --stats=stats.json --out=samples/xl \\
      --num_images=50000 --batch_size=256 --labels=balanced
  python -m sfd_jax.cli.sample --model=0400000.pt --preset=XL ...        # an official file (its ema weights)
  python -m sfd_jax.cli.sample --model=runs/xl --step=200000 ...          # a training workdir (EMA weights)
  ... --cfg_scale=1.5 --cfg_interval_start=0.1                              # classifier-free guidance
  ... --guide_model=exports/autoguidance_b --cfg_scale=1.5                  # AutoGuidance (the weak model)
  ... --demo --labels=207,360,387,974 --num_images=8                        # out/demo.png, captioned by class

See `sfd_jax.generate` for what a run does; every flag is a field of `generate.Settings`.
"""
from __future__ import annotations

import dataclasses

from absl import flags

from sfd_jax.cli import common
from sfd_jax.console import say
from sfd_jax.diffusion import sampler
from sfd_jax.generate import Settings, run
from sfd_jax.models import layers

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "The SFD DiT: exported model directory, training workdir, or official .pt "
                    "(ema weights).")
flags.DEFINE_integer("step", None, "With a training workdir as --model: the checkpoint step (default: the newest "
                     "complete one).", lower_bound=0)
flags.DEFINE_string("vae", None, "The texture VAE: exported model directory, or the official SD-VAE f16d32 .ckpt.")
flags.DEFINE_string("stats", None, "Texture latent stats: a latent dataset directory, its stats.json, or the "
                    "official latents_stats.pt.")
flags.DEFINE_string("out", None, "Output directory (images/, samples.npz, demo.png).")
flags.DEFINE_string("preset", "XL", "Official DiT size of an official --model file (S, B, L, XL, XXL/1p0B, 1p6B).")
flags.DEFINE_string("model_kwargs", None, "Official constructor kwargs of an official --model file, as JSON.")
flags.DEFINE_string("guide_model", None, "AutoGuidance: the weak DiT (exported directory, training "
                    "workdir, or official file).")
flags.DEFINE_string("guide_preset", "B", "AutoGuidance: official size of an official --guide_model file.")
flags.DEFINE_string("guide_model_kwargs", None, "AutoGuidance: official kwargs of the guide file, as JSON.")
flags.DEFINE_integer("guide_step", None, "With a training workdir as --guide_model: the checkpoint step (default: "
                     "the newest complete one; the official 80-epoch recipe uses its guide at 60000).", lower_bound=0)
flags.DEFINE_integer("num_images", 50_000, "How many images (indices 0..N-1).", lower_bound=1)
flags.DEFINE_integer("batch_size", 64, "Global batch (a multiple of the device count).", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Image i's noise and random label are functions of (seed, i) only.")
flags.DEFINE_string("labels", None, "'balanced' (official FID lists; the default), 'random', or comma-separated "
                    "ids (the default with --demo: the official demo classes for 1000-class models, else 0, 1, ...).")
flags.DEFINE_integer("fid_num", None, "Balanced labels: the list length (default --num_images).", lower_bound=1)
flags.DEFINE_enum("method", "dopri5", sampler.METHODS,
                  "ODE solver: adaptive (dopri5, tsit5, bosh3, adaptive_heun) or the official grid (euler, heun).")
flags.DEFINE_integer("num_steps", 250, "euler/heun: grid points (the official num_sampling_steps).", lower_bound=2)
flags.DEFINE_float("shift", 0.0, "euler/heun: timestep shift of the grid (0: none).", lower_bound=0.0)
flags.DEFINE_float("rtol", 1e-3, "adaptive solvers: relative tolerance.", lower_bound=0.0)
flags.DEFINE_float("atol", 1e-6, "adaptive solvers: absolute tolerance.", lower_bound=0.0)
flags.DEFINE_enum("error_norm", "per_sample", sampler.ERROR_NORMS,
                  "adaptive solvers: error norm per sample or per batch.")
flags.DEFINE_float("delta_t", None, "Override the semantic lead Δ of a model with an offset or random_offset "
                   "schedule (default: the schedule the model was trained with; official files: their "
                   "semfirst_delta_t, or 0.3).", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_float("cfg_scale", 1.0, "Guidance scale (1: none); CFG unless --guide_model is given.", lower_bound=0.0)
flags.DEFINE_float("cfg_scale_tex", None, "AutoGuidance: texture scale (default --cfg_scale).", lower_bound=0.0)
flags.DEFINE_float("cfg_scale_sem", None, "AutoGuidance: semantic scale (default --cfg_scale).", lower_bound=0.0)
flags.DEFINE_float("cfg_interval_start", 0.0, "Guidance off while a stream's time is below this (0: always on).",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_enum("cfg_interval_mode", None, sampler.INTERVAL_MODES, "Streams the interval applies to "
                  "(default: the model's semfirst_infer_interval_mode, or both).")
flags.DEFINE_float("latent_multiplier", 1.0, "The latent multiplier of the dataset (official 1.0).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the networks.")
flags.DEFINE_enum("attention", None, layers.ATTENTION, "Attention of the DiTs (default: each model's own, from "
                  "its export or training config): auto takes the platform's fused kernel (Pallas on TPU, cuDNN on "
                  "GPUs of compute capability ≥ 8.0), xla the way back from a kernel.")
flags.DEFINE_enum("matmul_precision", None, layers.MATMUL_PRECISIONS, "Precision of every matmul and convolution of "
                  "the DiTs and the decoder (default: the DiT's own): highest is float32 on TPUs and GPUs too, "
                  "default the platform's faster passes for float32 (bfloat16 on TPU, TF32 on GPU).")
flags.DEFINE_bool("attention_check", True, "On an accelerator, compare the attention kernel with XLA's on the first "
                  "batch and stop if they differ beyond bfloat16 rounding.")
flags.DEFINE_bool("demo", False, "Write one captioned grid out/demo.png of --num_images images instead.")
flags.DEFINE_bool("npz", True, "Pack samples.npz once all images exist.")
flags.mark_flags_as_required(["model", "vae", "stats", "out"])


def main(argv):
  del argv
  values = {f.name: FLAGS[f.name].value for f in dataclasses.fields(Settings)}
  for name in ("model_kwargs", "guide_model_kwargs"):
    values[name] = common.json_flag(name)
  say(f"wrote {run(Settings(**values))}")


if __name__ == "__main__":
  common.run(main, log_dir=lambda: FLAGS.out, inputs=("model", "vae", "stats", "guide_model"), distributed=True)
