"""Converts official checkpoints into exported sfd_jax models (model.json + orbax params), and back.

  python -m sfd_jax.cli.convert --kind=dit --checkpoint=0400000.pt --preset=XL --out=exports/sfd_xl
  python -m sfd_jax.cli.convert --kind=dit --checkpoint=0070000.pt --preset=B --out=exports/autoguidance_b
  python -m sfd_jax.cli.convert --kind=texture_vae --checkpoint=ldm-imagenet256-f16d32-50ep.ckpt --out=exports/vae
  python -m sfd_jax.cli.convert --kind=dinov2 --checkpoint=dinov2_vitb14_reg4_pretrain.pth --out=exports/dinov2_b
  python -m sfd_jax.cli.convert --kind=semvae --checkpoint=semantic_ae_final.pt --out=exports/semvae
  python -m sfd_jax.cli.convert --kind=stats --checkpoint=latents_stats.pt --semantic_stats=latents_sv_stats.pt \\
      --out=stats.json
  python -m sfd_jax.cli.convert --kind=dit --to_torch --checkpoint=exports/sfd_xl --out=sfd_xl.pt

DiT checkpoints of train.py take their `ema` weights (the ones sampled from; `--which=model` for the others); the
network is the official SFD model of `--preset`, or any official constructor kwargs given as JSON in
`--model_kwargs`. The Semantic VAE of its train.py (`semantic_ae_final.pt`) takes its `model_state_dict`,
every size from the tensors' shapes and the attention heads from the YAML config stored beside them (a file
without it: the released 6 heads, said in one line); `--to_torch` writes it back in that form. torch is not
needed: torch files are read without running anything they hold, and only the tensors needed are read; one line
says what was skipped (the optimizer state, a pickled config, ...).
"""
from __future__ import annotations

import logging
import sys

from absl import flags

from sfd_jax.cli import common
from sfd_jax.convert.files import convert_to_flax, convert_to_torch

KINDS = ("dit", "texture_vae", "dinov2", "semvae", "stats")
FLAGS = flags.FLAGS
flags.DEFINE_enum("kind", None, KINDS, "What the checkpoint holds.")
flags.DEFINE_string("checkpoint", None, "The official file or Hugging Face directory (with --to_torch: an exported "
                    "model directory).")
flags.DEFINE_string("out", None, "Output directory (exported model), or .pt/.npz file (--to_torch), or .json (stats).")
flags.DEFINE_string("preset", "XL", "DiT: official SFD size (S, B, L, XL, XXL/1p0B, 1p6B).")
flags.DEFINE_string("model_kwargs", None, "DiT: official constructor kwargs as JSON, instead of --preset; "
                    "texture VAE: Encoder/Decoder kwargs as JSON (default SD-VAE f16d32).")
flags.DEFINE_integer("embed_dim", 32, "Texture VAE: latent channels.")
flags.DEFINE_string("semantic_stats", None, "Stats: the official latents_sv_stats.pt (semantic channels).")
flags.DEFINE_bool("to_torch", False, "Convert an exported model back to official names (.pt needs torch, or .npz).")
flags.DEFINE_enum("which", "ema", ("ema", "model"), "DiT: which weights of a train.py checkpoint to convert.")
flags.mark_flags_as_required(["kind", "checkpoint", "out"])


def main(argv):
  del argv
  reports = logging.getLogger("sfd_jax.convert")  # what reading a file skipped, one line per file
  reports.setLevel(logging.INFO)
  reports.addHandler(logging.StreamHandler(sys.stdout))
  if FLAGS.to_torch:
    path = convert_to_torch(FLAGS.checkpoint, FLAGS.out)
  else:
    path = convert_to_flax(FLAGS.kind, FLAGS.checkpoint, FLAGS.out, FLAGS.preset, common.json_flag("model_kwargs"),
                           FLAGS.embed_dim, FLAGS.semantic_stats, FLAGS.which)
  print(f"wrote {path}")


if __name__ == "__main__":
  common.run(main)
