"""`torch.save`'s file format written without torch: stand-ins for the released checkpoints where torch is not
installed (the Python 3.13 tier). tests/test_colab.py checks these files against `torch.load` where it is.

The format: a zip archive with `archive/data.pkl` (a protocol-2 pickle in which every tensor is
`torch._utils._rebuild_tensor_v2(storage, offset, shape, strides, requires_grad, hooks)` and every storage a
persistent id `("storage", torch.<Type>Storage, key, "cpu", numel)`), one `archive/data/<key>` member per storage,
`archive/byteorder` and `archive/version`. Classes of packages that are not installed (torch's own, omegaconf's
`DictConfig`) are written by name, so nothing is imported.
"""
from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict

import numpy as np

_STORAGE_TYPES = {np.dtype(np.float64): "DoubleStorage", np.dtype(np.float32): "FloatStorage",
                  np.dtype(np.float16): "HalfStorage", np.dtype(np.int64): "LongStorage",
                  np.dtype(np.int32): "IntStorage", np.dtype(np.uint8): "ByteStorage",
                  np.dtype(np.bool_): "BoolStorage"}


class Name:
  """A class or function that the pickle names (`module.name`) without importing it."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle only writes reduce tuples whose first item is callable
    raise TypeError(f"{self.module}.{self.name} is only a name in a pickle")


class Instance:
  """An object of the class `cls` with `state` (pickled as that class called without arguments, then its state
  set), as omegaconf's DictConfig appears in train.py's checkpoints."""

  def __init__(self, cls: Name, state: dict):
    self.cls, self.state = cls, state

  def __reduce__(self):
    return self.cls, (), self.state


class Expanded:
  """`torch.tensor(value).expand(shape)`: a tensor of `shape` whose one element is stored once (strides 0), as
  torch.save writes it; a stand-in of a large checkpoint's real shapes in a small file."""

  def __init__(self, value: float, shape: tuple[int, ...], dtype=np.float32):
    self.array, self.shape = np.array([value], dtype), tuple(shape)


class _Storage:
  def __init__(self, key: str, array: np.ndarray):
    self.key, self.array = key, array


class _Tensor:
  def __init__(self, storage: _Storage, shape: tuple[int, ...] | None = None):
    self.storage, self.shape = storage, shape  # shape: an expanded view of a one-element storage

  def __reduce__(self):
    a = self.storage.array
    shape, strides = ((a.shape, tuple(s // a.itemsize for s in a.strides)) if self.shape is None
                      else (self.shape, (0,) * len(self.shape)))
    return Name("torch._utils", "_rebuild_tensor_v2"), (self.storage, 0, shape, strides, False, OrderedDict())


class _Pickler(pickle._Pickler):  # the Python pickler: its dispatch table takes a writer for `Name`
  dispatch = dict(pickle._Pickler.dispatch)

  def save_name(self, obj: Name):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
    self.memoize(obj)

  dispatch[Name] = save_name

  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      return "storage", Name("torch", _STORAGE_TYPES[obj.array.dtype]), obj.key, "cpu", obj.array.size
    return None


def save(obj, path):
  """Writes `obj` (dicts, lists, tuples, numbers, strings, `Instance`s; numpy arrays and `Expanded`s become torch
  tensors) as `torch.save` would."""
  storages = []

  def tensors(x):
    if isinstance(x, np.ndarray):
      storages.append(_Storage(str(len(storages)), np.array(x, order="C")))  # C order, 0-d kept
      return _Tensor(storages[-1])
    if isinstance(x, Expanded):
      storages.append(_Storage(str(len(storages)), x.array))
      return _Tensor(storages[-1], x.shape)
    if isinstance(x, dict):
      return {k: tensors(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return type(x)(tensors(v) for v in x)
    if isinstance(x, Instance):
      return Instance(x.cls, tensors(x.state))
    return x

  data = io.BytesIO()
  _Pickler(data, protocol=2).dump(tensors(obj))
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
    archive.writestr("archive/data.pkl", data.getvalue())
    archive.writestr("archive/byteorder", "little")
    for storage in storages:
      archive.writestr(f"archive/data/{storage.key}", storage.array.tobytes())
    archive.writestr("archive/version", "3\n")
