"""SFD-XXL (the official "1p0B": depth 24, width 1536, 24 heads, 1.0B params): the XL recipe at this size."""
from sfd_jax.training import config as config_lib


def get_config(preset: str = "XXL"):
  c = config_lib.base_config()
  c.model.update(config_lib.model_config(preset or "XXL"))
  # The platform's fused attention (Pallas on TPU, cuDNN on GPUs of compute capability ≥ 8.0), compared with XLA's
  # at the first step; matmuls at the platform's default precision: a training recipe's speed (bfloat16 passes on
  # TPU, TF32 on GPU for float32 operands; exact for bfloat16 ones). Sampling for parity asks for 'highest'.
  c.model.attention = "auto"
  c.model.matmul_precision = "default"
  c.data.path = "data/imagenet_train_256"
  c.sample_every = 50_000
  # What `cli.plan` finds fastest on a pod (README, Training): bfloat16 compute, remat keeping the matmul outputs,
  # parameters and optimiser state sharded over every chip (data 1 × fsdp all).
  c.model.update(dtype="bfloat16", remat_policy="dots_saveable")
  c.mesh.update(data=1, fsdp=-1)
  return c
