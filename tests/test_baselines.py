"""The baselines are configs: the plain LightningDiT (`loss.semantic_channels=0`) and SFD without REPA
(`model.use_repa=False`) train through `cli.train` (with the periodic sample grid) and sample through `cli.sample`;
field combinations that cannot mean a baseline, and bad REPA batches, are one sentence each."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from sfd_jax.convert import export
from sfd_jax.diffusion import loss as loss_lib
from sfd_jax.diffusion.schedule import Offset
from sfd_jax.errors import UserError
from sfd_jax.models.texture_vae import AutoencoderKL
from sfd_jax.training import config as config_lib
from tests.golden import REPO, subprocess_env

SMOKE = str(REPO / "configs" / "smoke.py")
PLAIN = ("loss.semantic_channels=0", "model.in_channels=32", "loss.delta_t=0", "model.dual_timestep=False")
BASELINES = {"plain_lightningdit": PLAIN, "no_repa": ("model.use_repa=False",)}
MEAN, STD = 0.5, 2.0  # the synthetic latents' texture stats (data.latents.SyntheticLatents)


def _run(*args):
  result = subprocess.run([sys.executable, "-m", *args], env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.fixture(scope="module")
def vae_files(tmp_path_factory):
  """A random texture VAE for 32 texture channels (4 × 4 latents → 8 × 8 images) and the texture stats."""
  root = tmp_path_factory.mktemp("vae")
  vae = AutoencoderKL(ch=32, ch_mult=(1, 1), num_res_blocks=0, attn_resolutions=(), resolution=8, z_channels=32,
                      embed_dim=32)
  export.save_model(root / "vae", vae, {"params": vae.init(jax.random.key(0), np.zeros((1, 8, 8, 3)))["params"]})
  (root / "stats.json").write_text(json.dumps({"texture": {"mean": [MEAN] * 32, "std": [STD] * 32}}))
  return root


@pytest.fixture(scope="module", params=sorted(BASELINES))
def baseline(request, tmp_path_factory, vae_files):
  """(name, workdir, sample dir) of one baseline trained by `cli.train` (a sample grid at its last step) and sampled
  by `cli.sample` from its workdir: 4 images, Euler on 3 grid points."""
  root = tmp_path_factory.mktemp(request.param)
  _run("sfd_jax.cli.train", f"--config={SMOKE}", f"--workdir={root / 'run'}",
       *[f"--config.{o}" for o in (*BASELINES[request.param], "total_steps=20", "ckpt_every=20", "sample_every=20")])
  _run("sfd_jax.cli.sample", f"--model={root / 'run'}", f"--vae={vae_files / 'vae'}",
       f"--stats={vae_files / 'stats.json'}", f"--out={root / 'samples'}", "--num_images=4", "--batch_size=4",
       "--method=euler", "--num_steps=3", "--seed=0")
  return request.param, root / "run", root / "samples"


def test_baseline_trains_and_samples_the_plain_ode(baseline, vae_files):
  """cli.sample's images are the EMA model's Euler solve of dx/dt = v(x, t, t, y) on the grid 0, ½, 1 from the
  run's noise, decoded from the texture channels — written here without the sampler; the sample grid logged the
  statistics of the streams the model has."""
  from sfd_jax import generate
  from sfd_jax.diffusion import sampler
  name, workdir, samples = baseline
  model, variables, official = generate.load_training_run(workdir)
  assert model.use_repa == (name != "no_repa") and official["semantic_chans"] == (0 if name != "no_repa" else 16)
  assert ("repa_projector" in variables["params"]) == model.use_repa
  batch = np.load(samples / "samples.npz")
  labels = jnp.asarray(batch["arr_1"], jnp.int32)
  noise_key, _ = generate.run_keys(0)
  x = sampler.noise(noise_key, jnp.arange(4), (4, 4, model.in_channels))
  delta = official["semfirst_delta_t"]
  apply = jax.jit(model.apply)
  if name == "no_repa":  # SFD: the semantic stream leads by Δ over τ ∈ [0, 1 + Δ]; a stream's time stays in [0, 1]
    grid = np.linspace(0, 1 + delta, 3)
    for a, b in zip(grid[:-1], grid[1:]):
      t_tex, t_sem = jnp.full((4,), max(a - delta, 0.0)), jnp.full((4,), min(a, 1.0))
      v = apply(variables, x, t_tex, t_sem, labels)
      moving = jnp.where(jnp.arange(48) >= 32, a <= 1.0, a >= delta)
      x = x + (b - a) * jnp.where(moving, v, 0.0)
  else:
    for a, b in ((0.0, 0.5), (0.5, 1.0)):
      x = x + (b - a) * apply(variables, x, jnp.full((4,), a), jnp.full((4,), a), labels)
  vae, vae_variables, _ = export.load_model(vae_files / "vae")
  decoded = vae.apply(vae_variables, x[..., :32] * STD + MEAN, method=vae.decode)
  expected = np.clip(127.5 * np.asarray(decoded) + 128, 0, 255).astype(np.uint8)
  assert np.abs(batch["arr_0"].astype(int) - expected).max() <= 1
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  grid_stats = {k for r in logged for k in r if k.startswith("sample/")}
  streams = ("texture",) if name == "plain_lightningdit" else ("texture", "semantic")
  assert grid_stats == {f"sample/{s}_{stat}" for s in streams for stat in ("mean", "std")}


def test_evaluation_during_training_samples_what_cli_sample_samples(baseline, vae_files):
  """The in-training evaluation of a baseline's EMA weights, at cli.sample's settings, scores cli.sample's images."""
  from sfd_jax import generate
  from sfd_jax.training import evaluation
  _, workdir, samples = baseline
  cfg = ConfigDict(json.loads((workdir / "config.json").read_text()))
  cfg.update(eval_every=20)
  cfg.sample.texture_vae = str(vae_files / "vae")
  cfg.eval.update(num_samples=4, batch_size=4, method="euler", num_steps=3, seed=0)
  model, variables, _ = generate.load_training_run(workdir)
  stats = {"texture": {"mean": [MEAN] * 32, "std": [STD] * 32}}
  metrics = evaluation.Metrics(("count",), lambda images, labels: {"count": len(images)})
  images, labels, _ = evaluation.Evaluation(cfg, model, stats, metrics).sample(variables["params"], 1.0)
  batch = np.load(samples / "samples.npz")
  np.testing.assert_array_equal(images, batch["arr_0"])
  np.testing.assert_array_equal(labels, batch["arr_1"])


