"""A run is sampled with the schedule it was trained with, from one place: a run trained by `cli.train` with a
custom piecewise-linear schedule is sampled with it by `cli.sample` (no flag), by its periodic sample grid and by
the in-training evaluation; a random_offset run samples with its fixed Δ; exports store the schedule; `--delta_t`
overrides only an offset's Δ; official weights keep their `semfirst_delta_t`."""
import json
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from sfd_jax import generate
from sfd_jax.convert import export
from sfd_jax.diffusion import sampler, schedule as schedule_lib
from sfd_jax.errors import UserError
from sfd_jax.models.dit import LightningDiT
from sfd_jax.models.texture_vae import AutoencoderKL
from sfd_jax.training import evaluation
from tests.golden import REPO, subprocess_env
from tests.test_no_recompile import lowerings

SMOKE = str(REPO / "configs" / "smoke.py")
KNOTS = ((0.0, 0.0, 0.0), (0.4, 0.0, 0.6), (1.0, 0.7, 1.0), (1.3, 1.0, 1.0))
MEAN, STD = 0.5, 2.0  # the texture stats given to the decoder
NUM_IMAGES, NUM_STEPS = 4, 3  # cli.sample: 4 images, Euler on 3 grid points
TRAINED = ("--config.total_steps=20", "--config.ckpt_every=20", "--config.optim.lr=1e-2", "--config.optim.ema_decay=0")


