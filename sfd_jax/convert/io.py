"""Reading weight files into flat `{name: np.ndarray}` dicts, safely: no file can run code, torch is not needed.

numpy (`.npz`, read without pickles) and safetensors files hold arrays only. torch files (`.pt`, `.pth`, `.ckpt`,
`.bin`) are read by `torch_files`, which never imports or calls what a file names; of a checkpoint dict (train.py's
`{"model", "ema", "opt", "config"}`, Lightning's `{"state_dict", "optimizer_states", ...}`, the SemVAE train.py's
`{"model_state_dict", "optimizer_state_dict", "config", ...}`) only the chosen entry's tensors, and the strings
or numbers asked for beside it, are read from the file; what was read and skipped is logged in one line.
"""
from __future__ import annotations

import logging
import zipfile
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from sfd_jax import storage
from sfd_jax.convert.errors import ConversionError
from sfd_jax.convert.torch_files import PickledObject, TensorRef, TorchFile

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
# The entries of a checkpoint dict that hold weights, in the order they are taken when none is asked for: the
# DiT train.py's, Lightning's, the SemVAE train.py's.
WEIGHT_ENTRIES = ("ema", "model", "state_dict", "model_state_dict")

log = logging.getLogger(__name__)

__all__ = ["ConversionError", "WEIGHT_ENTRIES", "load_checkpoint", "load_state_dict", "select_state_dict",
           "to_numpy"]


def load_state_dict(path, *, which: str | None = None) -> dict[str, np.ndarray]:
  """The tensors of `load_checkpoint`."""
  return load_checkpoint(path, which=which)[0]


def load_checkpoint(path, *, which: str | None = None, keep=()) -> tuple[dict[str, np.ndarray], dict]:
  """`read_checkpoint` of a local file or a gs:// object (downloaded to a temporary file first)."""
  if storage.is_remote(path):
    if not storage.path(path).exists():
      raise ConversionError(f"weight file {path} does not exist; pass the path of a file you have")
    with storage.local_copy(path) as local:
      try:
        return read_checkpoint(local, which=which, keep=keep)
      except ConversionError as e:  # name the object, not the temporary copy
        raise ConversionError(str(e).replace(str(local), str(path))) from None
  return read_checkpoint(path, which=which, keep=keep)


def read_checkpoint(path, *, which: str | None = None, keep=()) -> tuple[dict[str, np.ndarray], dict]:
  """(tensors, plain values) of a weight file: the tensors as numpy arrays (bfloat16 becomes float32, which is
  lossless), and the values of the `keep` entries that a torch checkpoint dict holds beside its weights (e.g. the
  YAML config string and the sizes of the official SemVAE's train.py); {} for what a file does not hold.

  A torch checkpoint dict gives the tensors of its entry `which` (one of `WEIGHT_ENTRIES`), by default the first
  of them it has; a file that is itself a state dict (or a stats file) gives all its tensors. Raises
  `ConversionError` with one sentence for a missing, unreadable, truncated or code-running file.
  """
  path = Path(path)
  _check_weight_file(path)
  suffix = path.suffix.lower()
  values = {}
  if suffix in TORCH_SUFFIXES:
    arrays, values = _read_torch_entry(path, which, keep)
  elif suffix == ".npz":
    try:
      with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
      raise ConversionError(f"cannot read {path}: it is truncated or corrupt, or not a .npz file "
                            f"({type(e).__name__}: {e}); download or copy it again") from None
  elif suffix == ".safetensors":
    arrays = _read_safetensors(path)
  else:
    raise ConversionError(f"unknown weight file type {suffix!r} for {path}; use .npz, .safetensors, "
                          f"or a torch file ({', '.join(TORCH_SUFFIXES)})")
  return {k: v.astype(np.float32) if v.dtype == ml_dtypes.bfloat16 else v for k, v in arrays.items()}, values


