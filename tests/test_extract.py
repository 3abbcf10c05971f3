"""Extraction end to end on CPU with tiny random-weight encoders: records and stats read back and checked against
the encoders applied to the cropped images, unreadable images skipped and listed, resume after a kill, the
command line feeding the training pipeline, and the 512 px layout (2×2 tiles of 256 px) training and sampling the
512 px config."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sfd_jax import sharding as shd
from sfd_jax.convert import export
from sfd_jax.data import extract, images, latents
from sfd_jax.errors import UserError
from sfd_jax.models.dinov2 import DINOv2, repa_features
from sfd_jax.models.semvae import SemVAE
from sfd_jax.models.texture_vae import AutoencoderKL
from sfd_jax.training import config as config_lib, tasks
from tests.golden import REPO, free_port, subprocess_env

SETTINGS = extract.Settings(shard_size=4, batch_size=2, seed=11)
BROKEN = 6  # index of the corrupt file in the folder below


def _random_params(model, seed):
  """Random float32 params made in numpy (no compilation): norm scales and layer scales 1, the rest small."""
  template = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())["params"]
  rng = np.random.default_rng(seed)
  leaf = lambda path, x: (np.ones(x.shape, np.float32) if path[-1].key in ("scale", "gamma")
                          else (0.05 * rng.standard_normal(x.shape)).astype(np.float32))
  return {"params": jax.tree_util.tree_map_with_path(leaf, template)}


def _tiny_encoders(dino_seed=1):
  texture = AutoencoderKL(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, attn_resolutions=(), z_channels=4,
                          embed_dim=4)
  dino = DINOv2(image_size=224, hidden_size=32, depth=1, num_heads=2)
  semvae = SemVAE(feature_dim=32, latent_channels=3, hidden_size=16, encoder_depth=1, decoder_depth=1, num_heads=2,
                  grid_size=16)
  return {"texture": extract.make_encoder(texture, _random_params(texture, 0)),
          "dino": extract.make_encoder(dino, _random_params(dino, dino_seed)),
          "semvae": extract.make_encoder(semvae, _random_params(semvae, 2))}


@pytest.fixture(scope="module")
def encoders():
  return _tiny_encoders()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """Two classes of digits at several sizes and aspect ratios, and one corrupt file (index 6)."""
  root = tmp_path_factory.mktemp("images")
  digits = images.DigitsImages(size=64)
  sizes = [(256, 256), (300, 256), (256, 330), (400, 400)]
  for i in range(8):
    name = f"{'ab'[i // 4]}/{i % 4 * 2:02d}.png"
    (root / name).parent.mkdir(exist_ok=True)
    Image.fromarray(digits[i]["image"]).resize(sizes[i % 4], resample=Image.BICUBIC).save(root / name)
  (root / "b" / "03_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
  return root


@pytest.fixture(scope="module")
def dataset(folder, encoders, tmp_path_factory):
  out = tmp_path_factory.mktemp("latents")
  return out, extract.extract(images.FolderImages(folder), encoders, out, SETTINGS, progress=False)


def _records(out):
  source = latents.LatentSource(out)
  return [source[i] for i in range(len(source))]


def test_records_are_the_encoders_of_the_cropped_images(folder, encoders, dataset):
  out, result = dataset
  records = _records(out)
  source = images.FolderImages(folder)
  good = [i for i in range(len(source)) if i != BROKEN]
  assert result["records"] == len(records) == 8 and [int(r["index"]) for r in records] == good
  assert [int(r["label"]) for r in records] == [source.labels[i] for i in good]
  crops = np.stack([images.adm_center_crop(source[i]["image"], 256) for i in good])
  both = np.concatenate([crops, crops[:, :, ::-1]])
  keys = [jax.random.fold_in(jax.random.key(SETTINGS.seed), i) for i in good]
  noise = lambda shape, stream: jnp.stack([jax.random.normal(jax.random.fold_in(k, stream), shape) for k in keys])

  @jax.jit
  def reference(variables, both):
    tex_mean, tex_logvar = encoders["texture"].model.apply(variables["texture"], both / 127.5 - 1.0, method="encode")
    tokens = repa_features(encoders["dino"].model, variables["dino"], both)
    sem_mean, sem_logvar = encoders["semvae"].model.apply(variables["semvae"], tokens.reshape(-1, 16, 16, 32),
                                                          method="encode")
    return tex_mean, jnp.exp(0.5 * tex_logvar), tokens, sem_mean, jnp.exp(0.5 * sem_logvar)

  tex_mean, tex_std, tokens, sem_mean, sem_std = reference({k: e.variables for k, e in encoders.items()}, both)
  n = len(good)
  expected = {
      "texture": tex_mean[:n] + tex_std[:n] * noise((16, 16, 4), 0),
      "texture_flip": tex_mean[n:] + tex_std[n:] * noise((16, 16, 4), 1),
      "semantic": sem_mean[:n] + sem_std[:n] * noise((16, 16, 3), 2),
      "semantic_flip": sem_mean[n:] + sem_std[n:] * noise((16, 16, 3), 3),
      "dino": tokens[:n], "dino_flip": tokens[n:]}
  for key, value in expected.items():
    stored = np.stack([r[key] for r in records])
    assert stored.dtype == np.float16, key
    np.testing.assert_allclose(stored.astype(np.float32), value, rtol=2e-3, atol=2e-3, err_msg=key)
  assert float(jnp.abs(tex_std).max()) > 1e-3  # the noise term matters: these are samples, not means
  stats = json.loads((latents.find_dataset(out) / "stats.json").read_text())
  for key in ("texture", "semantic"):
    values = np.asarray(expected[key]).reshape(-1, np.asarray(expected[key]).shape[-1])
    np.testing.assert_allclose(stats[key]["mean"], values.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats[key]["std"], values.std(0, ddof=1), rtol=1e-4)
  assert stats["num_samples"] == 8


def test_meta_lists_skipped_images_and_encoders(folder, encoders, dataset):
  out, result = dataset
  meta = json.loads((latents.find_dataset(out) / "meta.json").read_text())
  assert [s["index"] for s in meta["skipped"]] == [BROKEN] == [s["index"] for s in result["skipped"]]
  assert meta["skipped"][0]["reason"] and meta["skipped"][0]["file"] == str(folder / "b" / "03_broken.png")
  assert meta["source"]["class_names"] == ["a", "b"] and meta["num_images"] == 9 and meta["num_records"] == 8
  assert {k: v["sha256"] for k, v in meta["encoders"].items()} == {k: e.info["sha256"] for k, e in encoders.items()}
  assert meta["texture_latent"] == "sample" and meta["record"]["dino_dtype"] == "float16"


class Killed(BaseException):
  """Stands for the process being killed: nothing in the extraction may catch it."""


class DiesAt:
  def __init__(self, source, index):
    self.source, self.index = source, index

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    if index == self.index:
      raise Killed()
    return self.source[index]

  def describe(self):
    return self.source.describe()


def test_resume_after_a_kill_gives_the_same_dataset(folder, encoders, dataset, tmp_path):
  clean, _ = dataset
  source = images.FolderImages(folder)
  with pytest.raises(Killed):
    extract.extract(DiesAt(source, 5), encoders, tmp_path, SETTINGS, progress=False)
  writer = latents.LatentWriter(tmp_path, 3, latents.LatentSource(clean).spec)
  assert writer.is_done(0) and not writer.is_done(1) and not writer.is_done(2)
  shard0 = next(writer.directory.glob("*-00000-of-00003"))
  before = os.stat(shard0).st_mtime_ns
  # What a SIGKILL can leave: a half-written temporary file, a shard file whose sidecar was never written.
  shard1 = writer.directory / shard0.name.replace("00000-of", "00001-of")
  (writer.directory / f".{shard1.stem}.tmp{shard1.suffix}").write_bytes(b"half a shard")
  (writer.directory / shard0.name.replace("00000-of", "00002-of")).write_bytes(b"no sidecar")
  extract.extract(source, encoders, tmp_path, SETTINGS, progress=False)
  assert os.stat(shard0).st_mtime_ns == before  # kept, not redone
  resumed, expected = _records(tmp_path), _records(clean)
  assert len(resumed) == len(expected)
  for got, want in zip(resumed, expected):
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  for name in ("stats.json", "meta.json"):
    assert (json.loads((latents.find_dataset(tmp_path) / name).read_text())
            == json.loads((latents.find_dataset(clean) / name).read_text())), name
  with pytest.raises(latents.DatasetError, match="another seed"):
    extract.extract(source, encoders, tmp_path, extract.Settings(shard_size=4, batch_size=2, seed=12),
                    progress=False)


def test_encoders_that_do_not_fit_are_refused(encoders):
  wider = encoders["semvae"].model.clone(feature_dim=encoders["semvae"].model.feature_dim + 1)
  with pytest.raises(UserError, match="SemVAE reads .*-d features but DINOv2 gives"):
    extract.latent_layout(encoders["texture"], encoders["dino"], extract.Encoder(wider, {}, {}), 256)
  layout = extract.latent_layout(encoders["texture"], encoders["dino"], encoders["semvae"], 384)
  assert layout["dino_tokens"] == layout["latent_size"] ** 2  # the DINO tokens follow the latent grid
  layout = extract.latent_layout(encoders["texture"], encoders["dino"], encoders["semvae"], 512)
  assert layout["latent_size"] == 32 and layout["dino_tokens"] == 32 ** 2  # 2×2 tiles of 16×16 tokens
  with pytest.raises(UserError, match="33×33, which does not split into the 2×2 tiles"):
    extract.latent_layout(encoders["texture"], encoders["dino"], encoders["semvae"], 528)
  other = _tiny_encoders(dino_seed=5)["dino"]
  semvae = extract.Encoder(encoders["semvae"].model, encoders["semvae"].variables,
                           {**encoders["semvae"].info, "trained_on": {"dino_sha256": other.info["sha256"]}})
  with pytest.raises(UserError, match="trained on features of DINOv2 weights"):
    extract.latent_layout(encoders["texture"], encoders["dino"], semvae, 256)
  with pytest.raises(UserError, match="multiple of this host's"):
    extract.extract(images.DigitsImages(), encoders, "/nonexistent", extract.Settings(batch_size=0))
  with pytest.raises(UserError, match="train_semvae"):
    extract.load_encoder("semvae", "/nonexistent/semvae")


def test_two_hosts_of_two_devices_write_the_same_dataset(folder, encoders, dataset, tmp_path):
  """The command line as two jax.distributed processes with two CPU devices each: each writes its shards, process
  0 finishes; the result equals the single-device dataset (up to float16 rounding of differently split batches)."""
  clean, _ = dataset
  paths = {kind: export.save_model(tmp_path / kind, e.model, e.variables) for kind, e in encoders.items()}
  command = [sys.executable, "-m", "sfd_jax.cli.extract", "--source=folder", f"--path={folder}",
             f"--out={tmp_path / 'data'}", "--shard_size=4", "--batch_size=2", "--seed=11",
             f"--texture_vae={paths['texture']}", f"--dino={paths['dino']}", f"--semvae={paths['semvae']}",
             f"--coordinator=localhost:{free_port()}", "--num_processes=2"]
  env = subprocess_env(2)
  workers = [subprocess.Popen(command + [f"--process_id={i}"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [w.communicate(timeout=300) for w in workers]
  for worker, (_, err) in zip(workers, outputs):
    assert worker.returncode == 0, err[-3000:]
  assert "8 records" in outputs[0][0] and "1 unreadable images skipped" in outputs[0][0]
  assert "img/s" in outputs[0][1] and "img/s" not in outputs[1][1]  # one progress bar, on process 0
  got, want = _records(tmp_path / "data"), _records(clean)
  assert [int(r["index"]) for r in got] == [int(r["index"]) for r in want]
  for a, b in zip(got, want):
    for key in ("texture", "texture_flip", "semantic", "semantic_flip", "dino", "dino_flip"):
      np.testing.assert_allclose(a[key].astype(np.float32), b[key].astype(np.float32), rtol=2e-3, atol=2e-3,
                                 err_msg=key)
  meta = json.loads((latents.find_dataset(tmp_path / "data") / "meta.json").read_text())
  assert [item["index"] for item in meta["skipped"]] == [BROKEN]
  failed = subprocess.run(command[:-2] + [f"--semvae={paths['texture']}"], capture_output=True, text=True,
                          timeout=300, env=env)
  assert failed.returncode == 2 and "not the SemVAE expected as the semvae encoder" in failed.stderr


def test_help_states_the_official_defaults():
  shown = subprocess.run([sys.executable, "-m", "sfd_jax.cli.extract", "--help"], capture_output=True, text=True,
                         timeout=120, env=subprocess_env())
  text = " ".join(shown.stdout.split())
  assert shown.returncode == 0 and "--semantic_latent: <sample|mean>: SemVAE posterior sample (the official" in text
  assert text.split("--semantic_latent")[1].split("--")[0].rstrip().endswith("(default: 'sample')")
  assert "2×2 tiles of 256 px" in text


def test_images_instead_of_dino_tokens_feed_the_training_pipeline(encoders, tmp_path):
  settings = extract.Settings(shard_size=4, batch_size=2, dino_dtype=None, max_images=6)
  result = extract.extract(images.DigitsImages(), encoders, tmp_path, settings, progress=False)
  assert result["records"] == 6
  cfg = config_lib.base_config()
  cfg.model = config_lib.model_config("S", input_size=16, in_channels=7, num_classes=10, repa_z_dim=32)
  cfg.loss.semantic_channels = 3
  cfg.data.path = str(tmp_path)
  source = tasks.latent_source(cfg.data, cfg.model, cfg.loss)  # the training application's reader and checks
  assert source.spec["image_size"] == 256 and not source.spec["dino_dtype"] and "dino" not in source[0]
  with pytest.raises(latents.DatasetError, match="stores no DINO tokens"):
    latents.latent_pipeline(source, source.stats, global_batch_size=6, seed=0)
  batch = next(latents.latent_pipeline(source, source.stats, global_batch_size=6, seed=0, shuffle=False,
                                       use_dino=False, use_images=True, prefetch=0))
  assert batch["x"].shape == (6, 16, 16, 7) and batch["image"].shape == (6, 256, 256, 3)
  digits, mean, std = images.DigitsImages(), *(np.asarray(source.stats["texture"][k]) for k in ("mean", "std"))
  flips = []
  for image, index, x in zip(batch["image"], batch["index"], batch["x"]):
    crop = images.adm_center_crop(digits[int(index)]["image"], 256)
    flips.append(not np.array_equal(image, crop))
    np.testing.assert_array_equal(image, crop[:, ::-1] if flips[-1] else crop)
    texture = np.asarray(source[int(index)]["texture_flip" if flips[-1] else "texture"], np.float32)
    np.testing.assert_allclose(x[..., :4], (texture - mean) / std, rtol=1e-5, atol=1e-5)
  assert any(flips) and not all(flips)
  # The SFD task computes the REPA targets from those images on device, with the configured DINOv2.
  cfg.dino.path = str(export.save_model(tmp_path / "dino", encoders["dino"].model, encoders["dino"].variables))
  cfg.batch_size = 6
  task = tasks.sfd_task(cfg)
  host = next(task.make_data(None, 0))
  device = task.preprocess(shd.shard_batch(shd.make_mesh(), {k: v for k, v in host.items() if k != "index"}))
  assert "image" not in device and task.flops_per_sample > cfg.model.hidden_size
  np.testing.assert_allclose(np.asarray(device["dino"]), np.asarray(
      repa_features(encoders["dino"].model, encoders["dino"].variables, host["image"])), atol=1e-5)


@pytest.mark.slow
def test_512_px_dataset_trains_and_samples_the_512_config(encoders, tmp_path):
  """--resolution=512 as the official: 32×32 texture latents, DINO tokens and semantic latents from 2×2 tiles of
  256 px (each tile's tokens equal to the 256 px extraction of that tile); `configs/sfd_xl.py:512`, shrunk to a
  tiny model, trains on it through `cli.train` and samples 512 px images through `cli.sample`."""
  digits = images.DigitsImages(size=512)
  settings = extract.Settings(resolution=512, shard_size=4, batch_size=2, max_images=4, semantic_latent="mean",
                              latent_dtype="float32", dino_dtype="float16")
  assert extract.extract(digits, encoders, tmp_path / "data", settings, progress=False)["records"] == 4
  source = latents.LatentSource(tmp_path / "data")
  assert source.spec["latent_size"] == 32 and source.spec["dino_tokens"] == 32 * 32
  assert json.loads((latents.find_dataset(tmp_path / "data") / "plan.json").read_text())["dino_tiles"] == 2
  record = source[1]
  tiles = extract.to_tiles(images.adm_center_crop(digits[1]["image"], 512)[None], 2)  # (4, 256, 256, 3)
  per_tile = extract.encode_images({k: e.variables for k, e in encoders.items()}, tiles, np.zeros(4, np.int32), 0,
                                   texture=encoders["texture"].model, dino=encoders["dino"].model,
                                   semvae=encoders["semvae"].model, texture_mode="mean", semantic_mode="mean",
                                   dino_dtype=jnp.dtype(jnp.float32))
  dino = np.asarray(record["dino"], np.float32).reshape(32, 32, -1)
  for p1 in range(2):
    for p2 in range(2):
      where = np.s_[16 * p1:16 * (p1 + 1), 16 * p2:16 * (p2 + 1)]
      np.testing.assert_allclose(record["semantic"][where], per_tile["semantic"][2 * p1 + p2], atol=1e-5, rtol=1e-5)
      np.testing.assert_allclose(dino[where], np.asarray(per_tile["dino"][2 * p1 + p2]).reshape(16, 16, -1),
                                 atol=2e-3, rtol=2e-3)  # float16 storage
  tiny = ["model.hidden_size=64", "model.depth=2", "model.num_heads=2", "model.repa_depth=1",
          "model.repa_projector_dim=64", "model.repa_z_dim=32", "model.in_channels=7", "model.num_classes=10",
          "model.dtype=float32", "model.remat_policy=dots_with_no_batch_dims_saveable", "mesh.data=-1", "mesh.fsdp=1",
          "loss.semantic_channels=3", f"data.path={tmp_path / 'data'}", "batch_size=4", "total_steps=2",
          "log_every=1", "ckpt_every=2"]
  train = subprocess.run([sys.executable, "-m", "sfd_jax.cli.train", f"--config={REPO / 'configs/sfd_xl.py'}:512",
                          f"--workdir={tmp_path / 'run'}", *[f"--config.{o}" for o in tiny]],
                         capture_output=True, text=True, timeout=600, env=subprocess_env())
  assert train.returncode == 0, train.stderr[-3000:]
  assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["input_size"] == 32
  vae = export.save_model(tmp_path / "vae", encoders["texture"].model, encoders["texture"].variables)
  sample = subprocess.run([sys.executable, "-m", "sfd_jax.cli.sample", f"--model={tmp_path / 'run'}", f"--vae={vae}",
                           f"--stats={tmp_path / 'data'}", f"--out={tmp_path / 'samples'}", "--num_images=2",
                           "--batch_size=2", "--method=euler", "--num_steps=3", "--labels=random"],
                          capture_output=True, text=True, timeout=600, env=subprocess_env())
  assert sample.returncode == 0, sample.stderr[-3000:]
  pictures = np.load(tmp_path / "samples" / "samples.npz")["arr_0"]
  assert pictures.shape == (2, 512, 512, 3) and pictures.dtype == np.uint8
