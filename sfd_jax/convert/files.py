"""Official files → exported sfd_jax models and stats.json, and exported models → official state dicts.

The logic behind `python -m sfd_jax.cli.convert`, importable without its flags.
"""
from __future__ import annotations

import numpy as np

from sfd_jax import storage
from sfd_jax.convert import export
from sfd_jax.convert.dinov2 import dinov2_to_hf, load_dinov2
from sfd_jax.convert.dit import dit_to_torch, load_dit, official_sfd_kwargs
from sfd_jax.convert.io import ConversionError, load_checkpoint, load_state_dict, select_state_dict
from sfd_jax.convert.semvae import CHECKPOINT_VALUES, load_semvae, official_kwargs, semvae_checkpoint, semvae_to_torch
from sfd_jax.convert.texture_vae import load_texture_vae, texture_vae_to_torch
from sfd_jax.errors import UserError
from sfd_jax.models.semvae import SemVAE

SD_VAE_F16D32 = dict(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], dropout=0.0,
                     resamp_with_conv=True, in_channels=3, resolution=256, z_channels=32, double_z=True, out_ch=3)


def convert_to_flax(kind: str, checkpoint: str, out: str, preset: str = "XL", model_kwargs: dict | None = None,
                    embed_dim: int = 32, semantic_stats: str | None = None, which: str = "ema"):
  """Reads an official file and writes its sfd_jax form; returns the path written.

  A DiT checkpoint of train.py gives its `which` weights ('ema', the ones sampled from, or 'model'); a SemVAE
  checkpoint of its train.py its `model_state_dict`, sized by its shapes and the heads of its YAML config.
  """
  if kind == "dinov2":  # a Hugging Face directory or a facebookresearch/HF weight file
    model, variables = load_dinov2(checkpoint)
    return export.save_model(out, model, variables, extra={"source": str(storage.path(checkpoint))})
  if kind == "semvae":
    raw, values = load_checkpoint(checkpoint, keep=CHECKPOINT_VALUES)
    model, variables = load_semvae(select_state_dict(raw), values, where=str(checkpoint))
    return export.save_model(out, model, variables, extra={"source": str(storage.path(checkpoint)),
                                                           "official_kwargs": official_kwargs(model)})
  raw = load_state_dict(checkpoint, which=which if kind == "dit" else None)
  if kind == "stats":
    return write_stats(raw, load_state_dict(semantic_stats) if semantic_stats else None,
                       out, sources=[checkpoint, semantic_stats])
  if kind == "dit":
    kwargs = model_kwargs or official_sfd_kwargs(preset)
    model, variables = load_dit(kwargs, select_state_dict(raw))
  else:
    model, variables = load_texture_vae(model_kwargs or SD_VAE_F16D32, embed_dim, raw)
    kwargs = {"encoder_decoder_kwargs": model_kwargs or SD_VAE_F16D32, "embed_dim": embed_dim}
  return export.save_model(out, model, variables, extra={"source": str(storage.path(checkpoint)),
                                                         "official_kwargs": kwargs})


def write_stats(texture: dict, semantic: dict | None, out: str, sources):
  """Official `{'mean','std'}` (1,C,1,1) stats files → the stats.json of the latent dataset format."""
  stats = {"texture": _channel_stats(texture, "texture")}
  if semantic is not None:
    stats["semantic"] = _channel_stats(semantic, "semantic")
  stats["source"] = [str(s) for s in sources if s]
  path = storage.path(out)
  if path.exists():
    raise UserError(f"{path} exists; choose another output file")
  path.parent.mkdir(parents=True, exist_ok=True)
  storage.write_json(path, stats)
  return path


def _channel_stats(raw: dict, what: str) -> dict:
  if "mean" not in raw or "std" not in raw:
    raise ConversionError(f"the {what} stats file must hold 'mean' and 'std' tensors, found {sorted(raw)}")
  return {"mean": np.asarray(raw["mean"], np.float64).reshape(-1).tolist(),
          "std": np.asarray(raw["std"], np.float64).reshape(-1).tolist()}


def convert_to_torch(exported: str, out: str):
  """An exported model → its official state dict in a .npz file, or in a .pt file (torch) as the official code
  loads it: the state dict itself, or for a SemVAE the checkpoint dict of its train.py (`semvae_checkpoint`)."""
  model, variables, meta = export.load_model(exported)
  to_torch = {"LightningDiT": dit_to_torch, "AutoencoderKL": texture_vae_to_torch, "DINOv2": dinov2_to_hf,
              "SemVAE": semvae_to_torch}
  state_dict = to_torch[meta["class"]](model, variables)
  path = storage.path(out)
  if path.exists():
    raise UserError(f"{path} exists; choose another output file")
  with storage.staged_file(path) as local:
    if path.suffix == ".npz":
      np.savez(local, **state_dict)
    else:
      import torch
      tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}
      torch.save(semvae_checkpoint(model, tensors) if isinstance(model, SemVAE) else tensors, local)
  return path
