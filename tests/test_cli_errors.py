"""Bad input through the real command lines: one `error:` sentence naming what to fix, exit status 2, nothing
already written changed; a bug in the library keeps its traceback; --help exits 0."""
import ast
import hashlib
import json
import subprocess
import sys

import jax
import pytest

from sfd_jax.convert import export
from sfd_jax.data import latents
from sfd_jax.models.texture_vae import AutoencoderKL
from tests.golden import REPO, subprocess_env

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
    ("sample", ("--model=m", "--vae=v", "--stats=s", "--out={tmp}", "--model_kwargs={depth: 2}"),
     "error: --model_kwargs must be JSON"),
    ("evaluate", ("--ref=r.npz", "--samples=s.npz", "--per_device_batch=0"),
     "error: bad command line: flag --per_device_batch=0: "),
    ("evaluate", ("--ref=r.npz", "--sample=s.npz"), "error: bad command line: Unknown command line flag 'sample'"),
    ("evaluate", ("--ref=r.npz", "--samples=s.npz", "stray"), "error: unexpected arguments ['stray']"),
    ("extract", ("--out={tmp}", "--texture_vae=t", "--dino=d", "--semvae=s", "--shard_size=0"),
     "error: bad command line: flag --shard_size=0: "),
])
def test_bad_flags_are_one_sentence(tmp_path, command, args, expected):
  result = cli(command, *(a.replace("{tmp}", str(tmp_path / "out")) for a in args))
  assert user_error(result).startswith(expected), result.stderr[-1000:]
  assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))


def test_a_corrupt_latent_shard_is_named_with_how_to_rewrite_it(tmp_path):
  spec = latents.record_spec(latent_size=4, texture_channels=32, semantic_channels=16, dino_tokens=16, dino_dim=32)
  source = latents.SyntheticLatents(64, spec, num_classes=10)
  writer = latents.LatentWriter(tmp_path / "data", 2, spec)
  writer.write_shard(0, [source[i] for i in range(32)])
  writer.write_shard(1, [source[i] for i in range(32, 64)])
  writer.finish()
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
