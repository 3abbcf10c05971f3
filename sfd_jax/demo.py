"""The built-in demo: the whole SFD pipeline on scikit-learn's handwritten digits, offline, on a CPU, in minutes.

Every stage goes through the library's real code paths and resumes when run again (a finished stage's output is
reused, an unfinished training run continues from its checkpoint):

1. texture VAE: a small LDM `AutoencoderKL` (f2) trained on the digits (MSE + KL) by the training loop;
2. semantic encoder: a small DINOv2-architecture ViT trained as a digit classifier; its final-norm patch tokens
   are the semantic features (as DINOv2's are for ImageNet), and the classifier later judges the samples;
3. SemVAE: trained on those tokens (`training.semvae`, the same task as for DINOv2-B);
4. extraction: images → texture latents, DINO tokens, semantic latents, in the latent dataset format;
5. SFD: a small LightningDiT with REPA trained on those latents (`training.tasks.sfd_task`), once with the
   semantic lead Δ and once with Δ = 0 (synchronous), for the same steps;
   Both runs are evaluated during training (`training.evaluation`, every `eval.every` steps and at the end): the
   same Dopri5 samples of every class, unguided and with classifier-free guidance, decoded by the texture VAE,
   scored by the classifier (the class accuracy of the samples, and the Fréchet distance between classifier
   features of samples and held-out digits), with the model calls per sample;
6. results: the convergence table (both metrics against step, for both runs), `convergence.png`, the final
   numbers, a grid of samples per run (named by run and Δ; drawn again only when its run trained further) and
   `results.json`.

The commands it prints next run with the interpreter that runs it (`.venv/bin/python` from the repository root).
"""
from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from PIL import Image, ImageDraw

from sfd_jax import generate, plots, sharding as shd
from sfd_jax.convert import export
from sfd_jax.data import extract as extract_lib, images as images_lib, latents as latents_lib
from sfd_jax.errors import UserError
from sfd_jax.eval import fid
from sfd_jax.models.dinov2 import DINOv2, preprocess_repa
from sfd_jax.models.layers import posterior_sample
from sfd_jax.models.texture_vae import AutoencoderKL
from sfd_jax.training import (
  checkpoint as ckpt_lib,
  config as config_lib,
  evaluation,
  loop,
  metrics as metrics_lib,
  semvae as semvae_lib,
  tasks,
)

NUM_CLASSES = 10
GRID_TITLE_HEIGHT = 14  # pixels above a sample grid for the line naming its run


# ---------------------------------------------------------------------------------------------------------- config

def demo_config(quick: bool = False) -> ml_collections.ConfigDict:
  """Sizes and steps of every stage; `quick` (the CI run) trains each stage briefly."""
  steps = (lambda full, fast: fast if quick else full)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.resolution = 16                     # digits (8×8 originals) upscaled to 16 px RGB; an f2 texture VAE gives 8×8
  c.heldout_images = 297                # of the 1,797 digits: the rest trains every stage
  c.batch_size = 32
  c.texture_vae = dict(model=dict(ch=32, ch_mult=(1, 1), num_res_blocks=0, attn_resolutions=(), resolution=16,
                                  z_channels=4, embed_dim=4),
                       kl_weight=1e-5, lr=2e-3, steps=steps(600, 100))
  c.classifier = dict(model=dict(image_size=16, patch_size=2, hidden_size=64, depth=3, num_heads=4, num_registers=4,
                                 layerscale_init=0.1),
                      lr=1e-3, steps=steps(600, 150))
  c.semvae = dict(model=dict(latent_channels=4, hidden_size=64, encoder_depth=1, decoder_depth=1, num_heads=2),
                  lr=1e-3, kl_weight=1e-6, steps=steps(500, 60))
  c.sfd = dict(model=dict(hidden_size=64, depth=2, num_heads=2, repa_depth=1, repa_projector_dim=64),
               lr=2e-3, ema_decay=steps(0.995, 0.95), delta_t=0.3, steps=steps(1600, 350))
  # The convergence study: both SFD runs are evaluated every `every` steps and at the end on the same samples
  # (`per_class` of each class from fixed noise), unguided and with classifier-free guidance (`cfg_scales`).
  c.eval = dict(every=steps(320, 125), per_class=steps(20, 5), cfg_scales=(1.0, 2.0), rtol=1e-3, atol=1e-6,
                grid_per_class=steps(10, 5))
  c.lock()
  return c


