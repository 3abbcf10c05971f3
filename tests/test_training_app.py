"""The training application end to end, through its command line in subprocesses: smoke run, kill and resume
(bit-exact), NaN stop, bad input, corrupt checkpoints, another mesh, and two processes."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from sfd_jax.training import checkpoint as ckpt_lib, config as config_lib, state as state_lib
from tests.golden import REPO, free_port, subprocess_env

SMOKE = str(REPO / "configs" / "smoke.py")
_env = subprocess_env


def _command(workdir, *overrides, extra=()):
  return [sys.executable, "-m", "sfd_jax.cli.train", f"--config={SMOKE}", f"--workdir={workdir}",
          *[f"--config.{o}" for o in overrides], *extra]


def train(workdir, *overrides, devices=1, check=True):
  result = subprocess.run(_command(workdir, *overrides), env=_env(devices), capture_output=True, text=True,
                          timeout=600)
  if check:
    assert result.returncode == 0, result.stderr[-3000:]
  return result


def final_state(workdir):
  """The TrainState of the newest checkpoint, as numpy."""
  cfg = ConfigDict(json.loads((Path(workdir) / "config.json").read_text()))
  model = config_lib.build_model(cfg.model)
  tx = state_lib.make_optimizer(cfg.optim)
  from sfd_jax import sharding as shd
  abstract, _ = state_lib.abstract_train_state(model, tx, shd.make_mesh(devices=jax.devices()[:1]), cfg.sharding)
  checkpointer = ckpt_lib.Checkpointer(Path(workdir) / "checkpoints")
  step = checkpointer.steps()[-1]
  state = jax.device_get(checkpointer.restore(step, abstract))
  checkpointer.close()
  return step, state


def losses(workdir):
  records = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return [(r["step"], r["loss"], r["loss_mse"], r["loss_cos"], r["loss_repa"], r["grad_norm"]) for r in records
          if "loss" in r]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("smoke")
  result = train(workdir)
  return workdir, result


def test_smoke_run_writes_checkpoints_metrics_and_samples(smoke_run):
  workdir, result = smoke_run
  assert "step 40/40" in result.stdout
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["20", "40"]
  logged = losses(workdir)
  assert [s for s, *_ in logged] == [10, 20, 30, 40] and all(np.isfinite(v) for row in logged for v in row)
  assert sorted(p.name for p in (workdir / "samples").iterdir()) == ["sample_latents_00000020.png",
                                                                    "sample_latents_00000040.png"]
  assert json.loads((workdir / "config.json").read_text())["batch_size"] == 16
  assert list((workdir / "tensorboard").iterdir())
  # The terminal shows stage and progress lines; the library's INFO logs (orbax, parameter table) go to a file.
  lines = (result.stdout + result.stderr).splitlines()
  assert len(lines) <= 15 and lines[1].startswith("new run in") and lines[-1].startswith("done: step 40"), lines
  log = (workdir / "logs" / "train.log").read_text()
  assert "Saving checkpoint at step 40" in log and "model parameters:" in log


def test_a_finished_run_says_so_and_a_torn_metrics_line_is_repaired(smoke_run, tmp_path):
  workdir = tmp_path / "run"
  subprocess.run(["cp", "-r", str(smoke_run[0]), str(workdir)], check=True)
  again = train(workdir)
  assert "already at total_steps=40 (checkpoint 40" in again.stdout, again.stdout
  with (workdir / "metrics.jsonl").open("a") as f:  # a crash in the middle of writing a line
    f.write('{"step": 50, "loss": 4.1, "loss_mse"')
  train(workdir, "total_steps=50", "log_every=5")
  assert [s for s, *_ in losses(workdir)] == [10, 20, 30, 40, 45, 50]


def test_kill_and_resume_is_bit_exact(tmp_path):
  overrides = ("total_steps=120", "log_every=1", "ckpt_every=1000", "sample_every=0")
  train(tmp_path / "straight", *overrides)
  killed = tmp_path / "killed"
  worker = subprocess.Popen(_command(killed, *overrides), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
  jsonl, deadline = killed / "metrics.jsonl", time.time() + 300
  while not (jsonl.exists() and len(jsonl.read_text().splitlines()) >= 15) and time.time() < deadline:
    time.sleep(0.05)
  worker.send_signal(signal.SIGTERM)
  _, err = worker.communicate(timeout=300)
  assert worker.returncode == 75 and "preempted: stopped at step" in err, err[-3000:]  # complete, resume me
  stopped_at, _ = final_state(killed)
  assert 15 <= stopped_at < 120, stopped_at
  train(killed, *overrides)
  (step_a, a), (step_b, b) = final_state(tmp_path / "straight"), final_state(killed)
  assert step_a == step_b == 120
  jax.tree.map(np.testing.assert_array_equal, a, b)  # params, EMA, optimiser state, rng: bit-identical
  assert losses(killed) == losses(tmp_path / "straight")


def test_non_finite_loss_stops_with_the_step_and_last_checkpoint(tmp_path):
  result = train(tmp_path, "optim.lr=1e30", "total_steps=30", "log_every=5", "ckpt_every=1", "sample_every=0",
                 check=False)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  message = [line for line in result.stderr.splitlines() if line.startswith("error:")][-1]
  assert message.startswith("error: non-finite loss or gradient at step 2") and "checkpoint 1 in" in message
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


@pytest.mark.parametrize("override, expected", [
    ("optim.lrr=1", "error: bad command line: 'lrr'"),
    ("data.source=latents", "error: config.data.path is empty"),
    ("mesh.data=3", "error: mesh: data 3 × fsdp 1 = 3 does not match the 1 devices"),
    ("data.path=s3://bucket/latents", "error: --config.data.path=s3://bucket/latents: sfd_jax reads and writes local"),
    ("model.attention=pallas", "error: model.attention='pallas' needs a TPU, and this device is a cpu"),
])
def test_bad_input_is_one_clear_message(tmp_path, override, expected):
  result = train(tmp_path, override, check=False)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
      line for line in result.stderr.splitlines() if line.startswith(expected)], result.stderr[-500:]


def test_corrupt_checkpoint_is_skipped_and_kept(smoke_run, tmp_path):
  workdir = tmp_path / "run"
  subprocess.run(["cp", "-r", str(smoke_run[0]), str(workdir)], check=True)
  for f in (workdir / "checkpoints" / "40" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  result = train(workdir, "total_steps=40")
  assert "checkpoint 40" in result.stderr and "cannot be restored" in result.stderr
  assert "resumed from step 20" in result.stdout
  assert (workdir / "checkpoints" / "40.unreadable").is_dir()
  assert final_state(workdir)[0] == 40


def test_resume_on_another_mesh(smoke_run, tmp_path):
  """A run saved on one device continues on 8 devices as data 4 × fsdp 2 (resharded on restore) with the losses of
  its continuation on one device, to float32 rounding (the gradients are summed in another order)."""
  moved, stayed = tmp_path / "moved", tmp_path / "stayed"
  for workdir in (moved, stayed):
    subprocess.run(["cp", "-r", str(smoke_run[0]), str(workdir)], check=True)
  result = train(moved, "total_steps=50", "log_every=1", "mesh.data=4", "mesh.fsdp=2", "sharding.min_size=64",
                 devices=8)
  assert "resumed from step 40" in result.stdout and "step 50/50" in result.stdout
  train(stayed, "total_steps=50", "log_every=1")
  assert [s for s, *_ in losses(moved)] == [10, 20, 30, 40, *range(41, 51)]
  np.testing.assert_allclose([row[1:] for row in losses(moved)], [row[1:] for row in losses(stayed)], rtol=2e-5)


def test_two_processes_match_one(tmp_path):
  overrides = ("total_steps=6", "log_every=3", "ckpt_every=6", "sample_every=0")
  train(tmp_path / "one", *overrides, devices=2)
  port = free_port()
  workers = [subprocess.Popen(_command(tmp_path / "two", *overrides, extra=(
      f"--coordinator=localhost:{port}", "--num_processes=2", f"--process_id={i}")), env=_env(1),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  for worker in workers:
    _, err = worker.communicate(timeout=600)
    assert worker.returncode == 0, err[-3000:]
  (_, one), (_, two) = final_state(tmp_path / "one"), final_state(tmp_path / "two")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), one.params, two.params)
  np.testing.assert_allclose([row[1:] for row in losses(tmp_path / "one")],
                             [row[1:] for row in losses(tmp_path / "two")], rtol=1e-5)


def _stopped_after_first_line(command, env=None):
  """Runs a command line and sends it SIGTERM once it has printed its first line, while it is still starting up
  (restoring, compiling); returns (exit status, stdout, stderr)."""
  worker = subprocess.Popen(command, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  first = worker.stdout.readline()
  worker.send_signal(signal.SIGTERM)
  out, err = worker.communicate(timeout=300)
  return worker.returncode, first + out, err


def _preempted(returncode, err):
  """A preemption, as the supervisor reads it: exit 75, the preempted line last, no traceback."""
  return (returncode == 75 and "Traceback" not in err
          and err.strip().splitlines()[-1] == "preempted: stopped by SIGTERM: run the same command again to resume")


def test_sigterm_during_start_up_is_a_preemption(tmp_path):
  code, out, err = _stopped_after_first_line(_command(tmp_path))
  assert out.startswith("devices: ") and "step " not in out, out
  assert _preempted(code, err), (code, err[-3000:])
  assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_sigterm_during_restore_is_a_preemption_and_damages_nothing(smoke_run, tmp_path):
  workdir = tmp_path / "run"
  subprocess.run(["cp", "-r", str(smoke_run[0]), str(workdir)], check=True)
  before = {p.relative_to(workdir): p.read_bytes() for p in (workdir / "checkpoints").rglob("*") if p.is_file()}
  metrics = (workdir / "metrics.jsonl").read_bytes()
  code, out, err = _stopped_after_first_line(_command(workdir, "total_steps=50"))
  assert "step " not in out and _preempted(code, err), (code, out, err[-3000:])
  after = {p.relative_to(workdir): p.read_bytes() for p in (workdir / "checkpoints").rglob("*") if p.is_file()}
  assert after == before and (workdir / "metrics.jsonl").read_bytes() == metrics
  assert final_state(workdir)[0] == 40


def test_sigterm_while_sample_and_demo_start_is_a_preemption(smoke_run, tmp_path):
  from sfd_jax.convert import export
  from sfd_jax.models.texture_vae import AutoencoderKL
  vae = AutoencoderKL(ch=32, ch_mult=(1,), num_res_blocks=0, attn_resolutions=(), resolution=4, z_channels=32,
                      embed_dim=32)
  export.save_model(tmp_path / "vae", vae, vae.init(jax.random.key(0), *vae.dummy_inputs()))
  (tmp_path / "stats.json").write_text(json.dumps({"texture": {"mean": [0.0] * 32, "std": [1.0] * 32}}))
  code, out, err = _stopped_after_first_line([
      sys.executable, "-m", "sfd_jax.cli.sample", f"--model={smoke_run[0]}", f"--vae={tmp_path / 'vae'}",
      f"--stats={tmp_path / 'stats.json'}", f"--out={tmp_path / 'samples'}", "--num_images=4", "--batch_size=2",
      "--method=euler", "--num_steps=3"])
  assert out.startswith("model: EMA weights of step 40") and _preempted(code, err), (code, out, err[-3000:])
  code, out, err = _stopped_after_first_line([sys.executable, "-m", "sfd_jax.cli.demo", "--quick",
                                              f"--out={tmp_path / 'demo'}"])
  assert _preempted(code, err), (code, out, err[-3000:])
