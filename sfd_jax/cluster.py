"""Start jax.distributed when, and only when, this process is one of several.

Orbax's barriers and the preemption sync point need the distributed client on every multi-process run, but
`jax.distributed.initialize()` cannot be called blindly: where it finds no cluster it raises, and on a single host
(a v5e-8 VM, Colab) it still starts a coordinator service on a fixed port for one process. JAX has no public "which
cluster is this" call, so `detect` asks JAX's own cluster classes (`jax._src.clusters`: Cloud TPU VM slices and
multislice through the GCE metadata server, GKE TPU, SLURM, Open MPI, Kubernetes), in the order `initialize` tries
them, and the initialisation itself goes through the public `jax.distributed.initialize()`, which runs that same
detection. The classes are private: tests/test_cluster.py pins what they find in each environment for the JAX
version we support.
"""
from __future__ import annotations

import dataclasses
import logging

import jax

# Private: JAX has no public cluster detection (see above); tests/test_cluster.py pins its behaviour.
from jax._src import clusters

from sfd_jax.errors import UserError

_KINDS = {"gcetpu": "Cloud TPU VM", "gketpu": "GKE TPU", "slurm": "SLURM", "ompi": "Open MPI", "": "Kubernetes"}


@dataclasses.dataclass(frozen=True)
class Cluster:
  """A cluster found by JAX's detection: its kind, its number of processes and this process's index."""
  kind: str
  num_processes: int
  process_id: int


def detect() -> Cluster | None:
  """The first cluster environment JAX's `jax.distributed.initialize()` would pick (opt-in-only ones such as
  mpi4py are skipped, as JAX skips them), or None outside any."""
  for env in clusters.ClusterEnv._cluster_types:
    if env.opt_in_only_method:
      continue
    try:
      present = env.is_env_present()
    except OSError as e:  # TPU chips without a GCE metadata server to ask: not a Cloud TPU VM slice
      logging.warning("%s: the metadata server does not answer (%s); not a Cloud TPU VM slice", env.__name__, e)
      continue
    if present:
      return Cluster(_KINDS.get(env.name, env.__name__), env.get_process_count(), env.get_process_id())
  return None


def start(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> str:
  """Initialises jax.distributed for an explicit coordinator (`host:port` of process 0, with `num_processes` and
  this `process_id`), or for a detected cluster of more than one process; nothing on a single host. Returns one
  line saying which, for the log. Call before anything touches a JAX device."""
  if coordinator is None:
    if num_processes is not None or process_id is not None:
      raise UserError("--num_processes and --process_id go with --coordinator=HOST:PORT (the address of process 0)")
    cluster = detect()
    if cluster is None:
      return "single process: no multi-process cluster detected"
    if cluster.num_processes == 1:
      return f"single process: a {cluster.kind} environment with one process"
    _initialize()
    return (f"jax.distributed: process {cluster.process_id} of {cluster.num_processes}, found by {cluster.kind} "
            f"detection")
  if num_processes is None or process_id is None:
    raise UserError(f"--coordinator={coordinator} needs --num_processes and --process_id (this process's index)")
  _initialize(coordinator, num_processes, process_id)
  return f"jax.distributed: process {process_id} of {num_processes}, coordinator {coordinator}"


def _initialize(*args):
  if jax.config.jax_platforms == "cpu":  # CPU processes exchange collectives through gloo
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(*args)
