"""Train-step throughput of sfd_jax, and of the official-architecture PyTorch step on the same machine.

  python benchmarks/train_step.py --config=configs/sfd_xl.py:S --config.batch_size=8 --steps=5 \
      --config.model.dtype=float32 --config.model.remat_policy=dots_with_no_batch_dims_saveable  # CPU, as measured
  python benchmarks/train_step.py --config=configs/sfd_xl.py --config.batch_size=256 --torch=false  # the recipe

Compiles, warms up, then times `--steps` steps and reports images/s at the median step time (and the fastest
step: other processes on a shared machine only ever slow a step down), model FLOPs per image (3× the forward
FLOPs counted from the config), MFU where the device's peak is known, and peak memory. The torch step
(benchmarks/torch_reference.py, checked against tests/golden/dit_tiny first) runs the same config, batch and
loss, AdamW and the official EMA update on the same device (CUDA when there is one, else all CPU threads),
eagerly and with `--torch_compile` also torch.compile'd, under bf16 autocast when the config's dtype is bfloat16;
the last lines are the speed ratios.
The first line names the device, and on CPU the processor model.
"""
from __future__ import annotations

import copy
import json
import os
import resource
import statistics
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from sfd_jax import sharding as shd
from sfd_jax.training import config as config_lib, metrics as metrics_lib, state as state_lib, step as step_lib

