"""SFD-XXL (the official "1p0B": depth 24, width 1536, 24 heads, 1.0B params): the XL recipe at this size."""
from sfd_jax.training import config as config_lib


def get_config(preset: str = "XXL"):
  c = config_lib.base_config()
  c.model.update(config_lib.model_config(preset or "XXL"))
  c.data.path = "data/imagenet_train_256"
  c.sample_every = 50_000
  # 1.0B params: shard params and optimiser state over 8 chips per replica by default (FSDP).
  c.mesh.fsdp = 8
  return c
