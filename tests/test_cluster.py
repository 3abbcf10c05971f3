"""When sfd_jax starts jax.distributed: JAX's own cluster detection, in each kind of cluster's environment.

The environments are the real ones as far as this machine allows: the variables SLURM, Open MPI and GKE set, and
for Cloud TPU VMs a stand-in GCE metadata server on loopback answering the attributes JAX's GceTpuCluster asks
for (`GCE_METADATA_IP` is JAX's own switch for the metadata host). What no test here can provide is TPU chips:
JAX decides "this is a Cloud TPU VM" once, at import, from libtpu and the chips on the PCI bus
(`cloud_tpu_init.running_in_cloud_tpu_vm`, which also leaves `TPU_SKIP_MDS_QUERY` unset there). The in-process
tests set exactly that flag; the two-process test gets it from JAX itself through `JAX_FORCE_TPU_INIT`. Where a
cluster has several processes, the arguments JAX would initialise with are checked without connecting; the
explicit-coordinator and Cloud TPU VM paths also start two real processes.
"""
import contextlib
import http.server
import subprocess
import sys
import threading

import jax
import pytest
from jax._src import clusters
from jax._src.clusters import cloud_tpu_cluster

from sfd_jax import cluster
from sfd_jax.errors import UserError
from tests.golden import free_port, subprocess_env

CLUSTER_VARIABLES = ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
                     "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
                     "SLURM_PROCID", "SLURM_LOCALID", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID",
                     "MEGASCALE_COORDINATOR_ADDRESS", "MEGASCALE_NUM_SLICES", "MEGASCALE_SLICE_ID",
                     "KUBERNETES_SERVICE_HOST", "JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_PORT", "GCE_METADATA_IP")

# What a v5litepod-16 worker's metadata says (4 hosts; `tpu-env` abridged).
TPU_ENV = "ACCELERATOR_TYPE: 'v5litepod-16'\nTYPE: 'V5LITE_POD'\nWORKER_ID: '{worker}'\nZONE: 'us-west4-a'\n"


@pytest.fixture(autouse=True)
def no_cluster(monkeypatch):
  """Every test starts outside any cluster, whatever the machine running the tests is."""
  for name in CLUSTER_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  assert not jax.distributed.is_initialized()


@contextlib.contextmanager
def metadata_server(attributes: dict[str, str]):
  """A GCE metadata server on loopback serving `instance/attributes/<key>` (404 for others), as GCE does only to
  requests carrying `Metadata-Flavor: Google`. Yields its host:port."""
  prefix = "/computeMetadata/v1/instance/attributes/"

  class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
      key = self.path[len(prefix):] if self.path.startswith(prefix) else None
      if self.headers.get("Metadata-Flavor") != "Google":
        status, body = 403, "Missing Metadata-Flavor:Google header."
      elif key in attributes:
        status, body = 200, attributes[key]
      else:
        status, body = 404, "The requested URL was not found on this server."
      self.send_response(status)
      self.send_header("Content-Type", "text/plain")
      self.end_headers()
      self.wfile.write(body.encode())

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True).start()
  try:
    yield f"127.0.0.1:{server.server_address[1]}"
  finally:
    server.shutdown()
    server.server_close()


@pytest.fixture
def tpu_vm(monkeypatch):
  """`tpu_vm(attributes)`: this process on a Cloud TPU VM whose metadata server serves `attributes`."""
  with contextlib.ExitStack() as stack:
    def enter(attributes):
      monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
      monkeypatch.delenv("TPU_SKIP_MDS_QUERY", raising=False)
      monkeypatch.setenv("GCE_METADATA_IP", stack.enter_context(metadata_server(attributes)))
    yield enter


def jax_arguments():
  """(coordinator address, number of processes, process id, local device ids) that a bare
  `jax.distributed.initialize()` would use here."""
  return clusters.ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None, 10)


def assert_single_process(expected_line):
  assert cluster.start() == expected_line
  assert not jax.distributed.is_initialized()


