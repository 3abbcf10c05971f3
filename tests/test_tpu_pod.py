"""launch/tpu_pod.sh's decisions, offline: a fake `gcloud` on PATH plays a scripted slice and run.

The fake keeps the slice's state (the queued resource's and the TPU VM's) between calls, answers as gcloud does
(`value(...)` formats, NOT_FOUND errors, ssh failing once the VM is gone), records every call, and plays, for each
start of the run, a scenario: how many status polls it stays running, then the workers' exit codes, or the slice
being preempted or suspended under it. Each test asserts the supervisor's calls, as "verb→answer" steps, and its
exit code. launch/pod_worker.sh, which the supervisor drives on the workers, runs for real in the last test;
the command lines are checked against the real gcloud's parser where one is installed.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_cluster import metadata_server

REPO = Path(__file__).resolve().parents[1]

FAKE_GCLOUD = r'''
import json, os, shutil, sys
from pathlib import Path

here = Path(os.environ["FAKE_GCLOUD_DIR"])
scenario = json.loads((here / "scenario.json").read_text())
world_file = here / "world.json"
world = json.loads(world_file.read_text()) if world_file.exists() else {
    "queued": scenario.get("existing"), "pending": [], "tpu": "READY" if scenario.get("existing") else None,
    "creates": 0, "run": -1, "polls": 0}
argv = sys.argv[1:]
with open(here / "calls.jsonl", "a") as f:
  f.write(json.dumps(argv) + "\n")


def answer(step, out="", err="", code=0):
  with open(here / "steps.txt", "a") as f:
    f.write(step + "\n")
  world_file.write_text(json.dumps(world))
  sys.stdout.write(out)
  sys.stderr.write(err)
  sys.exit(code)


def flag(name):
  return next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")), None)


NOT_FOUND = "ERROR: (gcloud) NOT_FOUND: Resource 'projects/p/locations/z/{}' was not found\n"
command = " ".join(a for a in argv[:4] if not a.startswith("-"))
if command.startswith("compute tpus queued-resources describe"):
  if world["queued"] is None:
    answer("describe→MISSING", err=NOT_FOUND.format("queuedResources/" + argv[4]), code=1)
  if flag("format") == "value(state.failedData.error.message)":
    answer("describe failure", out=scenario["failure"] + "\n")
  state = world["queued"]
  if world["pending"]:
    world["queued"] = world["pending"].pop(0)
  if world["queued"] == "ACTIVE" and world["tpu"] is None:
    world["tpu"] = "READY"
  answer(f"describe→{state}", out=state + "\n")
if command.startswith("compute tpus queued-resources create"):
  world["creates"] += 1
  if "refusal" in scenario:
    answer("create→refused", err=scenario["refusal"], code=1)
  if world["creates"] <= scenario.get("stock_outs", 0):
    answer("create→stock-out", err="ERROR: (gcloud.compute.tpus.queued-resources.create) RESOURCE_EXHAUSTED: "
           "There is no more capacity in the zone\n", code=1)
  states = scenario.get("queue", ["WAITING_FOR_RESOURCES", "PROVISIONING"]) + [scenario.get("then", "ACTIVE")]
  world["queued"], world["pending"] = states[0], states[1:]
  answer("create")
if command.startswith("compute tpus queued-resources delete"):
  if world["queued"] is None:
    answer("delete→MISSING", err=NOT_FOUND.format("queuedResources/" + argv[4]), code=1)
  world.update(queued=None, pending=[], tpu=None)
  answer("delete")
if command.startswith("compute tpus tpu-vm describe"):
  if world["tpu"] is None:
    answer("vm→MISSING", err=NOT_FOUND.format("nodes/" + argv[4]), code=1)
  answer(f"vm→{world['tpu']}", out=world["tpu"] + "\n")
if command.startswith("compute tpus tpu-vm"):
  if world["tpu"] != "READY":
    answer(argv[3] + "→unreachable", err="ssh: connect to host 10.130.0.5 port 22: Connection refused\n", code=255)
  if argv[3] == "scp":
    shutil.copy(argv[4], here / "archive.tar.gz")
    answer("scp")
  remote = flag("command")
  for verb in ("setup_venv.sh", "gcsfuse", "pod_worker.sh start", "pod_worker.sh tail"):
    if verb in remote:
      if verb == "pod_worker.sh start":
        world["run"] += 1
        world["polls"] = 0
      step = verb.split()[-1].replace("setup_venv.sh", "install")
      answer(step, out=f"Traceback (most recent call last):\nRuntimeError: run {world['run']} failed\n"
             if step == "tail" else "")
  if "pod_worker.sh status" in remote:
    run = scenario["runs"][world["run"]]
    if world["polls"] < run.get("polls", 0):
      world["polls"] += 1
      codes = ["running"] * scenario.get("workers", 2)
    elif "event" in run:
      if run["event"] == "preempted":
        world["tpu"] = "PREEMPTED"
      else:
        world.update(queued="SUSPENDING", pending=["SUSPENDED"], tpu=None)
      answer("status→unreachable", err="ssh: connect to host 10.130.0.5 port 22: Connection timed out\n", code=255)
    else:
      codes = [str(c) for c in run["codes"]]
    answer("status→" + ",".join(codes), out="".join(f"sfd-worker {i} {c}\n" for i, c in enumerate(codes)))
if command.startswith("storage cat"):
  answer("storage cat", out="(the log from the bucket)\n")
answer("unexpected call", err="fake gcloud: unexpected call\n", code=64)
'''


@pytest.fixture
def checkout(tmp_path):
  """A git checkout holding the launch scripts (and an untracked and an ignored file): what the supervisor
  archives for the workers."""
  repo = tmp_path / "repo"
  (repo / "launch").mkdir(parents=True)
  for name in ("tpu_pod.sh", "pod_worker.sh"):
    shutil.copy(REPO / "launch" / name, repo / "launch" / name)
  (repo / ".gitignore").write_text("runs/\n")
  (repo / "setup.py").write_text("# tracked\n")
  subprocess.run(["git", "init", "-q", str(repo)], check=True)
  subprocess.run(["git", "-C", str(repo), "add", "."], check=True)
  (repo / "notes.py").write_text("# untracked, copied\n")
  (repo / "runs").mkdir()
  (repo / "runs" / "big.bin").write_text("ignored, not copied\n")
  return repo


def supervise(checkout, tmp_path, scenario, **variables):
  """Runs the supervisor against the fake gcloud playing `scenario`; returns (exit code, output, steps, calls)."""
  fake = tmp_path / "fake"
  (fake / "bin").mkdir(parents=True)
  (fake / "bin" / "gcloud").write_text(f"#!{sys.executable}\n{FAKE_GCLOUD}")
  (fake / "bin" / "gcloud").chmod(0o755)
  (fake / "scenario.json").write_text(json.dumps(scenario))
  env = {"PATH": f"{fake / 'bin'}:{os.environ['PATH']}", "HOME": str(tmp_path), "FAKE_GCLOUD_DIR": str(fake),
         "PROJECT": "proj", "ZONE": "us-east5-a", "TPU": "sfd-xl", "TYPE": "v5litepod-16",
         "WORKDIR": "gs://bucket/sfd_xl", "DATA": "/gcs/bucket/latents",
         "EXTRA": "--config.mesh.data=-1 --config.mesh.fsdp=4",
         "POLL_SECONDS": "0", "BACKOFF_SECONDS": "0", **variables}
  result = subprocess.run(["bash", str(checkout / "launch" / "tpu_pod.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
  steps = (fake / "steps.txt").read_text().splitlines() if (fake / "steps.txt").exists() else []
  calls = [json.loads(line) for line in (fake / "calls.jsonl").read_text().splitlines()] if steps else []
  return result.returncode, result.stdout + result.stderr, steps, calls


QUEUE = ["describe→MISSING", "create", "describe→WAITING_FOR_RESOURCES", "describe→PROVISIONING",
         "describe→ACTIVE", "vm→READY", "scp", "install"]
FINISHED = ["start", "status→running,running", "status→0,0", "delete"]


def test_stock_out_then_a_finished_run(checkout, tmp_path):
  """Two stock-outs at create time are waited out; the run finishes on the third slice request; the slice is
  deleted and the supervisor exits 0."""
  code, output, steps, calls = supervise(checkout, tmp_path, {"stock_outs": 2, "runs": [{"polls": 1,
                                                                                        "codes": [0, 0]}]})
  assert code == 0, output
  assert steps == ["describe→MISSING", "create→stock-out", "describe→MISSING", "create→stock-out", *QUEUE,
                   *FINISHED]
  assert ("(attempt 1 of 30, stock-out: ERROR: (gcloud.compute.tpus.queued-resources.create) RESOURCE_EXHAUSTED: "
          "There is no more capacity in the zone): again in 0 s") in output and "training finished" in output
  create = calls[1]
  assert create == ["compute", "tpus", "queued-resources", "create", "sfd-xl", "--node-id=sfd-xl",
                    "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite", "--spot",
                    "--project=proj", "--zone=us-east5-a", "--quiet"]
  ssh_start = next(c for c in calls if "pod_worker.sh start" in " ".join(c))
  assert ssh_start[:5] == ["compute", "tpus", "tpu-vm", "ssh", "sfd-xl"] and "--worker=all" in ssh_start
  command = next(a for a in ssh_start if a.startswith("--command=")).split()
  assert command[:4] == ["--command=cd", "~/sfd_jax", "&&", "launch/pod_worker.sh"]
  assert command[4] == "start" and command[5].startswith("gs://bucket/sfd_xl/logs/2")
  assert command[6:] == [".venv/bin/python", "-m", "sfd_jax.cli.train", "--config=configs/sfd_xl.py",
                         "--workdir=gs://bucket/sfd_xl", "--config.data.path=/gcs/bucket/latents",
                         "--config.mesh.data=-1", "--config.mesh.fsdp=4"]
  install = next(a for c in calls for a in c if "setup_venv.sh" in a)
  assert "tar -xzf ~/sfd_jax.tar.gz -C ~/sfd_jax" in install and "launch/setup_venv.sh ~/sfd_jax/.venv tpu" in install
  assert calls[-1] == ["compute", "tpus", "queued-resources", "delete", "sfd-xl", "--force", "--project=proj",
                       "--zone=us-east5-a", "--quiet"]
  archived = subprocess.run(["tar", "-tzf", str(tmp_path / "fake" / "archive.tar.gz")], capture_output=True,
                            text=True, check=True).stdout.split()
  assert sorted(archived) == [".gitignore", "launch/pod_worker.sh", "launch/tpu_pod.sh", "notes.py", "setup.py"]


def start_commands(calls):
  """The training command of each start, without the launch's log folder (a UTC time)."""
  starts = [next(a for a in c if a.startswith("--command=")).split() for c in calls if "pod_worker.sh start" in str(c)]
  return [command[:5] + command[6:] for command in starts]


