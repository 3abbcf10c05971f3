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
  # Set for a pod as the planner ranks it (README's layout table); the CPU presets keep float32 data parallelism.
  assert (c.model.dtype, c.model.remat_policy, c.mesh.data, c.mesh.fsdp) == ("bfloat16", "dots_saveable", 1, -1)
  for cpu in (load("smoke"), config_lib.base_config()):
    assert (cpu.model.dtype, cpu.model.remat_policy, cpu.mesh.data, cpu.mesh.fsdp) == (
        "float32", "dots_with_no_batch_dims_saveable", -1, 1)
  model = config_lib.build_model(c.model)
  shapes = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())
  assert shapes["params"]["blocks"]["attn"]["qkv"]["kernel"].shape == (depth, width, 3 * width)  # layers stacked


def _fields(c, prefix=""):
  """{dotted name: value} of every leaf field of a config."""
  out = {}
  for key, value in c.items():
    out.update(_fields(value, f"{prefix}{key}.") if hasattr(value, "is_locked") else {f"{prefix}{key}": value})
  return out


def _changed(c, base) -> set:
  ours, theirs = _fields(c), _fields(base)
  assert ours.keys() == theirs.keys()
  return {k for k in ours if ours[k] != theirs[k]}


def test_80_epoch_recipe():
  """configs/sfd/lightningdit_xl/train_80ep_lr2e-4.yaml field by field; every other field as configs/sfd_xl.py."""
  c = load("sfd_xl", "80ep")
  assert _changed(c, load("sfd_xl")) == {"total_steps", "optim.lr", "optim.b2", "loss.repa_weight", "loss.repa_mode",
                                         "ckpt_every", "keep_period"}
  assert (c.model.depth, c.model.hidden_size, c.model.num_heads, c.model.patch_size, c.model.input_size) == (
      28, 1152, 16, 1, 16)
  assert (c.loss.delta_t, c.loss.semantic_weight, c.loss.repa_weight, c.loss.repa_mode) == (0.3, 2.0, 0.5, "cos_mse")
  assert (c.model.repa_depth, c.model.repa_z_dim) == (2, 768)
  assert c.loss.use_cosine_loss and c.loss.time_sampling == "logit_normal" and c.loss.class_dropout == 0.1
  assert (c.batch_size, c.total_steps) == (256, 400_000)
  assert (c.optim.lr, c.optim.b1, c.optim.b2, c.optim.weight_decay, c.optim.max_grad_norm) == (2e-4, 0.9, 0.95, 0, 0)
  assert (c.optim.schedule, c.optim.warmup_steps, c.optim.ema_decay) == ("constant", 0, 0.9999)
  assert (c.ckpt_every, c.keep_period) == (80_000, 80_000)  # upstream writes and keeps a checkpoint every 80K
  assert (c.sample.method, c.sample.rtol, c.sample.atol) == ("dopri5", 1e-3, 1e-6)


def test_retrained_guide():
  """autoguidance_b/inference_retrain.yaml's guide: B/1 for 200K steps, lr 1e-4, β2 0.999, REPA λ 1 'cos', a
  checkpoint every 10K; the one used (60K) is kept."""
  c = load("autoguidance_b", "retrain")
  assert _changed(c, load("autoguidance_b")) == {"total_steps"}
  assert (c.model.depth, c.model.hidden_size, c.model.num_heads, c.model.patch_size) == (12, 768, 12, 1)
  assert (c.total_steps, c.batch_size, c.optim.lr, c.optim.b1, c.optim.b2) == (200_000, 256, 1e-4, 0.9, 0.999)
  assert (c.loss.repa_weight, c.loss.repa_mode, c.model.repa_depth) == (1.0, "cos", 2)
  assert c.ckpt_every == 10_000 and 60_000 % c.ckpt_every == 0 and 60_000 % c.keep_period == 0


def _groups(c, name="config"):
  yield name, c
  for key, value in c.items():
    if hasattr(value, "is_locked"):
      yield from _groups(value, f"{name}.{key}")


@pytest.mark.parametrize("name, arg", [("sfd_xl", None), ("sfd_xl", "80ep"), ("sfd_xxl", None),
                                       ("autoguidance_b", None), ("autoguidance_b", "retrain"), ("smoke", None),
                                       ("semvae", None), ("semvae_smoke", None)])
def test_every_group_of_every_config_is_locked(name, arg):
  unlocked = [path for path, group in _groups(load(name, arg)) if not group.is_locked]
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