def _stage_config(cfg, steps: int, lr: float, ema_decay: float = 0.999) -> ml_collections.ConfigDict:
  """A training-loop config for one stage: the base recipe with the demo's batch, steps and learning rate."""
  c = config_lib.base_config()
  c.seed, c.batch_size, c.total_steps = cfg.seed, cfg.batch_size, steps
  c.optim.update(lr=lr, ema_decay=ema_decay)
  c.log_every, c.ckpt_every, c.sample_every = max(steps // 5, 1), steps, 0  # the demo samples at its end
  return c


def _trained_params(workdir: Path, model):
  """The raw (not EMA) params of the newest readable checkpoint of a stage's run."""
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints")
  try:
    return checkpointer.readable_params(lambda config: model, which="params")[2]
  finally:
    checkpointer.close()


# ------------------------------------------------------------------------------------------------- the small models

class DigitClassifier(nn.Module):
  """A DINOv2-architecture ViT and a linear head on [cls | mean patch token]: trained to tell the digits apart, its
  patch tokens become the demo's semantic features, and it scores the generated digits."""
  dino_fields: tuple  # the DINOv2 fields as (name, value) pairs
  num_classes: int = NUM_CLASSES

  def setup(self):
    self.dino = DINOv2(**dict(self.dino_fields))
    self.head = nn.Dense(self.num_classes)

  def features(self, images):
    """uint8 NHWC images → (B, 2D) features, preprocessed as `repa_features` preprocesses them."""
    out = self.dino(preprocess_repa(images, self.dino.image_size))
    return jnp.concatenate([out["cls_token"], out["patch_tokens"].mean(axis=1)], axis=-1)

  def __call__(self, images):
    features = self.features(images)
    return self.head(features), features

  def dummy_inputs(self, batch: int = 1):
    size = dict(self.dino_fields)["image_size"]
    return (jnp.zeros((batch, size, size, 3), jnp.uint8),)


def texture_vae_loss_fn(vae: AutoencoderKL, kl_weight: float):
  """MSE of the reconstruction from a posterior sample + kl_weight · KL (summed per image, as LDM)."""
  def loss_fn(params, batch, rng, positions):
    x = batch["image"].astype(jnp.float32) / 127.5 - 1.0
    mean, logvar = vae.apply({"params": params}, x, method=vae.encode)
    keys = jax.vmap(lambda p: jax.random.fold_in(rng, p))(positions)
    z = jax.vmap(lambda m, lv, k: posterior_sample(m, lv, k))(mean, logvar, keys)
    recon = vae.apply({"params": params}, z, method=vae.decode)
    mse = jnp.mean((recon - x) ** 2)
    kl = jnp.mean(0.5 * jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))
    return mse + kl_weight * kl, {"loss": mse + kl_weight * kl, "loss_mse": mse, "loss_kl": kl}
  return loss_fn


def classifier_loss_fn(model: DigitClassifier):
  def loss_fn(params, batch, rng, positions):
    del rng, positions
    logits, _ = model.apply({"params": params}, batch["image"])
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]))
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return ce, {"loss": ce, "loss_ce": ce, "accuracy": accuracy}
  return loss_fn


# --------------------------------------------------------------------------------------------------------- stages

