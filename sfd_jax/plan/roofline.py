"""Plans a TPU run on any host: the real train, sampling and extraction steps compiled ahead of time for a TPU slice,
with their HBM per chip, cost-model FLOPs and bytes, collectives and roofline bounds (`python -m sfd_jax.cli.plan`).

libtpu's compiler needs no TPU: `jax.experimental.topologies.get_topology_desc` describes the devices of any slice,
and `jax.jit(step).lower(abstract arguments).compile()` builds the executable that slice would run, allocating
nothing. Its `memory_analysis()` is what the program needs on each chip; its `cost_analysis()` is XLA's cost model
of one chip's share (FLOPs, bytes of HBM traffic). That model counts the body of a while loop (a `lax.scan`:
gradient accumulation, scanned blocks, a Runge-Kutta step's stages) once, so each loop body is costed again from
the optimised HLO (`hlo_costs`: dot and convolution FLOPs and elementwise FLOPs as XLA counts them, operand and
result bytes of every instruction), scaled to XLA's units by the ratio of XLA's cost to that count over the program
as XLA costs it, and added trip count − 1 more times. A loop whose trip count the HLO does not show is named in the
plan (`loops.not_counted`) and its costs cover one iteration: the bound is then lower than the program's. Collectives
and the bytes they move are read from the optimised HLO as well.

Over several slices (multislice) libtpu compiles one slice's program and hands what crosses slices to its
data-center-network (DCN) runtime: host transfers (`send`/`recv` to `xla_megascale_runtime`) whose type
(ALL_REDUCE: the data-parallel gradient reduction) and buffer are in the HLO, read here as the DCN traffic.

The step-time bound is the roofline max(FLOPs / peak, HBM bytes / bandwidth, collective bytes received / ICI
bandwidth, bytes received over DCN / DCN bandwidth) with the chip's numbers from `sfd_jax.chips`: no step runs faster
on that chip, and a memory-bound step shows as a low MFU bound. All of it is a cost-model bound, not a measurement.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time
from collections.abc import Callable, Sequence

import jax

from sfd_jax import sharding as shd
from sfd_jax.chips import Chip, chip_of
from sfd_jax.errors import UserError
from sfd_jax.models import layers
from sfd_jax.plan.hlo_costs import analyse_hlo
from sfd_jax.plan.programs import Program, extract_program, sample_programs, train_program
from sfd_jax.plan.report import format_program
from sfd_jax.plan.topology import slice_count
from sfd_jax.training import config as config_lib, state as state_lib


def _bytes_of(value: str, unit: str) -> float:
  return float(value) * {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}[unit]


@contextlib.contextmanager
def _no_persistent_cache():
  """JAX's persistent compilation cache off (nothing written, nothing read) for the duration."""
  names = ("jax_enable_compilation_cache", "jax_persistent_cache_min_compile_time_secs")
  before = {name: getattr(jax.config, name) for name in names}
  jax.config.update("jax_enable_compilation_cache", False)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e12)
  try:
    yield
  finally:
    for name, value in before.items():
      jax.config.update(name, value)


def executable(program: Program):
  """`program` compiled for the devices its arguments are sharded over, not into XLA's persistent cache: an
  executable built for a topology description cannot be loaded back without a TPU client (--search keeps its own
  results instead)."""
  with _no_persistent_cache():
    return program.fn.lower(*program.args).compile()


def compile_program(program: Program, chip: Chip, chips: int, headroom: float = 0.1) -> dict:
  """Compiles `program` for the devices its arguments are sharded over and returns its plan (see module doc)."""
  usable = chip.hbm_bytes * (1.0 - headroom)
  start = time.perf_counter()
  try:
    compiled = executable(program)
  except jax.errors.JaxRuntimeError as e:
    message = str(e)
    if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
      raise
    needed = (re.search(r"required[^(]*\(([\d.]+)([KMGT]?)", message)  # libtpu's two phrasings
              or re.search(r"Used ([\d.]+)([KMGT]?) of", message))
    return {"fits": False, "compiled": False, "compile_s": time.perf_counter() - start,
            "hbm_per_chip_bytes": _bytes_of(*needed.groups()) if needed else None, "hbm_capacity_bytes": chip.hbm_bytes,
            "hbm_usable_bytes": usable, "error": message.strip().splitlines()[0][:500], "note": program.note}
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  hlo = analyse_hlo(compiled.as_text(), _slices(program))
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
          + memory.temp_size_in_bytes + memory.generated_code_size_in_bytes)
  xla_flops, xla_bytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  # The loops' other iterations in XLA's units: this module's count of them, scaled by XLA's cost over this
  # module's count of the program as XLA costs it (every loop once). FLOPs agree to within 1-2%; bytes are
  # counted differently (XLA's TPU model knows which buffers stay in on-chip memory), hence the scale.
  flops_scale = xla_flops / max(hlo.flops_estimate - hlo.flops_loop_extra, 1.0)
  bytes_scale = xla_bytes / max(hlo.bytes_estimate - hlo.bytes_loop_extra, 1.0)
  flops = xla_flops + flops_scale * hlo.flops_loop_extra
  traffic = xla_bytes + bytes_scale * hlo.bytes_loop_extra
  received = sum(c["received_bytes"] for c in hlo.collectives.values())
  dcn_received = sum(c["received_bytes"] for c in hlo.dcn.values())
  model_flops = program.model_flops / chips if program.model_flops else flops
  times = {"compute": flops / chip.peak_bf16_flops, "hbm": traffic / chip.hbm_bandwidth,
           "ici": received / (chip.ici_bandwidth / 2) if chip.ici_bandwidth else 0.0,
           "dcn": dcn_received / chip.dcn_bandwidth if dcn_received else 0.0}
  bound = max(times.values())
  plan = {
      "fits": peak <= usable, "compiled": True, "compile_s": compile_s,
      "hbm_per_chip_bytes": peak, "hbm_capacity_bytes": chip.hbm_bytes, "hbm_usable_bytes": usable,
      "hbm": {"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
              "aliases": memory.alias_size_in_bytes, "temporaries": memory.temp_size_in_bytes,
              "code": memory.generated_code_size_in_bytes},
      "flops_per_chip": flops, "model_flops_per_chip": model_flops, "hbm_traffic_bytes_per_chip": traffic,
      "xla_cost_analysis": {"flops": xla_flops, "bytes_accessed": xla_bytes},
      "loops": {"trip_counts": hlo.loop_trip_counts, "not_counted": hlo.loops_not_counted,
                "flops_added": flops - xla_flops,
                "bytes_added": traffic - xla_bytes, "flops_scale": flops_scale, "bytes_scale": bytes_scale},
      "collectives": hlo.collectives, "collective_bytes_received_per_chip": received,
      "dcn": hlo.dcn, "dcn_bytes_received_per_chip": dcn_received,
      "time_s": times, "bound_by": max(times, key=times.get), "step_time_bound_s": bound,
      "mfu_bound": model_flops / (bound * chip.peak_bf16_flops) if bound else None,
      "images_per_step_per_chip": program.images_per_step / chips,
      "images_per_s_per_chip": program.images_per_step / chips / bound if bound else None,
      "note": program.note,
  }
  if program.full_run_steps:
    plan.update(full_run=program.full_run, full_run_s=program.full_run_steps * bound)
  return plan


