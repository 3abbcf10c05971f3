"""The official Semantic VAE checkpoint (`semantic_ae_final.pt`) <-> flax params of `sfd_jax.models.semvae.SemVAE`.

train.py saves `{'iteration', 'model_state_dict', 'optimizer_state_dict', 'scheduler_state_dict', 'loss',
'loss_averages', 'config', 'input_dim', 'bottleneck_dim'}`, where 'config' is its OmegaConf config as a YAML
string (interpolations such as `${variables.bottleneck_dim}` unresolved). Every size of the network is read from
the tensors' shapes; the attention heads, which no shape holds, from the YAML (`model.params.transformer_heads`).
A bare state dict, or a file without the YAML, takes the released model's 6 heads, and says so.

The flax modules are named by the official Sequential indices, so the converter is a name map: `encoder/1/attn/
in_proj/kernel` is `encoder.1.attn.in_proj_weight` transposed, `…/norm1/scale` is `….norm1.weight`.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import jax
import numpy as np
import yaml

from sfd_jax.convert.common import Rule, flax_from_torch, linear, norm, torch_from_flax
from sfd_jax.convert.io import ConversionError
from sfd_jax.models.semvae import SemVAE

RELEASED_HEADS = 6  # `transformer_heads` of the released SemVAE (ch16.yaml)
CHECKPOINT_VALUES = ("config", "input_dim", "bottleneck_dim")  # what train.py saves beside the weights, used here
_INTERPOLATION = re.compile(r"^\$\{([\w.]+)\}$")

log = logging.getLogger(__name__)


def semvae_rules(model: SemVAE) -> list[Rule]:
  """One rule per flax parameter, in the official state dict's order: the flax path is the torch name (kernel ↔
  weight transposed, scale ↔ weight), but for MultiheadAttention's fused `in_proj_weight` / `in_proj_bias`."""
  rules = []
  for side, depth in (("encoder", model.encoder_depth), ("decoder", model.decoder_depth)):
    rules += linear((side, "0"), f"{side}.0")
    for i in range(1, depth + 1):
      flax_block, block = (side, str(i)), f"{side}.{i}"
      rules += norm((*flax_block, "norm1"), f"{block}.norm1")
      rules += [Rule((*flax_block, "attn", "in_proj", "kernel"), f"{block}.attn.in_proj_weight", "dense"),
                Rule((*flax_block, "attn", "in_proj", "bias"), f"{block}.attn.in_proj_bias")]
      rules += linear((*flax_block, "attn", "out_proj"), f"{block}.attn.out_proj")
      rules += norm((*flax_block, "norm2"), f"{block}.norm2")
      rules += linear((*flax_block, "mlp", "0"), f"{block}.mlp.0") + linear((*flax_block, "mlp", "2"), f"{block}.mlp.2")
    rules += norm((side, str(depth + 1)), f"{side}.{depth + 1}") + linear((side, str(depth + 2)), f"{side}.{depth + 2}")
  return rules


def _depth(state_dict: Mapping, side: str) -> int:
  depth = 0
  while f"{side}.{depth + 1}.attn.in_proj_weight" in state_dict:
    depth += 1
  return depth


def _shape(state_dict: Mapping, key: str, where: str) -> tuple[int, ...]:
  if key not in state_dict:
    raise ConversionError(f"{where} has no {key!r}: it is not an official Semantic VAE state dict (its keys "
                          f"start {sorted(state_dict)[:4]})")
  return tuple(np.shape(state_dict[key]))


def sizes_from_shapes(state_dict: Mapping, where: str = "the SemVAE checkpoint") -> dict:
  """The SemVAE fields (all but `num_heads`) that the official state dict's shapes give."""
  hidden, feature_dim = _shape(state_dict, "encoder.0.weight", where)
  _, latent_channels = _shape(state_dict, "decoder.0.weight", where)
  fields = dict(feature_dim=feature_dim, latent_channels=latent_channels, hidden_size=hidden,
                encoder_depth=_depth(state_dict, "encoder"), decoder_depth=_depth(state_dict, "decoder"))
  if fields["encoder_depth"]:
    mlp_hidden = _shape(state_dict, "encoder.1.mlp.0.weight", where)[0]
    fields["mlp_ratio"] = mlp_hidden / hidden
    if int(hidden * fields["mlp_ratio"]) != mlp_hidden:
      raise ConversionError(f"{where}: the SemVAE's MLP width {mlp_hidden} is no whole ratio of its width {hidden}")
  moments = _shape(state_dict, f"encoder.{fields['encoder_depth'] + 2}.weight", where)[0]
  if moments != 2 * latent_channels:
    raise ConversionError(f"{where}: the SemVAE encoder gives {moments} channels for a {latent_channels}-channel "
                          "latent; only the variational SemVAE (is_vae=True: mean and log-variance) is supported")
  return fields


def _lookup(config: Mapping, dotted: str, depth: int = 0):
  """`config[a][b]…` of a dotted name, following OmegaConf's `${…}` references; None where there is none."""
  value = config
  for part in dotted.split("."):
    if not isinstance(value, Mapping) or part not in value:
      return None
    value = value[part]
  match = _INTERPOLATION.match(value) if isinstance(value, str) else None
  if match and depth < 8:
    return _lookup(config, match.group(1), depth + 1)
  return value


