"""model.attention: which kernel each platform gets, the user errors, the kernel-against-XLA check of the first
step, and the batch the TPU kernels refuse.

Devices are libtpu's own TPU topology description, this host's CPU, and GPUs described by what JAX reports for
them (platform 'gpu', `compute_capability`): no GPU is needed to decide for one.
"""
import functools
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sfd_jax import generate, sharding as shd
from sfd_jax.diffusion import sampler
from sfd_jax.errors import UserError
from sfd_jax.models import dit, layers, tpu_attention
from sfd_jax.training import config as config_lib, tasks
from tests.programs import tpu_kernel_calls, tpu_slice

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other test processes may hold libtpu
MESH = shd.make_mesh(1, 1)


def _gpu(kind, capability):
  return types.SimpleNamespace(platform="gpu", device_kind=kind, compute_capability=capability)


def _tpu():
  return tpu_slice()[0]


DEVICES = {"tpu_v5e": _tpu, "cpu": lambda: jax.devices("cpu")[0], "t4": lambda: _gpu("Tesla T4", "7.5"),
           "v100": lambda: _gpu("Tesla V100-SXM2-16GB", "7.0"), "a100": lambda: _gpu("NVIDIA A100-SXM4-40GB", "8.0"),
           "l4": lambda: _gpu("NVIDIA L4", "8.9"), "h100": lambda: _gpu("NVIDIA H100 80GB HBM3", "9.0"),
           "rocm": lambda: _gpu("AMD Instinct MI250X", "gfx90a")}
AUTO = {"tpu_v5e": "pallas", "cpu": "xla", "t4": "xla", "v100": "xla", "a100": "cudnn", "l4": "cudnn",
        "h100": "cudnn", "rocm": "xla"}


@pytest.mark.parametrize("device", sorted(DEVICES))
def test_auto_takes_the_platforms_kernel_where_it_is_supported(device):
  assert layers.attention_kernel("auto", DEVICES[device]()) == AUTO[device]
  assert layers.attention_kernel("xla", DEVICES[device]()) == "xla"  # the way back, everywhere


@pytest.mark.parametrize("requested, device, needs", [
    ("pallas", "cpu", "needs a TPU, and this device is a cpu"),
    ("pallas", "a100", "needs a TPU, and this device is a NVIDIA A100"),
    ("cudnn", "t4", "needs an NVIDIA GPU of compute capability 8.0 or later"),
    ("cudnn", "tpu_v5e", "needs an NVIDIA GPU of compute capability 8.0 or later")])
def test_a_kernel_the_device_lacks_is_one_sentence(requested, device, needs):
  with pytest.raises(UserError, match=needs) as error:
    layers.attention_kernel(requested, DEVICES[device]())
  assert "use model.attention='auto' or 'xla'" in str(error.value) and "\n" not in str(error.value)


def test_explicit_kernels_where_the_device_has_them():
  assert layers.attention_kernel("pallas", _tpu()) == "pallas"
  assert layers.attention_kernel("cudnn", DEVICES["h100"]()) == "cudnn"


def test_unknown_attention_and_precision_name_the_field():
  with pytest.raises(UserError, match=r"model.attention='flash' is not one of"):
    layers.attention_kernel("flash", jax.devices()[0])
  cfg = config_lib.model_config("S", attention="flash")
  with pytest.raises(UserError, match=r"config.model: attention 'flash' is not one of"):
    config_lib.build_model(cfg)
  with pytest.raises(UserError, match=r"config.model: matmul_precision 'float32' is not one of"):
    config_lib.build_model(config_lib.model_config("S", matmul_precision="float32"))


# ---------------------------------------------------------------------------------------------------------------
# The comparison.

