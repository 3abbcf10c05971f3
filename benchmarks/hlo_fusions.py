"""Where the train step's HBM traffic goes: the top-level operations of its optimised TPU program (compiled ahead of
time for a slice, as `python -m sfd_jax.cli.plan` does), ranked by bytes, loop bodies times their trip counts.

  python benchmarks/hlo_fusions.py --config=configs/sfd_xl.py --topology=v5e-64 --config.model.dtype=bfloat16 \\
      --config.model.remat_policy=dots_saveable --config.mesh.fsdp=64 [--top=40] [--hlo=step.hlo]

Bytes per operation are the planner's rule (operands read, result written, in-place updates and sliced reads
counted by what they touch; `sfd_jax.plan.hlo_costs`), whose total is printed beside XLA's own (XLA's TPU cost model
knows which buffers stay in VMEM, so the two differ by a constant factor); labels are the JAX op names with the layer
scan's path shortened (FWD forward, BWD backward, REMAT recomputed forward).

Findings (SFD-XL, batch 256, bfloat16, remat dots_saveable on v5e-64; XLA's cost model per chip per step, every
layer counted):
- Before (data 8 × fsdp 8, 28 unrolled blocks, XLA attention): 2.94 TFLOP and 55.7 GB (MFU bound 21.6%). The ranking
  then: the matmul fusions, with the weight all-gathers and the f32 weight-gradient reduce-scatters that XLA overlaps
  with them (~33 GB; the adaLN modulation alone ~120 MB per layer: a third of the weights for 0.05% of the FLOPs);
  the attention (~12 GB: the (B, heads, N, N) float32 scores written and read in the forward, the recomputed forward
  and the backward pass); the QK-norm/RoPE chains around it (~5 GB: q and k split into (…, heads, 72) arrays, which
  TPU tiling pads to 128 lanes, normalised and rotated in separate fusions both ways); the optimiser, EMA and
  non-finite guard (~6 GB: one fused update per leaf reading param, gradient, both moments and EMA, plus the three
  global norms of the metrics).
- The Pallas attention kernels (`sfd_jax/models/tpu_attention.py`: scores, QK-norm and RoPE in VMEM, reading the
  qkv projection and writing the output directly) took the gradient alone from 43.7 to 36.2 GB; the whole step
  is 45.8–47.1 GB (run-to-run differences of the TPU compiler), MFU bound 26%.
- At 4 images (1024 tokens) per chip (data 1 × fsdp 64, the fastest layout then) what was left was the weights:
  each layer's bf16 weights all-gathered in the forward pass and, the layer being rematerialised, again in the
  backward pass, the weight gradients reduced; libtpu 0.0.42 writes these gathers and reductions as all-reduces
  (twice an all-gather's bytes): 6.3 GB received per chip, bound by ICI at 31.5 ms (MFU ≤ 47%), 17.8 GB of HBM.
- Now each layer gathers its attention and MLP kernels itself, in bfloat16, as a named value the dots remat
  policies keep for the backward pass (`models.dit._gathered_weights`), which then gathers nothing again; the
  adaLN kernel (a third of a block's weights, multiplied by one condition vector per sample) stays sharded and
  XLA moves its (batch, 6·D) products instead: 4.5 GB received, 14.0 GB of HBM traffic, bound by ICI at 22.7 ms,
  MFU ≤ 64.7%. Gathering the adaLN kernel as well received 5.6 GB; a custom gradient rule leaving the weight
  gradients' layout to XLA changed nothing; the libtpu option that keeps all-gathers as all-gathers
  (`xla_tpu_prefer_async_allgather_to_allreduce`) halves the gathers' bytes but re-gathers adaLN kernels inside
  the backward matmuls (20.3 GB of HBM, 59%), so it is not set. (The backward matmuls read the saved weights
  through a nested fusion that slices one layer out of the stack; the planner's rule counts the slice: counting
  the whole stack for every layer, as it did, put this step at 25.5 GB.)
"""
from __future__ import annotations

