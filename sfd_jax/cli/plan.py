"""Plans a pod run without the pod: compiles the real steps of a config for a TPU slice on any host (needs libtpu).

  python -m sfd_jax.cli.plan --config=configs/sfd_xl.py --topology=v5e-64 \\
      --config.mesh.data=-1 --config.mesh.fsdp=8 --json=plan.json
  python -m sfd_jax.cli.plan --config=configs/sfd_xxl.py --topology=v5e-64 --search

Prints, per program (train step, one Dopri5 and one Euler sampling step, the extraction step), the HBM per chip
against the chip's, the cost-model FLOPs and HBM bytes per chip, the collectives, the roofline bound on the step
time with the MFU and images/s per chip it implies, and the time of a full run at that bound. `--search` compiles
the train step for every mesh (data × fsdp), remat policy and grad-accumulation split that could fit and ranks
those that fit. Without --topology it plans for the devices of this machine (on a TPU VM, its slice: run it on
every host of a pod, as training). `--topology` takes Cloud TPU names (v4-64, v5e-64 / v5litepod-64, v5p-128,
v6e-64) or JAX topology strings (v5e:8x8); `--num_slices=N` joins N such slices over the data-center network
(multislice), as training lays them out: 'data' across the slices (mesh.data a multiple of N), 'fsdp' within one,
with the bytes each chip receives over DCN as a bound of its own. Numbers are XLA cost-model bounds, not
measurements.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
from absl import flags
from ml_collections import config_flags

from sfd_jax import plan as plan_lib
from sfd_jax.cli import common
from sfd_jax.console import say
from sfd_jax.errors import UserError
from sfd_jax.models.dit import REMAT_POLICIES

config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/sfd_xl.py.", lock_config=True)
flags.DEFINE_string("topology", "", "TPU slice to plan for: v4-64, v5e-64 (v5litepod-64), v5p-128, v6e-64, or a JAX "
                    "topology string (v5e:8x8). Empty: the devices of this machine.")
flags.DEFINE_integer("num_slices", 1, "Slices of --topology joined over the data-center network (multislice): "
                     "mesh.data must be a multiple of it.", lower_bound=1)
flags.DEFINE_string("json", None, "Write the plan as JSON to this file.")
flags.DEFINE_list("programs", ["train_step", "sample_step", "extract_step"], "Which programs to compile.")
flags.DEFINE_integer("sample_batch", 0, "Global sampling batch (default: config sample.num_images, rounded up to a "
                     "multiple of the chips).", lower_bound=0)
flags.DEFINE_enum("guidance", "cfg", ["cfg", "autoguidance", "none"], "Guidance of the sampling field: cfg (the "
                  "batch doubled), autoguidance (a B guide), none.")
flags.DEFINE_integer("extract_batch_per_chip", 8, "Images per chip of the extraction step.", lower_bound=1)
flags.DEFINE_enum("extract_dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the extraction encoders.")
flags.DEFINE_float("hbm_headroom", 0.1, "Fraction of each chip's HBM kept free: a program fits when it needs at "
                   "most (1 - headroom) of it.", lower_bound=0.0, upper_bound=0.9)
flags.DEFINE_bool("search", False, "Rank the train step's meshes, remat policies and grad-accumulation splits.")
flags.DEFINE_list("search_fsdp", [], "--search: fsdp sizes to try (default: every power of 2 up to the chips of "
                  "one slice).")
flags.DEFINE_list("search_remat", [], f"--search: remat policies to try (default: all of {sorted(REMAT_POLICIES)}).")
flags.DEFINE_list("search_accum", [], "--search: grad-accumulation steps to try (default: every split of the batch).")
flags.DEFINE_string("cache_dir", str(Path.home() / ".cache" / "sfd_jax" / "plan"), "--search: compiled results "
                    "are kept here (keyed by config, slice, jax, libtpu and the sfd_jax source).")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def _ints(name: str) -> list[int]:
  try:
    return [int(v) for v in FLAGS[name].value]
  except ValueError:
    raise UserError(f"--{name} takes comma-separated integers, got {','.join(FLAGS[name].value)!r}") from None


def _devices():
  if FLAGS.topology:
    return plan_lib.tpu_devices(FLAGS.topology, FLAGS.num_slices), FLAGS.topology
  common.start_distributed()
  devices = jax.devices()
  return devices, f"this machine ({len(devices)} × {devices[0].device_kind})"


def main(argv):
  del argv
  unknown = sorted(set(FLAGS.programs) - {"train_step", "sample_step", "extract_step"})
  if unknown:
    raise UserError(f"--programs: unknown {unknown}; choose from train_step, sample_step, extract_step")
  bad_remat = sorted(set(FLAGS.search_remat) - set(REMAT_POLICIES))
  if bad_remat:
    raise UserError(f"--search_remat: unknown {bad_remat}; choose from {sorted(REMAT_POLICIES)}")
  devices, name = _devices()
  say(f"planning for {name}: {len(devices)} × {devices[0].device_kind}")
  if FLAGS.search:
    result = plan_lib.search(FLAGS.config, devices, name, fsdp=_ints("search_fsdp"), remat=FLAGS.search_remat,
                             accum=_ints("search_accum"), headroom=FLAGS.hbm_headroom, cache_dir=FLAGS.cache_dir,
                             log=say)
    say(f"{len(result['ranked'])} of {len(result['tried'])} layouts fit; fastest first (cost-model bound):")
    for entry in result["ranked"]:
      say("  " + plan_lib.format_candidate(entry))
  else:
    result = plan_lib.plan(FLAGS.config, devices, name, programs=FLAGS.programs, sample_batch=FLAGS.sample_batch,
                           guidance=FLAGS.guidance, extract_batch_per_chip=FLAGS.extract_batch_per_chip,
                           extract_dtype=FLAGS.extract_dtype, headroom=FLAGS.hbm_headroom, log=say)
  if FLAGS.json and jax.process_index() == 0:
    Path(FLAGS.json).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.json).write_text(json.dumps(result, indent=1, default=str))
    say(f"wrote {FLAGS.json}")


if __name__ == "__main__":
  common.run(main)
