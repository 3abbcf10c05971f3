"""Official LDM KL autoencoder state dicts <-> flax params of `sfd_jax.models.texture_vae.AutoencoderKL`.

The flax module names mirror the official ones (`down_2_block_0` is `down.2.block.0`, `mid_attn_1` is
`mid.attn_1`), so the rules are derived from the parameter tree: every module with a kernel is a conv, every other
one a GroupNorm. The official weights come as a Lightning checkpoint (`{"state_dict": ...}`) whose training-loss
networks (`loss.*`: LPIPS, discriminator) are not part of the autoencoder and are skipped; anything else is strict.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import flax
import jax
import numpy as np

from sfd_jax.convert.common import Rule, conv, flax_from_torch, norm, torch_from_flax
from sfd_jax.convert.io import ConversionError, select_state_dict
from sfd_jax.models.texture_vae import AutoencoderKL

# Official Encoder/Decoder kwargs that are `AutoencoderKL` fields of the same name.
_FIELDS = {"ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution", "in_channels", "out_ch",
           "z_channels", "double_z", "resamp_with_conv"}
# Official kwargs that only matter in training (dropout is the identity at inference).
_NOT_NETWORK = {"dropout"}
# Official switches sfd_jax implements only in their default (SD-VAE) setting.
_FIXED = {"use_linear_attn": False, "attn_type": "vanilla", "give_pre_end": False, "tanh_out": False}
# Keys of an official checkpoint that belong to the training loss, not the autoencoder.
IGNORE = (r"loss",)

# flax module name -> official module path.
_NAMES = ((re.compile(r"(down|up)_(\d+)_(block|attn)_(\d+)"), r"\1.\2.\3.\4"),
          (re.compile(r"(down|up)_(\d+)_(downsample|upsample)"), r"\1.\2.\3"),
          (re.compile(r"mid_(block_1|attn_1|block_2)"), r"mid.\1"))


def texture_vae_kwargs(encoder_decoder_kwargs: Mapping) -> dict:
  """`AutoencoderKL` fields (all but `embed_dim`) from the official Encoder/Decoder kwargs (`ddconfig`)."""
  kw = dict(encoder_decoder_kwargs)
  for name, value in _FIXED.items():
    if name in kw and kw.pop(name) != value:
      raise ConversionError(f"sfd_jax implements the LDM KL autoencoder with {name}={value!r} only; "
                            f"this configuration has {name}={encoder_decoder_kwargs[name]!r}")
  for name in _NOT_NETWORK:
    kw.pop(name, None)
  unknown = set(kw) - _FIELDS
  if unknown:
    raise ConversionError(f"unknown Encoder/Decoder argument(s) {sorted(unknown)}; "
                          f"known: {sorted(_FIELDS | _NOT_NETWORK | set(_FIXED))}")
  for name in ("ch_mult", "attn_resolutions"):
    if name in kw:
      kw[name] = tuple(int(v) for v in kw[name])
  return kw


def _torch_name(flax_name: str) -> str:
  for pattern, official in _NAMES:
    if pattern.fullmatch(flax_name):
      return pattern.sub(official, flax_name)
  return flax_name


def texture_vae_rules(params) -> list[Rule]:
  """One rule per leaf of `params` (or of its abstract template), naming its official tensor."""
  leaves = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  rules = []
  for module in sorted({path[:-1] for path in leaves}):
    official = ".".join(_torch_name(name) for name in module)
    rules += conv(module, official) if module + ("kernel",) in leaves else norm(module, official)
  return rules


def _template(vae: AutoencoderKL):
  return jax.eval_shape(vae.init, jax.random.key(0), *vae.dummy_inputs())["params"]


def load_texture_vae(encoder_decoder_kwargs: Mapping, embed_dim: int, state_dict: Mapping):
  """(vae, {"params": ...}) from the official Encoder/Decoder kwargs, `embed_dim` and its weights, strictly.

  `state_dict` is a flat `{name: array}` dict or a whole Lightning checkpoint (`{"state_dict": ..., "epoch": ...}`)
  as `load_state_dict` reads it; keys containing `loss` are skipped. Raises `ConversionError` naming the first
  missing, unknown or mis-shaped key. For bfloat16 compute use `vae.clone(dtype=jnp.bfloat16)` (params stay fp32).
  """
  vae = AutoencoderKL(**texture_vae_kwargs(encoder_decoder_kwargs), embed_dim=int(embed_dim))
  weights = select_state_dict(state_dict, keys=("state_dict",))
  template = _template(vae)
  params = flax_from_torch(weights, texture_vae_rules(template), template, ignore=IGNORE,
                           what="texture VAE checkpoint")
  return vae, {"params": params}


def texture_vae_to_torch(vae: AutoencoderKL, variables) -> dict[str, np.ndarray]:
  """The official state dict (numpy, torch layouts and names) of flax `variables`."""
  return torch_from_flax(variables["params"], texture_vae_rules(_template(vae)))