import collections
import re
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from sfd_jax import plan, sharding as shd
from sfd_jax.chips import chip_of
from sfd_jax.errors import UserError
from sfd_jax.plan import hlo, hlo_costs

config_flags.DEFINE_config_file("config", "configs/sfd_xl.py", "Training config.")
flags.DEFINE_string("topology", "v5e-64", "TPU slice (a Cloud TPU name or a JAX topology string).")
flags.DEFINE_integer("top", 40, "Rows to print.")
flags.DEFINE_string("hlo", None, "Also write the optimised HLO text here.")
FLAGS = flags.FLAGS

_SHORT = ((r"transpose\(jvp\(LightningDiT\)\)", "BWD"), (r"jvp\(LightningDiT\)", "FWD"), (r"^jit\([^)]*\)/", ""),
          (r"LightningDiT\._apply_blocks/(while/body/)?closed_call/", ""), (r"checkpoint/", ""),
          (r"rematted_computation/", "REMAT/"), (r"LightningDiTBlock/", ""))


def _label(i) -> str:
  name = re.search(r'op_name="([^"]*)"', i.attrs)
  label = name.group(1) if name else f"<{i.opcode}>"
  for pattern, short in _SHORT:
    label = re.sub(pattern, short, label)
  return label


def ranked(text: str) -> tuple[dict, float, list[str]]:
  """({(kind, label): [bytes, count]}, total bytes, loops whose trip count the HLO does not show: counted once)
  over the executed top-level operations."""
  computations, entry = hlo.parse_hlo(text)
  by_name = {i.name: i for body in computations.values() for i in body}
  rows = collections.defaultdict(lambda: [0.0, 0])
  not_counted = []

  def walk(name, times):
    local = {i.name: i for i in computations[name]}
    for i in computations[name]:
      if i.opcode == "while":
        trip = hlo_costs.trip_count(i, computations, by_name)
        if trip is None:
          not_counted.append(hlo_costs.loop_name(i))
        walk(dict(hlo.callees(i))["body"], times * (trip or 1))
        continue
      if i.opcode in ("call", "conditional"):
        for role, callee in hlo.callees(i):
          if callee in computations and role != "to_apply":
            walk(callee, times)
        continue
      size = hlo_costs.traffic(i, local, by_name, computations)
      if size:
        kind = "fusion" if i.opcode == "fusion" else i.opcode
        rows[(kind, _label(i))][0] += times * size
        rows[(kind, _label(i))][1] += times

  walk(entry, 1)
  return rows, sum(r[0] for r in rows.values()), not_counted


def main(argv):
  del argv
  cfg = FLAGS.config
  devices = plan.tpu_devices(FLAGS.topology)
  mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, devices=devices)
  program = plan.train_program(cfg, mesh)
  text = plan.executable(program).as_text()
  if FLAGS.hlo:
    Path(FLAGS.hlo).write_text(text)
  rows, total, not_counted = ranked(text)
  result = plan.compile_program(program, chip_of(devices[0].device_kind), len(devices))  # compiles again
  layers = cfg.model.depth
  print(f"{FLAGS.topology}, mesh data {mesh.shape['data']} × fsdp {mesh.shape['fsdp']}: "
        f"{result['hbm_traffic_bytes_per_chip'] / 1e9:.2f} GB per chip per step (XLA's cost model, loops counted "
        f"in full), {total / 1e9:.2f} GB by the planner's rule below; {result['flops_per_chip'] / 1e12:.3f} TFLOP")
  for (kind, label), (size, count) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:FLAGS.top]:
    print(f"{size / 1e9:8.3f} GB {size / layers / 1e6:8.1f} MB/layer {count:6d}×  {kind:18s} {label[:110]}")
  if not_counted:
    print(f"NOT COUNTED: {len(not_counted)} while loop(s) whose trip count the HLO does not show, taken once above: "
          + "; ".join(not_counted))


if __name__ == "__main__":
  try:
    app.run(main)
  except UserError as e:
    raise SystemExit(f"hlo_fusions: {e}") from None
