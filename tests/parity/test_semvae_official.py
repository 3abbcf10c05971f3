"""The released Semantic VAE (golden/semvae_official): its checkpoint as train.py writes it, converted through the
CLI without torch, gives the official posterior, decodings and training loss terms; and back.

Every size comes from the fixture's config.json, so a fixture set of the released size ($SFD_GOLDEN_DIR) runs
through the same tests.
"""
import math
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfd_jax.convert import export, files as convert
from sfd_jax.convert.io import ConversionError, load_checkpoint
from sfd_jax.convert.semvae import load_semvae, semvae_to_torch
from sfd_jax.models.semvae import SemVAE
from sfd_jax.training import semvae as semvae_training
from tests import torch_format
from tests.golden import load_golden, subprocess_env

ATOL, RTOL = 2e-5, 1e-4


def run_convert(*args):
  return subprocess.run([sys.executable, "-m", "sfd_jax.cli.convert", *args], capture_output=True, text=True,
                        timeout=300, env=subprocess_env())


def adamw_state(state_dict: dict, step: int) -> dict:
  """`optimizer_state_dict` of torch's AdamW after `step` steps (accelerate saves the wrapped optimizer's)."""
  state = {i: {"step": np.array(float(step), np.float32), "exp_avg": np.zeros_like(w), "exp_avg_sq": np.zeros_like(w)}
           for i, w in enumerate(state_dict.values())}
  group = {"lr": 5e-6, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "amsgrad": False, "foreach": None,
           "maximize": False, "capturable": False, "differentiable": False, "fused": None, "initial_lr": 5e-5,
           "params": list(range(len(state_dict)))}
  return {"state": state, "param_groups": [group]}


def sequential_lr_state(step: int) -> dict:
  """`scheduler_state_dict` of train.py's SequentialLR (LinearLR, ConstantLR, CosineAnnealingLR)."""
  common = {"base_lrs": [5e-5], "last_epoch": step, "verbose": False, "_step_count": step + 1,
            "_get_lr_called_within_step": False, "_last_lr": [5e-6]}
  return {"_milestones": [500, 800_500], "last_epoch": step, "_last_lr": [5e-6], "_schedulers": [
      {**common, "start_factor": 0.01, "end_factor": 1.0, "total_iters": 500},
      {**common, "factor": 1.0, "total_iters": 800_000},
      {**common, "T_max": 199_500, "eta_min": 5e-6}]}


def write_semvae_checkpoint(path, state_dict: dict, config_yaml: str | None, input_dim: int, bottleneck_dim: int):
  """`semantic_ae_final.pt` as the official train.py saves it (torch's file format, written without torch)."""
  step = 1_000_000
  checkpoint = {"iteration": step, "model_state_dict": state_dict,
                "optimizer_state_dict": adamw_state(state_dict, step),
                "scheduler_state_dict": sequential_lr_state(step), "loss": 0.25,
                "loss_averages": {"total": 0.25, "mse": 0.2, "cos": 0.05, "l1": 0.3, "kl": 1234.5}}
  if config_yaml is not None:
    checkpoint["config"] = config_yaml
  torch_format.save({**checkpoint, "input_dim": input_dim, "bottleneck_dim": bottleneck_dim}, path)


@pytest.fixture(scope="module")
def golden():
  config, arrays = load_golden("semvae_official")
  state_dict = {k: v.astype(np.float32) for k, v in arrays["state_dict"].items()}
  return config, arrays["semvae"], state_dict


@pytest.fixture(scope="module")
def converted(golden, tmp_path_factory):
  """The fixture's weights written as train.py writes them, converted by the CLI (a subprocess: no torch)."""
  config, _, state_dict = golden
  arch = config["arch"]
  tmp = tmp_path_factory.mktemp("semvae")
  path = tmp / "semantic_ae_final.pt"
  write_semvae_checkpoint(path, state_dict, config["config_yaml"], arch["input_dim"], arch["bottleneck_dim"])
  result = run_convert("--kind=semvae", f"--checkpoint={path}", f"--out={tmp / 'semvae'}")
  return path, tmp / "semvae", result


def _grid(tokens):
  """(B, L, C) official tokens → the (B, g, g, C) NHWC grid, rows of the g×g grid row-major."""
  b, n, c = tokens.shape
  g = math.isqrt(n)
  return np.asarray(tokens).reshape(b, g, g, c)


