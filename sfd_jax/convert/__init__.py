"""Official checkpoints (.pt, LDM .ckpt, HF DINOv2, ...) <-> flax params. Strict: errors name the key."""
from sfd_jax.convert.dit import dit_to_torch, load_dit
from sfd_jax.convert.io import ConversionError, load_state_dict, select_state_dict

__all__ = ["ConversionError", "dit_to_torch", "load_dit", "load_state_dict", "select_state_dict"]
