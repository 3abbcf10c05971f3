"""The SemVAE of the paper (Table 7) on ImageNet: `sfd_jax.training.semvae.base_config()`.

  python -m sfd_jax.cli.train_semvae --config=configs/semvae.py --workdir=DIR \\
      --config.dino.path=DINOV2_B_REG --config.data.path=IMAGENET/train

reads ImageNet class folders; `--config=configs/semvae.py:tfds` reads a prepared tfds `imagenet2012` instead
(config.data.path = its data_dir).
"""
from sfd_jax.training import semvae


def get_config(source: str = "folder"):
  c = semvae.base_config()
  c.data.source = source or "folder"
  return c