def test_preempted_mid_run(checkout, tmp_path):
  """The TPU is PREEMPTED during the run: the queued resource is deleted and queued again, sfd_jax installed on
  the new slice and the same command started again."""
  code, output, steps, calls = supervise(checkout, tmp_path, {"runs": [{"polls": 1, "event": "preempted"},
                                                                       {"codes": [0, 0]}]})
  assert code == 0, output
  assert steps == [*QUEUE, "start", "status→running,running", "status→unreachable", "describe→ACTIVE",
                   "vm→PREEMPTED", "describe→ACTIVE", "vm→PREEMPTED", "delete", *QUEUE, "start", "status→0,0",
                   "delete"]
  first, second = start_commands(calls)
  assert first == second
  assert "sfd-xl was preempted: queueing it again" in output


def test_suspended_mid_run(checkout, tmp_path):
  """The queued resource goes SUSPENDING, then SUSPENDED: waited for, deleted, queued again, resumed."""
  code, output, steps, calls = supervise(checkout, tmp_path, {"runs": [{"polls": 2, "event": "suspended"},
                                                                       {"polls": 1, "codes": [0, 0]}]})
  assert code == 0, output
  assert steps == [*QUEUE, "start", "status→running,running", "status→running,running", "status→unreachable",
                   "describe→SUSPENDING", "describe→SUSPENDED", "delete", *QUEUE, *FINISHED]
  first, second = start_commands(calls)
  assert first == second


