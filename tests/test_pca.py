"""ReDi-style PCA semantic channels: the fit against closed forms and numpy's SVD, the file format (safetensors, never
a pickle) and its errors, and the PCA as the semantic source of an extraction that `cli.train` trains on and
`cli.sample` samples from."""
import json
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy

from sfd_jax.convert import export
from sfd_jax.data import extract, images, latents, pca
from sfd_jax.errors import UserError
from sfd_jax.models.dinov2 import repa_features
from sfd_jax.training import config as config_lib, tasks
from tests.golden import REPO, subprocess_env
from tests.test_extract import _tiny_encoders

CHANNELS = 5  # the PCA's k in the end-to-end test (the tiny SemVAE has 3, the tiny texture VAE 4)


def _flip_signs(rows):
  """Each row signed so that its entry of largest magnitude is positive (the documented convention)."""
  return rows * np.sign(rows[np.arange(len(rows)), np.abs(rows).argmax(1)])[:, None]


def _svd_reference(tokens, k):
  """The PCA of standardised tokens by numpy's SVD of the data matrix (float64): components, variances."""
  x = np.asarray(tokens, np.float64).reshape(-1, tokens.shape[-1])
  z = (x - x.mean(0)) / x.std(0, ddof=1)
  _, s, vt = np.linalg.svd(z, full_matrices=False)
  return _flip_signs(vt[:k]), s[:k] ** 2 / (len(x) - 1), s ** 2 / (len(x) - 1)


