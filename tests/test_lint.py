"""The repository's tracked Python files pass `ruff check` with ruff.toml (the house style, pyflakes, bugbear)."""
import subprocess
import sys

import pytest

from tests.golden import REPO


def test_ruff_check_is_clean():
  pytest.importorskip("ruff")
  listed = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True)
  tracked = [name for name in listed.stdout.splitlines() if (REPO / name).exists()]  # not those deleted, uncommitted
  # --force-exclude: ruff.toml's excludes (the golden files) hold for files named on the command line too;
  # --no-cache: the test writes nothing into the checkout.
  result = subprocess.run(
      [sys.executable, "-m", "ruff", "check", "--force-exclude", "--no-cache", "--output-format=concise", *tracked],
      cwd=REPO, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, f"ruff check found:\n{result.stdout}{result.stderr}"
