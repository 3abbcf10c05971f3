"""torch files read without torch or the classes they name: written here exactly as the official code writes them.

train.py saves `{"model", "ema", "opt", "config"}` with an OmegaConf `DictConfig` as `config`; Lightning saves the
texture VAE with optimizer states, callbacks and hyper-parameters; stats files are `{"mean", "std"}`. The classes
those files name come from throwaway modules written to tmp_path at test time and removed from `sys.path` and
`sys.modules` before reading, as on a machine without omegaconf or Lightning. The reference for every tensor is
the tensor saved (and `torch.load` of the same file where torch can read it).
"""
import contextlib
import importlib
import logging
import os
import pathlib
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the torch extra; only the Python 3.13 tier runs without it

from sfd_jax.convert.io import ConversionError, load_state_dict
from sfd_jax.convert.torch_files import TensorRef, TorchFile
from tests.golden import REPO

# Stand-ins for the packages the official checkpoints name, written as files at test time.
STAND_INS = {
    "omegaconf/__init__.py": "from omegaconf.dictconfig import DictConfig\n",
    "omegaconf/base.py": """
        import dataclasses
        import typing

        @dataclasses.dataclass
        class ContainerMetadata:
          ref_type: object = typing.Any
          object_type: object = dict
          optional: bool = True
          key: object = None
          flags: dict = dataclasses.field(default_factory=dict)
          key_type: object = typing.Any
          element_type: object = typing.Any
        """,
    "omegaconf/nodes.py": """
        class AnyNode:
          def __init__(self, value, key, parent):
            self._val, self._key, self._parent = value, key, parent
        """,
    "omegaconf/dictconfig.py": """
        from omegaconf.base import ContainerMetadata
        from omegaconf.nodes import AnyNode

        class DictConfig:
          '''Pickles as omegaconf's does: its __dict__ (metadata, parent, content nodes) through __getstate__.'''
          def __init__(self, content, parent=None):
            self.__dict__["_metadata"] = ContainerMetadata()
            self.__dict__["_parent"] = parent
            self.__dict__["_content"] = {k: DictConfig(v, self) if isinstance(v, dict) else AnyNode(v, k, self)
                                         for k, v in content.items()}

          def __getstate__(self):
            return dict(self.__dict__)

          def __setstate__(self, state):
            self.__dict__.update(state)
        """,
    "pytorch_lightning/__init__.py": "",
    "pytorch_lightning/utilities/__init__.py": "",
    "pytorch_lightning/utilities/parsing.py": """
        class AttributeDict(dict):
          '''Lightning's hyper-parameter dict: a dict subclass (pickled with SETITEMS).'''
          def __getattr__(self, key):
            return self[key]
        """,
    "unlisted_payload.py": """
        import pathlib

        def run(path):
          '''Code a file may name that no refusal list knows: it must never be called.'''
          pathlib.Path(path).write_text("ran")

        class Payload:
          def __init__(self, path):
            self.path = path

          def __reduce__(self):
            return (run, (self.path,))
        """,
}
STAND_IN_MODULES = ("omegaconf", "pytorch_lightning", "unlisted_payload")


@contextlib.contextmanager
def stand_in_modules(root):
  """The stand-in packages, importable inside the block; afterwards gone from sys.path and sys.modules."""
  root = pathlib.Path(root) / "stand_ins"
  for name, source in STAND_INS.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(textwrap.dedent(source))
  assert not any(m in sys.modules for m in STAND_IN_MODULES)
  sys.path.insert(0, str(root))
  importlib.invalidate_caches()
  try:
    yield {m: importlib.import_module(m) for m in ("omegaconf", "pytorch_lightning.utilities.parsing",
                                                   "unlisted_payload")}
  finally:
    sys.path.remove(str(root))
    for name in [m for m in sys.modules if m.split(".")[0] in STAND_IN_MODULES]:
      del sys.modules[name]
    importlib.invalidate_caches()


def adamw_state(params):
  """`opt.state_dict()` of torch's AdamW after one step, as train.py saves it."""
  params = [torch.nn.Parameter(p.detach().clone()) for p in params]
  opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0)
  sum((p.float() ** 2).sum() for p in params).backward()
  opt.step()
  return opt.state_dict()


def write_train_py_checkpoint(path, ema: dict, model: dict | None = None):
  """`{"model", "ema", "opt", "config"}` as the official train.py writes it: config is an OmegaConf DictConfig."""
  model = model if model is not None else {k: v + 1 for k, v in ema.items()}
  with stand_in_modules(pathlib.Path(path).parent) as modules:
    config = modules["omegaconf"].DictConfig({"model": {"model_type": "LightningDiT-XL/1", "use_repa": True},
                                              "train": {"global_batch_size": 256}})
    torch.save({"model": model, "ema": ema, "opt": adamw_state(model.values()), "config": config}, path)


