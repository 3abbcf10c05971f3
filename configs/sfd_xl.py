"""SFD-XL: the official LightningDiT-XL/1 recipe (configs/sfd/lightningdit_xl/{train,inference}.yaml).

Batch 256, AdamW lr 1e-4 (0.9, 0.999), no weight decay, no clipping, EMA 0.9999, Δ 0.3, β 2, cosine velocity
loss, REPA at depth 2 with λ 1 ('cos'), logit-normal t, class dropout 0.1, 4M steps; sampling with dopri5
(rtol 1e-3, atol 1e-6), no guidance. `--config=configs/sfd_xl.py:B` keeps the recipe with another model size.
`--config=configs/sfd_xl.py:80ep` is the 80-epoch recipe of the 2025-12-21 release
(configs/sfd/lightningdit_xl/train_80ep_lr2e-4.yaml): XL/1 for 400K steps at AdamW lr 2e-4, β2 0.95, REPA
λ 0.5 'cos_mse' ((cos + mse) / 2), a checkpoint every 80K steps, each kept; the rest as above. Upstream samples it
with AutoGuidance (scale 1.5) by the guide of `configs/autoguidance_b.py:retrain` at 60K steps.
`--config=configs/sfd_xl.py:512` is the recipe at 512 px (sfd_jax's own; upstream extracts 512 px latents but has
no 512 DiT): XL/1 on 32×32 latents, from `python -m sfd_jax.cli.extract --resolution=512`.
Set for a TPU pod (bfloat16, remat `dots_saveable`, mesh data 1 × fsdp -1); on a CPU (e.g. `:S`) add
--config.model.dtype=float32 --config.model.remat_policy=dots_with_no_batch_dims_saveable --config.mesh.data=-1
--config.mesh.fsdp=1 for what `base_config()` and the CPU presets use.
"""
from sfd_jax.training import config as config_lib


def get_config(arg: str = "XL"):
  """`arg`: the model size (XL by default), `80ep` for the 80-epoch recipe (XL), or `512` for XL at 512 px."""
  recipe_80ep, at_512 = arg == "80ep", arg == "512"
  c = config_lib.base_config()
  c.model.update(config_lib.model_config("XL" if recipe_80ep or at_512 else arg or "XL"))
  # The platform's fused attention (Pallas on TPU, cuDNN on GPUs of compute capability ≥ 8.0), compared with XLA's
  # at the first step; matmuls at the platform's default precision: a training recipe's speed (bfloat16 passes on
  # TPU, TF32 on GPU for float32 operands; exact for bfloat16 ones). Sampling for parity asks for 'highest'.
  c.model.attention = "auto"
  c.model.matmul_precision = "default"
  c.data.path = "data/imagenet_train_256"
  if at_512:  # the latent grid of an f16 texture VAE at 512 px; the extraction's DINO tokens follow it
    c.model.input_size = 32
    c.data.path = "data/imagenet_train_512"
  c.sample_every = 50_000
  # What `cli.plan` finds fastest on a pod (README, Training): bfloat16 compute, remat keeping the matmul outputs,
  # parameters and optimiser state sharded over every chip (data 1 × fsdp all).
  c.model.update(dtype="bfloat16", remat_policy="dots_saveable")
  c.mesh.update(data=1, fsdp=-1)
  if recipe_80ep:
    c.total_steps = 400_000
    c.optim.update(lr=2e-4, b2=0.95)
    c.loss.update(repa_weight=0.5, repa_mode="cos_mse")
    c.ckpt_every = c.keep_period = 80_000
  return c
