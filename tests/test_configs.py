"""The shipped configs: official recipe values, locking, and that each builds its model."""
import importlib.util

import jax
import pytest

from sfd_jax.errors import UserError
from sfd_jax.training import config as config_lib
from tests.golden import REPO


def load(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


@pytest.mark.parametrize("name, preset, depth, width", [("sfd_xl", "XL", 28, 1152), ("sfd_xxl", "XXL", 24, 1536),
                                                        ("autoguidance_b", "B", 12, 768)])
def test_official_recipes(name, preset, depth, width):
  c = load(name)
  assert (c.model.depth, c.model.hidden_size, c.model.patch_size, c.model.input_size) == (depth, width, 1, 16)
  assert c.batch_size == 256 and c.optim.lr == 1e-4 and (c.optim.b1, c.optim.b2) == (0.9, 0.999)
  assert c.optim.weight_decay == 0 and c.optim.max_grad_norm == 0 and c.optim.ema_decay == 0.9999
  assert (c.loss.delta_t, c.loss.semantic_weight, c.loss.repa_weight, c.loss.repa_mode) == (0.3, 2.0, 1.0, "cos")
  assert c.loss.time_sampling == "logit_normal" and c.loss.class_dropout == 0.1 and c.loss.use_cosine_loss
  assert (c.model.repa_depth, c.model.repa_projector_dim, c.model.repa_z_dim) == (2, 2048, 768)
  assert c.total_steps == (400_000 if name == "autoguidance_b" else 4_000_000)
  assert (c.sample.method, c.sample.rtol, c.sample.atol, c.sample.cfg_scale) == ("dopri5", 1e-3, 1e-6, 1.0)
  model = config_lib.build_model(c.model)
  shapes = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())
  assert shapes["params"]["blocks"]["attn"]["qkv"]["kernel"].shape == (depth, width, 3 * width)  # layers stacked


def _groups(c, name="config"):
  yield name, c
  for key, value in c.items():
    if hasattr(value, "is_locked"):
      yield from _groups(value, f"{name}.{key}")


@pytest.mark.parametrize("name", ["sfd_xl", "sfd_xxl", "autoguidance_b", "smoke", "semvae", "semvae_smoke"])
def test_every_group_of_every_config_is_locked(name):
  unlocked = [path for path, group in _groups(load(name)) if not group.is_locked]
  assert not unlocked, unlocked  # a new key from Python (a typo) would be accepted there


def test_preset_argument_and_locking():
  assert load("sfd_xl", "B").model.hidden_size == 768
  c = load("smoke")
  with pytest.raises(AttributeError, match="lrr"):
    c.optim.lrr = 1.0
  with pytest.raises(AttributeError, match="hidden"):
    c.model.hidden = 12
  with pytest.raises(UserError, match="unknown LightningDiT preset"):
    config_lib.model_config("XXXL")


@pytest.mark.parametrize("field, value, message", [
    ("scan_unroll", 99, "scan_unroll 99 must lie in"), ("repa_depth", 40, "repa_depth 40 must lie in"),
    ("remat_policy", "dots", "remat_policy 'dots' is not one of"),
    ("num_heads", 5, "hidden_size 1152 must split into 5 heads"),
    ("patch_size", 3, "input_size 16 must be a multiple of patch_size 3")])
def test_model_fields_that_cannot_build_a_network_name_the_field(field, value, message):
  model = config_lib.model_config("XL")
  model[field] = value
  with pytest.raises(UserError, match=f"config.model: {message}"):
    config_lib.build_model(model)
