"""Official LightningDiT-SFD state dicts <-> flax params of `sfd_jax.models.dit.LightningDiT`."""
from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from sfd_jax.convert.common import Rule, flax_from_torch, linear, torch_from_flax
from sfd_jax.convert.io import ConversionError
from sfd_jax.models.dit import LightningDiT, lightningdit, preset_fields
from sfd_jax.models.layers import rope_2d, sincos_2d

# Width of the features each official `repa_dino_version` aligns to (the official constructor's table, and g/14).
REPA_WIDTHS = {"dinov2_vits14": 384, "dinov2_vits14_reg": 384, "dinov2_vitb14": 768, "dinov2_vitb14_reg": 768,
               "dinov2_vitl14": 1024, "dinov2_vitl14_reg": 1024, "dinov2_vitg14": 1536, "dinov2_vitg14_reg": 1536,
               "mae_base": 768, "mae_large": 1024, "clip_vit_base_patch16": 768, "clip_vit_large_patch14": 1024,
               "siglip_base_patch16_224": 768}
# The official constructor's network arguments and their defaults (`LightningDiT.__init__`), which an argument
# that is missing or None takes.
_OFFICIAL_DEFAULTS = {"input_size": 32, "patch_size": 2, "in_channels": 32, "hidden_size": 1152, "depth": 28,
                      "num_heads": 16, "mlp_ratio": 4.0, "num_classes": 1000, "use_repa": False,
                      "repa_dino_version": None, "repa_depth": None, "repa_projector_dim": 2048, "semantic_chans": 0,
                      "semfirst_delta_t": 0.0}
# Official constructor arguments that configure training or sampling, not the network.
_NOT_NETWORK = {"class_dropout_prob", "semfirst_infer_interval_mode", "use_checkpoint"}
# Official switches sfd_jax implements only in their SFD setting (which is what leaving one out means here).
_FIXED = {"learn_sigma": False, "use_qknorm": True, "use_swiglu": True, "use_rope": True, "use_rmsnorm": True,
          "wo_shift": False}


def official_sfd_kwargs(preset: str, **overrides) -> dict:
  """The official constructor kwargs of a released SFD model (`configs/sfd/*/inference.yaml`)."""
  return {**preset_fields(preset), "input_size": 16, "patch_size": 1, "in_channels": 48, "mlp_ratio": 4.0,
          "num_classes": 1000, "learn_sigma": False, "use_qknorm": True, "use_swiglu": True, "use_rope": True,
          "use_rmsnorm": True, "wo_shift": False, "use_repa": True, "repa_dino_version": "dinov2_vitb14_reg",
          "repa_depth": 2, "repa_projector_dim": 2048, "semantic_chans": 16, "semfirst_delta_t": 0.3, **overrides}


def dit_kwargs(official_kwargs: Mapping, **overrides) -> dict:
  """`LightningDiT` fields from the official constructor kwargs (a yaml's, a fixture's, `official_sfd_kwargs`).

  An argument that is missing or None means what it means to the official constructor: its default (so no REPA
  projector, one timestep embedder). The architecture switches of `_FIXED` may be left out; given, they must have
  their SFD value. `overrides` set sfd_jax-only fields (e.g. `dtype`).
  """
  for name, value in _FIXED.items():
    if name in official_kwargs and bool(official_kwargs[name]) != value:
      fixed = ", ".join(f"{k}={v}" for k, v in _FIXED.items())
      raise ConversionError(f"sfd_jax implements the SFD LightningDiT ({fixed});"
                            f" this checkpoint has {name}={official_kwargs[name]}")
  unknown = set(official_kwargs) - set(_OFFICIAL_DEFAULTS) - _NOT_NETWORK - set(_FIXED)
  if unknown:
    raise ConversionError(f"unknown LightningDiT constructor argument(s) {sorted(unknown)}; known: "
                          f"{sorted(set(_OFFICIAL_DEFAULTS) | _NOT_NETWORK | set(_FIXED))}")
  kw = {**_OFFICIAL_DEFAULTS, **{k: v for k, v in official_kwargs.items() if v is not None}}

  def number(name, kind=int):
    try:
      return kind(kw[name])
    except (TypeError, ValueError):
      raise ConversionError(f"LightningDiT argument {name}={kw[name]!r} must be a number") from None

  out = {name: number(name) for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth",
                                         "num_heads", "num_classes")}
  out.update(mlp_ratio=number("mlp_ratio", float), use_repa=bool(kw["use_repa"]),
             dual_timestep=number("semfirst_delta_t", float) > 0 and number("semantic_chans") > 0)
  if out["use_repa"]:
    if kw["repa_dino_version"] is None or kw["repa_depth"] is None:
      raise ConversionError("use_repa=True needs repa_dino_version and repa_depth (the official constructor "
                            f"asserts both); got {kw['repa_dino_version']!r} and {kw['repa_depth']!r}")
    if kw["repa_dino_version"] not in REPA_WIDTHS:
      raise ConversionError(f"unknown repa_dino_version {kw['repa_dino_version']!r}; known: {sorted(REPA_WIDTHS)}")
    out.update(repa_depth=number("repa_depth"), repa_projector_dim=number("repa_projector_dim"),
               repa_z_dim=REPA_WIDTHS[kw["repa_dino_version"]])
  return {**out, **overrides}