def _check_weight_file(path: Path) -> None:
  """A missing or empty file, or a text file (the HTML error page or Git LFS pointer of a failed download) in
  place of weights, is named in one sentence. No weight format starts with 8 printable characters: torch and numpy
  files are zips or pickles, a safetensors file starts with its header length (a little-endian int64)."""
  if not path.is_file():
    raise ConversionError(f"weight file {path} does not exist; pass the path of a file you have")
  with open(path, "rb") as f:
    head = f.read(64)
  if not head:
    raise ConversionError(f"weight file {path} is empty; download or copy it again")
  if all(32 <= b < 127 or b in b"\t\n\r" for b in head[:8]):
    text = head.decode("ascii", "replace").split("\n")[0].strip()[:40]
    raise ConversionError(f"{path} is a text file, not weights (it starts with {text!r}): probably the HTML error "
                          "page or Git LFS pointer of a failed download; download it again")


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  with open(path, "rb") as f:
    header = int.from_bytes(f.read(8), "little")
  size = path.stat().st_size
  if size < 8 or header + 8 > size:
    raise ConversionError(f"cannot read {path}: it is truncated or not a .safetensors file (its header needs "
                          f"{header + 8} bytes, the file has {size}); download or copy it again")
  try:
    return load_file(str(path))
  except (SafetensorError, OSError, ValueError) as e:
    raise ConversionError(f"cannot read {path}: it is truncated or corrupt ({type(e).__name__}: {e}); "
                          "download or copy it again") from None


def _read_torch_entry(path: Path, which: str | None, keep=()) -> tuple[dict[str, np.ndarray], dict]:
  """The chosen entry's tensors, and the values of the `keep` entries beside it that are no dict or tensor
  (strings, numbers, inert `PickledObject`s); the other entries' storages are never read."""
  with TorchFile(path) as f:
    root = f.root
    if isinstance(root, PickledObject):
      raise ConversionError(f"{path} holds a pickled {root.source} object, not a dict of tensors; save its "
                            "state_dict() with torch.save and convert that")
    if not isinstance(root, Mapping):
      raise ConversionError(f"{path} holds a {type(root).__name__}, not a dict of tensors")
    key = _choose_entry(path, root, which)
    entry = root if key is None else root[key]
    others = {k: v for k, v in root.items() if key is not None and k != key}
    values = {k: v for k, v in others.items() if k in keep and not isinstance(v, (Mapping, TensorRef))}
    skipped = [f"{k} ({v.source if isinstance(v, PickledObject) else 'not needed'})"
               for k, v in others.items() if k not in values]
    skipped += [f"{k} ({v.source if isinstance(v, PickledObject) else type(v).__name__})"
                for k, v in entry.items() if not isinstance(v, TensorRef)]
    arrays = f.read({k: v for k, v in entry.items() if isinstance(v, TensorRef)})
  log.info("%s: read %d tensors%s%s%s", path, len(arrays), f" of {key!r}" if key is not None else "",
           f" and the values {', '.join(map(str, values))}" if values else "",
           f"; skipped {len(skipped)} entries: {', '.join(skipped)}" if skipped else "")
  return arrays, values


def _choose_entry(path: Path, root: Mapping, which: str | None):
  """The key of the entry to read: `which`, or the first weight entry there is; None for a dict without weight
  entries, which is a state dict (or stats) itself."""
  entries = [k for k in WEIGHT_ENTRIES if isinstance(root.get(k), Mapping)]
  if which is None:
    return entries[0] if entries else None
  if isinstance(root.get(which), Mapping):
    return which
  if entries or which in root:
    raise ConversionError(f"{path} has no {which!r} weights (its entries: {', '.join(map(str, root))}); choose "
                          f"one of {entries} (CLI: --which)")
  return None


def to_numpy(obj):
  """Recursively turns in-memory torch tensors into numpy arrays (bf16 becomes fp32, which is lossless)."""
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


def select_state_dict(obj: Mapping, keys=WEIGHT_ENTRIES) -> dict:
  """The arrays of a state dict, or of the first `keys` entry of an in-memory checkpoint dict, with a DDP
  `module.` prefix stripped."""
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
