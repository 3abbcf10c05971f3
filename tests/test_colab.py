"""The Colab notebook's code cells, run on CPU against a smoke training run (install/display cells skipped)."""
import json
import os
import subprocess
import sys

import jax
import nbformat
import numpy as np
from PIL import Image

from sfd_jax.convert import export
from sfd_jax.models.texture_vae import AutoencoderKL
from tests.golden import REPO


def test_notebook_samples_a_grid_from_a_smoke_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, "-m", "sfd_jax.cli.train", f"--config={REPO / 'configs' / 'smoke.py'}",
                  f"--workdir={workdir}", "--config.total_steps=2", "--config.ckpt_every=2",
                  "--config.sample_every=0"], env=env, check=True, capture_output=True, timeout=600)
  vae = AutoencoderKL(ch=32, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(), resolution=8)
  export.save_model(tmp_path / "vae", vae, jax.jit(vae.init)(jax.random.key(0), *vae.dummy_inputs()))
  (tmp_path / "stats.json").write_text(json.dumps({"texture": {"mean": [0.0] * 32, "std": [1.0] * 32}}))

  notebook = nbformat.read(REPO / "launch" / "colab_sampling.ipynb", as_version=4)
  namespace = {}
  for cell in notebook.cells:
    tags = cell.metadata.get("tags", [])
    if cell.cell_type != "code" or "install" in tags or "display" in tags:
      continue
    source = cell.source
    if "parameters" in tags:
      source = (f"MODEL, VAE, STATS, GUIDE = {str(workdir)!r}, {str(tmp_path / 'vae')!r}, "
                f"{str(tmp_path / 'stats.json')!r}, None\nOUT = {str(tmp_path / 'out')!r}\nLABELS = '3,1,4,1'\n"
                "CFG_SCALE = 1.5\nMETHOD, NUM_STEPS = 'euler', 6\nPRESET = 'S'")
    exec(compile(source, "notebook", "exec"), namespace)
  grid = np.asarray(Image.open(namespace["grid_path"]))
  assert grid.shape[1] == 4 * 8 and grid.ndim == 3
