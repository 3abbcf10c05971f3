"""Trains SFD: `python -m sfd_jax.cli.train --config=configs/sfd_xl.py --workdir=runs/xl`.

Resumes automatically from the newest complete checkpoint in the workdir; SIGTERM or a preemption notice saves
and exits 0. On a multi-host platform (TPU pod, or --coordinator given) every host runs the same command.
"""
from __future__ import annotations

import logging

import jax
from absl import app, flags
from ml_collections import config_flags

from sfd_jax.cli.common import start_process, parse_flags, user_errors_exit
from sfd_jax.training import loop, tasks

config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/sfd_xl.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics, samples and the config go.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


@user_errors_exit
def main(argv):
  del argv
  start_process()
  if jax.process_index() == 0:
    logging.info("devices: %s", jax.devices())
  loop.run(FLAGS.config, FLAGS.workdir, tasks.sfd_task(FLAGS.config))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
