"""Pictures of training runs, drawn from their metrics.jsonl with matplotlib's Agg canvas (files, no display).

`write_run_plots` draws `<workdir>/plots/training.png` (each loss term raw and smoothed, the learning rate,
throughput, against step, with epochs along the top) and, once the run has evaluated, `<workdir>/plots/eval.png`
(each evaluation metric against step, one line per guidance scale) from a run's records; the training metrics
writer keeps them up to date while a run goes. `compare` draws one metric of several runs into one picture
(`python -m sfd_jax.cli.plot RUN1 RUN2 ...`). Pictures say what they show in words (`readable`: "Fréchet distance",
"CFG 1.5", not `fd`, `cfg1.5`) and name each run with its semantic lead Δ. This module reads runs and draws them;
it imports nothing of the training machinery (which imports it).
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
DEFAULT_METRICS = ("fid", "fd", "loss")  # what `compare` draws unless told: the first of these the runs log
NAMES = {"fid": "FID", "sfid": "sFID", "fd": "Fréchet distance", "inception_score": "Inception score",
         "class_accuracy": "class accuracy", "model_calls": "model calls per sample",
         "seconds": "seconds per evaluation", "images_per_s": "images / s", "lr": "learning rate",
         "grad_norm": "gradient norm", "loss_mse": "velocity MSE loss", "loss_cos": "cosine velocity loss",
         "loss_repa": "REPA loss", "loss_kl": "KL loss", "loss_ce": "cross-entropy loss"}
# Why an SFD run's first gradient norms are 1e5 and more: the official code's cosine loss at a fresh model's zero
# output, whose norm torch clamps at 1e-8 (`diffusion.loss.cosine_similarity`), divides by 1e-8 until it moves.
SFD_KEY = "loss_repa"  # logged by the SFD objective alone (`diffusion.loss`): the runs that have a Δ
GRAD_NORM_NOTE = ("huge at first: the cosine loss at the zero-initialised\noutput divides by its norm clamped at "
                  "1e-8, as in the official code")


def readable(key: str) -> str:
  """A metric key in words: `fd` → "Fréchet distance", `eval/cfg1.5/fid` → "FID, CFG 1.5", `eval/cfg1/fd` →
  "Fréchet distance, unguided"."""
  parts = key.removeprefix("eval/").split("/")
  name = NAMES.get(parts[-1], parts[-1].replace("_", " "))
  return ", ".join([name, *(guidance_name(part) for part in parts[:-1])])


def guidance_name(part: str) -> str:
  """`cfg1` → "unguided", `cfg1.5` → "CFG 1.5" (the guidance scale part of an evaluation key)."""
  if not part.startswith("cfg"):
    return part
  return "unguided" if float(part[3:]) == 1 else f"CFG {part[3:]}"


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
        if SFD_KEY in keys and len(values) and values[0] > 1e3:
          ax.text(0.98, 0.95, GRAD_NORM_NOTE, transform=ax.transAxes, ha="right", va="top", fontsize=6, alpha=0.8)
    _style(ax, readable(key), records)
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
      label = guidance_name(key.split("/")[1]) if key.count("/") > 1 else None
      ax.plot(steps, values, marker="o", markersize=3, linewidth=1.2, label=label)
    if len(keys) > 1:
      ax.legend(fontsize=7)
    _style(ax, readable(metric), records)
  return figure


def run_figures(workdir, records: Sequence[dict]) -> dict:
  """{file name: figure} of the run in `workdir`: `training.png` and, once it has evaluated, `eval.png`, each
  titled with the run's name and Δ (`run_labels`)."""
  title = run_labels([epath.Path(workdir)], [records])[0]
  figures = {name: draw(records) for name, draw in (("training.png", training_figure), ("eval.png", eval_figure))}
  for figure in figures.values():
    if figure is not None:
      figure.suptitle(title, fontsize=10)
  return {name: figure for name, figure in figures.items() if figure is not None}


def write_run_plots(workdir, records: Sequence[dict]) -> list[epath.Path]:
  """Draws `plots/training.png` and `plots/eval.png` of the run in `workdir` from its metrics records; returns
  what it wrote."""
  workdir = epath.Path(workdir)
  written = []
  for name, figure in run_figures(workdir, records).items():
    _save(figure, workdir / "plots" / name)
    written.append(workdir / "plots" / name)
  return written


