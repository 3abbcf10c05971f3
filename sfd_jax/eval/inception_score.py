"""Inception Score as the ADM evaluator computes it: softmax of the unbiased logits, splits of 5000 images."""
from __future__ import annotations

import numpy as np
import scipy.special

SPLIT_SIZE = 5000  # 50,000 samples give the customary 10 splits


def inception_score(logits_unbiased, split_size: int = SPLIT_SIZE) -> tuple[float, float]:
  """(mean, std) over consecutive splits of exp(E_x KL(p(y|x) ‖ p(y))); the last split may be smaller.

  The ADM evaluator reports the mean. `logits_unbiased` are pool_3 · W without the bias (the graph's
  `softmax/logits/MatMul`). Computed in float64 from log-probabilities, so a vanishing probability adds 0, not NaN.
  """
  logits = np.asarray(logits_unbiased, np.float64)
  if logits.ndim != 2 or logits.shape[0] == 0:
    raise ValueError(f"inception_score needs logits of shape (N, classes), got {logits.shape}")
  log_p = scipy.special.log_softmax(logits, axis=1)
  scores = []
  for start in range(0, len(log_p), split_size):
    part = log_p[start:start + split_size]
    log_marginal = scipy.special.logsumexp(part, axis=0) - np.log(len(part))
    kl = np.sum(np.exp(part) * (part - log_marginal), axis=1)
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores)), float(np.std(scores))
