"""The evaluation CLI end to end on the real InceptionV3 architecture with random weights.

Images are 80×96 in batches of 4 per device, as in tests/parity/test_inception.py, so the compiled network is
shared through the persistent compilation cache. FIDs use `eigh` here (a 2048² Schur decomposition costs
tens of seconds on CI's two cores); `schur` is tested against SciPy and closed forms in test_eval_metrics.py.
"""
import hashlib
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the torch extra; only the Python 3.13 tier runs without it
from PIL import Image

from sfd_jax.convert.inception import FID_WEIGHTS_NAME, inception_to_torch, load_inception
from sfd_jax.data.images import ArrayImages, open_images, read_images
from sfd_jax.eval.evaluator import evaluate
from sfd_jax.eval.features import Activations, FeatureExtractor
from sfd_jax.eval.inception_score import inception_score
from sfd_jax.eval.precision_recall import precision_recall
from sfd_jax.eval.reference import write_reference
from sfd_jax.models.inception import InceptionV3

BATCH = 4
SHAPE = (80, 96, 3)


def _random_weights(path, seed=0):
  """He-normal convolutions and identity BatchNorm: O(1) features from the real architecture."""
  model = InceptionV3()
  template = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())
  rng = np.random.default_rng(seed)

  def init(key_path, leaf):
    name = key_path[-1].key
    if name == "kernel":
      return rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
    return (np.ones if name in ("scale", "var") else np.zeros)(leaf.shape, np.float32)

  state_dict = inception_to_torch(model, jax.tree_util.tree_map_with_path(init, template))
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, path)


def _few_image_fid(x, y):
  """FID of two sets of N < D features in closed form: with centred X, Y, Σx = XᵀX/(n−1) and tr (Σx Σy)^½ is
  the nuclear norm of X Yᵀ / √((n−1)(m−1)), since X Yᵀ Y Xᵀ has the non-zero eigenvalues of Σx Σy."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  cx, cy = x - x.mean(0), y - y.mean(0)
  nx, ny = len(x) - 1, len(y) - 1
  cross = np.linalg.svd(cx @ cy.T, compute_uv=False).sum() / np.sqrt(nx * ny)
  return float(np.sum((x.mean(0) - y.mean(0)) ** 2) + np.sum(cx ** 2) / nx + np.sum(cy ** 2) / ny - 2 * cross)


def _env():
  """The subprocess shares this session's persistent compilation cache (and the settings in its keys)."""
  return {**os.environ, "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5", "JAX_PLATFORMS": "cpu",
          "JAX_DEFAULT_MATMUL_PRECISION": jax.config.jax_default_matmul_precision}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval")
  weights = root / "random_inception.pth"
  _random_weights(weights)
  rng = np.random.default_rng(0)
  ref_images = rng.integers(0, 256, (8, *SHAPE), dtype=np.uint8)
  ref_images[:4] //= 3  # two kinds of image, so features spread out
  (root / "ref_images").mkdir()
  for i, image in enumerate(ref_images):
    Image.fromarray(image).save(root / "ref_images" / f"{i:06d}.png")
  model, variables = load_inception(weights)
  extractor = FeatureExtractor(model, variables, per_device_batch=BATCH)
  return root, weights, ref_images, extractor


def _run_cli(*args):
  return subprocess.run([sys.executable, "-m", "sfd_jax.cli.evaluate", *args], capture_output=True, text=True,
                        timeout=300, env=_env())


@pytest.fixture(scope="module")
def reference(setup):
  """A reference batch written from the PNG folder (the CLI's --write_ref runs this same function)."""
  root, _, ref_images, extractor = setup
  written = write_reference(root / "ref.npz", open_images(root / "ref_images"), extractor)
  acts = extractor(ArrayImages(ref_images))
  np.testing.assert_array_equal(written.pool, acts.pool)  # PNG folder and array give the same features
  return root / "ref.npz", acts


