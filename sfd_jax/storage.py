"""Where runs read and write: local paths and Cloud Storage buckets (`gs://bucket/...`) through one path type.

Workdirs, exports and outputs are `etils.epath.Path`s, so `gs://` takes the same code as a local directory:
orbax and tensorstore write checkpoints to a bucket natively (with commit files instead of renames), tensorboardX
writes its events there, and the few operations whose semantics differ get one function here each. Two readers
need a filesystem path, because their C++ readers open files themselves: ArrayRecord latent datasets and image
folders. Read those from a (read-only) gcsfuse mount of the bucket; `filesystem_path` says so to a user who passes
a `gs://` path. Writers of that kind (ArrayRecord shards, zip files) write a local file that `staged_file` copies.

What a failed bucket operation means is decided here only (`failure_kind`): a transient failure (HTTP 429 or 5xx,
a refused, dropped or timed-out connection, DNS) is retried with backoff (`retried`) for `RETRY_S` seconds, after
the clients' own retries of each request; then, or at once when the credentials are refused, the bucket is
unreachable, a user error naming it. Only missing or corrupt data counts as damage.
"""
from __future__ import annotations

import atexit
import contextlib
import io
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import tempfile
import threading
import time

from etils import epath

from sfd_jax.errors import UserError

REMOTE_PREFIX = "gs://"

# How long transient bucket failures are retried before the bucket counts as unreachable. Each request is retried
# by its client first (gcsfs for about 30 s, tensorstore for minutes). `$SFD_JAX_BUCKET_RETRY_S` sets it (the tests
# use a few seconds).
RETRY_S = float(os.environ.get("SFD_JAX_BUCKET_RETRY_S", "300"))

TRANSIENT, DENIED, DAMAGED = "transient", "denied", "damaged"

# tensorstore reports a failure as a ValueError whose message starts with its status code.
_TENSORSTORE_CODES = {TRANSIENT: ("ABORTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"),
                      DENIED: ("PERMISSION_DENIED", "UNAUTHENTICATED"),
                      DAMAGED: ("DATA_LOSS", "OUT_OF_RANGE", "FAILED_PRECONDITION", "NOT_FOUND", "UNKNOWN")}
_TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}


class BucketUnreachable(UserError):
  """A bucket did not answer (network, DNS, endpoint) or refused the credentials, after the retries."""


def _loaded(module: str, *names: str) -> tuple[type, ...]:
  """Exception classes of a client library, if it is loaded (an exception of a library never imported cannot
  occur, and the bucket clients are an optional extra)."""
  loaded = sys.modules.get(module)
  return tuple(getattr(loaded, name) for name in names if hasattr(loaded, name)) if loaded else ()


def _own_kind(error: BaseException) -> str | None:
  """The kind of one exception, not looking at its causes."""
  if isinstance(error, _loaded("gcsfs.retry", "HttpError")):
    return TRANSIENT if error.code in _TRANSIENT_HTTP else DENIED if error.code in (401, 403) else None
  if isinstance(error, _loaded("google.auth.exceptions", "DefaultCredentialsError", "RefreshError")):
    return DENIED
  if isinstance(error, (ConnectionError, TimeoutError, *_loaded("aiohttp", "ClientError"),
                        *_loaded("requests.exceptions", "RequestException"),
                        *_loaded("google.auth.exceptions", "TransportError"))):
    return TRANSIENT
  if isinstance(error, PermissionError) or (isinstance(error, OSError) and str(error).startswith("Forbidden")):
    return DENIED  # gcsfs reports HTTP 403 as OSError("Forbidden: ...")
  if isinstance(error, (OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError)):
    return DAMAGED  # a missing file (FileNotFoundError), a short read, a local disk's I/O error, unparsable metadata
  if isinstance(error, ValueError):
    for kind, codes in _TENSORSTORE_CODES.items():
      if str(error).startswith(codes):
        return kind
  return None


def decisive(error: BaseException) -> BaseException:
  """The exception of `error`'s chain that tells what kind of failure it is: the outermost that does (orbax and
  fsspec wrap the clients' errors), else `error`."""
  link = error
  while link is not None:
    if _own_kind(link) is not None:
      return link
    link = link.__cause__ or link.__context__
  return error


def failure_kind(error: BaseException) -> str | None:
  """What a failed read or write says: TRANSIENT (retry it), DENIED (the credentials or permissions are refused),
  DAMAGED (the data is missing or corrupt), or None (not a storage failure: a bug, or data that does not fit)."""
  return _own_kind(decisive(error))


def bucket_of(value) -> str:
  """'gs://bucket' of a `gs://bucket/...` path."""
  return REMOTE_PREFIX + os.fspath(value)[len(REMOTE_PREFIX):].split("/")[0]


def summary(error: BaseException) -> str:
  """'Type: first line of the message' of an exception, for one-line reports."""
  text = str(error).strip()
  return f"{type(error).__name__}: {text.splitlines()[0][:300]}" if text else type(error).__name__