@pytest.mark.parametrize("overrides, message", [
    ({"loss.repa_weight": 0.0}, "config.loss.repa_weight=0 with model.use_repa=True would train an unused REPA "
                                "projector: for a run without REPA set --config.model.use_repa=False"),
    ({"loss.semantic_channels": 0, "model.in_channels": 32},
     "config.loss.semantic_channels=0 (the plain LightningDiT) has no semantic stream to run ahead: set "
     "--config.loss.delta_t=0 --config.model.dual_timestep=False"),
    ({"loss.semantic_channels": 0, "model.in_channels": 32, "loss.delta_t": 0.0},
     "config.loss.semantic_channels=0 (the plain LightningDiT) has no semantic stream"),
    ({"loss.semantic_channels": 48}, "config.loss.semantic_channels=48 leaves no texture channel of "
                                     "model.in_channels=48"),
])
def test_fields_that_contradict_each_other_are_one_sentence(overrides, message):
  cfg = config_lib.base_config()
  for name, value in overrides.items():
    group, field = name.split(".")
    cfg[group][field] = value
  with pytest.raises(UserError, match=f"^{message}".replace("(", r"\(").replace(")", r"\)")):
    config_lib.check_values(cfg)


def _repa_terms(dino):
  """loss_terms with a stand-in network returning a zero velocity and projected tokens z (2, 4, 8)."""
  x1 = jnp.ones((2, 2, 2, 48))
  apply_fn = lambda params, x, t_tex, t_sem, y, return_repa: (jnp.zeros_like(x), jnp.ones((2, 4, 8)))
  return loss_lib.loss_terms(apply_fn, None, x1, jnp.zeros_like(x1), jnp.full((2,), 0.5), jnp.zeros((2,), jnp.int32),
                             jnp.zeros((2,), bool), dino, schedule=Offset(0.3), semantic_weight=2.0, repa_weight=1.0,
                             num_classes=10)