def write_lightning_checkpoint(path, state_dict: dict):
  """A Lightning `.ckpt` of the texture VAE with the objects Lightning and LDM put in one."""
  with stand_in_modules(pathlib.Path(path).parent) as modules:
    hparams = modules["pytorch_lightning.utilities.parsing"].AttributeDict(
        ddconfig=modules["omegaconf"].DictConfig({"z_channels": 32, "ch_mult": [1, 1, 2, 2, 4]}), embed_dim=32,
        ckpt_path=pathlib.PurePosixPath("/logs/last.ckpt"))
    callbacks = {"ModelCheckpoint{'monitor': 'val/rec_loss'}": {
        "best_model_score": torch.tensor(0.25), "best_model_path": "/logs/epoch=49.ckpt",
        "best_k_models": {"/logs/epoch=49.ckpt": np.float64(0.25)}, "dirpath": pathlib.PurePosixPath("/logs")}}
    weights = [v for k, v in state_dict.items() if v.is_floating_point() and not k.startswith("loss.")]
    torch.save({"epoch": 49, "global_step": 250_000, "pytorch-lightning_version": "1.4.2",
                "state_dict": state_dict, "callbacks": callbacks, "optimizer_states": [adamw_state(weights)],
                "lr_schedulers": [], "hparams_name": "kwargs", "hyper_parameters": hparams}, path)


def assert_same_tensors(ours: dict, theirs: dict):
  """Every array equals its torch tensor bit for bit (bf16 as its exact float32 value)."""
  assert sorted(ours) == sorted(theirs)
  for key, tensor in theirs.items():
    tensor = tensor.detach()
    expected = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    assert ours[key].dtype == expected.dtype and ours[key].shape == expected.shape, key
    assert ours[key].tobytes() == expected.tobytes(), key


def random_weights(seed=0):
  g = torch.Generator().manual_seed(seed)
  return {"blocks.0.attn.qkv.weight": torch.randn(24, 8, generator=g),
          "blocks.0.attn.qkv.bias": torch.randn(24, generator=g),
          "y_embedder.embedding_table.weight": torch.randn(11, 8, generator=g),
          "pos_embed": torch.randn(1, 4, 8, generator=g)}


