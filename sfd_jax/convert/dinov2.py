"""DINOv2-with-registers checkpoints <-> flax params of `sfd_jax.models.dinov2.DINOv2`, strictly.

Two namings are read:
- facebookresearch/dinov2 (`torch.hub` `dinov2_vit*14_reg` files): `cls_token`, `pos_embed`, `register_tokens`,
  `mask_token`, `patch_embed.proj.*`, `blocks.{i}.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1/fc2 or
  mlp.w12/w3, ls2.gamma}`, `norm.*`. The flax params use these names, so this is a plain rule list.
- Hugging Face `Dinov2WithRegistersModel`: `embeddings.*`, `encoder.layer.{i}.*`, `layernorm.*`, with separate
  q/k/v (and gate/up for SwiGLU), either in checkpoint-file names (`attention.attention.query`,
  `attention.output.dense`, `mlp.weights_in`; what the hub files and `save_pretrained` hold) or in transformers 5
  in-memory names (`attention.q_proj`, `attention.o_proj`, `mlp.gate_proj`/`up_proj`/`down_proj`;
  `model.state_dict()`). They are first mapped onto the facebookresearch names, fusing q/k/v and gate/up; errors
  there name the Hugging Face key.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import flax
import jax
import numpy as np

from sfd_jax.convert.common import Rule, conv, flax_from_torch, linear, norm, torch_from_flax
from sfd_jax.convert.io import ConversionError, load_state_dict, select_state_dict, to_numpy
from sfd_jax.models.dinov2 import PRESETS, DINOv2, dinov2

_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Heads of the official widths: a facebookresearch state dict does not record them.
_HEADS_BY_WIDTH = {p["hidden_size"]: p["num_heads"] for p in PRESETS.values()}


def dinov2_rules(model: DINOv2) -> list[Rule]:
  """One rule per flax parameter of `model`, naming its facebookresearch/dinov2 tensor."""
  rules = [Rule((name,), name) for name in ("cls_token", "pos_embed", "register_tokens", "mask_token")]
  rules += conv(("patch_embed",), "patch_embed.proj")
  for i in range(model.depth):
    f, t = f"blocks_{i}", f"blocks.{i}"
    rules += norm((f, "norm1"), f"{t}.norm1") + norm((f, "norm2"), f"{t}.norm2")
    rules += linear((f, "attn", "qkv"), f"{t}.attn.qkv") + linear((f, "attn", "proj"), f"{t}.attn.proj")
    rules += [Rule((f, "ls1", "gamma"), f"{t}.ls1.gamma"), Rule((f, "ls2", "gamma"), f"{t}.ls2.gamma")]
    for layer in (("w12", "w3") if model.swiglu else ("fc1", "fc2")):
      rules += linear((f, "mlp", layer), f"{t}.mlp.{layer}")
  return rules + norm(("norm",), "norm")


def _hf_layout(model: DINOv2) -> dict[str, list[tuple[str, ...]]]:
  """{facebookresearch key: namings}; a naming is the tuple of Hugging Face keys concatenated along dim 0 to make
  that tensor. The checkpoint-file naming comes first, then the transformers 5 in-memory naming."""
  layout = {"cls_token": [("embeddings.cls_token",)], "mask_token": [("embeddings.mask_token",)],
            "pos_embed": [("embeddings.position_embeddings",)],
            "register_tokens": [("embeddings.register_tokens",)]}
  for s in ("weight", "bias"):
    layout[f"patch_embed.proj.{s}"] = [(f"embeddings.patch_embeddings.projection.{s}",)]
    layout[f"norm.{s}"] = [(f"layernorm.{s}",)]
  for i in range(model.depth):
    fb, hf = f"blocks.{i}", f"encoder.layer.{i}"
    layout[f"{fb}.ls1.gamma"] = [(f"{hf}.layer_scale1.lambda1",)]
    layout[f"{fb}.ls2.gamma"] = [(f"{hf}.layer_scale2.lambda1",)]
    for s in ("weight", "bias"):
      layout[f"{fb}.norm1.{s}"] = [(f"{hf}.norm1.{s}",)]
      layout[f"{fb}.norm2.{s}"] = [(f"{hf}.norm2.{s}",)]
      layout[f"{fb}.attn.qkv.{s}"] = [tuple(f"{hf}.attention.attention.{n}.{s}" for n in ("query", "key", "value")),
                                      tuple(f"{hf}.attention.{n}_proj.{s}" for n in "qkv")]
      layout[f"{fb}.attn.proj.{s}"] = [(f"{hf}.attention.output.dense.{s}",), (f"{hf}.attention.o_proj.{s}",)]
      if model.swiglu:
        layout[f"{fb}.mlp.w12.{s}"] = [(f"{hf}.mlp.weights_in.{s}",),
                                       (f"{hf}.mlp.gate_proj.{s}", f"{hf}.mlp.up_proj.{s}")]
        layout[f"{fb}.mlp.w3.{s}"] = [(f"{hf}.mlp.weights_out.{s}",), (f"{hf}.mlp.down_proj.{s}",)]
      else:
        layout[f"{fb}.mlp.fc1.{s}"] = [(f"{hf}.mlp.fc1.{s}",)]
        layout[f"{fb}.mlp.fc2.{s}"] = [(f"{hf}.mlp.fc2.{s}",)]
  return layout


def _torch_shapes(template, rules: list[Rule]) -> dict[str, tuple[int, ...]]:
  flat = flax.traverse_util.flatten_dict(template)
  return {r.torch_key: r.torch_shape(flat[r.flax_path].shape) for r in rules}


def _is_hf(state_dict: Mapping) -> bool:
  return any(k.startswith(("embeddings.", "encoder.layer.", "layernorm.")) for k in state_dict)


def _fb_from_hf(state_dict: Mapping, model: DINOv2, shapes: Mapping[str, tuple[int, ...]]) -> dict:
  """The facebookresearch-named state dict of a Hugging Face one. Keys it does not know are passed through, so the
  strict conversion names them."""
  out, used, missing = {}, set(), []
  for fb_key, namings in _hf_layout(model).items():
    found = next((keys for keys in namings if all(k in state_dict for k in keys)), None)
    if found is None:
      closest = max(namings, key=lambda keys: sum(k in state_dict for k in keys))  # ties: the file naming
      missing += [k for k in closest if k not in state_dict]
      continue
    want = shapes[fb_key]
    part = (want[0] // len(found),) + want[1:]
    for key in found:
      got = tuple(np.shape(state_dict[key]))
      if got != part:
        raise ConversionError(f"DINOv2 checkpoint key {key!r} has shape {got} but the model expects {part}; "
                              "the file was made for a different model configuration")
    out[fb_key] = np.concatenate([np.asarray(state_dict[k]) for k in found], axis=0)
    used.update(found)
  if missing:
    shown = ", ".join(repr(k) for k in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    raise ConversionError(f"DINOv2 checkpoint is missing {len(missing)} key(s) the model needs: {shown}")
  out.update({k: v for k, v in state_dict.items() if k not in used})
  return out


def _square(value, name: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ConversionError(f"DINOv2 config {name}={value} is not square; only square sizes are supported")
    value = value[0]
  return int(value)


# `Dinov2WithRegistersConfig`'s defaults: a config.json lists only the entries that differ from them.
_HF_CONFIG_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                           hidden_act="gelu", layer_norm_eps=1e-6, image_size=224, patch_size=16, num_channels=3,
                           qkv_bias=True, layerscale_value=1.0, use_swiglu_ffn=False, num_register_tokens=4)


def dinov2_kwargs(hf_config) -> dict:
  """`DINOv2` fields from a Hugging Face `Dinov2WithRegistersConfig` (its config.json dict, or the object; missing
  entries take transformers' defaults, as `from_pretrained` would). Read as plain JSON: no transformers needed."""
  cfg = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
  model_type = cfg.get("model_type", "dinov2_with_registers")
  if model_type != "dinov2_with_registers":
    raise ConversionError(f"config model_type is {model_type!r}; sfd_jax reads DINOv2 with registers "
                          "(model_type 'dinov2_with_registers', e.g. facebook/dinov2-with-registers-base)")
  cfg = {**_HF_CONFIG_DEFAULTS, **cfg}
  if cfg["hidden_act"] != "gelu" or not cfg["qkv_bias"]:
    raise ConversionError(f"DINOv2 config has hidden_act={cfg['hidden_act']!r}, qkv_bias={cfg['qkv_bias']}; "
                          "sfd_jax implements the official GELU MLP with qkv biases")
  return dict(image_size=_square(cfg["image_size"], "image_size"), patch_size=_square(cfg["patch_size"], "patch_size"),
              in_channels=cfg["num_channels"], hidden_size=cfg["hidden_size"], depth=cfg["num_hidden_layers"],
              num_heads=cfg["num_attention_heads"], mlp_ratio=float(cfg["mlp_ratio"]), swiglu=cfg["use_swiglu_ffn"],
              num_registers=cfg["num_register_tokens"], layer_norm_eps=cfg["layer_norm_eps"],
              layerscale_init=cfg["layerscale_value"])


def _shape(state_dict: Mapping, *names: str) -> tuple[int, ...]:
  for name in names:
    if name in state_dict:
      return tuple(np.shape(state_dict[name]))
  raise ConversionError(f"checkpoint has no {' / '.join(repr(n) for n in names)}; it is not a DINOv2 "
                        "with registers in facebookresearch or Hugging Face names")


def _kwargs_from_shapes(state_dict: Mapping, preset: str | None) -> dict:
  """`DINOv2` fields read off the tensors; the head count comes from `preset` or the official model of that width."""
  width = _shape(state_dict, "cls_token", "embeddings.cls_token")[-1]
  _, channels, patch, _ = _shape(state_dict, "patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight")
  positions = _shape(state_dict, "pos_embed", "embeddings.position_embeddings")[1] - 1
  grid = math.isqrt(positions)
  if grid * grid != positions:
    raise ConversionError(f"the position table has {positions} patch positions, not a square grid")
  registers = _shape(state_dict, "register_tokens", "embeddings.register_tokens")[1]
  blocks = {int(m.group(2)) for k in state_dict if (m := re.match(r"(blocks|encoder\.layer)\.(\d+)\.", k))}
  if not blocks:
    raise ConversionError("checkpoint has no transformer blocks ('blocks.{i}.*' or 'encoder.layer.{i}.*')")
  swiglu = any(k.endswith((".mlp.w12.weight", ".mlp.weights_in.weight", ".mlp.gate_proj.weight")) for k in state_dict)
  mlp_ratio = 4.0
  if not swiglu:
    mlp_ratio = _shape(state_dict, "blocks.0.mlp.fc1.weight", "encoder.layer.0.mlp.fc1.weight")[0] / width
  if preset is not None:
    official = dinov2(preset)
    if official.hidden_size != width:
      raise ConversionError(f"checkpoint width {width} does not match preset {preset!r} "
                            f"(width {official.hidden_size})")
    heads = official.num_heads
  elif width in _HEADS_BY_WIDTH:
    heads = _HEADS_BY_WIDTH[width]
  else:
    raise ConversionError(f"a width-{width} DINOv2 is not an official size, so its head count is unknown; "
                          "pass config= (a Dinov2WithRegistersConfig) or preset=")
  return dict(image_size=grid * patch, patch_size=patch, in_channels=channels, hidden_size=width,
              depth=max(blocks) + 1, num_heads=heads, mlp_ratio=mlp_ratio, swiglu=swiglu, num_registers=registers)


def _read_hf_dir(path: Path):
  config_file = path / "config.json"
  if not config_file.exists():
    raise ConversionError(f"{path} has no config.json; pass a Hugging Face model directory "
                          "(config.json + model.safetensors or pytorch_model.bin) or a weight file")
  weights = next((path / f for f in _HF_WEIGHT_FILES if (path / f).exists()), None)
  if weights is None:
    sharded = " (sharded checkpoints are not supported: merge the shards into model.safetensors)" if any(
        path.glob("*.index.json")) else ""
    raise ConversionError(f"{path} has no {' or '.join(_HF_WEIGHT_FILES)}{sharded}")
  config = json.loads(config_file.read_text())
  return config, select_state_dict(load_state_dict(weights))


def load_dinov2(source, config=None, *, preset: str | None = None, **overrides):
  """(model, {"params": ...}) from a DINOv2-with-registers checkpoint, strictly.

  `source`: a local Hugging Face model directory (config.json + model.safetensors or pytorch_model.bin; the hub
  is never contacted), a weight file (.safetensors, .pth/.pt/.bin, .npz), or a state dict (numpy arrays or CPU
  torch tensors), in facebookresearch/dinov2 or Hugging Face names. `config` (a `Dinov2WithRegistersConfig` or
  its dict) describes the network; a directory brings its own. Without one, the sizes are read off the tensors
  and the head count comes from `preset` (`S`, `B`, `L`, `g`) or the official model of that width.
  `overrides` set sfd_jax-only fields (e.g. `dtype`). Raises `ConversionError` naming a missing, unknown or
  mis-shaped key.
  """
  if config is not None and preset is not None:
    raise ValueError("pass either config or preset, not both")
  if isinstance(source, Mapping):
    state_dict = select_state_dict(to_numpy(source))
  else:
    path = Path(source)
    if path.is_dir():
      if config is not None:
        raise ValueError(f"{path} is a model directory with its own config.json; do not pass config")
      config, state_dict = _read_hf_dir(path)
    else:
      state_dict = select_state_dict(load_state_dict(path))
  kwargs = dinov2_kwargs(config) if config is not None else _kwargs_from_shapes(state_dict, preset)
  model = DINOv2(**kwargs, **overrides)
  rules = dinov2_rules(model)
  template = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())["params"]
  if _is_hf(state_dict):
    state_dict = _fb_from_hf(state_dict, model, _torch_shapes(template, rules))
  params = flax_from_torch(state_dict, rules, template, what="DINOv2 checkpoint")
  return model, {"params": params}


