"""Restore decisions that every host agrees on, against a GCS emulator that can fail one client's reads
(tests/gcs_emulator.py's flaky front): two jax.distributed processes restore checkpoints that both wrote, each
reading its own shards. A read that fails transiently on one process (HTTP 503 and 502 for longer than the bucket
client's own retries) is retried: both resume from the same newest step and nothing is moved. A checkpoint truly
truncated in the bucket (the data only process 1 reads) is moved aside once, by agreement, and both resume from the
one before. A bucket that stays unreachable for one process stops both, each with a sentence, moving nothing. A
bucket that cannot be reached (closed port, unresolvable host) ends `train`, `sample` and `evaluate` in one `error:`
line naming it, exit 2, after a retry budget lowered by $SFD_JAX_BUCKET_RETRY_S; and the verdicts of a failed
bucket operation are those of the real clients' exceptions."""
import json
import subprocess
import sys
import time

import pytest

from tests import gcs_emulator
from tests.golden import REPO, free_port, subprocess_env

BUCKET = "sfd-test"
# A process's checkpoint I/O against the emulator: step s holds w = s * arange (sharded over the two processes'
# devices, so each process writes and reads its own half) and b = s * ones (replicated: written by process 0).
WORKER = """
import json, sys
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from sfd_jax import cluster
from sfd_jax.training import checkpoint as ckpt_lib
mode, directory, port, process = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
jax.config.update("jax_enable_compilation_cache", False)
cluster.start(f"localhost:{port}", 2, process)
mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
def state(step):
  w = np.arange(256 * 64, dtype=np.float32).reshape(256, 64) * step  # halves too large to be inlined in the index
  return {"w": jax.make_array_from_callback(w.shape, rows, lambda i: w[i]),
          "b": jax.make_array_from_callback((4,), replicated, lambda i: np.full(4, step, np.float32)[i])}
if mode == "save":  # into each of the comma-separated directories
  saved = []
  for where in directory.split(","):
    checkpointer = ckpt_lib.Checkpointer(where, use_async=False)
    for step in (1, 2):
      checkpointer.save(step, state(step), "{}")
    saved.append(checkpointer.steps())
    checkpointer.close()
  print(json.dumps({"saved": saved}))
else:
  checkpointer = ckpt_lib.Checkpointer(directory, use_async=False)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state(0))
  restored, step = checkpointer.restore_latest(abstract)
  expected = state(step)
  same = all(np.array_equal(np.asarray(shard.data), np.asarray(want.data))
             for k in ("w", "b") for shard, want in zip(restored[k].addressable_shards, expected[k].addressable_shards))
  print(json.dumps({"step": step, "values": same}))
  checkpointer.close()
"""


@pytest.fixture(scope="module")
def bucket():
  """(env of process 0, env of process 1): the emulator, and for process 1 its flaky front, which answers the first
  6 reads of `flaky/`'s checkpoint 2 state metadata with 503, 502, 503, ... (6: what gcsfs tries before it gives up)."""
  pytest.importorskip("gcp_storage_emulator", reason="the GCS emulator is part of the test extra")
  port, flaky_port = free_port(), free_port()
  good = {**subprocess_env(), **gcs_emulator.client_env(f"http://127.0.0.1:{port}"), "SFD_JAX_BUCKET_RETRY_S": "60"}
  flaky = {**good, **gcs_emulator.client_env(f"http://127.0.0.1:{flaky_port}")}
  with gcs_emulator.running(BUCKET, good, port, f"--flaky_port={flaky_port}", "--times=6", "--status=503,502",
                            r"--fail=/flaky%2Fcheckpoints%2F2%2Fstate%2F_METADATA\?alt=media"):
    directories = [f"gs://{BUCKET}/{name}/checkpoints" for name in ("flaky", "truncated")]
    assert both("save", ",".join(directories), (good, good))[0] == [{"saved": [[1, 2]] * 2}] * 2
    yield good, flaky


@pytest.fixture(scope="module")
def dead_for_one():
  """(env of process 0, env of process 1): the emulator, and for process 1 a front that answers every read of
  `dead/`'s checkpoint 2 state metadata with 503, with a retry budget of 1 s after the client's own retries."""
  pytest.importorskip("gcp_storage_emulator", reason="the GCS emulator is part of the test extra")
  port, flaky_port = free_port(), free_port()
  good = {**subprocess_env(), **gcs_emulator.client_env(f"http://127.0.0.1:{port}"), "SFD_JAX_BUCKET_RETRY_S": "60"}
  dead = {**good, **gcs_emulator.client_env(f"http://127.0.0.1:{flaky_port}"), "SFD_JAX_BUCKET_RETRY_S": "1"}
  with gcs_emulator.running(BUCKET, good, port, f"--flaky_port={flaky_port}", "--times=1000000", "--status=503",
                            r"--fail=/dead%2Fcheckpoints%2F2%2Fstate%2F_METADATA\?alt=media"):
    yield good, dead