def _reference(qkv, heads):
  """softmax(q·kᵀ/√d)·v per head in float64 numpy: an independent attention."""
  b, n, three_d = qkv.shape
  q, k, v = np.asarray(qkv, np.float64).reshape(b, n, 3, heads, -1).transpose(2, 0, 3, 1, 4)
  s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
  p = np.exp(s - s.max(-1, keepdims=True))
  return ((p / p.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(b, n, -1)


@functools.cache
def _outputs():
  heads = 16  # as XL: dropping one head of sixteen must still stand out from bfloat16 rounding
  qkv = 2 * jax.random.normal(jax.random.key(0), (2, 64, 3 * heads * 8), jnp.float32)
  want = _reference(qkv, heads)
  bf16 = layers.attention(qkv.astype(jnp.bfloat16), heads, implementation="xla")
  return heads, qkv, want, np.asarray(bf16, np.float32)


def test_comparison_passes_bfloat16_rounding():
  _, _, want, bf16 = _outputs()
  assert 0 < layers.attention_error(bf16, want) < layers.ATTENTION_TOLERANCE
  layers.compare_attention({"output": bf16}, {"output": want}, "pallas", "a test")


@pytest.mark.parametrize("wrong", ["a head dropped", "no 1/sqrt(d) scale", "heads swapped"])
def test_comparison_catches_a_wrong_kernel(wrong):
  heads, qkv, want, bf16 = _outputs()
  hd = want.shape[-1] // heads
  if wrong == "a head dropped":
    got = bf16.copy()
    got[..., 5 * hd:6 * hd] = 0
  elif wrong == "no 1/sqrt(d) scale":
    got = _reference(qkv * np.concatenate([np.full(qkv.shape[-1] // 3, np.sqrt(hd)),
                                           np.ones(2 * qkv.shape[-1] // 3)]), heads)
  else:
    got = np.concatenate([bf16[..., hd:2 * hd], bf16[..., :hd], bf16[..., 2 * hd:]], -1)
  with pytest.raises(UserError, match=r"the pallas attention kernel's output differs from XLA attention's on a "
                                      r"test by .*set model.attention='xla'"):
    layers.compare_attention({"output": got}, {"output": want}, "pallas", "a test")


# ---------------------------------------------------------------------------------------------------------------
# The check, wired into training and sampling.

TINY = dict(input_size=4, hidden_size=64, depth=2, num_heads=2, num_classes=10, repa_depth=1,
            repa_projector_dim=32, repa_z_dim=16)


def test_on_cpu_no_check_runs_and_an_absent_kernel_stops_the_run():
  cfg = config_lib.base_config()
  cfg.model.update(config_lib.model_config("S", **TINY))
  for attention in ("auto", "xla"):
    assert tasks.attention_check(cfg, config_lib.build_model(cfg.model).clone(attention=attention)) is None
  pallas = config_lib.build_model(cfg.model).clone(attention="pallas")
  with pytest.raises(UserError, match="model.attention='pallas' needs a TPU"):
    tasks.attention_check(cfg, pallas)
  cfg.attention_check = False  # the check off: the choice is still checked
  with pytest.raises(UserError, match="model.attention='pallas' needs a TPU"):
    tasks.attention_check(cfg, pallas)
  settings = generate.Settings(model="", vae="", stats="", out="", attention_check=True)
  with pytest.raises(UserError, match="model.attention='pallas' needs a TPU"):
    generate.check_attention(settings, MESH, [(pallas, None)], np.arange(4), 4)
  generate.check_attention(settings, MESH, [(pallas.clone(attention="xla"), None)], np.arange(4), 4)  # skipped


@pytest.fixture(scope="module")
def tiny_dit():
  model = dit.lightningdit("S", **TINY, attention="xla")
  x = jax.random.normal(jax.random.key(1), (2, 4, 4, 48))
  t, y = jnp.array([0.3, 0.7]), jnp.array([1, 7])
  variables = jax.jit(model.init)(jax.random.key(0), x, t, t, y)
  model = model.clone(attention="pallas")
  # Training from scratch starts with zero adaLN gates: attention reaches the output only later, so the check
  # compares the attention itself. Give the norms non-trivial weights, as a trained model has.
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: p * 1.3 if "norm" in jax.tree_util.keystr(path) else p, variables["params"])
  return model, {"params": params}, x, t, y


def _interpreted(monkeypatch, corrupt=lambda out: out):
  """The Pallas kernels run as interpreted jaxpr (this host has no TPU), their output passed through `corrupt`."""
  kernel = tpu_attention.attention
  monkeypatch.setattr(tpu_attention, "attention",
                      lambda *args, **kwargs: corrupt(kernel(*args, **kwargs, interpret=True)))


def test_check_passes_the_kernels_forward_and_gradients(monkeypatch, tiny_dit):
  _interpreted(monkeypatch)
  model, variables, x, t, y = tiny_dit
  dit.check_attention(model, variables, x, t, t, y, MESH, gradients=True, where="a test")


def test_check_stops_a_kernel_that_drops_a_head(monkeypatch, tiny_dit):
  _interpreted(monkeypatch, lambda out: out.at[..., :out.shape[-1] // 2].set(0))
  model, variables, x, t, y = tiny_dit
  with pytest.raises(UserError, match=r"the pallas attention kernel's output differs from XLA attention's on a test"):
    dit.check_attention(model, variables, x, t, t, y, MESH, gradients=False, where="a test")


# ---------------------------------------------------------------------------------------------------------------
# A batch the devices do not divide (issue: the kernels computed all of it on every device).

ABSTRACT_MESH = jax.sharding.AbstractMesh((2, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _jaxpr(fn, batch):
  qkv = jax.ShapeDtypeStruct((batch, 256, 3 * 128), jnp.bfloat16)
  with jax.sharding.use_abstract_mesh(ABSTRACT_MESH):
    return str(jax.make_jaxpr(fn)(qkv))


@pytest.mark.parametrize("batch", [6, 10])
def test_kernels_refuse_a_batch_the_devices_do_not_divide(batch):
  with pytest.raises(UserError, match=rf"{batch} samples do not divide evenly: use a batch that is a multiple of 4, "
                                      r"or model.attention='auto'"):
    _jaxpr(lambda qkv: tpu_attention.attention(qkv, 2), batch)
  with pytest.raises(UserError, match="do not divide evenly"):
    _jaxpr(lambda qkv: layers.attention(qkv, 2, implementation="pallas"), batch)


def test_auto_gives_such_a_batch_to_xla_and_splits_the_others():
  assert "pallas_call" not in _jaxpr(lambda qkv: layers.attention(qkv, 2), 6)
  for batch in (8, 1, 2):  # a multiple of the devices; fewer samples than devices (vmap splits the samples)
    assert "pallas_call" in _jaxpr(lambda qkv: layers.attention(qkv, 2), batch)


@pytest.mark.slow
def test_sampling_runs_the_kernels_on_each_devices_samples():
  """A guided Dopri5 solve per sample (vmapped over the devices, two model rows per sample) under a v5e slice's mesh,
  compiled by libtpu: the kernel takes the pair whole and vmap splits the samples over the devices; with
  attention='xla' there is no kernel."""
  mesh = shd.make_mesh(4, 1, devices=tpu_slice())
  for attention, kernels in (("auto", True), ("xla", False)):
    model = dit.lightningdit("S", input_size=16, hidden_size=144, depth=1, num_heads=2, num_classes=10,
                             repa_depth=1, repa_projector_dim=32, repa_z_dim=16, dtype="bfloat16", attention=attention)
    replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P(shd.BATCH_AXES))
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                          jax.eval_shape(model.clone(attention="xla").init, jax.random.key(0), *model.dummy_inputs()))
    z = jax.ShapeDtypeStruct((8, 16, 16, 48), jnp.float32, sharding=rows)
    y = jax.ShapeDtypeStruct((8,), jnp.int32, sharding=rows)

    def generate(params, z, y):
      velocity = sampler.cfg_velocity(model, params, 1.5, model.num_classes, 0.0, "both", 16)
      return sampler.sample(velocity, z, y, delta_t=0.3, method="dopri5")[0]
    compiled = jax.jit(shd.traced_with_mesh(mesh, generate)).trace(params, z, y).lower().compile()
    assert bool(tpu_kernel_calls(compiled)) == kernels
