"""Trains the Semantic VAE: `python -m sfd_jax.cli.train_semvae --config=configs/semvae.py --workdir=DIR`.

configs/semvae.py is the official recipe (`tokenizer/semvae/train.py` with `ch16.yaml`); the DINOv2 features come
from the images on the fly (sfd_jax's own path) or from the official pre-extracted feature file
(`--config=configs/semvae.py:features --config.data.features_path=FILE`).
Resumes from the newest complete checkpoint in the workdir; SIGTERM or a preemption notice saves and exits 75
(run the same command again to resume).
Once the run has reached config.total_steps, the SemVAE is exported to <workdir>/semvae (or --export_dir) with
its held-out reconstruction metrics; `python -m sfd_jax.cli.extract --semvae=<that directory>` uses it.
`--export_only` exports the newest checkpoint without training (e.g. to extract with an unfinished SemVAE).
On a multi-host platform (TPU pod, or --coordinator given) every host runs the same command.
"""
from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from sfd_jax import storage
from sfd_jax.cli import common
from sfd_jax.console import say
from sfd_jax.training import loop, semvae

config_flags.DEFINE_config_file("config", None, "SemVAE config file, e.g. configs/semvae.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the config go.")
flags.DEFINE_string("export_dir", None, "Where the trained SemVAE is exported (default: <workdir>/semvae).")
flags.DEFINE_bool("export_only", False, "Export the newest checkpoint without training.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cfg, workdir = FLAGS.config, storage.path(FLAGS.workdir)
  out = storage.path(FLAGS.export_dir or workdir / "semvae")
  training = semvae.prepare(cfg)
  if not FLAGS.export_only:
    loop.run(cfg, workdir, training.task())  # raises Preempted when stopped early: the export waits for the end
  if (out / "model.json").exists():
    say(f"{out} already holds an exported SemVAE; delete it to export again")
    return
  say(f"exported the SemVAE to {training.export(workdir, out)}")

if __name__ == "__main__":
  common.run(main, log_dir=lambda: FLAGS.workdir, distributed=True)
