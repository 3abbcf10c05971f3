"""The search over layouts of the train step: every mesh (data × fsdp), remat policy and grad-accumulation split
that could fit a slice, compiled and ranked by step-time bound (`python -m sfd_jax.cli.plan --search`)."""
from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from sfd_jax import sharding as shd
from sfd_jax.chips import chip_of
from sfd_jax.models.dit import REMAT_POLICIES
from sfd_jax.plan.programs import train_program
from sfd_jax.plan.report import format_candidate
from sfd_jax.plan.roofline import compile_program, plan_summary, state_bytes


def search_candidates(cfg, chips: int, fsdp: Sequence[int] | None = None, remat: Sequence[str] | None = None,
                      accum: Sequence[int] | None = None, slices: int = 1) -> list[tuple[int, str, int]]:
  """(fsdp, remat policy, grad-accumulation steps) that can split the config's global batch over `chips` (in
  `slices` slices: by default fsdp within a slice)."""
  per_slice = chips // slices
  fsdp = fsdp or [2 ** k for k in range(int(math.log2(per_slice)) + 1) if per_slice % 2 ** k == 0]
  remat = remat or list(REMAT_POLICIES)
  per_chip = cfg.batch_size // chips if cfg.batch_size % chips == 0 else 0
  accum = accum or [a for a in range(1, per_chip + 1) if per_chip % a == 0]
  return [(f, r, a) for f, r, a in itertools.product(fsdp, remat, accum)
          if chips % f == 0 and cfg.batch_size % (chips * a) == 0]


def candidate_config(cfg, chips: int, fsdp: int, remat: str, accum: int):
  """`cfg` with mesh data × fsdp over `chips`, the remat policy and the grad-accumulation steps of a candidate."""
  c = cfg.copy_and_resolve_references()
  c.mesh.data, c.mesh.fsdp = chips // fsdp, fsdp
  c.model.remat_policy = remat
  c.optim.grad_accum_steps = accum
  return c


def search(cfg, devices: Sequence, topology: str, *, fsdp=None, remat=None, accum=None, headroom: float = 0.1,
           cache_dir: str | Path | None = None, log: Callable[[str], None] = lambda s: None) -> dict:
  """Compiles the train step for every (mesh, remat policy, grad-accumulation split) that could fit and ranks
  those that fit by step-time bound.

  Skipped without compiling: a mesh whose state shard alone leaves no room, and more accumulation steps once fewer
  fit (more micro-batches never lower the bound: the same FLOPs, the weights gathered more often). Results are
  cached in `cache_dir` by config, topology and jax/libtpu version.
  """
  summary = plan_summary(devices, topology)
  chip, chips = chip_of(summary["device_kind"]), summary["chips"]
  usable = chip.hbm_bytes * (1.0 - headroom)
  cache = Path(cache_dir) if cache_dir else None
  tried, fitting = [], []
  for f, r, a in search_candidates(cfg, chips, fsdp, remat, accum, summary["slices"]):
    if any(t["fsdp"] == f and t["remat_policy"] == r and t["fits"] and t["grad_accum_steps"] < a for t in tried):
      continue
    c = candidate_config(cfg, chips, f, r, a)
    mesh = shd.make_mesh(c.mesh.data, c.mesh.fsdp, devices=devices)
    row = {"data": chips // f, "fsdp": f, "remat_policy": r, "grad_accum_steps": a}
    state = state_bytes(c, mesh)[1]
    if state >= usable:
      tried.append({**row, "fits": False, "compiled": False, "state_bytes_per_chip": state,
                    "skipped": "the state shard alone exceeds the usable HBM"})
      log(f"skip   data {chips // f:>3} × fsdp {f:<3} {r:<32} accum {a}: state {state / 1e9:.2f} GB per chip")
      continue
    key = _cache_key(c, summary, headroom)
    path = cache / f"{key}.json" if cache else None
    if path is not None and path.exists():
      result = json.loads(path.read_text())
    else:
      result = compile_program(train_program(c, mesh), chip, chips, headroom)
      if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
    entry = {**row, "state_bytes_per_chip": state, **result}
    tried.append(entry)
    log(format_candidate(entry))
    if entry["fits"]:
      fitting.append(entry)
  fitting.sort(key=lambda e: (e["step_time_bound_s"], e.get("collective_bytes_received_per_chip", 0)))
  return {**summary, "batch_size": cfg.batch_size, "model": dict(cfg.model), "headroom": headroom,
          "ranked": fitting, "tried": tried}


def _cache_key(cfg, summary: dict, headroom: float) -> str:
  """What a compiled result depends on: the config, the slice, jax and libtpu, and sfd_jax's own source."""
  package = Path(__file__).resolve().parents[1]
  source = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(package.rglob("*.py"))))
  text = json.dumps([cfg.to_json_best_effort(sort_keys=True), summary["topology"], summary["chips"],
                     summary["slices"], summary["device_kind"], summary["jax"], summary["libtpu"], headroom,
                     source.hexdigest()])
  return hashlib.sha256(text.encode()).hexdigest()[:24]
