"""The pod planner against independent arithmetic: a tiny SFD config compiled by libtpu for a 2×2 v5e slice on this
CPU host (no TPU needed; skipped only where libtpu is not installed)."""
import functools
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("libtpu", reason="the planner compiles for TPU topologies with libtpu: pip install "
                                     "'jax[tpu]==0.10.2' (CI installs it with the test extra)")

from sfd_jax import (
  plan,  # noqa: E402
  sharding as shd,  # noqa: E402
)
from sfd_jax.chips import chip_of  # noqa: E402
from sfd_jax.errors import UserError  # noqa: E402
from sfd_jax.training import (
  config as config_lib,  # noqa: E402
  state as state_lib,
)
from tests.programs import tpu_kernel_calls  # noqa: E402
from tests.tiny import tiny_config  # noqa: E402

pytestmark = pytest.mark.slow  # TPU compiles with libtpu (minutes): the full suite's tier only

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGY, CHIPS = "v5e:2x2", 4
V5E = chip_of("TPU v5 lite")


def planner_config(batch_size=32, accum=1):
  """Width 128, depth 2, 64 tokens: matmuls dominate the FLOPs, as in the real models; every matrix a multiple of
  the TPU's 128-lane tiles, so that the arguments are not padded."""
  cfg = tiny_config(batch_size=batch_size, grad_accum_steps=accum)
  cfg.model = config_lib.model_config("S", input_size=8, in_channels=128, hidden_size=128, depth=2, num_heads=2,
                                      mlp_ratio=6.0, num_classes=15, repa_depth=1, repa_projector_dim=128,
                                      repa_z_dim=128)
  cfg.mesh.data, cfg.mesh.fsdp = 2, 2
  cfg.sample.num_images = 8
  return cfg


@functools.cache
def xla_forward_flops(with_repa: bool = True) -> float:
  """XLA's own count (on the CPU) of one sample's forward pass of the planner's model, its block scan unrolled (XLA
  costs a loop body once) and XLA's attention: every matmul, and the norms', modulations' and softmax's elementwise
  work (about 2% here), which model FLOPs leave out."""
  cfg = planner_config().model
  model = config_lib.build_model(cfg).clone(attention="xla", scan_unroll=cfg.depth)
  args = model.dummy_inputs(1)
  params = jax.eval_shape(lambda k: model.init(k, *args), jax.random.key(0))
  forward = jax.jit(lambda p, *a: model.apply(p, *a, return_repa=with_repa))
  return forward.lower(params, *args).compile().cost_analysis()["flops"]


@pytest.fixture(scope="module")
def devices():
  return plan.tpu_devices(TOPOLOGY)


@pytest.fixture(scope="module")
def planned(devices):
  return plan.plan(planner_config(), devices, TOPOLOGY, programs=("train_step", "sample_step"))


def test_accelerator_names_and_slices():
  assert plan.topology_string("v5e-64") == plan.topology_string("v5litepod-64") == "v5e:8x8"
  assert plan.topology_string("v6e-64") == "v6e:8x8"
  assert plan.topology_string("v4-64") == "v4:2x4x4"       # v4 and v5p names count TensorCores: 32 chips
  assert plan.topology_string("v5p-128") == "v5:4x4x4"
  assert plan.topology_string("v5p:4x4x12") == "v5:4x4x12"
  assert plan.topology_string("V5E:4x8") == "v5e:4x8"
  for bad in ("v5e-3", "v7-8", "tpu", "v5p-63"):
    with pytest.raises(UserError):
      plan.topology_string(bad)
  for name, slices, chips, kind in (("v5e-64", 1, 64, "TPU v5 lite"), ("v4-64", 1, 32, "TPU v4"),
                                    ("v5p-128", 1, 64, "TPU v5"), ("v6e-64", 1, 64, "TPU v6 lite"),
                                    ("v5e-16", 2, 32, "TPU v5 lite")):
    devices = plan.tpu_devices(name, slices)
    assert len(devices) == chips and devices[0].device_kind == kind
    assert len({getattr(d, "slice_index", 0) for d in devices}) == slices


