"""The AutoGuidance guide: LightningDiT-B/1 with the SFD recipe for 400K steps (configs/sfd/autoguidance_b).

The released guides are its EMA checkpoints at 60K-120K steps: every 10K-step checkpoint is written and kept;
sample with `--guide_model=<workdir>` at the chosen step.
`--config=configs/autoguidance_b.py:retrain` is the guide retrained for the 80-epoch recipe of the 2025-12-21
release (autoguidance_b/inference_retrain.yaml): the same recipe (lr 1e-4, β2 0.999, REPA λ 1 'cos') for 200K
steps, used at its 60K-step checkpoint.
"""
from sfd_jax.training import config as config_lib


def get_config(arg: str = "B"):
  """`arg`: the model size (B by default), or `retrain` for the retrained guide (B)."""
  retrain = arg == "retrain"
  c = config_lib.base_config()
  c.model.update(config_lib.model_config("B" if retrain else arg or "B"))
  # The platform's fused attention (Pallas on TPU, cuDNN on GPUs of compute capability ≥ 8.0), compared with XLA's
  # at the first step; matmuls at the platform's default precision: a training recipe's speed (bfloat16 passes on
  # TPU, TF32 on GPU for float32 operands; exact for bfloat16 ones). Sampling for parity asks for 'highest'.
  c.model.attention = "auto"
  c.model.matmul_precision = "default"
  c.data.path = "data/imagenet_train_256"
  c.total_steps = 200_000 if retrain else 400_000
  c.ckpt_every = c.keep_period = 10_000
  # What `cli.plan` finds fastest on a pod (README, Training): bfloat16 compute, remat keeping the matmul outputs,
  # parameters and optimiser state sharded over every chip (data 1 × fsdp all).
  c.model.update(dtype="bfloat16", remat_policy="dots_saveable")
  c.mesh.update(data=1, fsdp=-1)
  return c
