"""The 80-epoch LightningDiT-B/1 and L/1 SFD checkpoints convert with `--preset=B` / `--preset=L`.

The official state dict of an SFD LightningDiT is written out here from the architecture (names as the official
model's `state_dict()`, shapes from its sizes), checked against the golden tiny model's, then at the B and L
sizes: against what the converter expects for those presets (fast), and as stand-in checkpoints of train.py's
format converted by the CLI (slow: the weights are materialised, about 0.55 GB for B and 1.9 GB for L; the files
themselves store one element per tensor, expanded).
"""
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from sfd_jax.convert import export
from sfd_jax.convert.dit import dit_constants, dit_kwargs, dit_rules, official_sfd_kwargs
from sfd_jax.models.dit import lightningdit
from tests import torch_format
from tests.golden import load_golden, subprocess_env

# depth, width, heads of the released 80-epoch models (LightningDiT-B/1, L/1).
SIZES = {"B": (12, 768, 12), "L": (24, 1024, 16)}


def official_shapes(width, depth, heads, num_classes=1000, grid=16, repa_dim=2048, repa_z=768, channels=48):
  """{name: shape} of the official SFD LightningDiT's state dict (SwiGLU hidden int(2/3·4·width), timestep
  embedders of width/2 each, REPA projector after block 2)."""
  hidden, half = int(2 / 3 * 4 * width), width // 2
  linear = lambda name, n_out, n_in: {f"{name}.weight": (n_out, n_in), f"{name}.bias": (n_out,)}
  shapes = {"pos_embed": (1, grid * grid, width), "x_embedder.proj.weight": (width, channels, 1, 1),
            "x_embedder.proj.bias": (width,)}
  for stream in ("sem", "tex"):
    shapes.update(linear(f"t_embedder_{stream}.mlp.0", half, 256) | linear(f"t_embedder_{stream}.mlp.2", half, half))
  rope = (grid * grid, width // heads)
  shapes.update({"y_embedder.embedding_table.weight": (num_classes + 1, width), "feat_rope.freqs_cos": rope,
                 "feat_rope.freqs_sin": rope})
  for i in range(depth):
    b = f"blocks.{i}"
    shapes.update({f"{b}.norm1.weight": (width,), f"{b}.norm2.weight": (width,)})
    shapes.update(linear(f"{b}.attn.qkv", 3 * width, width))
    shapes.update({f"{b}.attn.q_norm.weight": (width // heads,), f"{b}.attn.k_norm.weight": (width // heads,)})
    shapes.update(linear(f"{b}.attn.proj", width, width) | linear(f"{b}.mlp.w12", 2 * hidden, width)
                  | linear(f"{b}.mlp.w3", width, hidden) | linear(f"{b}.adaLN_modulation.1", 6 * width, width))
  shapes.update({"final_layer.norm_final.weight": (width,)})
  shapes.update(linear("final_layer.linear", channels, width)
                | linear("final_layer.adaLN_modulation.1", 2 * width, width))
  shapes.update(linear("repa_projector.0", repa_dim, width) | linear("repa_projector.2", repa_dim, repa_dim)
                | linear("repa_projector.4", repa_z, repa_dim))
  return shapes


def preset_model(preset):
  """The network `--preset` converts into."""
  return lightningdit(**dit_kwargs(official_sfd_kwargs(preset)))


def expected_by_converter(preset):
  """{name: shape} the converter of `--preset` asks of a file (no weights made)."""
  model = preset_model(preset)
  template = flatten_dict(jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())["params"])
  shapes = {k: np.shape(v) for k, v in dit_constants(model).items()}
  for rule in dit_rules(model):
    for key in rule.torch_keys:
      shapes[key] = rule.torch_shape(template[rule.flax_path].shape)
  return shapes


def test_official_names_and_shapes_are_those_of_the_golden_model():
  config, arrays = load_golden("dit_tiny")
  kw = config["model_kwargs"]
  ours = official_shapes(kw["hidden_size"], kw["depth"], kw["num_heads"], kw["num_classes"], kw["input_size"],
                         kw["repa_projector_dim"])
  assert ours == {k: v.shape for k, v in arrays["state_dict"].items()}


@pytest.mark.parametrize("preset", sorted(SIZES))
def test_preset_expects_the_official_80_epoch_checkpoint(preset):
  depth, width, heads = SIZES[preset]
  assert expected_by_converter(preset) == official_shapes(width, depth, heads)


def write_stand_in(path, preset):
  """A train.py checkpoint (`{"model", "ema", "opt", "config"}`) of the official shapes at `preset`, tensor i of
  'ema' filled with (i + 1)/1024 and of 'model' with its negative; {name: value} of 'ema'."""
  depth, width, heads = SIZES[preset]
  shapes = official_shapes(width, depth, heads)
  values = {name: (i + 1) / 1024 for i, name in enumerate(shapes) if not name.startswith(("pos_embed", "feat_rope"))}
  tables = {k: np.asarray(v, np.float32) for k, v in dit_constants(preset_model(preset)).items()}
  ema = {k: tables[k] if k in tables else torch_format.Expanded(values[k], shape) for k, shape in shapes.items()}
  weights = {k: tables[k] if k in tables else torch_format.Expanded(-values[k], shape) for k, shape in shapes.items()}
  config = torch_format.Instance(torch_format.Name("omegaconf.dictconfig", "DictConfig"),
                                 {"_content": {"model": {"model_type": f"LightningDiT-{preset}/1"}}})
  torch_format.save({"model": weights, "ema": ema, "config": config,
                     "opt": {"state": {}, "param_groups": [{"lr": 2e-4, "betas": (0.9, 0.95), "params": [0]}]}}, path)
  return values


@pytest.mark.slow  # materialises B's 0.55 GB and L's 1.9 GB of weights (tens of seconds each on 2 cores)
@pytest.mark.parametrize("preset", sorted(SIZES))
def test_cli_converts_an_80_epoch_checkpoint(preset, tmp_path):
  values = write_stand_in(tmp_path / "0400000.pt", preset)
  result = subprocess.run([sys.executable, "-m", "sfd_jax.cli.convert", "--kind=dit", f"--preset={preset}",
                           f"--checkpoint={tmp_path / '0400000.pt'}", f"--out={tmp_path / 'export'}"],
                          capture_output=True, text=True, timeout=600, env=subprocess_env())
  assert result.returncode == 0, result.stderr
  assert f"read {len(values) + 3} tensors of 'ema'" in result.stdout
  exported, variables, _ = export.load_model(tmp_path / "export")
  assert (exported.depth, exported.hidden_size, exported.num_heads) == SIZES[preset]
  flat = flatten_dict(variables["params"])
  for rule in dit_rules(exported):
    leaf = np.asarray(flat[rule.flax_path])
    for i, key in enumerate(rule.torch_keys):
      got = leaf[i] if rule.layers else leaf
      assert got.min() == got.max() == np.float32(values[key]), key


def test_expanded_tensors_are_what_torch_load_reads(tmp_path):
  torch = pytest.importorskip("torch")  # torch checks the writer of the stand-ins
  torch_format.save({"ema": {"w": torch_format.Expanded(0.25, (3, 4)), "b": np.arange(3, dtype=np.float32)}},
                    tmp_path / "file.pt")
  loaded = torch.load(tmp_path / "file.pt", weights_only=True)["ema"]
  assert loaded["w"].shape == (3, 4) and loaded["w"].stride() == (0, 0) and bool((loaded["w"] == 0.25).all())
  np.testing.assert_array_equal(loaded["b"].numpy(), np.arange(3))
