"""Run by tests/test_sampler.py in a subprocess with 8 fake CPU devices: the images of 8 indices must be the same
(same steps, latents within float32 rounding) whether the batch is sharded over the 8 devices or sits on one.
Prints the max difference and 'ok'."""
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sfd_jax import sharding  # noqa: E402
from sfd_jax.diffusion import sampler  # noqa: E402
from tests.test_sampler import tiny_model  # noqa: E402


def main():
  jax.config.update("jax_default_matmul_precision", "highest")
  assert jax.device_count() == 8, jax.devices()
  model, variables = tiny_model()
  velocity = sampler.model_velocity(model, variables)
  indices = np.arange(8)
  z = sampler.noise(jax.random.key(0), indices, (model.input_size, model.input_size, model.in_channels))
  y = sampler.balanced_labels(jax.random.key(1), indices, 8, model.num_classes)

  one = jax.devices()[0]
  single, single_stats = sampler.sample(velocity, jax.device_put(z, one), jax.device_put(y, one), delta_t=0.3)
  mesh = sharding.make_mesh()
  z8, y8 = sharding.shard_batch(mesh, (np.asarray(z), np.asarray(y)))
  sharded, stats = sampler.sample(velocity, z8, y8, delta_t=0.3)
  assert len(sharded.sharding.device_set) == 8, sharded.sharding
  np.testing.assert_array_equal(np.asarray(stats["accepted_steps"]), np.asarray(single_stats["accepted_steps"]))
  assert int(stats["model_calls"]) == int(single_stats["model_calls"])
  # One image per device instead of eight on one: XLA's CPU matmuls round differently (~1e-6).
  diff = np.abs(np.asarray(sharding.to_host(sharded)) - np.asarray(single)).max()
  print(f"max |8 devices - 1 device| = {diff:.3g}, model calls {int(stats['model_calls'])}")
  assert diff <= 2e-5, diff
  print("ok")


if __name__ == "__main__":
  main()
