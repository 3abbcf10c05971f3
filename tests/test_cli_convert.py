"""The converter CLI: official files → exported models that reproduce the official numbers, and back.

The official files are written as the official code writes them (train.py's `{"model", "ema", "opt", "config"}`
with a pickled OmegaConf config, Lightning's `.ckpt`, the stats `.pt`), by the helpers of test_torch_files.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the torch extra; only the Python 3.13 tier runs without it

from sfd_jax.convert import export, files as convert
from sfd_jax.convert.dit import dit_kwargs, dit_to_torch
from sfd_jax.convert.texture_vae import texture_vae_to_torch
from sfd_jax.errors import UserError
from sfd_jax.models.dit import LightningDiT
from tests.golden import load_golden, nchw_to_nhwc, subprocess_env
from tests.test_torch_files import HTML, Calls, write_lightning_checkpoint, write_train_py_checkpoint

FIXED_TABLES = ("pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin")  # numpy's and torch's cos differ by an ulp


def run_convert(*args):
  return subprocess.run([sys.executable, "-m", "sfd_jax.cli.convert", *args], capture_output=True, text=True,
                        timeout=300, env=subprocess_env())


def assert_official_weights(exported, state_dict):
  """The exported model gives back the file's tensors exactly (the fixed tables within an ulp)."""
  model, variables, _ = export.load_model(exported)
  to_torch = dit_to_torch if isinstance(model, LightningDiT) else texture_vae_to_torch
  back = to_torch(model, variables)
  assert sorted(back) == sorted(state_dict)
  for key, value in state_dict.items():
    np.testing.assert_allclose(back[key], value, rtol=0, atol=1e-7 if key in FIXED_TABLES else 0, err_msg=key)


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
  for key in sd:
    np.testing.assert_allclose(back[key], sd[key], rtol=0, atol=1e-7 if key in FIXED_TABLES else 0)
  with pytest.raises(UserError, match="already holds an exported model"):
    convert.convert_to_flax("dit", str(tmp_path / "ckpt.pt"), str(out), model_kwargs=config["model_kwargs"])


def test_train_py_checkpoint_with_no_flag(dit_golden, tmp_path):
  """A checkpoint as train.py writes it (pickled OmegaConf config, AdamW state) converts with no flag and no
  omegaconf: its EMA weights by default, its training weights with --which=model."""
  config, _, sd = dit_golden
  ema = {k: torch.tensor(v) for k, v in sd.items()}
  model = {k: v if k in FIXED_TABLES else v * 0.5 for k, v in ema.items()}
  path = tmp_path / "0400000.pt"
  write_train_py_checkpoint(path, ema, model)
  result = run_convert("--kind=dit", f"--checkpoint={path}", f"--out={tmp_path / 'ema'}",
                       f"--model_kwargs={json.dumps(config['model_kwargs'])}")
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [
      f"{path}: read 81 tensors of 'ema'; skipped 3 entries: model (not needed), opt (not needed), "
      "config (omegaconf.dictconfig.DictConfig)", f"wrote {tmp_path / 'ema'}"]
  assert_official_weights(tmp_path / "ema", sd)
  out = convert.convert_to_flax("dit", str(path), str(tmp_path / "model"), model_kwargs=config["model_kwargs"],
                                which="model")
  assert_official_weights(out, {k: v.numpy() for k, v in model.items()})


def test_texture_vae_lightning_checkpoint(tmp_path):
  config, arrays = load_golden("vae_tiny")
  sd = {k: v.astype(np.float32) for k, v in arrays["state_dict"].items()}
  loss = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4)}
  write_lightning_checkpoint(tmp_path / "vae.ckpt", {**{k: torch.tensor(v) for k, v in sd.items()}, **loss})
  result = run_convert("--kind=texture_vae", f"--checkpoint={tmp_path / 'vae.ckpt'}", f"--out={tmp_path / 'vae'}",
                       f"--model_kwargs={json.dumps(config['encoder_decoder_kwargs'])}",
                       f"--embed_dim={config['autoencoder_kwargs']['embed_dim']}")
  assert result.returncode == 0, result.stderr
  assert f"read {len(sd) + 2} tensors of 'state_dict'; skipped 8 entries" in result.stdout
  assert_official_weights(tmp_path / "vae", sd)
  vae, variables, _ = export.load_model(tmp_path / "vae")
  mean, _ = jax.jit(lambda v, x: vae.apply(v, x, method=vae.encode))(variables, nchw_to_nhwc(arrays["vae"]["image"]))
  np.testing.assert_allclose(np.asarray(mean), nchw_to_nhwc(arrays["vae"]["posterior_mean"]), atol=1e-4)