def test_exit_75_resumes_on_the_same_slice(checkout, tmp_path):
  """A preemption notice or SIGTERM made every worker save and exit 75, and the slice is still there: the same
  command again on it, without reinstalling."""
  code, output, steps, calls = supervise(checkout, tmp_path, {"runs": [{"polls": 1, "codes": [75, 75]},
                                                                       {"polls": 1, "codes": [0, 0]}]})
  assert code == 0, output
  assert steps == [*QUEUE, "start", "status→running,running", "status→75,75", "describe→ACTIVE", "vm→READY",
                   *FINISHED]
  first, second = start_commands(calls)
  assert first == second
  assert "preempted (exit 75)" in output


def test_user_error_stops_with_the_log_tail(checkout, tmp_path):
  """Exit 2 will not get better by itself: the log's tail is printed, the slice deleted (an idle slice costs as
  much as a busy one, the log stays in the bucket), and the supervisor exits 2."""
  code, output, steps, calls = supervise(checkout, tmp_path, {"runs": [{"polls": 1, "codes": [2, 2]}]})
  assert code == 2, output
  assert steps == [*QUEUE, "start", "status→running,running", "status→2,2", "tail", "delete"]
  assert "user error (exit 2)" in output and "RuntimeError: run 0 failed" in output
  tail = next(c for c in calls if "pod_worker.sh tail" in str(c))
  assert "--worker=0" in tail and "--command=sfd_jax/launch/pod_worker.sh tail 40" in tail