def test_fit_recovers_a_known_correlation_structure():
  """Tokens whose sample mean, std and correlation are exactly known: three 2×2 blocks of correlation ρ, so the
  eigenvectors are (e_i ± e_j)/√2 with eigenvalues 1 ± ρ. Fitted from uneven batches (the merge), with scales and
  offsets of very different sizes (the standardisation)."""
  rhos, n = (0.8, 0.5, 0.2), 1000
  corr = np.eye(6)
  for b, rho in enumerate(rhos):
    corr[2 * b, 2 * b + 1] = corr[2 * b + 1, 2 * b] = rho
  rng = np.random.default_rng(0)
  w = rng.standard_normal((n, 6))
  w, _ = np.linalg.qr(w - w.mean(0))        # centred, orthonormal columns
  w *= np.sqrt(n - 1)                       # sample covariance exactly the identity
  values, vectors = np.linalg.eigh(corr)
  root = vectors @ np.diag(np.sqrt(values)) @ vectors.T
  mean, scale = np.array([3.0, -1.0, 100.0, 0.0, 0.5, -7.0]), np.array([0.01, 2.0, 50.0, 1.0, 0.3, 9.0])
  tokens = mean + scale * (w @ root)
  fitted = pca.fit([tokens[:1], tokens[1:337], tokens[337:]], 4)

  s = 1 / np.sqrt(2)
  expected = np.array([[s, s, 0, 0, 0, 0], [0, 0, s, s, 0, 0], [0, 0, 0, 0, s, s], [0, 0, 0, 0, s, -s]])
  np.testing.assert_allclose(fitted.components, expected, atol=1e-6)
  np.testing.assert_allclose(fitted.explained_variance, [1.8, 1.5, 1.2, 0.8], rtol=1e-6)
  np.testing.assert_allclose(fitted.explained_variance_ratio, np.array([1.8, 1.5, 1.2, 0.8]) / 6, rtol=1e-6)
  np.testing.assert_allclose(fitted.mean, mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(fitted.std, scale, rtol=1e-6)
  assert fitted.num_tokens == n
  projected = np.asarray(fitted.projection.apply(fitted.variables(), tokens))
  np.testing.assert_allclose(projected, (w @ root) @ expected.T, atol=1e-4)
  np.testing.assert_allclose(np.cov(projected.T), np.diag([1.8, 1.5, 1.2, 0.8]), atol=1e-4)  # uncorrelated
  # Accelerators would multiply float32 at bfloat16/TF32 precision by default: the projection asks for full precision.
  lowered = jax.jit(fitted.projection.apply).lower(fitted.variables(), tokens).as_text()
  assert "precision = [HIGHEST, HIGHEST]" in lowered


def test_fit_matches_numpy_svd_on_low_rank_tokens():
  """Low-rank tokens plus noise, a constant dimension (std kept 1, as sklearn's StandardScaler): the components,
  variances and ratios equal numpy's SVD of the standardised data matrix, the sign convention included."""
  rng = np.random.default_rng(1)
  tokens = rng.standard_normal((4, 200, 3)) @ rng.standard_normal((3, 12)) + 0.1 * rng.standard_normal((4, 200, 12))
  tokens = tokens * rng.uniform(0.5, 5, 12) + rng.uniform(-3, 3, 12)
  fitted = pca.fit(list(tokens), 6)
  components, variance, all_variances = _svd_reference(tokens, 6)
  np.testing.assert_allclose(fitted.components, components, atol=1e-5)
  np.testing.assert_allclose(fitted.explained_variance, variance, rtol=1e-5)
  np.testing.assert_allclose(fitted.explained_variance_ratio, variance / all_variances.sum(), rtol=1e-5)
  assert fitted.explained_variance_ratio[:3].sum() > 0.95  # rank 3 before the noise

  constant = np.concatenate([tokens.reshape(-1, 12), np.full((800, 1), 4.0)], axis=1)
  with_constant = pca.fit([constant], 6)
  assert with_constant.std[-1] == 1 and with_constant.mean[-1] == 4
  np.testing.assert_allclose(with_constant.components[:, :-1], components, atol=1e-5)
  np.testing.assert_array_equal(with_constant.components[:, -1], 0)
  with pytest.raises(UserError, match="channels=13 must be between 1 and the DINO token width 12"):
    pca.fit(list(tokens), 13)
  with pytest.raises(UserError, match="at least two DINO tokens"):
    pca.fit([], 2)


def test_fit_from_a_feature_file(tmp_path):
  """The official pre-extracted DINOv2 feature file (patch_tokens (N, L, D) float16): a seeded draw of its rows."""
  tokens = (np.random.default_rng(2).standard_normal((10, 16, 6)) * [1, 2, 3, 4, 5, 6]).astype(np.float16)
  safetensors.numpy.save_file({"patch_tokens": tokens, "class_indices": np.arange(10)}, str(tmp_path / "f.safetensors"))
  batches, dino_sha256, described = pca.stored_tokens(tmp_path / "f.safetensors", num_images=7, seed=5, batch_size=3)
  fitted = pca.fit(batches, 3)
  drawn = np.sort(np.random.default_rng(5).permutation(10)[:7])
  components, variance, _ = _svd_reference(tokens[drawn].astype(np.float32), 3)
  np.testing.assert_allclose(fitted.components, components, atol=1e-5)
  np.testing.assert_allclose(fitted.explained_variance, variance, rtol=1e-5)
  assert fitted.num_tokens == 7 * 16 and dino_sha256 is None and described["records"] == 7


def _fitted(channels=3, dim=8, seed=0):
  tokens = np.random.default_rng(seed).standard_normal((100, dim)) * np.arange(1, dim + 1)
  return pca.fit([tokens], channels, dino_sha256="ab" * 32, fitted_on={"features": "synthetic"})


def test_file_round_trips_and_is_not_a_pickle(tmp_path):
  fitted = _fitted()
  path = tmp_path / "pca.safetensors"
  pca.save(fitted, path)
  data = path.read_bytes()
  size = int.from_bytes(data[:8], "little")
  header = json.loads(data[8:8 + size])  # the safetensors layout: a JSON header, then raw little-endian arrays
  assert header["__metadata__"]["format"] == "sfd_jax.dino_pca" and not data.startswith(b"\x80")
  with pytest.raises(pickle.UnpicklingError):
    pickle.loads(data)
  stored = safetensors.numpy.load_file(str(path))  # the safetensors library's own reader
  assert sorted(stored) == sorted(pca.ARRAYS) and all(a.dtype == np.float32 for a in stored.values())
  loaded = pca.load(path)
  for name in pca.ARRAYS:
    np.testing.assert_array_equal(getattr(loaded, name), getattr(fitted, name))
    np.testing.assert_array_equal(stored[name], getattr(fitted, name))
  assert (loaded.num_tokens, loaded.dino_sha256, loaded.fitted_on) == (100, "ab" * 32, {"features": "synthetic"})


def test_bad_pca_files_are_one_sentence(tmp_path):
  good = pca.to_bytes(_fitted())
  arrays = {k: np.asarray(getattr(_fitted(), k)) for k in pca.ARRAYS}
  cases = {
      "missing.safetensors": (None, "does not exist; fit one with"),
      "": (None, "is a directory"),
      "sklearn.pth": (pickle.dumps({"components_": np.eye(3)}), "not safetensors: a pickled sklearn PCA"),
      "html.safetensors": (b"<!DOCTYPE html><html>Not found</html>", "not safetensors"),
      "other.safetensors": (safetensors.numpy.save(arrays), "not a PCA of sfd_jax"),
      "truncated.safetensors": (good[:-20], "truncated or corrupt"),
      "future.safetensors": (good.replace(b'"version":"1"', b'"version":"9"'), "version '9'"),
      "shapes.safetensors": (safetensors.numpy.save({**arrays, "std": arrays["std"][:-1]},
                                                    metadata={"format": pca.FORMAT, "version": pca.VERSION}),
                             "inconsistent arrays"),
  }
  for name, (content, message) in cases.items():
    if content is not None:
      (tmp_path / name).write_bytes(content)
    with pytest.raises(pca.PCAFileError, match=message) as raised:
      extract.load_encoder("pca", tmp_path / name)
    assert "\n" not in str(raised.value) and str(tmp_path / name) in str(raised.value), name


def test_a_pca_that_does_not_fit_the_dino_is_refused(tmp_path):
  encoders = _tiny_encoders()
  fitted = _fitted(dim=33)
  pca.save(fitted, tmp_path / "wide.safetensors")
  with pytest.raises(UserError, match="the PCA reads 33-d features but DINOv2 gives 32-d tokens"):
    extract.latent_layout(encoders["texture"], encoders["dino"],
                          extract.load_encoder("pca", tmp_path / "wide.safetensors"), 256)
  pca.save(_fitted(dim=32), tmp_path / "other.safetensors")  # fitted on tokens of DINOv2 weights "abab…"
  with pytest.raises(UserError, match="the PCA was trained on features of DINOv2 weights abababababab"):
    extract.latent_layout(encoders["texture"], encoders["dino"],
                          extract.load_encoder("pca", tmp_path / "other.safetensors"), 256)


# ---------------------------------------------------------------------------------------------------- end to end

def _run(*args, timeout=300):
  done = subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, timeout=timeout,
                        env=subprocess_env())
  assert done.returncode == 0, done.stderr[-3000:]
  return done


