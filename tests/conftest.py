"""Shared test setup: float32 'highest' matmuls and the persistent compilation cache."""
import os
from pathlib import Path

import jax

REPO = Path(__file__).resolve().parents[1]
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", os.environ.get("SFD_JAX_CACHE", str(Path.home() / ".cache/sfd_jax/xla")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

