"""The official SemVAE recipe (train.py with ch16.yaml) on ImageNet: `sfd_jax.training.semvae.base_config()`.

  python -m sfd_jax.cli.train_semvae --config=configs/semvae.py --workdir=DIR \\
      --config.dino.path=DINOV2_B_REG --config.data.path=IMAGENET/train

computes the DINOv2 features of ImageNet class folders on the fly (Resize 256, CenterCrop 224);
`--config=configs/semvae.py:tfds` reads a prepared tfds `imagenet2012` instead (config.data.path = its data_dir);
`--config=configs/semvae.py:features --config.data.features_path=FILE.safetensors` trains on a pre-extracted
feature file as the official does (no DINOv2 needed).
"""
from sfd_jax.training import semvae


def get_config(source: str = "folder"):
  c = semvae.base_config()
  source = source or "folder"
  if source == "features":
    c.data.source = "features"
  else:
    c.data.images = source
  return c
