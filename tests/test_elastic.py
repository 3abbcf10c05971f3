"""A slice that changes size and checkpoints that do not fit, through the training command line in subprocesses:
a run checkpointed by 4 processes continues on 2 and then on 1 (each with fake CPU devices) and matches the
uninterrupted run; SIGTERM on one host stops every host at the same step (exit 75); a SIGTERM during the last save
still leaves it complete; a config that changes the state tree is one sentence and moves nothing, and
`init_from` starts a new run from the old weights."""
import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.golden import REPO, free_port, subprocess_env
from tests.test_training_app import final_state

pytestmark = pytest.mark.slow  # several multi-process trainings (minutes): the full suite's tier only

SMOKE = str(REPO / "configs" / "smoke.py")
STEPS = ("log_every=1", "ckpt_every=1000", "sample_every=0")


def command(workdir, *overrides, process=None):
  extra = [] if process is None else [f"--coordinator=localhost:{process[2]}", f"--num_processes={process[1]}",
                                      f"--process_id={process[0]}"]
  return [sys.executable, "-m", "sfd_jax.cli.train", f"--config={SMOKE}", f"--workdir={workdir}",
          *[f"--config.{o}" for o in overrides], *extra]


def run_processes(workdir, processes: int, devices: int, *overrides):
  """The same command as `processes` jax.distributed processes of `devices` CPU devices each."""
  port = free_port()
  workers = [subprocess.Popen(command(workdir, *overrides, process=(i, processes, port)),
                              env=subprocess_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(processes)]
  outputs = [w.communicate(timeout=900) for w in workers]
  for worker, (_, err) in zip(workers, outputs):
    assert worker.returncode == 0, err[-3000:]
  return outputs[0][0]


def losses(workdir):
  lines = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return {record["step"]: (record["loss"], record["grad_norm"]) for record in lines if "loss" in record}


def digest(path: Path) -> dict:
  return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))
          if p.is_file()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The uninterrupted run: one process with the four devices the slices below have in total."""
  workdir = tmp_path_factory.mktemp("straight")
  result = subprocess.run(command(workdir, "total_steps=9", *STEPS), env=subprocess_env(4), capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_four_processes_then_two_then_one_continue_the_same_run(straight, tmp_path):
  run_processes(tmp_path, 4, 1, "total_steps=3", *STEPS)
  out = run_processes(tmp_path, 2, 2, "total_steps=6", *STEPS)
  assert "resumed from step 3" in out, out
  out = subprocess.run(command(tmp_path, "total_steps=9", *STEPS), env=subprocess_env(4), capture_output=True,
                       text=True, timeout=900)
  assert out.returncode == 0 and "resumed from step 6" in out.stdout, out.stderr[-3000:]
  elastic, reference = losses(tmp_path), losses(straight)
  assert sorted(elastic) == list(range(1, 10))  # every step once: same step, same data position on resume
  np.testing.assert_allclose([elastic[s] for s in range(1, 10)], [reference[s] for s in range(1, 10)], rtol=2e-5)


def test_sigterm_on_one_host_stops_every_host_at_the_same_step(tmp_path):
  port = free_port()
  workers = [subprocess.Popen(command(tmp_path, "total_steps=400", *STEPS, process=(i, 2, port)),
                              env=subprocess_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
  for line in workers[0].stdout:  # process 0 prints the progress lines
    if line.startswith("step 5/"):
      workers[1].send_signal(signal.SIGTERM)  # one host's preemption notice
      break
  outputs = [w.communicate(timeout=600) for w in workers]
  for worker, (_, err) in zip(workers, outputs):
    assert worker.returncode == 75, err[-3000:]
  steps = {int(err.split("preempted: stopped at step ")[1].split()[0]) for _, err in outputs}
  assert len(steps) == 1, steps  # the same step on both hosts
  assert final_state(tmp_path)[0] == steps.pop()  # and its checkpoint is complete


def test_sigterm_during_the_last_save_leaves_it_complete(tmp_path):
  worker = subprocess.Popen(command(tmp_path, "total_steps=30", *STEPS), env=subprocess_env(1),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  err_lines = []  # read all along: a full pipe would block the worker's writes and hang both
  reader = threading.Thread(target=lambda: err_lines.extend(worker.stderr), daemon=True)
  reader.start()
  for line in worker.stdout:
    if line.startswith("step 30/30"):  # the last step is done; its checkpoint is being written
      break
  threading.Thread(target=worker.stdout.read, daemon=True).start()
  deadline = time.monotonic() + 300
  while worker.poll() is None and time.monotonic() < deadline:  # signal after signal until the process is gone
    worker.send_signal(signal.SIGTERM)
    time.sleep(0.02)
  worker.wait(timeout=30)
  reader.join(timeout=30)
  err = "".join(err_lines)
  assert worker.returncode == 75 and "preempted" in err, err[-3000:]
  assert final_state(tmp_path)[0] == 30
  again = subprocess.run(command(tmp_path, "total_steps=30", *STEPS), env=subprocess_env(1), capture_output=True,
                         text=True, timeout=300)
  assert again.returncode == 0 and "already at total_steps=30" in again.stdout, again.stderr[-2000:]


@pytest.mark.parametrize("override, differs", [("optim.max_grad_norm=1.0", "opt_state"),
                                               ("model.hidden_size=32", "params")])
def test_a_config_that_changes_the_state_tree_is_one_sentence(straight, tmp_path, override, differs):
  workdir = tmp_path / "run"
  subprocess.run(["cp", "-r", str(straight), str(workdir)], check=True)
  before = digest(workdir / "checkpoints")
  result = subprocess.run(command(workdir, "total_steps=12", *STEPS, override), env=subprocess_env(4),
                          capture_output=True, text=True, timeout=300)
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert result.returncode == 2 and "Traceback" not in result.stderr and len(errors) == 1, result.stderr[-2000:]
  assert "checkpoint 9" in errors[0] and "does not fit this run's config" in errors[0] and differs in errors[0]
  assert f"--config.init_from={workdir}" in errors[0]
  assert digest(workdir / "checkpoints") == before and not list((workdir / "checkpoints").glob("*.unreadable"))


def test_init_from_takes_the_weights_and_starts_afresh(straight, tmp_path):
  result = subprocess.run(command(tmp_path, "total_steps=1", *STEPS, f"init_from={straight}",
                                  "optim.max_grad_norm=1.0", "optim.lr=0.0"), env=subprocess_env(1),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and f"params and EMA from {straight}" in result.stdout, result.stderr[-2000:]
  (_, old), (step, new) = final_state(straight), final_state(tmp_path)
  assert step == 1 and int(new.step) == 1  # a new run: step 0 + one step
  jax.tree.map(np.testing.assert_array_equal, new.params, old.params)  # lr 0: the old weights, unchanged
