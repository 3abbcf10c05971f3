"""Fits the PCA of DINOv2 tokens that makes ReDi-style semantic channels (`sfd_jax.data.pca`), from images or from
stored DINO tokens:

  python -m sfd_jax.cli.fit_pca --source=folder --path=IMAGENET/train --dino=DINOV2 --out=dino_pca.safetensors
  python -m sfd_jax.cli.fit_pca --features=FEATURES.safetensors --out=dino_pca.safetensors

then `python -m sfd_jax.cli.extract ... --pca=dino_pca.safetensors` (instead of --semvae) writes its channels as
the dataset's semantic latents, and the model trains with `--config.loss.semantic_channels=K
--config.model.in_channels=32+K`. The images are read as the extraction reads them (ADM centre crop, DINOv2 on tiles
of 256 px); the PCA is exact over every token of the images drawn, and written as safetensors (never a pickle).
"""
from __future__ import annotations

from absl import flags

from sfd_jax.cli import common
from sfd_jax.console import say
from sfd_jax.data import extract as extract_lib, images as images_lib, pca as pca_lib
from sfd_jax.errors import UserError

flags.DEFINE_string("out", None, "The PCA file to write (.safetensors): a local path or gs://bucket/path.")
flags.DEFINE_integer("channels", 8, "Principal components kept: the semantic channels (ReDi: 8).", lower_bound=1)
flags.DEFINE_integer("num_images", 10_000, "Images (or feature records) drawn to fit on, every token of each "
                     "(0: all).", lower_bound=0)
flags.DEFINE_integer("seed", 0, "Seed of the draw of images.")
flags.DEFINE_string("features", None, "Stored DINO tokens to fit on instead of images: a DINOv2 feature file "
                    "(.safetensors: patch_tokens, class_indices) or a latent dataset that stores DINO tokens.")
flags.DEFINE_enum("source", "folder", images_lib.SOURCES, "Image source: class folders, a prepared tfds dataset, "
                  "or the embedded digits.")
flags.DEFINE_string("path", "", "folder: root of the class folders (root/<class>/<image>); tfds: its data_dir.")
flags.DEFINE_string("tfds_name", "imagenet2012", "tfds: the dataset name.")
flags.DEFINE_string("split", "train", "tfds: the split.")
flags.DEFINE_integer("digits_size", 256, "digits: the side the 8×8 digits are upscaled to.", lower_bound=8)
flags.DEFINE_string("dino", None, "With images: DINOv2 with registers (exported directory, Hugging Face directory "
                    "or .pth), the one the extraction will use.")
flags.DEFINE_integer("resolution", 256, "With images: the crop size the extraction will use.", lower_bound=1)
flags.DEFINE_integer("batch_size", 32, "With images: images per DINOv2 step.", lower_bound=1)
flags.DEFINE_integer("num_threads", 16, "With images: image decoding threads.", lower_bound=1)
flags.mark_flags_as_required(["out"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  f = FLAGS
  if f.features:
    batches, dino_sha256, fitted_on = pca_lib.stored_tokens(f.features, f.num_images, f.seed)
  else:
    if not f.dino:
      raise UserError("pass --dino (the DINOv2 the extraction will use) to fit the PCA from images, or --features "
                      "to fit it from stored DINO tokens")
    source = images_lib.open_source(f.source, f.path, f.tfds_name, f.split, f.digits_size)
    dino = extract_lib.load_encoder("dino", f.dino)
    indices = pca_lib.sample_indices(len(source), f.num_images, f.seed)
    batches = extract_lib.image_tokens(source, dino, indices, resolution=f.resolution, batch_size=f.batch_size,
                                       num_threads=f.num_threads)
    dino_sha256 = dino.info["sha256"]
    fitted_on = {"source": {k: v for k, v in source.describe().items() if k != "class_names"},
                 "images": len(indices), "seed": f.seed, "resolution": f.resolution, "dino": dino.info["path"]}
  fitted = pca_lib.fit(batches, f.channels, dino_sha256=dino_sha256, fitted_on=fitted_on)
  pca_lib.save(fitted, f.out)
  say(f"PCA of {fitted.num_tokens} tokens to {f.channels} channels ({100 * fitted.explained_variance_ratio.sum():.1f}% "
      f"of the variance) in {f.out}")


if __name__ == "__main__":
  common.run(main, inputs=("features", "path", "dino"))
