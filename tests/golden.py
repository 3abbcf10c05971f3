"""Test helpers: golden fixture lookup (tests/golden, or `$SFD_GOLDEN_DIR`), NCHW/NHWC, subprocesses."""
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


GOLDEN = Path(os.environ.get("SFD_GOLDEN_DIR", REPO / "tests" / "golden"))


def golden_path(name: str) -> Path:
  """The directory of one golden fixture set (tests/golden ships them; `$SFD_GOLDEN_DIR` points at another set).
  A missing one is a failure: a parity test that cannot run has not passed."""
  path = GOLDEN / name
  if not path.is_dir():
    pytest.fail(f"golden fixtures {path} not found: tests/golden is part of the repository "
                "(or $SFD_GOLDEN_DIR names another fixture set)")
  return path


def load_golden(name: str):
  """(config dict, {npz file stem: {key: array}}) of one golden fixture set."""
  path = golden_path(name)
  config = json.loads((path / "config.json").read_text())
  arrays = {}
  for f in sorted(path.glob("*.npz")):
    with np.load(f) as z:
      arrays[f.stem] = {k: z[k] for k in z.files}
  return config, arrays


def nchw_to_nhwc(x):
  return np.moveaxis(np.asarray(x), 1, -1)


def nhwc_to_nchw(x):
  return np.moveaxis(np.asarray(x), -1, 1)


def subprocess_env(devices: int = 1) -> dict:
  """Environment for a JAX subprocess on `devices` fake CPU devices, sharing the tests' XLA flags and cache."""
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
  return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu",
          "JAX_COMPILATION_CACHE_DIR": os.environ.get("SFD_JAX_CACHE", ""),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}


def free_port() -> int:
  """A free localhost port for a jax.distributed coordinator."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]