def _slices(program: Program) -> int:
  """How many slices the devices of a program's arguments span."""
  return slice_count(jax.tree.leaves(program.args)[0].sharding.device_set)


def plan_summary(devices: Sequence, name: str) -> dict:
  kind = devices[0].device_kind
  chip = chip_of(kind)
  if chip is None:
    raise UserError(f"no peak FLOP/s, HBM bandwidth or capacity is known for device kind {kind!r}; plan for a TPU "
                    "topology with --topology (e.g. v5e-64)")
  slices = slice_count(devices)
  if slices > 1 and chip.dcn_bandwidth is None:
    raise UserError(f"no per-chip data-center-network bandwidth is published for {kind}, so a step over {slices} "
                    "slices cannot be bounded; plan one slice (--num_slices=1)")
  return {"topology": name, "chips": len(devices), "slices": slices, "device_kind": kind,
          "chip": dataclasses.asdict(chip), "jax": jax.__version__, "libtpu": _libtpu_version()}


def _libtpu_version() -> str | None:
  try:
    from importlib.metadata import version
    return version("libtpu")
  except Exception:  # not installed: planning for the attached devices only
    return None


def plan(cfg, devices: Sequence, topology: str, *, programs: Sequence[str] = ("train_step", "sample_step",
         "extract_step"), sample_batch: int = 0, guidance: str = "cfg", extract_batch_per_chip: int = 8,
         extract_dtype: str = "float32", headroom: float = 0.1, log: Callable[[str], None] = lambda s: None) -> dict:
  """Compiles the chosen programs of `cfg` for `devices` and returns the whole plan (the JSON of cli.plan)."""
  result = plan_summary(devices, topology)
  chip, chips = chip_of(result["device_kind"]), result["chips"]
  mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, devices=devices)
  layers.attention_kernel(cfg.model.attention, devices[0])  # a kernel the chips lack is a user error
  sample_batch = sample_batch or -(-cfg.sample.num_images // chips) * chips
  shd.check_batch_size(mesh, cfg.batch_size)
  result.update(mesh={"data": mesh.shape["data"], "fsdp": mesh.shape["fsdp"]}, batch_size=cfg.batch_size,
                model=dict(cfg.model), remat_policy=cfg.model.remat_policy, dtype=cfg.model.dtype,
                grad_accum_steps=cfg.optim.grad_accum_steps, sample_batch=sample_batch,
                state_bytes=state_bytes(cfg, mesh)[0], state_bytes_per_chip=state_bytes(cfg, mesh)[1])
  todo = []
  if "train_step" in programs:
    todo.append(train_program(cfg, mesh))
  if "sample_step" in programs:
    data_mesh = shd.make_mesh(devices=devices)
    shd.check_batch_size(data_mesh, sample_batch, "--sample_batch")
    todo += sample_programs(cfg, data_mesh, sample_batch, guidance)
  if "extract_step" in programs:
    todo.append(extract_program(shd.make_mesh(devices=devices), extract_batch_per_chip * chips, extract_dtype))
  for program in todo:
    log(f"compiling {program.name} for {chips} × {result['device_kind']} ...")
    result[program.name] = compile_program(program, chip, chips, headroom)
    log(format_program(program.name, result[program.name]))
  return result


def state_bytes(cfg, mesh) -> tuple[float, float]:
  """(whole, one chip's shard) bytes of the train state (params, EMA, AdamW moments, step, rng), from its shardings."""
  model = config_lib.build_model(cfg.model)
  abstract, _ = state_lib.abstract_train_state(model, state_lib.make_optimizer(cfg.optim), mesh, cfg.sharding)
  leaves = jax.tree.leaves(abstract)
  return (float(sum(math.prod(a.shape) * a.dtype.itemsize for a in leaves)),
          float(sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in leaves)))