def test_write_reference_stores_images_and_their_statistics(setup, reference):
  _, _, ref_images, _ = setup
  path, acts = reference
  assert np.std(acts.pool) > 0.01 and np.std(acts.logits) > 0.01  # random weights, real features
  with np.load(path) as f:
    assert sorted(f.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
    np.testing.assert_array_equal(f["arr_0"], ref_images)
    np.testing.assert_allclose(f["mu"], acts.pool.mean(0, dtype=np.float64), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f["sigma_s"], np.cov(acts.spatial.astype(np.float64), rowvar=False), atol=1e-5)
    assert f["sigma"].shape == (2048, 2048) and f["mu_s"].shape == (17 * 17 * 7,)


def test_evaluate_report_matches_the_library(setup, reference, tmp_path):
  root, weights, ref_images, extractor = setup
  ref_path, ref_acts = reference
  new = np.random.default_rng(1).integers(0, 256, (3, *SHAPE), dtype=np.uint8)
  samples = np.concatenate([ref_images[[6, 1, 2, 7, 4]], new])  # 5 reference images and 3 new ones
  np.savez(tmp_path / "samples.npz", arr_0=samples)
  result = _run_cli(f"--ref={ref_path}", f"--samples={tmp_path / 'samples.npz'}", f"--inception={weights}",
                    f"--per_device_batch={BATCH}", "--fid_method=eigh", "--nocheck_reference")
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads((tmp_path / "samples_eval.json").read_text())
  printed = dict(line.split(": ") for line in result.stdout.splitlines() if ": " in line)
  assert float(printed["FID"]) == report["metrics"]["fid"] and float(printed["Recall"]) == report["metrics"]["recall"]

  acts = extractor(ArrayImages(samples))
  m = report["metrics"]
  assert m["fid"] == pytest.approx(_few_image_fid(acts.pool, ref_acts.pool), rel=1e-6)
  assert m["sfid"] == pytest.approx(_few_image_fid(acts.spatial, ref_acts.spatial), rel=1e-6)
  assert m["fid"] > 1e-3 and m["sfid"] > 1e-3
  assert m["inception_score"] == pytest.approx(inception_score(acts.logits)[0], rel=1e-5)
  pr = precision_recall(ref_acts.pool, acts.pool)
  assert (m["precision"], m["recall"]) == (pr.precision, pr.recall)
  assert 5 / 8 <= m["precision"] <= 1 and 5 / 8 <= m["recall"] <= 1  # the shared images count on both sides
  assert report["num_samples"] == 8 and report["num_reference_images"] == 8
  assert report["reference_statistics"] == "file" and "reference_check" not in report
  inputs = report["inputs"]
  assert inputs["samples"]["sha256"] == hashlib.sha256((tmp_path / "samples.npz").read_bytes()).hexdigest()
  assert inputs["ref"]["sha256"] == hashlib.sha256(ref_path.read_bytes()).hexdigest()
  assert inputs["inception"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
  assert inputs["inception"]["fid_weights"] is False  # random weights are not the FID Inception
  assert report["settings"]["inception_matmul_precision"] == "highest"  # float32, as the ADM evaluator


class _ProjectionFeatures:
  """A stand-in extractor with small features (a fixed projection of the pixels), to test the evaluator's
  logic where a 2048-wide FID would cost too much: pool 6 wide, spatial 4, logits 10 (8 images: full rank)."""

  def __call__(self, source, desc=""):
    pixels = read_images(source, range(len(source))).reshape(len(source), -1).astype(np.float64) / 255
    proj = np.random.default_rng(0).normal(size=(pixels.shape[1], 20)) / np.sqrt(pixels.shape[1])
    f = np.tanh(pixels @ proj * 4).astype(np.float32)
    return Activations(pool=f[:, :6], spatial=f[:, 6:10], logits=f[:, 10:] * 3)


def test_evaluator_reference_statistics_and_check(setup, tmp_path):
  _, _, ref_images, _ = setup
  fake = _ProjectionFeatures()
  acts = fake(ArrayImages(ref_images))
  pool, spatial = acts.pool.astype(np.float64), acts.spatial.astype(np.float64)
  stats_only, both = tmp_path / "stats_only.npz", tmp_path / "both.npz"
  file_stats = dict(mu=pool.mean(0) + 0.01, sigma=np.cov(pool.T), mu_s=spatial.mean(0), sigma_s=np.cov(spatial.T))
  np.savez(stats_only, **file_stats)
  np.savez(both, arr_0=ref_images, **file_stats)
  samples = ref_images[::-1].copy()

  report = evaluate(both, samples, fake)  # 'schur', as by default
  assert report["reference_statistics"] == "file"
  assert report["metrics"]["fid"] == pytest.approx(1e-4 * 6, rel=1e-6)  # only the shifted mean differs
  assert report["reference_check"]["fid"] == pytest.approx(1e-4 * 6, rel=1e-6)
  assert abs(report["reference_check"]["sfid"]) < 1e-9
  assert (report["metrics"]["precision"], report["metrics"]["recall"]) == (1.0, 1.0)
  assert report["inputs"]["samples"]["sha256"] == hashlib.sha256(samples.tobytes()).hexdigest()

  report = evaluate(stats_only, samples, fake)  # statistics only: FID and IS, no precision/recall
  assert report["metrics"]["fid"] == pytest.approx(1e-4 * 6, rel=1e-6)
  assert report["metrics"]["precision"] is None and report["num_reference_images"] == 0
  np.savez(tmp_path / "images_only.npz", arr_0=ref_images)
  report = evaluate(tmp_path / "images_only.npz", samples, fake)
  assert report["reference_statistics"] == "computed from arr_0" and abs(report["metrics"]["fid"]) < 1e-9


def test_bad_inputs_end_in_one_sentence(setup, reference, tmp_path):
  _, weights, ref_images, _ = setup
  ref_path, _ = reference
  np.savez(tmp_path / "samples.npz", arr_0=ref_images)
  np.savez(tmp_path / "floats.npz", arr_0=ref_images.astype(np.float32))
  for args, message in (
      ([f"--ref={ref_path}", f"--samples={tmp_path / 'samples.npz'}", f"--inception={tmp_path / 'no.pth'}"],
       f"{FID_WEIGHTS_NAME}.*--inception=PATH"),
      ([f"--ref={ref_path}", f"--samples={tmp_path / 'floats.npz'}", f"--inception={weights}"], "uint8"),
      ([f"--ref={tmp_path / 'nowhere.npz'}", f"--samples={tmp_path / 'samples.npz'}"], "VIRTUAL_imagenet256"),
      ([f"--write_ref={ref_path}", f"--images={tmp_path}"], "already exists"),
      ([f"--write_ref={tmp_path / 'new.npz'}", f"--images={ref_path.parent / 'ref_images'}", "--num_images=9"],
       "holds 8 images")):
    result = _run_cli(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert re.search(message, result.stderr.strip().splitlines()[-1]), result.stderr
