"""Runs whose workdir is a gs:// bucket, against a local GCS emulator this module starts (gcp-storage-emulator,
with the object preconditions the real service has: tests/gcs_emulator.py):
a smoke training is stopped by SIGTERM, resumed and finished in the bucket and matches a local run; sampling
writes its images and .npz there; an extraction writes its latent dataset there; the objects are listed and read
back. Each client finds the emulator through its own standard variables (`gcs_emulator.client_env`)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from tests import gcs_emulator
from tests.golden import REPO, free_port, subprocess_env

SMOKE = str(REPO / "configs" / "smoke.py")
BUCKET = "sfd-test"


@pytest.fixture(scope="module")
def emulator():
  pytest.importorskip("gcp_storage_emulator", reason="the GCS emulator is part of the test extra")
  port = free_port()
  env = {**subprocess_env(), **gcs_emulator.client_env(f"http://127.0.0.1:{port}")}
  with gcs_emulator.running(BUCKET, env, port):
    yield env


def bucket_call(env, code: str):
  """Runs `code` (which prints JSON) against the emulator in a fresh process; returns the parsed output."""
  result = subprocess.run([sys.executable, "-c", "import json\nfrom etils import epath\n" + code], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def train(env, workdir, *overrides):
  return [sys.executable, "-m", "sfd_jax.cli.train", f"--config={SMOKE}", f"--workdir={workdir}",
          *[f"--config.{o}" for o in overrides]]


def test_training_in_a_bucket_stops_resumes_and_finishes(emulator, tmp_path):
  overrides = ("total_steps=60", "log_every=1", "ckpt_every=1000", "sample_every=30")
  workdir = f"gs://{BUCKET}/runs/smoke"
  worker = subprocess.Popen(train(emulator, workdir, *overrides), env=emulator, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  for line in worker.stdout:  # progress lines come before the bucket's copy of metrics.jsonl (written every 30 s)
    if line.startswith("step 12/60"):
      worker.terminate()
      break
  _, err = worker.communicate(timeout=300)
  assert worker.returncode == 75 and "preempted: stopped at step" in err, err[-3000:]
  resumed = subprocess.run(train(emulator, workdir, *overrides), env=emulator, capture_output=True, text=True,
                           timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step" in resumed.stdout and "done: step 60" in resumed.stdout
  local = subprocess.run(train(emulator, tmp_path / "local", *overrides), env=emulator, capture_output=True,
                         text=True, timeout=600)
  assert local.returncode == 0, local.stderr[-3000:]

  listing = bucket_call(emulator, f"""
import gcsfs
root = epath.Path('gs://{BUCKET}/runs/smoke')
prefix = '{BUCKET}/runs/smoke/'
names = sorted(name[len(prefix):] for name in gcsfs.GCSFileSystem().find(prefix))
print(json.dumps({{"names": names, "metrics": (root / 'metrics.jsonl').read_text(),
                  "config": json.loads((root / 'config.json').read_text())}}))""")
  names = listing["names"]
  assert any(n.startswith("checkpoints/60/state/") for n in names), names
  assert "checkpoints/60/commit_success.txt" in names  # orbax's commit file: no renames in a bucket
  assert any(n.startswith("tensorboard/events.out.tfevents") for n in names)
  assert {"samples/sample_latents_00000030.png", "samples/sample_latents_00000060.png"} <= set(names)
  assert "logs/train.log" in names and listing["config"]["total_steps"] == 60
  in_bucket = [json.loads(line) for line in listing["metrics"].splitlines()]
  assert [r["step"] for r in in_bucket if "loss" in r] == list(range(1, 61))  # each step logged exactly once
  at_home = [json.loads(line) for line in (tmp_path / "local" / "metrics.jsonl").read_text().splitlines()]
  key = lambda records: [(r["step"], r["loss"], r["grad_norm"]) for r in records if "loss" in r]
  assert key(in_bucket) == key(at_home)  # resumed in the bucket = uninterrupted on disk, bit for bit

  # Sampling from the bucket's run into the bucket.
  import jax

  from sfd_jax.convert import export
  from sfd_jax.models.texture_vae import AutoencoderKL
  vae = AutoencoderKL(ch=32, ch_mult=(1,), num_res_blocks=0, attn_resolutions=(), resolution=4, z_channels=32,
                      embed_dim=32)
  export.save_model(tmp_path / "vae", vae, vae.init(jax.random.key(0), *vae.dummy_inputs()))
  (tmp_path / "stats.json").write_text(json.dumps({"texture": {"mean": [0.0] * 32, "std": [1.0] * 32}}))
  out = f"gs://{BUCKET}/samples/smoke"
  sampled = subprocess.run([sys.executable, "-m", "sfd_jax.cli.sample", f"--model={workdir}",
                            f"--vae={tmp_path / 'vae'}", f"--stats={tmp_path / 'stats.json'}", f"--out={out}",
                            "--num_images=3", "--batch_size=2", "--method=euler", "--num_steps=3"],
                           env=emulator, capture_output=True, text=True, timeout=600)
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  images = bucket_call(emulator, f"""
import io, numpy as np
root = epath.Path('{out}')
with (root / 'samples.npz').open('rb') as f:
  arrays = np.load(io.BytesIO(f.read()))
