"""The learned schedule on the demo's digits: trains the demo's SFD model with `loss.schedule.kind=learned` and
plots the map it learned.

  python benchmarks/learned_schedule.py       # 600 steps, probe 200: benchmarks/learned_schedule.png
  python benchmarks/learned_schedule.py --steps=1600 --probe_steps=500

The demo's prepared stages (texture VAE, classifier, SemVAE, latents; `sfd_jax.demo.Demo`) are reused from
`--demo_out`, or trained there first. The demo's LightningDiT-SFD then trains from SFD's Δ = 0.3 with the learned
schedule: for the first `--probe_steps` steps the model and the schedule train together (schedule-corrected loss
plus the kinetic term), then the schedule is frozen and the model goes on (`sfd_jax.training.step`). The picture
(`sfd_jax.plots.learned_schedule`) shows t_tex(τ) and t_sem(τ) at the first logged step and at the end, against
SFD's offset. A run already in `--out` is resumed (and, when finished, only plotted again).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sfd_jax import (
  demo as demo_lib,  # noqa: E402
  plots,
)
from sfd_jax.cli import common  # noqa: E402
from sfd_jax.console import say  # noqa: E402
from sfd_jax.data import latents as latents_lib  # noqa: E402
from sfd_jax.training import loop, tasks  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("demo_out", "outputs/demo", "The demo's output directory: its prepared stages are reused (or "
                    "trained there first).")
flags.DEFINE_string("out", "outputs/learned_schedule", "The training run's workdir.")
flags.DEFINE_string("plot", "benchmarks/learned_schedule.png", "Where the picture of the learned map goes.")
flags.DEFINE_integer("steps", 600, "Training steps.")
flags.DEFINE_integer("probe_steps", 200, "Steps during which the schedule trains with the model (then frozen).")
flags.DEFINE_float("schedule_lr", 1e-2, "Adam learning rate of the schedule's parameters.")
flags.DEFINE_float("kinetic_weight", 0.1, "λ of the kinetic term during the probe.")
flags.DEFINE_integer("seed", 0, "Seed of the model's initialisation and the data order.")


def prepared_demo(out) -> demo_lib.Demo:
  """The demo with its texture VAE, classifier, SemVAE and latents in `out` (trained there where missing)."""
  demo = demo_lib.Demo(demo_lib.demo_config(), out)
  demo.out.mkdir(parents=True, exist_ok=True)
  texture = demo.texture_vae()
  _, _, dino = demo.classifier()
  semvae = demo.semvae(dino)
  if not (demo.out / "latents" / latents_lib.NAME / latents_lib.VERSION / "stats.json").exists():
    demo.extract(texture, dino, semvae)
  return demo


def learned_config(demo: demo_lib.Demo):
  """The demo's SFD config (Δ = 0.3) with the learned schedule and this script's steps."""
  cfg = demo.sfd_config(0.3)
  cfg.seed, cfg.total_steps = FLAGS.seed, FLAGS.steps
  cfg.log_every, cfg.ckpt_every = max(FLAGS.steps // 60, 1), FLAGS.steps
  cfg.loss.schedule.update(kind="learned", probe_steps=FLAGS.probe_steps, lr=FLAGS.schedule_lr,
                           kinetic_weight=FLAGS.kinetic_weight)
  return cfg


def main(argv):
  del argv
  demo = prepared_demo(FLAGS.demo_out)
  cfg = learned_config(demo)
  start = time.perf_counter()
  loop.run(cfg, FLAGS.out, tasks.sfd_task(cfg))
  say(f"trained in {time.perf_counter() - start:.0f} s")
  say(f"the learned map: {plots.learned_schedule(FLAGS.out, FLAGS.plot)}")


if __name__ == "__main__":
  common.run(main, log_dir=lambda: FLAGS.out)
