"""gcp-storage-emulator (PyPI) with the object preconditions of Cloud Storage that it lacks, as a local server.

tensorstore's OCDBT format (orbax's default) writes its manifest with `ifGenerationMatch` and re-reads it with
`ifGenerationNotMatch`, and reads an object's generation from the `x-goog-generation` header, as the real service
documents (cloud.google.com/storage/docs/request-preconditions). The emulator ignores both preconditions and sends
no such header, so a checkpoint of a few hundred arrays fails there with "Malformed StorageGeneration". This
module adds exactly those three behaviours to its handlers, nothing else:

  python -m tests.gcs_emulator --port=PORT --bucket=NAME

A flaky bucket for one client: `--flaky_port=PORT2 --fail=REGEX --times=K --status=503,502` serves the same bucket
on a second port too, where the first K requests whose path (URL-encoded, as sent) matches REGEX are answered with
those HTTP statuses in turn (and an error body as the service sends) instead. A client given the second port's URL
sees the outage; the others do not.
"""
import argparse
import contextlib
import functools
import json
import re
import subprocess
import sys
import threading
import time
from http import HTTPStatus, server as http_server
from pathlib import Path

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _generation(request, storage) -> str | None:
  """The object's current generation, "0" when it does not exist (the service's convention); None when the request
  names its object only in its body (a multipart upload), where the emulator's own handling is kept."""
  bucket = request.params.get("bucket_name")
  name = request.params.get("object_id") or (request.query.get("name") or [None])[0]
  if name is None:
    return None
  try:
    return str(storage.get_file_obj(bucket, name)["generation"])
  except (NotFound, KeyError, TypeError):
    return "0"


def with_preconditions(handler):
  @functools.wraps(handler)
  def wrapped(request, response, storage, *args, **kwargs):
    current = _generation(request, storage)
    if current is None:
      return handler(request, response, storage, *args, **kwargs)
    match, not_match = request.query.get("ifGenerationMatch"), request.query.get("ifGenerationNotMatch")
    if match and match[0] != current:
      response.status = HTTPStatus.PRECONDITION_FAILED
      return None
    if not_match and not_match[0] == current:
      response.status = HTTPStatus.NOT_MODIFIED
      return None
    result = handler(request, response, storage, *args, **kwargs)
    generation = _generation(request, storage)
    if generation not in (None, "0"):
      response["x-goog-generation"] = generation
    return result
  return wrapped


def patch_handlers() -> None:
  for _, handlers in server.HANDLERS:
    for method, handler in list(handlers.items()):
      if handler in (objects.get, objects.download, objects.insert, objects.delete, objects.xml_upload):
        handlers[method] = with_preconditions(handler)


def serve_flaky(host: str, port: int, storage, fail: str, times: int, statuses: list[int]) -> None:
  """The emulator's bucket on `port` as well, answering the first `times` requests matching `fail` with `statuses`
  in turn."""
  pattern, failed, lock = re.compile(fail), [0], threading.Lock()

  class FlakyHandler(server.RequestHandler):
    def failing(self) -> bool:
      with lock:
        fails = bool(pattern.search(self.path)) and failed[0] < times
        status = statuses[failed[0] % len(statuses)]
        failed[0] += fails
      if fails:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))  # an upload's body, unread otherwise
        body = json.dumps({"error": {"code": status, "message": "injected by the test's flaky front"}}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
      return fails

    def do_GET(self):
      self.failing() or super().do_GET()

    def do_POST(self):
      self.failing() or super().do_POST()

    def do_PUT(self):
      self.failing() or super().do_PUT()

    def do_DELETE(self):
      self.failing() or super().do_DELETE()

    def do_PATCH(self):
      self.failing() or super().do_PATCH()

  httpd = http_server.HTTPServer((host, port), functools.partial(FlakyHandler, storage))
  threading.Thread(target=httpd.serve_forever, daemon=True, name="flaky front").start()


def client_env(url: str) -> dict:
  """The variables that point each bucket client of a subprocess at `url`: STORAGE_EMULATOR_HOST (gcsfs under
  etils.epath, google-cloud-storage under tensorboardX), TENSORSTORE_GCS_HTTP_URL and GOOGLE_AUTH_TOKEN_FOR_TESTING
  (tensorstore under orbax). gcsfs's experimental hierarchical-namespace probe would ask for Google credentials on
  every bucket operation."""
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
          "GOOGLE_CLOUD_PROJECT": "sfd-test", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


@contextlib.contextmanager
def running(bucket: str, env: dict, port: int, *flaky: str):
  """This emulator on `port` with `bucket` (and the flaky front of `flaky` flags), up once the bucket lists from a
  client run with `env`; killed at the end."""
  command = [sys.executable, "-m", "tests.gcs_emulator", f"--port={port}", f"--bucket={bucket}", *flaky]
  server_process = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 60
    while time.time() < deadline:
      listing = f"from etils import epath; list(epath.Path('gs://{bucket}').iterdir())"
      probe = subprocess.run([sys.executable, "-c", listing], env=env, capture_output=True, timeout=60)
      if probe.returncode == 0:
        break
      time.sleep(0.5)
    else:
      raise RuntimeError("the GCS emulator did not start")
    yield
  finally:
    server_process.kill()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--bucket", required=True)
  parser.add_argument("--flaky_port", type=int)
  parser.add_argument("--fail", default="", help="a regular expression of the request paths that fail")
  parser.add_argument("--times", type=int, default=0, help="how many matching requests fail")
  parser.add_argument("--status", default="503", help="HTTP statuses of the failing requests, in turn")
  args = parser.parse_args()
  patch_handlers()
  emulator = server.create_server("127.0.0.1", args.port, in_memory=True, default_bucket=args.bucket)
  emulator.start()
  if args.flaky_port:
    serve_flaky("127.0.0.1", args.flaky_port, emulator._storage, args.fail, args.times,
                [int(status) for status in args.status.split(",")])
  while True:
    time.sleep(3600)


if __name__ == "__main__":
  main()