def metric_keys(records: Sequence[dict], metric: str) -> list[str]:
  """The keys a metric name means in a run's records: itself, or every `.../<metric>` (one per guidance scale)."""
  return sorted({k for r in records for k in r if k == metric or k.endswith("/" + metric)})


def compare(runs: Sequence, metric: str | None = None, out=None, smoothing: float = 0.0) -> epath.Path:
  """One picture of `metric` against step for every run (a line per run and guidance scale); returns its path.

  A run is a training workdir (or its metrics.jsonl); `metric` defaults to the first of `DEFAULT_METRICS` the runs
  log; `out` to `<first run>/plots/<metric>.png` (`compare_<metric>.png` for several runs); `smoothing` is
  TensorBoard's EMA weight (0: none)."""
  if not 0 <= smoothing < 1:
    raise UserError(f"--smoothing={smoothing} must be in [0, 1)")
  files = [epath.Path(run) if str(run).endswith(".jsonl") else epath.Path(run) / "metrics.jsonl" for run in runs]
  for jsonl in files:
    if not jsonl.exists():
      raise UserError(f"{jsonl} does not exist: pass training workdirs (each holds a metrics.jsonl)")
  directories, logs = [jsonl.parent for jsonl in files], [read_jsonl(jsonl) for jsonl in files]
  records = dict(zip(run_labels(directories, logs), logs))
  logged = sorted({k for rs in records.values() for r in rs for k in r if k not in ("step", "epoch")})
  if metric is None:
    metric = next((m for m in DEFAULT_METRICS if any(metric_keys(r, m) for r in records.values())), None)
    if metric is None:
      raise UserError(f"the runs log none of {', '.join(DEFAULT_METRICS)}: choose --metric from {', '.join(logged)}")
  elif not any(metric_keys(r, metric) for r in records.values()):
    names = sorted({k.rsplit("/", 1)[-1] for k in logged})
    raise UserError(f"no run logs {metric!r}; these do: {', '.join(names)}")
  name = metric.replace("/", "_")
  out = out or directories[0] / "plots" / (f"{name}.png" if len(directories) == 1 else f"compare_{name}.png")
  return draw_runs(records, [(readable(metric), metric)], out, smoothing, columns=1, size=COMPARE_SIZE)


def draw_runs(runs: Mapping[str, Sequence[dict]], panels: Sequence[tuple[str, str]], out, smoothing: float = 0.0,
              columns: int = 2, size: tuple[float, float] | None = None) -> epath.Path:
  """`runs_figure` saved to `out`; returns the path written."""
  out = epath.Path(out)
  _save(runs_figure(runs, panels, smoothing, columns, size), out)
  return out


def runs_figure(runs: Mapping[str, Sequence[dict]], panels: Sequence[tuple[str, str]], smoothing: float = 0.0,
                columns: int = 2, size: tuple[float, float] | None = None):
  """A picture of several runs ({label: records}): one panel per (title, metric), in it a line per run and key
  the metric means (`metric_keys`), labelled "<run>, <guidance>"; evaluations are drawn with markers."""
  figure, axes = _figure(len(panels), columns, size)
  for ax, (title, metric) in zip(axes, panels):
    _log_if_wide(ax, [_series(records, key)[1] for records in runs.values() for key in metric_keys(records, metric)])
    for label, records in runs.items():
      for key in metric_keys(records, metric):
        steps, values = _series(records, key)
        if smoothing:
          values = smooth(values, smoothing)
        scale = guidance_name(key.split("/")[1]) if key != metric and key.count("/") > 1 else ""
        ax.plot(steps, values, marker="o" if key.startswith("eval/") else None, markersize=3, linewidth=1.5,
                label=f"{label}, {scale}" if scale else label)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if len({_epochs_per_step(r) for r in runs.values()}) == 1:  # the runs agree on what a step is in epochs
      _epoch_axis(ax, next(iter(runs.values())))
  return figure


