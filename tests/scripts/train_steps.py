"""Runs 3 tiny SFD train steps on given meshes and saves the resulting params (for the sharding tests).

  python tests/scripts/train_steps.py --out OUT.npz --meshes 1x1,4x2,2x4            # one process
  python tests/scripts/train_steps.py --out OUT.npz --meshes 2x2 --process 0 --num_processes 2 --port P
Each mesh's params are saved as `<mesh>/<param path>`; the PartitionSpecs as `<mesh>/spec/<path>` strings.
"""
import argparse
import os
import sys

import jax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--meshes", required=True)
parser.add_argument("--process", type=int, default=None)
parser.add_argument("--num_processes", type=int, default=1)
parser.add_argument("--port", type=int, default=0)
args = parser.parse_args()
if args.process is not None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{args.port}", args.num_processes, args.process,
                             initialization_timeout=60)

import flax  # noqa: E402
import numpy as np  # noqa: E402

from sfd_jax import sharding as shd  # noqa: E402
from sfd_jax.training import (
  config as config_lib,  # noqa: E402
  state as state_lib,
  step as step_lib,
)
from tests.tiny import tiny_batch, tiny_config  # noqa: E402

out = {}
for mesh_name in args.meshes.split(","):
  data, fsdp = (int(v) for v in mesh_name.split("x"))
  mesh = shd.make_mesh(data, fsdp, devices=jax.devices()[: data * fsdp])
  cfg = tiny_config()
  model = config_lib.build_model(cfg.model)
  tx = state_lib.make_optimizer(cfg.optim)
  state, shardings = state_lib.create_train_state(model, tx, mesh, cfg.sharding, jax.random.key(0))
  train_step = step_lib.make_train_step(step_lib.sfd_loss_fn(model, cfg), tx, cfg, mesh, shardings)
  for i in range(3):
    batch = tiny_batch(cfg, seed=i)
    local = jax.tree.map(lambda x: x[shd.host_rows(mesh, cfg.batch_size)], batch)
    state, metrics = train_step(state, shd.shard_batch(mesh, local))
  flat = flax.traverse_util.flatten_dict(shd.to_host(state.params), sep="/")
  out.update({f"{mesh_name}/{k}": np.asarray(v) for k, v in flat.items()})
  specs = flax.traverse_util.flatten_dict(state.params, sep="/")
  out.update({f"{mesh_name}/spec/{k}": np.array(str(v.sharding.spec)) for k, v in specs.items()})
  mu = flax.traverse_util.flatten_dict(state.opt_state[0].mu, sep="/")
  out.update({f"{mesh_name}/mu_spec/{k}": np.array(str(v.sharding.spec)) for k, v in mu.items()})
  out[f"{mesh_name}/loss"] = np.asarray(shd.to_host(metrics["loss"]))
if jax.process_index() == 0:
  np.savez(args.out, **out)
