"""The importer of official SFD latent shards: a small synthetic official dataset, written as the 2025-12-21
release's `extract_features.py` writes it (safetensors shards `latents_rank{r:02d}_shard{k:03d}`, NCHW float32
latents, float16 DINO maps, int64 labels; a bfloat16 variant too) with torch-format stats files, survives the round
trip into our format exactly; a shard that is an HTML error page is one `error:` line. Written without torch (the
safetensors package's numpy API, `tests/torch_format`), so every tier runs it."""
import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from sfd_jax.data import latents, official
from sfd_jax.errors import UserError
from tests import torch_format
from tests.golden import subprocess_env

C_TEX, C_SEM, SIDE, DINO_DIM, DINO_SIDE = 4, 3, 2, 5, 3
# (file, images, DINO dtype): two processes' shards as extract_features.py names them, sorted as the official reads
SHARDS = (("latents_rank00_shard000", 3, np.float16), ("latents_rank00_shard001", 2, ml_dtypes.bfloat16),
          ("latents_rank01_shard000", 2, np.float16))
COUNTS = tuple(n for _, n, _ in SHARDS)


def _official_shard(n, seed, dino_dtype):
  rng = np.random.default_rng(seed)
  rand = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  return {"latents": rand(n, C_TEX, SIDE, SIDE) * 3 + 1, "latents_flip": rand(n, C_TEX, SIDE, SIDE),
          "labels": rng.integers(0, 1000, n, dtype=np.int64),
          "latents_sv": rand(n, C_SEM, SIDE, SIDE) - 2, "latents_sv_flip": rand(n, C_SEM, SIDE, SIDE),
          "feats_dino": rand(n, DINO_DIM, DINO_SIDE, DINO_SIDE).astype(dino_dtype),
          "feats_dino_flip": rand(n, DINO_DIM, DINO_SIDE, DINO_SIDE).astype(dino_dtype)}


def _float32(shard):
  return {k: v.astype(np.float32) if k != "labels" else v for k, v in shard.items()}


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("official")
  shards = [_official_shard(n, seed, dtype) for seed, (_, n, dtype) in enumerate(SHARDS)]
  for (name, _, _), shard in zip(SHARDS, shards):
    save_file(shard, str(root / f"{name}.safetensors"))
  torch_format.save({"mean": np.arange(C_TEX, dtype=np.float32).reshape(1, C_TEX, 1, 1),
                     "std": np.full((1, C_TEX, 1, 1), 2.5, np.float32)}, root / "latents_stats.pt")
  torch_format.save({"mean": -np.ones((1, C_SEM, 1, 1), np.float32), "std": np.full((1, C_SEM, 1, 1), 0.5, np.float32)},
                    root / "latents_sv_stats.pt")
  return root, [_float32(s) for s in shards]


@pytest.fixture(scope="module")
def imported(official_dir, tmp_path_factory):
  root, _ = official_dir
  out = tmp_path_factory.mktemp("imported")
  return out, official.import_official(root, out, progress=False)


def test_records_round_trip_exactly(official_dir, imported):
  _, shards = official_dir
  out, result = imported
  source = latents.LatentSource(out)
  assert result["records"] == len(source) == sum(COUNTS)
  assert source.spec["latent_size"] == SIDE and source.spec["dino_tokens"] == DINO_SIDE ** 2
  rows = [source[i] for i in range(len(source))]
  assert [int(r["index"]) for r in rows] == list(range(sum(COUNTS)))
  back = lambda key: np.stack([np.asarray(r[key], np.float32) for r in rows]).transpose(0, 3, 1, 2)
  for ours, theirs in (("texture", "latents"), ("texture_flip", "latents_flip"), ("semantic", "latents_sv"),
                       ("semantic_flip", "latents_sv_flip")):
    np.testing.assert_array_equal(back(ours), np.concatenate([s[theirs] for s in shards]), err_msg=ours)
  for ours, theirs in (("dino", "feats_dino"), ("dino_flip", "feats_dino_flip")):
    tokens = np.stack([np.asarray(r[ours], np.float32) for r in rows])
    maps = tokens.reshape(-1, DINO_SIDE, DINO_SIDE, DINO_DIM).transpose(0, 3, 1, 2)  # token h·side + w
    np.testing.assert_array_equal(maps, np.concatenate([s[theirs] for s in shards]), err_msg=ours)
  np.testing.assert_array_equal([int(r["label"]) for r in rows], np.concatenate([s["labels"] for s in shards]))


def test_official_stats_become_the_dataset_stats(official_dir, imported):
  root, _ = official_dir
  out, _ = imported
  stats = json.loads((latents.find_dataset(out) / "stats.json").read_text())
  assert stats["texture"]["mean"] == [0.0, 1.0, 2.0, 3.0] and stats["texture"]["std"] == [2.5] * C_TEX
  assert stats["semantic"]["mean"] == [-1.0] * C_SEM and stats["semantic"]["std"] == [0.5] * C_SEM
  assert stats["texture"]["source"].endswith("latents_stats.pt") and stats["num_samples"] == sum(COUNTS)
  meta = json.loads((latents.find_dataset(out) / "meta.json").read_text())
  assert meta["source"]["counts"] == list(COUNTS) and meta["skipped"] == []