def run_labels(directories: Sequence[epath.Path], records: Sequence[Sequence[dict]]) -> list[str]:
  """Each run's directory name (its whole path where two runs share a name), with the semantic lead Δ of its
  config.json for an SFD run (one whose `records` log the SFD objective): "sfd (Δ = 0.3)"."""
  names = [d.name for d in directories]
  labels = []
  for name, directory, logged in zip(names, directories, records):
    label = name if names.count(name) == 1 else str(directory)
    delta_t = _delta_t(directory) if any(SFD_KEY in r for r in logged) else None
    labels.append(label if delta_t is None else f"{label} (Δ = {delta_t:g})")
  return labels


def _delta_t(workdir: epath.Path) -> float | None:
  """The semantic lead Δ of a training run (`loss.delta_t` of its config.json), or None."""
  config = workdir / "config.json"
  if not config.exists():
    return None
  try:
    return json.loads(config.read_text()).get("loss", {}).get("delta_t")
  except (json.JSONDecodeError, AttributeError):
    return None


# A learned schedule's t_tex at its interior knots τ = i/cells, as the training step logs it
# (`schedule_t_tex_<i>_of_<cells>`: metric names are identifiers).
LEARNED_SCHEDULE_PREFIX = "schedule_t_tex_"


def learned_schedule(run, out=None) -> epath.Path:
  """A picture of the schedule a run learned (`loss.schedule.kind='learned'`): t_tex(τ) and t_sem(τ) =
  1 − t_tex(1 − τ) as first and last logged (a window average while the probe moves it; exact once it is frozen),
  against SFD's offset with the run's Δ on the same normalised time τ ∈ [0, 1]. `run` is a training workdir (or
  its metrics.jsonl); `out` defaults to `<workdir>/plots/learned_schedule.png`. Returns the path written."""
  jsonl = epath.Path(run) if str(run).endswith(".jsonl") else epath.Path(run) / "metrics.jsonl"
  if not jsonl.exists():
    raise UserError(f"{jsonl} does not exist: pass a training workdir (it holds a metrics.jsonl)")
  logged = [r for r in read_jsonl(jsonl) if any(k.startswith(LEARNED_SCHEDULE_PREFIX) for k in r)]
  if not logged:
    raise UserError(f"{jsonl} logs no learned schedule: train with --config.loss.schedule.kind=learned")
  delta = _delta_t(jsonl.parent) or 0.0
  figure, (ax,) = _figure(1, size=(5.0, 4.0))
  u = np.linspace(0.0, 1.0, 401)
  ax.plot(u, np.clip((1 + delta) * u - delta, 0, 1), "k--", linewidth=1, label=f"SFD (Δ = {delta:g}), texture")
  ax.plot(u, np.clip((1 + delta) * u, 0, 1), "k:", linewidth=1, label=f"SFD (Δ = {delta:g}), semantics")
  for record, alpha, when in ((logged[0], 0.35, "first logged"), (logged[-1], 1.0, "last logged")):
    taus, tex = _learned_knots(record)
    ax.plot(taus, tex, color="C0", alpha=alpha, marker=".", label=f"learned texture, step {record['step']} ({when})")
    ax.plot(1 - taus[::-1], 1 - tex[::-1], color="C1", alpha=alpha, marker=".",
            label=f"learned semantics, step {record['step']} ({when})")
  ax.set_xlabel("generation time τ (normalised, noise → data)")
  ax.set_ylabel("stream time")
  ax.set_title("learned schedule against SFD's offset", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  out = epath.Path(out) if out else jsonl.parent / "plots" / "learned_schedule.png"
  _save(figure, out)
  return out


def _learned_knots(record: dict) -> tuple[np.ndarray, np.ndarray]:
  """(τ, t_tex) of a learned schedule's knots from one metrics record, with the ends (0, 0) and (1, 1)."""
  knots = sorted((int(i) / int(cells), v) for k, v in record.items() if k.startswith(LEARNED_SCHEDULE_PREFIX)
                 for i, cells in [k[len(LEARNED_SCHEDULE_PREFIX):].split("_of_")])
  return np.asarray([0.0, *(t for t, _ in knots), 1.0]), np.asarray([0.0, *(v for _, v in knots), 1.0])