def unreachable(target, error: BaseException | str, retried_s: float | None = None) -> BucketUnreachable:
  """The user error of a bucket that cannot be used from this host, naming it and what to check; `retried_s`: how
  long the operation was retried (default `RETRY_S`)."""
  if not is_remote(target):  # a local directory (a network mount) can time out or refuse access too
    cause = error if isinstance(error, str) else summary(decisive(error))
    return BucketUnreachable(f"{target} cannot be accessed from this host ({cause}): check its permissions and mount")
  bucket = bucket_of(target)
  if isinstance(error, str):
    cause = error
  elif failure_kind(error) == DENIED:
    return BucketUnreachable(f"{bucket} refused this host's credentials ({summary(decisive(error))}): check them "
                             "(`gcloud auth application-default login`, or the VM's service account) and that they "
                             "may read and write the bucket")
  else:
    retried_s = RETRY_S if retried_s is None else retried_s
    cause = summary(decisive(error)) + (f", still failing after {retried_s:g} s of retries" if retried_s else "")
  return BucketUnreachable(f"{bucket} cannot be reached from this host ({cause}; $SFD_JAX_BUCKET_RETRY_S sets how "
                           "long to retry): check its network, DNS and firewall, the endpoint (STORAGE_EMULATOR_HOST "
                           "or TENSORSTORE_GCS_HTTP_URL if set) and the bucket's name")


def retried(operation, target, what: str):
  """`operation()`, retried with exponential backoff while it fails transiently, for `RETRY_S` seconds after its
  first failure; then (or on refused credentials at once) `BucketUnreachable` naming `target`'s bucket. Damage and
  other errors are raised as they are. `what` names the operation in the log."""
  deadline, delay = None, 0.5
  while True:
    try:
      return operation()
    except Exception as e:
      kind = failure_kind(e)
      if kind not in (TRANSIENT, DENIED):
        raise
      deadline = deadline or time.monotonic() + RETRY_S
      if kind == DENIED or time.monotonic() + delay > deadline:
        raise unreachable(target, e) from e
      logging.warning("%s: %s; retrying in %.1f s", what, summary(decisive(e)), delay)
      time.sleep(delay)
      delay = min(2 * delay, 30.0)


def check_reachable(*targets) -> None:
  """That the bucket of each `gs://` target answers, before a command starts work there: one object listing each,
  retried (`retried`); no answer at all within `RETRY_S` seconds (the client may still be retrying a dead
  connection itself) is `BucketUnreachable` too. A bucket that does not exist is a user error as well."""
  for bucket in sorted({bucket_of(t) for t in targets if is_remote(t)}):
    outcome = []

    def probe():
      try:
        outcome.append(retried(lambda: _list_one(bucket), bucket, f"listing {bucket}"))
      except Exception as e:  # handed to the caller's thread
        outcome.append(e)
    worker = threading.Thread(target=probe, daemon=True, name=f"sfd_jax probe {bucket}")
    worker.start()
    worker.join(RETRY_S + 1.0)
    if not outcome:
      raise unreachable(bucket, f"no answer within {RETRY_S:g} s")
    if isinstance(outcome[0], FileNotFoundError):
      raise UserError(f"{bucket} does not exist (or this project cannot see it): create it "
                      f"(`gcloud storage buckets create {bucket}`) or correct the path") from None
    if isinstance(outcome[0], Exception):
      raise outcome[0]


def _list_one(bucket: str):
  """One object of `bucket` (a listing of at most one: the permission a run needs, not the bucket's metadata)."""
  import fsspec
  try:
    client = fsspec.filesystem("gs")
  except ImportError:
    raise UserError(f"{bucket}: gs:// paths need the Cloud Storage clients: pip install -e \".[gcs]\"") from None
  return client.call("GET", "b/{}/o", bucket[len(REMOTE_PREFIX):], maxResults=1, json_out=True)


def is_url(value) -> bool:
  return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", os.fspath(value)))


def path(value) -> epath.Path:
  """A user's path: local (made absolute) or `gs://bucket/...`; another URL scheme is a user error."""
  text = os.fspath(value)
  if is_url(text) and not text.startswith(REMOTE_PREFIX):
    raise UserError(f"{text}: sfd_jax reads and writes local paths and gs://bucket/... paths only")
  return epath.Path(text) if text.startswith(REMOTE_PREFIX) else epath.Path(os.path.abspath(text))


def is_remote(value) -> bool:
  return os.fspath(value).startswith(REMOTE_PREFIX)


def filesystem_path(value, what: str) -> pathlib.Path:
  """A local path for a reader that opens files itself; a `gs://` path is a user error that says what to do."""
  if is_url(value):
    raise UserError(f"{what} {value} is read from a filesystem path: mount the bucket read-only on every host "
                    "(`gcsfuse -o ro --implicit-dirs BUCKET /gcs/BUCKET`) and pass the mounted path")
  return pathlib.Path(value)