def test_train_step_flops_match_xla_count_of_the_model(planned):
  """Model FLOPs: 3 forward passes' worth (forward and backward) of 32 samples over 4 chips, the forward pass as
  XLA counts it less its elementwise work."""
  cfg = planner_config().model
  expected = 3 * xla_forward_flops() * 32 / CHIPS
  step = planned["train_step"]
  assert step["model_flops_per_chip"] == pytest.approx(expected, rel=0.03)
  assert step["model_flops_per_chip"] < expected
  # The TPU attention kernels' work beyond the model's count, per layer and sample: the backward kernel recomputes
  # the scores q·kᵀ (2·N²·D), and RoPE's pair rotation is a matmul with a ±1 matrix, q and k in two bfloat16 parts
  # (4 matmuls of 2·N·hd² per head), once forward, twice backward (recomputed, and its vjp).
  n, d = cfg.input_size ** 2, cfg.hidden_size
  hd = d // cfg.num_heads
  kernels = cfg.depth * 32 / CHIPS * (2 * n * n * d + 3 * 4 * 2 * n * hd * d)
  assert step["flops_per_chip"] == pytest.approx(expected + kernels, rel=0.06)  # + norms, softmax, AdamW, EMA
  for key in ("fits", "hbm_per_chip_bytes", "hbm_capacity_bytes", "flops_per_chip", "model_flops_per_chip",
              "hbm_traffic_bytes_per_chip", "step_time_bound_s", "mfu_bound", "compile_s"):
    assert key in step, key


def test_arguments_are_the_state_shard_and_the_batch_shard(planned, devices):
  cfg = planner_config()
  mesh = shd.make_mesh(2, 2, devices=devices)
  model = config_lib.build_model(cfg.model)
  abstract, _ = state_lib.abstract_train_state(model, state_lib.make_optimizer(cfg.optim), mesh, cfg.sharding)
  state = 0
  for leaf in jax.tree.leaves(abstract):
    split = math.prod(mesh.shape[a] for axes in leaf.sharding.spec if axes for a in np.atleast_1d(axes))
    state += math.prod(leaf.shape) * leaf.dtype.itemsize / split
  rows = 32 // CHIPS
  batch = rows * (8 * 8 * 128 * 4 + 4 + 64 * 128 * 4)  # x float32, y int32, dino float32
  hbm = planned["train_step"]["hbm"]
  assert planned["state_bytes_per_chip"] == pytest.approx(state)
  assert hbm["arguments"] == pytest.approx(state + batch, rel=0.02)  # TPU tiles pad the smallest vectors
  assert hbm["aliases"] == pytest.approx(state, rel=0.02)  # the state is donated: updated in place
  step = planned["train_step"]
  assert step["hbm_per_chip_bytes"] == hbm["arguments"] + hbm["outputs"] - hbm["aliases"] + hbm["temporaries"] + \
      hbm["code"]
  assert step["fits"] and step["hbm_capacity_bytes"] == 15.75 * 2 ** 30


def test_bounds_of_programs_counted_by_hand(devices):
  """Two programs whose work per chip is known by hand, each split by rows over the 4 chips of a v5e (197 TFLOP/s,
  819 GB/s): 1024 rows of a bfloat16 (4096, 4096) @ (4096, 4096) per chip are 2 × 1024 × 4096 × 4096 =
  34,359,738,368 FLOPs, 174.4 µs of compute (its HBM bytes are XLA's tiling, not countable by hand); the float32
  sum of two (4096, 4096) arrays reads two and writes one block of 1024 × 4096 × 4 bytes per chip, 50,331,648
  bytes, HBM-bound at 61.45 µs."""
  mesh = shd.make_mesh(CHIPS, 1, devices=devices)
  rows = lambda dtype: jax.ShapeDtypeStruct((4096, 4096), dtype, sharding=shd.batch_sharding(mesh, 2))
  whole = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16, sharding=shd.replicated(mesh))
  matmul = plan.compile_program(plan.Program("matmul", jax.jit(jnp.matmul), (rows(jnp.bfloat16), whole), 4096,
                                             2 * 4096 ** 3), V5E, CHIPS)
  assert matmul["flops_per_chip"] == matmul["model_flops_per_chip"] == 34_359_738_368
  assert matmul["time_s"]["compute"] == pytest.approx(174.42e-6, rel=1e-4)
  assert matmul["collectives"] == {} and matmul["time_s"]["ici"] == 0
  add = plan.compile_program(plan.Program("add", jax.jit(jnp.add), (rows(jnp.float32), rows(jnp.float32)), 4096,
                                          0.0), V5E, CHIPS)
  assert add["hbm_traffic_bytes_per_chip"] == 50_331_648
  assert add["bound_by"] == "hbm" and add["step_time_bound_s"] == pytest.approx(61.455e-6, rel=1e-4)
  assert add["images_per_s_per_chip"] == pytest.approx(1024 / 61.455e-6, rel=1e-4)  # a row as an "image"