def test_official_stats_files(tmp_path):
  mean, std = np.arange(32, dtype=np.float32) / 7, np.linspace(1, 2, 32, dtype=np.float32)
  torch.save({"mean": torch.tensor(mean).reshape(1, 32, 1, 1), "std": torch.tensor(std).reshape(1, 32, 1, 1)},
             tmp_path / "latents_stats.pt")
  torch.save({"mean": torch.zeros(1, 16, 1, 1), "std": torch.ones(1, 16, 1, 1)}, tmp_path / "latents_sv_stats.pt")
  result = run_convert("--kind=stats", f"--checkpoint={tmp_path / 'latents_stats.pt'}",
                       f"--semantic_stats={tmp_path / 'latents_sv_stats.pt'}", f"--out={tmp_path / 'stats.json'}")
  assert result.returncode == 0, result.stderr
  stats = json.loads((tmp_path / "stats.json").read_text())
  assert stats["texture"]["mean"] == mean.astype(np.float64).tolist()
  assert stats["texture"]["std"] == std.astype(np.float64).tolist()
  assert stats["semantic"] == {"mean": [0.0] * 16, "std": [1.0] * 16}


NO_REPA = dict(input_size=2, patch_size=1, in_channels=48, hidden_size=32, depth=1, num_heads=2, mlp_ratio=4.0,
               class_dropout_prob=0.1, num_classes=10, learn_sigma=False, use_qknorm=True, use_swiglu=True,
               use_rope=True, use_rmsnorm=True, wo_shift=False, use_checkpoint=False, use_repa=False,
               repa_dino_version=None, repa_depth=None, semantic_chans=16, semfirst_delta_t=0.3)


def test_model_without_repa_converts_and_samples_also_as_guide(tmp_path):
  """An official model built with use_repa=False, repa_dino_version=None, repa_depth=None (a guide model or an
  ablation) converts through the CLI and samples, as the main model and as the AutoGuidance guide."""
  from sfd_jax import generate
  from sfd_jax.convert import load_texture_vae

  model = LightningDiT(**dit_kwargs(NO_REPA))
  assert not model.use_repa
  template = dit_to_torch(model, model.init(jax.random.key(0), *model.dummy_inputs()))
  rng = np.random.default_rng(0)
  sd = {k: v if k in FIXED_TABLES else rng.normal(0, 0.3, v.shape).astype(np.float32) for k, v in template.items()}
  assert not any(k.startswith("repa_projector") for k in sd)
  write_train_py_checkpoint(tmp_path / "guide.pt", {k: torch.tensor(v) for k, v in sd.items()})
  result = run_convert("--kind=dit", f"--checkpoint={tmp_path / 'guide.pt'}", f"--out={tmp_path / 'no_repa'}",
                       f"--model_kwargs={json.dumps(NO_REPA)}")
  assert result.returncode == 0, result.stderr
  assert_official_weights(tmp_path / "no_repa", sd)

  vae_config, vae = load_golden("vae_tiny")
  vae_model, vae_vars = load_texture_vae(vae_config["encoder_decoder_kwargs"],
                                         vae_config["autoencoder_kwargs"]["embed_dim"],
                                         {k: v.astype(np.float32) for k, v in vae["state_dict"].items()})
  export.save_model(tmp_path / "vae", vae_model, vae_vars)
  (tmp_path / "stats.json").write_text(json.dumps({"texture": {"mean": [0.0] * 32, "std": [1.0] * 32}}))
  out = generate.run(generate.Settings(
      model=str(tmp_path / "no_repa"), guide_model=str(tmp_path / "guide.pt"), guide_model_kwargs=NO_REPA,
      vae=str(tmp_path / "vae"), stats=str(tmp_path / "stats.json"), out=str(tmp_path / "samples"), num_images=2,
      batch_size=2, method="euler", num_steps=3, cfg_scale=1.5))
  with np.load(out / "samples.npz") as npz:
    images = npz["arr_0"]
  assert images.shape == (2, 32, 32, 3) and images.std() > 0


@pytest.mark.parametrize("content, message", [
    (HTML, "is a text file, not weights (it starts with '<!DOCTYPE html>'): probably the HTML error page or Git "
           "LFS pointer of a failed download; download it again"),
    (b"\x00\x01 not weights", "it is not a torch file"),
    (b"PK\x03\x04" + b"\x00" * 60, "it is truncated or corrupt"),
], ids=["html_page", "garbage", "truncated_zip"])
def test_bad_file_is_one_clear_error(tmp_path, content, message):
  (tmp_path / "0400000.pt").write_bytes(content)
  result = run_convert("--kind=dit", "--preset=S", f"--checkpoint={tmp_path / '0400000.pt'}",
                       f"--out={tmp_path / 'out'}")
  assert result.returncode == 2, result.stderr
  assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
  assert str(tmp_path / "0400000.pt") in result.stderr and message in result.stderr
  assert not (tmp_path / "out").exists()


def test_code_running_file_is_refused(tmp_path):
  marker = tmp_path / "ran"
  torch.save({"ema": {"pos_embed": torch.zeros(1, 4, 8)}, "opt": Calls(os.system, f"touch {marker}")},
             tmp_path / "0400000.pt")
  result = run_convert("--kind=dit", "--preset=S", f"--checkpoint={tmp_path / '0400000.pt'}",
                       f"--out={tmp_path / 'out'}")
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip() == (
      f"error: refusing {tmp_path / '0400000.pt'}: unpickling it would call {os.system.__module__}.system, which runs "
      "code; a weight file never needs that, so it is not a plain checkpoint (do not open it with torch.load either)")
  assert not marker.exists() and not (tmp_path / "out").exists()


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
