"""Evaluation during training: FID, sFID, IS, precision and recall of EMA samples, every `eval_every` steps.

Each evaluation decodes the same images (image i's noise and label depend only on `eval.seed` and i: fixed noise
and the official balanced labels, as `cli.sample` draws them), sampled with the EMA weights over every device of
the mesh with the run's schedule (`run_schedule`), once per guidance scale of `eval.cfg_scales` (1 is unguided). The
sampler and decoder are compiled once per guidance rule (one program unguided, one for every CFG scale: the scale
and the schedule are its inputs) and reused by every evaluation. Metrics come from the project's FID Inception
against an ADM reference batch (`eval.features='inception'`), or from a feature network the task supplies
(`'task'`: the demo's digit classifier, for instance). They are logged at the step, as `eval/cfg<scale>/<metric>`,
with `eval/seconds` (the evaluation's cost; the first one includes compiling).

Resuming: an evaluation runs after its step's checkpoint was started and before the next step, and metrics.jsonl
keeps only the lines up to the step a run resumes from. So a run killed before a later checkpoint redoes the
evaluation when it reaches the step again, and a run killed during the evaluation of a step whose checkpoint was
complete redoes it on resume (`missed`): every evaluation is logged exactly once.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from sfd_jax import generate, sharding as shd
from sfd_jax.console import say
from sfd_jax.data import extract as extract_lib
from sfd_jax.data.images import ArrayImages
from sfd_jax.diffusion import sampler, schedule as schedule_lib
from sfd_jax.errors import UserError
from sfd_jax.training import metrics as metrics_lib

FEATURES = ("inception", "task")
SECONDS = "eval/seconds"  # in every evaluation's record: how the log tells evaluated steps apart



@dataclasses.dataclass(frozen=True)
class Metrics:
  """What a feature network says about a set of samples: `compute(uint8 images (N, H, W, 3), labels (N,))` returns
  {name: value} for each of `names`."""
  names: tuple[str, ...]
  compute: Callable[[np.ndarray, np.ndarray], dict]


def tag(cfg_scale: float, metric: str) -> str:
  """The metrics.jsonl / TensorBoard name of a metric at a guidance scale, e.g. `eval/cfg1/fid`."""
  return f"eval/cfg{cfg_scale:g}/{metric}"


def run_schedule(loss_cfg, state) -> schedule_lib.Schedule:
  """The schedule a run samples with at `state`: its config's (`loss.delta_t`, `loss.schedule`), a learned one with
  its parameters from the train state."""
  learned = loss_cfg.schedule.kind == "learned"
  return schedule_lib.from_config(loss_cfg, state.schedule_raw if learned else None)


def check(cfg) -> None:
  """What the numeric ranges of `config.check_values` cannot say about the eval group."""
  c = cfg.eval
  if c.features not in FEATURES:
    raise UserError(f"config.eval.features={c.features!r} is not one of {FEATURES}")
  if c.method not in sampler.METHODS:
    raise UserError(f"config.eval.method={c.method!r} is not one of {sampler.METHODS}")
  scales = tuple(c.cfg_scales)
  if not scales or any(isinstance(s, bool) or not isinstance(s, (int, float)) or s < 1 for s in scales):
    raise UserError(f"config.eval.cfg_scales={c.cfg_scales!r} must be guidance scales ≥ 1 (1: unguided), e.g. "
                    "(1.0, 1.5)")
  if len(set(scales)) != len(scales):
    raise UserError(f"config.eval.cfg_scales={c.cfg_scales!r} lists a scale twice")
  if not cfg.sample.texture_vae:
    raise UserError("eval_every is set but config.sample.texture_vae is empty: evaluations decode their samples "
                    "with it; give the exported texture VAE (or the official .ckpt)")


class Evaluation:
  """The periodic evaluation of one run: `due(step)`, `missed(workdir, step)`, and `self(state, step, writer)`."""

  def __init__(self, cfg, model, texture_stats, metrics: Metrics, dataset_size: int = 0):
    check(cfg)
    c = self.settings = cfg.eval
    self.loss_cfg = cfg.loss
    self.every, self.total_steps = cfg.eval_every, cfg.total_steps
    self.epochs_per_step = cfg.batch_size / dataset_size if dataset_size else 0.0
    self.metrics = metrics
    self.mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    shd.check_batch_size(self.mesh, c.batch_size, "config.eval.batch_size")
    vae = extract_lib.load_encoder("texture", cfg.sample.texture_vae)
    semantic = cfg.loss.semantic_channels
    self.scales = tuple(float(scale) for scale in c.cfg_scales)
    self.generators = {}  # per guidance rule: every scale of a rule shares its compiled generator
    for scale in self.scales:
      s = self._settings(scale)
      rule = generate.guidance_of(s, None)
      if rule not in self.generators:
        self.generators[rule] = generate.make_generator(s, model, vae.model, None, semantic, "both", c.num_samples)
    mean, std = (np.asarray(texture_stats["texture"][k], np.float32) for k in ("mean", "std"))
    self.fixed = jax.device_put((None, vae.variables, mean, std), shd.replicated(self.mesh))
    indices = np.arange(c.num_samples)
    self.indices = np.resize(indices, -(-len(indices) // c.batch_size) * c.batch_size)  # the last batch repeats

  def _settings(self, cfg_scale: float) -> generate.Settings:
    c = self.settings
    return generate.Settings(model="", vae="", stats="", out="", num_images=c.num_samples, batch_size=c.batch_size,
                             seed=c.seed, labels="balanced", method=c.method, num_steps=c.num_steps, shift=c.shift,
                             rtol=c.rtol, atol=c.atol, cfg_scale=cfg_scale, cfg_interval_start=c.cfg_interval_start)

  def due(self, step: int) -> bool:
    return bool(self.every) and step > 0 and (step % self.every == 0 or step == self.total_steps)

  def missed(self, workdir, step: int) -> bool:
    """Whether `step` is due but its evaluation is not in metrics.jsonl (it was interrupted after the step's
    checkpoint was written). Process 0 reads the log; every process gets its answer."""
    missing = False
    if self.due(step) and jax.process_index() == 0:
      path = epath.Path(workdir) / "metrics.jsonl"
      missing = not (path.exists() and any(r["step"] == step and SECONDS in r for r in metrics_lib.read_jsonl(path)))
    if jax.process_count() > 1:
      missing = bool(multihost_utils.broadcast_one_to_all(np.int32(missing)))
    return missing

  @property
  def tags(self) -> tuple[str, ...]:
    """Every metric an evaluation logs (TensorBoard's hparams table shows them beside each run's config)."""
    return (*(tag(s, k) for s in self.scales for k in (*self.metrics.names, "model_calls")), SECONDS)

  def sample(self, ema_params, cfg_scale: float, schedule: schedule_lib.Schedule | None = None
             ) -> tuple[np.ndarray, np.ndarray, float]:
    """(uint8 images, labels, model calls per batch on average) of the evaluation's samples at a scale, with
    `schedule` (`run_schedule`; None: the config's, which a learned schedule cannot be: its parameters are in the
    train state)."""
    if schedule is None:
      if self.loss_cfg.schedule.kind == "learned":
        raise ValueError("a learned schedule's parameters are in the train state: pass run_schedule(cfg.loss, state)")
      schedule = schedule_lib.from_config(self.loss_cfg)
    s, size = self._settings(float(cfg_scale)), self.settings.batch_size
    generator, scales = self.generators[generate.guidance_of(s, None)], generate.guidance_scales(s)
    images, labels, calls = [], [], []
    for start in range(0, len(self.indices), size):
      rows = self.indices[start:start + size][shd.host_rows(self.mesh, size)]
      out = shd.to_host(generator(schedule, scales, {"params": ema_params}, *self.fixed,
                                  shd.shard_batch(self.mesh, rows)))
      images.append(out[0])
      labels.append(out[1])
      calls.append(float(out[2]))
    n = self.settings.num_samples
    return np.concatenate(images)[:n], np.concatenate(labels)[:n], float(np.mean(calls))

  def __call__(self, state, step: int, writer) -> dict:
    """Evaluates the EMA weights of `state`, logs the metrics at `step` and returns them."""
    tick = time.perf_counter()
    record = {}
    schedule = run_schedule(self.loss_cfg, state)
    for scale in self.scales:
      images, labels, calls = self.sample(state.ema_params, scale, schedule)
      metrics = {**self.metrics.compute(images, labels), "model_calls": calls}
      record.update({tag(scale, k): float(v) for k, v in metrics.items()})
    record[SECONDS] = time.perf_counter() - tick
    if self.epochs_per_step:
      record["epoch"] = step * self.epochs_per_step
    writer.write_scalars(step, record)
    shown = ", ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in record.items()
                      if k.startswith("eval/cfg") and not k.endswith("/model_calls"))
    say(f"evaluation at step {step}: {shown} ({record[SECONDS]:.1f} s)")
    return record


def inception_metrics(cfg, mesh) -> Metrics:
  """FID, sFID, Inception Score, precision and recall against the ADM reference batch `eval.reference`, with the
  FID Inception `eval.inception` (the ADM evaluator's formulas, as `cli.evaluate`; FID's trace by `eigh`, the
  same value as its Schur method to ~1e-9 and ten times faster on a host CPU). The reference's own features,
  which precision and recall need, are computed at the first evaluation and kept."""
  from sfd_jax.convert.inception import load_inception
  from sfd_jax.eval.features import FeatureExtractor
  from sfd_jax.eval.fid import frechet_distance, statistics
  from sfd_jax.eval.inception_score import inception_score
  from sfd_jax.eval.precision_recall import precision_recall
  from sfd_jax.eval.reference import read_reference
  c = cfg.eval
  if not c.reference:
    raise UserError("eval_every is set with eval.features='inception' but config.eval.reference is empty: give an "
                    "ADM reference batch (.npz; `python -m sfd_jax.cli.evaluate --write_ref` writes one)")
  reference = read_reference(c.reference)
  extractor = FeatureExtractor(*load_inception(c.inception or None), mesh,
                               per_device_batch=max(c.batch_size // mesh.devices.size, 1))
  kept = {}

  def compute(images, labels):
    del labels
    if reference.images is not None and "acts" not in kept:
      kept["acts"] = extractor(reference.images, desc="reference features (once)")
    ref_acts = kept.get("acts")
    acts = extractor(ArrayImages(images), desc="evaluation features")
    pool = reference.stats if reference.stats is not None else statistics(ref_acts.pool)
    spatial = reference.spatial_stats if reference.spatial_stats is not None else statistics(ref_acts.spatial)
    out = {"fid": frechet_distance(statistics(acts.pool), pool, method="eigh"),
           "sfid": frechet_distance(statistics(acts.spatial), spatial, method="eigh"),
           "inception_score": inception_score(acts.logits)[0]}
    if ref_acts is not None:
      pr = precision_recall(ref_acts.pool, acts.pool)
      out.update(precision=pr.precision, recall=pr.recall)
    return out

  names = ("fid", "sfid", "inception_score") + (("precision", "recall") if reference.images is not None else ())
  return Metrics(names, compute)


def for_run(cfg, model, texture_stats, task_metrics: Metrics | None = None, dataset_size: int = 0):
  """The run's `Evaluation`, or None when `eval_every` is 0. `task_metrics` are the task's own metrics, used with
  `eval.features='task'`."""
  if not cfg.eval_every:
    return None
  check(cfg)
  if cfg.eval.features == "task":
    if task_metrics is None:
      raise UserError("config.eval.features='task' needs metrics from the program that builds the task (the demo "
                      "passes its classifier's); with `cli.train` use 'inception' and an ADM reference batch")
    metrics = task_metrics
  else:
    metrics = inception_metrics(cfg, shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp))
  return Evaluation(cfg, model, texture_stats, metrics, dataset_size)