def test_bad_repa_batches_are_one_sentence():
  with pytest.raises(UserError, match=r"^REPA is on but the batch has no 'dino' tokens: give batch\['dino'\] of "
                                      r"shape \(2, 4, 8\)"):
    _repa_terms(None)
  with pytest.raises(UserError, match=r"^batch\['dino'\] has shape \(2, 4, 16\) but the REPA projector gives "
                                      r"\(2, 4, 8\)"):
    _repa_terms(jnp.ones((2, 4, 16)))
  # The right shape trains: 1 − cos(z, dino) with dino = −z is 2 per token.
  np.testing.assert_allclose(_repa_terms(-jnp.ones((2, 4, 8)))["repa"], [2.0, 2.0])


def test_use_repa_false_drops_the_term_whatever_the_weight():
  cfg = config_lib.base_config().loss
  apply_fn = lambda params, x, t_tex, t_sem, y: jnp.zeros_like(x)  # a model without the projector
  batch = {"x": jnp.ones((2, 2, 2, 48)), "y": jnp.zeros((2,), jnp.int32)}
  _, metrics = loss_lib.sfd_loss(apply_fn, None, batch, jax.random.key(0), cfg, 10, use_repa=False)
  assert float(metrics["loss_repa"]) == 0.0 and cfg.repa_weight == 1.0


def test_feature_extractor_takes_an_array_of_images_and_names_a_bad_one():
  """Samples held in memory are an image source as `open_images` reads them: a uint8 (N, H, W, 3) array gives the
  network's features of those images; any other array is one sentence."""
  import flax.linen as nn

  from sfd_jax.eval.features import FeatureExtractor

  class StandIn(nn.Module):  # the outputs FeatureExtractor reads from the Inception
    @nn.compact
    def __call__(self, pixels):
      x = pixels.astype(jnp.float32) / 255
      pool = nn.Dense(5)(x.mean(axis=(1, 2)))
      return {"pool": pool, "spatial": jnp.tile(x[:, :3, :4], (1, 1, 1, 3)), "logits_unbiased": 2 * pool}

  images = np.random.default_rng(0).integers(0, 256, (3, 6, 5, 3), dtype=np.uint8)
  model = StandIn()
  variables = model.init(jax.random.key(0), images[:1])
  extract = FeatureExtractor(model, variables, per_device_batch=1)
  expected = jax.device_get(model.apply(variables, images))
  np.testing.assert_allclose(extract(images).pool, expected["pool"], rtol=1e-6, atol=1e-6)
  with pytest.raises(UserError, match=r"^the image array: expected uint8 images \(N, H, W, 3\), got float32 "
                                      r"\(2, 8, 8, 3\)"):
    extract(np.zeros((2, 8, 8, 3), np.float32))


def test_the_plain_lightningdit_reads_the_texture_latents_of_an_sfd_dataset():
  """An SFD latent dataset (texture and semantic latents) trains the plain LightningDiT on its texture alone."""
  from sfd_jax.data import latents as latents_lib
  from sfd_jax.training import tasks
  spec = latents_lib.record_spec(4, 32, 16, 16, 32)
  cfg = config_lib.base_config()
  cfg.model.update(input_size=4, in_channels=32, repa_z_dim=32, dual_timestep=False)
  cfg.loss.update(semantic_channels=0, delta_t=0.0)
  tasks._check_layout(spec, cfg.model, cfg.loss, "data")
  cfg.model.in_channels = 48
  with pytest.raises(UserError, match=r"^the latent dataset data does not fit the model: 32 channels ≠ "
                                      r"model.in_channels 48$"):
    tasks._check_layout(spec, cfg.model, cfg.loss, "data")
  rng = np.random.default_rng(0)
  record = {"texture": rng.normal(size=(4, 4, 32)), "semantic": rng.normal(size=(4, 4, 16)), "label": 3, "index": 7}
  stats = {"texture": {"mean": [0.5] * 32, "std": [2.0] * 32}, "semantic": {"mean": [1.0] * 16, "std": [3.0] * 16}}
  x = latents_lib.normalizer(stats, use_dino=False, use_semantic=False)((record, False))["x"]
  assert x.shape == (4, 4, 32)
  np.testing.assert_allclose(x, (record["texture"] - 0.5) / 2.0, rtol=1e-6, atol=1e-6)
