"""Images → the latent dataset that `sfd_jax.cli.train` reads (the format: `sfd_jax.data.latents`).

  python -m sfd_jax.cli.extract --source=folder --path=IMAGENET/train --out=DATASET \\
      --texture_vae=TEXTURE_VAE --dino=DINOV2 --semvae=WORKDIR/semvae

The records are what the official `extract_features.py` of the 2025-12-21 release computes (at 256 or 512 px;
see `sfd_jax.data.extract`): with the converted official encoders (`cli.convert --kind=semvae` for the released
Semantic VAE) they are the official latents, up to the posterior samples' random numbers (seeded per image here).
Encoders are exported model directories (`cli.convert`, `cli.train_semvae`); the texture VAE may also be the
official LDM checkpoint and DINOv2 a Hugging Face directory or facebookresearch .pth. `--pca=FILE` instead of
`--semvae` makes the semantic latents ReDi-style PCA channels of the DINO tokens (the file `cli.fit_pca` writes;
train with `--config.loss.semantic_channels=K --config.model.in_channels=32+K`). Run the same command again
to resume: finished shards are kept, a half-written one is redone. On a multi-host platform every host runs the
same command and writes every process_count-th shard.
"""
from __future__ import annotations

from absl import flags

from sfd_jax.cli import common
from sfd_jax.console import say
from sfd_jax.data import extract as extract_lib, images as images_lib

flags.DEFINE_enum("source", "folder", images_lib.SOURCES, "Image source: class folders, a prepared tfds dataset, "
                  "or the embedded digits.")
flags.DEFINE_string("path", "", "folder: root of the class folders (root/<class>/<image>); tfds: its data_dir.")
flags.DEFINE_string("tfds_name", "imagenet2012", "tfds: the dataset name.")
flags.DEFINE_string("split", "train", "tfds: the split.")
flags.DEFINE_integer("digits_size", 256, "digits: the side the 8×8 digits are upscaled to.", lower_bound=8)
flags.DEFINE_string("out", None, "Output directory of the latent dataset: a local path or gs://bucket/path.")
flags.DEFINE_string("texture_vae", None, "Texture VAE: exported directory or the official LDM checkpoint.")
flags.DEFINE_string("dino", None, "DINOv2 with registers: exported directory, Hugging Face directory or .pth.")
flags.DEFINE_string("semvae", None, "SemVAE: the directory `cli.convert --kind=semvae` or `cli.train_semvae` "
                    "exported.")
flags.DEFINE_string("pca", None, "Instead of --semvae: a PCA of DINO tokens (the .safetensors `cli.fit_pca` "
                    "writes), whose K channels become the semantic latents (ReDi-style).")
flags.DEFINE_integer("resolution", 256, "Crop size: 256, or 512 (texture latents 32×32; DINOv2 reads 2×2 tiles of "
                     "256 px, as the official extraction).", lower_bound=1)
flags.DEFINE_integer("batch_size", 32, "Images per step on each host (a multiple of its device count).", lower_bound=1)
flags.DEFINE_integer("shard_size", 1000, "Source images per shard.", lower_bound=1)
flags.DEFINE_enum("texture_latent", "sample", extract_lib.LATENT_MODES, "Texture posterior sample (official) or mean.")
flags.DEFINE_enum("semantic_latent", "sample", extract_lib.LATENT_MODES, "SemVAE posterior sample (the official "
                  "extraction's, seeded per image: reproducible and resumable) or its mean.")
flags.DEFINE_enum("latent_dtype", "float16", ["float16", "float32"], "Storage dtype of the latents.")
flags.DEFINE_enum("dino_dtype", "float16", ["float16", "bfloat16", "none"],
                  "Storage dtype of the DINO tokens; none stores the cropped images instead (~0.2 instead of ~0.8 MB "
                  "per image at 256 px) and leaves the tokens to the train step.")
flags.DEFINE_integer("seed", 0, "Seed of the posterior samples (noise of image i from fold_in(seed, i)).")
flags.DEFINE_integer("max_images", 0, "Extract only the first N images (0: all).", lower_bound=0)
flags.DEFINE_integer("num_threads", 16, "Image decoding threads per host.", lower_bound=1)
flags.DEFINE_string("dtype", None, "Compute dtype of all three encoders (default: as exported, float32).")
flags.mark_flags_as_required(["out", "texture_vae", "dino"])
flags.mark_flags_as_mutual_exclusive(["semvae", "pca"], required=True)
FLAGS = flags.FLAGS


def main(argv):
  del argv
  f = FLAGS
  source = images_lib.open_source(f.source, f.path, f.tfds_name, f.split, f.digits_size)
  encoders = {kind: extract_lib.load_encoder(kind, path, dtype=f.dtype)
              for kind, path in (("texture", f.texture_vae), ("dino", f.dino), ("semvae", f.semvae)) if path}
  if f.pca:
    encoders["semvae"] = extract_lib.load_encoder("pca", f.pca)
  settings = extract_lib.Settings(
      resolution=f.resolution, shard_size=f.shard_size, texture_latent=f.texture_latent,
      semantic_latent=f.semantic_latent, latent_dtype=f.latent_dtype,
      dino_dtype=None if f.dino_dtype == "none" else f.dino_dtype, seed=f.seed, max_images=f.max_images,
      batch_size=f.batch_size, num_threads=f.num_threads)
  result = extract_lib.extract(source, encoders, f.out, settings)
  if result is not None:  # process 0 counts the records once every host is done
    say(f"{result['records']} records in {result['directory']}; {len(result['skipped'])} unreadable images skipped "
        "(listed in meta.json)")


if __name__ == "__main__":
  common.run(main, log_dir=lambda: FLAGS.out, inputs=("texture_vae", "dino", "semvae", "pca"), distributed=True)