def test_a_bug_is_retried_a_bounded_number_of_times(checkout, tmp_path):
  """Any other exit code is a bug: its log tail each time, BUG_RETRIES restarts, then the slice deleted, exit 1."""
  code, output, steps, calls = supervise(checkout, tmp_path, {"runs": [{"codes": [1, 1]}, {"codes": [139, 139]}]},
                                         BUG_RETRIES="1")
  assert code == 1, output
  assert steps == [*QUEUE, "start", "status→1,1", "tail", "describe→ACTIVE", "vm→READY", "start",
                   "status→139,139", "tail", "delete"]
  assert "exit code 1: a bug (failure 1" in output and "exit code 139: a bug (failure 2" in output
  assert "RuntimeError: run 1 failed" in output


@pytest.mark.parametrize("codes, reported", [([75, 1], "0:75 1:1"), ([75, "running"], "0:75 1:running")])
def test_worker_0_decides_and_a_difference_is_reported(checkout, tmp_path, codes, reported):
  """Worker 0 says 75, worker 1 something else (or it is still running once STRAGGLER_SECONDS have passed since
  worker 0 ended): resumed as preempted, the difference printed."""
  code, output, steps, calls = supervise(checkout, tmp_path, {"runs": [{"codes": codes}, {"codes": [0, 0]}]},
                                         STRAGGLER_SECONDS="0")
  assert code == 0, output
  assert steps == [*QUEUE, "start", f"status→{codes[0]},{codes[1]}", "describe→ACTIVE", "vm→READY", "start",
                   "status→0,0", "delete"]
  assert f"the workers ended differently (worker:code {reported}); worker 0's code 75 decides" in output


def test_a_failed_queued_resource_is_left_alone(checkout, tmp_path):
  """FAILED is no state to delete and retry blindly: its message, and the supervisor stops (exit 1)."""
  code, output, steps, calls = supervise(checkout, tmp_path, {"queue": ["WAITING_FOR_RESOURCES"], "then": "FAILED",
                                                              "failure": "Invalid runtime version", "runs": []})
  assert code == 1, output
  assert steps == ["describe→MISSING", "create", "describe→WAITING_FOR_RESOURCES", "describe→FAILED",
                   "describe failure"]
  assert "sfd-xl FAILED: Invalid runtime version" in output


