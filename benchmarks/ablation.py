"""The schedule ablation in miniature: the demo's SFD model trained with several schedules over seeds.

  python benchmarks/ablation.py            # every schedule, both settings, 3 seeds: what ablation_results.md shows
  python benchmarks/ablation.py --steps=800 --schedules=sync,delta_0.3 --settings=conditional --cfg_scales=1,2

On the demo's digits (`sfd_jax.demo.Demo`: its texture VAE, classifier, SemVAE and latents, reused from
`--demo_out` when a demo already wrote them), the demo's small LightningDiT-SFD is trained once per (setting,
schedule, seed) for the same steps, evaluated every `--eval_every` steps by the demo's in-training evaluation
(`training.evaluation`: the same Dopri5 samples from fixed noise, decoded by the texture VAE, judged by the digit
classifier). The seed sets the model's initialisation and the data order; the evaluation noise is the same for
every run. Two settings:

- `conditional`: the demo's class-conditional model; class accuracy of the samples (against the requested label)
  and the Fréchet distance (FD) of classifier features against the held-out digits.
- `unconditional`: no label reaches the model (every example carries the one label of a one-class model, which
  is what a null label for every example is), so the semantic stream alone must decide which digit is drawn.
  Scored by FD, by how evenly the samples cover the ten classes (total variation distance of the classifier's
  predicted-class histogram from uniform) and by the share of samples the classifier recognises with
  probability ≥ 0.9.

Writes `<results>_results.md` (mean ± standard deviation over seeds per schedule at each evaluated step, and per
run the wall time), `<results>_results.json` (every run's evaluations) and one plot per setting, `<results>.png`
and `<results>_unconditional.png` (mean with a ±std band against step). A run already trained in `--out` is reused
(its evaluations are read from its log), so a stopped ablation resumes; several processes started with the same
flags share the runs (each claims the next free one), and one more after they are done (`--notrain`) writes the
complete tables.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import jax
import numpy as np
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sfd_jax import demo as demo_lib, plots  # noqa: E402
from sfd_jax.cli import common  # noqa: E402
from sfd_jax.data import latents as latents_lib  # noqa: E402
from sfd_jax.errors import Preempted, UserError  # noqa: E402
from sfd_jax.eval import fid  # noqa: E402
from sfd_jax.training import evaluation, loop, metrics as metrics_lib, tasks  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("demo_out", "outputs/demo", "The demo's output directory: its prepared stages are reused (or "
                    "trained there first).")
flags.DEFINE_string("out", "outputs/ablation", "Where the ablation's runs train (kept: a rerun reuses them).")
flags.DEFINE_string("results", "benchmarks/ablation", "Prefix of the outputs: <results>_results.md / .json, "
                    "<results>.png, <results>_unconditional.png.")
flags.DEFINE_integer("steps", 400, "Training steps of every run.")
flags.DEFINE_integer("eval_every", 100, "Evaluate every this many steps (and at the end).")
flags.DEFINE_integer("per_class", 10, "Evaluation samples: this many per class (unconditional: 10× this, no label).")
flags.DEFINE_integer("seeds", 3, "Seeds 0, 1, ... of each schedule.")
flags.DEFINE_list("schedules", None, "Schedules to run (default: all of each setting); names from "
                  "SCHEDULES in this file.")
flags.DEFINE_list("settings", ["conditional", "unconditional"], "conditional and/or unconditional.")
flags.DEFINE_list("cfg_scales", ["1"], "Guidance scales of the conditional evaluations (1: unguided).")
flags.DEFINE_float("probe_fraction", 0.25, "learned: the share of the steps during which the schedule is trained.")
flags.DEFINE_bool("train", True, "Train the runs not yet finished; --notrain writes the tables of the finished ones.")

# name → (loss.schedule.kind, loss.delta_t, label); Δ for random_offset is the one it samples with.
SCHEDULES = {
    "sync": ("offset", 0.0, "Δ = 0 (synchronous)"),
    "delta_0.1": ("offset", 0.1, "Δ = 0.1"),
    "delta_0.2": ("offset", 0.2, "Δ = 0.2"),
    "delta_0.3": ("offset", 0.3, "Δ = 0.3"),
    "delta_0.5": ("offset", 0.5, "Δ = 0.5"),
    "random_offset": ("random_offset", 0.3, "Δ ~ U[0, 0.6] (sampled at 0.3)"),
    "learned": ("learned", 0.3, "learned (from Δ = 0.3)"),
}
SETTINGS = {"conditional": ("sync", "delta_0.1", "delta_0.2", "delta_0.3", "delta_0.5", "random_offset", "learned"),
            "unconditional": ("sync", "delta_0.3", "learned")}
RANDOM_DELTA_RANGE = (0.0, 0.6)
CONFIDENT = 0.9  # a sample the classifier assigns a class with at least this probability counts as recognisable
CALLS = ("model_calls", "model calls per sample (Dopri5)")
METRICS = {"conditional": (("class_accuracy", "class accuracy ↑"), ("fd", "FD of classifier features ↓"), CALLS),
           "unconditional": (("fd", "FD of classifier features ↓"),
                             ("class_tv", "class histogram TV from uniform ↓"),
                             ("recognisable", f"share recognised (p ≥ {CONFIDENT}) ↑"), CALLS)}
DIGITS = {"fd": 2, "model_calls": 1}  # decimals in the tables (3 for the rest)


@dataclasses.dataclass(frozen=True)
class Run:
  setting: str
  schedule: str
  seed: int

  @property
  def name(self) -> str:
    return f"{self.setting}/{self.schedule}/seed{self.seed}"


@dataclasses.dataclass(frozen=True)
class Size:
  """What every run of one ablation shares."""
  steps: int
  eval_every: int
  per_class: int
  cfg_scales: tuple[float, ...]
  probe_fraction: float


# ---------------------------------------------------------------------------------------------------------- configs

def run_config(demo: demo_lib.Demo, run: Run, size: Size):
  """The demo's SFD config with the run's schedule, seed and the ablation's size."""
  kind, delta_t, _ = SCHEDULES[run.schedule]
  cfg = demo.sfd_config(delta_t, evaluate=True)
  samples = size.per_class * demo_lib.NUM_CLASSES
  cfg.seed, cfg.total_steps, cfg.eval_every = run.seed, size.steps, size.eval_every
  cfg.log_every, cfg.ckpt_every = max(size.steps // 4, 1), size.steps
  cfg.loss.schedule.kind = kind
  cfg.loss.schedule.delta_range = RANDOM_DELTA_RANGE
  cfg.loss.schedule.probe_steps = max(int(size.steps * size.probe_fraction), 1)
  cfg.eval.update(num_samples=samples, batch_size=samples, cfg_scales=size.cfg_scales)
  if run.setting == "unconditional":
    cfg.model.num_classes = 1  # one label, carried by every example: no class information (and nothing to guide)
    cfg.loss.class_dropout = 0.0
    cfg.eval.cfg_scales = (1.0,)
  return cfg


def unconditional_data(make_data):
  """The task's data with every label replaced by the one label of the unconditional model."""
  def make(rows, start_step):
    for batch in make_data(rows, start_step):
      yield {**batch, "y": np.zeros_like(batch["y"])}
  return make


# ---------------------------------------------------------------------------------------------------------- metrics

def unconditional_metrics(classifier, params, real_features: np.ndarray) -> evaluation.Metrics:
  """FD against the held-out digits, the total variation distance of the predicted-class histogram from uniform,
  and the share of samples recognised with probability ≥ CONFIDENT (the requested labels mean nothing here)."""
  apply = jax.jit(classifier.apply)
  reference = fid.statistics(real_features.astype(np.float64))

  def compute(images, labels):
    del labels
    logits, features = jax.device_get(apply({"params": params}, images))
    return {"fd": fid.frechet_distance(fid.statistics(features.astype(np.float64)), reference, method="eigh"),
            **class_statistics(logits)}
  return evaluation.Metrics(("fd", "class_tv", "recognisable"), compute)


def class_statistics(logits: np.ndarray) -> dict:
  """{'class_tv': ½ Σ_k |share of samples predicted k − 1/K|, 'recognisable': share with max probability ≥
  CONFIDENT} of (N, K) classifier logits."""
  logits = np.asarray(logits, np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  shares = np.bincount(probs.argmax(-1), minlength=logits.shape[-1]) / len(logits)
  return {"class_tv": float(0.5 * np.abs(shares - 1 / logits.shape[-1]).sum()),
          "recognisable": float(np.mean(probs.max(-1) >= CONFIDENT))}


# --------------------------------------------------------------------------------------------------------- training

def prepare(demo: demo_lib.Demo):
  """The demo's stages (reused where a demo finished them): (classifier, its params, held-out features)."""
  texture_dir = demo.texture_vae()
  classifier, params, dino_dir = demo.classifier()
  semvae_dir = demo.semvae(dino_dir)
  if not (demo.out / "latents" / latents_lib.NAME / latents_lib.VERSION / "stats.json").exists():
    demo.extract(texture_dir, dino_dir, semvae_dir)
  reference, _ = demo_lib.real_features(demo, classifier, params)
  return classifier, params, reference


class Claimed(Exception):
  """Another process of the same ablation is training this run (or, with --notrain, nobody)."""


def train(cfg, setting: str, workdir: Path, metrics: evaluation.Metrics) -> float:
  """Trains (or resumes) one run of `run_config` with its evaluations; returns its wall time (that of the run that
  finished it). Several processes may work through the same runs: each claims a run by creating its
  `ablation_claim` file, and raises `Claimed` for a run another one holds (delete the file of a killed process)."""
  timing = workdir / "ablation_seconds.json"
  if timing.exists():
    return json.loads(timing.read_text())["seconds"]
  workdir.mkdir(parents=True, exist_ok=True)
  claim = workdir / "ablation_claim"
  try:
    os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
  except FileExistsError:
    raise Claimed(f"{claim} exists: another process trains this run") from None
  try:
    tick = time.perf_counter()
    task = tasks.sfd_task(cfg, metrics)
    if setting == "unconditional":
      task = dataclasses.replace(task, make_data=unconditional_data(task.make_data))
    loop.run(cfg, workdir, task)
    seconds = round(time.perf_counter() - tick, 1)
    timing.write_text(json.dumps({"seconds": seconds}))
  finally:
    claim.unlink()
  return seconds


def evaluations(workdir: Path) -> list[dict]:
  """Every evaluation a run logged: {'step', 'eval/seconds', 'eval/cfg<scale>/<metric>': value, ...}."""
  return [{"step": r["step"], **{k: v for k, v in r.items() if k.startswith("eval/")}}
          for r in metrics_lib.read_jsonl(workdir / "metrics.jsonl") if evaluation.SECONDS in r]


def learned_map(workdir: Path) -> dict | None:
  """The last logged map of a learned schedule: {'step', 'tau', 't_tex'} at its knots (t_sem(τ) =
  1 − t_tex(1 − τ)); None for other schedules."""
  logged = [r for r in metrics_lib.read_jsonl(workdir / "metrics.jsonl")
            if any(k.startswith(plots.LEARNED_SCHEDULE_PREFIX) for k in r)]
  if not logged:
    return None
  taus, tex = plots._learned_knots(logged[-1])  # noqa: SLF001 (the one reader of the logged knots)
  return {"step": logged[-1]["step"], "tau": taus.tolist(), "t_tex": tex.tolist()}


# ---------------------------------------------------------------------------------------------------------- summary

def summarize(results: dict) -> dict:
  """{setting: {schedule: {step: {tag: (mean, std, n)}}}} over the seeds of each (setting, schedule); std with
  ddof=1 (0 for one seed)."""
  grouped = {}
  for run in results["runs"]:
    if "evaluations" not in run:
      continue
    for row in run["evaluations"]:
      if "step" not in row:
        continue
      cell = grouped.setdefault(run["setting"], {}).setdefault(run["schedule"], {}).setdefault(row["step"], {})
      for tag, value in row.items():
        if tag.startswith("eval/cfg"):
          cell.setdefault(tag, []).append(value)
  return {setting: {schedule: {step: {tag: _mean_std(values) for tag, values in cells.items()}
                               for step, cells in sorted(steps.items())}
                    for schedule, steps in schedules.items()}
          for setting, schedules in grouped.items()}


def _mean_std(values) -> tuple[float, float, int]:
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0, len(values)


def _scale_name(scale: float) -> str:
  return "unguided" if scale == 1 else f"CFG {scale:g}"


def _cell(stat, digits: int, seeds: int) -> str:
  mean, std, n = stat
  return f"{mean:.{digits}f} ± {std:.{digits}f}" + ("" if n == seeds else f" (n={n})")


def tables(results: dict, summary: dict) -> str:
  """The Markdown of the results: per setting, per metric and guidance scale, mean ± std per schedule and step."""
  size = results["size"]
  lines = [f"# Schedule ablation on the demo's digits ({results['date']})", "",
           f"Machine: {results['machine']}. {size['steps']} training steps per run (batch {results['batch_size']}, "
           f"{size['steps'] * results['batch_size'] / results['train_digits']:.1f} epochs of the "
           f"{results['train_digits']:,} training digits), evaluated every {size['eval_every']} steps; seeds "
           f"{results['seeds']} (model initialisation and data order; the evaluation's noise is the same for every "
           "run; the `seeds` column says how many runs a row has). Cells: mean ± standard deviation over the seeds "
           "(ddof 1); `(n=k)` marks a cell with fewer. Held-out accuracy of the demo classifier: "
           f"{results['classifier_heldout_accuracy']:.3f}; FD "
           f"of {results['real_floor']['samples']} real training digits against the held-out ones (the floor at this "
           f"sample size): {results['real_floor']['fd']:.2f}.", ""]
  for setting, schedules in summary.items():
    lines += [f"## {setting}", "",
              f"{size['per_class'] * 10} samples per evaluation (EMA weights, Dopri5 rtol {results['rtol']:g}, the "
              "same noise for every run), " + (f"{size['per_class']} of each class requested." if setting ==
                                               "conditional" else "no label."), ""]
    steps = sorted({s for by_step in schedules.values() for s in by_step})
    scales = sorted({float(t.split("/")[1][3:]) for by_step in schedules.values() for cell in by_step.values()
                     for t in cell})
    for key, title in METRICS[setting]:
      for scale in scales:
        tag = evaluation.tag(scale, key)
        if not any(tag in cell for by_step in schedules.values() for cell in by_step.values()):
          continue
        lines += [f"### {title}, {_scale_name(scale)}", "",
                  "| schedule | seeds | " + " | ".join(f"step {s}" for s in steps) + " |",
                  "|---" * (len(steps) + 2) + "|"]
        for schedule, by_step in schedules.items():
          seeds = max(cell[tag][2] for cell in by_step.values() if tag in cell)
          cells = [_cell(by_step[s][tag], DIGITS.get(key, 3), seeds) if s in by_step and tag in by_step[s] else "–"
                   for s in steps]
          lines.append(f"| {SCHEDULES[schedule][2]} | {seeds} | " + " | ".join(cells) + " |")
        lines += ["", *comparison(results["runs"], setting, tag, DIGITS.get(key, 3)), ""]
  lines += ["## Wall time per configuration", "",
            "Training with its evaluations, per run; the first run of a configuration in a process compiles the train "
            "step and the sampler (a later seed reads them from the persistent compilation cache).", "",
            "| setting | schedule | runs | seconds per run: mean (min – max) |", "|---|---|---|---|"]
  timed = {}
  for run in results["runs"]:
    if "seconds" in run:
      timed.setdefault((run["setting"], run["schedule"]), []).append(run["seconds"])
  for (setting, schedule), seconds in timed.items():
    lines.append(f"| {setting} | {SCHEDULES[schedule][2]} | {len(seconds)} | {np.mean(seconds):.0f} "
                 f"({min(seconds):.0f} – {max(seconds):.0f}) |")
  lines += ["", "## Runs", "", "| run | wall time (s) | status |", "|---|---|---|"]
  for run in results["runs"]:
    status = ("trained" if "evaluations" in run else f"skipped: {run['skipped']}" if "skipped" in run else
              f"failed: {run['error']}")
    lines.append(f"| {run['setting']} / {run['schedule']} / seed {run['seed']} | {run.get('seconds', '–')} | "
                 f"{status} |")
  return "\n".join(lines) + "\n"


def comparison(runs: list[dict], setting: str, tag: str, digits: int) -> list[str]:
  """Each schedule against Δ = 0 at the last evaluated step: the difference of the means ± its standard error and
  Welch's t-test p-value over the seeds, and the same paired by seed (a seed fixes the initialisation and the data
  order of every schedule alike, so its share of the spread cancels). With 3 seeds only a large, consistent
  difference reaches p < 0.05."""
  from scipy import stats
  by_schedule = {}
  for run in runs:
    rows = [r for r in run.get("evaluations", ()) if tag in r]
    if run["setting"] == setting and rows:
      by_schedule.setdefault(run["schedule"], {})[run["seed"]] = rows[-1]
  base = by_schedule.get("sync", {})
  last = max((r["step"] for r in base.values()), default=None)
  out = []
  for schedule, by_seed in by_schedule.items():
    by_seed = {seed: r[tag] for seed, r in by_seed.items() if r["step"] == last}
    a, b = np.asarray(list(by_seed.values())), np.asarray([r[tag] for r in base.values()])
    if schedule == "sync" or len(a) < 2 or len(b) < 2:
      continue
    se = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    line = (f"{SCHEDULES[schedule][2]} − Δ = 0 at step {last}: {a.mean() - b.mean():+.{digits}f} ± {se:.{digits}f} "
            f"(Welch p = {_p(lambda: stats.ttest_ind(a, b, equal_var=False), se)}, n = {len(a)} vs {len(b)})")
    pairs = np.asarray([value - base[seed][tag] for seed, value in by_seed.items() if seed in base])
    if len(pairs) >= 2:
      se = pairs.std(ddof=1) / np.sqrt(len(pairs))
      line += (f"; paired by seed {pairs.mean():+.{digits}f} ± {se:.{digits}f} (p = "
               f"{_p(lambda: stats.ttest_1samp(pairs, 0.0), se)}, {len(pairs)} pairs)")
    out.append(f"- {line}")
  return out


def _p(test, se: float) -> str:
  """The p-value of `test()`, or – where the values do not vary (model calls, often)."""
  return f"{test().pvalue:.2f}" if se > 1e-9 else "–"


def plot(summary_setting: dict, setting: str, learned_maps: list[dict], path: Path) -> None:
  """Each metric (and guidance scale) against step: the mean over seeds with a ±std band, one line per schedule;
  and the learned schedules' final maps (one per seed) against SFD's offset from which they started."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  tags = sorted({t for by_step in summary_setting.values() for cell in by_step.values() for t in cell})
  panels = [(evaluation.tag(float(t.split("/")[1][3:]), key), f"{title}, {_scale_name(float(t.split('/')[1][3:]))}")
            for key, title in METRICS[setting] for t in tags if t.endswith(f"/{key}")]
  figure, axes = plt.subplots(1, len(panels) + bool(learned_maps), figsize=(4.6 * (len(panels) + bool(learned_maps)),
                                                                           3.4), squeeze=False)
  if learned_maps:
    _plot_learned(axes[0][-1], learned_maps)
  for ax, (tag, title) in zip(axes[0], panels):
    for schedule, by_step in summary_setting.items():
      steps = [s for s in by_step if tag in by_step[s]]
      mean = np.asarray([by_step[s][tag][0] for s in steps])
      std = np.asarray([by_step[s][tag][1] for s in steps])
      line, = ax.plot(steps, mean, marker="o", markersize=3, label=SCHEDULES[schedule][2])
      ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  figure.suptitle(f"{setting}: mean ± std over seeds", fontsize=10)
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)


def _plot_learned(ax, maps: list[dict]) -> None:
  delta = SCHEDULES["learned"][1]
  u = np.linspace(0.0, 1.0, 201)
  ax.plot(u, np.clip((1 + delta) * u - delta, 0, 1), "k--", linewidth=1, label=f"offset Δ = {delta:g} (start)")
  ax.plot(u, np.clip((1 + delta) * u, 0, 1), "k--", linewidth=1)
  for i, m in enumerate(maps):
    tau, tex = np.asarray(m["tau"]), np.asarray(m["t_tex"])
    ax.plot(tau, tex, color="C0", alpha=0.8, label="learned t_tex" if i == 0 else None)
    ax.plot(1 - tau[::-1], 1 - tex[::-1], color="C1", alpha=0.8, label="learned t_sem" if i == 0 else None)
  ax.set_title(f"learned schedules at the end ({len(maps)} seeds)", fontsize=9)
  ax.set_xlabel("generation time τ (normalised)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)


def machine() -> str:
  model = next((line.split(":", 1)[1].strip() for line in subprocess.run(
      ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "unknown CPU")
  with open("/proc/loadavg") as f:
    load = f.read().split()[:3]
  return (f"{model} ({os.cpu_count()} cores, {platform.machine()}), shared with other jobs (load average "
          f"{' / '.join(load)} when the results were written), jax {jax.__version__}")


def write(results: dict, prefix: Path) -> dict:
  """<prefix>_results.md / .json and the plots; returns the summary."""
  summary = summarize(results)
  results = {**results, "machine": machine(), "summary": {
      setting: {schedule: {str(step): cell for step, cell in by_step.items()} for schedule, by_step in s.items()}
      for setting, s in summary.items()}}
  prefix.parent.mkdir(parents=True, exist_ok=True)
  Path(f"{prefix}_results.json").write_text(json.dumps(results, indent=1))
  Path(f"{prefix}_results.md").write_text(tables(results, summary))
  for setting, by_schedule in summary.items():
    maps = [r["learned_map"] for r in results["runs"] if r["setting"] == setting and r.get("learned_map")]
    plot(by_schedule, setting, maps, Path(f"{prefix}.png" if setting == "conditional" else f"{prefix}_{setting}.png"))
  return summary


# ------------------------------------------------------------------------------------------------------------ main

def plan(settings, schedules, seeds: int) -> list[Run]:
  """Seeds outermost (a cut-short ablation still has every schedule), the learned schedule last within a seed."""
  runs = [Run(setting, schedule, seed) for seed in range(seeds) for setting in settings
          for schedule in SETTINGS[setting] if schedules is None or schedule in schedules]
  return sorted(runs, key=lambda r: (r.seed, r.schedule == "learned"))


def ablation(demo: demo_lib.Demo, runs: list[Run], size: Size, out: Path, prefix: Path,
             train_new: bool = True) -> dict:
  classifier, params, reference = prepare(demo)
  metrics = {"conditional": demo_lib.classifier_metrics(classifier, params, reference),
             "unconditional": unconditional_metrics(classifier, params, reference)}
  train_images = np.stack([demo.train_images[i]["image"] for i in range(size.per_class * 10)])
  _, train_features = jax.device_get(jax.jit(classifier.apply)({"params": params}, train_images))
  floor = fid.frechet_distance(fid.statistics(train_features.astype(np.float64)),
                               fid.statistics(reference.astype(np.float64)), method="eigh")
  _, heldout_accuracy = demo_lib.real_features(demo, classifier, params)
  results = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
             "size": dataclasses.asdict(size),
             "classifier_heldout_accuracy": heldout_accuracy, "rtol": demo.cfg.eval.rtol,
             "batch_size": demo.cfg.batch_size, "train_digits": len(demo.train_images),
             "real_floor": {"samples": len(train_images), "fd": float(floor)}, "runs": []}
  for i, run in enumerate(runs):
    workdir = out / run.setting / run.schedule / f"seed{run.seed}"
    print(f"== run {i + 1}/{len(runs)}: {run.name} ({time.strftime('%H:%M:%S')})", flush=True)
    entry = dataclasses.asdict(run)
    try:
      if not (train_new or (workdir / "ablation_seconds.json").exists()):
        continue  # --notrain: the tables of the finished runs
      entry["seconds"] = train(run_config(demo, run, size), run.setting, workdir, metrics[run.setting])
      entry["evaluations"] = evaluations(workdir)
      if run.schedule == "learned":
        entry["learned_map"] = learned_map(workdir)
    except Claimed as e:
      entry["skipped"] = str(e)
    except Preempted:
      raise  # a stop request: the run's checkpoint is complete, the same command resumes it
    except Exception as e:  # noqa: BLE001 (one failed schedule is reported, the others still run)
      traceback.print_exc()
      entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    print(f"   {run.name}: " + (f"{entry['seconds']} s" if "seconds" in entry else entry.get("error", "") +
                                  entry.get("skipped", "")), flush=True)
    results["runs"].append(entry)
    results["seeds"] = sorted({r["seed"] for r in results["runs"]})
    write(results, prefix)  # after every run: a cut-short ablation leaves its tables
  return results


def main(argv):
  del argv
  size = Size(FLAGS.steps, FLAGS.eval_every, FLAGS.per_class, tuple(float(s) for s in FLAGS.cfg_scales),
              FLAGS.probe_fraction)
  unknown = set(FLAGS.settings) - set(SETTINGS) | set(FLAGS.schedules or ()) - set(SCHEDULES)
  if unknown:
    raise UserError(f"unknown settings or schedules {sorted(unknown)}: settings are {list(SETTINGS)}, "
                           f"schedules {list(SCHEDULES)}")
  demo = demo_lib.Demo(demo_lib.demo_config(), Path(FLAGS.demo_out))
  demo.out.mkdir(parents=True, exist_ok=True)
  runs = plan(FLAGS.settings, FLAGS.schedules, FLAGS.seeds)
  ablation(demo, runs, size, Path(FLAGS.out), Path(FLAGS.results), FLAGS.train)


if __name__ == "__main__":
  common.run(main)