FIT_DRAW = np.sort(np.random.default_rng(4).permutation(1797)[:6])  # `--num_images=6 --seed=4` of the 1797 digits


@pytest.fixture(scope="module")
def pca_dataset(tmp_path_factory):
  """A PCA fitted by `cli.fit_pca` on the tokens of 6 digit images, a latent dataset of the first 8 extracted with
  it through `cli.extract --pca`, and the tiny encoders (exported)."""
  root = tmp_path_factory.mktemp("pca")
  encoders = _tiny_encoders()
  paths = {kind: export.save_model(root / kind, encoders[kind].model, encoders[kind].variables)
           for kind in ("texture", "dino")}
  _run("sfd_jax.cli.fit_pca", "--source=digits", f"--dino={paths['dino']}", f"--out={root / 'pca.safetensors'}",
       f"--channels={CHANNELS}", "--num_images=6", "--seed=4", "--batch_size=4")
  _run("sfd_jax.cli.extract", "--source=digits", f"--out={root / 'data'}", "--max_images=8", "--shard_size=4",
       "--batch_size=4", "--latent_dtype=float32", f"--texture_vae={paths['texture']}", f"--dino={paths['dino']}",
       f"--pca={root / 'pca.safetensors'}")
  return root, encoders, paths, pca.load(root / "pca.safetensors")


@pytest.fixture(scope="module")
def digit_tokens(pca_dataset):
  """{index: DINO tokens (2, 256, D) of the digit's crop and of its mirror image}, read the REPA way, for the first
  8 digits and those the PCA was fitted on."""
  encoders = pca_dataset[1]
  digits, indices = images.DigitsImages(), sorted(set(range(8)) | set(FIT_DRAW.tolist()))
  crops = np.stack([images.adm_center_crop(digits[i]["image"], 256) for i in indices])
  both = np.stack([crops, crops[:, :, ::-1]], axis=1).reshape(-1, 256, 256, 3)
  tokens = jax.jit(repa_features, static_argnums=0)(encoders["dino"].model, encoders["dino"].variables, both)
  return dict(zip(indices, np.asarray(tokens).reshape(len(indices), 2, 256, -1)))


@pytest.mark.slow  # CLI fit → extract → train → sample (minutes): the full tier
def test_fit_pca_command_on_images_is_the_pca_of_their_dino_tokens(pca_dataset, digit_tokens):
  encoders, fitted = pca_dataset[1], pca_dataset[3]
  components, variance, _ = _svd_reference(np.stack([digit_tokens[i][0] for i in FIT_DRAW]), CHANNELS)
  np.testing.assert_allclose(fitted.components, components, atol=2e-4)
  np.testing.assert_allclose(fitted.explained_variance, variance, rtol=1e-4)
  assert fitted.num_tokens == 6 * 256 and fitted.dino_sha256 == encoders["dino"].info["sha256"]


