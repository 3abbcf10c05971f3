"""FID, sFID's Fréchet distance, the matrix square root, Inception Score and precision/recall on inputs with known
answers (closed forms, SciPy, hand-counted point clouds)."""
import warnings

import numpy as np
import pytest
import scipy.linalg

from sfd_jax.eval.fid import Statistics, frechet_distance, sqrtm, statistics
from sfd_jax.eval.inception_score import inception_score
from sfd_jax.eval.precision_recall import manifold_radii, pairwise_distances, precision_recall


def _spd(rng, n, cond):
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  return (q * np.logspace(0, -np.log10(cond), n)) @ q.T


def _closed_form_fid(mu1, s1, mu2, s2):
  """‖Δμ‖² + tr(S1 + S2 − 2 (S1^½ S2 S1^½)^½), each root from a symmetric eigendecomposition."""
  def sym_sqrt(s):
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  r = sym_sqrt(s1)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * sym_sqrt(r @ s2 @ r)))


@pytest.mark.parametrize("method", ["schur", "eigh"])
def test_fid_of_identical_sets_is_zero(method):
  features = np.random.default_rng(0).normal(size=(300, 48)) * np.linspace(0.1, 3, 48)
  a, b = statistics(features), statistics(features[::-1])  # same set, other order
  assert abs(frechet_distance(a, b, method=method)) < 1e-10 * np.trace(a.sigma)


