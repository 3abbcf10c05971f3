"""The AutoGuidance guide: LightningDiT-B/1 with the SFD recipe for 400K steps (configs/sfd/autoguidance_b).

The released guides are its EMA checkpoints at 60K-120K steps: keep them with
--config.keep_period=10000 and sample with `--guide_model=<workdir>` at the chosen step.
"""
from sfd_jax.training import config as config_lib


def get_config(preset: str = "B"):
  c = config_lib.base_config()
  c.model.update(config_lib.model_config(preset or "B"))
  c.data.path = "data/imagenet_train_256"
  c.total_steps = 400_000
  c.keep_period = 10_000
  return c
