"""Features over several devices and processes equal features on one device, for every image, in order.

A stand-in network (the same output keys as InceptionV3, a few operations) keeps compilation cheap: what is
tested is the batching, padding, per-host row reading and gathering of `FeatureExtractor`, and the single writer
of `write_reference`. This file is also the worker: `python tests/test_eval_sharding.py OUT [PROCESS NUM PORT]`.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

NUM_IMAGES = 19  # not a multiple of any batch: the last batch is padded


def _env(devices: int):
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
  return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_eight_devices_match_one(tmp_path):
  subprocess.run([sys.executable, __file__, str(tmp_path)], env=_env(8), check=True, timeout=300)
  assert (tmp_path / "ok_0").read_text() == "8 devices, 1 processes"


def test_two_processes_match_one(tmp_path):
  port = _free_port()
  workers = [subprocess.Popen([sys.executable, __file__, str(tmp_path), str(i), "2", str(port)], env=_env(2),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
  for worker in workers:
    _, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err[-3000:]
  for i in range(2):  # every process holds all features, and only process 0 wrote the reference file
    assert (tmp_path / f"ok_{i}").read_text() == "4 devices, 2 processes"
  assert [p.name for p in tmp_path.glob("ref*")] == ["ref.npz"]


def _worker(out: Path, process: int | None, num_processes: int, port: int):
  import jax
  if process is not None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes, process, initialization_timeout=60)
  import flax.linen as nn
  import jax.numpy as jnp

  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  from sfd_jax.data.images import ArrayImages
  from sfd_jax.eval.features import FeatureExtractor
  from sfd_jax.eval.reference import write_reference

  class StandIn(nn.Module):
    @nn.compact
    def __call__(self, pixels):
      x = pixels.astype(jnp.float32) / 255
      pool = nn.Dense(5)(x.mean(axis=(1, 2)))
      return {"pool": pool, "spatial": jnp.tile(x[:, :3, :4], (1, 1, 1, 3)), "logits_unbiased": 2 * pool,
              "logits": 2 * pool + 1}

  images = np.random.default_rng(0).integers(0, 256, (NUM_IMAGES, 6, 5, 3), dtype=np.uint8)
  model = StandIn()
  variables = model.init(jax.random.key(0), images[:1])
  extractor = FeatureExtractor(model, variables, per_device_batch=1)  # batch = device count
  acts = write_reference(out / "ref.npz", ArrayImages(images), extractor)
  expected = jax.device_get(jax.jit(model.apply)(variables, images))
  np.testing.assert_allclose(acts.pool, expected["pool"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(acts.logits, expected["logits_unbiased"], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(acts.spatial, expected["spatial"][..., :7].reshape(NUM_IMAGES, -1))
  with np.load(out / "ref.npz") as f:
    np.testing.assert_array_equal(f["arr_0"], images)
    np.testing.assert_allclose(f["mu"], expected["pool"].astype(np.float64).mean(0), rtol=1e-6, atol=1e-7)
  (out / f"ok_{jax.process_index()}").write_text(f"{jax.device_count()} devices, {jax.process_count()} processes")


if __name__ == "__main__":
  args = sys.argv[1:]
  _worker(Path(args[0]), int(args[1]) if len(args) > 1 else None, int(args[2]) if len(args) > 2 else 1,
          int(args[3]) if len(args) > 3 else 0)
