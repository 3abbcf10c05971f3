"""Evaluation during training, through `cli.train` in subprocesses: a run killed during an evaluation redoes it on
resume and logs every evaluation exactly once; the logged metrics are those `cli.sample` + `cli.evaluate` give for
the same checkpoint; bad eval settings are one clear message.

The smoke model decodes with a random tiny texture VAE (8 × 8 images) and is scored by the real FID Inception
architecture with random weights against a reference batch of random images; FIDs use `eigh`.
"""
import json
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sfd_jax.convert import export
from sfd_jax.convert.inception import inception_to_torch
from sfd_jax.models.inception import InceptionV3
from sfd_jax.models.texture_vae import AutoencoderKL
from sfd_jax.training import evaluation
from tests.golden import REPO, subprocess_env

SMOKE = str(REPO / "configs" / "smoke.py")
METRICS = ("fid", "sfid", "inception_score", "precision", "recall")
SAMPLES, EULER_STEPS = 8, 3


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A texture VAE for the smoke model's 32 texture channels, random FID Inception weights (a .npz state dict, no
  torch needed), an images-only reference batch, and the synthetic latents' texture stats."""
  root = tmp_path_factory.mktemp("eval_files")
  vae = AutoencoderKL(ch=32, ch_mult=(1, 1), num_res_blocks=0, attn_resolutions=(), resolution=8, z_channels=32,
                      embed_dim=32)
  export.save_model(root / "vae", vae, {"params": vae.init(jax.random.key(0), np.zeros((1, 8, 8, 3)))["params"]})
  model = InceptionV3()
  template = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())
  rng = np.random.default_rng(0)

  def init(key_path, leaf):  # He-normal convolutions, identity BatchNorm: O(1) features
    if key_path[-1].key == "kernel":
      return rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
    return (np.ones if key_path[-1].key in ("scale", "var") else np.zeros)(leaf.shape, np.float32)
  np.savez(root / "inception.npz", **inception_to_torch(model, jax.tree_util.tree_map_with_path(init, template)))
  images = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
  images[:8] //= 3  # two kinds of image, so features spread out
  np.savez(root / "ref.npz", arr_0=images)
  (root / "stats.json").write_text(json.dumps({"texture": {"mean": [0.5] * 32, "std": [2.0] * 32}}))  # the
  # synthetic latents' (data.latents.SyntheticLatents)
  return root


def _overrides(files, *extra):
  return ("total_steps=30", "log_every=5", "ckpt_every=10", "sample_every=0", "eval_every=10",
          f"sample.texture_vae={files / 'vae'}", f"eval.reference={files / 'ref.npz'}",
          f"eval.inception={files / 'inception.npz'}", f"eval.num_samples={SAMPLES}", f"eval.batch_size={SAMPLES}",
          "eval.method=euler", f"eval.num_steps={EULER_STEPS}", *extra)


def _command(workdir, overrides):
  return [sys.executable, "-m", "sfd_jax.cli.train", f"--config={SMOKE}", f"--workdir={workdir}",
          *[f"--config.{o}" for o in overrides]]


def _train(workdir, overrides, check=True):
  result = subprocess.run(_command(workdir, overrides), env=subprocess_env(), capture_output=True, text=True,
                          timeout=900)
  if check:
    assert result.returncode == 0, result.stderr[-3000:]
  return result


