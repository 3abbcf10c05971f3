"""Shared test setup: float32 'highest' matmuls, fast XLA compilation, the persistent compilation cache, and
the torch check: the parity references are torch code, so a run without torch is an error unless it says
`--without-torch` (the Python 3.13 tier), where the tests that need torch skip.

Compilation, not compute, is the cost of these tests: XLA's backend optimisation is turned off (it changes
run time, not results beyond float rounding), and compiled programs are cached on disk across processes.
"""
import importlib.util
import os
from pathlib import Path

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("SFD_JAX_CACHE", str(Path.home() / ".cache/sfd_jax/xla"))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", os.environ["SFD_JAX_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_addoption(parser):
  parser.addoption("--without-torch", action="store_true",
                   help="torch is not installed: the tests that need it skip (default: a missing torch is an error)")


def pytest_configure(config):
  if importlib.util.find_spec("torch") is None and not config.getoption("--without-torch"):
    raise pytest.UsageError("torch is not installed, and the parity tests compare against torch references: "
                            "pip install -e \".[test,torch]\" (see README \"Install\"), or pass --without-torch "
                            "to skip the tests that need it")
