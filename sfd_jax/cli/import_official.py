"""Official SFD latent shards (safetensors + `*_stats.pt`) → the latent dataset that `sfd_jax.cli.train` reads.

  python -m sfd_jax.cli.import_official --src=outputs/dataset/imagenet1k-latents/.../imagenet_train_256 --out=DATASET

The official stats files found next to the shards (or given) become the dataset's stats. Run it again to resume.
"""
from __future__ import annotations

from absl import flags

from sfd_jax.cli import common
from sfd_jax.data import official

flags.DEFINE_string("src", None, "Directory of the official *.safetensors shards.")
flags.DEFINE_string("out", None, "Output directory of the latent dataset.")
flags.DEFINE_string("texture_stats", None, "Texture stats file (default: latents_stats.pt in --src, if there).")
flags.DEFINE_string("semantic_stats", None, "Semantic stats file (default: latents_sv_stats.pt in --src, if there).")
flags.DEFINE_enum("dino_dtype", "float16", ["float16", "bfloat16", "none"], "Storage dtype of the DINO tokens, or "
                  "none to leave them out.")
flags.DEFINE_enum("latent_dtype", "float32", ["float16", "float32"], "Storage dtype of the latents.")
flags.mark_flags_as_required(["src", "out"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  f = FLAGS
  result = official.import_official(f.src, f.out, texture_stats=f.texture_stats, semantic_stats=f.semantic_stats,
                                    dino_dtype=None if f.dino_dtype == "none" else f.dino_dtype,
                                    latent_dtype=f.latent_dtype)
  print(f"{result['records']} records in {result['directory']}; stats from "
        f"{ {k: result['stats'][k].get('source', 'computed') for k in ('texture', 'semantic')} }", flush=True)


if __name__ == "__main__":
  common.run(main, log_dir=lambda: FLAGS.out)
