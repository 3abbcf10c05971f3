"""A tiny SFD training setup shared by the train-step tests (in-process and in subprocesses)."""
import numpy as np

from sfd_jax.data import latents
from sfd_jax.training import config as config_lib


def tiny_config(batch_size: int = 8, **optim):
  cfg = config_lib.base_config()
  cfg.model = config_lib.model_config("S", input_size=4, hidden_size=64, depth=1, num_heads=2, num_classes=10,
                                      repa_depth=1, repa_projector_dim=32, repa_z_dim=16)
  cfg.batch_size = batch_size
  cfg.sharding.min_size = 64  # shard even tiny tensors, so the rules are exercised
  cfg.optim.update(optim)
  return cfg


def tiny_batch(cfg, seed: int = 0):
  """A global batch of normalised latents, labels and DINO tokens (numpy)."""
  rng = np.random.default_rng(seed)
  n, size, tokens = cfg.batch_size, cfg.model.input_size, (cfg.model.input_size // cfg.model.patch_size) ** 2
  return {"x": rng.normal(size=(n, size, size, cfg.model.in_channels)).astype(np.float32),
          "y": rng.integers(0, cfg.model.num_classes, n).astype(np.int32),
          "dino": rng.normal(size=(n, tokens, cfg.model.repa_z_dim)).astype(np.float32)}


def write_synthetic_latents(directory, records: int = 64, shards: int = 2):
  """A latent dataset of `records` synthetic records in `shards` shards (the smoke config's layout: 4×4 latents,
  32 texture + 16 semantic channels, 16 DINO tokens of 32)."""
  spec = latents.record_spec(latent_size=4, texture_channels=32, semantic_channels=16, dino_tokens=16, dino_dim=32)
  source = latents.SyntheticLatents(records, spec, num_classes=10)
  writer = latents.LatentWriter(directory, shards, spec)
  per_shard = records // shards
  for k in range(shards):
    writer.write_shard(k, [source[i] for i in range(k * per_shard, (k + 1) * per_shard)])
  writer.finish()
  return source
