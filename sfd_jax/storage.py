"""Where runs read and write: local paths and Cloud Storage buckets (`gs://bucket/...`) through one path type.

Workdirs, exports and outputs are `etils.epath.Path`s, so `gs://` takes the same code as a local directory:
orbax and tensorstore write checkpoints to a bucket natively (with commit files instead of renames), tensorboardX
writes its events there, and the few operations whose semantics differ get one function here each. Two readers
need a filesystem path, because their C++ readers open files themselves: ArrayRecord latent datasets and image
folders. Read those from a (read-only) gcsfuse mount of the bucket; `filesystem_path` says so to a user who passes
a `gs://` path. Writers of that kind (ArrayRecord shards, zip files) write a local file that `staged_file` copies.
"""
from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import pathlib
import re
import shutil
import tempfile
import threading
import time

from etils import epath

from sfd_jax.errors import UserError

REMOTE_PREFIX = "gs://"


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
  temporary file copied there every `period_s` seconds by a background thread and at exit. A logging handler must
  not write to a bucket itself: the bucket client logs too, from its own thread, which would wait for the handler."""
  target = path(target)
  if not is_remote(target):
    return pathlib.Path(target)
  local = pathlib.Path(tempfile.mkdtemp(prefix="sfd_jax_")) / target.name
  local.touch()

  def upload():
    epath.Path(local).copy(target, overwrite=True)

  def every_period():
    while True:
      time.sleep(period_s)
      upload()
  threading.Thread(target=every_period, daemon=True, name="sfd_jax log upload").start()
  atexit.register(upload)
  return local


class GrowingTextFile:
  """A text file that only grows (metrics.jsonl), as a writable stream (not for logging handlers: `mirrored_file`).

  Locally each write is appended at once. Objects in a bucket cannot be appended to, so there the whole text is
  kept and the object rewritten at most every `period_s` seconds, on `flush(force=True)` and on `close()`.
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
