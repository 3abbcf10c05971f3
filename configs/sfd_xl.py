"""SFD-XL: the official LightningDiT-XL/1 recipe (configs/sfd/lightningdit_xl/{train,inference}.yaml).

Batch 256, AdamW lr 1e-4 (0.9, 0.999), no weight decay, no clipping, EMA 0.9999, Δ 0.3, β 2, cosine velocity
loss, REPA at depth 2 with λ 1 ('cos'), logit-normal t, class dropout 0.1, 4M steps; sampling with dopri5
(rtol 1e-3, atol 1e-6), no guidance. `--config=configs/sfd_xl.py:B` keeps the recipe with another model size.
On accelerators: --config.model.dtype=bfloat16 (see README).
"""
from sfd_jax.training import config as config_lib


def get_config(preset: str = "XL"):
  c = config_lib.base_config()
  c.model.update(config_lib.model_config(preset or "XL"))
  c.data.path = "data/imagenet_train_256"
  c.sample_every = 50_000
  return c
