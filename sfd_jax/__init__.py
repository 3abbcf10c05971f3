"""sfd_jax: Semantic-First Diffusion (SFD) in JAX/Flax.

`models/` and `diffusion/` are pure functions to import in a notebook; `training/`, `data/`, `eval/`,
`convert/` and `cli/` are the machinery around them.
"""

__version__ = "0.1.0"
