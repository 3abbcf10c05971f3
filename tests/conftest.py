"""Shared test setup: float32 'highest' matmuls, fast XLA compilation, the persistent compilation cache.

Compilation, not compute, is the cost of these tests: XLA's backend optimisation is turned off (it changes
run time, not results beyond float rounding), and compiled programs are cached on disk across processes.
"""
import os
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("SFD_JAX_CACHE", str(Path.home() / ".cache/sfd_jax/xla"))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", os.environ["SFD_JAX_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
