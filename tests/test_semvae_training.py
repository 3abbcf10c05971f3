"""SemVAE training: the KL term and the loss against independent formulas (numpy, torch), per-sample noise, the
loss going down under the real train step, the Table 7 config, and a short run of the whole task (images →
DINOv2 on device → SemVAE, held-out evaluation, export)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
torch = pytest.importorskip("torch")  # the torch extra; only the Python 3.13 tier runs without it

from sfd_jax import sharding as shd
from sfd_jax.convert import export
from sfd_jax.errors import UserError
from sfd_jax.models.semvae import SemVAE
from sfd_jax.training import loop, semvae, state as state_lib, step as step_lib
from tests.golden import REPO

GRID, FEATURES = 16, 32  # the token grid and width of the smoke config's tiny DINOv2 at 256 px


def _smoke_config(**data):
  import importlib.util
  spec = importlib.util.spec_from_file_location("semvae_smoke", REPO / "configs" / "semvae_smoke.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  cfg.total_steps, cfg.log_every, cfg.ckpt_every, cfg.sample_every = 4, 2, 4, 2
  cfg.data.update(data)
  return cfg


def _tiny():
  """The smoke config's SemVAE: its train step compiles once for both tests that train (persistent cache)."""
  return semvae.build_semvae(_smoke_config().model, feature_dim=FEATURES, grid_size=GRID)


def _loss_cfg(**overrides):
  cfg = semvae.base_config().loss
  cfg.update(overrides)
  return cfg


def _features(n, seed=0):
  """A tiny synthetic feature set with structure to learn: tokens near a few shared directions."""
  rng = np.random.default_rng(seed)
  basis = rng.normal(size=(3, FEATURES))
  mix = rng.normal(size=(n, GRID, GRID, 3))
  return (mix @ basis + 0.1 * rng.normal(size=(n, GRID, GRID, FEATURES))).astype(np.float32)


@pytest.fixture(scope="module")
def tiny():
  """A tiny SemVAE, its params, and one jitted function (two rows) giving the loss, its metrics, and the model's
  posterior and decoding of the latent sampled with noise fold_in(rng, position), for the references."""
  model = _tiny()
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, GRID, GRID, FEATURES)))["params"]
  rng, cfg = jax.random.key(7), _loss_cfg(kl_weight=1e-3)

  @jax.jit
  def parts(features, positions):
    loss, metrics = semvae.semvae_loss(model, params, features, rng, positions, cfg)
    mean, logvar = model.apply({"params": params}, features, method="encode")
    noise = jax.vmap(lambda p: jax.random.normal(jax.random.fold_in(rng, p), mean.shape[1:]))(positions)
    recon = model.apply({"params": params}, mean + jnp.exp(0.5 * logvar) * noise, method="decode")
    return loss, metrics, mean, logvar, recon
  return parts


def test_kl_matches_the_formula():
  rng = np.random.default_rng(0)
  mean, logvar = rng.normal(size=(3, 2, 2, 4)), rng.normal(size=(3, 2, 2, 4))
  got = semvae.kl_divergence(jnp.asarray(mean, jnp.float32), jnp.asarray(logvar, jnp.float32))
  formula = 0.5 * np.sum(mean ** 2 + np.exp(logvar) - logvar - 1, axis=(1, 2, 3))  # Eq. 9
  posterior = torch.distributions.Normal(torch.from_numpy(mean), torch.from_numpy(np.exp(0.5 * logvar)))
  standard = torch.distributions.Normal(torch.zeros(mean.shape, dtype=torch.float64), torch.ones(mean.shape,
                                                                                                 dtype=torch.float64))
  torch_kl = torch.distributions.kl_divergence(posterior, standard).sum(dim=(1, 2, 3)).numpy()
  np.testing.assert_allclose(got, formula, rtol=1e-5)
  np.testing.assert_allclose(got, torch_kl, rtol=1e-5)
  assert float(semvae.kl_divergence(jnp.zeros((1, 2, 2, 4)), jnp.zeros((1, 2, 2, 4)))[0]) == 0.0


def test_loss_is_the_official_train_py_loss(tiny):
  """train.py's terms on (B, L, D) tokens: torch's `cosine_similarity` with its default dim=1 (the token axis)."""
  features = _features(2)
  loss, metrics, mean, logvar, recon = jax.device_get(tiny(features, jnp.arange(2)))
  assert mean.shape == logvar.shape == (2, GRID, GRID, 4) and recon.shape == features.shape
  recon, target = (torch.tensor(x).reshape(2, GRID * GRID, FEATURES) for x in (recon, features))
  mse = torch.nn.functional.mse_loss(recon, target).item()
  l1 = torch.nn.functional.l1_loss(recon, target).item()
  cos = 1 - torch.nn.functional.cosine_similarity(recon, target).mean().item()
  kl = float(np.mean(0.5 * np.sum(np.square(mean) + np.exp(logvar) - logvar - 1, axis=(1, 2, 3))))
  np.testing.assert_allclose([metrics["loss_mse"], metrics["loss_l1"], metrics["loss_cos"], metrics["loss_kl"]],
                             [mse, l1, cos, kl], rtol=2e-5)
  np.testing.assert_allclose(loss, mse + cos + 1e-3 * kl, rtol=2e-5)  # l1 weighs 0, as in ch16.yaml