def write_text(target, text: str) -> None:
  """Writes a whole text file so that a reader sees the old content or the new, never a part (see `write_bytes`)."""
  write_bytes(target, text.encode())


def write_json(target, obj) -> None:
  """`obj` as indented JSON, written whole (see `write_bytes`)."""
  write_text(target, json.dumps(obj, indent=1))


def write_bytes(target, data: bytes) -> None:
  """Writes a whole file (text, PNGs, small binary files) so that a reader sees the old content or the new, never a
  part: a renamed temporary file locally; in a bucket an object appears whole anyway."""
  target = path(target)
  if is_remote(target):
    target.write_bytes(data)
    return
  tmp = target.with_name(f".{target.name}.tmp")
  tmp.write_bytes(data)
  os.replace(tmp, target)


def write_png(target, image) -> None:
  """An (H, W, 3) uint8 image as a PNG file, written whole (`write_bytes`)."""
  import numpy as np
  from PIL import Image
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(image)).save(buffer, format="PNG")
  write_bytes(target, buffer.getvalue())


@contextlib.contextmanager
def staged_file(target):
  """`with staged_file(target) as local: write(local)`: a large file written with ordinary file I/O (zipfile,
  a C++ writer) appears at `target` whole when the block ends, and not at all if it raises. Local targets are
  written next to their final name and renamed; bucket targets are written to a temporary directory and copied."""
  target = path(target)
  if not is_remote(target):
    tmp = pathlib.Path(target.with_name(f".{target.stem}.tmp{target.suffix}"))  # numpy keeps a .npz suffix only
    try:
      yield tmp
      os.replace(tmp, target)
    finally:
      tmp.unlink(missing_ok=True)
    return
  directory = tempfile.mkdtemp(prefix="sfd_jax_")
  try:
    local = pathlib.Path(directory) / target.name
    yield local
    epath.Path(local).copy(target, overwrite=True)
  finally:
    shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def local_copy(source):
  """A local file with the content of `source` (a bucket object is downloaded to a temporary directory)."""
  source = path(source)
  if not is_remote(source):
    yield pathlib.Path(source)
    return
  directory = tempfile.mkdtemp(prefix="sfd_jax_")
  try:
    local = pathlib.Path(directory) / source.name
    source.copy(epath.Path(local))
    yield local
  finally:
    shutil.rmtree(directory, ignore_errors=True)


def mirrored_file(target, period_s: float = 60.0) -> pathlib.Path:
  """A local file to write to (a log) that reaches `target`: the target itself when it is local; for a bucket, a
  temporary file copied there by a background thread every `period_s` seconds when it has grown, and at exit (an
  upload that fails is logged and tried again at the next period). A logging handler must not write to a bucket
  itself: the bucket client logs too, from its own thread, which would wait for the handler."""
  target = path(target)
  if not is_remote(target):
    return pathlib.Path(target)
  local = pathlib.Path(tempfile.mkdtemp(prefix="sfd_jax_")) / target.name
  local.touch()
  uploaded = [-1]  # the size of the last upload

  def upload():
    size = local.stat().st_size
    if size != uploaded[0]:
      epath.Path(local).copy(target, overwrite=True)
      uploaded[0] = size

  def every_period():
    while True:
      time.sleep(period_s)
      try:
        upload()
      except Exception as e:  # noqa: BLE001 (the next period tries again; the log stays in `local`)
        logging.warning("could not copy the log %s to %s: %s", local, target, e)
  threading.Thread(target=every_period, daemon=True, name="sfd_jax log upload").start()
  atexit.register(upload)
  return local


class GrowingTextFile:
  """A text file that only grows (metrics.jsonl), as a writable stream for one thread (`training.metrics` writes it
  from its background thread; a logging handler uses `mirrored_file`).

  Locally each write is appended at once. Objects in a bucket cannot be appended to, so there the whole text is
  kept and the object rewritten by `flush` at most every `period_s` seconds, by `flush(force=True)` and `close()`.
  """

  def __init__(self, target, period_s: float = 30.0):
    self.path, self.period_s = path(target), period_s
    self.remote = is_remote(self.path)
    self._text = self.path.read_text() if self.remote and self.path.exists() else ""
    self._dirty, self._written_at = False, 0.0

  def write(self, text: str) -> int:
    if self.remote:
      self._text += text
      self._dirty = True
    else:
      with open(self.path, "a") as f:
        f.write(text)
    return len(text)

  def flush(self, force: bool = False) -> None:
    if self.remote and self._dirty and (force or time.monotonic() - self._written_at >= self.period_s):
      self.path.write_text(self._text)
      self._dirty, self._written_at = False, time.monotonic()

  def close(self) -> None:
    self.flush(force=True)
