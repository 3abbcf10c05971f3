"""Trains SFD: `python -m sfd_jax.cli.train --config=configs/sfd_xl.py --workdir=runs/xl`.

Resumes automatically from the newest complete checkpoint in the workdir. SIGTERM or a preemption notice saves and
exits with status 75 (run the same command again to resume); a finished run exits 0, a user error 2. On a
multi-host platform (TPU pod, or --coordinator given) every host runs the same command.
"""
from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from sfd_jax.cli import common
from sfd_jax.training import loop, tasks

config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/sfd_xl.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics, samples, logs and the config go.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  loop.run(FLAGS.config, FLAGS.workdir, tasks.sfd_task(FLAGS.config))


if __name__ == "__main__":
  common.run(main, log_dir=lambda: FLAGS.workdir, distributed=True)
