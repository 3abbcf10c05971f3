"""The built-in demo end to end (`--quick`, as CI runs it): every stage runs, writes its files, both runs are
evaluated during training (the convergence table and picture), and their samples are recognisable digits more
often than chance."""
import json
import math
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from sfd_jax.data import latents


def test_quick_demo_runs_every_stage(tmp_path):
  # Normal XLA optimisation here (unlike the other tests): the demo's cost is training, not compiling.
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-m", "sfd_jax.cli.demo", "--quick", f"--out={tmp_path}"], env=env,
                          capture_output=True, text=True, timeout=1200)
  assert result.returncode == 0, result.stderr[-3000:]
  for name in ("texture_vae", "dino", "semvae"):
    assert (tmp_path / name / "model.json").exists(), name
  assert latents.LatentSource(tmp_path / "latents").meta["num_records"] == 1500
  results = json.loads((tmp_path / "results.json").read_text())
  assert "| sfd | 0.3 |" in result.stdout and "| sync | 0.0 |" in result.stdout
  assert results["classifier_heldout_accuracy"] > 0.3
  for name, run in results["runs"].items():
    assert all(math.isfinite(run[k]) for k in ("class_accuracy", "fd_classifier_features")), name
    assert run["class_accuracy"] >= 0.2, (name, run)  # chance is 0.1; 50 samples
    assert 0 < run["model_calls_per_sample"] < 200
    grid = np.asarray(Image.open(tmp_path / f"grid_{name}.png"))
    assert grid.shape[1] == 10 * 64 and grid.std() > 10
    # Evaluated every 125 steps and at the end (350), unguided and guided, each step once; the last guided
    # evaluation is the final row.
    steps = [row["step"] for row in run["evaluations"]]
    assert steps == [125, 250, 350], steps
    for row in run["evaluations"]:
      for scale in ("unguided", "CFG 2"):
        assert math.isfinite(row[scale]["fd"]) and 0 <= row[scale]["class_accuracy"] <= 1, (name, row)
    assert run["evaluations"][-1]["CFG 2"]["class_accuracy"] == run["class_accuracy"]
    logged = [json.loads(line)["step"] for line in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
              if "eval/seconds" in line]
    assert logged == steps
    assert (tmp_path / "runs" / name / "plots" / "training.png").exists()
    assert (tmp_path / "runs" / name / "plots" / "eval.png").exists()
  table = result.stdout.split("convergence: ")[1]
  assert "| step | epoch | sfd unguided | sync unguided | sfd CFG 2 | sync CFG 2 |" in table
  assert all(f"| {step} | " in table for step in (125, 250, 350)), table
  picture = np.asarray(Image.open(tmp_path / "convergence.png").convert("RGB"))
  assert picture.shape == (560, 800, 3) and picture.std() > 10  # 2 × 2 panels of 4 × 2.8 inches at 100 dpi
  # The command the demo prints (and the README shows) samples from what the demo wrote.
  command = result.stdout.split("sample from the trained SFD model:")[1].split()
  assert command[:3] == ["python", "-m", "sfd_jax.cli.sample"], command
  sampled = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, text=True, timeout=600)
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  demo_png = np.asarray(Image.open(tmp_path / "samples" / "demo.png"))
  assert demo_png.shape == (2 * (64 + 14), 10 * 64, 3) and demo_png.std() > 10  # the ten classes along the columns
  # A second run reuses every finished stage and keeps the first run's timings.
  again = subprocess.run([sys.executable, "-m", "sfd_jax.cli.demo", "--quick", f"--out={tmp_path}"], env=env,
                         capture_output=True, text=True, timeout=1200)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count(": reused (finished by an earlier run)") == 6, again.stdout
  assert "evaluation at step" not in again.stdout  # every evaluation is in the runs' logs already
  assert again.stdout.split("convergence: ")[1].split("seconds per")[0] == table.split("seconds per")[0]
  rerun = json.loads((tmp_path / "results.json").read_text())
  assert len(rerun["reused_stages"]) == 6
  assert all(rerun["timings_s"][k] == results["timings_s"][k] for k in rerun["reused_stages"])
