"""Training metrics: throughput and MFU, window averages, and the jsonl / TensorBoard / console writers."""
from __future__ import annotations

import json
import logging

import jax
import numpy as np

from sfd_jax import storage

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
  the steps it redoes once; a line torn by a crash mid-write is dropped. The run's plots (`sfd_jax.plots`) are
  redrawn from the jsonl as it grows (at most once a minute) and when the writer closes.
  """

  def __init__(self, workdir, resume_step: int = 0):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    import tensorboardX
    self.workdir = storage.path(workdir)
    self.remote = storage.is_remote(self.workdir)
    path = self.workdir / "metrics.jsonl"
    if path.exists():
      records = read_jsonl(path)
      storage.write_text(path, "".join(json.dumps(r) + "\n" for r in records if r["step"] <= resume_step))
    self.jsonl = storage.GrowingTextFile(path)
    # In a bucket every flush uploads the whole event file again: there it happens every minute and on `flush`.
    self.tb = tensorboardX.SummaryWriter(str(self.workdir / "tensorboard"), flush_secs=60)
    from sfd_jax.plots import RunPlots
    self.plots = RunPlots(self.workdir)

  def write_scalars(self, step: int, scalars: dict) -> None:
    if not self.active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self.jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self.jsonl.flush()
    for key, value in scalars.items():
      self.tb.add_scalar(key, value, step)
    if not self.remote:
      self.tb.flush()
    self.plots.maybe_update()

  def write_hparams(self, config: dict, metrics: tuple[str, ...]) -> None:
    """The run's config, flattened, for TensorBoard's HParams dashboard, which shows it beside the last values
    of `metrics` (scalar tags of this run)."""
    if not self.active:
      return
    from tensorboardX.summary import hparams
    for summary in hparams(flat_hparams(config), {tag: 0.0 for tag in metrics}):
      self.tb.file_writer.add_summary(summary)
    self.tb.flush()

  def write_image(self, step: int, name: str, image):
    """Writes an (H, W, 3) uint8 image as `<workdir>/samples/<name>_<step>.png` and to TensorBoard."""
    if not self.active:
      return None
    path = self.workdir / "samples" / f"{name}_{step:08d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_png(path, image)
    self.tb.add_image(name, np.asarray(image), step, dataformats="HWC")
    if not self.remote:
      self.tb.flush()
    return path

  def flush(self) -> None:
    """Everything written so far reaches the files (a bucket's objects too): called with every checkpoint."""
    if self.active:
      self.jsonl.flush(force=True)
      self.tb.flush()

  def close(self) -> None:
    if self.active:
      self.jsonl.close()
      self.tb.close()
      self.plots.update()


def flat_hparams(config: dict, prefix: str = "") -> dict:
  """{'optim.lr': 1e-4, ...}: numbers, strings and booleans as they are, anything else (tuples) as its JSON."""
  flat = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(flat_hparams(value, f"{name}."))
    elif isinstance(value, (bool, int, float, str)):
      flat[name] = value
    else:
      flat[name] = json.dumps(value, default=str)
  return flat


def read_jsonl(path) -> list[dict]:
  """The records of a metrics.jsonl; lines that do not parse (a tail torn by a crash mid-write) are left out, with
  a warning."""
  records, torn = [], 0
  for line in storage.path(path).read_bytes().decode(errors="replace").splitlines():
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
  """One console line: step (and epoch), losses, speed, MFU, ETA."""
  losses = " ".join(f"{k.removeprefix('loss_')} {scalars[k]:.4f}" for k in sorted(scalars)
                    if k.startswith("loss_"))
  parts = [f"step {step}/{total}" + (f" (epoch {scalars['epoch']:.2f})" if "epoch" in scalars else ""),
           f"loss {scalars.get('loss', float('nan')):.4f} ({losses})",
           f"{scalars['steps_per_s']:.2f} step/s {scalars['images_per_s']:.1f} img/s"]
  if "mfu" in scalars:
    parts.append(f"MFU {100 * scalars['mfu']:.1f}%")
  parts.append(f"ETA {format_duration(scalars['eta_s'])}")
  return " | ".join(parts)
