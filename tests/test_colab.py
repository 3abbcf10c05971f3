"""The Colab notebook, every code cell executed in a Jupyter kernel on CPU, twice (a second Colab session).

The released files are stood in for by the golden tiny models written in the released formats (train.py's
`{"model", "ema", "opt", "config"}` with an OmegaConf config, Lightning's `.ckpt`, the stats `.pt`) without torch;
`$SFD_NOTEBOOK_RELEASE` points the download cell at them, and a cell injected after the parameters cell (as
papermill does) gives the convert flags of the tiny models in place of XL and B.
"""
import ast
import importlib.metadata
import json
import re
import sys

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

from sfd_jax.convert import export
from tests import torch_format
from tests.golden import REPO, load_golden

LABELS = "1,5,9,2,0,3,7,4"  # the golden models have 10 classes
# What the notebook takes from Colab's preinstalled packages (import name: how its text names it).
COLAB_PREINSTALLED = {"google": "google.colab", "huggingface_hub": "huggingface_hub", "IPython": "IPython"}
DICT_CONFIG = torch_format.Name("omegaconf.dictconfig", "DictConfig")


def float32(state_dict):
  return {k: v.astype(np.float32) for k, v in state_dict.items()}


def write_release(root):
  """The released files, laid out as in SFD-Project/SFD; returns the official kwargs of the three networks."""
  dit_config, dit = load_golden("dit_tiny")
  sampler_config, sampler = load_golden("sampler")
  vae_config, vae = load_golden("vae_tiny")
  for name, kwargs, weights, step in [("sfd_xl", dit_config["model_kwargs"], dit["state_dict"], 4000000),
                                      ("sfd_autoguidance_b", sampler_config["ag_model_kwargs"],
                                       sampler["ag_state_dict"], 70000)]:
    (root / "model_weights" / name / "checkpoints").mkdir(parents=True)
    config = torch_format.Instance(DICT_CONFIG, {"_content": {"model": {"model_type": "LightningDiT", **kwargs}}})
    torch_format.save({"model": float32(weights), "ema": float32(weights), "config": config,
                       "opt": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]}},
                      root / "model_weights" / name / "checkpoints" / f"{step:07d}.pt")
  torch_format.save({"state_dict": float32(vae["state_dict"]), "epoch": 49, "global_step": 1},
                    root / "ldm-imagenet256-f16d32-50ep.ckpt")
  latents = root / "imagenet1k-latents" / "imagenet_train_256"
  latents.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for name, channels in [("latents_stats.pt", 32), ("latents_sv_stats.pt", 16)]:
    torch_format.save({"mean": rng.normal(size=(1, channels, 1, 1)).astype(np.float32),
                       "std": rng.uniform(0.5, 2, size=(1, channels, 1, 1)).astype(np.float32)}, latents / name)
  return dit_config["model_kwargs"], sampler_config["ag_model_kwargs"], vae_config


def execute(notebook_path, injected: str, cwd):
  notebook = nbformat.read(notebook_path, as_version=4)
  parameters = next(i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", []))
  notebook.cells.insert(parameters + 1, nbformat.v4.new_code_cell(injected))
  NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
  return notebook


def text_outputs(notebook):
  return "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_stand_in_files_are_what_torch_load_reads(tmp_path):
  torch = pytest.importorskip("torch")  # here torch checks the writer; the notebook test needs no torch
  arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "h": np.float16([1, 2]), "i": np.int64([[3]]),
            "scalar": np.array(2.5, np.float32), "transposed": np.arange(12.0).reshape(3, 4).T}
  torch_format.save({"ema": arrays, "step": 7, "names": ["a", "b"]}, tmp_path / "file.pt")
  loaded = torch.load(tmp_path / "file.pt", weights_only=True)
  assert loaded["step"] == 7 and loaded["names"] == ["a", "b"] and sorted(loaded["ema"]) == sorted(arrays)
  for key, value in arrays.items():
    assert loaded["ema"][key].numpy().dtype == value.dtype, key
    np.testing.assert_array_equal(loaded["ema"][key].numpy(), value, err_msg=key)


def test_notebook_converts_the_release_and_samples_a_grid_twice(tmp_path, monkeypatch):
  dit_kwargs, guide_kwargs, vae_config = write_release(tmp_path / "release")
  monkeypatch.setenv("SFD_NOTEBOOK_RELEASE", str(tmp_path / "release"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  injected = (f"MODEL_FLAGS = ['--model_kwargs={json.dumps(dit_kwargs)}']\n"
              f"GUIDE_FLAGS = ['--model_kwargs={json.dumps(guide_kwargs)}']\n"
              f"VAE_FLAGS = ['--model_kwargs={json.dumps(vae_config['encoder_decoder_kwargs'])}', "
              f"'--embed_dim={vae_config['autoencoder_kwargs']['embed_dim']}']\n"
              f"LABELS = {LABELS!r}")
  notebook_path = REPO / "launch" / "colab_sampling.ipynb"
  assert nbformat.read(notebook_path, as_version=4).metadata["accelerator"] == "TPU"

  first = execute(notebook_path, injected, tmp_path)
  root = tmp_path / "sfd"
  code = [c for c in first.cells if c.cell_type == "code"]
  assert all(c.execution_count for c in code)  # every cell ran, none raised (nbclient stops at an error)
  assert "Restart" not in text_outputs(first)  # nothing this kernel had imported was replaced
  assert text_outputs(first).count("wrote") == 5  # four conversions, then the grid
  _, _, meta = export.load_model(root / "exports" / "sfd_xl")
  assert meta["official_kwargs"] == dit_kwargs and meta["source"].endswith("sfd_xl/checkpoints/4000000.pt")
  stats = json.loads((root / "exports" / "stats.json").read_text())
  assert len(stats["texture"]["mean"]) == 32 and len(stats["semantic"]["mean"]) == 16
  grid = np.asarray(Image.open(root / "samples" / "demo.png"))
  assert grid.shape == (8 * 16 + 14, 8 * 8 * 16, 3) and grid[:128].std() > 10  # 8 images of 128 px, captioned
  assert any("image/png" in o.get("data", {}) for o in code[-1].outputs)  # the grid is shown
  cache = sorted((root / "xla_cache").iterdir())
  assert cache

  second = execute(notebook_path, injected, tmp_path)  # a new session: exports and compiled programs reused
  assert text_outputs(second).count("wrote") == 1
  assert sorted((root / "xla_cache").iterdir()) == cache


def test_notebook_imports_only_declared_dependencies_and_what_it_says_colab_preinstalls():
  notebook = nbformat.read(REPO / "launch" / "colab_sampling.ipynb", as_version=4)
  imported = set()
  for cell in notebook.cells:
    if cell.cell_type == "code":
      python = re.sub(r"^(\s*)%.*$", r"\1pass", cell.source, flags=re.M)  # IPython's magics
      for node in ast.walk(ast.parse(python)):
        if isinstance(node, ast.Import):
          imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
          imported.add(node.module.split(".")[0])
  declared = {"sfd_jax"} | {re.split(r"[\[<>=!~; ]", r)[0].replace("-", "_")
                            for r in importlib.metadata.requires("sfd_jax") if "extra ==" not in r}
  others = imported - declared - set(sys.stdlib_module_names)
  assert others == set(COLAB_PREINSTALLED), others
  text = "".join(c.source for c in notebook.cells if c.cell_type == "markdown")
  assert all(name in text for name in COLAB_PREINSTALLED.values())
  assert "Colab preinstalls" in text and "PRECISION = 'highest'" in text