def test_jax_detection_order_is_the_one_pinned_here():
  """The private classes `detect` walks, in JAX's order; a JAX upgrade that changes them fails here first."""
  assert [(env.name, env.opt_in_only_method) for env in clusters.ClusterEnv._cluster_types] == [
      ("ompi", False), ("slurm", False), ("mpi4py", True), ("tpu", False), ("gcetpu", False), ("gketpu", False),
      ("", False)]


def test_no_cluster():
  assert cluster.detect() is None
  assert_single_process("single process: no multi-process cluster detected")


def test_single_host_tpu_vm(tpu_vm):
  """A v5e-8 VM (or Colab's TPU VM): one worker in the metadata, so no coordinator for one process."""
  tpu_vm({"agent-worker-number": "0", "worker-network-endpoints": "unknown:unknown:10.164.0.7",
          "tpu-env": TPU_ENV.format(worker=0).replace("v5litepod-16", "v5litepod-8")})
  assert cluster.detect() == cluster.Cluster("Cloud TPU VM", 1, 0)
  assert_single_process("single process: a Cloud TPU VM environment with one process")


def test_multi_host_tpu_vm(tpu_vm):
  """Worker 2 of a 4-host slice: process 2 of 4, coordinator worker 0 on JAX's TPU port 8482."""
  tpu_vm({"agent-worker-number": "2", "tpu-env": TPU_ENV.format(worker=2),
          "worker-network-endpoints": ",".join(f"unknown:unknown:10.164.0.{i}" for i in (7, 9, 8, 12))})
  assert cluster.detect() == cluster.Cluster("Cloud TPU VM", 4, 2)
  assert jax_arguments() == ("10.164.0.7:8482", 4, 2, None)


@pytest.mark.parametrize("hosts_per_slice, worker, expected", [(2, 1, (4, 3)), (1, 0, (2, 1))])
def test_multislice_tpu_vm(tpu_vm, hosts_per_slice, worker, expected):
  """Slice 1 of 2 (queued resources with --node-count): processes count across slices, the coordinator is
  MEGASCALE_COORDINATOR_ADDRESS's host. Two single-host slices are two processes too."""
  tpu_env = TPU_ENV.format(worker=worker) + ("MEGASCALE_COORDINATOR_ADDRESS: '10.164.0.20:8080'\n"
                                             "MEGASCALE_NUM_SLICES: '2'\nMEGASCALE_SLICE_ID: '1'\n")
  tpu_vm({"agent-worker-number": str(worker), "tpu-env": tpu_env,
          "worker-network-endpoints": ",".join(f"10.164.1.{i}" for i in range(hosts_per_slice))})
  assert cluster.detect() == cluster.Cluster("Cloud TPU VM", *expected)
  assert jax_arguments() == ("10.164.0.20:8482", *expected, None)


def test_tpu_chips_without_a_metadata_server(tpu_vm, monkeypatch):
  """A TPU machine whose metadata server does not answer is no Cloud TPU VM slice: one process, no crash."""
  tpu_vm({})
  monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{free_port()}")
  assert_single_process("single process: no multi-process cluster detected")


def test_gke_tpu_pod(tpu_vm, monkeypatch):
  """A GKE TPU pod: hosts and worker id from TPU_WORKER_HOSTNAMES / TPU_WORKER_ID (its metadata server has no
  agent-worker-number)."""
  tpu_vm({"tpu-env": ""})
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.8.0.4,10.8.1.4,10.8.2.4,10.8.3.4")
  monkeypatch.setenv("TPU_WORKER_ID", "3")
  assert cluster.detect() == cluster.Cluster("GKE TPU", 4, 3)
  assert jax_arguments() == ("10.8.0.4:8482", 4, 3, None)


def test_gke_single_host(tpu_vm, monkeypatch):
  tpu_vm({"tpu-env": ""})
  monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "true")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
  monkeypatch.setenv("TPU_WORKER_ID", "0")
  assert cluster.detect() == cluster.Cluster("GKE TPU", 1, 0)
  assert_single_process("single process: a GKE TPU environment with one process")


def slurm(monkeypatch, tasks, task_id, nodes):
  for name, value in dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST=nodes, SLURM_NTASKS=str(tasks),
                          SLURM_PROCID=str(task_id), SLURM_LOCALID="0").items():
    monkeypatch.setenv(name, value)