def test_held_out_cosine_is_per_token():
  """The evaluation reports the official evaluation's cosine: each token's vector, over its channels."""
  features = _features(2)
  model = _tiny()
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, GRID, GRID, FEATURES)))["params"]
  sums = jax.device_get(jax.jit(lambda p, f: semvae.evaluation_sums(model, p, f))(params, features))
  mean, _ = model.apply({"params": params}, features, method="encode")
  recon = torch.tensor(np.asarray(model.apply({"params": params}, mean, method="decode"))).reshape(-1, FEATURES)
  cosine = torch.nn.functional.cosine_similarity(recon, torch.tensor(features).reshape(-1, FEATURES)).mean().item()
  np.testing.assert_allclose(sums["cosine"] / sums["count"], cosine, rtol=2e-5)


def test_noise_follows_the_sample_position(tiny):
  features = _features(2)
  loss = lambda f, positions: float(tiny(f, jnp.asarray(positions))[0])
  assert loss(features, [0, 1]) == pytest.approx(loss(features[::-1], [1, 0]), rel=1e-6)  # rows swapped, same draws
  assert abs(loss(features, [0, 1]) - loss(features, [1, 0])) > 1e-6  # other positions, other draws


def test_loss_decreases_under_the_train_step():
  cfg = _smoke_config()
  model = _tiny()
  mesh = shd.make_mesh()
  tx = state_lib.make_optimizer(cfg.optim)
  state, shardings = state_lib.create_train_state(model, tx, mesh, cfg.sharding, jax.random.key(0))
  train_step = step_lib.make_train_step(semvae.semvae_loss_fn(model, cfg.loss), tx, cfg, mesh, shardings)
  batch = shd.shard_batch(mesh, {"features": _features(cfg.batch_size, seed=1)})
  losses = []
  for _ in range(30):
    state, metrics = train_step(state, batch)
    losses.append(float(metrics["loss"]))
  assert metrics["finite"] and np.isfinite(losses).all()
  assert losses[-1] < 0.3 * losses[0], losses[::5]
  assert metrics["loss_cos"] < 0.3 and metrics["loss_kl"] > 0


def test_table7_recipe():
  cfg = semvae.base_config()
  assert (cfg.model.hidden_size, cfg.model.encoder_depth, cfg.model.decoder_depth, cfg.model.num_heads,
          cfg.model.latent_channels) == (768, 4, 4, 6, 16)
  assert (cfg.loss.kl_weight, cfg.batch_size, cfg.total_steps, cfg.optim.b1, cfg.optim.b2) == (
      1e-7, 64, 1_000_000, 0.9, 0.999)
  assert (cfg.data.resolution, cfg.data.crop) == (256, "random")
  lr = state_lib.lr_schedule(cfg.optim)
  np.testing.assert_allclose([lr(0), lr(500), lr(800_499), lr(1_000_000)], [0, 5e-5, 5e-5, 5e-6], rtol=1e-5)
  with pytest.raises(AttributeError):
    cfg.loss.kl_wieght = 1.0  # locked: a typo is an error


def test_short_run_evaluates_and_exports(tmp_path):
  cfg = _smoke_config()
  training = semvae.prepare(cfg)
  assert len(training.heldout_images) == 16 and len(training.train_images) == 1797 - 16
  assert not set(training.heldout_images.indices) & set(training.train_images.indices)
  batch = next(training.make_data(None, 0))
  assert batch["image"].shape == (8, 256, 256, 3) and batch["image"].dtype == np.uint8
  features = training.preprocess(shd.shard_batch(training.mesh, {"image": batch["image"]}))["features"]
  assert features.shape == (8, 16, 16, 32)  # 224 px / patch 14, DINO width 32
  loop.run(cfg, tmp_path, training.task())
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  evals = [line for line in lines if "eval_mse" in line]
  assert [line["step"] for line in evals] == [2, 4] and all(line["eval_images"] == 16 for line in evals)
  assert all(0 < line["eval_mse"] and -1 <= line["eval_cosine"] <= 1 for line in evals)
  out = training.export(tmp_path, tmp_path / "semvae")
  model, variables, meta = export.load_model(out)
  assert isinstance(model, SemVAE) and model.feature_dim == 32 and model.grid_size == 16
  assert meta["trained_on"]["dino_sha256"] == training.dino.info["sha256"] and meta["trained_on"]["step"] == 4
  assert meta["heldout"]["eval_mse"] == pytest.approx(evals[-1]["eval_mse"], rel=1e-5)


def test_bad_settings_name_the_fix():
  with pytest.raises(UserError, match="fewer than one evaluation batch"):
    semvae.prepare(_smoke_config(heldout_images=4))
  cfg = _smoke_config()
  cfg.dino.random_init = False
  with pytest.raises(UserError, match="config.dino.path is empty"):
    semvae.prepare(cfg)