def test_create_attempts_are_bounded(checkout, tmp_path):
  code, output, steps, calls = supervise(checkout, tmp_path, {"stock_outs": 5, "runs": []}, CREATE_ATTEMPTS="3")
  assert code == 1, output
  assert steps == ["describe→MISSING", "create→stock-out"] * 3
  assert "could not create sfd-xl 3 times: giving up" in output


@pytest.mark.parametrize("accelerator, runtime", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-64", "v2-alpha-tpuv5-lite"), ("v5p-128", "v2-alpha-tpuv5"),
    ("v6e-16", "v2-alpha-tpuv6e")])
def test_the_runtime_follows_the_type(checkout, tmp_path, accelerator, runtime):
  """Each TPU generation gets the software version Cloud TPU's software-versions page gives for it."""
  code, output, steps, calls = supervise(checkout, tmp_path, {"runs": [{"codes": [0, 0]}]}, TYPE=accelerator)
  assert code == 0, output
  assert calls[1][6:8] == [f"--accelerator-type={accelerator}", f"--runtime-version={runtime}"], calls[1]


def test_an_unknown_type_needs_a_runtime(checkout, tmp_path):
  code, output, steps, _ = supervise(checkout, tmp_path, {"runs": []}, TYPE="v9z-8")
  assert code == 2 and steps == [] and "error: no TPU software version known for TYPE=v9z-8: set RUNTIME" in output
  code, output, steps, calls = supervise(checkout, tmp_path / "given", {"runs": [{"codes": [0, 0]}]}, TYPE="v9z-8",
                                         RUNTIME="v2-alpha-tpu9")
  assert code == 0 and calls[1][7] == "--runtime-version=v2-alpha-tpu9", output


@pytest.mark.parametrize("refusal", [
    "ERROR: (gcloud.compute.tpus.queued-resources.create) PERMISSION_DENIED: Permission 'tpu.queuedResources.create'"
    " denied on 'projects/proj/locations/us-east5-a/queuedResources/sfd-xl'",
    "ERROR: (gcloud.compute.tpus.queued-resources.create) RESOURCE_EXHAUSTED: Quota limit "
    "'TPUV5sLitepodPerProjectPerZoneForTPUAPI' has been exceeded. Limit: 16 in zone us-east5-a.",
    "ERROR: (gcloud.compute.tpus.queued-resources.create) INVALID_ARGUMENT: Accelerator type v5litepod-16 is not "
    "available in zone us-west1-c"])
def test_a_refused_create_stops_at_once(checkout, tmp_path, refusal):
  """Permission, quota and invalid arguments do not change by waiting: one try, gcloud's message, exit 2."""
  code, output, steps, _ = supervise(checkout, tmp_path, {"refusal": refusal + "\n", "runs": []})
  assert code == 2, output
  assert steps == ["describe→MISSING", "create→refused"]
  assert f"gcloud refused to create sfd-xl, which waiting will not change: {refusal}" in output


def test_a_bucket_dataset_path_is_refused_before_queueing(checkout, tmp_path):
  """The trainer reads latents from a filesystem path: DATA=gs://... is told at once, not after the slice came."""
  code, output, steps, _ = supervise(checkout, tmp_path, {"runs": []}, DATA="gs://bucket/latents")
  assert code == 2 and steps == []
  assert "error: DATA=gs://bucket/latents: the trainer reads the latent dataset from a filesystem path" in output


def test_missing_variables(checkout, tmp_path):
  code, output, steps, calls = supervise(checkout, tmp_path, {"runs": []}, TPU="", WORKDIR="")
  assert code == 2 and steps == []
  assert "error: set TPU WORKDIR" in output and "Required: PROJECT, ZONE, TPU" in output


REAL_GCLOUD = shutil.which("gcloud")


