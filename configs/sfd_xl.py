"""SFD-XL: the official LightningDiT-XL/1 recipe (configs/sfd/lightningdit_xl/train.yaml, spec §2).

`--config=configs/sfd_xl.py` trains XL; `--config=configs/sfd_xl.py:B` keeps the recipe with another model size.
"""
from sfd_jax.training import config as config_lib


def get_config(preset: str = "XL"):
  c = config_lib.base_config()
  c.model = config_lib.model_config(preset or "XL")
  return c
