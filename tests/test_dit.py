"""LightningDiT-SFD: official sizes, strict conversion errors, remat and bf16 variants."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the torch extra; only the Python 3.13 tier runs without it

from sfd_jax.convert import ConversionError, dit_to_torch, load_dit, load_state_dict, select_state_dict
from sfd_jax.models.dit import LightningDiT, lightningdit

# Official counts, with pos_embed, which is an nn.Parameter in the official model.
OFFICIAL_MILLIONS = {"B": (130.3, 137.6), "L": (457.7, 465.5), "XL": (674.6, 682.8), "XXL": (1028.3, 1037.2)}

TINY = dict(input_size=4, patch_size=2, in_channels=48, hidden_size=32, depth=2, num_heads=2, mlp_ratio=4.0,
            num_classes=5, use_repa=True, repa_depth=1, repa_projector_dim=16, repa_dino_version="dinov2_vits14",
            semantic_chans=16, semfirst_delta_t=0.3)


@pytest.mark.parametrize("preset", sorted(OFFICIAL_MILLIONS))
def test_official_parameter_counts(preset):
  for use_repa, expected in zip((False, True), OFFICIAL_MILLIONS[preset]):
    model = lightningdit(preset, use_repa=use_repa)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) + model.grid_size ** 2 * model.hidden_size
    assert round(count / 1e6, 1) == expected, (preset, use_repa, count)


def test_xl_widths():
  model = lightningdit("XL")
  shapes = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())["params"]
  assert shapes["blocks"]["mlp"]["w12"]["kernel"].shape == (28, 1152, 2 * 3072)  # 28 layers stacked
  assert shapes["blocks"]["attn"]["q_norm"]["scale"].shape == (28, 72)
  assert shapes["repa_projector"]["fc_4"]["kernel"].shape == (2048, 768)


@pytest.fixture(scope="module")
def tiny():
  """A random tiny patch-2 model and its official-named state dict."""
  sd = _random_state_dict()
  model, _ = load_dit(TINY, sd)
  return model, sd


def _random_state_dict():
  model = LightningDiT(**{k: v for k, v in dict(TINY, repa_z_dim=384, dual_timestep=True).items()
                          if k not in ("repa_dino_version", "semantic_chans", "semfirst_delta_t")})
  variables = jax.jit(model.init)(jax.random.key(1), *model.dummy_inputs())
  variables = jax.tree.map(lambda p: p + 0.02 * np.random.default_rng(2).normal(size=p.shape), variables)
  return dit_to_torch(model, variables)


def test_fresh_model_outputs_zero():
  """Zero-initialised adaLN and final layer (official init): the velocity of a new model is exactly 0."""
  model = LightningDiT(hidden_size=32, depth=2, num_heads=2, input_size=4, num_classes=5, repa_projector_dim=16)
  x, t, _, y = model.dummy_inputs(2)
  variables = jax.jit(model.init)(jax.random.key(0), x, t, t, y)
  v = jax.jit(model.apply)(variables, jax.random.normal(jax.random.key(1), x.shape), t + 0.5, t + 0.7, y + 1)
  assert np.all(np.asarray(v) == 0)


@pytest.mark.parametrize("damage, key", [
    ("missing", "blocks.1.attn.qkv.bias"),
    ("shape", "final_layer.linear.weight"),
    ("unknown", "blocks.2.norm1.weight"),
    ("constant", "pos_embed"),
])
def test_bad_checkpoint_names_the_key(tiny, damage, key):
  _, sd = tiny
  sd = dict(sd)
  if damage == "missing":
    del sd[key]
  elif damage == "shape":
    sd[key] = sd[key][:-1]
  elif damage == "unknown":
    sd[key] = np.ones(32, np.float32)
  else:
    sd[key] = sd[key] + 1
  with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
    load_dit(TINY, sd)


def test_unsupported_official_switch_is_refused(tiny):
  with pytest.raises(ConversionError, match="use_swiglu=False"):
    load_dit({**TINY, "use_swiglu": False}, tiny[1])


def test_official_checkpoint_file(tiny, tmp_path):
  """A train.py checkpoint {"model", "ema", "opt"} saved through DDP (`module.` prefix) loads its EMA weights."""
  model, sd = tiny
  ema = {f"module.{k}": torch.tensor(v) for k, v in sd.items()}
  model_w = {k: torch.zeros_like(v) for k, v in ema.items()}
  torch.save({"model": model_w, "ema": ema, "opt": {"state": {}}, "step": 7}, tmp_path / "0000007.pt")
  loaded = select_state_dict(load_state_dict(tmp_path / "0000007.pt"))
  _, variables = load_dit(TINY, loaded)
  back = dit_to_torch(model, variables)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])


def test_remat_and_bf16_variants(tiny):
  """Remat changes nothing numerically; bf16 compute stays close to fp32."""
  _, sd = tiny
  model, variables = load_dit(TINY, sd)
  remat_model, _ = load_dit(TINY, sd, remat_policy="dots_saveable")
  bf16_model, _ = load_dit(TINY, sd, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(3), (2, 4, 4, 48))
  t_tex, t_sem, y = jnp.array([0.1, 0.6]), jnp.array([0.4, 0.9]), jnp.array([1, 5])

  def loss(m, p):
    v, z = m.apply(p, x, t_tex, t_sem, y, return_repa=True)
    return jnp.sum(v ** 2) + jnp.sum(z ** 2)

  value, grads = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(variables)
  value_r, grads_r = jax.jit(jax.value_and_grad(lambda p: loss(remat_model, p)))(variables)
  np.testing.assert_allclose(value_r, value, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max()), grads_r, grads)
  v32 = jax.jit(model.apply)(variables, x, t_tex, t_sem, y)
  v16 = jax.jit(bf16_model.apply)(variables, x, t_tex, t_sem, y)
  assert v16.dtype == jnp.float32
  assert float(jnp.linalg.norm(v16 - v32) / jnp.linalg.norm(v32)) < 3e-2
