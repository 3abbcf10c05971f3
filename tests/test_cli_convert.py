"""The converter CLI: official files → exported models that reproduce the official numbers, and back."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
torch = pytest.importorskip("torch")  # the torch extra; only the Python 3.13 tier runs without it

from sfd_jax.convert import files as convert
from sfd_jax.convert import export
from tests.golden import load_golden, nchw_to_nhwc


@pytest.fixture(scope="module")
def dit_golden():
  config, arrays = load_golden("dit_tiny")
  return config, arrays, {k: v.astype(np.float32) for k, v in arrays["state_dict"].items()}


def test_dit_checkpoint_to_export_and_back(dit_golden, tmp_path):
  config, arrays, sd = dit_golden
  torch.save({"ema": {k: torch.tensor(v) for k, v in sd.items()}, "opt": {}}, tmp_path / "ckpt.pt")
  out = convert.convert_to_flax("dit", str(tmp_path / "ckpt.pt"), str(tmp_path / "export"),
                                model_kwargs=config["model_kwargs"])
  model, variables, meta = export.load_model(out)
  assert meta["official_kwargs"] == config["model_kwargs"]
  io = arrays["inputs_outputs"]
  v = jax.jit(model.apply)(variables, nchw_to_nhwc(io["x"]), io["t_tex"], io["t_sem"], io["y"])
  np.testing.assert_allclose(np.asarray(v), nchw_to_nhwc(io["velocity"]), atol=2e-5, rtol=1e-4)
  back = np.load(convert.convert_to_torch(str(out), str(tmp_path / "back.npz")))
  assert sorted(back.files) == sorted(sd)
  for key in sd:  # weights exactly; the fixed tables within an ulp (numpy's and torch's cos differ there)
    np.testing.assert_allclose(back[key], sd[key], rtol=0, atol=1e-7 if key in ("pos_embed", "feat_rope.freqs_cos",
                                                                                 "feat_rope.freqs_sin") else 0)
  with pytest.raises(FileExistsError):
    convert.convert_to_flax("dit", str(tmp_path / "ckpt.pt"), str(out), model_kwargs=config["model_kwargs"])


def test_texture_vae_lightning_checkpoint(tmp_path):
  config, arrays = load_golden("vae_tiny")
  sd = {k: torch.tensor(v.astype(np.float32)) for k, v in arrays["state_dict"].items()}
  sd["loss.logvar"] = torch.zeros(())
  torch.save({"state_dict": sd, "epoch": 50}, tmp_path / "vae.ckpt")
  out = convert.convert_to_flax("texture_vae", str(tmp_path / "vae.ckpt"), str(tmp_path / "vae"),
                                model_kwargs=config["encoder_decoder_kwargs"],
                                embed_dim=config["autoencoder_kwargs"]["embed_dim"])
  vae, variables, _ = export.load_model(out)
  mean, _ = jax.jit(lambda v, x: vae.apply(v, x, method=vae.encode))(variables, nchw_to_nhwc(arrays["vae"]["image"]))
  np.testing.assert_allclose(np.asarray(mean), nchw_to_nhwc(arrays["vae"]["posterior_mean"]), atol=1e-4)


def test_official_stats_files(tmp_path):
  mean, std = np.arange(32, dtype=np.float32), np.linspace(1, 2, 32, dtype=np.float32)
  torch.save({"mean": torch.tensor(mean).reshape(1, 32, 1, 1), "std": torch.tensor(std).reshape(1, 32, 1, 1)},
             tmp_path / "latents_stats.pt")
  torch.save({"mean": torch.zeros(1, 16, 1, 1), "std": torch.ones(1, 16, 1, 1)}, tmp_path / "latents_sv_stats.pt")
  out = convert.convert_to_flax("stats", str(tmp_path / "latents_stats.pt"), str(tmp_path / "stats.json"),
                                semantic_stats=str(tmp_path / "latents_sv_stats.pt"))
  stats = json.loads(out.read_text())
  np.testing.assert_allclose(stats["texture"]["mean"], mean)
  np.testing.assert_allclose(stats["texture"]["std"], std)
  assert len(stats["semantic"]["mean"]) == 16


def test_bad_checkpoint_is_one_clear_error(tmp_path):
  (tmp_path / "broken.pt").write_bytes(b"not a torch file")
  result = subprocess.run([sys.executable, "-m", "sfd_jax.cli.convert", "--kind=dit", "--preset=S",
                           f"--checkpoint={tmp_path / 'broken.pt'}", f"--out={tmp_path / 'out'}"],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().startswith("error: cannot read") and "Traceback" not in result.stderr
  assert not (tmp_path / "out").exists()


def test_dinov2_hugging_face_directory(tmp_path):
  from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
  torch.manual_seed(0)
  config = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     num_register_tokens=4, patch_size=14, image_size=28)
  reference = Dinov2WithRegistersModel(config).eval()
  reference.save_pretrained(tmp_path / "hf")
  out = convert.convert_to_flax("dinov2", str(tmp_path / "hf"), str(tmp_path / "dino"))
  model, variables, _ = export.load_model(out)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 28, 28, 3)).astype(np.float32)
  ours = jax.jit(model.apply)(variables, images)["patch_tokens"]
  with torch.no_grad():
    theirs = reference(torch.tensor(images).permute(0, 3, 1, 2)).last_hidden_state[:, 1 + 4:]
  np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-5)
