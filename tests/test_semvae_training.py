"""SemVAE training: the KL term and the loss against independent formulas (numpy, torch), per-sample noise, the
loss going down under the real train step, the official recipe (its LR schedule against torch's schedulers and
the closed form), the official feature preprocessing, and short runs of the whole task from images (DINOv2 on
device → SemVAE) and from a feature file written as extract_dinov2_feature.py writes it (held-out evaluation,
export)."""
import json
import math
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the torch extra; only the Python 3.13 tier runs without it

from safetensors.numpy import save_file

from sfd_jax import sharding as shd
from sfd_jax.convert import export
from sfd_jax.data import features as features_lib, images as images_lib
from sfd_jax.errors import UserError
from sfd_jax.models import dinov2
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


def _official_lr(step):
  """The LR train.py applies at iteration `step` (after `step` scheduler steps), in closed form: LinearLR 0.01 → 1
  over 500 steps; from SequentialLR's milestone 500 ConstantLR, i.e. 5e-5; from milestone 800,500
  CosineAnnealingLR(T_max 199,500, eta_min 5e-6), restarted at 0 there."""
  if step < 500:
    return 5e-5 * (0.01 + 0.99 * step / 500)
  if step < 800_500:
    return 5e-5
  return 5e-6 + (5e-5 - 5e-6) * (1 + math.cos(math.pi * (step - 800_500) / 199_500)) / 2


MILESTONES = (0, 1, 250, 499, 500, 501, 800_499, 800_500, 800_501, 900_000, 999_999)


def test_official_recipe():
  cfg = semvae.base_config()
  assert (cfg.model.hidden_size, cfg.model.encoder_depth, cfg.model.decoder_depth, cfg.model.num_heads,
          cfg.model.latent_channels, cfg.model.dtype) == (768, 4, 4, 6, 16, "bfloat16")
  assert dict(cfg.loss) == dict(mse_weight=1.0, l1_weight=0.0, cos_weight=1.0, kl_weight=1e-7)
  o = cfg.optim
  assert (cfg.batch_size, cfg.total_steps, o.lr, o.b1, o.b2, o.eps, o.weight_decay, o.max_grad_norm,
          o.ema_decay) == (64, 1_000_000, 5e-5, 0.9, 0.999, 1e-8, 0.01, 0.0, 0.0)
  assert (cfg.data.source, cfg.data.resize, cfg.data.resolution) == ("images", 256, 224)
  lr = jax.jit(state_lib.lr_schedule(cfg.optim))
  np.testing.assert_allclose([lr(k) for k in MILESTONES], [_official_lr(k) for k in MILESTONES], rtol=1e-6)
  assert [_official_lr(k) for k in (0, 499, 500, 800_500)] == pytest.approx([5e-7, 4.9901e-5, 5e-5, 5e-5])
  # The step-k value is the LR of the (k+1)-th update: AdamW's decoupled decay of a unit weight under zero
  # gradients is exactly lr·0.01.
  tx = state_lib.make_optimizer(cfg.optim)
  params, grads = {"w": jnp.ones(())}, {"w": jnp.zeros(())}
  opt_state, applied = tx.init(params), []
  for _ in range(3):
    updates, opt_state = tx.update(grads, opt_state, params)
    applied.append(-float(updates["w"]) / 0.01)
  np.testing.assert_allclose(applied, [_official_lr(k) for k in range(3)], rtol=1e-5)
  with pytest.raises(AttributeError):
    cfg.loss.kl_wieght = 1.0  # locked: a typo is an error


@pytest.mark.slow  # 1M scheduler steps (~6 s); the fast tier checks the closed form at the milestones
def test_schedule_is_torchs_sequential_lr_at_every_step():
  import warnings
  cfg = semvae.base_config().optim
  param = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.AdamW([param], lr=cfg.lr)
  sched = torch.optim.lr_scheduler
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # SequentialLR's step(0) of a scheduler at a milestone is deprecated API
    schedule = sched.SequentialLR(opt, [sched.LinearLR(opt, 0.01, 1.0, 500), sched.ConstantLR(opt, 1.0, 800_000),
                                        sched.CosineAnnealingLR(opt, 199_500, 0.1 * cfg.lr)], [500, 800_500])
    torch_lr = np.empty(1_000_000)
    for k in range(1_000_000):
      torch_lr[k] = opt.param_groups[0]["lr"]
      schedule.step()
  ours = np.asarray(jax.jit(jax.vmap(state_lib.lr_schedule(cfg)))(jnp.arange(1_000_000)))
  np.testing.assert_allclose(ours, torch_lr, rtol=5e-6)  # float32 arithmetic
  np.testing.assert_allclose(torch_lr[list(MILESTONES)], [_official_lr(k) for k in MILESTONES], rtol=1e-12)


