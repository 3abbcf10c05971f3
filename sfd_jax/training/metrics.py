"""Training metrics: throughput and MFU, window averages, and the jsonl / TensorBoard / console writers."""
from __future__ import annotations

import functools
import json
import logging
import queue
import threading
import time

import jax
import numpy as np

from sfd_jax import chips, storage
from sfd_jax.plots import read_jsonl, write_run_plots


def peak_flops(device: jax.Device | None = None) -> float | None:
  """The dense bf16 peak of a device from the chip table (`sfd_jax.chips`), or None where its kind is not listed
  (CPUs): no MFU rather than a wrong one."""
  chip = chips.chip_of((device or jax.devices()[0]).device_kind)
  return None if chip is None else chip.peak_bf16_flops


def mfu(flops_per_step: float, step_seconds: float, num_devices: int, device: jax.Device | None = None):
  """Achieved / peak FLOP/s over `num_devices`; None where the peak is unknown."""
  peak = peak_flops(device)
  return None if peak is None else flops_per_step / step_seconds / (peak * num_devices)


class MetricWriter:
  """Scalars to `metrics.jsonl` and TensorBoard (tensorboardX), images to PNG and TensorBoard, and the run's plots
  (`sfd_jax.plots`); process 0 only.

  The training step never waits on storage (on a pod the other hosts would wait for it at the next collective):
  `write_*` hand their records to one background thread, which does all of the writer's I/O. It appends each record
  to the jsonl at once where the workdir is local; a bucket's object cannot be appended to, so there it rewrites
  the object at most every `upload_every_s` seconds. It redraws the plots from the records it holds (the file is
  never read back) at most every `plot_every_s` seconds. `flush` (with every checkpoint) and `close` wait for the
  thread and raise what it failed with; a killed process loses at most the records of the last interval.

  On resume the jsonl keeps only the lines up to the restored step, so a run killed between checkpoints logs
  the steps it redoes once; a line torn by a crash mid-write is dropped.
  """

  def __init__(self, workdir, resume_step: int = 0, upload_every_s: float = 30.0, plot_every_s: float = 60.0):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    import tensorboardX
    self.workdir = storage.path(workdir)
    self._remote = storage.is_remote(self.workdir)
    path = self.workdir / "metrics.jsonl"
    self._records = []  # every record of the run, for the plots; only the writer thread touches it
    if path.exists():
      self._records = [r for r in read_jsonl(path) if r["step"] <= resume_step]
      storage.write_text(path, "".join(json.dumps(r) + "\n" for r in self._records))
    self._jsonl = storage.GrowingTextFile(path, period_s=upload_every_s)
    # In a bucket every flush uploads the whole event file again: there it happens every minute and on `flush`.
    self._tb = tensorboardX.SummaryWriter(str(self.workdir / "tensorboard"), flush_secs=60)
    self._plot_every_s, self._plotted, self._plotted_at = plot_every_s, 0, -float("inf")
    self._jobs, self._error = queue.Queue(), None
    self._thread = threading.Thread(target=self._work, daemon=True, name="sfd_jax metrics writer")
    self._thread.start()

  def write_scalars(self, step: int, scalars: dict) -> None:
    if self.active:
      self._submit(functools.partial(self._scalars, {"step": int(step), **{k: float(v) for k, v in scalars.items()}}))

  def write_hparams(self, config: dict, metrics: tuple[str, ...]) -> None:
    """The run's config, flattened, for TensorBoard's HParams dashboard, which shows it beside the last values
    of `metrics` (scalar tags of this run)."""
    if self.active:
      self._submit(functools.partial(self._hparams, flat_hparams(config), metrics))

  def write_image(self, step: int, name: str, image):
    """Writes an (H, W, 3) uint8 image as `<workdir>/samples/<name>_<step>.png` and to TensorBoard; returns the
    path it will have."""
    if not self.active:
      return None
    path = self.workdir / "samples" / f"{name}_{step:08d}.png"
    self._submit(functools.partial(self._image, path, step, name, np.array(image)))
    return path

  def flush(self) -> None:
    """Everything written so far reaches the files (a bucket's objects too): called with every checkpoint."""
    if self.active and self._thread.is_alive():
      self._submit(self._flush)
      self._jobs.join()
      self._raise_error()

  def close(self) -> None:
    """Writes what is left, draws the plots once more, and stops the writer thread."""
    if self.active and self._thread.is_alive():
      self._submit(self._close)
      self._jobs.put(None)
      self._thread.join()
      self._raise_error()

  def _submit(self, job) -> None:
    self._raise_error()
    self._jobs.put(job)

  def _raise_error(self) -> None:
    error, self._error = self._error, None
    if error is not None:
      raise error

  def _work(self) -> None:
    """The writer thread: runs the jobs in order; between them (and at least every second) uploads and redraws
    what is due."""
    while True:
      try:
        job = self._jobs.get(timeout=1.0)
      except queue.Empty:
        job = False
      if job is None:
        return
      try:
        if job:
          job()
        self._due()
      except Exception as e:  # noqa: BLE001 (raised on the caller's thread by its next call)
        self._error = self._error or e
      finally:
        if job:
          self._jobs.task_done()

  def _due(self) -> None:
    """The bucket's upload and the plots, where their interval has passed."""
    self._jsonl.flush()
    if len(self._records) > self._plotted and time.monotonic() - self._plotted_at >= self._plot_every_s:
      self._plot()

  def _scalars(self, record: dict) -> None:
    self._records.append(record)
    self._jsonl.write(json.dumps(record) + "\n")
    for key, value in record.items():
      if key != "step":
        self._tb.add_scalar(key, value, record["step"])
    if not self._remote:
      self._tb.flush()

  def _hparams(self, flat: dict, metrics: tuple[str, ...]) -> None:
    from tensorboardX.summary import hparams
    for summary in hparams(flat, {tag: 0.0 for tag in metrics}):
      self._tb.file_writer.add_summary(summary)
    self._tb.flush()

  def _image(self, path, step: int, name: str, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_png(path, image)
    self._tb.add_image(name, image, step, dataformats="HWC")
    if not self._remote:
      self._tb.flush()

  def _flush(self) -> None:
    self._jsonl.flush(force=True)
    self._tb.flush()

  def _close(self) -> None:
    self._jsonl.close()
    self._tb.close()
    self._plot()

  def _plot(self) -> None:
    self._plotted, self._plotted_at = len(self._records), time.monotonic()
    try:
      write_run_plots(self.workdir, self._records)
    except OSError as e:  # a full disk or a lost bucket connection costs the pictures, not the run
      logging.warning("could not write the plots of %s: %s", self.workdir, e)


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
