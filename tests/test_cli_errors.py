"""Bad input through the real command lines: one `error:` sentence naming what to fix, exit status 2, nothing
already written changed; a bug in the library keeps its traceback; --help exits 0."""
import ast
import hashlib
import json
import os
import subprocess
import sys

import jax
import pytest

from sfd_jax.convert import export
from sfd_jax.data import latents
from sfd_jax.models.texture_vae import AutoencoderKL
from tests.golden import REPO, subprocess_env
from tests.tiny import write_synthetic_latents

SMOKE = str(REPO / "configs" / "smoke.py")
CLIS = ("train", "train_semvae", "sample", "extract", "evaluate", "convert", "import_official", "demo")


def cli(name, *args, timeout=600):
  return subprocess.run([sys.executable, "-m", f"sfd_jax.cli.{name}", *args], env=subprocess_env(),
                        capture_output=True, text=True, timeout=timeout)


def user_error(result) -> str:
  """The one `error:` line of a user error (exit 2, no traceback)."""
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert result.returncode == 2 and "Traceback" not in result.stderr and len(errors) == 1, result.stderr[-2000:]
  return errors[0]


def tree_digest(path) -> dict:
  return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))
          if p.is_file()}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  """A finished smoke run with checkpoints 10 and 20, a tiny texture VAE for its 32 texture channels, and stats."""
  root = tmp_path_factory.mktemp("smoke")
  result = cli("train", f"--config={SMOKE}", f"--workdir={root / 'run'}", "--config.total_steps=20",
               "--config.ckpt_every=10", "--config.sample_every=0")
  assert result.returncode == 0, result.stderr[-3000:]
  vae = AutoencoderKL(ch=32, ch_mult=(1,), num_res_blocks=0, attn_resolutions=(), resolution=4, z_channels=32,
                      embed_dim=32)
  export.save_model(root / "vae", vae, vae.init(jax.random.key(0), *vae.dummy_inputs()))
  (root / "stats.json").write_text(json.dumps({"texture": {"mean": [0.0] * 32, "std": [1.0] * 32}}))
  return root


def sample_args(smoke, out, *extra):
  return (f"--model={smoke / 'run'}", f"--vae={smoke / 'vae'}", f"--stats={smoke / 'stats.json'}", f"--out={out}",
          "--num_images=2", "--batch_size=2", "--method=euler", "--num_steps=3", *extra)


def test_a_truncated_newest_checkpoint_falls_back_and_a_chosen_one_is_named(smoke, tmp_path):
  run = tmp_path / "run"
  subprocess.run(["cp", "-r", str(smoke / "run"), str(run)], check=True)
  for data in (run / "checkpoints" / "20" / "state").rglob("d/*"):  # a copy that stopped a third of the way
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])  # into each file (which holds the EMA varies)
  before = tree_digest(run)
  fallback = cli("sample", *sample_args(smoke, tmp_path / "out"), f"--model={run}")
  assert fallback.returncode == 0, fallback.stderr[-3000:]
  assert "checkpoint 20" in fallback.stderr and "cannot be read" in fallback.stderr
  assert "EMA weights of step 10" in fallback.stdout and len(list((tmp_path / "out" / "images").iterdir())) == 2
  assert "Event loop is closed" not in fallback.stderr
  chosen = cli("sample", *sample_args(smoke, tmp_path / "out2"), f"--model={run}", "--step=20")
  assert "error: checkpoint 20 in" in user_error(chosen) and "cannot be read" in user_error(chosen)
  missing = cli("sample", *sample_args(smoke, tmp_path / "out2"), f"--model={run}", "--step=15")
  assert "has no checkpoint 15; it has [10, 20]" in user_error(missing)
  assert tree_digest(run) == before


def test_a_workdir_guide_is_read_at_the_chosen_step(smoke, tmp_path):
  """--guide_step restores that checkpoint of a training workdir as the guide (the 80-epoch recipe's guide is the
  retrained B at 60K); a step it lacks, or a step for a guide that is no workdir, is one sentence."""
  run = smoke / "run"
  guided = cli("sample", *sample_args(smoke, tmp_path / "out"), "--step=20", f"--guide_model={run}",
               "--guide_step=10", "--cfg_scale=1.5")
  assert guided.returncode == 0, guided.stderr[-3000:]
  assert f"EMA weights of step 20 of {run}" in guided.stdout and f"EMA weights of step 10 of {run}" in guided.stdout
  missing = cli("sample", *sample_args(smoke, tmp_path / "out2"), f"--guide_model={run}", "--guide_step=15")
  assert "has no checkpoint 15; it has [10, 20]" in user_error(missing)
  export_guide = cli("sample", *sample_args(smoke, tmp_path / "out2"), f"--guide_model={smoke / 'vae'}",
                     "--guide_step=10")
  assert "is not a training workdir" in user_error(export_guide)


