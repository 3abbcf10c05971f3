"""The documentation works: every command and snippet of README.md and docs/*.md runs at tiny sizes or is marked
with why it cannot run here, the CI commands are `.ci/run`'s, and every relative link and #anchor resolves.

The convention for the pages is docs/README.md "Commands in these pages"; tests/docs_driver.py runs a page.
"""
import dataclasses
import json
import re
import subprocess
import sys

import pytest

from tests.golden import REPO, subprocess_env

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SLOW_PAGES = {"data.md", "planning.md", "performance.md", "research.md"}  # the full-size tools, cut down
NEEDS = {"TPU", "GPU", "Colab", "network", "ImageNet", "released weights", "the demo's output", "a long run",
         "the test suite"}
RUN = {"bash", "python"}
NOT_CODE = {"text"}
ANNOTATION = re.compile(r"^<!-- (needs|test): (.+) -->$")
FENCE = re.compile(r"^```(\S*)\s*$")
LINKED_DIRS = ("configs", "benchmarks", "launch", "tests")  # what the pages' commands read from the checkout


@dataclasses.dataclass(frozen=True)
class Block:
  where: str      # page:line of the opening fence
  language: str
  code: str
  needs: str      # why it is not run here ("" if it is)
  flags: str      # appended to its .venv/bin/python commands


def _name(page) -> str:
  return str(page.relative_to(REPO))


def blocks(page) -> list[Block]:
  """The fenced blocks of a page with the annotation on the line just before each; a stray annotation or an
  unclosed fence is an error."""
  lines, found, i = page.read_text().splitlines(), [], 0
  while i < len(lines):
    annotation = ANNOTATION.match(lines[i])
    if annotation and not (i + 1 < len(lines) and FENCE.match(lines[i + 1])):
      raise AssertionError(f"{_name(page)}:{i + 1}: an annotation must be the line just before a code block")
    fence = FENCE.match(lines[i])
    if not fence:
      i += 1
      continue
    end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
    assert end is not None, f"{_name(page)}:{i + 1}: unclosed code block"
    before = ANNOTATION.match(lines[i - 1]) if i else None
    kind, value = before.groups() if before else ("", "")
    found.append(Block(f"{_name(page)}:{i + 1}", fence.group(1), "\n".join(lines[i + 1:end]) + "\n",
                       value if kind == "needs" else "", value if kind == "test" else ""))
    i = end + 1
  return found


def test_every_block_says_what_it_is():
  """A block is code that runs (bash, python) or is marked with a known reason, or it is text; commands run the
  venv's interpreter, never a bare `python`, which is not the venv's after the install line."""
  bare_python = re.compile(r"(?<![\w/.-])python[\d.]* (-m sfd_jax|-m pytest|benchmarks/)")
  for page in PAGES:
    for block in blocks(page):
      assert block.language in RUN | NOT_CODE, f"{block.where}: a code block needs a language: one of " \
                                              f"{sorted(RUN | NOT_CODE)}"
      assert not block.needs or block.needs in NEEDS, f"{block.where}: needs: {block.needs!r} is not one of {NEEDS}"
      assert not (block.needs and block.flags), block.where
      if block.language == "bash":
        assert not bare_python.search(block.code), f"{block.where}: run .venv/bin/python, not a bare python"


def test_readme_is_a_front_page_with_ci_commands():
  """≤ 200 lines, and its test commands are exactly the two tiers of .ci/run."""
  readme = (REPO / "README.md").read_text()
  assert len(readme.splitlines()) <= 200
  tiers = re.findall(r"^  '(.+)'$", (REPO / ".ci/run").read_text(), flags=re.M)
  assert len(tiers) == 2, tiers
  suite = [line for b in blocks(REPO / "README.md") if b.needs == "the test suite" for line in b.code.splitlines()]
  for command in tiers:
    assert command in suite, f"README's test command differs from .ci/run's: {command}"


def _anchors(page) -> set[str]:
  """GitHub's heading anchors: lowercased, punctuation dropped, spaces to '-', repeats numbered."""
  text, seen = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S), {}
  for heading in re.findall(r"^#+ (.+)$", text, flags=re.M):
    slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
    seen[slug if slug not in seen else f"{slug}-{seen[slug]}"] = seen.get(slug, 0) + 1
  return set(seen)


def test_links_resolve():
  """Every relative link of the pages names a file of the checkout, and every #anchor a heading of its page."""
  link = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
  broken = []
  for page in PAGES:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    for target in link.findall(re.sub(r"`[^`\n]*`", "", text)):
      if re.match(r"[a-z]+:", target):
        continue  # an external URL: not fetched
      path, _, anchor = target.partition("#")
      file = (page.parent / path).resolve() if path else page
      if not file.exists() or not file.is_relative_to(REPO):
        broken.append(f"{_name(page)}: {target} (no such file)")
      elif anchor and (file.suffix != ".md" or anchor not in _anchors(file)):
        broken.append(f"{_name(page)}: {target} (no such heading)")
  assert not broken, broken


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  """The working directory all pages share, with the checkout's configs, benchmarks, launch scripts and tests."""
  root = tmp_path_factory.mktemp("docs")
  for name in LINKED_DIRS:
    (root / name).symlink_to(REPO / name)
  return root


@pytest.mark.parametrize("page", [pytest.param(p, id=_name(p), marks=[pytest.mark.slow] if p.name in SLOW_PAGES
                                               else []) for p in PAGES])
def test_page_runs(page, workspace):
  """The page's runnable blocks, in order, in the shared workspace (tests/docs_driver.py); marked blocks are not run."""
  runnable = [dataclasses.asdict(b) for b in blocks(page) if b.language in RUN and not b.needs]
  if not runnable:
    pytest.skip("no runnable block")
  spec = workspace / f".{page.stem}_blocks.json"
  spec.write_text(json.dumps({"python": sys.executable, "blocks": runnable}))
  env = subprocess_env()
  env["PYTHONPATH"] = f"{REPO}:{env.get('PYTHONPATH', '')}".rstrip(":")
  result = subprocess.run([sys.executable, str(REPO / "tests" / "docs_driver.py"), str(spec)], cwd=workspace,
                          env=env, capture_output=True, text=True, timeout=850)
  assert result.returncode == 0, (result.stdout[-6000:] + result.stderr[-6000:])