def _tokens(grid):
  return np.asarray(grid).reshape(grid.shape[0], -1, grid.shape[-1])


def test_cli_reads_the_train_py_checkpoint(golden, converted):
  config, _, state_dict = golden
  path, out, result = converted
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [
      f"{path}: read {len(state_dict)} tensors of 'model_state_dict' and the values config, input_dim, "
      "bottleneck_dim; skipped 5 entries: iteration (not needed), optimizer_state_dict (not needed), "
      "scheduler_state_dict (not needed), loss (not needed), loss_averages (not needed)", f"wrote {out}"]
  model, variables, meta = export.load_model(out)
  arch = config["arch"]
  assert isinstance(model, SemVAE)
  assert (model.feature_dim, model.latent_channels, model.hidden_size, model.num_heads, model.encoder_depth,
          model.decoder_depth) == (arch["input_dim"], arch["bottleneck_dim"], arch["hidden_dim"],
                                   arch["transformer_heads"], arch["transformer_blocks"], arch["transformer_blocks"])
  assert meta["official_kwargs"] == {"arch": "transformer", "is_vae": True, **arch}
  back = semvae_to_torch(model, variables)
  assert [(k, list(v.shape)) for k, v in back.items()] == [(k, s) for k, s in config["spec"]]
  for key, value in state_dict.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


@pytest.fixture(scope="module")
def outputs(golden, converted):
  """encode, decode(mean) and decode(mean + σ·ε) of the converted model on the fixture's tokens, and the training
  objective's metrics with the fixture's ε."""
  _, ref, _ = golden
  model, variables, _ = export.load_model(converted[1])
  loss_cfg = semvae_training.base_config().loss

  @jax.jit
  def run(params, tokens, eps):
    mean, logvar = model.apply({"params": params}, tokens, method="encode")
    decode = lambda z: model.apply({"params": params}, z, method="decode")
    _, metrics = semvae_training.objective(model, params, tokens, eps, loss_cfg)
    return mean, logvar, decode(mean), decode(mean + jnp.exp(0.5 * logvar) * eps), metrics

  return jax.device_get(run(variables["params"], _grid(ref["tokens"]), _grid(ref["eps"])))


def test_encode_gives_the_official_posterior(golden, outputs):
  _, ref, _ = golden
  mean, logvar = outputs[:2]
  np.testing.assert_allclose(_tokens(mean), ref["mean"], atol=ATOL, rtol=RTOL)
  np.testing.assert_allclose(_tokens(logvar), ref["logvar"], atol=ATOL, rtol=RTOL)


def test_decode_gives_the_official_features(golden, outputs):
  _, ref, _ = golden
  decoded_mean, decoded_z = outputs[2:4]
  scale = np.abs(ref["decoded_mean"]).max()
  np.testing.assert_allclose(_tokens(decoded_mean), ref["decoded_mean"], atol=ATOL * scale, rtol=RTOL)
  np.testing.assert_allclose(_tokens(decoded_z), ref["decoded_z"], atol=ATOL * scale, rtol=RTOL)


