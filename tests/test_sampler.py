"""The sampler's own properties (the official runs are in tests/parity/test_sampler.py).

- An analytic field checks the phases, masks and model times of dopri5 against the closed-form solution (for
  Δ = 0.3, Δ = 0 and Δ > 1), counts the model calls, and checks Heun's order.
- Guidance: the interval rule per stream and mode; CFG is one forward of the doubled batch with [y | null].
- Image i depends only on (seed, i): noise and labels by index; images 0..7 as one batch or as 2 + 6 among
  other images are the same; 8 fake devices give the images of 1 (subprocess).
- The sample CLI end to end on the golden tiny models: PNGs, resume, npz, demo grid.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sfd_jax.diffusion import sampler
from sfd_jax.models.dit import LightningDiT
from tests.golden import REPO, golden_path, load_golden

E = np.exp(-1.0)


def tiny_model():
  """A 2-block LightningDiT on 4×4 latents with random weights (the official init would make it output zero)."""
  model = LightningDiT(input_size=4, hidden_size=32, depth=2, num_heads=2, num_classes=10, repa_projector_dim=16,
                       repa_z_dim=16)
  rng = np.random.default_rng(0)

  def weight(path, leaf):
    name = path[-1].key
    noise = rng.normal(size=leaf.shape).astype(np.float32)
    if name == "kernel":
      return noise / np.sqrt(np.prod(leaf.shape[:-1]))
    return 1 + 0.1 * noise if name == "scale" else 0.1 * noise

  abstract = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())["params"]
  return model, {"params": jax.tree_util.tree_map_with_path(weight, abstract)}


def analytic_velocity(calls):
  """dx/dτ = −x + g with g = t_tex² on texture and t_sem on semantic channels; every stream moves for unit time,
  so x(1+Δ) = x0/e + (1 − 2/e) (texture), x0/e + 1/e (semantic), whatever Δ. Records (t_tex, t_sem) per call."""
  def fn(x, t_tex, t_sem, y):
    jax.debug.callback(lambda a, b, _: calls.append((float(a), float(b))), t_tex[0], t_sem[0], x[0, 0, 0, 0])
    is_sem = jnp.arange(x.shape[-1]) >= x.shape[-1] - 16
    return -x + jnp.where(is_sem, t_sem[:, None, None, None], t_tex[:, None, None, None] ** 2)
  return fn


def analytic_final(z):
  return np.concatenate([E * z[..., :32] + 1 - 2 * E, E * z[..., 32:] + E], -1)


@pytest.mark.parametrize("delta_t, error_norm", [(0.3, "per_sample"), (0.0, "batch"), (1.5, "batch")])
def test_dopri5_solves_the_three_phase_ode(delta_t, error_norm):
  z = np.asarray(jax.random.normal(jax.random.key(0), (3, 2, 2, 48)))
  calls = []
  final, stats = sampler.sample(analytic_velocity(calls), z, np.zeros(3, np.int32), delta_t=delta_t, rtol=1e-6,
                                atol=1e-8, error_norm=error_norm)
  np.testing.assert_allclose(np.asarray(final), analytic_final(z), rtol=0, atol=2e-6)
  per_call = 3 if error_norm == "per_sample" else 1
  assert len(calls) == per_call * int(stats["model_calls"])
  accepted, rejected = np.asarray(stats["accepted_steps"]), np.asarray(stats["rejected_steps"])
  assert accepted.shape == (3,) and (accepted > 0).all() and (rejected >= 0).all()
  taus = np.array(calls)
  assert (taus >= 0).all() and (taus <= 1).all() and (taus[:, 0] <= taus[:, 1]).all()
  if delta_t == 0.0:  # the ordinary sampler: one time for both streams
    np.testing.assert_array_equal(taus[:, 0], taus[:, 1])


def test_heun_is_second_order():
  z = np.asarray(jax.random.normal(jax.random.key(0), (2, 2, 2, 48)))
  errors = []
  for num_steps in (11, 21):
    final, stats = sampler.sample(analytic_velocity([]), z, np.zeros(2, np.int32), delta_t=0.0, method="heun",
                                  num_steps=num_steps)
    assert int(stats["model_calls"]) == 2 * (num_steps - 1)
    errors.append(np.abs(np.asarray(final) - analytic_final(z)).max())
  assert errors[1] < 1e-3 and 3.5 < errors[0] / errors[1] < 4.5, errors


def test_guidance_interval_per_stream():
  cond, uncond = jnp.full((2, 1, 1, 48), 3.0), jnp.full((2, 1, 1, 48), 1.0)
  t_tex, t_sem = jnp.array([0.05, 0.5]), jnp.array([0.35, 0.8])  # sample 0: texture below start 0.1
  expect_guided = {"tex": 1 + 1.5 * 2, "sem": 1 + 2.5 * 2}
  for mode in sampler.INTERVAL_MODES:
    out = np.asarray(sampler.guide(cond, uncond, t_tex, t_sem, 1.5, 2.5, 0.1, mode))
    tex0 = 3.0 if mode in ("both", "tex") else expect_guided["tex"]
    np.testing.assert_allclose(out[0, ..., :32], tex0)
    np.testing.assert_allclose(out[0, ..., 32:], expect_guided["sem"])
    np.testing.assert_allclose(out[1, ..., :32], expect_guided["tex"])
  # A semantic time below the start: only the modes that cover the semantic stream return the conditional.
  out = np.asarray(sampler.guide(cond, uncond, t_tex, t_sem, 1.5, 2.5, 0.5, "sem"))
  np.testing.assert_allclose(out[0, ..., 32:], 3.0)
  np.testing.assert_allclose(out[0, ..., :32], expect_guided["tex"])
  with pytest.raises(ValueError, match="interval mode"):
    sampler.guide(cond, uncond, t_tex, t_sem, 1.5, 1.5, 0.1, "texture")


def test_cfg_is_one_forward_of_the_doubled_batch():
  seen = []

  class Recorder:
    num_classes = 10

    def apply(self, variables, x, t_tex, t_sem, y):
      seen.append((x.shape[0], np.asarray(y).tolist()))
      return jnp.where(y[:, None, None, None] == 10, 1.0, 3.0) * jnp.ones_like(x)

  velocity = sampler.cfg_velocity(Recorder(), {}, 2.0, 10)
  out = velocity(jnp.zeros((2, 1, 1, 48)), jnp.array([0.5, 0.5]), jnp.array([0.8, 0.8]), jnp.array([4, 7]))
  assert seen == [(4, [4, 7, 10, 10])]
  np.testing.assert_allclose(np.asarray(out), 1 + 2.0 * 2)


def test_noise_and_labels_depend_only_on_the_index():
  key = jax.random.key(3)
  whole = np.asarray(sampler.noise(key, np.arange(8), (2, 2, 48)))
  parts = np.concatenate([sampler.noise(key, np.arange(2), (2, 2, 48)), sampler.noise(key, np.arange(2, 8),
                                                                                      (2, 2, 48))])
  np.testing.assert_array_equal(whole, parts)
  # The official balanced list: fid_num // classes per class in class order, then classes 0..r-1; random beyond.
  official = [c for c in range(10) for _ in range(25 // 10)] + list(range(25 % 10))
  labels = np.asarray(sampler.balanced_labels(key, np.arange(40), 25, 10))
  np.testing.assert_array_equal(labels[:25], official)
  assert ((labels[25:] >= 0) & (labels[25:] < 10)).all()
  np.testing.assert_array_equal(np.asarray(sampler.balanced_labels(key, np.arange(30, 40), 25, 10)), labels[30:])


@pytest.fixture(scope="module")
def tiny():
  return tiny_model()


def test_image_does_not_depend_on_its_batch_mates(tiny):
  """Images 0..7 as one batch, and as 0,1 and 2..7 each completed by other images: same steps, same images."""
  model, variables = tiny
  velocity = sampler.model_velocity(model, variables)

  def run(indices):
    z = sampler.noise(jax.random.key(0), indices, (4, 4, 48))
    final, stats = sampler.sample(velocity, z, sampler.balanced_labels(jax.random.key(1), indices, 16, 10),
                                  delta_t=0.3, rtol=1e-5, atol=1e-7)
    return np.asarray(final), {k: np.asarray(v) for k, v in stats.items()}

  whole, stats = run(np.arange(8))
  first, first_stats = run(np.array([0, 1, 8, 9, 10, 11, 12, 13]))
  rest, rest_stats = run(np.array([14, 2, 3, 4, 5, 6, 7, 15]))
  np.testing.assert_array_equal(np.concatenate([first[:2], rest[1:7]]), whole)
  for name in ("accepted_steps", "rejected_steps"):
    np.testing.assert_array_equal(np.concatenate([first_stats[name][:2], rest_stats[name][1:7]]), stats[name])
  steps = stats["accepted_steps"] + stats["rejected_steps"]
  assert len(set(steps.tolist())) > 1, "the samples should need different steps for this test to bite"


def test_eight_devices_give_the_images_of_one():
  result = subprocess.run([sys.executable, str(REPO / "tests" / "sampler_devices_worker.py")], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu",
                               "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
                               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"})
  assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


def test_bad_arguments_say_what_to_change():
  z, y = np.zeros((2, 2, 2, 48), np.float32), np.zeros(2, np.int32)
  velocity = lambda x, t_tex, t_sem, y: x
  with pytest.raises(ValueError, match="not one of"):
    sampler.sample(velocity, z, y, method="rk4")
  with pytest.raises(ValueError, match="needs num_steps"):
    sampler.sample(velocity, z, y, method="euler")
  with pytest.raises(ValueError, match="one label per sample"):
    sampler.sample(velocity, z, np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="at least 2 grid points"):
    sampler.time_grid(0.3, 1)


def test_sample_cli_end_to_end(tmp_path):
  from sfd_jax import generate as cli
  from sfd_jax.convert import export, load_texture_vae

  dit_config, dit = load_golden("dit_tiny")
  vae_config, vae = load_golden("vae_tiny")
  vae_model, vae_vars = load_texture_vae(vae_config["encoder_decoder_kwargs"],
                                         vae_config["autoencoder_kwargs"]["embed_dim"],
                                         {k: np.asarray(v, np.float32) for k, v in vae["state_dict"].items()})
  export.save_model(tmp_path / "vae", vae_model, vae_vars)
  rng = np.random.default_rng(0)
  (tmp_path / "stats.json").write_text(json.dumps({"texture": {"mean": rng.normal(size=32).tolist(),
                                                               "std": rng.uniform(0.5, 2, size=32).tolist()}}))
  settings = cli.Settings(model=str(golden_path("dit_tiny") / "state_dict.npz"),
                          model_kwargs=dit_config["model_kwargs"], vae=str(tmp_path / "vae"),
                          stats=str(tmp_path / "stats.json"), out=str(tmp_path / "out"), num_images=5,
                          batch_size=4, method="euler", num_steps=4, labels="balanced")
  out = Path(cli.run(settings))
  first = {p.name: p.read_bytes() for p in (out / "images").glob("*.png")}
  assert sorted(first) == [f"{i:06d}.png" for i in range(5)]
  with np.load(out / "samples.npz") as npz:
    images, labels = npz["arr_0"], npz["arr_1"]
  side = 16 * dit_config["model_kwargs"]["input_size"]
  assert images.shape == (5, side, side, 3) and images.dtype == np.uint8 and images.std() > 0
  np.testing.assert_array_equal(labels, [0, 1, 2, 3, 4])
  np.testing.assert_array_equal(images[3], np.asarray(Image.open(out / "images" / "000003.png")))
  # Resume: a deleted image is regenerated identically, the others are left alone.
  (out / "images" / "000003.png").unlink()
  mtime = (out / "images" / "000000.png").stat().st_mtime_ns
  cli.run(settings)
  assert (out / "images" / "000003.png").read_bytes() == first["000003.png"]
  assert (out / "images" / "000000.png").stat().st_mtime_ns == mtime
  demo = cli.run(cli.Settings(**{**vars(settings), "demo": True, "num_images": 2, "out": str(tmp_path / "demo")}))
  assert Image.open(demo / "demo.png").size == (2 * side, side + 14)

