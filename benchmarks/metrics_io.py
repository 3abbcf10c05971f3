"""What writing metrics costs the training step: a smoke run logging every step, with a local workdir and with a
gs:// workdir on the GCS emulator (tests/gcs_emulator.py), timed from outside.

  python benchmarks/metrics_io.py                                   # this tree, 150 s per run
  python benchmarks/metrics_io.py --tree=/tmp/old_sfd_jax --tree=. --repeats=2   # against another checkout
                                                                    # (`git archive COMMIT | tar -x -C DIR`)

Each run is `cli.train --config=configs/smoke.py` with `log_every=1` (a metrics record, its TensorBoard scalars
and the plots' bookkeeping every step), no checkpoints or samples, stopped by SIGTERM after `--seconds`. The time of
a step is the time between two of its progress lines as this script reads them, so everything process 0 does
between steps counts, the metrics writer's uploads and plot drawing included: on a pod the other hosts wait that
long at the next collective. Printed: steps done, median and 99th-percentile step time, the longest step, the
steps over half a second, and the time lost to steps longer than 3 × the median (stalls). With several trees and
repeats the runs alternate (tree, then workdir, within each repeat), so that a machine's changing load falls on all
of them alike.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.golden import free_port  # noqa: E402

BUCKET = "sfd-bench"


def cpu_model() -> str:
  for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else ():
    if line.startswith("model name"):
      return line.split(":", 1)[1].strip()
  return platform.processor() or platform.machine()


def start_emulator() -> tuple[subprocess.Popen, dict]:
  port = free_port()
  server = subprocess.Popen([sys.executable, "-m", "tests.gcs_emulator", f"--port={port}", f"--bucket={BUCKET}"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f"http://127.0.0.1:{port}"
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
         "GOOGLE_CLOUD_PROJECT": BUCKET, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  probe = f"from etils import epath; list(epath.Path('gs://{BUCKET}').iterdir())"
  deadline = time.time() + 60
  while subprocess.run([sys.executable, "-c", probe], env={**os.environ, **env}, capture_output=True).returncode:
    if time.time() > deadline:
      server.kill()
      raise SystemExit("the GCS emulator did not start")
    time.sleep(0.5)
  return server, env


def timed_run(tree: Path, workdir: str, seconds: float, env: dict) -> list[float]:
  """Seconds between consecutive progress lines of a smoke run stopped after `seconds`."""
  command = [sys.executable, "-m", "sfd_jax.cli.train", f"--config={REPO / 'configs' / 'smoke.py'}",
             f"--workdir={workdir}", "--config.total_steps=1000000", "--config.log_every=1",
             "--config.ckpt_every=1000000", "--config.sample_every=0"]
  env = {**os.environ, **env, "PYTHONPATH": str(tree), "JAX_PLATFORMS": "cpu"}
  worker = subprocess.Popen(command, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  times, stop_at = [], None
  for line in worker.stdout:
    if line.startswith("step "):
      times.append(time.perf_counter())
      stop_at = stop_at or times[0] + seconds
      if times[-1] >= stop_at:
        worker.send_signal(signal.SIGTERM)
        break
  _, err = worker.communicate(timeout=600)
  if worker.returncode != 75:
    raise SystemExit(f"{workdir}: exit {worker.returncode}\n{err[-3000:]}")
  return [b - a for a, b in zip(times[5:], times[6:])]  # the first steps warm up


def row(name: str, steps: list[float]) -> str:
  median = statistics.median(steps)
  p99 = sorted(steps)[int(0.99 * (len(steps) - 1))]
  stalls = sum(s - median for s in steps if s > 3 * median)
  return (f"| {name} | {len(steps)} | {1e3 * median:.1f} | {1e3 * p99:.1f} | {1e3 * max(steps):.0f} | "
          f"{sum(s > 0.5 for s in steps)} | {stalls:.2f} | {100 * stalls / sum(steps):.1f}% |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tree", type=Path, action="append",
                      help="an sfd_jax source tree whose trainer is timed (repeatable; default this one)")
  parser.add_argument("--seconds", type=float, default=150.0,
                      help="how long each run trains (longer than the writer's 30 s upload and 60 s plot intervals)")
  parser.add_argument("--repeats", type=int, default=1, help="runs per tree and workdir")
  args = parser.parse_args()
  trees = [tree.resolve() for tree in args.tree or [REPO]]
  results = {}
  for repeat in range(args.repeats):
    for tree in trees:
      server, env = start_emulator()  # a fresh bucket for each run
      try:
        with tempfile.TemporaryDirectory() as local:
          for name, workdir in (("local", f"{local}/run"), ("gs:// (emulator)", f"gs://{BUCKET}/run{repeat}")):
            results.setdefault((tree, name), []).extend(timed_run(tree, workdir, args.seconds, env))
      finally:
        server.kill()
  print(f"metrics I/O on the step path: {cpu_model()} ({os.cpu_count()} cores), "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, smoke config, log_every=1, "
        f"{args.repeats} × {args.seconds:.0f} s per tree and workdir")
  print("| tree | workdir | steps | median ms | p99 ms | longest ms | steps > 0.5 s | stalled s | stalled share |")
  print("|---|---|---|---|---|---|---|---|---|")
  for (tree, name), steps in results.items():
    print(row(f"{tree} | {name}", steps))


if __name__ == "__main__":
  main()
