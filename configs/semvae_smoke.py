"""A tiny SemVAE run on CPU in about a minute: a random-weight tiny DINOv2 on the embedded digits (256 px).

  python -m sfd_jax.cli.train_semvae --config=configs/semvae_smoke.py --workdir=/tmp/semvae_smoke
"""
from sfd_jax.training import semvae


def get_config(arg=None):
  del arg
  c = semvae.base_config()
  c.model.update(latent_channels=4, hidden_size=32, encoder_depth=1, decoder_depth=1, num_heads=2, dtype="float32")
  c.dino.random_init = True
  c.data.update(images="digits", heldout_images=16, prefetch=4)
  c.optim.update(lr=1e-3, weight_decay=0.0, schedule="constant", warmup_steps=0, warmup_start_factor=0.0,
                 constant_steps=0, decay_steps=0, end_lr=0.0)
  c.batch_size = 8
  c.eval_batch_size = 8
  c.total_steps = 20
  c.log_every = 5
  c.ckpt_every = 10
  c.sample_every = 10
  return c
