"""DINOv2 with registers against transformers' `Dinov2WithRegistersModel`, and its converters and resizes.

The reference models are built offline from small configs with `torch.manual_seed` and every parameter drawn at
random (layer scales, norms, registers and mask token included, so a swapped or dropped tensor shows). Their
activations stay O(1), so the 1e-5 tolerance is about 3× the float32 noise of torch itself. The REPA recipe
(/255, ImageNet normalisation, bicubic resize, timm's load-time `resample_abs_pos_embed`) is written here with the
torch ops REPA calls.
"""
import json
import re

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the torch extra; only the Python 3.13 tier runs without it
import torch.nn.functional as F
from safetensors.numpy import save_file
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from sfd_jax.convert.dinov2 import dinov2_hf_config, dinov2_to_hf, load_dinov2
from sfd_jax.convert.io import ConversionError
from sfd_jax.models.dinov2 import IMAGENET_MEAN, IMAGENET_STD, preprocess_repa, repa_features, resize_bicubic

TOL = 1e-5
BATCH = 2
# name: (config kwargs, another input size (H, W) that makes the model interpolate its position table)
CONFIGS = {
    "mlp": (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=14, image_size=56,
                 num_register_tokens=4), (73, 45)),  # grid 4×4 → 5×3, pixels beyond the patches dropped
    "swiglu": (dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, patch_size=7, image_size=42,
                    num_register_tokens=2, use_swiglu_ffn=True, layer_norm_eps=1e-5), (35, 63)),  # 6×6 → 5×9
}


def _random_reference(name):
  config = Dinov2WithRegistersConfig(**CONFIGS[name][0])
  torch.manual_seed(0)
  model = Dinov2WithRegistersModel(config).eval()
  with torch.no_grad():
    for key, p in model.named_parameters():
      if key.endswith("lambda1") or (("norm" in key) and key.endswith("weight")):
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif key.startswith("embeddings.") and not key.startswith("embeddings.patch"):
        p.copy_(0.5 * torch.randn_like(p))  # cls, registers, mask token, position table
      else:
        p.copy_(0.05 * torch.randn_like(p))
  return config, model


@pytest.fixture(scope="module")
def references():
  return {name: _random_reference(name) for name in CONFIGS}


@pytest.fixture(scope="module")
def converted(references):
  """name → (flax model, variables, jitted apply) from the in-memory (transformers 5) state dict."""
  out = {}
  for name, (config, torch_model) in references.items():
    model, variables = load_dinov2(torch_model.state_dict(), config)
    out[name] = (model, variables, jax.jit(model.apply))
  return out


def _state_dict(torch_model):
  return {k: v.numpy() for k, v in torch_model.state_dict().items()}


