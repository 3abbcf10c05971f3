"""gcp-storage-emulator (PyPI) with the object preconditions of Cloud Storage that it lacks, as a local server.

tensorstore's OCDBT format (orbax's default) writes its manifest with `ifGenerationMatch` and re-reads it with
`ifGenerationNotMatch`, and reads an object's generation from the `x-goog-generation` header, as the real service
documents (cloud.google.com/storage/docs/request-preconditions). The emulator ignores both preconditions and sends
no such header, so a checkpoint of a few hundred arrays fails there with "Malformed StorageGeneration". This
module adds exactly those three behaviours to its handlers, nothing else:

  python -m tests.gcs_emulator --port=PORT --bucket=NAME
"""
import argparse
import functools
import time
from http import HTTPStatus

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


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--bucket", required=True)
  args = parser.parse_args()
  patch_handlers()
  emulator = server.create_server("127.0.0.1", args.port, in_memory=True, default_bucket=args.bucket)
  emulator.start()
  while True:
    time.sleep(3600)


if __name__ == "__main__":
  main()
