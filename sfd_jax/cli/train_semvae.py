"""Trains the Semantic VAE: `python -m sfd_jax.cli.train_semvae --config=configs/semvae.py --workdir=DIR`.

Resumes from the newest complete checkpoint in the workdir; SIGTERM or a preemption notice saves and exits 0.
Once the run has reached config.total_steps, the SemVAE is exported to <workdir>/semvae (or --export_dir) with
its held-out reconstruction metrics; `python -m sfd_jax.cli.extract --semvae=<that directory>` uses it.
`--export_only` exports the newest checkpoint without training (e.g. to extract with an unfinished SemVAE).
On a multi-host platform (TPU pod, or --coordinator given) every host runs the same command.
"""
from __future__ import annotations

import logging
from pathlib import Path

import jax
from absl import app, flags
from ml_collections import config_flags

from sfd_jax.cli.common import start_process, parse_flags, user_errors_exit
from sfd_jax.training import checkpoint as ckpt_lib, loop, semvae

config_flags.DEFINE_config_file("config", None, "SemVAE config file, e.g. configs/semvae.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the config go.")
flags.DEFINE_string("export_dir", None, "Where the trained SemVAE is exported (default: <workdir>/semvae).")
flags.DEFINE_bool("export_only", False, "Export the newest checkpoint without training.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


@user_errors_exit
def main(argv):
  del argv
  start_process()
  cfg, workdir = FLAGS.config, Path(FLAGS.workdir)
  out = Path(FLAGS.export_dir or workdir / "semvae")
  training = semvae.prepare(cfg)
  if not FLAGS.export_only:
    loop.run(cfg, workdir, training.task())
    steps = ckpt_lib.Checkpointer(workdir / "checkpoints").steps()
    if not steps or steps[-1] < cfg.total_steps:
      logging.warning("stopped before step %d; run the same command again to continue (it exports when done)",
                      cfg.total_steps)
      return
  if (out / "model.json").exists():
    logging.info("%s already holds an exported SemVAE; delete it to export again", out)
    return
  path = training.export(workdir, out)
  if jax.process_index() == 0:
    print(f"exported the SemVAE to {path}", flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
