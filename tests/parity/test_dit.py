"""LightningDiT-SFD against the official PyTorch model (golden/dit_tiny): outputs, intermediates, tables."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfd_jax.convert import dit_to_torch, load_dit
from sfd_jax.models.layers import rope_2d, sincos_2d, timestep_embedding
from tests.golden import load_golden, nchw_to_nhwc

ATOL, RTOL = 2e-5, 1e-4


@pytest.fixture(scope="module")
def golden():
  config, arrays = load_golden("dit_tiny")
  state_dict = {k: v.astype(np.float32) for k, v in arrays["state_dict"].items()}
  model, variables = load_dit(config["model_kwargs"], state_dict)
  return config, arrays, state_dict, model, variables


@pytest.fixture(scope="module")
def outputs(golden):
  """One eval forward with every submodule's output captured."""
  _, arrays, _, model, variables = golden
  io = arrays["inputs_outputs"]
  (v, z), state = jax.jit(lambda p, *a: model.apply(p, *a, return_repa=True, capture_intermediates=True,
                                                    mutable=["intermediates"]))(
      variables, nchw_to_nhwc(io["x"]), io["t_tex"], io["t_sem"], io["y"])
  return v, z, state["intermediates"]


def test_velocity_and_repa_projection(golden, outputs):
  io = golden[1]["inputs_outputs"]
  v, z, _ = outputs
  np.testing.assert_allclose(np.asarray(v), nchw_to_nhwc(io["velocity"]), atol=ATOL, rtol=RTOL)
  np.testing.assert_allclose(np.asarray(z), io["repa_proj"], atol=ATOL, rtol=RTOL)


def test_intermediates(golden, outputs):
  _, arrays, _, model, variables = golden
  io, ref = arrays["inputs_outputs"], arrays["intermediates"]
  _, _, inter = outputs
  got = lambda name: np.asarray(inter[name]["__call__"][0])
  b = io["x"].shape[0]
  np.testing.assert_allclose(got("x_embedder").reshape(b, -1, model.hidden_size), ref["x_embedder_out"],
                             atol=ATOL, rtol=RTOL)
  for name in ("t_embedder_sem", "t_embedder_tex", "y_embedder", "repa_projector", "final_layer"):
    np.testing.assert_allclose(got(name), ref[f"{name}_out"], atol=ATOL, rtol=RTOL, err_msg=name)
  # Block i (layer i of the scanned stack) on the official input of block i.
  block, rope = model.block(), rope_2d(model.head_dim, model.grid_size)
  apply_block = jax.jit(lambda params, x, c: block.apply({"params": params}, x, c, *rope))
  x = ref["x_embedder_out"] + sincos_2d(model.hidden_size, model.grid_size)[None]
  for i in range(model.depth):
    params = jax.tree.map(lambda p: p[i], variables["params"]["blocks"])
    np.testing.assert_allclose(apply_block(params, x, ref["c"]), ref[f"block{i}_out"], atol=ATOL, rtol=RTOL,
                               err_msg=f"block {i}")
    x = ref[f"block{i}_out"]
  c = model.apply(variables, io["t_tex"], io["t_sem"], io["y"], method=model.condition)
  np.testing.assert_allclose(np.asarray(c), ref["c"], atol=ATOL, rtol=RTOL)
  for stream in ("sem", "tex"):
    emb = timestep_embedding(jnp.asarray(io[f"t_{stream}"]), 256)
    np.testing.assert_allclose(np.asarray(emb), ref[f"timestep_embedding_{stream}_256"], atol=1e-6, rtol=0)


def test_position_tables(golden):
  _, arrays, _, model, _ = golden
  tables = arrays["tables"]
  np.testing.assert_allclose(sincos_2d(model.hidden_size, model.grid_size), tables["pos_embed_sincos"], atol=1e-6)
  cos, sin = rope_2d(model.head_dim, model.grid_size)
  np.testing.assert_allclose(cos, tables["rope_freqs_cos"], atol=1e-6)
  np.testing.assert_allclose(sin, tables["rope_freqs_sin"], atol=1e-6)


def test_round_trip_to_official_names(golden):
  _, _, state_dict, model, variables = golden
  back = dit_to_torch(model, variables)
  assert sorted(back) == sorted(state_dict)
  for key, value in state_dict.items():
    np.testing.assert_allclose(back[key], value, atol=1e-6, rtol=0, err_msg=key)
