"""The importer of official SFD latent shards: a small synthetic official dataset (safetensors, NCHW, float32
latents, float16 and bfloat16 DINO maps, torch stats files) survives the round trip into our format exactly."""
import json
import subprocess
import sys

import numpy as np
import pytest
torch = pytest.importorskip("torch")  # the torch extra; only the Python 3.13 tier runs without it
from safetensors.torch import save_file

from sfd_jax.data import latents, official
from sfd_jax.errors import UserError

C_TEX, C_SEM, SIDE, DINO_DIM, DINO_SIDE = 4, 3, 2, 5, 3
COUNTS = (3, 2)


def _official_shard(n, seed, dino_dtype):
  g = torch.Generator().manual_seed(seed)
  rand = lambda *shape: torch.randn(*shape, generator=g)
  return {"latents": rand(n, C_TEX, SIDE, SIDE) * 3 + 1, "latents_flip": rand(n, C_TEX, SIDE, SIDE),
          "latents_sv": rand(n, C_SEM, SIDE, SIDE) - 2, "latents_sv_flip": rand(n, C_SEM, SIDE, SIDE),
          "feats_dino": rand(n, DINO_DIM, DINO_SIDE, DINO_SIDE).to(dino_dtype),
          "feats_dino_flip": rand(n, DINO_DIM, DINO_SIDE, DINO_SIDE).to(dino_dtype),
          "labels": torch.randint(0, 1000, (n,), generator=g)}


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("official")
  shards = [_official_shard(COUNTS[0], 0, torch.float16), _official_shard(COUNTS[1], 1, torch.bfloat16)]
  for i, shard in enumerate(shards):
    save_file(shard, str(root / f"latents_rank00_shard{i:03d}.safetensors"))
  torch.save({"mean": torch.arange(C_TEX, dtype=torch.float32).reshape(1, C_TEX, 1, 1),
              "std": torch.full((1, C_TEX, 1, 1), 2.5)}, root / "latents_stats.pt")
  torch.save({"mean": -torch.ones(1, C_SEM, 1, 1), "std": torch.full((1, C_SEM, 1, 1), 0.5)},
             root / "latents_sv_stats.pt")
  return root, [{k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in s.items()} for s in shards]


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
  shard = next(latents.find_dataset(out).glob("*.array_record-00000-of-00002"))
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
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()},
              str(directory / "a.safetensors"))
    with pytest.raises(latents.DatasetError, match=message):
      official.import_official(directory, tmp_path / f"{name}_out", progress=False)
  truncated = tmp_path / "truncated"
  truncated.mkdir()
  data = next(root.glob("*.safetensors")).read_bytes()
  (truncated / "a.safetensors").write_bytes(data[:len(data) - 40])
  with pytest.raises(latents.DatasetError, match="truncated or corrupt"):
    official.import_official(truncated, tmp_path / "truncated_out", progress=False)
  torch.save({"mean": torch.zeros(1, 7, 1, 1), "std": torch.ones(1, 7, 1, 1)}, tmp_path / "wrong_stats.pt")
  with pytest.raises(latents.DatasetError, match="7 channels but the latents have 4"):
    official.import_official(root, tmp_path / "wrong_out", texture_stats=tmp_path / "wrong_stats.pt", progress=False)


def test_cli(official_dir, tmp_path):
  root, _ = official_dir
  run = lambda *args: subprocess.run([sys.executable, "-m", "sfd_jax.cli.import_official", *args],
                                     capture_output=True, text=True, timeout=120)
  done = run(f"--src={root}", f"--out={tmp_path / 'cli'}", "--dino_dtype=bfloat16")
  assert done.returncode == 0, done.stderr[-2000:]
  assert f"{sum(COUNTS)} records" in done.stdout
  assert latents.LatentSource(tmp_path / "cli")[0]["dino"].dtype == "bfloat16"
  failed = run(f"--src={tmp_path / 'nowhere'}", f"--out={tmp_path / 'x'}")
  assert failed.returncode == 2 and "error: no .safetensors shards" in failed.stderr