def test_without_stats_files_the_stats_are_computed(official_dir, tmp_path):
  root, shards = official_dir
  bare = tmp_path / "bare"
  bare.mkdir()
  for f in root.glob("*.safetensors"):
    (bare / f.name).symlink_to(f)
  result = official.import_official(bare, tmp_path / "out", dino_dtype=None, progress=False)
  for key, theirs in (("texture", "latents"), ("semantic", "latents_sv")):
    values = np.concatenate([s[theirs] for s in shards]).transpose(0, 2, 3, 1).reshape(-1, C_TEX if key == "texture"
                                                                                        else C_SEM)
    np.testing.assert_allclose(result["stats"][key]["mean"], values.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(result["stats"][key]["std"], values.std(0, ddof=1), rtol=1e-6)
    assert "source" not in result["stats"][key]
  assert latents.LatentSource(tmp_path / "out").spec["dino_dtype"] is None


def test_rerun_keeps_the_shards_and_other_settings_are_refused(official_dir, imported):
  root, _ = official_dir
  out, _ = imported
  shard = next(latents.find_dataset(out).glob(f"*.array_record-00000-of-{len(SHARDS):05d}"))
  before = shard.stat().st_mtime_ns
  assert official.import_official(root, out, progress=False)["records"] == sum(COUNTS)
  assert shard.stat().st_mtime_ns == before
  with pytest.raises(latents.DatasetError, match="another record"):
    official.import_official(root, out, dino_dtype="bfloat16", progress=False)


def test_bad_shards_name_the_cause(official_dir, tmp_path):
  root, shards = official_dir
  with pytest.raises(UserError, match="no .safetensors shards"):
    official.import_official(tmp_path, tmp_path / "out")
  cases = {
      "missing": ({k: v for k, v in shards[0].items() if k != "latents_sv_flip"}, "has no latents_sv_flip"),
      "unpaired": ({k: v for k, v in shards[0].items() if k != "feats_dino_flip"}, "without its pair"),
      "shape": ({**shards[0], "latents_flip": shards[0]["latents_flip"][:2]}, "latents_flip has shape"),
  }
  for name, (arrays, message) in cases.items():
    directory = tmp_path / name
    directory.mkdir()
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(directory / "a.safetensors"))
    with pytest.raises(latents.DatasetError, match=message):
      official.import_official(directory, tmp_path / f"{name}_out", progress=False)
  truncated = tmp_path / "truncated"
  truncated.mkdir()
  data = next(root.glob("*.safetensors")).read_bytes()
  (truncated / "a.safetensors").write_bytes(data[:len(data) - 40])
  with pytest.raises(latents.DatasetError, match="truncated or corrupt"):
    official.import_official(truncated, tmp_path / "truncated_out", progress=False)
  torch_format.save({"mean": np.zeros((1, 7, 1, 1), np.float32), "std": np.ones((1, 7, 1, 1), np.float32)},
                    tmp_path / "wrong_stats.pt")
  with pytest.raises(latents.DatasetError, match="7 channels but the latents have 4"):
    official.import_official(root, tmp_path / "wrong_out", texture_stats=tmp_path / "wrong_stats.pt", progress=False)


def test_cli(official_dir, tmp_path):
  root, _ = official_dir
  run = lambda *args: subprocess.run([sys.executable, "-m", "sfd_jax.cli.import_official", *args],
                                     capture_output=True, text=True, timeout=120, env=subprocess_env())
  done = run(f"--src={root}", f"--out={tmp_path / 'cli'}", "--dino_dtype=bfloat16")
  assert done.returncode == 0, done.stderr[-2000:]
  assert f"{sum(COUNTS)} records" in done.stdout
  assert latents.LatentSource(tmp_path / "cli")[0]["dino"].dtype == "bfloat16"
  failed = run(f"--src={tmp_path / 'nowhere'}", f"--out={tmp_path / 'x'}")
  assert failed.returncode == 2 and "error: no .safetensors shards" in failed.stderr


def test_an_html_page_saved_as_a_shard_is_one_error_line(official_dir, tmp_path):
  """A failed download leaves an error page where a shard should be: its first 8 bytes read as a header length of
  about 10^18, which must be checked against the file size before anything is read."""
  root, _ = official_dir
  src = tmp_path / "src"
  src.mkdir()
  for f in root.iterdir():
    (src / f.name).symlink_to(f)
  page = src / "latents_rank01_shard001.safetensors"
  page.write_text("<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>502</body></html>\n")
  assert int.from_bytes(page.read_bytes()[:8], "little") > 10 ** 18
  failed = subprocess.run([sys.executable, "-m", "sfd_jax.cli.import_official", f"--src={src}",
                           f"--out={tmp_path / 'out'}"], capture_output=True, text=True, timeout=120,
                          env=subprocess_env())
  assert failed.returncode == 2, failed.stderr[-2000:]
  errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and str(page) in errors[0] and "not a .safetensors file" in errors[0], failed.stderr
  assert "Traceback" not in failed.stderr and "MemoryError" not in failed.stderr
  page.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00[1, 2, 3, 4, 5, 6]")  # a header that is JSON, not a table
  with pytest.raises(latents.DatasetError, match="not a .safetensors file"):
    official.read_safetensors(page)