@pytest.mark.parametrize("method", ["schur", "eigh"])
def test_fid_of_known_gaussians_matches_closed_form(method):
  rng = np.random.default_rng(1)
  mu1, mu2 = rng.normal(size=40), rng.normal(size=40)
  s1, s2 = _spd(rng, 40, 1e4) * 3, _spd(rng, 40, 1e2)
  expected = _closed_form_fid(mu1, s1, mu2, s2)
  assert frechet_distance(Statistics(mu1, s1), Statistics(mu2, s2), method=method) == pytest.approx(expected, 1e-9)
  # Commuting (diagonal) covariances by hand: Σ (√a − √b)².
  a, b = rng.uniform(0.1, 4, 16), rng.uniform(0.1, 4, 16)
  hand = float(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
  assert frechet_distance(Statistics(np.zeros(16), np.diag(a)), Statistics(np.zeros(16), np.diag(b)),
                          method=method) == pytest.approx(hand, 1e-12)


def test_statistics_of_samples_give_the_gaussians_fid():
  rng = np.random.default_rng(2)
  mu1, mu2, s1, s2 = rng.normal(size=4), rng.normal(size=4), _spd(rng, 4, 10), _spd(rng, 4, 5)
  x1 = rng.multivariate_normal(mu1, s1, size=200_000)
  x2 = rng.multivariate_normal(mu2, s2, size=200_000)
  stats = statistics(x1)
  np.testing.assert_allclose(stats.sigma, np.cov(x1, rowvar=False), rtol=1e-12)
  assert frechet_distance(stats, statistics(x2)) == pytest.approx(_closed_form_fid(mu1, s1, mu2, s2), rel=0.02)


@pytest.mark.parametrize("cond", [1e3, 1e10, 1e14])
def test_sqrtm_matches_scipy_on_ill_conditioned_products(cond):
  rng = np.random.default_rng(3)
  a = _spd(rng, 150, cond) @ _spd(rng, 150, cond)
  ours, ref = sqrtm(a), scipy.linalg.sqrtm(a)
  scale = np.abs(ref).max()
  assert np.abs(ours - ref).max() < 1e-10 * scale
  assert np.linalg.norm(ours @ ours - a) < 1e-12 * np.linalg.norm(a)


@pytest.mark.parametrize("kind", ["non_normal", "complex_eigenvalues", "complex_input"])
def test_sqrtm_matches_scipy_on_other_matrices(kind):
  rng = np.random.default_rng(4)
  a = {"non_normal": np.triu(rng.normal(size=(90, 90)) * 5) + 3 * np.eye(90),
       "complex_eigenvalues": rng.normal(size=(90, 90)),
       "complex_input": rng.normal(size=(40, 40)) + 1j * rng.normal(size=(40, 40))}[kind]
  ours, ref = sqrtm(a), scipy.linalg.sqrtm(a)
  assert np.abs(ours - ref).max() < 1e-11 * np.abs(ref).max()


def test_sqrtm_without_a_square_root_is_nan_and_zero_is_zero():
  assert np.isnan(sqrtm(np.array([[0.0, 1.0], [0.0, 0.0]]))).all()
  assert np.array_equal(sqrtm(np.zeros((3, 3))), np.zeros((3, 3)))


def test_fid_retries_a_singular_product_with_eps():
  # A product with no square root (nilpotent): ADM adds eps to both diagonals and tries again.
  a, b = Statistics(np.zeros(2), np.array([[0.0, 1.0], [0.0, 0.0]])), Statistics(np.zeros(2), np.eye(2))
  with pytest.warns(UserWarning, match="singular"):
    value = frechet_distance(a, b, eps=1e-6)
  expected = 2 - 2 * np.trace(scipy.linalg.sqrtm((a.sigma + 1e-6 * np.eye(2)) @ (np.eye(2) * (1 + 1e-6)))).real
  assert value == pytest.approx(expected, abs=1e-9)


def test_fid_warns_on_imaginary_square_root_and_uses_real_part():
  a, b = Statistics(np.zeros(2), np.diag([1.0, -1.0])), Statistics(np.zeros(2), np.eye(2))
  with pytest.warns(UserWarning, match="imaginary"):
    assert frechet_distance(a, b) == pytest.approx(2 - 2 * 1.0)  # √diag(1, −1) = diag(1, i)


def test_fid_of_rank_deficient_statistics_agrees_between_methods():
  rng = np.random.default_rng(5)  # 20 images, 256 features: ADM's singular regime
  a, b = statistics(rng.normal(size=(20, 256))), statistics(rng.normal(size=(20, 256)) + 0.3)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    schur = frechet_distance(a, b)
  assert schur == pytest.approx(frechet_distance(a, b, method="eigh"), rel=1e-6)


def test_fid_rejects_mismatched_features():
  with pytest.raises(ValueError, match="different sizes"):
    frechet_distance(Statistics(np.zeros(3), np.eye(3)), Statistics(np.zeros(4), np.eye(4)))
  with pytest.raises(ValueError, match="at least 2"):
    statistics(np.zeros((1, 5)))


def test_inception_score_known_answers():
  assert inception_score(np.zeros((10, 1008))) == pytest.approx((1.0, 0.0))  # same prediction for all: IS 1
  # Confident predictions of 5 distinct classes, repeated: IS is the number of classes.
  logits = np.eye(1008)[np.arange(20) % 5] * 200.0
  assert inception_score(logits)[0] == pytest.approx(5.0, rel=1e-12)
  # Splits of 5000 as ADM: 12 images in splits of 5 → [5 classes, 5 classes, 2 classes].
  mean, std = inception_score(np.eye(1008)[[0, 1, 2, 3, 4] * 2 + [7, 8]] * 200.0, split_size=5)
  assert mean == pytest.approx(4.0) and std == pytest.approx(np.std([5, 5, 2]))
  assert np.isfinite(inception_score(np.eye(1008)[:3] * 1e5)[0])  # vanishing probabilities: no NaN


def test_precision_recall_on_identical_and_disjoint_sets():
  x = np.random.default_rng(6).normal(size=(40, 16)).astype(np.float32)
  pr = precision_recall(x, x)
  assert (pr.precision, pr.recall) == (1.0, 1.0)
  pr = precision_recall(x, x + 100.0)
  assert (pr.precision, pr.recall) == (0.0, 0.0)


def _line(xs):
  return np.stack([np.asarray(xs, np.float32), np.zeros(len(xs), np.float32)], axis=1)


@pytest.mark.parametrize("batch", [8, 10000])
def test_precision_recall_hand_counted(batch):
  # Reference: 0..19 on a line; squared 3-NN radius 9 at the ends, 4 inside. Samples: 0.5..9.5 (inside the
  # reference manifold) and 1000..1009 (far away, overflowing float16 so its blocks fall back to float32).
  ref, samples = _line(range(20)), _line(list(np.arange(10) + 0.5) + list(range(1000, 1010)))
  np.testing.assert_array_equal(manifold_radii(ref), [9] + [4] * 18 + [9])
  pr = precision_recall(ref, samples, row_batch=batch, col_batch=batch)
  # Precision: the 10 near samples of 20. Recall: the near samples' balls cover [0.5 − 3, 9.5 + 3] ∋ 0..12.
  assert (pr.precision, pr.recall) == (0.5, 13 / 20)


def test_distances_use_float16_and_fall_back_to_float32():
  rng = np.random.default_rng(7)
  u, v = rng.normal(size=(5, 8)).astype(np.float32), rng.normal(size=(6, 8)).astype(np.float32)
  exact = ((u[:, None] - v[None]) ** 2).sum(-1)
  half = np.asarray(pairwise_distances(u, v))
  f16 = lambda x: np.asarray(x, np.float16).astype(np.float32)
  hu, hv = f16(u), f16(v)
  norm = lambda x: f16(f16(x * x).sum(1))
  by_hand = f16(f16(norm(hu)[:, None] - f16(2 * f16(hu @ hv.T))) + norm(hv)[None])
  np.testing.assert_allclose(half, np.maximum(by_hand, 0), rtol=2e-3, atol=1e-3)  # within a float16 ulp
  assert np.abs(half - exact).max() > 1e-5  # the half-precision path really ran
  np.testing.assert_allclose(np.asarray(pairwise_distances(u, v, float16=False)), exact, rtol=1e-5, atol=1e-5)
  big = u * 300  # squared norms beyond float16's 65504: the block is recomputed in float32
  np.testing.assert_allclose(np.asarray(pairwise_distances(big, v)), ((big[:, None] - v[None]) ** 2).sum(-1),
                             rtol=1e-5)


def test_precision_recall_needs_more_than_k_points():
  with pytest.raises(ValueError, match="more than 3"):
    precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))
