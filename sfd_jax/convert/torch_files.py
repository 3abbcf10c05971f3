"""torch checkpoint files (`torch.save`), read without torch and without importing or calling anything they name.

A torch file is a pickle whose tensors point at raw storages. Since torch 1.6 it is a zip archive:
`<archive>/data.pkl` (the pickle), one `<archive>/data/<key>` member per storage, `<archive>/byteorder` and
`<archive>/version`. Before, it was one stream: torch's magic number, protocol and system info (three small
pickles), the pickle, the list of storage keys, then each storage (an int64 element count and its bytes).

The pickle is read by an unpickler whose `find_class` imports nothing:
- the torch functions that rebuild tensors and parameters (`torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`,
  ...) and torch's storage classes and dtypes are implemented here: each tensor becomes a `TensorRef` (storage key,
  dtype, offset, shape, strides), which reads nothing yet;
- a few plain containers (`collections.OrderedDict`, `builtins.set`, ...) are the real types, which run no code;
- every other name (omegaconf's `DictConfig`, optimizer or Lightning internals, `pathlib` paths, numpy scalars, ...)
  becomes a `PickledObject`: inert data recording its `module.name` and the arguments, state and items the pickle
  gave it. Its module is never imported and nothing is called.
So nothing a file names is ever executed, whatever the file holds. Names whose only use in a pickle is to run code
(`os.system`, `builtins.eval`, `subprocess.Popen`, ...) make the file refused, with a sentence naming the callable,
so a crafted file is reported as what it is; that list is a courtesy: safety does not depend on it being complete.

`TorchFile.read` then reads only the storages of the tensors asked for, so taking the `ema` weights of a training
checkpoint never reads its (often much larger) optimizer state.
"""
from __future__ import annotations

import _compat_pickle
import dataclasses
import io
import pickle
import struct
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from sfd_jax.convert.errors import ConversionError

# torch dtypes, by the names torch's pickles use: (numpy type, or None where numpy has none; bytes per element).
_DTYPES = {
    "float64": (np.float64, 8), "float32": (np.float32, 4), "float16": (np.float16, 2),
    "bfloat16": (ml_dtypes.bfloat16, 2), "complex128": (np.complex128, 16), "complex64": (np.complex64, 8),
    "int64": (np.int64, 8), "int32": (np.int32, 4), "int16": (np.int16, 2), "int8": (np.int8, 1),
    "uint64": (np.uint64, 8), "uint32": (np.uint32, 4), "uint16": (np.uint16, 2), "uint8": (np.uint8, 1),
    "bool": (np.bool_, 1), "float8_e4m3fn": (ml_dtypes.float8_e4m3fn, 1), "float8_e5m2": (ml_dtypes.float8_e5m2, 1),
    "float8_e4m3fnuz": (ml_dtypes.float8_e4m3fnuz, 1), "float8_e5m2fnuz": (ml_dtypes.float8_e5m2fnuz, 1),
    "float8_e8m0fnu": (ml_dtypes.float8_e8m0fnu, 1), "complex32": (None, 4), "qint8": (None, 1),
    "qint32": (None, 4), "quint8": (None, 1), "quint4x2": (None, 1), "quint2x4": (None, 1),
    "float4_e2m1fn_x2": (None, 1), "bits1x8": (None, 1), "bits2x4": (None, 1), "bits4x2": (None, 1),
    "bits8": (None, 1), "bits16": (None, 2),
}
# torch's typed storage classes (`torch.FloatStorage`, ...) and the dtype of their elements.
_STORAGES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "ComplexDoubleStorage": "complex128", "ComplexFloatStorage": "complex64", "LongStorage": "int64",
    "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "QInt8Storage": "qint8", "QInt32Storage": "qint32", "QUInt8Storage": "quint8",
    "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4", "UntypedStorage": "uint8",
}
# Modules, and single names, whose only use in a pickle is to run code. See the module docstring: nothing is called
# either way, these only make such a file a clear refusal.
_CODE_MODULES = ("os", "posix", "nt", "subprocess", "sys", "shutil", "importlib", "imp", "_imp", "runpy", "pty",
                 "socket", "ctypes", "multiprocessing", "code", "codeop", "pickle", "_pickle", "marshal", "pdb",
                 "bdb", "timeit", "webbrowser", "asyncio", "threading", "_thread", "signal", "pip", "commands",
                 "popen2", "torch.hub", "torch.jit", "numpy.testing")