IMAGE_SIZES = ((300, 257), (257, 300), (500, 375), (256, 256), (225, 301), (1000, 260))


def _photo(width, height, seed=0):
  """A smooth image with detail (gradients, a sine pattern and noise): resampling differences show."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:height, :width]
  base = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin(x / 7.0 + y / 11.0)], axis=-1) * 255
  return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def test_resize_center_crop_is_torchvisions_resize_and_center_crop():
  """Against torch's antialiased bicubic (made to match PIL's up to rounding) with the sizes torchvision's
  Resize computes (long side int(256·long/short)) and CenterCrop's offsets (round((H − 224)/2))."""
  for width, height in IMAGE_SIZES:
    image = _photo(width, height)
    got = images_lib.resize_center_crop(image, 224, 256)
    if height <= width:
      new_h, new_w = 256, int(256 * width / height)
    else:
      new_h, new_w = int(256 * height / width), 256
    x = torch.tensor(image, dtype=torch.float64).permute(2, 0, 1)[None]
    for size in ((height, new_w), (new_h, new_w)):  # PIL: the horizontal pass, rounded to uint8, then the vertical
      if size != tuple(x.shape[2:]):
        x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255)
    x = x[0].permute(1, 2, 0).numpy()
    top, left = int(round((new_h - 224) / 2.0)), int(round((new_w - 224) / 2.0))
    want = x[top:top + 224, left:left + 224]
    assert got.shape == (224, 224, 3) and got.dtype == np.uint8
    diff = np.abs(got.astype(np.float64) - want)
    assert diff.max() <= 1 and diff.mean() < 1e-3, (width, height, diff.max(), diff.mean())  # a pixel off: ~8


def test_resize_center_crop_is_torchvisions_exactly():
  transforms = pytest.importorskip("torchvision.transforms")
  from PIL import Image
  official = transforms.Compose([transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
                                 transforms.CenterCrop(224)])
  for width, height in IMAGE_SIZES:
    image = _photo(width, height, seed=1)
    np.testing.assert_array_equal(images_lib.resize_center_crop(image, 224, 256),
                                  np.asarray(official(Image.fromarray(image))))


def _run_and_export(cfg, training, workdir):
  """Trains the 4 steps of `cfg`, checks the held-out evaluations at 2 and 4 and exports: (model, meta)."""
  loop.run(cfg, workdir, training.task())
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  evals = [line for line in lines if "eval_mse" in line]
  assert [line["step"] for line in evals] == [2, 4] and all(line["eval_images"] == 16 for line in evals)
  assert all(0 < line["eval_mse"] and -1 <= line["eval_cosine"] <= 1 for line in evals)
  model, _, meta = export.load_model(training.export(workdir, workdir / "semvae"))
  assert isinstance(model, SemVAE) and model.feature_dim == FEATURES and model.grid_size == GRID
  assert model.dtype == jnp.float32 and meta["trained_on"]["step"] == 4
  assert meta["heldout"]["eval_mse"] == pytest.approx(evals[-1]["eval_mse"], rel=1e-5)
  return model, meta


def test_short_run_from_images(tmp_path):
  """Resize 256 + CenterCrop 224 on the host, DINOv2 on the devices reading the crop as is (no resize), tokens
  rounded to float16 as the official feature file stores them."""
  cfg = _smoke_config()
  training = semvae.prepare(cfg)
  assert len(training.heldout_set) == 16 and len(training.train_set) == 1797 - 16
  assert not set(training.heldout_set.indices) & set(training.train_set.indices)
  batch = next(training.make_data(None, 0))
  assert batch["image"].shape == (8, 224, 224, 3) and batch["image"].dtype == np.uint8
  source = training.train_set.source
  np.testing.assert_array_equal(batch["image"][0], images_lib.resize_center_crop(
      source[int(batch["index"][0])]["image"], 224, 256))
  features = np.asarray(training.preprocess(shd.shard_batch(training.mesh, {"image": batch["image"]}))["features"])
  assert features.shape == (8, GRID, GRID, FEATURES)  # 224 px / patch 14, DINO width 32
  pixels = (batch["image"] / 255.0 - np.asarray(dinov2.IMAGENET_MEAN)) / np.asarray(dinov2.IMAGENET_STD)
  tokens = training.dino.model.apply(training.dino.variables, jnp.asarray(pixels, jnp.float32))["patch_tokens"]
  want = np.asarray(tokens).reshape(features.shape)
  np.testing.assert_array_equal(features, features.astype(np.float16).astype(np.float32))
  np.testing.assert_allclose(features, want, rtol=2e-3, atol=1e-4)
  _, meta = _run_and_export(cfg, training, tmp_path)
  assert meta["trained_on"]["dino_sha256"] == training.dino.info["sha256"]
  assert (meta["trained_on"]["resize"], meta["trained_on"]["resolution"]) == (256, 224)