print(json.dumps({{"pngs": sorted(p.name for p in (root / 'images').iterdir()),
                  "shape": list(arrays['arr_0'].shape), "labels": arrays['arr_1'].tolist()}}))""")
  assert images["pngs"] == ["000000.png", "000001.png", "000002.png"]
  assert images["shape"] == [3, 4, 4, 3] and len(images["labels"]) == 3
  assert np.all(np.asarray(images["labels"]) >= 0)


def test_other_urls_and_datasets_in_a_bucket_are_one_sentence(emulator, tmp_path):
  for override, expected in (("data.path=s3://bucket/latents", "local paths and gs://bucket/... paths only"),
                             (f"data.source=latents --config.data.path=gs://{BUCKET}/latents",
                              "is read from a filesystem path: mount the bucket read-only")):
    result = subprocess.run(train(emulator, tmp_path / "run", *override.split(" --config.")), env=emulator,
                            capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and expected in errors[0], result.stderr[-2000:]


def test_extraction_into_a_bucket_is_the_local_extraction(emulator, tmp_path):
  """extract --out=gs://...: shards written locally and copied whole with their sidecars, metadata and stats in the
  bucket; run again it redoes nothing; downloaded, it holds the records and stats of the same extraction written
  to a local directory."""
  result = bucket_call(emulator, f"""
import gcsfs, numpy as np
from sfd_jax.data import extract, images, latents
from tests.test_extract import _tiny_encoders
settings, encoders = extract.Settings(shard_size=4, batch_size=2, seed=3, max_images=6), _tiny_encoders()
remote = extract.extract(images.DigitsImages(), encoders, "gs://{BUCKET}/data", settings, progress=False)
shards = sorted(p for p in epath.Path(remote["directory"]).iterdir() if "array_record" in p.name)
times = [p.stat().mtime for p in shards]
extract.extract(images.DigitsImages(), encoders, "gs://{BUCKET}/data", settings, progress=False)
local = extract.extract(images.DigitsImages(), encoders, "{tmp_path}/local", settings, progress=False)
gcsfs.GCSFileSystem().get("{BUCKET}/data", "{tmp_path}/downloaded", recursive=True)
got, want = latents.LatentSource("{tmp_path}/downloaded"), latents.LatentSource("{tmp_path}/local")
same = len(got) == len(want) and all(
    set(got[i]) == set(want[i]) and all(np.array_equal(got[i][k], want[i][k]) for k in want[i])
    for i in range(len(want)))
print(json.dumps({{"records": remote["records"], "local": local["records"], "same": same,
                  "stats": got.stats == want.stats, "names": sorted(p.name for p in shards),
                  "redone": [p.stat().mtime for p in shards] != times}}))
""")
  assert result["records"] == result["local"] == 6 and result["same"] and result["stats"]
  assert result["names"] == [f"sfd_latents-train.array_record-0000{i}-of-00002{s}" for i in range(2)
                             for s in ("", ".stats.json")]
  assert not result["redone"]
