"""The three-phase sampler against the official runs in golden/sampler.

Every Euler run of the fixture (plain, exact boundary, shift, CFG with interval, AutoGuidance with separate scales)
must reproduce `R/final` within 1e-4, with the golden number of model calls and the same (t_tex, t_sem) of
sample 0 at every call. Dopri5 at the run's tolerances must land within 1e-4 of the converged solution
`exact/final` of reference_ode.npz using no more model calls than the official dopri5 run. All settings come from
the fixture's config.json.
"""
import jax
import numpy as np
import pytest

from sfd_jax.convert import load_dit
from sfd_jax.diffusion import sampler
from tests.golden import load_golden, nchw_to_nhwc

EULER_ATOL = 1e-4  # golden README: Euler finals
TIME_ATOL = 1e-7  # the (t_tex, t_sem) each model call sees
EXACT_ATOL = 1e-4  # dopri5 against the converged solution


@pytest.fixture(scope="module")
def fixture():
  config, arrays = load_golden("sampler")
  dit_config, dit_arrays = load_golden("dit_tiny")
  as_f32 = lambda sd: {k: np.asarray(v, np.float32) for k, v in sd.items()}
  model_kwargs = dit_config["model_kwargs"]
  model, variables = load_dit(model_kwargs, as_f32(dit_arrays["state_dict"]))
  ag_model, ag_variables = load_dit(config["ag_model_kwargs"], as_f32(arrays["ag_state_dict"]))
  return dict(config=config, runs=arrays["sampler"], reference=arrays["reference_ode"], model_kwargs=model_kwargs,
              model=model, variables=variables, ag_model=ag_model, ag_variables=ag_variables,
              z=nchw_to_nhwc(arrays["sampler"]["z"]), y=arrays["sampler"]["y"])


def velocity_for(run, fx):
  """The velocity function of a fixture run: plain, CFG (one doubled forward) or AutoGuidance."""
  semantic = fx["model_kwargs"]["semantic_chans"]
  mode = run.get("cfg_interval_mode", fx["model_kwargs"].get("semfirst_infer_interval_mode", "both"))
  start = run.get("cfg_interval_start", 0.0)
  scale = run.get("cfg_scale", 1.0)
  if run.get("ag"):
    return sampler.autoguidance_velocity(fx["model"], fx["variables"], fx["ag_model"], fx["ag_variables"],
                                         run.get("cfg_scale_tex") or scale, run.get("cfg_scale_sem") or scale,
                                         start, mode, semantic)
  if scale > 1.0:
    return sampler.cfg_velocity(fx["model"], fx["variables"], scale, fx["config"]["null_label"], start, mode,
                                semantic)
  return sampler.model_velocity(fx["model"], fx["variables"])


def recording(velocity_fn, calls, ordered=True):
  """velocity_fn that appends sample 0's (t_tex, t_sem) to `calls` at every evaluation; under a vmap over samples
  it fires once per sample (x is passed along so that the callback is always batched)."""
  def fn(x, t_tex, t_sem, y):
    jax.debug.callback(lambda a, b, _: calls.append((float(a), float(b))), t_tex[0], t_sem[0], x[0, 0, 0, 0],
                       ordered=ordered)
    return velocity_fn(x, t_tex, t_sem, y)
  return fn


def runs_of(fx, method):
  runs = [run for run in fx["config"]["runs"].values() if run["method"] == method]
  assert runs, f"the fixture has no {method} run"
  return runs


def test_time_grids_are_the_official_float32_grids(fixture):
  for run in fixture["config"]["runs"].values():
    if run["method"] == "euler":
      grid = sampler.time_grid(run["delta_t"], run["num_steps"], run["shift"])
      np.testing.assert_array_equal(grid, fixture["runs"][f"{run['name']}/time_grid"], err_msg=run["name"])


def test_euler_runs_match_official(fixture):
  for run in runs_of(fixture, "euler"):
    name, calls = run["name"], []
    final, stats = sampler.sample(recording(velocity_for(run, fixture), calls), fixture["z"], fixture["y"],
                                  delta_t=run["delta_t"], method="euler", num_steps=run["num_steps"],
                                  shift=run["shift"], semantic_channels=fixture["model_kwargs"]["semantic_chans"])
    final = np.asarray(final)
    np.testing.assert_allclose(final, nchw_to_nhwc(fixture["runs"][f"{name}/final"]), rtol=0, atol=EULER_ATOL,
                               err_msg=name)
    assert int(stats["model_calls"]) == run["nfe"] == len(calls), name
    np.testing.assert_allclose(np.array(calls), fixture["runs"][f"{name}/model_calls_t_tex_t_sem"], rtol=0,
                               atol=TIME_ATOL, err_msg=name)


@pytest.mark.parametrize("error_norm", ["per_sample", "batch"])
def test_dopri5_reaches_converged_solution_with_fewer_calls(fixture, error_norm):
  exact = nchw_to_nhwc(fixture["reference"]["exact/final"])
  for run in runs_of(fixture, "dopri5"):
    official = np.abs(nchw_to_nhwc(fixture["runs"][f"{run['name']}/final"]) - exact).max()
    calls = []
    final, stats = sampler.sample(recording(velocity_for(run, fixture), calls, ordered=False), fixture["z"],
                                  fixture["y"], delta_t=run["delta_t"], method="dopri5", rtol=run["rtol"],
                                  atol=run["atol"], error_norm=error_norm,
                                  semantic_channels=fixture["model_kwargs"]["semantic_chans"])
    error = np.abs(np.asarray(final) - exact).max()
    model_calls = int(stats["model_calls"])
    print(f"{run['name']} ({error_norm}): max |ours - exact| {error:.2e} with {model_calls} calls; "
          f"official {official:.2e} with {run['nfe']}")
    assert error < EXACT_ATOL, run["name"]
    assert model_calls <= run["nfe"], run["name"]
    # The count is exact: the callback fires once per model call (per sample when the samples are vmapped).
    per_call = len(fixture["y"]) if error_norm == "per_sample" else 1
    assert len(calls) == per_call * model_calls, run["name"]
    assert all(0.0 <= t_tex <= t_sem <= 1.0 for t_tex, t_sem in calls), "model evaluated outside [0, 1+Δ]"