@pytest.mark.parametrize("command, args, expected", [
    ("train", (f"--config={SMOKE}", "--workdir={tmp}", "--config.batch_size=0"),
     "error: config.batch_size=0 must be at least 1"),
    ("train", (f"--config={SMOKE}", "--workdir={tmp}", "--config.optim.b1=1.5"),
     "error: config.optim.b1=1.5 must be in [0.0, 1.0]"),
    ("sample", ("--model=m", "--vae=v", "--stats=s", "--out={tmp}", "--batch_size=0"),
     "error: bad command line: flag --batch_size=0: "),
    ("sample", ("--model=m", "--vae=v", "--stats=s", "--out={tmp}", "--num_images=-3"),
     "error: bad command line: flag --num_images=-3: "),
    ("sample", ("--model={here}", "--vae={here}", "--stats={here}", "--out={tmp}", "--model_kwargs={depth: 2}"),
     "error: --model_kwargs must be JSON"),
    ("evaluate", ("--ref=r.npz", "--samples=s.npz", "--per_device_batch=0"),
     "error: bad command line: flag --per_device_batch=0: "),
    ("evaluate", ("--ref=r.npz", "--sample=s.npz"), "error: bad command line: Unknown command line flag 'sample'"),
    ("evaluate", ("--ref=r.npz", "--samples=s.npz", "stray"), "error: unexpected arguments ['stray']"),
    ("extract", ("--out={tmp}", "--texture_vae=t", "--dino=d", "--semvae=s", "--shard_size=0"),
     "error: bad command line: flag --shard_size=0: "),
])
def test_bad_flags_are_one_sentence(tmp_path, command, args, expected):
  result = cli(command, *(a.replace("{tmp}", str(tmp_path / "out")).replace("{here}", str(tmp_path)) for a in args))
  assert user_error(result).startswith(expected), result.stderr[-1000:]
  assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))


def test_a_corrupt_latent_shard_is_named_with_how_to_rewrite_it(tmp_path):
  write_synthetic_latents(tmp_path / "data")
  shard = next(latents.find_dataset(tmp_path / "data").glob("*-00001-of-00002"))
  data = bytearray(shard.read_bytes())
  for k in range(200, 2000, 5):  # bytes changed on disk (a bad copy)
    data[k] ^= 0xFF
  shard.write_bytes(bytes(data))
  before = tree_digest(tmp_path / "data")
  result = cli("train", f"--config={SMOKE}", f"--workdir={tmp_path / 'run'}", "--config.data.source=latents",
               f"--config.data.path={tmp_path / 'data'}", "--config.log_every=1", "--config.total_steps=8")
  message = user_error(result)
  assert shard.name in message and "is truncated or corrupt" in message and "run the same extraction" in message
  assert tree_digest(tmp_path / "data") == before


def test_a_bug_in_the_library_keeps_its_traceback(tmp_path):
  code = ("import runpy, sys; import sfd_jax.training.tasks as tasks\n"
          "def broken(cfg): raise ValueError('deliberate bug')\n"
          "tasks.sfd_task = broken\n"
          f"sys.argv = ['train', '--config={SMOKE}', '--workdir={tmp_path}']\n"
          "runpy.run_module('sfd_jax.cli.train', run_name='__main__')\n")
  result = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr, result.stderr[-2000:]
  assert "in broken" in result.stderr
  assert lines[-1].startswith("error: ValueError: deliberate bug (a bug in sfd_jax"), lines[-1]


def test_help_exits_0_and_keeps_its_example_lines():
  assert cli("sample", "--help").returncode == 0
  for name in CLIS:  # the docstrings, read without importing (each CLI defines its own flags)
    doc = ast.get_docstring(ast.parse((REPO / "sfd_jax" / "cli" / f"{name}.py").read_text()), clean=False)
    assert all(len(line) <= 120 for line in doc.splitlines()), name  # a `\`-joined example would be longer
    assert "DESIGN.md" not in doc, name


# ------------------------------------------------------------------------------------- a newcomer's first mistakes

def _unusable_directories(tmp_path):
  """{case: (a run directory that cannot be made, what the error names)}: an existing file, a path under a file (a
  parent that does not exist and cannot be made) and a path under a read-only directory (for root, who writes
  any directory, a read-only file system)."""
  (tmp_path / "notes.txt").write_text("keep me")
  if os.geteuid() == 0:
    read_only = ("/sys/sfd_jax_test/run", "Operation not permitted")
  else:
    (tmp_path / "locked").mkdir(mode=0o555)
    read_only = (str(tmp_path / "locked" / "run"), f"{tmp_path / 'locked'} is not writable")
  return {"existing file": (str(tmp_path / "notes.txt"), f"{tmp_path / 'notes.txt'} is a file, not a directory"),
          "under a file": (str(tmp_path / "notes.txt" / "run"), f"{tmp_path / 'notes.txt'} is a file, not a directory"),
          "read-only parent": read_only}


