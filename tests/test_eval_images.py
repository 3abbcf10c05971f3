"""Image sources of the evaluator: streamed ADM .npz batches, folders, the ADM centre crop, bad inputs."""
import zipfile

import numpy as np
import pytest
from PIL import Image

from sfd_jax.eval.images import FolderImages, NpzImages, Subset, digest, open_images
from sfd_jax.eval.reference import read_reference


@pytest.fixture
def batch(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (11, 6, 5, 3), dtype=np.uint8)
  np.savez(tmp_path / "batch.npz", arr_0=images, arr_1=np.arange(11))
  return tmp_path / "batch.npz", images


def test_npz_is_streamed_in_any_order(batch):
  path, images = batch
  source = open_images(path)
  assert isinstance(source, NpzImages) and len(source) == 11 and source.shape == (6, 5, 3)
  np.testing.assert_array_equal(source.read(np.arange(0, 4)), images[:4])
  np.testing.assert_array_equal(source.read([5, 6, 9]), images[[5, 6, 9]])  # skips forward
  np.testing.assert_array_equal(source.read([1, 10]), images[[1, 10]])  # backwards: reopens
  np.testing.assert_array_equal(Subset(source, [7, 2]).read([0, 1]), images[[2, 7]])


def test_compressed_npz_and_digest(tmp_path, batch):
  path, images = batch
  np.savez_compressed(tmp_path / "small.npz", arr_0=images)
  np.testing.assert_array_equal(open_images(tmp_path / "small.npz").read(range(11)), images)
  import hashlib
  assert digest(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_bad_batches_say_what_is_wrong(tmp_path, batch):
  path, images = batch
  np.savez(tmp_path / "float.npz", arr_0=images.astype(np.float32))
  with pytest.raises(ValueError, match="uint8 images"):
    open_images(tmp_path / "float.npz")
  np.savez(tmp_path / "other.npz", samples=images)
  with pytest.raises(ValueError, match="no 'arr_0'"):
    open_images(tmp_path / "other.npz")
  (tmp_path / "junk.npz").write_bytes(b"junk")
  with pytest.raises(ValueError, match="corrupt"):
    open_images(tmp_path / "junk.npz")
  with zipfile.ZipFile(path) as zf:  # an npz whose image array is cut short
    data = zf.read("arr_0.npy")
  with zipfile.ZipFile(tmp_path / "cut.npz", "w") as zf:
    zf.writestr("arr_0.npy", data[:-40])
  with pytest.raises(ValueError, match="truncated"):
    open_images(tmp_path / "cut.npz").read(range(11))
  with pytest.raises(FileNotFoundError, match="folder of images"):
    open_images(tmp_path / "missing.npz")
  with pytest.raises(ValueError, match="neither images"):
    read_reference(tmp_path / "other.npz")
  np.savez(tmp_path / "half.npz", mu=np.zeros(3))
  with pytest.raises(ValueError, match="mu without sigma"):
    read_reference(tmp_path / "half.npz")


def test_folder_reads_sorted_images_and_checks_sizes(tmp_path):
  images = np.random.default_rng(1).integers(0, 256, (3, 8, 10, 3), dtype=np.uint8)
  for i, image in enumerate(images):
    Image.fromarray(image).save(tmp_path / f"{i:06d}.png")
  source = open_images(tmp_path)
  assert isinstance(source, FolderImages) and source.shape == (8, 10, 3)
  np.testing.assert_array_equal(source.read([0, 2]), images[[0, 2]])
  Image.new("RGB", (12, 8)).save(tmp_path / "sub.png")
  with pytest.raises(ValueError, match="centre-crop"):
    open_images(tmp_path).read(range(4))
  assert open_images(tmp_path, image_size=4).read(range(4)).shape == (4, 4, 4, 3)


def test_tfds_split_is_read_through_data_source():
  tfds = pytest.importorskip("tensorflow_datasets")
  records = [{"image": np.full((10 + i, 12, 3), 40 * i, np.uint8), "label": i} for i in range(5)]  # mixed sizes
  with tfds.testing.mock_data(num_examples=5, as_data_source_fn=lambda *args, **kwargs: records):
    source = open_images("tfds:imagenette:train", image_size=8)
    assert len(source) == 5 and source.shape == (8, 8, 3) and digest(source) is None
    np.testing.assert_array_equal(source.read([1, 4])[:, 0, 0, 0], [40, 160])
