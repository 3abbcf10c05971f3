"""Reading weight files into flat `{name: np.ndarray}` dicts, safely.

numpy (`.npz`) and safetensors files need no torch. torch files (`.pt`, `.pth`, `.ckpt`, `.bin`) are read with
`torch.load(weights_only=True)`, which never executes code from the file; a file that needs arbitrary unpickling
loads only with `trust_pickle=True`, for files the user trusts.
"""
from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from sfd_jax.errors import UserError

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


class ConversionError(UserError):
  """A checkpoint does not fit the model (missing, unknown or mis-shaped key) or cannot be read."""


def load_state_dict(path, *, trust_pickle: bool = False) -> dict:
  """Reads a weight file into a nested dict of numpy arrays (torch tensors converted, bf16 → fp32)."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"weight file {path} does not exist; pass the path of a file you have")
  suffix = path.suffix.lower()
  try:
    if suffix == ".npz":
      with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}
    if suffix == ".safetensors":
      from safetensors.numpy import load_file
      return load_file(str(path))
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise ConversionError(f"cannot read {path}: it is corrupt or not a {suffix} file ({e})") from e
  if suffix in TORCH_SUFFIXES:
    return to_numpy(_torch_load(path, trust_pickle))
  raise ConversionError(f"unknown weight file type {suffix!r} for {path}; use .npz, .safetensors, "
                        f"or a torch file ({', '.join(TORCH_SUFFIXES)})")


def _torch_load(path: Path, trust_pickle: bool):
  try:
    import torch
  except ImportError as e:
    raise ConversionError(f"reading {path} needs torch: pip install torch==2.13.0 "
                          "(or convert it to .npz/.safetensors elsewhere)") from e
  try:
    return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
  except Exception as e:  # torch raises UnpicklingError, RuntimeError or others depending on the damage.
    if not trust_pickle and "Unsupported global" in str(e):
      raise ConversionError(
          f"{path} holds Python objects besides tensors, which torch.load(weights_only=True) refuses to run; "
          "if you trust this file, load it with trust_pickle=True (CLI: --trust_pickle)") from e
    raise ConversionError(f"cannot read {path}: it is corrupt or not a torch file ({type(e).__name__}: {e})") from e


def to_numpy(obj):
  """Recursively turns torch tensors into numpy arrays (bf16 becomes fp32, which is lossless)."""
  if hasattr(obj, "detach") and hasattr(obj, "dtype"):
    t = obj.detach().cpu()
    if str(t.dtype) == "torch.bfloat16":
      t = t.float()
    return t.numpy()
  if isinstance(obj, Mapping):
    return {k: to_numpy(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(to_numpy(v) for v in obj)
  return obj


def select_state_dict(obj: Mapping, keys=("ema", "model", "state_dict")) -> dict:
  """Picks the weights out of a checkpoint dict and strips a DDP `module.` prefix.

  Official SFD checkpoints are `{"model", "ema", "opt", "config"}` (the EMA weights are what is sampled from),
  Lightning ones `{"state_dict": ...}`; a bare state dict is returned as is.
  """
  for key in keys:
    if key in obj and isinstance(obj[key], Mapping):
      obj = obj[key]
      break
  arrays = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
  if not arrays:
    raise ConversionError(f"no tensors found in the checkpoint (top-level keys: {sorted(obj)[:10]})")
  if all(k.startswith("module.") for k in arrays):
    arrays = {k[len("module."):]: v for k, v in arrays.items()}
  return arrays
