"""The built-in demo end to end (`--quick`, as CI runs it): every stage runs, writes its files, both runs are
evaluated during training (the convergence table and picture), and their samples are recognisable digits more
often than chance; the commands it prints run as printed, and a rerun redoes nothing."""
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
  stages = [line for line in result.stdout.splitlines() if line.startswith("== stage ")]
  assert [line.split(",")[0] for line in stages] == [f"== stage {k}/7" for k in range(1, 8)], stages
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
    assert grid.shape[0] == 14 + 5 * (64 + 14) and grid[:14].min() < 128  # a title line above 5 rows of digits
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
  assert f"this run took {results['this_run_s']:.0f} s" in result.stdout and "total time" not in result.stdout
  # The commands the demo prints (and the README shows) run as printed, in a shell whose PATH has no venv (the
  # state the demo's own command leaves a newcomer in), on what the demo wrote.
  bare = {**env, "PATH": "/usr/bin:/bin"}
  plot = result.stdout.split("compare the runs' curves:\n")[1].splitlines()[0].strip()
  plotted = subprocess.run(plot, shell=True, env=bare, capture_output=True, text=True, timeout=600)
  assert plotted.returncode == 0, (plot, plotted.stderr[-3000:])
  assert np.asarray(Image.open(tmp_path / "runs" / "sfd" / "plots" / "compare_fd.png")).std() > 5
  sample = result.stdout.split("sample from the trained SFD model:\n")[1].splitlines()[0].strip()
  assert sample.split()[1:3] == ["-m", "sfd_jax.cli.sample"], sample
  sampled = subprocess.run(sample, shell=True, env=bare, capture_output=True, text=True, timeout=600)
  assert sampled.returncode == 0, (sample, sampled.stderr[-3000:])
  demo_png = np.asarray(Image.open(tmp_path / "samples" / "demo.png"))
  assert demo_png.shape == (2 * (64 + 14), 10 * 64, 3) and demo_png.std() > 10  # the ten classes along the columns
  # A second run reuses every finished stage (the grids too), keeps the first run's timings and says its own time.
  grids = {name: (tmp_path / f"grid_{name}.png").read_bytes() for name in results["runs"]}
  again = subprocess.run([sys.executable, "-m", "sfd_jax.cli.demo", "--quick", f"--out={tmp_path}"], env=env,
                         capture_output=True, text=True, timeout=1200)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count(": reused (finished by an earlier run)") == 7, again.stdout
  assert "evaluation at step" not in again.stdout  # every evaluation is in the runs' logs already
  assert again.stdout.split("convergence: ")[1].split("seconds per")[0] == table.split("seconds per")[0]
  rerun = json.loads((tmp_path / "results.json").read_text())
  assert len(rerun["reused_stages"]) == 7
  assert grids == {name: (tmp_path / f"grid_{name}.png").read_bytes() for name in results["runs"]}
  assert f"this run took {rerun['this_run_s']:.0f} s; it reused 7 stages that took" in again.stdout
  assert all(rerun["timings_s"][k] == results["timings_s"][k] for k in rerun["reused_stages"])
