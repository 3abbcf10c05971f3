"""FID, sFID, Inception Score and precision/recall against an ADM reference batch, without TensorFlow.

  python -m sfd_jax.cli.evaluate --ref=VIRTUAL_imagenet256_labeled.npz --samples=SAMPLES.npz|DIR \\
      --inception=pt_inception-2015-12-05-6726825d.pth [--out=REPORT.json]

prints the metrics and writes them, with image counts and input hashes, to a JSON report. A reference batch
in the same format is written from a folder or a prepared tfds split with

  python -m sfd_jax.cli.evaluate --write_ref=REF.npz --images=DIR|tfds:NAME[:SPLIT] --image_size=256 \\
      [--num_images=10000] --inception=...
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np
from absl import flags, logging

from sfd_jax import storage
from sfd_jax.cli import common
from sfd_jax.console import say
from sfd_jax.convert.inception import FID_WEIGHTS_SHA256_PREFIX, default_inception_path, load_inception
from sfd_jax.data.images import Subset, digest, image_shape, open_images
from sfd_jax.errors import UserError
from sfd_jax.eval.evaluator import evaluate
from sfd_jax.eval.features import FeatureExtractor
from sfd_jax.eval.reference import read_reference, write_reference
from sfd_jax.models.inception import FID_MATMUL_PRECISION
from sfd_jax.models.layers import MATMUL_PRECISIONS

flags.DEFINE_string("ref", None, "ADM reference batch (.npz with arr_0 and/or mu, sigma, mu_s, sigma_s).")
flags.DEFINE_string("samples", None, "Samples: .npz batch (arr_0 uint8 N×H×W×3) or a folder of images.")
flags.DEFINE_string("inception", None, "FID Inception weights (pytorch-fid or torch-fidelity .pth); default "
                    f"$SFD_INCEPTION_WEIGHTS or {default_inception_path()}.")
flags.DEFINE_string("out", None, "JSON report; default SAMPLES_eval.json next to the samples.")
flags.DEFINE_integer("per_device_batch", 32, "Images per device per Inception batch.", lower_bound=1)
flags.DEFINE_enum("matmul_precision", FID_MATMUL_PRECISION, MATMUL_PRECISIONS, "Precision of the Inception's "
                  "convolutions and matmuls: 'highest' is float32, as the ADM evaluator's graph; 'default' is the "
                  "platform's (one bfloat16 pass on TPU, TF32 on recent GPUs), faster and not comparable.")
flags.DEFINE_enum("fid_method", "schur", ["schur", "eigh"], "Matrix square root of FID: 'schur' as the ADM "
                  "evaluator; 'eigh' gives the same value ~10× faster on CPU hosts.")
flags.DEFINE_boolean("check_reference", True, "When the reference stores statistics and images, also report the "
                     "FID between them as computed here (how closely this port matches the TensorFlow graph).")
flags.DEFINE_string("write_ref", None, "Write a reference batch to this new .npz instead of evaluating.")
flags.DEFINE_string("images", None, "With --write_ref: a folder of images or tfds:NAME[:SPLIT].")
flags.DEFINE_integer("image_size", None, "With --write_ref: ADM centre crop to this size (needed for mixed sizes).",
                     lower_bound=1)
flags.DEFINE_integer("num_images", None, "With --write_ref: a random subset of this many images (default: all).",
                     lower_bound=1)
flags.DEFINE_integer("seed", 0, "With --num_images: seed of the subset.")
flags.DEFINE_string("tfds_data_dir", None, "With tfds:...: the tfds data_dir.")
FLAGS = flags.FLAGS


def default_report_path(samples):
  path = storage.path(str(samples).rstrip("/"))
  return path.parent / f"{path.stem if path.suffix == '.npz' else path.name}_eval.json"


def _extractor(inception, per_device_batch: int, matmul_precision: str) -> FeatureExtractor:
  model, variables = load_inception(inception, matmul_precision=matmul_precision)
  return FeatureExtractor(model, variables, per_device_batch=per_device_batch)


def _weights(path) -> dict:
  path = Path(path) if path else default_inception_path()
  sha = digest(path)
  fid_weights = sha.startswith(FID_WEIGHTS_SHA256_PREFIX)
  if not fid_weights:
    logging.warning("%s is not the 2015 FID Inception (its SHA-256 does not start with %s): the metrics are not "
                    "comparable with published numbers", path, FID_WEIGHTS_SHA256_PREFIX)
  return {"path": str(path), "sha256": sha, "fid_weights": fid_weights}


def run_evaluation(ref, samples, inception=None, out=None, per_device_batch: int = 32, fid_method: str = "schur",
                   check_reference: bool = True, matmul_precision: str = FID_MATMUL_PRECISION) -> dict:
  """Evaluates, prints the metrics as the ADM evaluator does, writes the JSON report (process 0); returns it."""
  start = time.time()
  reference, sample_source = read_reference(ref), open_images(samples)  # bad inputs fail before the slow part
  extractor = _extractor(inception, per_device_batch, matmul_precision)
  report = evaluate(reference, sample_source, extractor, fid_method=fid_method, check_reference=check_reference)
  report["inputs"]["inception"] = _weights(inception)
  report["settings"]["inception_matmul_precision"] = matmul_precision
  report["devices"] = {"count": jax.device_count(), "kind": jax.devices()[0].device_kind}
  report["seconds"] = round(time.time() - start, 1)
  if jax.process_index() == 0:
    m = report["metrics"]
    for label, key in (("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid"),
                       ("Precision", "precision"), ("Recall", "recall")):
      print(f"{label}: {m[key]}")
    path = storage.path(out) if out else default_report_path(samples)
    storage.write_text(path, json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
  return report


def make_reference(out, images, inception=None, image_size: int | None = None, num_images: int | None = None,
                   seed: int = 0, tfds_data_dir=None, per_device_batch: int = 32,
                   matmul_precision: str = FID_MATMUL_PRECISION):
  """Writes an ADM-format reference batch (images and statistics) from a folder or a tfds split."""
  if storage.path(out).exists():  # before the slow part
    raise UserError(f"{out} already exists; choose another path for the reference batch")
  source = open_images(images, image_size, tfds_data_dir)
  if num_images:
    if num_images > len(source):
      raise UserError(f"--num_images={num_images} but {source.name} holds {len(source)} images")
    source = Subset(source, np.random.default_rng(seed).choice(len(source), num_images, replace=False))
  write_reference(out, source, _extractor(inception, per_device_batch, matmul_precision))
  say(f"wrote {out}: {len(source)} images of {image_shape(source)} with their statistics")
  return storage.path(out)


def log_dir():
  """The directory of what this run writes (the report or the reference batch)."""
  target = FLAGS.write_ref or FLAGS.out or (FLAGS.samples and default_report_path(FLAGS.samples))
  return storage.path(target).parent if target else None


def main(argv):
  del argv
  if FLAGS.write_ref:
    if not FLAGS.images:
      raise UserError("--write_ref needs --images=DIR or --images=tfds:NAME[:SPLIT]")
    make_reference(FLAGS.write_ref, FLAGS.images, FLAGS.inception, FLAGS.image_size, FLAGS.num_images, FLAGS.seed,
                   FLAGS.tfds_data_dir, FLAGS.per_device_batch, FLAGS.matmul_precision)
  elif not FLAGS.ref or not FLAGS.samples:
    raise UserError("give --ref=REF.npz and --samples=SAMPLES.npz|DIR (or --write_ref=OUT.npz --images=... to "
                    "make a reference batch)")
  else:
    run_evaluation(FLAGS.ref, FLAGS.samples, FLAGS.inception, FLAGS.out, FLAGS.per_device_batch, FLAGS.fid_method,
                   FLAGS.check_reference, FLAGS.matmul_precision)


if __name__ == "__main__":
  common.run(main, log_dir=log_dir, distributed=True)