def test_training_loss_is_the_official(golden, outputs):
  """The loss terms of train.py (cosine over the token axis, KL summed per sample and averaged), with the
  weights of ch16.yaml, through the project's SemVAE objective."""
  config, ref, _ = golden
  metrics = outputs[4]
  loss_cfg = semvae_training.base_config().loss
  assert {name: loss_cfg[f"{name}_weight"] for name in ("mse", "cos", "l1", "kl")} == config["loss_weights"]
  for name in ("mse", "l1", "cos", "kl"):
    np.testing.assert_allclose(metrics[f"loss_{name}"], ref[f"loss_{name}"], rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(metrics["loss"], ref["loss_total"], rtol=1e-5)


def test_back_to_the_official_files(golden, converted, tmp_path):
  """--to_torch: an .npz state dict without torch; with torch, the checkpoint dict train.py saves, which the
  converter reads back with the same heads."""
  config, _, state_dict = golden
  back = np.load(convert.convert_to_torch(str(converted[1]), str(tmp_path / "semvae.npz")))
  assert sorted(back.files) == sorted(state_dict)
  for key, value in state_dict.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  torch = pytest.importorskip("torch")
  result = run_convert("--kind=semvae", "--to_torch", f"--checkpoint={converted[1]}",
                   f"--out={tmp_path / 'semvae.pt'}")
  assert result.returncode == 0, result.stderr
  saved = torch.load(tmp_path / "semvae.pt", weights_only=True)
  assert sorted(saved) == ["bottleneck_dim", "config", "input_dim", "model_state_dict"]
  arch = config["arch"]
  assert (saved["input_dim"], saved["bottleneck_dim"]) == (arch["input_dim"], arch["bottleneck_dim"])
  for key, value in state_dict.items():
    np.testing.assert_array_equal(saved["model_state_dict"][key].numpy(), value, err_msg=key)
  weights, values = load_checkpoint(tmp_path / "semvae.pt", keep=("config", "input_dim", "bottleneck_dim"))
  model, _ = load_semvae(weights, values)
  assert model.num_heads == config["arch"]["transformer_heads"]


def test_a_file_without_its_config_takes_the_released_heads(tmp_path):
  """A bare state dict (no YAML) converts with 6 heads and says so; a width 6 heads cannot split is an error."""
  model = SemVAE(feature_dim=24, latent_channels=4, hidden_size=48, encoder_depth=1, decoder_depth=1, num_heads=6,
                 grid_size=2)
  state_dict = semvae_to_torch(model, jax.jit(model.init)(jax.random.key(0), *model.dummy_inputs()))
  torch_format.save(state_dict, tmp_path / "bare.pt")
  result = run_convert("--kind=semvae", f"--checkpoint={tmp_path / 'bare.pt'}", f"--out={tmp_path / 'out'}")
  assert result.returncode == 0, result.stderr
  assert (f"{tmp_path / 'bare.pt'} has no training config that states the attention heads: taking the released "
          "SemVAE's 6") in result.stdout
  assert export.load_model(tmp_path / "out")[0].num_heads == 6
  narrow = SemVAE(feature_dim=24, latent_channels=4, hidden_size=32, encoder_depth=1, decoder_depth=1, num_heads=2)
  shapes = jax.eval_shape(narrow.init, jax.random.key(0), *narrow.dummy_inputs())
  with pytest.raises(ConversionError, match="width 32 does not split into 6 heads .the released"):
    load_semvae(semvae_to_torch(narrow, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)))


@pytest.mark.parametrize("pattern, replacement, message", [
    (r"transformer_blocks: \d+", "transformer_blocks: 99", "states transformer_blocks=99 but its weights have"),
    (r"variational: true", "variational: false", "variational=False; only the transformer VAE"),
    (r"transformer_heads: \d+", "transformer_heads: many", "transformer_heads is 'many', not a number"),
    (r"arch: transformer", "arch: [transformer", "its 'config' is not readable YAML"),
], ids=["blocks", "not_variational", "heads", "yaml"])
def test_an_inconsistent_config_is_one_clear_error(golden, pattern, replacement, message):
  config, _, state_dict = golden
  yaml_text = re.sub(pattern, replacement, config["config_yaml"])
  with pytest.raises(ConversionError, match=re.escape(message)):
    load_semvae(state_dict, {"config": yaml_text}, where="semantic_ae_final.pt")


def test_a_config_object_instead_of_its_yaml_is_refused(golden, tmp_path):
  """A pickled OmegaConf object under 'config' (not what train.py saves) could hold other heads: an error."""
  _, _, state_dict = golden
  config = torch_format.Instance(torch_format.Name("omegaconf.dictconfig", "DictConfig"), {"_content": {}})
  torch_format.save({"model_state_dict": state_dict, "config": config}, tmp_path / "semvae.pt")
  with pytest.raises(ConversionError, match="its 'config' is a omegaconf.dictconfig.DictConfig, not the YAML string"):
    convert.convert_to_flax("semvae", str(tmp_path / "semvae.pt"), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_another_checkpoint_is_refused_by_name(tmp_path):
  torch_format.save({"ema": {"x_embedder.proj.weight": np.zeros((4, 48, 1, 1), np.float32)}}, tmp_path / "dit.pt")
  result = run_convert("--kind=semvae", f"--checkpoint={tmp_path / 'dit.pt'}", f"--out={tmp_path / 'out'}")
  assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
  assert f"{tmp_path / 'dit.pt'} has no 'encoder.0.weight': it is not an official Semantic VAE" in result.stderr