def test_the_train_step_bound(planned):
  step = planned["train_step"]
  assert step["step_time_bound_s"] == max(step["time_s"].values()) > 0
  assert sum(c["count"] for c in step["collectives"].values()) > 0  # fsdp 2: params gathered, grads reduced
  assert step["loops"]["not_counted"] == []


def test_grad_accumulation_keeps_the_flops(planned, devices):
  """XLA's cost model counts a loop body once; the planner adds the other iterations."""
  mesh = shd.make_mesh(2, 2, devices=devices)
  accum = plan.compile_program(plan.train_program(planner_config(accum=4), mesh), V5E, CHIPS)
  assert sorted(planned["train_step"]["loops"]["trip_counts"]) == [2, 2]  # the blocks' scans, forward and backward
  assert sorted(accum["loops"]["trip_counts"]) == [2, 2, 4]  # and the micro-batches around them
  assert accum["xla_cost_analysis"]["flops"] < 0.6 * planned["train_step"]["flops_per_chip"]
  assert accum["flops_per_chip"] == pytest.approx(planned["train_step"]["flops_per_chip"], rel=0.03)


def test_loop_costs_match_the_unrolled_step(devices):
  """The planner's count of the scanned step (each loop body costed again for its other iterations) against XLA's
  own count of the same step with the block scan unrolled (no loop left to expand): the recipe's settings, bf16
  and remat dots_saveable, 8 layers."""
  mesh = shd.make_mesh(2, 2, devices=devices)
  steps = {}
  for unroll in (1, 8):
    cfg = planner_config()
    cfg.model.update(depth=8, dtype="bfloat16", remat_policy="dots_saveable", scan_unroll=unroll)
    steps[unroll] = plan.compile_program(plan.train_program(cfg, mesh), V5E, CHIPS)
  scanned, unrolled = steps[1], steps[8]
  assert sorted(scanned["loops"]["trip_counts"]) == [8, 8] and not unrolled["loops"]["trip_counts"]
  assert scanned["flops_per_chip"] == pytest.approx(unrolled["xla_cost_analysis"]["flops"], rel=0.02)
  assert scanned["hbm_traffic_bytes_per_chip"] == pytest.approx(unrolled["xla_cost_analysis"]["bytes_accessed"],
                                                                rel=0.1)


