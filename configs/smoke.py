"""A tiny SFD run on synthetic latents: CPU, seconds.

  python -m sfd_jax.cli.train --config=configs/smoke.py --workdir=runs/smoke
"""
from sfd_jax.training import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.model.update(config_lib.model_config("S", input_size=4, hidden_size=64, depth=2, num_heads=2, num_classes=10,
                                         repa_depth=1, repa_projector_dim=64, repa_z_dim=32))
  c.data.source = "synthetic"
  c.data.synthetic_records = 256
  c.batch_size = 16
  c.total_steps = 40
  c.log_every = 10
  c.ckpt_every = 20
  c.optim.lr = 1e-3
  c.sample_every = 20
  c.sample.num_images = 8
  c.sample.method = "euler"
  c.sample.num_steps = 8
  return c