def test_a_run_directory_that_cannot_be_made_is_one_sentence(tmp_path):
  """train, sample, extract and demo first make `<dir>/logs`: a path that cannot be a directory names why, and the
  file in the way is left as it was."""
  cases = _unusable_directories(tmp_path)
  for case, (directory, why) in cases.items():
    message = user_error(cli("train", f"--config={SMOKE}", f"--workdir={directory}"))
    assert message.startswith(f"error: cannot create {directory}/logs: {why}; choose a run directory"), (case,
                                                                                                          message)
  inputs = tmp_path / "inputs"  # only their existence is checked before the directory is made
  inputs.mkdir()
  directory, why = cases["existing file"]
  for command, args in (("sample", (f"--model={inputs}", f"--vae={inputs}", f"--stats={inputs}")),
                        ("extract", (f"--texture_vae={inputs}", f"--dino={inputs}", f"--semvae={inputs}")),
                        ("demo", ("--quick",))):
    message = user_error(cli(command, *args, f"--out={directory}"))
    assert message.startswith(f"error: cannot create {directory}/logs: {why}"), (command, message)
  assert (tmp_path / "notes.txt").read_text() == "keep me"
  assert not (tmp_path / "locked").exists() or not any((tmp_path / "locked").iterdir())


def test_a_missing_config_file_is_one_sentence_from_any_directory(tmp_path):
  missing = user_error(cli("train", "--config=configs/nope.py", f"--workdir={tmp_path / 'run'}"))
  assert missing.startswith("error: --config=configs/nope.py: the config file configs/nope.py does not exist "
                            f"(relative paths are read from the current directory, {os.getcwd()})"), missing
  # Outside the repository the relative path of every example misses too: the error names the file it meant.
  outside = subprocess.run([sys.executable, "-m", "sfd_jax.cli.train", "--config", "configs/smoke.py:unused",
                            f"--workdir={tmp_path / 'run'}"], env={**subprocess_env(), "PYTHONPATH": str(REPO)},
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert user_error(outside).endswith(f"did you mean {REPO / 'configs' / 'smoke.py'}?)"), outside.stderr
  assert not (tmp_path / "run").exists()


def test_missing_inputs_and_bad_json_are_one_sentence(tmp_path):
  """A missing --model is named before anything is written (no empty <out>/logs/); a --model_kwargs that is not
  JSON is named with an example."""
  (tmp_path / "vae").mkdir()
  (tmp_path / "stats.json").write_text("{}")
  out = tmp_path / "out"
  missing = user_error(cli("sample", f"--model={tmp_path / 'nope'}", f"--vae={tmp_path / 'vae'}",
                           f"--stats={tmp_path / 'stats.json'}", f"--out={out}"))
  assert missing == f"error: --model={tmp_path / 'nope'} does not exist", missing
  assert not out.exists()
  checkpoint = tmp_path / "0400000.pt"
  checkpoint.write_bytes(b"not read: the flag is checked first")
  bad_json = user_error(cli("convert", "--kind=dit", f"--checkpoint={checkpoint}", f"--out={out}",
                            "--model_kwargs=notjson"))
  assert bad_json.startswith("error: --model_kwargs must be JSON (e.g. --model_kwargs='{\"depth\": 12}'), got "
                             "'notjson'"), bad_json
  assert not out.exists() and checkpoint.read_bytes() == b"not read: the flag is checked first"


SIGTERM_DURING_IMPORTS = '''
import os, signal, sys

class SigtermOnImport:
  """Sends this process SIGTERM as it first imports `{module}`: in the middle of a command's start-up imports."""
  def find_spec(self, name, path=None, target=None):
    if name == "{module}":
      sys.meta_path.remove(self)
      os.kill(os.getpid(), signal.SIGTERM)
    return None

sys.meta_path.insert(0, SigtermOnImport())
'''


@pytest.mark.parametrize("module", ["absl", "jax"])
def test_sigterm_during_the_imports_is_a_preemption(tmp_path, module):
  """The earliest SIGTERM a command can take as a preemption: as it imports absl (its first import after the
  `sfd_jax.cli` package) and JAX (seconds of loading), before `common.run` installs its handler."""
  (tmp_path / "site").mkdir()
  (tmp_path / "site" / "sitecustomize.py").write_text(SIGTERM_DURING_IMPORTS.replace("{module}", module))
  env = {**subprocess_env(), "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO)])}
  result = subprocess.run([sys.executable, "-m", "sfd_jax.cli.train", f"--config={SMOKE}",
                           f"--workdir={tmp_path / 'run'}"], env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 75 and "Traceback" not in result.stderr, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == ["preempted: stopped by SIGTERM: run the same command again to resume"]
  assert not (tmp_path / "run").exists()