def test_slurm_single_task(monkeypatch):
  """`srun -n1`: SLURM's variables are there, but one task needs no coordinator."""
  slurm(monkeypatch, tasks=1, task_id=0, nodes="gpu017")
  assert cluster.detect() == cluster.Cluster("SLURM", 1, 0)
  assert_single_process("single process: a SLURM environment with one process")


def test_slurm_several_tasks(monkeypatch):
  """Task 2 of 4: the coordinator is the first node of the step on a port derived from the job id."""
  slurm(monkeypatch, tasks=4, task_id=2, nodes="gpu[017-018,020],cpu3")
  assert cluster.detect() == cluster.Cluster("SLURM", 4, 2)
  assert jax_arguments() == (f"gpu017:{4242 % 4096 + 65535 - 4096 + 1}", 4, 2, [0])


def test_open_mpi(monkeypatch):
  for name, value in dict(OMPI_MCA_orte_hnp_uri="1531576320.0;tcp://10.96.0.1,10.148.0.1:34911",
                          OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_RANK="1", OMPI_COMM_WORLD_LOCAL_RANK="0").items():
    monkeypatch.setenv(name, value)
  assert cluster.detect() == cluster.Cluster("Open MPI", 2, 1)
  assert jax_arguments() == (f"10.96.0.1:{1531576320 // 4096 % 4096 + 65535 - 4096 + 1}", 2, 1, [0])


@pytest.mark.parametrize("arguments", [dict(coordinator="localhost:1234"),
                                       dict(coordinator="localhost:1234", num_processes=2),
                                       dict(num_processes=2, process_id=0)])
def test_incomplete_explicit_flags(arguments):
  with pytest.raises(UserError, match="--coordinator"):
    cluster.start(**arguments)
  assert not jax.distributed.is_initialized()


WORKER = """
import os, sys
import jax
os.environ.pop("TPU_SKIP_MDS_QUERY", None)  # set by JAX's TPU start-up where it finds no chips (see the module doc)
import numpy as np
from jax.experimental import multihost_utils
from sfd_jax import cluster
arguments = [None, None, None] if sys.argv[1] == "detect" else [sys.argv[1], 2, int(sys.argv[2])]
print(cluster.start(*arguments))
print("gathered", multihost_utils.process_allgather(np.int32(jax.process_index())).tolist())
"""


def run_two(argv_of, env_of):
  workers = [subprocess.Popen([sys.executable, "-c", WORKER, *argv_of(i)], env=env_of(i), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = []
  for worker in workers:
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err[-3000:]
    outputs.append([line for line in out.splitlines() if not line.startswith("[Gloo]")])  # gloo's own chatter
  return outputs


def test_two_processes_with_an_explicit_coordinator():
  port = free_port()
  outputs = run_two(lambda i: [f"localhost:{port}", str(i)], lambda i: subprocess_env(1))
  assert outputs == [[f"jax.distributed: process {i} of 2, coordinator localhost:{port}", "gathered [0, 1]"]
                     for i in range(2)]


def test_two_processes_on_a_cloud_tpu_vm_slice():
  """Two workers of a 2-host slice, each with its own metadata server (worker number 0 and 1) and JAX's TPU-VM
  start-up forced on (no chips here): detection alone makes them one 2-process job."""
  port = free_port()
  with metadata_server({"agent-worker-number": "0", "worker-network-endpoints": "127.0.0.1,127.0.0.1",
                        "tpu-env": TPU_ENV.format(worker=0)}) as host0, \
      metadata_server({"agent-worker-number": "1", "worker-network-endpoints": "127.0.0.1,127.0.0.1",
                       "tpu-env": TPU_ENV.format(worker=1)}) as host1:
    outputs = run_two(lambda i: ["detect"], lambda i: {
        **subprocess_env(1), "JAX_FORCE_TPU_INIT": "1", "GCE_METADATA_IP": (host0, host1)[i],
        "JAX_COORDINATOR_PORT": str(port)})
  assert outputs == [[f"jax.distributed: process {i} of 2, found by Cloud TPU VM detection", "gathered [0, 1]"]
                     for i in range(2)]
