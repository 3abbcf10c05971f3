"""Official SFD latent shards (safetensors + `*_stats.pt`) → the latent dataset that `sfd_jax.cli.train` reads.

  python -m sfd_jax.cli.import_official --src=outputs/dataset/imagenet1k-latents/.../imagenet_train_256 --out=DATASET

The official stats files found next to the shards (or given) become the dataset's stats. Run it again to resume.
"""
from __future__ import annotations

from absl import app, flags

from sfd_jax.cli.common import parse_flags, user_errors_exit
from sfd_jax.data import official

flags.DEFINE_string("src", None, "Directory of the official *.safetensors shards.")
flags.DEFINE_string("out", None, "Output directory of the latent dataset.")
flags.DEFINE_string("texture_stats", None, "Texture stats file (default: latents_stats.pt in --src, if there).")
flags.DEFINE_string("semantic_stats", None, "Semantic stats file (default: latents_sv_stats.pt in --src, if there).")
flags.DEFINE_enum("dino_dtype", "float16", ["float16", "bfloat16", "none"], "Storage dtype of the DINO tokens, or "
                  "none to leave them out.")
flags.DEFINE_enum("latent_dtype", "float32", ["float16", "float32"], "Storage dtype of the latents.")
flags.DEFINE_bool("trust_pickle", False, "Allow stats files that need full unpickling (trusted files only).")
flags.mark_flags_as_required(["src", "out"])
FLAGS = flags.FLAGS


@user_errors_exit
def main(argv):
  del argv
  f = FLAGS
  result = official.import_official(f.src, f.out, texture_stats=f.texture_stats, semantic_stats=f.semantic_stats,
                                    dino_dtype=None if f.dino_dtype == "none" else f.dino_dtype,
                                    latent_dtype=f.latent_dtype, trust_pickle=f.trust_pickle)
  print(f"{result['records']} records in {result['directory']}; stats from "
        f"{ {k: result['stats'][k].get('source', 'computed') for k in ('texture', 'semantic')} }", flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