def dit_rules(model: LightningDiT) -> list[Rule]:
  """One rule per flax parameter of `model`, naming its official tensor."""
  rules = [Rule(("x_embedder", "kernel"), "x_embedder.proj.weight", "conv"),
           Rule(("x_embedder", "bias"), "x_embedder.proj.bias"),
           Rule(("y_embedder", "embedding"), "y_embedder.embedding_table.weight")]
  for name in (("t_embedder_sem", "t_embedder_tex") if model.dual_timestep else ("t_embedder",)):
    for i in (0, 2):
      rules += linear((name, f"mlp_{i}"), f"{name}.mlp.{i}")
  # The blocks' parameters are stacked on a leading depth axis (one scanned block): layer i is `blocks.{i}`.
  n, f, t = model.depth, "blocks", "blocks.{i}"
  for path in (("norm1",), ("norm2",), ("attn", "q_norm"), ("attn", "k_norm")):
    rules.append(Rule((f, *path, "scale"), f"{t}.{'.'.join(path)}.weight", layers=n))
  for path in (("attn", "qkv"), ("attn", "proj"), ("mlp", "w12"), ("mlp", "w3")):
    rules += linear((f, *path), f"{t}.{'.'.join(path)}", layers=n)
  rules += linear((f, "adaLN_modulation"), f"{t}.adaLN_modulation.1", layers=n)
  rules += [Rule(("final_layer", "norm_final", "scale"), "final_layer.norm_final.weight")]
  rules += linear(("final_layer", "linear"), "final_layer.linear")
  rules += linear(("final_layer", "adaLN_modulation"), "final_layer.adaLN_modulation.1")
  if model.use_repa:
    for i in (0, 2, 4):
      rules += linear(("repa_projector", f"fc_{i}"), f"repa_projector.{i}")
  return rules


def dit_constants(model: LightningDiT) -> dict:
  """The fixed tables the official model keeps in its state dict (pos_embed, RoPE buffers)."""
  cos, sin = rope_2d(model.head_dim, model.grid_size)
  return {"pos_embed": sincos_2d(model.hidden_size, model.grid_size)[None],
          "feat_rope.freqs_cos": cos, "feat_rope.freqs_sin": sin}


def load_dit(official_kwargs: Mapping, state_dict: Mapping[str, np.ndarray], **overrides):
  """(model, variables) from official constructor kwargs and an official state dict, strictly.

  `overrides` set sfd_jax-only fields (e.g. `dtype`, `remat_policy`). Raises `ConversionError` naming the first
  missing, unknown or mis-shaped key.
  """
  model = lightningdit(**dit_kwargs(official_kwargs, **overrides))
  template = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())
  params = flax_from_torch(state_dict, dit_rules(model), template["params"], constants=dit_constants(model),
                           what="LightningDiT checkpoint")
  return model, {"params": params}


def dit_to_torch(model: LightningDiT, variables) -> dict:
  """The official state dict (numpy, torch layouts and names, fixed tables included) of flax `variables`."""
  return torch_from_flax(variables["params"], dit_rules(model), dit_constants(model))