@dataclasses.dataclass
class Demo:
  """The demo's data, directories and settings; each stage method returns what later stages need."""
  cfg: ml_collections.ConfigDict
  out: Path

  def __post_init__(self):
    self.out = Path(self.out)
    self.digits = images_lib.DigitsImages(self.cfg.resolution)
    train, heldout = images_lib.heldout_split(len(self.digits), self.cfg.heldout_images, self.cfg.seed)
    self.train_images = images_lib.Subset(self.digits, train)
    self.heldout_images = images_lib.Subset(self.digits, heldout)

  def _images_task(self, model, loss_fn, stage_cfg):
    def make_data(rows, start_step):
      return images_lib.image_pipeline(self.train_images, global_batch_size=stage_cfg.batch_size,
                                       seed=stage_cfg.seed, resolution=self.cfg.resolution, crop="center",
                                       rows=rows, start_batch=start_step, prefetch=2)
    return loop.Task(model=model, loss_fn=loss_fn, make_data=make_data, dataset_size=len(self.train_images))

  def _train_and_export(self, name, model, loss_fn, stage_cfg, export_model, select=lambda p: p):
    """Trains `model` on the training digits (resuming), then exports `select(params)` as `export_model`."""
    done = self.out / name / "model.json"
    if done.exists():
      return self.out / name
    workdir = self.out / "runs" / name
    loop.run(stage_cfg, workdir, self._images_task(model, loss_fn, stage_cfg))
    params = _trained_params(workdir, model)
    return export.save_model(self.out / name, export_model, {"params": select(params)})

  def texture_vae(self) -> Path:
    c = self.cfg.texture_vae
    vae = AutoencoderKL(**c.model)
    return self._train_and_export("texture_vae", vae, texture_vae_loss_fn(vae, c.kl_weight),
                                  _stage_config(self.cfg, c.steps, c.lr), vae)

  def classifier(self) -> tuple[DigitClassifier, dict, Path]:
    """(classifier, its params, the exported DINOv2 part)."""
    c = self.cfg.classifier
    model = DigitClassifier(tuple(sorted(c.model.items())))
    dino_dir = self._train_and_export("dino", model, classifier_loss_fn(model), _stage_config(self.cfg, c.steps, c.lr),
                                      DINOv2(**c.model), select=lambda p: p["dino"])
    workdir = self.out / "runs" / "dino"
    return model, _trained_params(workdir, model), dino_dir

  def semvae(self, dino_dir: Path) -> Path:
    done = self.out / "semvae"
    if (done / "model.json").exists():
      return done
    c = self.cfg.semvae
    scfg = semvae_lib.base_config()
    scfg.unlock()
    scfg.model.update(c.model, dtype="float32")
    scfg.dino.path = str(dino_dir)
    scfg.data.update(images="digits", digits_size=self.cfg.resolution, resize=self.cfg.resolution,
                     resolution=self.cfg.resolution, heldout_images=self.cfg.heldout_images, prefetch=2)
    scfg.loss.kl_weight = c.kl_weight
    scfg.optim.update(lr=c.lr, schedule="constant", warmup_steps=0, weight_decay=0.0)
    scfg.update(seed=self.cfg.seed, batch_size=self.cfg.batch_size, total_steps=c.steps, eval_batch_size=33,
                log_every=max(c.steps // 5, 1), ckpt_every=c.steps, sample_every=c.steps)
    scfg.lock()
    training = semvae_lib.prepare(scfg)
    loop.run(scfg, self.out / "runs" / "semvae", training.task())
    return training.export(self.out / "runs" / "semvae", done)

  def extract(self, texture_dir: Path, dino_dir: Path, semvae_dir: Path) -> Path:
    encoders = {kind: extract_lib.load_encoder(kind, path)
                for kind, path in (("texture", texture_dir), ("dino", dino_dir), ("semvae", semvae_dir))}
    settings = extract_lib.Settings(resolution=self.cfg.resolution, shard_size=500, seed=self.cfg.seed,
                                    batch_size=50, num_threads=2)
    extract_lib.extract(self.train_images, encoders, self.out / "latents", settings, progress=False)
    return self.out / "latents"

  def sfd_config(self, delta_t: float, evaluate: bool = False) -> ml_collections.ConfigDict:
    """The SFD stage's training config; with `evaluate`, the convergence study's evaluations (which need the
    classifier's metrics: `sfd`)."""
    c, texture = self.cfg.sfd, self.cfg.texture_vae.model
    grid = self.cfg.resolution // self.cfg.classifier.model.patch_size
    scfg = _stage_config(self.cfg, c.steps, c.lr, c.ema_decay)
    scfg.model = config_lib.model_config(
        "S", input_size=grid, in_channels=texture.embed_dim + self.cfg.semvae.model.latent_channels,
        num_classes=NUM_CLASSES, repa_z_dim=self.cfg.classifier.model.hidden_size, **c.model)
    scfg.loss.update(delta_t=delta_t, semantic_channels=self.cfg.semvae.model.latent_channels)
    scfg.data.update(path=str(self.out / "latents"), flip=False, prefetch=2)  # a mirrored digit is no digit
    if evaluate:
      e, samples = self.cfg.eval, self.cfg.eval.per_class * NUM_CLASSES
      scfg.eval_every = e.every
      scfg.sample.texture_vae = str(self.out / "texture_vae")
      scfg.eval.update(features="task", num_samples=samples, batch_size=samples, cfg_scales=tuple(e.cfg_scales),
                       method="dopri5", rtol=e.rtol, atol=e.atol, seed=self.cfg.seed + 1)
    return scfg

  def sfd(self, name: str, delta_t: float, metrics: evaluation.Metrics) -> evaluation.Evaluation:
    """Trains (or resumes) one SFD run, evaluated with `metrics` as it goes; returns its evaluation."""
    scfg = self.sfd_config(delta_t, evaluate=True)
    task = tasks.sfd_task(scfg, metrics)
    loop.run(scfg, self.out / "runs" / name, task)
    return task.evaluate


# -------------------------------------------------------------------------------------------------------- scoring

def classifier_metrics(classifier: DigitClassifier, params, real_features: np.ndarray) -> evaluation.Metrics:
  """The demo's evaluation metrics: the Fréchet distance between classifier features of the samples and of the
  held-out digits (FID's formula on this network's features), and the class accuracy of the samples."""
  apply = jax.jit(classifier.apply)
  reference = fid.statistics(real_features.astype(np.float64))

  def compute(images, labels):
    logits, features = jax.device_get(apply({"params": params}, images))
    return {"fd": fid.frechet_distance(fid.statistics(features.astype(np.float64)), reference, method="eigh"),
            "class_accuracy": float(np.mean(np.argmax(logits, -1) == np.asarray(labels)))}
  return evaluation.Metrics(("fd", "class_accuracy"), compute)


def write_grid(demo: Demo, name: str, delta_t: float, evaluate: evaluation.Evaluation, cfg_scale: float) -> Path:
  """`grid_<name>.png`: the run's final EMA weights sampled as its evaluations sample (the same noise), the ten
  classes along the columns, under a title naming the run, its Δ and the guidance."""
  model, variables, stored = generate.load_training_run(demo.out / "runs" / name)
  params = jax.device_put(variables["params"], shd.replicated(evaluate.mesh))  # as in training: no recompiling
  images, labels, _ = evaluate.sample(params, cfg_scale, generate.sampling_schedule(stored, model))
  rows = demo.cfg.eval.grid_per_class
  per_class = [images[labels == k][:rows] for k in range(NUM_CLASSES)]
  grid = np.concatenate([np.stack(row) for row in zip(*per_class)])  # each row holds the ten classes in order
  path = demo.out / f"grid_{name}.png"
  picture = generate.demo_grid(grid, np.tile(np.arange(NUM_CLASSES), rows), NUM_CLASSES)
  titled = Image.new("RGB", (picture.width, picture.height + GRID_TITLE_HEIGHT), "white")
  titled.paste(picture, (0, GRID_TITLE_HEIGHT))
  title = f"{name} (delta_t = {delta_t:g}), {_scale_name(cfg_scale)}, EMA weights of step {demo.cfg.sfd.steps}"
  ImageDraw.Draw(titled).text((2, 2), title, fill="black")  # ASCII: PIL's built-in fonts have no Δ
  titled.save(path)
  return path


def _scale_name(cfg_scale: float) -> str:
  return "unguided" if cfg_scale == 1 else f"CFG {cfg_scale:g}"


def evaluations(run: Path, cfg_scales) -> list[dict]:
  """A run's evaluations from its metrics.jsonl: per evaluated step, FD, class accuracy and model calls per
  guidance scale, and what the evaluation cost."""
  rows = []
  for r in metrics_lib.read_jsonl(run / "metrics.jsonl"):
    if evaluation.SECONDS in r:
      row = {"step": r["step"], "epoch": round(r.get("epoch", 0.0), 2), "seconds": round(r[evaluation.SECONDS], 1)}
      for scale in cfg_scales:
        row[_scale_name(scale)] = {k: r[evaluation.tag(scale, k)] for k in ("fd", "class_accuracy", "model_calls")}
      rows.append(row)
  return rows


def real_features(demo: Demo, classifier: DigitClassifier, params) -> tuple[np.ndarray, float]:
  """Classifier features and accuracy of the held-out digits (the FD reference, and the classifier's quality)."""
  images = np.stack([demo.heldout_images[i]["image"] for i in range(len(demo.heldout_images))])
  labels = np.asarray([demo.heldout_images[i]["label"] for i in range(len(demo.heldout_images))])
  logits, features = jax.device_get(jax.jit(classifier.apply)({"params": params}, images))
  return features, float(np.mean(np.argmax(logits, -1) == labels))


# ------------------------------------------------------------------------------------------------------------ run

def run(out, quick: bool = False) -> dict:
  """Runs (or resumes) every stage; returns the results and writes them to `<out>/results.json`.

  A stage finished by an earlier run is reused and says so; results.json keeps that run's time for it, and the
  time of this run (`this_run_s`) apart.
  """
  if jax.process_count() > 1:
    raise UserError("the demo runs in one process; use the training and extraction commands on a pod")
  start = time.perf_counter()
  demo = Demo(demo_config(quick), Path(out))
  demo.out.mkdir(parents=True, exist_ok=True)
  results_path = demo.out / "results.json"
  earlier = json.loads(results_path.read_text()).get("timings_s", {}) if results_path.exists() else {}
  timings, reused = {}, []
  runs, scales = {"sfd": demo.cfg.sfd.delta_t, "sync": 0.0}, tuple(demo.cfg.eval.cfg_scales)
  count = 5 + len(runs)  # four preparation stages, the SFD runs, the grids

  def stage(name, again: bool, fn, *args):
    tick = time.perf_counter()
    print(f"== stage {len(timings) + 1}/{count}, {name}" + (": reused (finished by an earlier run)" if again else "")
          + f" (at {tick - start:.0f} s)", flush=True)
    result = fn(*args)
    if again:
      reused.append(name)
    timings[name] = earlier[name] if again and name in earlier else round(time.perf_counter() - tick, 1)
    return result

  texture_dir = stage("texture VAE", (demo.out / "texture_vae" / "model.json").exists(), demo.texture_vae)
  classifier, classifier_params, dino_dir = stage("semantic encoder (DINOv2-architecture classifier)",
                                                  (demo.out / "dino" / "model.json").exists(), demo.classifier)
  semvae_dir = stage("SemVAE", (demo.out / "semvae" / "model.json").exists(), demo.semvae, dino_dir)
  stage("extraction", (demo.out / "latents" / latents_lib.NAME / latents_lib.VERSION / "stats.json").exists(),
        demo.extract, texture_dir, dino_dir, semvae_dir)
  reference, heldout_accuracy = real_features(demo, classifier, classifier_params)
  metrics = classifier_metrics(classifier, classifier_params, reference)
  evaluators, trained = {}, []
  for name, delta_t in runs.items():
    finished = (demo.out / "runs" / name / "checkpoints" / str(demo.cfg.sfd.steps)).exists()
    evaluators[name] = stage(f"{'SFD' if delta_t else 'synchronous'} training (Δ = {delta_t}), evaluated every "
                             f"{demo.cfg.eval.every} steps", finished, demo.sfd, name, delta_t, metrics)
    if not finished:
      trained.append(name)
  guided = max(scales)
  redraw = [name for name in runs if name in trained or not (demo.out / f"grid_{name}.png").exists()]
  stage("sample grids", not redraw,
        lambda: [write_grid(demo, name, runs[name], evaluators[name], guided) for name in redraw])
  results = {"quick": quick, "classifier_heldout_accuracy": heldout_accuracy, "cfg_scales": list(scales),
             "samples_per_evaluation": demo.cfg.eval.per_class * NUM_CLASSES, "runs": {}}
  for name, delta_t in runs.items():
    rows = evaluations(demo.out / "runs" / name, scales)
    final = rows[-1][_scale_name(guided)]
    calls = int(round(final["model_calls"]))
    results["runs"][name] = {"delta_t": delta_t, "step": rows[-1]["step"], "class_accuracy": final["class_accuracy"],
                             "fd_classifier_features": final["fd"], "model_calls_per_sample": calls,
                             "network_passes_per_sample": 2 * calls if guided > 1 else calls,
                             "evaluations": rows}
  convergence_png = plots.draw_runs(
      {f"{name} (Δ = {delta_t})": metrics_lib.read_jsonl(demo.out / "runs" / name / "metrics.jsonl")
       for name, delta_t in runs.items()},
      [(f"{title}, {_scale_name(scale)}", evaluation.tag(scale, key)) for key, title in
       (("fd", "FD of classifier features ↓"), ("class_accuracy", "class accuracy ↑")) for scale in scales],
      demo.out / "convergence.png")
  results["timings_s"] = {**timings, "total": round(sum(timings.values()), 1)}
  results["reused_stages"] = reused
  results["this_run_s"] = round(time.perf_counter() - start, 1)
  results_path.write_text(json.dumps(results, indent=1))
  print(table(results), flush=True)
  print(convergence_table(results), flush=True)
  print(f"wrote {convergence_png}", flush=True)
  print(f"compare the runs' curves:\n  {plot_command(demo.out)}", flush=True)
  print(f"sample from the trained SFD model:\n  {sample_command(demo.out)}", flush=True)
  return results


def python_command() -> str:
  """The interpreter running the demo, as the next command should name it: relative to the current directory when
  under it (`.venv/bin/python` from the repository root), which a shell without the venv activated runs too."""
  python = Path(sys.executable)
  try:
    relative = python.relative_to(Path.cwd())
  except ValueError:
    return shlex.quote(str(python))
  return shlex.quote(str(relative) if relative.parent != Path(".") else f"./{relative}")  # not a PATH lookup


def plot_command(out: Path) -> str:
  """The `cli.plot` command that draws both SFD runs' Fréchet distance into `<out>/runs/sfd/plots/`."""
  runs = " ".join(shlex.quote(str(out / "runs" / name)) for name in ("sfd", "sync"))
  return f"{python_command()} -m sfd_jax.cli.plot {runs} --metric=fd"


def sample_command(out: Path) -> str:
  """The `cli.sample` command for a grid from the demo's SFD run: every input it needs is under `out`."""
  quoted = {name: shlex.quote(str(out / name)) for name in ("runs/sfd", "texture_vae", "latents", "samples")}
  return (f"{python_command()} -m sfd_jax.cli.sample --model={quoted['runs/sfd']} --vae={quoted['texture_vae']} "
          f"--stats={quoted['latents']} --demo --num_images=20 --cfg_scale=2.0 --out={quoted['samples']}")


def table(results: dict) -> str:
  """The final evaluation of both runs, guided."""
  guided = _scale_name(max(results["cfg_scales"]))
  lines = [f"held-out accuracy of the demo classifier: {results['classifier_heldout_accuracy']:.3f} (chance 0.100)",
           f"final evaluation ({guided}, {results['samples_per_evaluation']} samples, EMA weights):",
           "| run | Δ | class accuracy ↑ | FD (classifier features) ↓ | model calls / sample |",
           "|---|---|---|---|---|"]
  for name, r in results["runs"].items():
    lines.append(f"| {name} | {r['delta_t']} | {r['class_accuracy']:.3f} | {r['fd_classifier_features']:.2f} | "
                 f"{r['model_calls_per_sample']} |")
  lines.append(f"this run took {results['this_run_s']:.0f} s")
  if results["reused_stages"]:
    reused = sum(results["timings_s"][name] for name in results["reused_stages"])
    lines[-1] += (f"; it reused {len(results['reused_stages'])} stages that took {reused:.0f} s when an earlier run "
                  "ran them")
  return "\n".join(lines)


def convergence_table(results: dict) -> str:
  """FD / class accuracy of both runs against step, unguided and guided: the convergence study."""
  runs, scales = results["runs"], [_scale_name(s) for s in results["cfg_scales"]]
  by_step = {}
  for name, r in runs.items():
    for row in r["evaluations"]:
      by_step.setdefault(row["step"], {"epoch": row["epoch"]})[name] = row
  lines = ["convergence: FD (classifier features) ↓ / class accuracy ↑ against training step",
           "| step | epoch | " + " | ".join(f"{name} {scale}" for scale in scales for name in runs) + " |",
           "|---" * (2 + len(scales) * len(runs)) + "|"]
  for step, rows in sorted(by_step.items()):
    cells = [f"{rows[name][scale]['fd']:.2f} / {rows[name][scale]['class_accuracy']:.3f}" if name in rows else "–"
             for scale in scales for name in runs]
    lines.append(f"| {step} | {rows['epoch']:.1f} | " + " | ".join(cells) + " |")
  seconds = [row["seconds"] for r in runs.values() for row in r["evaluations"]]
  lines.append(f"seconds per evaluation (both scales): {min(seconds):.1f}–{max(seconds):.1f} (the first of each "
               "run includes compiling)")
  return "\n".join(lines)