def _feature_file(path, n=40, seed=0):
  """A feature file as extract_dinov2_feature.py writes it: float16 patch and cls tokens, int64 labels."""
  tokens = _features(n, seed).reshape(n, GRID * GRID, FEATURES).astype(np.float16)
  save_file({"patch_tokens": tokens, "cls_tokens": tokens[:, 0] * 2, "class_indices": np.arange(n) % 10}, str(path))
  return tokens


def test_short_run_from_a_feature_file(tmp_path):
  tokens = _feature_file(tmp_path / "train.safetensors")
  cfg = _smoke_config(source="features", features_path=str(tmp_path / "train.safetensors"))
  cfg.dino.random_init = False  # no DINOv2 is needed, nor loaded
  training = semvae.prepare(cfg)
  assert training.dino is None and (len(training.train_set), len(training.heldout_set)) == (24, 16)
  batch = next(training.make_data(None, 0))
  assert batch["features"].shape == (8, GRID, GRID, FEATURES) and batch["features"].dtype == np.float32
  for row, index in zip(batch["features"], batch["index"]):  # the file's float16 values, exactly, as token grids
    np.testing.assert_array_equal(row, tokens[index].astype(np.float32).reshape(GRID, GRID, FEATURES))
  assert batch["label"].tolist() == (batch["index"] % 10).tolist()
  _, meta = _run_and_export(cfg, training, tmp_path / "run")
  assert meta["trained_on"]["features_path"] == str(tmp_path / "train.safetensors")


def test_feature_file_is_read_lazily_and_checked(tmp_path):
  tokens = _feature_file(tmp_path / "f.safetensors", n=3)
  records = features_lib.FeatureFile(tmp_path / "f.safetensors")
  assert len(pickle.dumps(records)) < 1000  # a grain worker gets the path, not the arrays
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(records))[2]["features"].reshape(-1, FEATURES),
                                tokens[2].astype(np.float32))
  page = tmp_path / "page.safetensors"
  page.write_text("<!DOCTYPE html><html><body>Not Found</body></html>")  # a failed download
  with pytest.raises(UserError, match=f"{page} is not a .safetensors file"):
    features_lib.FeatureFile(page)
  save_file({"latents": np.zeros((2, 4), np.float32)}, str(tmp_path / "other.safetensors"))
  with pytest.raises(UserError, match="has no patch_tokens, class_indices"):
    features_lib.FeatureFile(tmp_path / "other.safetensors")


def test_an_export_of_the_earlier_semvae_says_to_convert_again(tmp_path):
  """An export of the paper-summary SemVAE sfd_jax had before the official module (params `proj_in`,
  `blocks_0`, ...): one sentence, not orbax's tree mismatch."""
  old = {"encoder": {"proj_in": {"kernel": np.zeros((FEATURES, 32), np.float32)},
                     "blocks_0": {"norm1": {"scale": np.ones(32, np.float32)}}},
         "decoder": {"proj_out": {"kernel": np.zeros((32, FEATURES), np.float32)}}}
  export.save_model(tmp_path / "old", _tiny(), {"params": old})
  with pytest.raises(UserError, match="earlier sfd_jax .*cli.convert --kind=semvae.* or retrain"):
    export.load_model(tmp_path / "old")


def test_bad_settings_name_the_fix(tmp_path):
  with pytest.raises(UserError, match="fewer than one evaluation batch"):
    semvae.prepare(_smoke_config(heldout_images=4))
  with pytest.raises(UserError, match="config.data.features_path is empty"):
    semvae.prepare(_smoke_config(source="features"))
  with pytest.raises(UserError, match=f"the feature file {tmp_path / 'none.safetensors'} does not exist"):
    semvae.prepare(_smoke_config(source="features", features_path=str(tmp_path / "none.safetensors")))
  with pytest.raises(UserError, match="config.data.source 'folder' is not one of"):
    semvae.prepare(_smoke_config(source="folder"))
  with pytest.raises(UserError, match="resize 200 is smaller than the 224 px centre crop"):
    semvae.prepare(_smoke_config(resize=200))
  with pytest.raises(UserError, match="resolution 230 is not a multiple of DINOv2's 14 px patches"):
    semvae.prepare(_smoke_config(resolution=230, resize=256))
  cfg = _smoke_config()
  cfg.dino.random_init = False
  with pytest.raises(UserError, match="config.dino.path is empty"):
    semvae.prepare(cfg)
