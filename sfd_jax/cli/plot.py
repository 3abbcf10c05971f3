"""One metric of several training runs in one picture: `python -m sfd_jax.cli.plot RUN1 RUN2 ... [--metric=fd]`.

Each RUN is a training workdir (or its metrics.jsonl). A metric name means the key itself (`loss`, `lr`,
`images_per_s`, `eval/cfg1/fid`) or every evaluation key that ends in it (`fid`: one line per run and guidance
scale); without --metric, the first of FID, the Fréchet distance (`fd`, the demo's) and the loss that the runs log.
The picture goes to the first run's `plots/` unless --out says where. Every run also keeps its own pictures in
`<workdir>/plots/` (see `sfd_jax.plots`).
"""
from __future__ import annotations

from absl import flags

from sfd_jax import plots
from sfd_jax.cli import common
from sfd_jax.console import say
from sfd_jax.errors import UserError

flags.DEFINE_string("metric", None, "What to draw: a metrics.jsonl key, or an evaluation metric's last name part "
                    f"(default: the first of {', '.join(plots.DEFAULT_METRICS)} the runs log).")
flags.DEFINE_string("out", None, "The PNG to write; default <first run>/plots/<metric>.png (compare_<metric>.png "
                    "for several runs).")
flags.DEFINE_float("smoothing", 0.0, "TensorBoard's smoothing weight in [0, 1) (0: the values as logged).")
FLAGS = flags.FLAGS


def main(argv):
  runs = argv[1:]
  if not runs:
    raise UserError("give the runs to compare: python -m sfd_jax.cli.plot RUN1 RUN2 ... [--metric=fd]")
  say(f"wrote {plots.compare(runs, FLAGS.metric, FLAGS.out, FLAGS.smoothing)}")


if __name__ == "__main__":
  common.run(main, positional=True)
