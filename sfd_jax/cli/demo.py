"""The built-in demo: `python -m sfd_jax.cli.demo [--quick] [--out=outputs/demo]`.

The whole SFD pipeline on scikit-learn's digits, offline, on a CPU (see `sfd_jax.demo`): texture VAE, semantic
encoder, SemVAE, extraction, SFD and synchronous training, Dopri5 sampling, a table and `results.json`, and grids.
Run it again to resume; `--quick` trains every stage briefly (the CI check).
"""
from __future__ import annotations

from absl import flags

from sfd_jax import demo
from sfd_jax.cli import common

flags.DEFINE_bool("quick", False, "Train every stage briefly (about 3 minutes on 2 CPU cores).")
flags.DEFINE_string("out", "outputs/demo", "Where every stage writes (kept: a rerun resumes).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  demo.run(FLAGS.out, FLAGS.quick)


if __name__ == "__main__":
  common.run(main, log_dir=lambda: FLAGS.out)
