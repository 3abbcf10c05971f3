"""Official checkpoints (.pt, LDM .ckpt, HF DINOv2, ...) <-> flax params. Strict: errors name the key."""
from sfd_jax.convert.dit import dit_to_torch, load_dit
from sfd_jax.convert.io import ConversionError, load_state_dict, select_state_dict
from sfd_jax.convert.texture_vae import load_texture_vae, texture_vae_to_torch

__all__ = ["ConversionError", "dit_to_torch", "load_dit", "load_state_dict", "load_texture_vae", "select_state_dict",
           "texture_vae_to_torch"]