_CODE_NAMES = frozenset({
    *(("builtins", name) for name in ("eval", "exec", "execfile", "compile", "getattr", "setattr", "delattr",
                                      "__import__", "open", "input", "breakpoint", "globals", "locals", "vars", "help",
                                      "exit", "quit")),
    ("operator", "attrgetter"), ("operator", "methodcaller"), ("torch", "load"), ("torch.serialization", "load")})
TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a pre-1.6 torch file
TORCH_LEGACY_PROTOCOL = 1001
MAX_ZIP_VERSION = 10  # torch's kMaxSupportedFileFormatVersion; the zip layout read here is the same for all
_CHUNK = 16 << 20  # bytes read at a time from a zip member


class PickledObject:
  """An object a file's pickle makes from a name sfd_jax does not implement: inert data.

  `source` is the `module.name` the pickle gave; `args`, `kwargs`, `state` and `items` are what it passed to the
  constructor, to `__setstate__`, and as list or dict items. The named class is never imported.
  """
  source = "?"

  def __new__(cls, *args, **kwargs):  # NEWOBJ, NEWOBJ_EX and REDUCE create one with the pickle's arguments
    self = super().__new__(cls)
    self.args, self.kwargs, self.state, self.items = args, kwargs, None, []
    return self

  def __init__(self, *args, **kwargs):
    pass

  def __setstate__(self, state):  # BUILD
    self.state = state

  def __setitem__(self, key, value):  # SETITEMS of a dict subclass
    self.items.append((key, value))

  def append(self, value):  # APPENDS of a list subclass
    self.items.append(value)

  def extend(self, values):
    self.items.extend(values)

  def __repr__(self):
    return f"<pickled {self.source}>"


@dataclasses.dataclass(frozen=True)
class _Dtype:
  """What a torch storage class or dtype named in the pickle stands for (`name` is torch's)."""
  name: str

  @property
  def numpy(self) -> np.dtype | None:
    kind = _DTYPES.get(self.name, (None, None))[0]
    return None if kind is None else np.dtype(kind)

  @property
  def itemsize(self) -> int | None:
    return _DTYPES.get(self.name, (None, None))[1]


@dataclasses.dataclass(frozen=True)
class Storage:
  """One storage of the file: `numel` elements of `dtype` under `key`; a pre-1.6 storage view starts
  `byte_offset` bytes into it."""
  key: str
  dtype: _Dtype
  numel: int
  byte_offset: int = 0

  @property
  def nbytes(self) -> int:
    return self.numel * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class TensorRef:
  """A tensor of the file, not read yet: its elements lie in `storage` from element `offset`, with `strides`."""
  storage: Storage
  dtype: _Dtype
  offset: int
  shape: tuple[int, ...]
  strides: tuple[int, ...]
  conj: bool = False
  neg: bool = False


