"""Rows per process on a pod's device order: four jax.distributed CPU processes of four devices each, whose 16-device
meshes JAX lays out as on a TPU v5e-16 (processes interleaved along the ring, `tests/pod_order.py`), give what one
process gives: training losses step by step, each sampled image under its own index with its own label, and the
Inception features of a source whose last batch is padded.

Training and sampling are compared with the same command in one process with 16 devices (the same mesh shape,
devices grouped as XLA:CPU lists them): one program's results on two device orders. The features are compared with
the network applied to all images at once. Each test fails when process p feeds rows [p·L, (p+1)·L) instead.
"""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from sfd_jax.convert import export
from sfd_jax.models.texture_vae import AutoencoderKL
from tests.golden import REPO, free_port, subprocess_env
from tests.pod_order import NOTE

pytestmark = pytest.mark.slow  # three groups of four processes and their single-process references (minutes)

SMOKE = str(REPO / "configs" / "smoke.py")
PROCESSES, DEVICES = 4, 4
TRAIN = ("total_steps=3", "log_every=1", "ckpt_every=3", "sample_every=0")
NUM_IMAGES, BATCH = 21, 16  # the last batch of samples is padded


def env(devices: int) -> dict:
  return {**subprocess_env(devices), "JAX_ENABLE_COMPILATION_CACHE": "false"}


def single(*args, timeout=600):
  """`python ARGS` in one process with the pod's 16 devices."""
  result = subprocess.run([sys.executable, *args], env=env(PROCESSES * DEVICES), capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def on_pod(*args, cli=True, timeout=600):
  """`python ARGS` as four jax.distributed processes on the v5e-16 device order; checks that their meshes had it."""
  port = free_port()
  extra = lambda i: ([f"--coordinator=localhost:{port}", f"--num_processes={PROCESSES}", f"--process_id={i}"]
                     if cli else [str(i), str(PROCESSES), str(port)])
  workers = [subprocess.Popen([sys.executable, "-m", "tests.pod_order", *args, *extra(i)], env=env(DEVICES),
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(PROCESSES)]
  try:
    outputs = [w.communicate(timeout=timeout) for w in workers]
  finally:
    for w in workers:
      w.kill()
  for worker, (_, err) in zip(workers, outputs):
    assert worker.returncode == 0, err[-3000:]
    assert f"{NOTE} 0 0 1 1 1 1 0 2 3 3 3 3 2 2 2 0" in err, err[-3000:]  # the stand-in was in force
  return outputs


def train_command(workdir):
  return ["-m", "sfd_jax.cli.train", f"--config={SMOKE}", f"--workdir={workdir}", *[f"--config.{o}" for o in TRAIN]]


def sample_command(files, model, out):
  return ["-m", "sfd_jax.cli.sample", f"--model={model}", f"--vae={files / 'vae'}", f"--stats={files / 'stats.json'}",
          f"--out={out}", f"--num_images={NUM_IMAGES}", f"--batch_size={BATCH}", "--method=euler", "--num_steps=3",
          "--labels=random"]


def losses(workdir) -> dict:
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {line["step"]: line["loss"] for line in lines if "loss" in line}


def pngs(out) -> dict:
  return {p.name: np.asarray(Image.open(p)) for p in sorted((out / "images").glob("*.png"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """A tiny texture VAE and latent stats; the smoke model trained 3 steps and sampled, in one process."""
  root = tmp_path_factory.mktemp("pod_order")
  vae = AutoencoderKL(ch=32, ch_mult=(1, 1), num_res_blocks=0, attn_resolutions=(), resolution=8, z_channels=32,
                      embed_dim=32)
  export.save_model(root / "vae", vae, {"params": vae.init(jax.random.key(0), np.zeros((1, 8, 8, 3)))["params"]})
  (root / "stats.json").write_text(json.dumps({"texture": {"mean": [0.5] * 32, "std": [2.0] * 32}}))
  single(*train_command(root / "run"))
  single(*sample_command(root, root / "run", root / "samples"))
  return root


def test_training_losses_match_one_process(reference, tmp_path):
  on_pod(*train_command(tmp_path))
  expected, got = losses(reference / "run"), losses(tmp_path)
  assert sorted(got) == sorted(expected) == [1, 2, 3]
  np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [expected[s] for s in (1, 2, 3)], rtol=2e-5)


def test_samples_are_written_under_their_own_index_with_their_own_label(reference, tmp_path):
  on_pod(*sample_command(reference, reference / "run", tmp_path))
  expected, got = pngs(reference / "samples"), pngs(tmp_path)
  assert sorted(got) == sorted(expected) == [f"{i:06d}.png" for i in range(NUM_IMAGES)]
  assert len({image.tobytes() for image in expected.values()}) == NUM_IMAGES  # every image differs from the rest
  for name in expected:
    assert np.abs(got[name].astype(int) - expected[name].astype(int)).max() <= 1, name
  with np.load(reference / "samples" / "samples.npz") as want, np.load(tmp_path / "samples.npz") as have:
    np.testing.assert_array_equal(have["arr_1"], want["arr_1"])  # labels
    assert np.abs(have["arr_0"].astype(int) - want["arr_0"].astype(int)).max() <= 1


def test_features_of_a_padded_source_match_one_process(tmp_path):
  """tests/test_eval_sharding.py's worker: every image's features (and the reference batch written from them)
  equal the network applied to all images at once; 19 images in batches of 16, the last one padded."""
  on_pod(str(REPO / "tests" / "test_eval_sharding.py"), str(tmp_path), cli=False)
  for i in range(PROCESSES):
    assert (tmp_path / f"ok_{i}").read_text() == "16 devices, 4 processes"
  assert [p.name for p in tmp_path.glob("ref*")] == ["ref.npz"]