def _images(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _assert_tokens(out, hidden, registers):
  np.testing.assert_allclose(out["cls_token"], hidden[:, 0], atol=TOL, rtol=0)
  np.testing.assert_allclose(out["register_tokens"], hidden[:, 1:1 + registers], atol=TOL, rtol=0)
  np.testing.assert_allclose(out["patch_tokens"], hidden[:, 1 + registers:], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("at", ["config_size", "other_size"])
def test_forward_matches_transformers(references, converted, name, at):
  config, torch_model = references[name]
  _, _, apply = converted[name]
  size = (config.image_size, config.image_size) if at == "config_size" else CONFIGS[name][1]
  images = _images((BATCH, 3) + size)
  with torch.no_grad():
    hidden = torch_model(torch.from_numpy(images)).last_hidden_state.numpy()
  out = apply(converted[name][1], np.moveaxis(images, 1, -1))
  assert out["patch_tokens"].shape == (BATCH, (size[0] // config.patch_size) * (size[1] // config.patch_size),
                                       config.hidden_size)
  _assert_tokens(out, hidden, config.num_register_tokens)


def test_mask_token_matches_bool_masked_pos(references, converted):
  config, torch_model = references["mlp"]
  model, variables, apply = converted["mlp"]
  images = _images((BATCH, 3, config.image_size, config.image_size), seed=1)
  masks = np.random.default_rng(1).random((BATCH, model.grid_size ** 2)) < 0.5
  with torch.no_grad():
    hidden = torch_model(torch.from_numpy(images), bool_masked_pos=torch.from_numpy(masks)).last_hidden_state.numpy()
  _assert_tokens(apply(variables, np.moveaxis(images, 1, -1), masks), hidden, config.num_register_tokens)


def _facebookresearch_names(state_dict, config):
  """The torch.hub `dinov2_vit*14_reg` names of an in-memory HF state dict: fused qkv and w12, ls{1,2}.gamma."""
  sd = {"cls_token": state_dict["embeddings.cls_token"], "mask_token": state_dict["embeddings.mask_token"],
        "pos_embed": state_dict["embeddings.position_embeddings"],
        "register_tokens": state_dict["embeddings.register_tokens"]}
  for s in ("weight", "bias"):
    sd[f"patch_embed.proj.{s}"] = state_dict[f"embeddings.patch_embeddings.projection.{s}"]
    sd[f"norm.{s}"] = state_dict[f"layernorm.{s}"]
    for i in range(config.num_hidden_layers):
      hf, fb = f"encoder.layer.{i}", f"blocks.{i}"
      sd[f"{fb}.norm1.{s}"] = state_dict[f"{hf}.norm1.{s}"]
      sd[f"{fb}.norm2.{s}"] = state_dict[f"{hf}.norm2.{s}"]
      sd[f"{fb}.attn.qkv.{s}"] = np.concatenate([state_dict[f"{hf}.attention.{n}_proj.{s}"] for n in "qkv"])
      sd[f"{fb}.attn.proj.{s}"] = state_dict[f"{hf}.attention.o_proj.{s}"]
      if config.use_swiglu_ffn:
        sd[f"{fb}.mlp.w12.{s}"] = np.concatenate([state_dict[f"{hf}.mlp.gate_proj.{s}"],
                                                  state_dict[f"{hf}.mlp.up_proj.{s}"]])
        sd[f"{fb}.mlp.w3.{s}"] = state_dict[f"{hf}.mlp.down_proj.{s}"]
      else:
        for fc in ("fc1", "fc2"):
          sd[f"{fb}.mlp.{fc}.{s}"] = state_dict[f"{hf}.mlp.{fc}.{s}"]
  for i in range(config.num_hidden_layers):
    sd[f"blocks.{i}.ls1.gamma"] = state_dict[f"encoder.layer.{i}.layer_scale1.lambda1"]
    sd[f"blocks.{i}.ls2.gamma"] = state_dict[f"encoder.layer.{i}.layer_scale2.lambda1"]
  return sd


def _assert_same_params(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_all_namings_give_the_same_params(references, converted, tmp_path, name):
  config, torch_model = references[name]
  model, variables, _ = converted[name]
  fb = _facebookresearch_names(_state_dict(torch_model), config)
  fb_model, fb_variables = load_dinov2(fb, config)
  assert fb_model == model
  _assert_same_params(fb_variables, variables)
  torch_model.save_pretrained(tmp_path)  # checkpoint-file names: attention.attention.query, mlp.weights_in, ...
  dir_model, dir_variables = load_dinov2(tmp_path)
  assert dir_model == model
  _assert_same_params(dir_variables, variables)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_export_round_trip(references, converted, tmp_path, name):
  _, torch_model = references[name]
  model, variables, _ = converted[name]
  save_file(dinov2_to_hf(model, variables), str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(dinov2_hf_config(model)))
  reloaded = Dinov2WithRegistersModel.from_pretrained(tmp_path)
  original = torch_model.state_dict()
  assert set(reloaded.state_dict()) == set(original)
  for key, value in reloaded.state_dict().items():
    torch.testing.assert_close(value, original[key], rtol=0, atol=0, msg=key)
  _assert_same_params(load_dinov2(tmp_path)[1], variables)


def _drop(key):
  return lambda sd: {k: v for k, v in sd.items() if k != key}


def _add(key):
  return lambda sd: {**sd, key: np.zeros(3, np.float32)}


def _reshape(key):
  return lambda sd: {**sd, key: np.zeros(np.shape(sd[key])[:-1] + (np.shape(sd[key])[-1] - 1,), np.float32)}


@pytest.mark.parametrize("naming, edit, key", [
    ("hf", _drop, "encoder.layer.1.norm2.bias"),
    ("hf", _drop, "encoder.layer.0.attention.k_proj.weight"),
    ("hf", _add, "encoder.layer.0.attention.extra.weight"),
    ("hf", _reshape, "encoder.layer.1.attention.v_proj.weight"),
    ("hf", _reshape, "embeddings.position_embeddings"),
    ("fb", _drop, "blocks.0.attn.qkv.weight"),
    ("fb", _add, "head.weight"),
    ("fb", _reshape, "blocks.1.ls2.gamma"),
])
def test_bad_keys_are_named(references, naming, edit, key):
  config, torch_model = references["mlp"]
  sd = _state_dict(torch_model)
  if naming == "fb":
    sd = _facebookresearch_names(sd, config)
  with pytest.raises(ConversionError, match=re.escape(repr(key))):
    load_dinov2(edit(key)(sd), config)


def test_sizes_are_read_off_the_tensors():
  """A bare state dict needs no config at an official width; the head count comes from the preset."""
  config = Dinov2WithRegistersConfig(hidden_size=384, num_hidden_layers=1, num_attention_heads=6, patch_size=14,
                                     image_size=70, num_register_tokens=3)
  with torch.device("meta"):
    shapes = Dinov2WithRegistersModel(config).state_dict()
  sd = {k: np.zeros(v.shape, np.float32) for k, v in shapes.items()}
  model, _ = load_dinov2(sd)
  assert (model.hidden_size, model.depth, model.num_heads, model.num_registers, model.image_size,
          model.patch_size, model.swiglu, model.mlp_ratio) == (384, 1, 6, 3, 70, 14, False, 4.0)
  with pytest.raises(ConversionError, match="does not match preset 'B'"):
    load_dinov2(sd, preset="B")


def test_unofficial_width_needs_a_config(references, tmp_path):
  config, torch_model = references["mlp"]
  with pytest.raises(ConversionError, match="head count is unknown"):
    load_dinov2(_facebookresearch_names(_state_dict(torch_model), config))
  with pytest.raises(ConversionError, match="no config.json"):
    load_dinov2(tmp_path)


@pytest.mark.parametrize("in_size, out_size", [((37, 37), (16, 16)), ((4, 4), (5, 3)), ((256, 256), (224, 224)),
                                               ((6, 7), (13, 2)), ((16, 16), (32, 32))])
@pytest.mark.parametrize("antialias", [False, True])
def test_resize_matches_torch_interpolate(in_size, out_size, antialias):
  x = np.random.default_rng(2).uniform(-2.2, 2.7, (2, 3) + in_size).astype(np.float32)  # normalised-pixel range
  ref = F.interpolate(torch.from_numpy(x), size=out_size, mode="bicubic", align_corners=False,
                      antialias=antialias).numpy()
  out = np.asarray(resize_bicubic(np.moveaxis(x, 1, -1), out_size, antialias=antialias))
  np.testing.assert_allclose(np.moveaxis(out, -1, 1), ref, atol=TOL, rtol=0)


def _repa_torch_input(images_u8):
  """REPA `preprocess_raw_image` for dinov2: x / 255., Normalize(ImageNet), interpolate(224·(res//256), bicubic)."""
  x = torch.from_numpy(np.moveaxis(images_u8, -1, 1).copy()) / 255.
  x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
  return F.interpolate(x, 224 * (x.shape[-1] // 256), mode="bicubic")


@pytest.mark.parametrize("resolution", [256, 512])
def test_preprocess_repa_matches_torch(resolution):
  images = np.random.default_rng(3).integers(0, 256, (2, resolution, resolution, 3), dtype=np.uint8)
  ref = _repa_torch_input(images).numpy()
  out = np.asarray(preprocess_repa(images))
  assert out.shape == (2, 224 * resolution // 256, 224 * resolution // 256, 3)
  np.testing.assert_allclose(np.moveaxis(out, -1, 1), ref, atol=TOL, rtol=0)


def test_repa_features_match_the_repa_recipe(references, converted):
  """REPA resamples the position table once to 16×16 (timm, bicubic antialias, cls kept) and feeds 224 px."""
  config, torch_model = references["mlp"]
  model, variables, _ = converted["mlp"]
  repa_config = Dinov2WithRegistersConfig(**{**CONFIGS["mlp"][0], "image_size": 16 * config.patch_size})
  repa_model = Dinov2WithRegistersModel(repa_config).eval()
  sd = torch_model.state_dict()
  table = sd["embeddings.position_embeddings"]
  grid = model.grid_size
  patch_pos = table[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
  patch_pos = F.interpolate(patch_pos, size=(16, 16), mode="bicubic", antialias=True)
  sd["embeddings.position_embeddings"] = torch.cat([table[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, 256, -1)], 1)
  repa_model.load_state_dict(sd)
  images = np.random.default_rng(4).integers(0, 256, (BATCH, 256, 256, 3), dtype=np.uint8)
  with torch.no_grad():
    hidden = repa_model(_repa_torch_input(images)).last_hidden_state.numpy()
  out = jax.jit(repa_features, static_argnums=0)(model, variables, images)
  np.testing.assert_allclose(out, hidden[:, 1 + config.num_register_tokens:], atol=TOL, rtol=0)
