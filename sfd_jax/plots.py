"""Pictures of training runs, drawn from their metrics.jsonl with matplotlib's Agg canvas (files, no display).

`write_run_plots` draws `<workdir>/plots/training.png` (each loss term raw and smoothed, the learning rate,
throughput, against step, with epochs along the top) and, once the run has evaluated, `<workdir>/plots/eval.png`
(each evaluation metric against step, one line per guidance scale) from a run's records; the training metrics
writer keeps them up to date while a run goes. `compare` draws one metric of several runs into one picture
(`python -m sfd_jax.cli.plot RUN1 RUN2 ... --metric=fid`). This module reads runs and draws them; it imports
nothing of the training machinery (which imports it).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence

import numpy as np
from etils import epath

from sfd_jax import storage
from sfd_jax.errors import UserError

TRAINING_KEYS = ("lr", "images_per_s", "grad_norm")  # after the loss terms, in this order, where logged
PANEL_SIZE = (4.0, 2.8)  # inches per panel
COMPARE_SIZE = (8.0, 5.0)  # inches: 800 × 500 pixels
DPI = 100


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


def _figure(panels: int, columns: int = 3, size: tuple[float, float] | None = None):
  """(figure, axes) of a grid of `panels` panels on matplotlib's Agg canvas (pyplot's global state untouched);
  `size` in inches, default `PANEL_SIZE` per panel."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  columns = min(columns, panels)
  rows = -(-panels // columns)
  size = size or (PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows)
  figure = Figure(figsize=size, dpi=DPI, layout="constrained")
  FigureCanvasAgg(figure)
  axes = figure.subplots(rows, columns, squeeze=False).ravel()
  for ax in axes[panels:]:
    ax.set_visible(False)
  return figure, axes[:panels]


def _save(figure, path: epath.Path) -> None:
  """PNG to `path` (local or gs://), written whole: a reader never sees half a picture (`storage.write_bytes`)."""
  import io
  path.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png")
  storage.write_bytes(path, buffer.getvalue())


def smooth(values, weight: float) -> np.ndarray:
  """TensorBoard's smoothing: an exponential moving average with this weight, debiased at the start."""
  out, average = np.empty(len(values)), 0.0
  for i, value in enumerate(values):
    average = weight * average + (1 - weight) * value
    out[i] = average / (1 - weight ** (i + 1)) if weight else value
  return out


def auto_weight(points: int) -> float:
  """A smoothing weight that averages over about a 30th of a curve's points (none for short curves)."""
  return 1 - 1 / max(points / 30, 1.0)


def _series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  rows = [(r["step"], r[key]) for r in records if key in r and np.isfinite(r[key])]
  steps, values = zip(*rows) if rows else ((), ())
  return np.asarray(steps, np.float64), np.asarray(values, np.float64)


def _epochs_per_step(records: Sequence[dict]) -> float | None:
  last = next((r for r in reversed(records) if r.get("epoch") and r["step"]), None)
  return None if last is None else round(last["epoch"] / last["step"], 12)


def _epoch_axis(ax, records: Sequence[dict]) -> None:
  """Epochs along the top of a panel, when the run logs them (epoch ∝ step)."""
  per_step = _epochs_per_step(records)
  if per_step:
    top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda e: e / per_step))
    top.set_xlabel("epoch", fontsize=8)
    top.tick_params(labelsize=7)


def _log_if_wide(ax, values) -> None:
  """A logarithmic y axis for a positive curve that spans more than a factor of 20 (FID from its first
  evaluations on, a gradient norm)."""
  values = np.concatenate([np.asarray(v, np.float64) for v in values]) if len(values) else np.zeros(0)
  if len(values) and values.min() > 0 and values.max() > 20 * values.min():
    ax.set_yscale("log")


def _style(ax, title: str, records: Sequence[dict]) -> None:
  ax.set_title(title, fontsize=9)
  ax.set_xlabel("step", fontsize=8)
  ax.tick_params(labelsize=7)
  ax.grid(alpha=0.3)
  _epoch_axis(ax, records)


def training_figure(records: Sequence[dict]):
  """Each loss term (faint: as logged; solid: smoothed), then the learning rate, images/s and the gradient norm;
  None when the records hold none of them."""
  keys = sorted({k for r in records for k in r if k == "loss" or k.startswith("loss_")})
  keys += [k for k in TRAINING_KEYS if any(k in r for r in records)]
  if not keys:
    return None
  figure, axes = _figure(len(keys))
  for ax, key in zip(axes, keys):
    steps, values = _series(records, key)
    if key.startswith("loss"):
      ax.plot(steps, values, color="C0", alpha=0.3, linewidth=0.8)
      ax.plot(steps, smooth(values, auto_weight(len(values))), color="C0", linewidth=1.5)
    else:
      ax.plot(steps, values, color="C1", linewidth=1.2)
      if key == "grad_norm":
        _log_if_wide(ax, [values])
    _style(ax, {"images_per_s": "images / s", "lr": "learning rate", "grad_norm": "gradient norm"}.get(key, key),
           records)
  return figure


