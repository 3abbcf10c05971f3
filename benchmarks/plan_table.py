"""The pod table of docs/planning.md from the planner: the train step of B, XL and XXL compiled for v5e-64, v5p-64,
v6e-64 and v4-64 (libtpu on any host, no TPU), with HBM per chip and the cost-model bounds.

  python benchmarks/plan_table.py --out=plan_table.json            # all rows (about 3 minutes per XL/XXL row)
  python benchmarks/plan_table.py --models=XL --pods=v5e-64         # a subset

Every row is the official recipe (batch 256, 4M steps) in bfloat16 with remat dots_saveable, on the faster of two
layouts that fit: params and optimiser state sharded over every chip of the slice (fsdp = chips), or B replicated
(fsdp 1) and XL, XXL sharded over 8 chips. Prints the markdown rows as they finish; `--out` keeps every row's full
plan, both layouts, as JSON.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jax
from absl import app, flags

from sfd_jax import plan
from sfd_jax.training import config as config_lib

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "configs"))
import sfd_xl  # noqa: E402  (the official recipe; XXL and B are the same recipe at other sizes)

flags.DEFINE_list("models", ["B", "XL", "XXL"], "Model presets.")
flags.DEFINE_list("pods", ["v5e-64", "v5p-64", "v6e-64", "v4-64"], "Cloud TPU slices.")
flags.DEFINE_string("out", None, "Write the full plans as JSON here.")
FLAGS = flags.FLAGS
SMALL_FSDP = {"B": 1, "XL": 8, "XXL": 8}
HEADER = ("| model | params + AdamW state (fp32) | pod | mesh | per-chip batch | HBM per chip | step-time bound | "
          "MFU bound | img/s per chip | 4M steps at the bound |\n|---|---|---|---|---|---|---|---|---|---|")


def row_config(preset: str, chips: int, fsdp: int):
  cfg = sfd_xl.get_config(preset)
  cfg.model.dtype, cfg.model.remat_policy = "bfloat16", "dots_saveable"
  cfg.mesh.data, cfg.mesh.fsdp = chips // fsdp, fsdp
  return cfg


def faster(a: dict, b: dict) -> dict:
  """The plan whose train step fits and has the lower step-time bound (the first if neither fits)."""
  key = lambda r: (not r["train_step"]["fits"], r["train_step"].get("step_time_bound_s") or math.inf)
  return min((a, b), key=key)


def markdown_row(preset: str, pod: str, result: dict) -> str:
  step, params = result["train_step"], result["params"]
  mesh = f"data {result['mesh']['data']} × fsdp {result['mesh']['fsdp']}"
  size = f"SFD-{preset} ({params / 1e6:.0f}M)"
  if not step["compiled"]:
    return (f"| {size} | {result['state_gb']:.1f} GB | {pod} ({result['chips']} chips) | {mesh} | "
            f"{result['batch_size'] // result['chips']} | does not fit ({step['hbm_per_chip_bytes'] / 1e9:.1f} GB) "
            "| | | | |")
  return (f"| {size} | {result['state_gb']:.1f} GB | {pod} ({result['chips']} chips) | {mesh} | "
          f"{result['batch_size'] // result['chips']} | {step['hbm_per_chip_bytes'] / 1e9:.2f} GB of "
          f"{step['hbm_capacity_bytes'] / 2 ** 30:.2f} GiB | {step['step_time_bound_s'] * 1e3:.0f} ms "
          f"({step['bound_by']}) | {100 * step['mfu_bound']:.0f}% | {step['images_per_s_per_chip']:.0f} | "
          f"{step['full_run_s'] / 86400:.1f} days |")


def main(argv):
  del argv
  rows, results = [], []
  print(HEADER, flush=True)
  for preset in FLAGS.models:
    for pod in FLAGS.pods:
      devices = plan.tpu_devices(pod)
      layouts = [plan.plan(row_config(preset, len(devices), fsdp), devices, pod, programs=("train_step",))
                 for fsdp in (SMALL_FSDP[preset], len(devices))]
      result = dict(faster(*layouts), layouts=layouts)
      cfg = row_config(preset, len(devices), SMALL_FSDP[preset])
      model = config_lib.build_model(cfg.model)
      params = jax.eval_shape(lambda k: model.init(k, *model.dummy_inputs()), jax.random.key(0))
      result.update(preset=preset, params=float(sum(math.prod(a.shape) for a in jax.tree.leaves(params))),
                    state_gb=result["state_bytes"] / 1e9)
      rows.append(markdown_row(preset, pod, result))
      results.append(result)
      print(rows[-1], flush=True)
      if FLAGS.out:
        Path(FLAGS.out).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
  app.run(main)