config_flags.DEFINE_config_file("config", "configs/sfd_xl.py", "Training config (model, loss, optim, batch).")
flags.DEFINE_integer("steps", 5, "Timed steps.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_bool("torch", True, "Also time the PyTorch reference step.")
flags.DEFINE_bool("torch_compile", False, "Also time the PyTorch step under torch.compile.")
flags.DEFINE_string("out", None, "Write the results as JSON here.")
FLAGS = flags.FLAGS
GOLDEN = Path(os.environ.get("SFD_GOLDEN_DIR", Path(__file__).resolve().parents[1] / "tests" / "golden"))


def synthetic_batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  n, size = cfg.batch_size, cfg.model.input_size
  tokens = (size // cfg.model.patch_size) ** 2
  return {"x": rng.normal(size=(n, size, size, cfg.model.in_channels)).astype(np.float32),
          "y": rng.integers(0, cfg.model.num_classes, n).astype(np.int32),
          "dino": rng.normal(size=(n, tokens, cfg.model.repa_z_dim)).astype(np.float32)}


def time_steps(run, steps):
  """(median, min) seconds of `steps` calls."""
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times), min(times)


def cpu_model() -> str:
  """The processor's model name (Linux /proc/cpuinfo), e.g. 'AMD EPYC', and its core count."""
  try:
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")]
  except OSError:
    names = []
  return f"{names[0] if names else 'unknown CPU'}, {os.cpu_count()} cores"


def bench_jax(cfg, steps, warmup):
  mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
  model = config_lib.build_model(cfg.model)
  tx = state_lib.make_optimizer(cfg.optim)
  state, shardings = state_lib.create_train_state(model, tx, mesh, cfg.sharding, jax.random.key(0))
  batch = shd.shard_batch(mesh, synthetic_batch(cfg))
  train_step = step_lib.make_train_step(step_lib.sfd_loss_fn(model, cfg), tx, cfg, mesh, shardings)
  start = time.perf_counter()
  compiled = train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  box = {"state": state}

  def run():
    box["state"], m = compiled(box["state"], batch)
    jax.block_until_ready(m["loss"])

  for _ in range(warmup):
    run()
  step_s, fastest_s = time_steps(run, steps)
  flops_per_image = 3 * model.forward_flops()
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
  return {"compile_s": compile_s, "step_s": step_s, "fastest_step_s": fastest_s,
          "images_per_s": cfg.batch_size / step_s,
          "flops_per_image": flops_per_image,
          "mfu": metrics_lib.mfu(flops_per_image * cfg.batch_size, step_s, mesh.devices.size),
          "peak_memory_gb": peak / 2 ** 30}


def bench_torch(cfg, steps, warmup, compile_model: bool = False):
  import torch
  import torch_reference
  golden_error = torch_reference.check_against_golden(GOLDEN)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  model = torch_reference.build(cfg.model).to(device)
  ema = copy.deepcopy(model).requires_grad_(False)
  opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.b1, cfg.optim.b2),
                          eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
  forward = torch.compile(model) if compile_model else model
  b = synthetic_batch(cfg)
  x1 = torch.from_numpy(b["x"]).permute(0, 3, 1, 2).contiguous().to(device)
  y, dino = torch.from_numpy(b["y"]).long().to(device), torch.from_numpy(b["dino"]).to(device)
  x0, t = torch.randn_like(x1), torch.sigmoid(torch.randn(cfg.batch_size, device=device))
  bf16 = cfg.model.dtype == "bfloat16"
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def run():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
      loss = torch_reference.sfd_loss(forward, x1, x0, t, y, dino, cfg.loss.delta_t, cfg.loss.semantic_weight,
                                      cfg.loss.semantic_channels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    torch_reference.update_ema(ema, model, cfg.optim.ema_decay)
    sync()

  start = time.perf_counter()
  run()  # torch.compile compiles here
  first_s = time.perf_counter() - start
  for _ in range(warmup):
    run()
  step_s, fastest_s = time_steps(run, steps)
  return {"device": device, "compiled": compile_model, "first_step_s": first_s, "step_s": step_s,
          "fastest_step_s": fastest_s, "images_per_s": cfg.batch_size / step_s,
          "threads": torch.get_num_threads(), "golden_velocity_error": golden_error}


def main(argv):
  del argv
  cfg = FLAGS.config
  device = jax.devices()[0]
  name = f"{len(jax.devices())}× {device.device_kind} ({device.platform})"
  if device.platform == "cpu":
    name += f": {cpu_model()}"
  result = {"device": name,
            "model": {k: cfg.model[k] for k in ("hidden_size", "depth", "num_heads", "input_size", "patch_size",
                                                "dtype", "remat_policy")},
            "batch_size": cfg.batch_size, "jax": bench_jax(cfg, FLAGS.steps, FLAGS.warmup)}
  j = result["jax"]
  mfu = "n/a (unknown peak)" if j["mfu"] is None else f"{100 * j['mfu']:.1f}%"
  print(f"device: {result['device']}  model: {result['model']}  batch {cfg.batch_size}")
  print(f"sfd_jax: compile {j['compile_s']:.1f} s, step {j['step_s'] * 1e3:.1f} ms (fastest "
        f"{j['fastest_step_s'] * 1e3:.1f}), {j['images_per_s']:.1f} img/s, {j['flops_per_image'] / 1e9:.1f} "
        f"GFLOP/img, MFU {mfu}, peak memory {j['peak_memory_gb']:.2f} GB")
  if FLAGS.torch:
    result["torch"] = [bench_torch(cfg, FLAGS.steps, FLAGS.warmup)]
    if FLAGS.torch_compile:
      result["torch"].append(bench_torch(cfg, FLAGS.steps, FLAGS.warmup, compile_model=True))
    for t in result["torch"]:
      kind = "torch.compile" if t["compiled"] else "eager"
      t["speed_ratio_jax_over_torch"] = t["step_s"] / j["step_s"]
      t["fastest_ratio_jax_over_torch"] = t["fastest_step_s"] / j["fastest_step_s"]
      print(f"torch reference ({kind}, {t['device']}, {t['threads']} threads): step {t['step_s'] * 1e3:.1f} ms "
            f"(fastest {t['fastest_step_s'] * 1e3:.1f}, first {t['first_step_s']:.1f} s), "
            f"{t['images_per_s']:.1f} img/s (matches golden velocity to {t['golden_velocity_error']})")
      print(f"speed ratio sfd_jax / torch {kind}: {t['speed_ratio_jax_over_torch']:.2f} at the median step, "
            f"{t['fastest_ratio_jax_over_torch']:.2f} at the fastest")
  if FLAGS.out:
    Path(FLAGS.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main)
