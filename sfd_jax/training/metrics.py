"""Training metrics: throughput and MFU, window averages, and the jsonl / TensorBoard / console writers."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np

from sfd_jax.plan import PEAK_BF16_FLOPS  # dense bf16 peak per device kind, from the one chip table (plan.CHIPS)


def peak_flops(device: jax.Device | None = None) -> float | None:
  """The bf16 peak of a device, or None where unknown (CPUs)."""
  kind = (device or jax.devices()[0]).device_kind
  for prefix in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
    if kind.startswith(prefix):
      return PEAK_BF16_FLOPS[prefix]
  return None


def mfu(flops_per_step: float, step_seconds: float, num_devices: int, device: jax.Device | None = None):
  """Achieved / peak FLOP/s over `num_devices`; None where the peak is unknown."""
  peak = peak_flops(device)
  return None if peak is None else flops_per_step / step_seconds / (peak * num_devices)


class MetricWriter:
  """Scalars to `metrics.jsonl` and TensorBoard (tensorboardX), images to PNG and TensorBoard; process 0 only.

  On resume the jsonl keeps only the lines up to the restored step, so a run killed between checkpoints logs
  the steps it redoes once; a line torn by a crash mid-write is dropped.
  """

  def __init__(self, workdir, resume_step: int = 0):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    import tensorboardX
    self.workdir = Path(workdir)
    self.jsonl = self.workdir / "metrics.jsonl"
    if self.jsonl.exists():
      records = read_jsonl(self.jsonl)
      self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in records if r["step"] <= resume_step))
    self.tb = tensorboardX.SummaryWriter(str(self.workdir / "tensorboard"))

  def write_scalars(self, step: int, scalars: dict) -> None:
    if not self.active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    with self.jsonl.open("a") as f:
      f.write(json.dumps({"step": int(step), **scalars}) + "\n")
    for key, value in scalars.items():
      self.tb.add_scalar(key, value, step)
    self.tb.flush()

  def write_image(self, step: int, name: str, image) -> Path | None:
    """Writes an (H, W, 3) uint8 image as `<workdir>/samples/<name>_<step>.png` and to TensorBoard."""
    if not self.active:
      return None
    from PIL import Image
    path = self.workdir / "samples" / f"{name}_{step:08d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(image)).save(path)
    self.tb.add_image(name, np.asarray(image), step, dataformats="HWC")
    self.tb.flush()
    return path

  def close(self) -> None:
    if self.active:
      self.tb.close()


def read_jsonl(path) -> list[dict]:
  """The records of a metrics.jsonl; lines that do not parse (a tail torn by a crash mid-write) are left out, with
  a warning."""
  records, torn = [], 0
  for line in Path(path).read_text(errors="replace").splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      torn += 1
      continue
    if isinstance(record, dict) and "step" in record:
      records.append(record)
    else:
      torn += 1
  if torn:
    logging.warning("%s: left out %d line(s) that are not complete records (torn by a crash mid-write)", path, torn)
  return records


def average(window: list[dict]) -> dict:
  """Means of the per-step metric dicts of a logging window, with `clu.metrics.Average` (one update per key over
  the stacked window: per-step merges would cost a dozen eager device ops per step)."""
  from clu import metrics as clu_metrics
  keys = sorted(window[0])
  collection = clu_metrics.Collection.create(**{k: clu_metrics.Average.from_output(k) for k in keys})
  stacked = {k: np.asarray([m[k] for m in window], np.float32) for k in keys}
  return {k: float(v) for k, v in collection.single_from_model_output(**stacked).compute().items()}


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  days, rest = divmod(seconds, 86400)
  return (f"{days}d" if days else "") + f"{rest // 3600:02d}h{rest % 3600 // 60:02d}m{rest % 60:02d}s"


def progress_line(step: int, total: int, scalars: dict) -> str:
  """One console line: step, losses, speed, MFU, ETA."""
  losses = " ".join(f"{k.removeprefix('loss_')} {scalars[k]:.4f}" for k in sorted(scalars)
                    if k.startswith("loss_"))
  parts = [f"step {step}/{total}", f"loss {scalars.get('loss', float('nan')):.4f} ({losses})",
           f"{scalars['steps_per_s']:.2f} step/s {scalars['images_per_s']:.1f} img/s"]
  if "mfu" in scalars:
    parts.append(f"MFU {100 * scalars['mfu']:.1f}%")
  parts.append(f"ETA {format_duration(scalars['eta_s'])}")
  return " | ".join(parts)