def eval_groups(records: Sequence[dict]) -> dict[str, list[str]]:
  """{metric: its keys}, e.g. {'fid': ['eval/cfg1/fid', 'eval/cfg1.5/fid']}, plus the seconds per evaluation."""
  groups: dict[str, list[str]] = {}
  for key in sorted({k for r in records for k in r if k.startswith("eval/")}):
    groups.setdefault(key.rsplit("/", 1)[-1], []).append(key)
  return groups


def eval_figure(records: Sequence[dict]):
  """Each evaluation metric against step, one line per guidance scale; None before the first evaluation."""
  groups = eval_groups(records)
  if not groups:
    return None
  figure, axes = _figure(len(groups))
  for ax, (metric, keys) in zip(axes, groups.items()):
    _log_if_wide(ax, [_series(records, key)[1] for key in keys])
    for key in keys:
      steps, values = _series(records, key)
      label = key.removeprefix("eval/").rsplit("/", 1)[0] if key.count("/") > 1 else None
      ax.plot(steps, values, marker="o", markersize=3, linewidth=1.2, label=label)
    if len(keys) > 1:
      ax.legend(fontsize=7)
    _style(ax, {"seconds": "seconds per evaluation"}.get(metric, metric), records)
  return figure


def write_run_plots(workdir, records: Sequence[dict]) -> list[epath.Path]:
  """Draws `plots/training.png` and `plots/eval.png` of the run in `workdir` from its metrics records; returns
  what it wrote."""
  workdir = epath.Path(workdir)
  written = []
  for name, draw in (("training.png", training_figure), ("eval.png", eval_figure)):
    figure = draw(records)
    if figure is not None:
      _save(figure, workdir / "plots" / name)
      written.append(workdir / "plots" / name)
  return written


def metric_keys(records: Sequence[dict], metric: str) -> list[str]:
  """The keys a metric name means in a run's records: itself, or every `.../<metric>` (one per guidance scale)."""
  return sorted({k for r in records for k in r if k == metric or k.endswith("/" + metric)})


def compare(runs: Sequence, metric: str, out, smoothing: float = 0.0):
  """One picture of `metric` against step for every run (a line per run and guidance scale); returns its path.

  A run is a training workdir (or its metrics.jsonl); `smoothing` is TensorBoard's EMA weight (0: none)."""
  if not 0 <= smoothing < 1:
    raise UserError(f"--smoothing={smoothing} must be in [0, 1)")
  paths = [epath.Path(run) for run in runs]
  records = {}
  for path, label in zip(paths, _labels(paths)):
    jsonl = path if path.name.endswith(".jsonl") else path / "metrics.jsonl"
    if not jsonl.exists():
      raise UserError(f"{jsonl} does not exist: pass training workdirs (each holds a metrics.jsonl)")
    records[label] = read_jsonl(jsonl)
  if not any(metric_keys(r, metric) for r in records.values()):
    available = {k.rsplit("/", 1)[-1] for rs in records.values() for r in rs for k in r if k != "step"}
    raise UserError(f"no run logs {metric!r}; these do: {', '.join(sorted(available))}")
  return draw_runs(records, [(metric, metric)], out, smoothing, columns=1, size=COMPARE_SIZE)


def draw_runs(runs: Mapping[str, Sequence[dict]], panels: Sequence[tuple[str, str]], out, smoothing: float = 0.0,
              columns: int = 2, size: tuple[float, float] | None = None) -> epath.Path:
  """A picture of several runs ({label: records}): one panel per (title, metric), in it a line per run and key
  the metric means (`metric_keys`); evaluations are drawn with markers. Returns the path written."""
  figure, axes = _figure(len(panels), columns, size)
  for ax, (title, metric) in zip(axes, panels):
    _log_if_wide(ax, [_series(records, key)[1] for records in runs.values() for key in metric_keys(records, metric)])
    for label, records in runs.items():
      for key in metric_keys(records, metric):
        steps, values = _series(records, key)
        if smoothing:
          values = smooth(values, smoothing)
        scale = key.removeprefix("eval/").rsplit("/", 1)[0] if key != metric and key.count("/") > 1 else ""
        ax.plot(steps, values, marker="o" if key.startswith("eval/") else None, markersize=3, linewidth=1.5,
                label=f"{label} {scale}".strip())
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if len({_epochs_per_step(r) for r in runs.values()}) == 1:  # the runs agree on what a step is in epochs
      _epoch_axis(ax, next(iter(runs.values())))
  out = epath.Path(out)
  _save(figure, out)
  return out


def _labels(paths: Sequence[epath.Path]) -> list[str]:
  """Each run's directory name, or its whole path where two runs share a name."""
  names = [(p.parent if p.name.endswith(".jsonl") else p).name for p in paths]
  return [name if names.count(name) == 1 else str(p) for name, p in zip(names, paths)]
