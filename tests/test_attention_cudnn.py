"""Which attention `layers.attention` hands to JAX on a GPU host, without a GPU: the host is described by what JAX
reports for it (`jax.default_backend()`, the devices' `compute_capability`), and the choice is read from the
`implementation` that sfd_jax passes to `jax.nn.dot_product_attention` (then run as XLA's, which needs no cuDNN).

The expected choices are the documented rule: cuDNN flash attention on NVIDIA GPUs of compute capability ≥ 8.0,
for bfloat16/float16 and a head width that is a multiple of 8 up to 128; XLA's otherwise."""
import types

import jax
import jax.numpy as jnp
import pytest

from sfd_jax.errors import UserError
from sfd_jax.models import layers

GPUS = {"a100": ("NVIDIA A100-SXM4-40GB", "8.0"), "h100": ("NVIDIA H100 80GB HBM3", "9.0"),
        "t4": ("Tesla T4", "7.5"), "rocm": ("AMD Instinct MI250X", "gfx90a")}


@pytest.fixture
def chosen(monkeypatch):
  """chosen(host, dtype, head_dim, requested) → the implementation sfd_jax asked JAX for."""
  asked = []
  original = jax.nn.dot_product_attention

  def spy(*args, implementation=None, **kwargs):
    asked.append(implementation)
    return original(*args, implementation="xla", **kwargs)
  monkeypatch.setattr(jax.nn, "dot_product_attention", spy)

  def choose(host, dtype, head_dim, requested):
    if host != "cpu":
      kind, capability = GPUS[host]
      gpu = types.SimpleNamespace(platform="gpu", device_kind=kind, compute_capability=capability)
      monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
      monkeypatch.setattr(jax, "devices", lambda *args, **kwargs: [gpu])
    heads = 2
    qkv = jax.ShapeDtypeStruct((2, 16, 3 * heads * head_dim), dtype)
    asked.clear()
    jax.eval_shape(lambda qkv: layers.attention(qkv, heads, implementation=requested), qkv)
    assert len(asked) == 1, asked
    return asked[0]
  return choose


@pytest.mark.parametrize("host, dtype, head_dim, requested, expected", [
    ("a100", jnp.bfloat16, 64, "auto", "cudnn"),
    ("h100", jnp.float16, 128, "auto", "cudnn"),
    ("h100", jnp.bfloat16, 8, "auto", "cudnn"),
    ("a100", jnp.float32, 64, "auto", "xla"),     # cuDNN's flash attention takes 16-bit inputs only
    ("a100", jnp.bfloat16, 12, "auto", "xla"),    # a head width that is no multiple of 8
    ("a100", jnp.bfloat16, 256, "auto", "xla"),   # wider than 128
    ("t4", jnp.bfloat16, 64, "auto", "xla"),      # compute capability 7.5
    ("rocm", jnp.bfloat16, 64, "auto", "xla"),    # no CUDA compute capability
    ("cpu", jnp.bfloat16, 64, "auto", "xla"),     # this host, as it is
    ("a100", jnp.bfloat16, 64, "xla", "xla"),     # the way back from the kernel
    ("a100", jnp.bfloat16, 64, "cudnn", "cudnn"),
])
def test_the_attention_each_gpu_and_config_gets(chosen, host, dtype, head_dim, requested, expected):
  assert chosen(host, dtype, head_dim, requested) == expected


@pytest.mark.parametrize("dtype, head_dim", [(jnp.float32, 64), (jnp.bfloat16, 12), (jnp.bfloat16, 256)])
def test_asking_for_cudnn_where_it_does_not_apply_is_one_sentence(chosen, dtype, head_dim):
  with pytest.raises(UserError, match="model.attention='cudnn' takes bfloat16 or float16") as error:
    chosen("a100", dtype, head_dim, "cudnn")
  assert f"not {jnp.dtype(dtype).name} and {head_dim}: use model.attention='auto' or 'xla'" in str(error.value)
