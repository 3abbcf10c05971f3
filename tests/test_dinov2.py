"""DINOv2 presets: official parameter counts and widths, output shapes, input checks (shapes only, no compiling)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the torch extra; only the Python 3.13 tier runs without it
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from sfd_jax.convert.dinov2 import dinov2_kwargs
from sfd_jax.models.dinov2 import PRESETS, bicubic_matrix, dinov2, preprocess_repa


def _param_count(model):
  shapes = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_parameter_counts_match_transformers(preset):
  """Against `Dinov2WithRegistersModel` at the hub configs (patch 14, 518 px, 4 registers), built on meta."""
  p = PRESETS[preset]
  config = Dinov2WithRegistersConfig(hidden_size=p["hidden_size"], num_hidden_layers=p["depth"],
                                     num_attention_heads=p["num_heads"], use_swiglu_ffn=p.get("swiglu", False),
                                     patch_size=14, image_size=518, num_register_tokens=4)
  with torch.device("meta"):
    expected = sum(t.numel() for t in Dinov2WithRegistersModel(config).parameters())
  assert _param_count(dinov2(preset)) == expected


def test_config_json_defaults_are_transformers_defaults():
  """A config.json lists only non-default entries; read as JSON, the rest must be what transformers fills in."""
  sparse = {"model_type": "dinov2_with_registers", "hidden_size": 384, "num_attention_heads": 6}
  assert dinov2_kwargs(sparse) == dinov2_kwargs(Dinov2WithRegistersConfig(**sparse).to_dict())
  assert dinov2_kwargs({}) == dinov2_kwargs(Dinov2WithRegistersConfig())


def test_b14_reg_size_and_widths():
  model = dinov2("dinov2_vitb14_reg")
  assert round(_param_count(model) / 1e6, 1) == 86.6  # registers, mask token and the 37×37 table included
  shapes = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())["params"]
  assert shapes["pos_embed"].shape == (1, 37 * 37 + 1, 768)
  assert shapes["register_tokens"].shape == (1, 4, 768)
  assert shapes["blocks_0"]["mlp"]["fc1"]["kernel"].shape == (768, 3072)
  giant = jax.eval_shape(dinov2("g").init, jax.random.key(0), *dinov2("g").dummy_inputs())["params"]
  assert giant["blocks_0"]["mlp"]["w12"]["kernel"].shape == (1536, 2 * 4096)


@pytest.mark.parametrize("pixels, grid", [(224, 16), (256, 18)])
def test_output_shapes(pixels, grid):
  model = dinov2("B")
  params = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())
  out = jax.eval_shape(model.apply, params, jax.ShapeDtypeStruct((3, pixels, pixels, 3), jnp.float32))
  assert out["patch_tokens"].shape == (3, grid * grid, 768)
  assert out["cls_token"].shape == (3, 768)
  assert out["register_tokens"].shape == (3, 4, 768)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(out))


def test_bicubic_rows_are_partitions_of_unity():
  for antialias in (False, True):
    for n_in, n_out in ((37, 16), (16, 37), (256, 224)):
      np.testing.assert_allclose(bicubic_matrix(n_in, n_out, antialias).sum(1), 1, atol=1e-6)


def test_bad_inputs_are_refused():
  with pytest.raises(ValueError, match="unknown DINOv2 preset"):
    dinov2("H")
  with pytest.raises(ValueError, match="uint8 NHWC"):
    preprocess_repa(jnp.zeros((1, 256, 256, 3), jnp.float32))
  with pytest.raises(ValueError, match="< 256"):
    preprocess_repa(jnp.zeros((1, 128, 128, 3), jnp.uint8))
  assert preprocess_repa(jnp.zeros((1, 32, 32, 3), jnp.uint8), 56).shape == (1, 56, 56, 3)
  model = dinov2("S")
  params = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())
  with pytest.raises(ValueError, match="NHWC images with 3 channels"):
    jax.eval_shape(model.apply, params, jax.ShapeDtypeStruct((1, 3, 224, 224), jnp.float32))