def parse_config(text: str, where: str) -> dict:
  """The YAML config string of train.py (safe loader: data only)."""
  try:
    config = yaml.safe_load(text)
  except yaml.YAMLError as e:
    raise ConversionError(f"{where}: its 'config' is not readable YAML ({e})") from None
  if not isinstance(config, Mapping):
    raise ConversionError(f"{where}: its 'config' is not a YAML mapping")
  return config


def _from_config(text, where: str) -> dict:
  """What the YAML config string of train.py says of the network: the heads, and sizes to check."""
  if not isinstance(text, str):
    raise ConversionError(f"{where}: its 'config' is a {getattr(text, 'source', type(text).__name__)}, not the "
                          "YAML string the official train.py saves; save it as OmegaConf.to_yaml(config)")
  config = parse_config(text, where)
  arch, variational = _lookup(config, "model.arch"), _lookup(config, "model.variational")
  if arch not in (None, "transformer") or variational is False:
    raise ConversionError(f"{where} is a SemVAE of arch={arch!r}, variational={variational!r}; only the "
                          "transformer VAE (the released one) is supported")
  heads = _lookup(config, "model.params.transformer_heads")
  if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
    raise ConversionError(f"{where}: its config's model.params.transformer_heads is {heads!r}, not a number of "
                          "attention heads")
  return {"num_heads": heads, "hidden_dim": _lookup(config, "model.params.hidden_dim"),
          "transformer_blocks": _lookup(config, "model.params.transformer_blocks"),
          "bottleneck_dim (config)": _lookup(config, "model.bottleneck_dim")}


def semvae_fields(state_dict: Mapping, values: Mapping, where: str) -> dict:
  """The SemVAE fields of an official state dict and the values train.py saved beside it (`config` YAML,
  `input_dim`, `bottleneck_dim`): every size from the shapes, the heads from the YAML (without it: the released
  6, said in a log line); the sizes the file states besides its shapes must agree with them."""
  fields = sizes_from_shapes(state_dict, where)
  stated = {"input_dim": values.get("input_dim"), "bottleneck_dim": values.get("bottleneck_dim")}
  if values.get("config") is not None:
    stated.update(_from_config(values["config"], where))
    fields["num_heads"] = stated.pop("num_heads")
  else:
    fields["num_heads"] = RELEASED_HEADS
    log.info("%s has no training config that states the attention heads: taking the released SemVAE's %d",
             where, RELEASED_HEADS)
  shapes = {"input_dim": fields["feature_dim"], "bottleneck_dim": fields["latent_channels"],
            "bottleneck_dim (config)": fields["latent_channels"], "hidden_dim": fields["hidden_size"],
            "transformer_blocks": fields["encoder_depth"]}
  for name, value in stated.items():
    if isinstance(value, int) and value != shapes[name]:
      raise ConversionError(f"{where} states {name}={value} but its weights have {shapes[name]}; the file is "
                            "inconsistent")
  if fields["hidden_size"] % fields["num_heads"]:
    raise ConversionError(
        f"{where}: its width {fields['hidden_size']} does not split into {fields['num_heads']} heads"
        + ("" if values.get("config") is not None else " (the released SemVAE's; the file has no training config "
           "that states its own): convert the checkpoint as train.py saved it, with its 'config'"))
  return fields


def load_semvae(state_dict: Mapping[str, np.ndarray], values: Mapping | None = None,
                where: str = "the SemVAE checkpoint", **overrides):
  """(model, variables) of an official SemVAE state dict, strictly; `values` are the plain entries train.py
  saved beside it (see `semvae_fields`); `overrides` set sfd_jax-only fields (`dtype`, `grid_size`)."""
  model = SemVAE(**semvae_fields(state_dict, values or {}, where), **overrides)
  template = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())
  params = flax_from_torch(state_dict, semvae_rules(model), template["params"], what=where)
  return model, {"params": params}


def official_kwargs(model: SemVAE) -> dict:
  """The official `create_semantic_autoencoder` arguments of `model`."""
  if model.encoder_depth != model.decoder_depth:
    raise ValueError(f"the official SemVAE has as many blocks a side; this one {model.encoder_depth} and "
                     f"{model.decoder_depth}")
  return dict(arch="transformer", is_vae=True, input_dim=model.feature_dim, bottleneck_dim=model.latent_channels,
              hidden_dim=model.hidden_size, transformer_heads=model.num_heads,
              transformer_blocks=model.encoder_depth)


def semvae_to_torch(model: SemVAE, variables) -> dict:
  """The official state dict (numpy, torch names and layouts) of flax `variables`."""
  return torch_from_flax(variables["params"], semvae_rules(model))


def semvae_checkpoint(model: SemVAE, state_dict: Mapping) -> dict:
  """What the official code loads a SemVAE from, as its train.py saves it: `model_state_dict` (`state_dict`),
  the YAML config (its `model` section: the heads are in no tensor) and the two sizes it stores."""
  kw = official_kwargs(model)
  config = {"model": {"variational": True, "bottleneck_dim": kw["bottleneck_dim"], "arch": "transformer",
                      "params": {"hidden_dim": kw["hidden_dim"], "transformer_heads": kw["transformer_heads"],
                                 "transformer_blocks": kw["transformer_blocks"]}}}
  return {"model_state_dict": dict(state_dict), "config": yaml.safe_dump(config, sort_keys=False),
          "input_dim": kw["input_dim"], "bottleneck_dim": kw["bottleneck_dim"]}
