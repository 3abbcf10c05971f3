"""Converts official checkpoints into exported sfd_jax models (model.json + orbax params), and back.

  python -m sfd_jax.cli.convert --kind=dit --checkpoint=0400000.pt --preset=XL --out=exports/sfd_xl
  python -m sfd_jax.cli.convert --kind=dit --checkpoint=0070000.pt --preset=B --out=exports/autoguidance_b
  python -m sfd_jax.cli.convert --kind=texture_vae --checkpoint=ldm-imagenet256-f16d32-50ep.ckpt --out=exports/vae
  python -m sfd_jax.cli.convert --kind=stats --checkpoint=latents_stats.pt --semantic_stats=latents_sv_stats.pt \
      --out=stats.json
  python -m sfd_jax.cli.convert --kind=dit --to_torch --checkpoint=exports/sfd_xl --out=sfd_xl.pt

DiT checkpoints take their `ema` weights (the ones sampled from); the network is the official SFD model of
`--preset`, or any official constructor kwargs given as JSON in `--model_kwargs`. torch files are read with
`weights_only=True`; `--trust_pickle` allows files holding other Python objects, for files you trust.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from absl import app, flags

from sfd_jax.cli.common import user_errors_exit
from sfd_jax.convert import export
from sfd_jax.convert.dit import dit_to_torch, load_dit, official_sfd_kwargs
from sfd_jax.convert.io import load_state_dict, select_state_dict
from sfd_jax.convert.texture_vae import load_texture_vae, texture_vae_to_torch

SD_VAE_F16D32 = dict(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], dropout=0.0,
                     resamp_with_conv=True, in_channels=3, resolution=256, z_channels=32, double_z=True, out_ch=3)

KINDS = ("dit", "texture_vae", "stats")
FLAGS = flags.FLAGS
flags.DEFINE_enum("kind", None, KINDS, "What the checkpoint holds.")
flags.DEFINE_string("checkpoint", None, "The official file (or, with --to_torch, an exported model directory).")
flags.DEFINE_string("out", None, "Output directory (exported model), or .pt/.npz file (--to_torch), or .json (stats).")
flags.DEFINE_string("preset", "XL", "DiT: official SFD size (S, B, L, XL, XXL/1p0B, 1p6B).")
flags.DEFINE_string("model_kwargs", None, "DiT: official constructor kwargs as JSON, instead of --preset; "
                    "texture VAE: Encoder/Decoder kwargs as JSON (default SD-VAE f16d32).")
flags.DEFINE_integer("embed_dim", 32, "Texture VAE: latent channels.")
flags.DEFINE_string("semantic_stats", None, "Stats: the official latents_sv_stats.pt (semantic channels).")
flags.DEFINE_bool("to_torch", False, "Convert an exported model back to official names (.pt needs torch, or .npz).")
flags.DEFINE_bool("trust_pickle", False, "Allow torch files that hold Python objects besides tensors.")
flags.mark_flags_as_required(["kind", "checkpoint", "out"])


def convert_to_flax(kind: str, checkpoint: str, out: str, preset: str = "XL", model_kwargs: dict | None = None,
                    embed_dim: int = 32, semantic_stats: str | None = None, trust_pickle: bool = False) -> Path:
  """Reads an official file and writes its sfd_jax form; returns the path written."""
  raw = load_state_dict(checkpoint, trust_pickle=trust_pickle)
  if kind == "stats":
    return write_stats(raw, load_state_dict(semantic_stats, trust_pickle=trust_pickle) if semantic_stats else None,
                       out, sources=[checkpoint, semantic_stats])
  if kind == "dit":
    kwargs = model_kwargs or official_sfd_kwargs(preset)
    model, variables = load_dit(kwargs, select_state_dict(raw))
  else:
    model, variables = load_texture_vae(model_kwargs or SD_VAE_F16D32, embed_dim, raw)
    kwargs = {"encoder_decoder_kwargs": model_kwargs or SD_VAE_F16D32, "embed_dim": embed_dim}
  return export.save_model(out, model, variables, extra={"source": str(Path(checkpoint).absolute()),
                                                         "official_kwargs": kwargs})


def write_stats(texture: dict, semantic: dict | None, out: str, sources) -> Path:
  """Official `{'mean','std'}` (1,C,1,1) stats files → the stats.json of the latent dataset format."""
  stats = {"texture": _channel_stats(texture, "texture")}
  if semantic is not None:
    stats["semantic"] = _channel_stats(semantic, "semantic")
  stats["source"] = [str(s) for s in sources if s]
  path = Path(out)
  if path.exists():
    raise FileExistsError(f"{path} exists; choose another output file")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(stats, indent=1))
  return path


def _channel_stats(raw: dict, what: str) -> dict:
  if "mean" not in raw or "std" not in raw:
    raise ValueError(f"the {what} stats file must hold 'mean' and 'std' tensors, found {sorted(raw)}")
  return {"mean": np.asarray(raw["mean"], np.float64).reshape(-1).tolist(),
          "std": np.asarray(raw["std"], np.float64).reshape(-1).tolist()}


def convert_to_torch(exported: str, out: str) -> Path:
  """An exported model → official state dict in a .pt (torch) or .npz file."""
  model, variables, meta = export.load_model(exported)
  state_dict = dit_to_torch(model, variables) if meta["class"] == "LightningDiT" else texture_vae_to_torch(
      model, variables)
  path = Path(out)
  if path.exists():
    raise FileExistsError(f"{path} exists; choose another output file")
  if path.suffix == ".npz":
    np.savez(path, **state_dict)
  else:
    import torch
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}, path)
  return path


@user_errors_exit
def main(argv):
  del argv
  if FLAGS.to_torch:
    path = convert_to_torch(FLAGS.checkpoint, FLAGS.out)
  else:
    kwargs = json.loads(FLAGS.model_kwargs) if FLAGS.model_kwargs else None
    path = convert_to_flax(FLAGS.kind, FLAGS.checkpoint, FLAGS.out, FLAGS.preset, kwargs, FLAGS.embed_dim,
                           FLAGS.semantic_stats, FLAGS.trust_pickle)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