def dinov2_hf_config(model: DINOv2) -> dict:
  """The config.json of a Hugging Face `Dinov2WithRegistersModel` with the architecture of `model`."""
  return {"model_type": "dinov2_with_registers", "architectures": ["Dinov2WithRegistersModel"],
          "hidden_size": model.hidden_size, "num_hidden_layers": model.depth, "num_attention_heads": model.num_heads,
          "mlp_ratio": int(model.mlp_ratio) if float(model.mlp_ratio).is_integer() else model.mlp_ratio,
          "use_swiglu_ffn": model.swiglu, "num_register_tokens": model.num_registers,
          "image_size": model.image_size, "patch_size": model.patch_size, "num_channels": model.in_channels,
          "layer_norm_eps": model.layer_norm_eps, "layerscale_value": model.layerscale_init,
          "hidden_act": "gelu", "qkv_bias": True}


def dinov2_to_hf(model: DINOv2, variables) -> dict:
  """The Hugging Face state dict (numpy, checkpoint-file names as `save_pretrained` writes them) of flax
  `variables`. With `dinov2_hf_config(model)` as config.json it is a model directory `from_pretrained` loads."""
  fb = torch_from_flax(variables["params"], dinov2_rules(model))
  out = {}
  for fb_key, namings in _hf_layout(model).items():
    keys = namings[0]
    for key, part in zip(keys, np.split(fb[fb_key], len(keys), axis=0)):
      out[key] = np.ascontiguousarray(part)
  return out