def _tensor(storage, offset, size, stride, dtype=None, metadata=None):
  if not isinstance(storage, Storage):  # a storage class sfd_jax does not know: kept as data
    return _placeholder("torch", "Tensor")(storage, offset, size, stride)
  if not (isinstance(offset, int) and all(isinstance(v, int) and v >= 0 for v in (*size, *stride, offset))
          and len(size) == len(stride)):
    raise ValueError(f"a tensor has an invalid layout (offset {offset!r}, size {size!r}, stride {stride!r})")
  flags = metadata if isinstance(metadata, Mapping) else {}
  return TensorRef(storage, dtype if isinstance(dtype, _Dtype) else storage.dtype, offset, tuple(size),
                   tuple(stride), bool(flags.get("conj", False)), bool(flags.get("neg", False)))


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
  return _tensor(storage, storage_offset, size, stride, metadata=metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
  return _tensor(storage, storage_offset, size, stride, dtype, metadata)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  return data


def _rebuild_from_type_v2(func, new_type, args, state):  # a tensor subclass or a tensor with attributes
  return func(*args) if func in _REBUILDS else _placeholder("torch._tensor", "_rebuild_from_type_v2")(func, args)


_REBUILDS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


def _encode(text, encoding="latin1"):  # how protocol-2 pickles spell bytes
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
    raise ValueError("a bytes object is spelled with an unexpected encoding")
  return text.encode(encoding)


def _empty_dict(*args):  # collections.defaultdict without its factory: the pickle's items follow
  return {}


# The globals a torch pickle may name that are implemented here (tensors) or are plain, code-free containers.
_GLOBALS = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor, ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("collections", "OrderedDict"): OrderedDict, ("collections", "Counter"): Counter,
    ("collections", "defaultdict"): _empty_dict, ("_codecs", "encode"): _encode,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex, ("builtins", "slice"): slice,
}
_PLACEHOLDERS: dict[tuple[str, str], type] = {}


def _placeholder(module: str, name: str) -> type:
  """The inert stand-in class of `module.name` (one per name, so equal names stay one class)."""
  key = (module, name)
  if key not in _PLACEHOLDERS:
    _PLACEHOLDERS[key] = type(name.rpartition(".")[2] or "PickledObject", (PickledObject,),
                              {"source": f"{module}.{name}", "__module__": __name__})
  return _PLACEHOLDERS[key]


def runs_code(module: str, name: str) -> bool:
  """Whether `module.name` is a callable whose only use in a pickle is to run code (see the module docstring)."""
  parts = module.split(".")
  return (module, name) in _CODE_NAMES or any(".".join(parts[:i]) in _CODE_MODULES for i in range(1, len(parts) + 1))


class _Unpickler(pickle.Unpickler):
  """Builds the pickled objects with the globals above; storages become `Storage`s (see `persistent_load`)."""

  def __init__(self, file, path: Path):
    super().__init__(file, encoding="latin1")
    self.path = path
    self.storages: dict[str, Storage] = {}

  def find_class(self, module, name):
    if not (isinstance(module, str) and isinstance(name, str)):
      raise ValueError("a global has a non-text name")
    # Protocol-2 pickles spell names as Python 2 did (`__builtin__.set`, `copy_reg._reconstructor`).
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    if runs_code(module, name):
      raise ConversionError(f"refusing {self.path}: unpickling it would call {module}.{name}, which runs code; "
                            "a weight file never needs that, so it is not a plain checkpoint (do not open it with "
                            "torch.load either)")
    if (module, name) in _GLOBALS:
      return _GLOBALS[(module, name)]
    if module in ("torch", "torch.storage") and name in _STORAGES:
      return _Dtype(_STORAGES[name])
    if module == "torch" and name in _DTYPES:
      return _Dtype(name)
    return _placeholder(module, name)

  def persistent_load(self, pid):
    """('storage', storage class, key, location, numel[, view]) → a `Storage`; ('module', cls, ...) → cls."""
    if not isinstance(pid, tuple) or not pid:
      raise ValueError(f"unknown persistent id {pid!r}")
    kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
    if kind == "module" and len(pid) >= 2:  # a pre-1.6 pickled nn.Module class
      return pid[1]
    if kind != "storage" or len(pid) not in (5, 6):
      raise ValueError(f"unknown persistent id {pid!r}")
    storage_type, key, _, numel = pid[1:5]
    view = pid[5] if len(pid) == 6 else None
    if not isinstance(storage_type, _Dtype):
      storage_type = _Dtype(getattr(storage_type, "source", "unknown storage"))
    if not isinstance(numel, int) or numel < 0:
      raise ValueError(f"storage {key!r} has an invalid size {numel!r}")
    key = key.decode("ascii") if isinstance(key, bytes) else str(key)
    storage = self.storages.setdefault(key, Storage(key, storage_type, numel))
    if view is None:
      return storage
    view_key, offset, view_numel = view  # a pre-1.6 view into the storage
    return Storage(key, storage.dtype, view_numel, offset * (storage.dtype.itemsize or 0))