def _run(*args):
  result = subprocess.run([sys.executable, "-m", *args], env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _sample_cli(workdir, vae_root, out):
  _run("sfd_jax.cli.sample", f"--model={workdir}", f"--vae={vae_root / 'vae'}", f"--stats={vae_root / 'stats.json'}",
       f"--out={out}", f"--num_images={NUM_IMAGES}", f"--batch_size={NUM_IMAGES}", "--method=euler",
       f"--num_steps={NUM_STEPS}", "--seed=0")
  return np.load(out / "samples.npz")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A random texture VAE (32 channels, 4 × 4 latents → 8 × 8 images) with its stats, and two tiny runs of
  `cli.train` sampled by `cli.sample` without a schedule flag: one with the piecewise-linear KNOTS (a sample grid at
  its last step), one random_offset with Δ = 0.6 for sampling. A high learning rate and the EMA equal to the params
  move the zero-initialised output layer enough in 20 steps that the schedules give visibly different images."""
  root = tmp_path_factory.mktemp("schedule_runs")
  vae = AutoencoderKL(ch=32, ch_mult=(1, 1), num_res_blocks=0, attn_resolutions=(), resolution=8, z_channels=32,
                      embed_dim=32)
  export.save_model(root / "vae", vae, {"params": vae.init(jax.random.key(0), np.zeros((1, 8, 8, 3)))["params"]})
  (root / "stats.json").write_text(json.dumps({"texture": {"mean": [MEAN] * 32, "std": [STD] * 32}}))
  knots = "(" + ",".join(f"({a},{b},{c})" for a, b, c in KNOTS) + ")"
  _run("sfd_jax.cli.train", f"--config={SMOKE}", f"--workdir={root / 'piecewise'}",
       "--config.loss.schedule.kind=piecewise_linear", f"--config.loss.schedule.knots={knots}",
       *TRAINED, "--config.sample_every=20")
  _run("sfd_jax.cli.train", f"--config={SMOKE}", f"--workdir={root / 'random'}",
       "--config.loss.schedule.kind=random_offset", "--config.loss.schedule.delta_range=(0.0,0.6)",
       "--config.loss.delta_t=0.6", *TRAINED, "--config.sample_every=0")
  samples = {name: _sample_cli(root / name, root, root / f"samples_{name}") for name in ("piecewise", "random")}
  return types.SimpleNamespace(root=root, samples=samples)


def _reference_images(workdir, vae_root, labels, schedule):
  """The run's EMA weights sampled by `sampler.sample` with `schedule` (Euler, cli.sample's noise), decoded."""
  model, variables, _ = generate.load_training_run(workdir)
  z = sampler.noise(generate.run_keys(0)[0], jnp.arange(NUM_IMAGES), (4, 4, model.in_channels))
  final, _ = sampler.sample(sampler.model_velocity(model, variables), z, jnp.asarray(labels, jnp.int32),
                            schedule=schedule, method="euler", num_steps=NUM_STEPS, semantic_channels=16)
  vae, vae_variables, _ = export.load_model(vae_root / "vae")
  decoded = vae.apply(vae_variables, final[..., :32] * STD + MEAN, method=vae.decode)
  return np.clip(127.5 * np.asarray(decoded) + 128, 0, 255).astype(np.uint8)


@pytest.mark.slow  # two CLI trainings (minutes): the full tier; the fast tier keeps the unit tests below
def test_cli_sample_uses_the_runs_piecewise_linear_schedule(runs):
  batch = runs.samples["piecewise"]
  workdir = runs.root / "piecewise"
  _, _, stored = generate.load_training_run(workdir)
  np.testing.assert_array_equal(stored["schedule"].to_metadata()["knots"], np.float32(KNOTS))
  expected = _reference_images(workdir, runs.root, batch["arr_1"], schedule_lib.piecewise_linear(KNOTS))
  assert np.abs(batch["arr_0"].astype(int) - expected).max() <= 1
  sfd = _reference_images(workdir, runs.root, batch["arr_1"], schedule_lib.Offset(0.3))
  assert np.abs(batch["arr_0"].astype(int) - sfd).max() > 3  # the run's config also says loss.delta_t = 0.3


@pytest.mark.slow  # two CLI trainings (minutes): the full tier; the fast tier keeps the unit tests below
def test_cli_sample_uses_a_random_offset_runs_fixed_delta(runs):
  batch = runs.samples["random"]
  workdir = runs.root / "random"
  expected = _reference_images(workdir, runs.root, batch["arr_1"], schedule_lib.Offset(0.6))
  assert np.abs(batch["arr_0"].astype(int) - expected).max() <= 1
  default = _reference_images(workdir, runs.root, batch["arr_1"], schedule_lib.Offset(0.3))
  assert np.abs(batch["arr_0"].astype(int) - default).max() > 3


@pytest.mark.slow  # two CLI trainings (minutes): the full tier; the fast tier keeps the unit tests below
def test_the_sample_grid_during_training_used_the_schedule(runs):
  """The statistics the periodic sample grid logged at step 20 are those of the step-20 EMA weights sampled with
  KNOTS (the smoke config: 8 images, Euler on 8 points, labels 0..7, `sample.seed` noise)."""
  workdir = runs.root / "piecewise"
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  grid = next(r for r in logged if r["step"] == 20 and "sample/semantic_mean" in r)
  cfg = ConfigDict(json.loads((workdir / "config.json").read_text()))
  model, variables, _ = generate.load_training_run(workdir)
  z = sampler.noise(jax.random.key(cfg.sample.seed), jnp.arange(8), (4, 4, 48))

  def streams(schedule):
    final, _ = sampler.sample(sampler.model_velocity(model, variables), z, jnp.arange(8, dtype=jnp.int32),
                              schedule=schedule, method="euler", num_steps=8)
    return np.asarray(final[..., :32]).mean(), np.asarray(final[..., 32:]).mean()

  expected = streams(schedule_lib.piecewise_linear(KNOTS))
  np.testing.assert_allclose((grid["sample/texture_mean"], grid["sample/semantic_mean"]), expected, rtol=1e-4,
                             atol=1e-5)
  assert not np.allclose(streams(schedule_lib.Offset(0.3)), expected, rtol=1e-3, atol=1e-4)


@pytest.mark.slow  # two CLI trainings (minutes): the full tier; the fast tier keeps the unit tests below
def test_the_evaluation_during_training_uses_the_schedule_and_one_program_per_guidance_rule(runs):
  """An evaluation of the run (cli.sample's settings) scores cli.sample's images; its CFG scales share one compiled
  generator (a second scale compiles nothing)."""
  workdir = runs.root / "piecewise"
  cfg = ConfigDict(json.loads((workdir / "config.json").read_text()))
  cfg.update(eval_every=20)
  cfg.sample.texture_vae = str(runs.root / "vae")
  cfg.eval.update(num_samples=NUM_IMAGES, batch_size=NUM_IMAGES, method="euler", num_steps=NUM_STEPS, seed=0,
                  cfg_scales=(1.0, 1.5, 2.0))
  model, variables, _ = generate.load_training_run(workdir)
  seen = {}

  def count(images, labels):
    seen.setdefault("images", images)
    seen.setdefault("labels", labels)
    return {"count": len(images)}

  stats = {"texture": {"mean": [MEAN] * 32, "std": [STD] * 32}}
  evaluate = evaluation.Evaluation(cfg, model, stats, evaluation.Metrics(("count",), count))
  assert sorted(evaluate.generators) == ["cfg", "none"]

  class Writer:
    def write_scalars(self, step, record):
      seen["record"] = (step, record)

  state = types.SimpleNamespace(ema_params=variables["params"])
  evaluate(state, 20, Writer())  # the training loop's call: the run's schedule from its config and state
  batch = runs.samples["piecewise"]
  np.testing.assert_array_equal(seen["images"], batch["arr_0"])
  np.testing.assert_array_equal(seen["labels"], batch["arr_1"])
  assert seen["record"][0] == 20 and seen["record"][1]["eval/cfg2/count"] == NUM_IMAGES
  with lowerings() as compiled:
    images, labels, _ = evaluate.sample(variables["params"], 3.0)  # a scale it has not sampled yet
  assert compiled == [] and images.shape == batch["arr_0"].shape


def test_the_schedule_is_stored_with_an_export_and_official_weights_keep_their_delta(tmp_path):
  model = LightningDiT(input_size=4, hidden_size=32, depth=1, num_heads=2, num_classes=10, repa_depth=1,
                       repa_projector_dim=16, repa_z_dim=16)
  params = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())["params"]
  params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), params)
  official = {"semfirst_delta_t": 0.25, "semantic_chans": 16}
  piecewise = schedule_lib.piecewise_linear(KNOTS)
  export.save_model(tmp_path / "stored", model, {"params": params}, extra={"official_kwargs": official},
                    schedule=piecewise)
  export.save_model(tmp_path / "official", model, {"params": params}, extra={"official_kwargs": official})
  assert export.load_model(tmp_path / "stored")[2]["schedule"] == piecewise.to_metadata()
  loaded = {name: generate.load_diffusion_model(tmp_path / name) for name in ("stored", "official")}
  assert loaded["stored"][2]["semfirst_delta_t"] == 0.25  # kept beside the schedule, for the official code
  stored = generate.sampling_schedule(loaded["stored"][2], model)
  assert stored.to_metadata() == piecewise.to_metadata()
  assert generate.sampling_schedule(loaded["official"][2], model) == schedule_lib.Offset(0.25)
  with pytest.raises(UserError, match="a Function schedule cannot be stored"):
    export.save_model(tmp_path / "function", model, {"params": params},
                      schedule=schedule_lib.Function(lambda tau: (tau, tau)))
  assert not (tmp_path / "function").exists()


def test_delta_t_overrides_only_an_offset_and_official_weights_default_to_their_delta():
  dual = types.SimpleNamespace(dual_timestep=True)
  assert generate.sampling_schedule({}, dual) == schedule_lib.Offset(0.3)
  assert generate.sampling_schedule({}, types.SimpleNamespace(dual_timestep=False)) == schedule_lib.Offset(0.0)
  assert generate.sampling_schedule({"semfirst_delta_t": 0.1}, dual, 0.4) == schedule_lib.Offset(0.4)
  random = {"schedule": schedule_lib.RandomOffset(0.2, 0.0, 0.6)}
  assert generate.sampling_schedule(random, dual, 0.5) == schedule_lib.RandomOffset(0.5, 0.0, 0.6)
  with pytest.raises(UserError, match=r"^--delta_t=0.2 sets Δ of an offset or random_offset schedule, but this "
                                      r"model was trained with a piecewise_linear schedule: leave --delta_t out"):
    generate.sampling_schedule({"schedule": schedule_lib.piecewise_linear(KNOTS)}, dual, 0.2)
