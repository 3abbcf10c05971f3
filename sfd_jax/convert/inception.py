"""FID InceptionV3 weight files (pytorch-fid, torch-fidelity) <-> flax params of `sfd_jax.models.inception`.

Both projects ship the same tensors under the same torchvision names (`Mixed_6d.branch1x1.conv.weight`,
`...bn.running_var`, `fc.weight`): pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` and torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth` (the suffix is the first 8 hex digits of the file's SHA-256).
Their BatchNorm `num_batches_tracked` counters are not weights and are skipped. Nothing is downloaded here.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import flax
import jax
import numpy as np

from sfd_jax.convert.common import Rule, flax_from_torch, torch_from_flax
from sfd_jax.convert.io import ConversionError, load_state_dict, select_state_dict
from sfd_jax.models.inception import InceptionV3

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
FID_WEIGHTS_URLS = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
)
_IGNORE = (r"\.num_batches_tracked$",)
_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def default_inception_path() -> Path:
  """Where the FID weights are looked for when no path is given: `$SFD_INCEPTION_WEIGHTS`, else the cache."""
  env = os.environ.get("SFD_INCEPTION_WEIGHTS")
  return Path(env) if env else Path.home() / ".cache" / "sfd_jax" / FID_WEIGHTS_NAME


def missing_weights_message(path) -> str:
  return (f"InceptionV3 FID weights not found at {path}. On a machine with internet, download "
          f"{FID_WEIGHTS_NAME} (pytorch-fid: {FID_WEIGHTS_URLS[0]}) or torch-fidelity's copy ({FID_WEIGHTS_URLS[1]}),"
          f" then put it at {default_inception_path()} or pass its path (CLI: --inception=PATH).")


def inception_rules(template) -> list[Rule]:
  """One rule per flax leaf: flax module paths are the torchvision module names, joined by dots."""
  rules = []
  for path in flax.traverse_util.flatten_dict(flax.core.unfreeze(template)):
    *module, leaf = path
    prefix = ".".join(module)
    if module[-1] == "conv":
      rules.append(Rule(path, f"{prefix}.weight", "conv"))
    elif module[-1] == "bn":
      rules.append(Rule(path, f"{prefix}.{_BN_NAMES[leaf]}"))
    else:  # the classifier
      rules.append(Rule(path, f"{prefix}.{'weight' if leaf == 'kernel' else 'bias'}",
                        "dense" if leaf == "kernel" else "same"))
  return rules


def _template(model: InceptionV3):
  return jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())["params"]


def inception_from_state_dict(state_dict: Mapping[str, np.ndarray], **overrides):
  """(model, variables) from a torchvision-named InceptionV3 state dict (a `module.` prefix is stripped)."""
  state_dict = select_state_dict(state_dict)
  fc = state_dict.get("fc.weight")
  if fc is not None and fc.shape[0] == 1000:
    raise ConversionError(f"these are torchvision's ImageNet InceptionV3 weights (1000 classes), not the FID "
                          f"Inception (1008 classes) that FID is defined with; get {FID_WEIGHTS_NAME}")
  model = InceptionV3(**overrides)
  template = _template(model)
  params = flax_from_torch(state_dict, inception_rules(template), template, ignore=_IGNORE,
                           what="InceptionV3 weight file")
  return model, {"params": params}


def load_inception(path=None, **overrides):
  """(model, variables) from a FID Inception weight file (.pth/.pt/.npz/.safetensors); None: the default path.

  Raises FileNotFoundError saying which file to get and where to put it, or ConversionError naming a bad key.
  """
  path = Path(path) if path is not None else default_inception_path()
  if not path.is_file():
    raise ConversionError(missing_weights_message(path))
  state_dict = load_state_dict(path)
  if not isinstance(state_dict, Mapping):
    raise ConversionError(f"{path} holds a {type(state_dict).__name__}, not a state dict of tensors")
  return inception_from_state_dict(state_dict, **overrides)


def inception_to_torch(model: InceptionV3, variables) -> dict:
  """The torchvision-named state dict (numpy, torch layouts) of flax `variables`, as pytorch-fid loads it."""
  return torch_from_flax(variables["params"], inception_rules(_template(model)))

