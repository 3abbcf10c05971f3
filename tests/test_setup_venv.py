"""launch/setup_venv.sh picks the Python it makes the venv with, offline: PATH holds only the interpreters of each
case (pyenv's real Python 3.10, or shims that answer as Python 3.x and log what they are asked), a few tools, and
stand-ins for uv, pip and curl that log their calls instead of downloading."""
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.golden import REPO

SCRIPT = REPO / "launch" / "setup_venv.sh"
PYENV_310 = Path.home() / ".pyenv" / "versions" / "3.10.13" / "bin" / "python3.10"
TOOLS = ("bash", "sh", "env", "dirname", "basename", "mkdir", "cp", "cat", "chmod")

# A Python that answers the version query as 3.{minor}, makes a venv whose python is itself, and logs every call.
PYTHON_SHIM = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$SHIM_LOG"
case "$1" in
  -c) echo "3 {minor}" ;;
  --version) echo "Python 3.{minor}.0" ;;
  -m) case "$2" in
        venv) mkdir -p "$3/bin" && cp "$0" "$3/bin/python" ;;
        pip) [ "$*" = "-m pip install -q --user uv" ] && mkdir -p "$HOME/.local/bin" &&
             cp "$UV_SHIM" "$HOME/.local/bin/uv" ;;
      esac ;;
esac
exit 0
"""
# uv: `python install` is logged, `python find` names a Python 3.12 shim that is not on PATH.
UV_SHIM = """#!/usr/bin/env bash
echo "uv $*" >> "$SHIM_LOG"
[ "$*" = "python find 3.12" ] && echo "$UV_PYTHON"
exit 0
"""
# curl of uv's installer: the "installer" it prints puts the uv stand-in in ~/.local/bin.
CURL_SHIM = """#!/usr/bin/env bash
echo "curl $*" >> "$SHIM_LOG"
echo 'mkdir -p "$HOME/.local/bin" && cp "$UV_SHIM" "$HOME/.local/bin/uv"'
"""


def write(path: Path, text: str):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(0o755)
  return path


def run(tmp_path, pythons: dict, extra="tpu", uv_on_path=False):
  """Runs the script with PATH = {name: minor version, or a real interpreter}; returns (stdout, log lines)."""
  bin_dir, tools = tmp_path / "bin", tmp_path / "tools"
  tools.mkdir()
  for tool in TOOLS:
    (tools / tool).symlink_to(shutil.which(tool))
  for name, python in pythons.items():
    if isinstance(python, Path):
      bin_dir.mkdir(exist_ok=True)
      (bin_dir / name).symlink_to(python)
    else:
      write(bin_dir / name, PYTHON_SHIM.replace("{minor}", str(python)))
  uv = write(tmp_path / "uv_shim" / "uv", UV_SHIM)
  if uv_on_path:
    write(bin_dir / "uv", UV_SHIM)
  write(bin_dir / "curl", CURL_SHIM)
  env = {"PATH": f"{bin_dir}:{tools}", "HOME": str(tmp_path / "home"), "SHIM_LOG": str(tmp_path / "log"),
         "UV_SHIM": str(uv), "UV_PYTHON": str(write(tmp_path / "uv_python" / "python3.12",
                                                    PYTHON_SHIM.replace("{minor}", "12")))}
  result = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "venv"), extra], env=env, capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  log = (tmp_path / "log").read_text().splitlines() if (tmp_path / "log").exists() else []
  return result.stdout, log


def made_by(log):
  """(the interpreter that made the venv, what the venv's pip installed)."""
  venv = [line.split()[0] for line in log if " -m venv " in line]
  pip = [line for line in log if line.startswith("python -m pip install")]
  return venv, pip


@pytest.mark.parametrize("pythons, chosen", [
    ({"python3.13": 13, "python3.12": 12, "python3": 12}, "python3.13"),
    ({"python3.12": 12, "python3.11": 11, "python3": PYENV_310}, "python3.12"),
    ({"python3.11": 11, "python3": PYENV_310}, "python3.11"),
    ({"python3": 12}, "python3"),
])
def test_the_first_python_3_11_or_newer_on_path(tmp_path, pythons, chosen):
  stdout, log = run(tmp_path, pythons)
  assert made_by(log) == ([chosen], [f"python -m pip install -q -e {REPO}[tpu]"])
  assert stdout.splitlines()[-1] == str(tmp_path / "venv" / "bin" / "python")


def test_a_python_3_10_image_gets_python_3_12_from_uv(tmp_path):
  _, log = run(tmp_path, {"python3": PYENV_310}, extra="", uv_on_path=True)
  assert [line for line in log if line.startswith("uv")] == ["uv python install 3.12", "uv python find 3.12"]
  assert made_by(log) == (["python3.12"], [f"python -m pip install -q -e {REPO}"])


def test_uv_is_installed_with_pip_when_missing(tmp_path):
  _, log = run(tmp_path, {"python3": 10}, extra="cuda12")
  assert log[:2] == ["python3 -c import sys; print(*sys.version_info[:2])", "python3 -m pip install -q --user uv"]
  assert "uv python install 3.12" in log and not any(line.startswith("curl") for line in log)
  assert made_by(log) == (["python3.12"], [f"python -m pip install -q -e {REPO}[cuda12]"])


def test_uv_comes_from_its_installer_without_any_python(tmp_path):
  _, log = run(tmp_path, {})
  assert log[0] == "curl -LsSf https://astral.sh/uv/install.sh" and "uv python install 3.12" in log
  assert made_by(log)[0] == ["python3.12"]