@pytest.mark.slow  # CLI fit → extract → train → sample (minutes): the full tier
def test_extraction_stores_the_pca_channels_of_the_dino_tokens(pca_dataset, digit_tokens):
  root, _, _, fitted = pca_dataset
  source = latents.LatentSource(root / "data")
  assert len(source) == 8 and source.spec["semantic_channels"] == CHANNELS
  assert source.meta["encoders"]["semvae"]["class"] == "Projection"
  assert source.meta["encoders"]["semvae"]["path"] == str(root / "pca.safetensors")
  for i in range(8):
    record = source[i]
    for flip, suffix in enumerate(("", "_flip")):
      expected = ((digit_tokens[i][flip] - fitted.mean) / fitted.std) @ fitted.components.T.astype(np.float64)
      np.testing.assert_allclose(record["semantic" + suffix].reshape(-1, CHANNELS), expected, atol=1e-4, rtol=1e-4)
  stats = json.loads((latents.find_dataset(root / "data") / "stats.json").read_text())
  assert len(stats["semantic"]["mean"]) == CHANNELS

  cfg = config_lib.base_config()  # a run configured for another k: one sentence naming both numbers
  cfg.model = config_lib.model_config("S", input_size=16, in_channels=4 + 16, num_classes=10, repa_z_dim=32)
  cfg.data.path = str(root / "data")
  with pytest.raises(UserError, match=f"{CHANNELS} semantic channels ≠ loss.semantic_channels 16"):
    tasks.latent_source(cfg.data, cfg.model, cfg.loss)


@pytest.mark.slow  # CLI fit → extract → train → sample (minutes): the full tier
def test_fit_pca_command_fits_stored_tokens(pca_dataset):
  """`cli.fit_pca --features=<latent dataset>` equals numpy's SVD of the dataset's stored (un-flipped) tokens, and
  records the DINOv2 digest the dataset was extracted with."""
  root, encoders, _, _ = pca_dataset
  out = root / "from_features.safetensors"
  _run("sfd_jax.cli.fit_pca", f"--features={root / 'data'}", f"--out={out}", "--channels=4", "--num_images=5",
       "--seed=3")
  fitted = pca.load(out)
  source = latents.LatentSource(root / "data")
  drawn = np.sort(np.random.default_rng(3).permutation(8)[:5])
  components, variance, _ = _svd_reference(np.stack([np.asarray(source[int(i)]["dino"], np.float32)
                                                     for i in drawn]), 4)
  np.testing.assert_allclose(fitted.components, components, atol=1e-4)
  np.testing.assert_allclose(fitted.explained_variance, variance, rtol=1e-4)
  assert fitted.num_tokens == 5 * 256 and fitted.dino_sha256 == encoders["dino"].info["sha256"]
  failed = subprocess.run([sys.executable, "-m", "sfd_jax.cli.fit_pca", f"--out={out}", "--source=digits"],
                          capture_output=True, text=True, timeout=120, env=subprocess_env())
  assert failed.returncode == 2 and "error: pass --dino" in failed.stderr


@pytest.mark.slow  # CLI fit → extract → train → sample (minutes): the full tier
def test_pca_dataset_trains_and_samples_through_the_commands(pca_dataset):
  root, _, paths, _ = pca_dataset
  overrides = ["data.source=latents", f"data.path={root / 'data'}", "model.input_size=16",
               f"model.in_channels={4 + CHANNELS}", f"loss.semantic_channels={CHANNELS}", "batch_size=4",
               "total_steps=2", "log_every=1", "ckpt_every=2", "sample_every=0", "eval_every=0"]
  _run("sfd_jax.cli.train", f"--config={REPO / 'configs/smoke.py'}", f"--workdir={root / 'run'}",
       *[f"--config.{o}" for o in overrides])
  config = json.loads((root / "run" / "config.json").read_text())
  assert config["loss"]["semantic_channels"] == CHANNELS and config["model"]["in_channels"] == 4 + CHANNELS
  metrics = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
  assert all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)
  _run("sfd_jax.cli.sample", f"--model={root / 'run'}", f"--vae={paths['texture']}", f"--stats={root / 'data'}",
       f"--out={root / 'samples'}", "--num_images=2", "--batch_size=2", "--method=euler", "--num_steps=3",
       "--labels=random")
  pictures = np.load(root / "samples" / "samples.npz")["arr_0"]
  assert pictures.shape == (2, 256, 256, 3) and pictures.dtype == np.uint8 and pictures.std() > 0