def both(mode: str, directory: str, envs, check: bool = True) -> tuple[list[dict], list[str]]:
  """The worker as processes 0 and 1 (process i with envs[i]): each one's JSON line, and each one's stderr."""
  port = free_port()
  workers = [subprocess.Popen([sys.executable, "-c", WORKER, mode, directory, str(port), str(i)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i, env in enumerate(envs)]
  try:
    outputs = [w.communicate(timeout=300) for w in workers]
  finally:
    for w in workers:
      w.kill()
  for worker, (_out, err) in zip(workers, outputs):
    assert worker.returncode == 0 or not check, err[-4000:]
  results = [json.loads(out.strip().splitlines()[-1]) if check else None for out, _ in outputs]
  return results, [err for _, err in outputs]


def objects(env, prefix: str) -> list[str]:
  code = f"import gcsfs, json; print(json.dumps(sorted(gcsfs.GCSFileSystem().find('{BUCKET}/{prefix}'))))"
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  return [name[len(f"{BUCKET}/{prefix}"):] for name in json.loads(result.stdout)]


def truncate(env, prefix: str) -> list[str]:
  """Cuts every object under `prefix` to a third (a copy that stopped short); returns their names."""
  code = f"""import gcsfs, json
fs = gcsfs.GCSFileSystem()
names = fs.find('{BUCKET}/{prefix}')
for name in names:
  fs.pipe(name, fs.cat(name)[: fs.size(name) // 3])
print(json.dumps(names))"""
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  return json.loads(result.stdout)


def test_a_transient_failure_on_one_host_is_retried_and_nothing_moves(bucket):
  good, flaky = bucket
  directory = f"gs://{BUCKET}/flaky/checkpoints"
  before = objects(good, "flaky/checkpoints/")
  restored, logs = both("restore", directory, (good, flaky))
  assert restored == [{"step": 2, "values": True}] * 2
  assert objects(good, "flaky/checkpoints/") == before  # nothing moved aside, nothing deleted
  assert "retrying in" not in logs[0] and "restoring checkpoint 2" in logs[1] and "retrying in" in logs[1]


def test_a_truncated_checkpoint_is_moved_aside_once_by_agreement(bucket):
  good, _ = bucket
  directory = f"gs://{BUCKET}/truncated/checkpoints"
  assert truncate(good, "truncated/checkpoints/2/state/ocdbt.process_1/d/")  # the data only process 1 reads
  before = objects(good, "truncated/checkpoints/")
  restored, logs = both("restore", directory, (good, good))
  assert restored == [{"step": 1, "values": True}] * 2
  assert f"checkpoint 2 in {directory} cannot be restored (damaged as process 1 reads it); moved it to" in logs[0]
  reason = logs[1].split(f"checkpoint 2 in {directory} cannot be restored (")[1]
  assert reason.startswith(("ValueError: DATA_LOSS", "ValueError: OUT_OF_RANGE")), reason[:500]  # tensorstore's
  after = objects(good, "truncated/checkpoints/")
  assert sorted(name.replace("2.unreadable/", "2/", 1) for name in after) == before  # renamed whole, once
  assert not [name for name in after if name.startswith("2/")]


@pytest.mark.slow  # the same retry and agreement as above; a minute of the client's own retries
def test_a_bucket_that_stays_unreachable_for_one_host_stops_both_and_moves_nothing(dead_for_one):
  good, dead = dead_for_one
  directory = f"gs://{BUCKET}/dead/checkpoints"
  assert both("save", directory, (good, good))[0] == [{"saved": [[1, 2]]}] * 2
  before = objects(good, "dead/checkpoints/")
  _, logs = both("restore", directory, (good, dead), check=False)
  last = [log.strip().splitlines()[-1] for log in logs]
  assert last[1].startswith("sfd_jax.storage.BucketUnreachable: gs://sfd-test cannot be reached from this host ("
                            "HttpError: "), logs[1][-3000:]
  assert last[0] == (f"sfd_jax.storage.BucketUnreachable: process 1 cannot reach {directory} while restoring "
                     f"checkpoint 2 in {directory} (its own error line says why)"), logs[0][-3000:]
  assert objects(good, "dead/checkpoints/") == before  # nothing moved


@pytest.mark.parametrize("command, endpoint", [
    ("train", "closed"), ("train", "unresolvable"), ("sample", "closed"), ("evaluate", "closed")])
def test_an_unreachable_bucket_is_one_sentence(tmp_path, command, endpoint):
  url = f"http://127.0.0.1:{free_port()}" if endpoint == "closed" else "http://sfd-no-such-host.invalid:80"
  env = {**subprocess_env(), **gcs_emulator.client_env(url), "SFD_JAX_BUCKET_RETRY_S": "2"}
  where = f"gs://{BUCKET}/run"
  args = {"train": [f"--config={REPO / 'configs' / 'smoke.py'}", f"--workdir={where}"],
          "sample": [f"--model={tmp_path}", f"--vae={tmp_path}", f"--stats={tmp_path}", f"--out={where}"],
          "evaluate": [f"--samples={where}/samples.npz", f"--ref={tmp_path / 'ref.npz'}"]}[command]
  start = time.monotonic()
  result = subprocess.run([sys.executable, "-m", f"sfd_jax.cli.{command}", *args], env=env, capture_output=True,
                          text=True, timeout=120)
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert errors[0].startswith(f"error: gs://{BUCKET} cannot be reached") and "network, DNS" in errors[0]
  assert time.monotonic() - start < 60  # the budget (2 s) and the start-up, not the clients' minutes of retries


def test_each_client_failure_has_its_kind(tmp_path, monkeypatch):
  """The kinds of the errors the real clients raise (HTTP statuses as Cloud Storage documents them: 408, 429 and
  5xx are retried, 401 and 403 are credentials, 404 a missing object), some produced by the clients themselves."""
  import asyncio

  import aiohttp
  import requests
  import tensorstore as ts
  from gcsfs.retry import HttpError

  from sfd_jax import storage

  async def refused():
    async with aiohttp.ClientSession() as session:
      await session.get(f"http://127.0.0.1:{free_port()}/")
  with pytest.raises(aiohttp.ClientError) as connecting:
    asyncio.run(refused())
  for name, value in gcs_emulator.client_env(f"http://127.0.0.1:{free_port()}").items():  # no server there
    monkeypatch.setenv(name, value)
  retries = {"gcs_request_retries": {"max_retries": 1, "initial_delay": "1ms", "max_delay": "1ms"}}
  with pytest.raises(ValueError) as tensorstore_refused:  # tensorstore's error after its own retries
    ts.KvStore.open({"driver": "gcs", "bucket": BUCKET, "context": retries}).result().read("x").result()
  array = ts.open({"driver": "zarr", "kvstore": f"file://{tmp_path}/a", "metadata": {"compressor": None}},
                  create=True, dtype=ts.float32, shape=[64]).result()
  array.write(range(64)).result()
  (tmp_path / "a" / "0").write_bytes((tmp_path / "a" / "0").read_bytes()[:100])  # a chunk cut short
  with pytest.raises(ValueError) as truncated:
    ts.open({"driver": "zarr", "kvstore": f"file://{tmp_path}/a"}).result().read().result()
  try:
    raise Exception("Encountered error while reading array index") from truncated.value  # as orbax wraps it
  except Exception as e:
    wrapped = e
  cases = [(HttpError({"code": 503, "message": "Service Unavailable"}), storage.TRANSIENT),
           (HttpError({"code": 429, "message": "Too Many Requests"}), storage.TRANSIENT),
           (HttpError({"code": 500, "message": "Internal Error"}), storage.TRANSIENT),
           (requests.exceptions.ProxyError(), storage.TRANSIENT),  # gcsfs's 502
           (connecting.value, storage.TRANSIENT), (tensorstore_refused.value, storage.TRANSIENT),
           (ConnectionResetError(104, "reset"), storage.TRANSIENT), (TimeoutError(), storage.TRANSIENT),
           (HttpError({"code": 401, "message": "Invalid Credentials"}), storage.DENIED),
           (OSError("Forbidden: sfd-test/o\nno storage.objects.get access"), storage.DENIED),  # gcsfs's 403
           (FileNotFoundError("sfd-test/o"), storage.DAMAGED), (truncated.value, storage.DAMAGED),
           (wrapped, storage.DAMAGED), (EOFError(), storage.DAMAGED),
           (ValueError("Requested shape (3,) differs from (4,)"), None), (KeyError("params"), None)]
  assert [storage.failure_kind(error) for error, _ in cases] == [kind for _, kind in cases]


def test_retried_outlasts_a_short_outage_and_names_the_bucket_after_a_long_one(monkeypatch):
  from sfd_jax import storage
  monkeypatch.setattr(storage, "RETRY_S", 2.0)  # the budget that $SFD_JAX_BUCKET_RETRY_S sets
  calls = []

  def flaky(failures: int):
    calls.append(time.monotonic())
    if len(calls) <= failures:
      raise ConnectionResetError(104, "Connection reset by peer")
    return "read"
  assert storage.retried(lambda: flaky(2), "gs://b/run", "reading") == "read" and len(calls) == 3
  calls.clear()
  with pytest.raises(storage.BucketUnreachable, match=r"^gs://b cannot be reached from this host \("
                     r"ConnectionResetError: \[Errno 104\] Connection reset by peer, still failing after 2 s"):
    storage.retried(lambda: flaky(1000), "gs://b/run", "reading")
  assert 1.0 <= calls[-1] - calls[0] <= 2.0 and len(calls) < 10  # backoff within the budget, not a busy loop
  calls.clear()
  with pytest.raises(FileNotFoundError):  # damage is not retried: the caller decides
    storage.retried(lambda: flaky(0) and open("/nonexistent/sfd_jax"), "gs://b/run", "reading")
  assert len(calls) == 1