def test_train_py_checkpoint_without_omegaconf(tmp_path, caplog):
  ema, model = random_weights(0), random_weights(1)
  write_train_py_checkpoint(tmp_path / "0400000.pt", ema, model)
  with caplog.at_level(logging.INFO, "sfd_jax.convert"):
    assert_same_tensors(load_state_dict(tmp_path / "0400000.pt"), ema)
  assert_same_tensors(load_state_dict(tmp_path / "0400000.pt", which="model"), model)
  assert not any(m.split(".")[0] in STAND_IN_MODULES for m in sys.modules)
  assert caplog.messages == [f"{tmp_path / '0400000.pt'}: read 4 tensors of 'ema'; skipped 3 entries: "
                             "model (not needed), opt (not needed), config (omegaconf.dictconfig.DictConfig)"]
  # The config is inert data a reader can look at: its class name and pickled state, nothing of omegaconf.
  with TorchFile(tmp_path / "0400000.pt") as f:
    config = f.root["config"]
    assert config.source == "omegaconf.dictconfig.DictConfig"
    assert config.state["_content"]["model"].state["_content"]["model_type"].state["_val"] == "LightningDiT-XL/1"
    assert f.root["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert isinstance(f.root["opt"]["state"][0]["exp_avg"], TensorRef)
  with pytest.raises(ConversionError, match=r"has no 'state_dict' weights .*choose one of \['ema', 'model'\]"):
    load_state_dict(tmp_path / "0400000.pt", which="state_dict")


def test_reading_needs_no_torch(tmp_path):
  """torch is an optional extra: reading a torch file never imports it."""
  ema = random_weights()
  write_train_py_checkpoint(tmp_path / "0400000.pt", ema)
  np.savez(tmp_path / "expected.npz", **{k: v.numpy() for k, v in ema.items()})
  code = textwrap.dedent(f"""
      import sys
      sys.modules["torch"] = None  # any import of torch fails
      import numpy as np
      from sfd_jax.convert.io import load_state_dict
      ours, expected = load_state_dict({str(tmp_path / "0400000.pt")!r}), np.load({str(tmp_path / "expected.npz")!r})
      assert sorted(ours) == sorted(expected.files)
      assert all(ours[k].tobytes() == expected[k].tobytes() for k in ours)
      print("read without torch")
      """)
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
  assert result.stdout.strip() == "read without torch", result.stderr


def test_lightning_vae_checkpoint(tmp_path, caplog):
  g = torch.Generator().manual_seed(0)
  state_dict = {"encoder.conv_in.weight": torch.randn(8, 3, 3, 3, generator=g),
                "encoder.conv_in.bias": torch.randn(8, generator=g), "loss.logvar": torch.zeros(()),
                "loss.discriminator.main.1.num_batches_tracked": torch.tensor(7)}
  write_lightning_checkpoint(tmp_path / "ldm.ckpt", state_dict)
  with caplog.at_level(logging.INFO, "sfd_jax.convert"):
    assert_same_tensors(load_state_dict(tmp_path / "ldm.ckpt"), state_dict)
  assert not any(m.split(".")[0] in STAND_IN_MODULES for m in sys.modules)
  assert caplog.messages == [
      f"{tmp_path / 'ldm.ckpt'}: read 4 tensors of 'state_dict'; skipped 8 entries: epoch (not needed), "
      "global_step (not needed), pytorch-lightning_version (not needed), callbacks (not needed), "
      "optimizer_states (not needed), lr_schedulers (not needed), hparams_name (not needed), "
      "hyper_parameters (pytorch_lightning.utilities.parsing.AttributeDict)"]


def test_stats_file_and_plain_state_dict_match_torch_load(tmp_path, caplog):
  stats = {"mean": torch.randn(1, 32, 1, 1), "std": torch.rand(1, 32, 1, 1) + 0.5}
  torch.save(stats, tmp_path / "latents_stats.pt")
  with caplog.at_level(logging.INFO, "sfd_jax.convert"):
    ours = load_state_dict(tmp_path / "latents_stats.pt")
  assert_same_tensors(ours, stats)
  assert_same_tensors(ours, torch.load(tmp_path / "latents_stats.pt", weights_only=True))
  assert caplog.messages == [f"{tmp_path / 'latents_stats.pt'}: read 2 tensors"]
  torch.save({**stats, "count": 1_281_167}, tmp_path / "with_count.pt")
  caplog.clear()
  with caplog.at_level(logging.INFO, "sfd_jax.convert"):
    assert_same_tensors(load_state_dict(tmp_path / "with_count.pt"), stats)
  assert caplog.messages[0].endswith("read 2 tensors; skipped 1 entries: count (int)")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_layouts_dtypes_and_shared_storages(tmp_path, legacy):
  g = torch.Generator().manual_seed(0)
  base = torch.randn(6, 8, generator=g)
  tensors = {
      "contiguous": base, "transposed": base.t(), "rows_with_offset": base[2:5], "strided": base[1::2, ::3],
      "column": base[:, 5], "expanded": torch.randn(8, generator=g).expand(3, 8), "scalar": torch.tensor(2.5),
      "empty": torch.zeros(0, 4), "bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16),
      "bf16_view": torch.randn(4, 6, generator=g).to(torch.bfloat16)[:, 1:4],
      "fp16": torch.randn(7, generator=g).half(),
      "fp64": torch.randn(3, 2, generator=g, dtype=torch.float64), "int64": torch.arange(-5, 7).reshape(3, 4),
      "int32": torch.arange(9, dtype=torch.int32), "int8": torch.arange(-4, 4, dtype=torch.int8),
      "uint8": torch.arange(250, 256, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
      "complex64": torch.randn(3, generator=g, dtype=torch.complex64), "parameter": torch.nn.Parameter(torch.ones(2)),
  }
  path = tmp_path / "layouts.pt"
  torch.save({"ema": tensors, "model": {"also_base": base[3]}}, path, _use_new_zipfile_serialization=not legacy)
  ours = load_state_dict(path)
  assert_same_tensors(ours, tensors)
  assert_same_tensors(ours, torch.load(path, weights_only=True)["ema"])
  assert_same_tensors(load_state_dict(path, which="model"), {"also_base": base[3]})
  with TorchFile(path) as f:  # the views of `base` are one storage, read once
    refs = {k: v for k, v in f.root["ema"].items() if isinstance(v, TensorRef)}
    assert len({refs[k].storage.key for k in ("contiguous", "transposed", "rows_with_offset", "strided")}) == 1
    raw = f.read({"bf16": refs["bf16"]})["bf16"]
  assert raw.dtype.name == "bfloat16"
  assert raw.view(np.int16).tobytes() == tensors["bf16"].view(torch.int16).numpy().tobytes()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_every_pickle_protocol(tmp_path, protocol):
  """torch.save writes protocol 2 unless asked otherwise; later protocols spell globals and objects differently."""
  ema = {"transposed": torch.randn(3, 4).t(), "bf16": torch.randn(2).to(torch.bfloat16)}
  other = {"defaultdict": __import__("collections").defaultdict(list, {1: [2]}), "set": {1, 2}, "bytes": b"\x00\xff",
           "complex": 1 + 2j, "path": pathlib.PurePosixPath("/x")}
  torch.save({"ema": ema, "other": other}, tmp_path / "p.pt", pickle_protocol=protocol)
  assert_same_tensors(load_state_dict(tmp_path / "p.pt"), ema)
  with TorchFile(tmp_path / "p.pt") as f:
    read = f.root["other"]
  assert (read["defaultdict"], read["set"], read["bytes"], read["complex"]) == ({1: [2]}, {1, 2}, b"\x00\xff", 1 + 2j)
  assert read["path"].source == "pathlib.PurePosixPath" and read["path"].args == ("/", "x")  # its parts


def test_big_endian_files(tmp_path):
  tensors = {"f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 3).to(torch.bfloat16),
             "i64": torch.arange(6).reshape(2, 3), "c64": torch.randn(2, dtype=torch.complex64),
             "u8": torch.arange(4, dtype=torch.uint8)}
  torch.save(tensors, tmp_path / "little.pt")
  with TorchFile(tmp_path / "little.pt") as f:  # storage key → element size (per real/imaginary part)
    units = {r.storage.key: r.dtype.numpy.itemsize // (2 if r.dtype.numpy.kind == "c" else 1) for r in f.root.values()}
  # What torch writes on a big-endian machine: the same archive with byteorder "big" and byte-swapped storages.
  with zipfile.ZipFile(tmp_path / "little.pt") as src, zipfile.ZipFile(tmp_path / "big.pt", "w") as dst:
    for info in src.infolist():
      data, name = src.read(info), info.filename.partition("/")[2]
      if name == "byteorder":
        data = b"big"
      elif name.startswith("data/") and units[name[5:]] > 1:
        data = np.frombuffer(data, f"<u{units[name[5:]]}").astype(f">u{units[name[5:]]}").tobytes()
      dst.writestr(info.filename, data)
  assert_same_tensors(load_state_dict(tmp_path / "big.pt"), tensors)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_only_the_chosen_entry_is_read(tmp_path, monkeypatch, legacy):
  """A checkpoint whose optimizer state is 64× its EMA weights: reading `ema` reads only the EMA storages."""
  ema = {f"blocks.{i}.weight": torch.randn(256, 256) for i in range(4)}  # 1 MiB
  opt = {"state": {i: {"step": torch.tensor(7.0), "exp_avg": torch.ones(2048, 1024),
                       "exp_avg_sq": torch.ones(2048, 1024)} for i in range(8)},
         "param_groups": [{"lr": 1e-4, "params": list(range(8))}]}  # 64 MiB
  path = tmp_path / "big_opt.pt"
  torch.save({"model": ema, "ema": ema, "opt": opt}, path, _use_new_zipfile_serialization=not legacy)
  assert path.stat().st_size > 64 << 20
  members = []
  original_open = zipfile.ZipFile.open
  monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, name, *a, **k: members.append(
      getattr(name, "filename", name)) or original_open(self, name, *a, **k))
  tracemalloc.start()
  try:
    arrays = load_state_dict(path)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert_same_tensors(arrays, ema)
  ema_bytes = sum(a.nbytes for a in arrays.values())
  assert peak < 2 * ema_bytes, f"peak {peak / 2**20:.1f} MiB reading {ema_bytes / 2**20:.1f} MiB of EMA weights"
  if not legacy:
    assert len([m for m in members if "/data/" in m]) == len(ema)


class Calls:
  """Pickles as a call of `function(*args)`: what a crafted `__reduce__` does."""

  def __init__(self, function, *args):
    self.function, self.args = function, args

  def __reduce__(self):
    return self.function, self.args


@pytest.mark.parametrize("function, name", [
    (os.system, f"{os.system.__module__}.system"), (eval, "builtins.eval"), (exec, "builtins.exec"),
    (getattr, "builtins.getattr"), (__import__, "builtins.__import__"), (subprocess.Popen, "subprocess.Popen"),
    (importlib.import_module, "importlib.import_module"), (__import__("runpy").run_path, "runpy.run_path")])
def test_code_running_pickles_are_refused(tmp_path, function, name):
  marker = tmp_path / "ran"
  torch.save({"ema": {"w": torch.ones(2)}, "opt": Calls(function, f"touch {marker}")}, tmp_path / "crafted.pt")
  with pytest.raises(ConversionError) as refusal:
    load_state_dict(tmp_path / "crafted.pt")
  assert str(refusal.value).startswith(f"refusing {tmp_path / 'crafted.pt'}: unpickling it would call {name}, ")
  assert not marker.exists()


def test_unlisted_callables_are_never_imported_or_called(tmp_path):
  """Safety does not rest on the refusal list: a callable nobody listed becomes inert data, even while its
  module is importable."""
  marker = tmp_path / "ran"
  root = tmp_path / "stand_ins"
  with stand_in_modules(tmp_path) as modules:
    torch.save({"ema": {"w": torch.ones(2)}, "hook": modules["unlisted_payload"].Payload(str(marker))},
               tmp_path / "hook.pt")
  sys.path.insert(0, str(root))
  try:
    assert_same_tensors(load_state_dict(tmp_path / "hook.pt"), {"w": torch.ones(2)})
    with TorchFile(tmp_path / "hook.pt") as f:
      assert f.root["hook"].source == "unlisted_payload.run" and f.root["hook"].args == (str(marker),)
    assert "unlisted_payload" not in sys.modules and not marker.exists()
  finally:
    sys.path.remove(str(root))


HTML = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a21\nsize 2700000000\n"


@pytest.mark.parametrize("name", ["model.safetensors", "weights.npz", "0400000.pt", "last.ckpt"])
@pytest.mark.parametrize("content", [HTML, LFS_POINTER], ids=["html", "lfs"])
def test_text_pages_in_place_of_weights(tmp_path, name, content):
  (tmp_path / name).write_bytes(content)
  with pytest.raises(ConversionError, match=r"is a text file, not weights .*download it again$"):
    load_state_dict(tmp_path / name)


def _flip_byte(path, needle: bytes):
  data = bytearray(path.read_bytes())
  data[data.index(needle) + 1] ^= 0xFF
  path.write_bytes(bytes(data))


def test_truncated_and_corrupt_files(tmp_path):
  weights = {"w": torch.full((4096,), 7.0)}
  for legacy in (False, True):
    path = tmp_path / f"cut_{legacy}.pt"
    torch.save({"ema": weights, "opt": {}}, path, _use_new_zipfile_serialization=not legacy)
    path.write_bytes(path.read_bytes()[:path.stat().st_size - 100])
    with pytest.raises(ConversionError,
                       match=rf"cannot read {path}: it is truncated or corrupt .*download or copy it again$"):
      load_state_dict(path)
  flipped = tmp_path / "flipped.pt"
  torch.save({"ema": weights}, flipped)
  _flip_byte(flipped, np.full(4, 7.0, np.float32).tobytes())
  with pytest.raises(ConversionError, match=r"truncated or corrupt \(BadZipFile: Bad CRC-32"):
    load_state_dict(flipped)
  from safetensors.numpy import save_file
  save_file({"w": np.ones(4096, np.float32)}, str(tmp_path / "cut.safetensors"))
  (tmp_path / "cut.safetensors").write_bytes((tmp_path / "cut.safetensors").read_bytes()[:5000])
  with pytest.raises(ConversionError, match="truncated or corrupt"):
    load_state_dict(tmp_path / "cut.safetensors")
  np.savez(tmp_path / "cut.npz", w=np.ones(4096, np.float32))
  (tmp_path / "cut.npz").write_bytes((tmp_path / "cut.npz").read_bytes()[:5000])
  with pytest.raises(ConversionError, match="truncated or corrupt"):
    load_state_dict(tmp_path / "cut.npz")
  (tmp_path / "empty.pt").write_bytes(b"")
  with pytest.raises(ConversionError, match="is empty"):
    load_state_dict(tmp_path / "empty.pt")
  with pytest.raises(ConversionError, match="does not exist"):
    load_state_dict(tmp_path / "missing.pt")


# The test writes a TorchScript archive, one of the files users hand in by mistake; torch deprecates making them.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_files_that_are_not_state_dicts(tmp_path):
  torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
  with pytest.raises(ConversionError, match=r"holds a pickled torch.nn.modules.linear.Linear object, not a dict"):
    load_state_dict(tmp_path / "module.pt")
  torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "scripted.pt"))
  with pytest.raises(ConversionError, match="is a TorchScript archive"):
    load_state_dict(tmp_path / "scripted.pt")
  with open(tmp_path / "arrays.pt", "wb") as f:  # a zip, but not torch's
    np.savez(f, w=np.ones(2))
  with pytest.raises(ConversionError, match="not a torch checkpoint"):
    load_state_dict(tmp_path / "arrays.pt")