def test_sampler_steps(planned):
  per_chip = 2 * xla_forward_flops(with_repa=False) * 8 / CHIPS  # CFG doubles the batch
  dopri5, euler = planned["sample_step"], planned["sample_step_euler"]
  assert dopri5["model_flops_per_chip"] == pytest.approx(6 * per_chip, rel=0.03)
  assert euler["model_flops_per_chip"] == pytest.approx(per_chip, rel=0.03)
  assert euler["model_flops_per_chip"] < per_chip
  # The TPU attention kernels' RoPE rotation, forward only: 4 matmuls of 2·N·hd² per head, layer and model row.
  cfg = planner_config().model
  n, d = cfg.input_size ** 2, cfg.hidden_size
  kernels = cfg.depth * 2 * 8 / CHIPS * 4 * 2 * n * (d // cfg.num_heads) * d
  assert dopri5["flops_per_chip"] == pytest.approx(6 * (per_chip + kernels), rel=0.02)
  assert euler["flops_per_chip"] == pytest.approx(per_chip + kernels, rel=0.02)
  assert euler["full_run_s"] == pytest.approx(50_000 * (planner_config().sample.num_steps - 1) / 8
                                              * euler["step_time_bound_s"])


@pytest.mark.parametrize("attention, kernels", [("auto", True), ("xla", False)])
def test_sampler_steps_are_the_programs_sample_runs(devices, attention, kernels):
  """The planned sampling steps run the attention `sample` runs on a TPU: with 'auto' libtpu's executable calls the
  Pallas kernels (the steps are traced with the mesh, the samples split over its devices), with 'xla' none."""
  cfg = planner_config()
  cfg.model.attention = attention
  for program in plan.sample_programs(cfg, shd.make_mesh(devices=devices), 8):
    assert bool(tpu_kernel_calls(plan.executable(program))) == kernels, program.name


def test_a_program_too_big_does_not_fit(devices):
  """A batch whose activations exceed 15.75 GiB per chip: libtpu refuses to compile it, the plan says so."""
  cfg = planner_config(batch_size=2 ** 16)
  mesh = shd.make_mesh(2, 2, devices=devices)
  result = plan.compile_program(plan.train_program(cfg, mesh), V5E, CHIPS)
  assert not result["fits"] and not result["compiled"]
  assert result["hbm_per_chip_bytes"] > 15.75 * 2 ** 30


def test_data_parallel_gradient_crosses_slices_once():
  """A float32 (1024, 1024) weight replicated over two slices of 4 chips, its gradient summed over the batch: libtpu
  reduce-scatters it within each slice (ICI) and all-reduces each chip's quarter between the slices over the
  data-center network, so each chip receives 2 (s - 1) / s × S / 4 = 1 MiB over DCN (s = 2 slices, S = 4 MiB),
  taking 1 MiB / 3.125 GB/s (v5e: 2 × 100 Gbps NICs per 8-chip host)."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  devices = plan.tpu_devices(TOPOLOGY, num_slices=2)
  mesh = shd.make_mesh(8, 1, devices=devices)
  weight = jax.ShapeDtypeStruct((1024, 1024), jnp.float32, sharding=shd.replicated(mesh))
  batch = jax.ShapeDtypeStruct((64, 1024), jnp.float32, sharding=shd.batch_sharding(mesh, 2))
  grad = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2)), out_shardings=NamedSharding(mesh, P()))
  result = plan.compile_program(plan.Program("grad", grad, (weight, batch), 64, 0.0), V5E, 8)
  assert result["dcn"] == {"ALL_REDUCE": {"count": 1, "bytes": 2 ** 20, "received_bytes": 2 ** 20}}
  assert result["dcn_bytes_received_per_chip"] == 2 ** 20
  assert result["time_s"]["dcn"] == pytest.approx(2 ** 20 / (200e9 / 8 / 8))
  assert result["step_time_bound_s"] == max(result["time_s"].values())


def test_multislice_train_step_has_a_dcn_bound(planned):
  """The train step over two slices (data 2 × fsdp 4, fsdp within a slice) sends its gradient reductions between
  the slices over DCN; on one slice nothing crosses DCN."""
  cfg = planner_config()
  cfg.mesh.data, cfg.mesh.fsdp = 2, 4
  two = plan.plan(cfg, plan.tpu_devices(TOPOLOGY, num_slices=2), "v5e:2x2 x 2", programs=("train_step",))
  assert (two["slices"], two["mesh"]) == (2, {"data": 2, "fsdp": 4})
  step = two["train_step"]
  assert step["dcn"]["ALL_REDUCE"]["count"] > 0
  assert step["time_s"]["dcn"] == pytest.approx(step["dcn_bytes_received_per_chip"] / (200e9 / 8 / 8))
  assert step["step_time_bound_s"] == max(step["time_s"].values())
  # Two slices reduce at most each chip's share of the float32 gradient between them (2 (s-1)/s = 1 × its bytes).
  assert step["dcn"]["ALL_REDUCE"]["received_bytes"] <= two["state_bytes_per_chip"] / 4 * 1.05  # params ≈ ¼ state
  assert planned["slices"] == 1 and planned["train_step"]["dcn"] == {} and planned["train_step"]["time_s"]["dcn"] == 0


def test_multislice_needs_a_dcn_figure():
  with pytest.raises(UserError, match="data-center-network bandwidth"):
    plan.plan_summary(plan.tpu_devices("v4-8", num_slices=2), "v4-8")


def test_command_line_plans_two_slices(tmp_path):
  """The README's `--topology=v5e-16 --num_slices=2`: 32 chips, data across the slices, a DCN bound; fsdp across
  the slices is one error sentence."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = tmp_path / "plan.json"
  base = [sys.executable, "-m", "sfd_jax.cli.plan", "--config=configs/smoke.py", "--topology=v5e-16",
          "--num_slices=2", "--programs=train_step", "--config.batch_size=32"]
  run = subprocess.run(base + ["--config.mesh.data=2", "--config.mesh.fsdp=-1", f"--json={out}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]
  result = json.loads(out.read_text())
  assert (result["chips"], result["slices"], result["mesh"]) == (32, 2, {"data": 2, "fsdp": 16})
  assert result["train_step"]["dcn_bytes_received_per_chip"] > 0
  assert "over DCN in" in run.stdout and ", DCN " in run.stdout

  bad = subprocess.run(base + ["--config.mesh.data=1", "--config.mesh.fsdp=-1"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1].startswith("error: mesh: data 1 × fsdp 32 over 2 slices")


def test_command_line_writes_the_json(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = tmp_path / "plan.json"
  run = subprocess.run([sys.executable, "-m", "sfd_jax.cli.plan", "--config=configs/smoke.py", "--topology=v5e-4",
                        "--programs=sample_step", "--sample_batch=8", f"--json={out}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]
  result = json.loads(out.read_text())
  assert (result["topology"], result["chips"], result["device_kind"]) == ("v5e-4", 4, "TPU v5 lite")
  for key in ("fits", "hbm_per_chip_bytes", "hbm_capacity_bytes", "flops_per_chip", "model_flops_per_chip",
              "hbm_traffic_bytes_per_chip", "step_time_bound_s", "mfu_bound", "compile_s"):
    assert key in result["sample_step"], key
  assert "4 × TPU v5 lite" in run.stdout

  bad = subprocess.run([sys.executable, "-m", "sfd_jax.cli.plan", "--config=configs/smoke.py", "--topology=v5e-3"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1].startswith("error: --topology='v5e-3'")


def test_command_line_search_ranks_the_layouts(tmp_path):
  """The documented `plan --search` on a v5e-4 for the smoke config (batch 16): data 4 × fsdp 1 and data 2 × fsdp
  2, no remat, 1 or 2 micro-batches. Both layouts fit with 1, so 2 are not compiled; the ranking is by bound; the
  state shard of fsdp 1 is params, EMA and AdamW's two moments of the parameters counted here, in float32 (plus a
  few scalars). A second run reads every result from its cache."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = tmp_path / "search.json"
  command = [sys.executable, "-m", "sfd_jax.cli.plan", "--config=configs/smoke.py", "--topology=v5e-4", "--search",
             "--search_fsdp=1,2", "--search_remat=none", "--search_accum=1,2", f"--cache_dir={tmp_path / 'cache'}",
             f"--json={out}"]
  run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]
  result = json.loads(out.read_text())
  assert (result["topology"], result["chips"], result["batch_size"]) == ("v5e-4", 4, 16)
  layouts = sorted((e["data"], e["fsdp"], e["remat_policy"], e["grad_accum_steps"]) for e in result["tried"])
  assert layouts == [(2, 2, "none", 1), (4, 1, "none", 1)]
  ranked = result["ranked"]
  assert len(ranked) == 2 and all(e["fits"] and e["compiled"] for e in ranked)
  assert ranked[0]["step_time_bound_s"] <= ranked[1]["step_time_bound_s"]
  model = config_lib.build_model(_load_smoke_config().model)
  params = jax.eval_shape(lambda k: model.init(k, *model.dummy_inputs()), jax.random.key(0))
  param_bytes = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(params))
  by_fsdp = {e["fsdp"]: e for e in result["tried"]}
  assert by_fsdp[1]["state_bytes_per_chip"] == pytest.approx(4 * param_bytes, abs=64)
  assert by_fsdp[2]["state_bytes_per_chip"] <= by_fsdp[1]["state_bytes_per_chip"]
  assert "2 of 2 layouts fit; fastest first" in run.stdout
  assert run.stdout.count("data   4 × fsdp 1   none") == 2 and run.stdout.count("data   2 × fsdp 2   none") == 2

  again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-2000:]
  assert json.loads(out.read_text()) == result  # compile times included: nothing compiled again


def _load_smoke_config():
  spec = importlib.util.spec_from_file_location("smoke", ROOT / "configs" / "smoke.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
