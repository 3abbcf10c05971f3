"""The training metrics writer (`training.metrics.MetricWriter`) does its I/O off the training step: what it writes
is every record in order, nothing lost at close, a resume keeps the steps up to the restored one and appends after
them, the plots show exactly the file's records; a failed write is raised by the next call; and against a bucket
whose every write takes a second (the GCS emulator with that delay) `write_scalars` returns at once while the
records still reach the bucket within the upload interval, without a flush."""
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from sfd_jax import plots
from sfd_jax.training.metrics import MetricWriter
from tests.golden import REPO, free_port, subprocess_env

BUCKET = "sfd-slow"
DELAY_S = 0.3


def _lines(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_in_order_resume_appends_and_plots_show_the_file(tmp_path):
  writer = MetricWriter(tmp_path, plot_every_s=3600)
  for step in range(1, 201):
    writer.write_scalars(step, {"loss": 1.0 / step, "lr": np.float32(0.5)})
  writer.close()
  assert _lines(tmp_path / "metrics.jsonl") == [{"step": s, "loss": 1.0 / s, "lr": 0.5} for s in range(1, 201)]

  writer = MetricWriter(tmp_path, resume_step=120, plot_every_s=3600)  # killed after step 200, resumed from 120
  for step in range(121, 131):
    writer.write_scalars(step, {"loss": 2.0, "lr": 0.25})
  writer.close()
  expected = ([{"step": s, "loss": 1.0 / s, "lr": 0.5} for s in range(1, 121)]
              + [{"step": s, "loss": 2.0, "lr": 0.25} for s in range(121, 131)])
  assert _lines(tmp_path / "metrics.jsonl") == expected
  # The writer drew its plots from the records it holds: the same picture as one drawn from the file.
  from_file = tmp_path / "from_file" / tmp_path.name  # a run of the same name: the same title
  plots.write_run_plots(from_file, plots.read_jsonl(tmp_path / "metrics.jsonl"))
  drawn, reference = (np.asarray(Image.open(d / "plots" / "training.png")) for d in (tmp_path, from_file))
  np.testing.assert_array_equal(drawn, reference)


def test_a_failed_write_is_raised_by_the_next_call(tmp_path):
  writer = MetricWriter(tmp_path)
  (tmp_path / "metrics.jsonl").mkdir()  # the file cannot be opened for appending
  writer.write_scalars(1, {"loss": 1.0})  # returns: the write happens on the writer's thread
  with pytest.raises(IsADirectoryError):
    writer.flush()
  writer.close()


SLOW_EMULATOR = """
import sys, time
from gcp_storage_emulator import server
from tests import gcs_emulator
port, bucket, delay = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
gcs_emulator.patch_handlers()
handle = server.Router.handle
def slow_writes(self, method):  # every upload (and any other write) answers after `delay` seconds
  if method in ("POST", "PUT", "PATCH", "DELETE"):
    time.sleep(delay)
  return handle(self, method)
server.Router.handle = slow_writes
server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).start()
while True:
  time.sleep(3600)
"""

WRITER = f"""
import json, time
from etils import epath
from sfd_jax.training.metrics import MetricWriter
writer = MetricWriter("gs://{BUCKET}/run", upload_every_s=2.0)
start = time.perf_counter()
for step in range(1, 7):
  writer.write_scalars(step, {{"loss": 1.0 / step}})
returned = time.perf_counter() - start
jsonl, text = epath.Path("gs://{BUCKET}/run/metrics.jsonl"), ""
while text.count("\\n") < 6 and time.perf_counter() - start < 60:  # no flush: the writer uploads on its own
  time.sleep(0.2)
  text = jsonl.read_text() if jsonl.exists() else ""
arrived = time.perf_counter() - start
writer.close()
print(json.dumps({{"returned": returned, "arrived": arrived, "text": text, "closed": jsonl.read_text()}}))
"""


def test_the_step_does_not_wait_for_a_slow_bucket():
  pytest.importorskip("gcp_storage_emulator", reason="the GCS emulator is part of the test extra")
  port = free_port()
  server = subprocess.Popen([sys.executable, "-c", SLOW_EMULATOR, str(port), BUCKET, str(DELAY_S)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f"http://127.0.0.1:{port}"
  env = {**subprocess_env(), "STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GOOGLE_CLOUD_PROJECT": BUCKET,
         "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  try:
    deadline, probe = time.time() + 60, f"from etils import epath; list(epath.Path('gs://{BUCKET}').iterdir())"
    while subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, timeout=60).returncode:
      assert time.time() < deadline, "the GCS emulator did not start"
      time.sleep(0.5)
    result = subprocess.run([sys.executable, "-c", WRITER], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
  finally:
    server.kill()
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  expected = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 7))
  # Six records in much less than one write's delay (the writer used to upload on the first call, and draw).
  assert report["returned"] < DELAY_S / 2, report
  assert report["text"] == expected and DELAY_S <= report["arrived"] < 30, report
  assert report["closed"] == expected
