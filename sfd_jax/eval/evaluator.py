"""The ADM evaluation of a sample batch against a reference batch: FID, sFID, Inception Score, precision, recall.

Sample statistics are always computed from the sample images. Reference statistics come from the reference
file when it stores them (as ADM's do, so FID is measured against the same Gaussian as published numbers), else
from its images. When the file has both, the FID between its stored statistics and the ones this network
computes from its images is reported as `reference_check`: it measures how closely this port reproduces the
TensorFlow graph on this machine (0 for an exact reproduction).
"""
from __future__ import annotations

from sfd_jax.data.images import digest, image_shape, open_images
from sfd_jax.eval.features import FeatureExtractor
from sfd_jax.eval.fid import frechet_distance, statistics
from sfd_jax.eval.inception_score import SPLIT_SIZE, inception_score
from sfd_jax.eval.precision_recall import BATCH, precision_recall
from sfd_jax.eval.reference import ReferenceBatch, read_reference


def evaluate(ref, samples, extractor: FeatureExtractor, *, k: int = 3, split_size: int = SPLIT_SIZE,
             pr_batch: int = BATCH, fid_method: str = "schur", check_reference: bool = True,
             hash_inputs: bool = True) -> dict:
  """A JSON-able report: `metrics`, image counts, where the reference statistics came from, input hashes.

  `ref` is a path or a `ReferenceBatch`; `samples` anything `open_images` takes (a path, an array, a source).
  """
  fid = lambda a, b: frechet_distance(a, b, method=fid_method)
  reference = ref if isinstance(ref, ReferenceBatch) else read_reference(ref)
  sample_source = open_images(samples)
  sample_acts = extractor(sample_source, desc="sample features")
  ref_acts = extractor(reference.images, desc="reference features") if reference.images is not None else None

  sample_stats, sample_spatial = statistics(sample_acts.pool), statistics(sample_acts.spatial)
  ref_stats = reference.stats if reference.stats is not None else statistics(ref_acts.pool)
  ref_spatial = reference.spatial_stats if reference.spatial_stats is not None else statistics(ref_acts.spatial)
  is_mean, is_std = inception_score(sample_acts.logits, split_size)
  metrics = {"fid": fid(sample_stats, ref_stats), "sfid": fid(sample_spatial, ref_spatial),
             "inception_score": is_mean, "inception_score_std": is_std, "precision": None, "recall": None}
  if ref_acts is not None:
    pr = precision_recall(ref_acts.pool, sample_acts.pool, k, pr_batch, pr_batch)
    metrics.update(precision=pr.precision, recall=pr.recall)

  report = {"metrics": metrics, "num_samples": len(sample_acts),
            "num_reference_images": len(ref_acts) if ref_acts is not None else 0,
            "reference_statistics": "file" if reference.stats is not None else "computed from arr_0",
            "settings": {"fid_method": fid_method, "inception_score_split_size": split_size, "precision_recall_k": k,
                         "precision_recall_batch": pr_batch, "sample_shape": list(image_shape(sample_source))}}
  if check_reference and ref_acts is not None and reference.stats is not None:
    report["reference_check"] = {
        "fid": fid(statistics(ref_acts.pool), reference.stats),
        "sfid": (fid(statistics(ref_acts.spatial), reference.spatial_stats)
                 if reference.spatial_stats is not None else None)}
  if hash_inputs:
    report["inputs"] = {"ref": {"path": str(reference.path), "sha256": digest(reference.path)},
                        "samples": {"path": getattr(sample_source, "name", None), "sha256": digest(sample_source)}}
  return report
