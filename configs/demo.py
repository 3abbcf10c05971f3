"""The demo's SFD stage as a standalone training config (`configs/demo.py`, or `configs/demo.py:quick`).

It trains on the latent dataset the demo extracted (`python -m sfd_jax.cli.demo` writes outputs/demo/latents):
  python -m sfd_jax.cli.train --config=configs/demo.py --workdir=runs/demo_sfd
"""
from pathlib import Path

from sfd_jax import demo


def get_config(arg: str = ""):
  return demo.Demo(demo.demo_config(quick=arg == "quick"), Path("outputs/demo")).sfd_config(delta_t=0.3)