@pytest.mark.skipif(REAL_GCLOUD is None, reason="no gcloud installed")
def test_the_real_gcloud_accepts_every_command_line(checkout, tmp_path):
  """Each kind of call the supervisor makes, given to the real gcloud without credentials: it must get past
  argument parsing to asking for an account."""
  _, output, _, calls = supervise(checkout, tmp_path, {"runs": [{"codes": [1, 1]}]}, BUG_RETRIES="0")
  kinds = {tuple(call[:4]): call for call in calls}
  assert len(kinds) == 6, kinds.keys()
  env = {**os.environ, "CLOUDSDK_CONFIG": str(tmp_path / "gcloud_config"), "CLOUDSDK_CORE_DISABLE_PROMPTS": "1"}
  for argv in kinds.values():
    result = subprocess.run([REAL_GCLOUD, *argv], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "do not currently have an active account" in result.stderr, (argv, result.stderr)


def wait_for(condition, timeout=30):
  deadline = time.time() + timeout
  while not condition():
    assert time.time() < deadline, "timed out"
    time.sleep(0.05)


JOB = """
import signal, sys, time
def preempted(*_):
  print("SIGTERM: saving the checkpoint", flush=True)
  time.sleep(0.5)
  print("saved", flush=True)
  sys.exit(75)
signal.signal(signal.SIGTERM, preempted)
print("step 1", flush=True)
time.sleep(float(sys.argv[1]))
print("done", flush=True)
sys.exit(int(sys.argv[2]))
"""


def test_pod_worker(tmp_path):
  """The worker side for real: the run is detached in its own session, its log copied to the bucket folder while
  it runs and when it ends, and its exit code recorded; on SIGTERM the run's own code (75) is recorded; a new start
  clears the previous code. The worker index comes from the (stand-in) metadata server."""
  (tmp_path / "bin").mkdir()
  (tmp_path / "bin" / "gcloud").write_text(  # `gcloud storage cp --quiet SRC DST` into a local "bucket"
      '#!/bin/bash\n[[ "$1 $2 $3" == "storage cp --quiet" ]] && exec cp "$4" "$5"\n')
  (tmp_path / "bin" / "gcloud").chmod(0o755)
  (tmp_path / "job.py").write_text(JOB)
  bucket, run_dir = tmp_path / "bucket", tmp_path / "run"
  bucket.mkdir()
  worker = [str(REPO / "launch" / "pod_worker.sh")]
  with metadata_server({"agent-worker-number": "3"}) as metadata:
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "RUN_DIR": str(run_dir),
           "LOG_COPY_SECONDS": "0.2", "STOP_SECONDS": "10", "GCE_METADATA_IP": metadata}

    def pod_worker(*args):
      return subprocess.run(worker + list(args), env=env, capture_output=True, text=True, timeout=30).stdout

    try:
      began = time.time()
      pod_worker("start", str(bucket), sys.executable, str(tmp_path / "job.py"), "60", "0")
      assert time.time() - began < 5
      assert pod_worker("status") == "sfd-worker 3 running\n"
      group = int((run_dir / "pid").read_text())
      assert os.getsid(group) == group != os.getsid(0)  # its own session: no ssh hang-up reaches it
      wait_for(lambda: "step 1" in (bucket / "worker-3.log").read_text() if (bucket / "worker-3.log").exists()
               else False)
      pod_worker("stop")
      assert pod_worker("status") == "sfd-worker 3 75\n"
      assert pod_worker("tail", "2") == "SIGTERM: saving the checkpoint\nsaved\n"
      assert (bucket / "worker-3.log").read_text() == "step 1\nSIGTERM: saving the checkpoint\nsaved\n"

      pod_worker("start", str(bucket), sys.executable, str(tmp_path / "job.py"), "0", "2")
      assert pod_worker("status") in ("sfd-worker 3 running\n", "sfd-worker 3 2\n")
      wait_for(lambda: pod_worker("status") == "sfd-worker 3 2\n")
      assert (bucket / "worker-3.log").read_text() == "step 1\ndone\n"
    finally:
      if (run_dir / "pid").exists():
        try:
          os.killpg(int((run_dir / "pid").read_text()), signal.SIGKILL)
        except ProcessLookupError:
          pass
