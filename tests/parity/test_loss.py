"""The SFD objective against the official `training_losses` + train.py (golden/transport_loss)."""
import jax
import numpy as np
import pytest

from sfd_jax.convert import load_dit
from sfd_jax.diffusion.loss import loss_terms
from sfd_jax.diffusion.schedule import Offset
from tests.golden import load_golden, nchw_to_nhwc


@pytest.fixture(scope="module")
def setup():
  """The dit_tiny model and weights, and the fixture's loss inputs and settings (repa_mode 'cos')."""
  config, arrays = load_golden("transport_loss")
  model_config, model_arrays = load_golden("dit_tiny")
  state_dict = {k: v.astype(np.float32) for k, v in model_arrays["state_dict"].items()}
  model, variables = load_dit(model_config["model_kwargs"], state_dict)
  kw = config["transport_kwargs"]
  settings = dict(schedule=Offset(kw["semfirst_delta_t"]), semantic_weight=kw["semantic_weight"],
                  repa_weight=kw["repa_weight"], num_classes=config["null_label"],
                  use_cosine_loss=kw["use_cosine_loss"], repa_mode=kw["repa_mode"],
                  semantic_channels=kw["semantic_chans"])
  ref = arrays["loss"]
  dino = nchw_to_nhwc(ref["feature_dino"])
  inputs = (nchw_to_nhwc(ref["x1"]), nchw_to_nhwc(ref["x0"]), ref["t"], ref["y"], ref["drop_mask"].astype(bool),
            dino.reshape(dino.shape[0], -1, dino.shape[-1]))
  return model, state_dict, variables, arrays, inputs, settings


@pytest.fixture(scope="module")
def golden(setup):
  model, state_dict, variables, arrays, inputs, settings = setup

  def total(params):
    terms = loss_terms(model.apply, params, *inputs, **settings)
    return terms["total"], terms

  (_, terms), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(variables)
  return model, state_dict, arrays, terms, grads


def test_loss_terms(golden):
  _, _, arrays, terms, _ = golden
  ref = arrays["loss"]
  for ours, theirs in (("mse", "loss_mse_weighted"), ("cos", "cos_loss"), ("repa", "repa_loss")):
    np.testing.assert_allclose(np.asarray(terms[ours]), ref[theirs], atol=1e-5, rtol=1e-5, err_msg=ours)
  np.testing.assert_allclose(float(terms["total"]), ref["total_loss"], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(terms["t_tex"]), ref["t_tex"], atol=1e-7)
  np.testing.assert_allclose(np.asarray(terms["t_sem"]), ref["t_sem"], atol=1e-7)


def test_gradients(golden):
  model, state_dict, arrays, _, grads = golden
  from sfd_jax.convert import dit_to_torch
  ours = dit_to_torch(model, grads)  # gradients under the official names and layouts
  ref = arrays["grads"]
  assert ref, "no gradients in the fixture"
  for name, g in ref.items():
    key = name.removeprefix("grad/")
    scale = np.abs(g).max()
    np.testing.assert_allclose(ours[key], g, atol=1e-4 * scale, rtol=0, err_msg=key)
  norm = np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in jax.tree.leaves(grads)))
  np.testing.assert_allclose(norm, arrays["loss"]["grad_global_norm"], rtol=1e-4)


def test_every_repa_mode(setup):
  """The three official `repa_mode`s on the fixture's batch: 'cos' is the golden term; 'mse' (the mean of
  (f − z)² over tokens and channels) and 'cos_mse' ((cos + mse) / 2) are computed here in float64 from the
  fixture's DINO features and the model's REPA projection z of the fixture's x_t (whose 'cos' is the golden one)."""
  model, _, variables, arrays, inputs, settings = setup
  ref = arrays["loss"]
  labels = np.where(ref["drop_mask"].astype(bool), settings["num_classes"], ref["y"])
  _, z = jax.jit(lambda v: model.apply(v, nchw_to_nhwc(ref["xt"]), ref["t_tex"], ref["t_sem"], labels,
                                       return_repa=True))(variables)
  z = np.asarray(z, np.float64)
  f = ref["feature_dino"].reshape(*ref["feature_dino"].shape[:2], -1).transpose(0, 2, 1).astype(np.float64)
  cos = np.mean(1 - np.sum(z * f, -1) / (np.linalg.norm(z, axis=-1) * np.linalg.norm(f, axis=-1)), axis=1)
  mse = np.mean((f - z) ** 2, axis=(1, 2))
  np.testing.assert_allclose(cos, ref["repa_loss"], rtol=1e-5)
  expected = {"cos": ref["repa_loss"], "mse": mse, "cos_mse": (cos + mse) / 2}
  terms = jax.jit(lambda v: {mode: loss_terms(model.apply, v, *inputs, **{**settings, "repa_mode": mode})
                             for mode in expected})(variables)
  for mode, want in expected.items():
    np.testing.assert_allclose(np.asarray(terms[mode]["repa"]), want, rtol=1e-5, err_msg=mode)
    total = np.mean(ref["loss_mse_weighted"]) + np.mean(ref["cos_loss"]) + np.mean(want)
    np.testing.assert_allclose(float(terms[mode]["total"]), total, rtol=1e-5, err_msg=mode)