class TorchFile:
  """An opened torch file: `root` is what its pickle holds (tensors as `TensorRef`s); `read` reads tensors.

  Use as a context manager. Every problem with the file raises `ConversionError` naming it.
  """

  def __init__(self, path):
    self.path = Path(path)
    self._file = open(self.path, "rb")
    self._zip = None
    try:
      head = self._file.read(4)
      if head == b"PK\x03\x04":
        self._open_zip()
      elif head[:1] == b"\x80":
        self._open_legacy()
      else:
        self._file.seek(257)
        if self._file.read(5) == b"ustar":
          raise ConversionError(f"{self.path} is in the tar format of torch < 0.4, which sfd_jax does not read; "
                                "re-save it with a newer torch: torch.save(torch.load(old), new)")
        raise ConversionError(f"cannot read {self.path}: it is not a torch file (no zip archive or torch pickle)")
    except BaseException:
      self.close()
      raise

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self):
    if self._zip is not None:
      self._zip.close()
    self._file.close()

  def _broken(self, what: str) -> ConversionError:
    return ConversionError(f"cannot read {self.path}: it is truncated or corrupt ({what}); download or copy it again")

  def _unpickle(self, data):
    unpickler = _Unpickler(data, self.path)
    try:
      return unpickler.load(), unpickler.storages
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            OverflowError, UnicodeDecodeError, struct.error) as e:
      raise self._broken(f"its pickle does not read: {type(e).__name__}: {e}") from None

  # Since torch 1.6: a zip archive.

  def _open_zip(self):
    try:
      self._zip = zipfile.ZipFile(self._file)
      names = set(self._zip.namelist())
      prefix = self._zip.namelist()[0].split("/")[0]
      if f"{prefix}/constants.pkl" in names:
        raise ConversionError(f"{self.path} is a TorchScript archive (torch.jit.save), not a checkpoint; save the "
                              "model's state_dict() with torch.save and convert that")
      if f"{prefix}/data.pkl" not in names:
        raise ConversionError(f"cannot read {self.path}: it is a zip file but not a torch checkpoint "
                              "(it has no data.pkl)")
      version = self._zip.read(f"{prefix}/version").strip() if f"{prefix}/version" in names else b"1"
      byteorder = self._zip.read(f"{prefix}/byteorder") if f"{prefix}/byteorder" in names else b"little"
      pickled = self._zip.read(f"{prefix}/data.pkl")
    except (zipfile.BadZipFile, EOFError, OSError, IndexError) as e:
      raise self._broken(f"{type(e).__name__}: {e}") from None
    if not version.isdigit() or byteorder not in (b"little", b"big"):
      raise self._broken(f"version {version[:20]!r}, byteorder {byteorder[:20]!r}")
    if int(version) > MAX_ZIP_VERSION:
      raise ConversionError(f"{self.path} has torch file format version {int(version)}, newer than sfd_jax reads "
                            f"(≤ {MAX_ZIP_VERSION}); re-save it with torch 2.x")
    self._prefix, self._big_endian = prefix, byteorder == b"big"
    self.root, self._storages = self._unpickle(io.BytesIO(pickled))

  def _read_zip_storage(self, storage: Storage) -> np.ndarray:
    name = f"{self._prefix}/data/{storage.key}"
    try:
      info = self._zip.getinfo(name)
    except KeyError:
      raise self._broken(f"it has no storage {name}") from None
    if info.file_size != storage.nbytes:
      raise self._broken(f"storage {name} has {info.file_size} bytes, its tensors need {storage.nbytes}")
    buffer = np.empty(storage.nbytes, np.uint8)
    try:
      with self._zip.open(info) as member:  # checks the member's CRC-32 once read to its end
        view, position = memoryview(buffer), 0
        while position < storage.nbytes:
          count = member.readinto(view[position:position + _CHUNK])
          if not count:
            raise EOFError(f"storage {name} ends early")
          position += count
        member.read(1)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
      raise self._broken(f"{type(e).__name__}: {e}") from None
    return buffer

  # torch 0.4 to 1.5: one stream.

  def _open_legacy(self):
    self._file.seek(0)
    (magic, _), (protocol, _), (info, _) = (self._unpickle(self._file) for _ in range(3))
    if magic != TORCH_MAGIC or protocol != TORCH_LEGACY_PROTOCOL or not isinstance(info, dict):
      raise ConversionError(f"cannot read {self.path}: it is a pickle but not a torch file (no torch magic "
                            "number); weight files must be written by torch.save, safetensors or numpy")
    self.root, self._storages = self._unpickle(self._file)
    keys, _ = self._unpickle(self._file)
    if not isinstance(keys, list) or set(map(str, keys)) != set(self._storages):
      raise self._broken("its list of storages does not match its pickle")
    self._big_endian = False  # pre-1.6 torch wrote little-endian data on every machine
    self._offsets, position, end = {}, self._file.tell(), self._file.seek(0, io.SEEK_END)
    for key in map(str, keys):  # each storage: its element count (int64), then its bytes
      self._offsets[key] = position
      if self._storages[key].dtype.itemsize is None:
        raise ConversionError(f"cannot read {self.path}: storage {key} has the unknown type "
                              f"{self._storages[key].dtype.name}")
      position += 8 + self._storages[key].nbytes
    if position > end:
      raise self._broken(f"{end} bytes, its storages need {position}")

  def _read_legacy_storage(self, storage: Storage) -> np.ndarray:
    self._file.seek(self._offsets[storage.key])
    header = self._file.read(8)
    if len(header) != 8 or struct.unpack("<q", header)[0] != storage.numel:
      raise self._broken(f"storage {storage.key} does not start with its size")
    buffer = np.empty(storage.nbytes, np.uint8)
    if self._file.readinto(memoryview(buffer)) != storage.nbytes:
      raise self._broken(f"storage {storage.key} ends early")
    return buffer

  # Both.

  def read(self, tensors: Mapping[str, TensorRef]) -> dict[str, np.ndarray]:
    """{name: array} of `tensors` (refs from `root`), reading only their storages, each once."""
    buffers, out = {}, {}
    for name, ref in tensors.items():
      if ref.dtype.numpy is None or ref.storage.dtype.numpy is None:
        raise ConversionError(f"{self.path}: tensor {name!r} has dtype {ref.dtype.name}, which numpy cannot hold; "
                              "convert it to a float type in torch and save again")
      key = ref.storage.key
      if key not in buffers:
        root = self._storages[key]
        buffers[key] = self._read_zip_storage(root) if self._zip else self._read_legacy_storage(root)
      out[name] = self._array(name, ref, buffers[key])
    return out

  def _array(self, name: str, ref: TensorRef, buffer: np.ndarray) -> np.ndarray:
    dtype = ref.dtype.numpy
    start = ref.storage.byte_offset + ref.offset * dtype.itemsize
    extent = 0 if 0 in ref.shape else 1 + sum((n - 1) * s for n, s in zip(ref.shape, ref.strides))
    view_end = ref.storage.byte_offset + ref.storage.nbytes
    if start + extent * dtype.itemsize > min(view_end, buffer.size):
      raise self._broken(f"tensor {name!r} reaches past the end of its storage")
    data = buffer[start:start + extent * dtype.itemsize]
    if self._big_endian and dtype.itemsize > 1:
      unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
      data = data.view(f"u{unit}").byteswap().view(np.uint8)
    elements = data.view(dtype)
    array = np.lib.stride_tricks.as_strided(elements, ref.shape, tuple(s * dtype.itemsize for s in ref.strides))
    array = array if array.flags.c_contiguous else array.copy()
    if ref.neg:
      array = np.negative(array)
    if ref.conj:
      array = np.conj(array)
    return array
