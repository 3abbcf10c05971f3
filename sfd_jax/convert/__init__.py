"""Official checkpoints (.pt, LDM .ckpt, HF DINOv2, ...) <-> flax params. Strict: errors name the key."""
from sfd_jax.convert.dinov2 import dinov2_to_hf, load_dinov2
from sfd_jax.convert.dit import dit_to_torch, load_dit
from sfd_jax.convert.inception import inception_to_torch, load_inception
from sfd_jax.convert.io import ConversionError, load_state_dict, select_state_dict
from sfd_jax.convert.semvae import load_semvae, semvae_to_torch
from sfd_jax.convert.texture_vae import load_texture_vae, texture_vae_to_torch

__all__ = ["ConversionError", "dinov2_to_hf", "dit_to_torch", "inception_to_torch", "load_dinov2", "load_dit",
           "load_inception", "load_semvae", "load_state_dict", "load_texture_vae", "select_state_dict",
           "semvae_to_torch", "texture_vae_to_torch"]
