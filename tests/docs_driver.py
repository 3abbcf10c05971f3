"""Runs one documentation page's blocks in order, as a reader would (see docs/README.md "Commands in these pages").

  python tests/docs_driver.py BLOCKS.json

BLOCKS.json: {"python": interpreter standing for .venv/bin/python, "blocks": [{"where", "language", "code",
"flags"}]}. The working directory is the workspace all pages share. A shell block runs command by command (a
line, with its continuation lines); `.docs_done` there lists the commands already run, which are not run again.
Python blocks share one namespace, like notebook cells. Exits 1 naming the first block that failed.
"""
import hashlib
import json
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

DONE = Path(".docs_done")


def shell_commands(code: str, python: str, flags: str) -> list[str]:
  """The block's commands (continuation lines joined, comments dropped), `.venv/bin/python` replaced by `python`
  and `flags` appended to each command that runs it."""
  commands = []
  for line in code.replace("\\\n", " ").splitlines():
    line = line.partition("#")[0].rstrip() if line.lstrip().startswith("#") else line.partition(" #")[0].rstrip()
    if not line:
      continue
    if flags and ".venv/bin/python" in line:
      line = f"{line} {flags}"
    commands.append(line.replace(".venv/bin/python", shlex.quote(python)))
  return commands


def main(spec_path: str) -> int:
  spec = json.loads(Path(spec_path).read_text())
  done = set(DONE.read_text().split()) if DONE.exists() else set()
  namespace = {"__name__": "__main__"}
  for block in spec["blocks"]:
    print(f"=== {block['where']} ({block['language']}), {time.strftime('%H:%M:%S')}", flush=True)
    if block["language"] == "python":
      try:
        exec(compile(block["code"], block["where"], "exec"), namespace)
      except Exception:
        traceback.print_exc()
        print(f"FAILED: the python block at {block['where']}", flush=True)
        return 1
      continue
    for command in shell_commands(block["code"], spec["python"], block["flags"]):
      key = hashlib.sha256(command.encode()).hexdigest()
      print(f"$ {command}", flush=True)
      if key in done:
        print("(already run in this workspace)", flush=True)
        continue
      if subprocess.run(["bash", "-e", "-c", command]).returncode:
        print(f"FAILED: the bash block at {block['where']}", flush=True)
        return 1
      done.add(key)
      DONE.write_text("\n".join(sorted(done)))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1]))