def _records(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _run(*args):
  result = subprocess.run([sys.executable, "-m", *args], env=subprocess_env(), capture_output=True, text=True,
                          timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.mark.slow  # five trainings, samplings and evaluations in subprocesses (about 3 minutes on 2 cores)
def test_an_evaluation_killed_midway_is_redone_once_and_matches_cli_evaluate(files, tmp_path):
  workdir = tmp_path / "run"
  overrides = _overrides(files)
  # A hard kill (SIGKILL, as when a preempted VM's grace period ends) during the evaluation of step 20, once the
  # checkpoint of step 20 is complete.
  worker = subprocess.Popen(_command(workdir, overrides), env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
  for line in worker.stdout:
    if line.startswith("step 20/30"):
      break
  deadline = time.time() + 300
  while not (workdir / "checkpoints" / "20").is_dir() and time.time() < deadline:
    time.sleep(0.02)
  worker.send_signal(signal.SIGKILL)
  worker.wait(timeout=60)
  logged = {r["step"] for r in _records(workdir) if evaluation.SECONDS in r}
  assert logged == {10}, logged  # the kill came during the evaluation of step 20
  resumed = _train(workdir, overrides)
  assert "resumed from step 20" in resumed.stdout, resumed.stdout
  assert "the evaluation of step 20 was interrupted before it was logged: evaluating again" in resumed.stdout
  records = _records(workdir)
  assert [r["step"] for r in records if evaluation.SECONDS in r] == [10, 20, 30]
  assert [r["step"] for r in records if "loss" in r] == [5, 10, 15, 20, 25, 30]
  final = next(r for r in records if r["step"] == 30 and evaluation.SECONDS in r)
  assert final["epoch"] == pytest.approx(30 * 16 / 256)  # smoke: batch 16, 256 synthetic records
  assert final["eval/cfg1/model_calls"] == EULER_STEPS - 1
  # The same images and metrics from the user's commands: sample the checkpoint, evaluate the samples.
  samples = tmp_path / "samples"
  _run("sfd_jax.cli.sample", f"--model={workdir}", f"--vae={files / 'vae'}", f"--stats={files / 'stats.json'}",
       f"--out={samples}", f"--num_images={SAMPLES}", f"--batch_size={SAMPLES}", "--method=euler",
       f"--num_steps={EULER_STEPS}", "--seed=0")
  _run("sfd_jax.cli.evaluate", f"--ref={files / 'ref.npz'}", f"--samples={samples / 'samples.npz'}",
       f"--inception={files / 'inception.npz'}", "--fid_method=eigh", f"--per_device_batch={SAMPLES}",
       f"--out={tmp_path / 'report.json'}")
  report = json.loads((tmp_path / "report.json").read_text())["metrics"]
  assert report["fid"] > 1 and 0 < report["recall"] < 1  # the check below compares real numbers
  for name in METRICS:
    assert final[f"eval/cfg1/{name}"] == pytest.approx(report[name], rel=1e-4, abs=1e-6), name
  # A run whose last evaluation was lost (killed once the final checkpoint was written) evaluates it on the next
  # start, once, and trains nothing.
  kept = [r for r in records if not (r["step"] == 30 and evaluation.SECONDS in r)]
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
  again = _train(workdir, overrides)
  assert "evaluation at step 30:" in again.stdout and "step 30/30" not in again.stdout, again.stdout
  timeless = lambda rs: [{k: v for k, v in r.items() if k != evaluation.SECONDS} for r in rs]
  assert timeless(_records(workdir)) == timeless(records)


@pytest.mark.parametrize("override, expected", [
    ("sample.texture_vae=", "error: eval_every is set but config.sample.texture_vae is empty"),
    ("eval.features=incpetion", "error: config.eval.features='incpetion' is not one of ('inception', 'task')"),
    ("eval.features=task", "error: config.eval.features='task' needs metrics from the program"),
    ("eval.reference=", "error: eval_every is set with eval.features='inception' but config.eval.reference is empty"),
    ("eval.cfg_scales=(1.0,0.5)", "error: config.eval.cfg_scales=(1.0, 0.5) must be guidance scales ≥ 1"),
    ("eval.num_samples=2", "error: config.eval.num_samples=2 must be at least 4"),
])
def test_bad_eval_settings_are_one_clear_message(files, tmp_path, override, expected):
  result = _train(tmp_path, _overrides(files, override), check=False)
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith(expected), result.stderr[-1000:]
