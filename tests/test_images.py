"""Image pipelines: shapes, value ranges, resumable iterators, disjoint splits, PNG grids."""

import io
import pathlib
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from md4.data import images

H, W = 6, 5


def numbered_images(count: int, channels: int, offset: int) -> np.ndarray:
  """uint8 [count, H, W, C]; pixel (0, 0) holds the image's id, the rest are random."""
  out = np.random.default_rng(offset).integers(0, 256, (count, H, W, channels), dtype=np.uint8)
  out[:, 0, 0, 0] = np.arange(offset, offset + count)
  return out


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("data") / "fashion_mnist"
  root.mkdir()
  np.save(root / "train_images.npy", numbered_images(40, 1, 0))
  np.save(root / "test_images.npy", numbered_images(12, 1, 100))
  return root


@pytest.fixture(scope="module")
def cifar_archive(tmp_path_factory):
  """A tiny cifar-10-python.tar.gz: 5 train batches of 4 images and a test batch of 4."""
  tmp = tmp_path_factory.mktemp("cifar")
  archive = tmp / "cifar-10-python.tar.gz"
  with tarfile.open(archive, "w:gz") as tar:
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
      hwc = np.random.default_rng(i).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
      hwc[:, 0, 0, 0] = np.arange(4) + 4 * i
      path = tmp / name
      path.write_bytes(pickle.dumps({b"data": hwc.transpose(0, 3, 1, 2).reshape(4, -1),
                                     b"labels": [0] * 4}))
      tar.add(path, arcname=f"cifar-10-batches-py/{name}")
  return archive


def test_shapes_ranges_and_disjoint_splits(prepared_dir):
  data = images.create_image_datasets({"dataset": "fashion_mnist", "path": str(prepared_dir)},
                                      batch_size=8, seed=0, eval_batch_size=5)
  assert data.image_shape == (H, W, 1) and data.max_count == 255 and data.vocab_size == 256
  raw = np.load(prepared_dir / "train_images.npy")
  train_ids = set()
  for _ in range(5):  # one epoch of 40 images
    batch = next(data.train)["images"]
    np.testing.assert_array_equal(batch, raw[batch[:, 0, 0, 0]])  # digits: never flipped
    assert batch.shape == (8, H, W, 1) and batch.dtype == np.int32
    assert 0 <= batch.min() and batch.max() <= 255
    train_ids.update(batch[:, 0, 0, 0].tolist())
  assert train_ids == set(range(40))  # a shuffled epoch covers every training image once
  eval_ids = [b["images"][:, 0, 0, 0].tolist() for b in data.eval_batches()]
  assert eval_ids == [list(range(100, 105)), list(range(105, 110))]  # ragged tail dropped
  assert eval_ids == [b["images"][:, 0, 0, 0].tolist() for b in data.eval_batches()]
  assert not train_ids & set(sum(eval_ids, []))


def test_binarize_and_processes(prepared_dir):
  config = {"dataset": "fashion_mnist", "path": str(prepared_dir), "binarize": True}
  full = images.create_image_datasets(config, batch_size=8, seed=3)
  assert full.max_count == 1
  raw = np.load(prepared_dir / "train_images.npy")
  batches = [next(full.train)["images"] for _ in range(4)]
  assert set(np.unique(np.concatenate(batches))) <= {0, 1}
  # Two processes together see exactly the single-process global batches.
  parts = [images.create_image_datasets(config, batch_size=8, seed=3, process_index=p,
                                        process_count=2) for p in (0, 1)]
  for step in range(2):
    halves = [next(p.train)["images"] for p in parts]
    np.testing.assert_array_equal(np.concatenate(halves), batches[step])
  # Threshold 128 on the raw pixels.
  assert np.array_equal(np.unique((raw >= 128).astype(np.uint8)), [0, 1])


def test_iterator_resumes_exactly(cifar_archive):
  config = {"dataset": "cifar10", "path": str(cifar_archive)}
  make = lambda seed: images.create_image_datasets(config, batch_size=6, seed=seed,
                                                   eval_batch_size=4)
  data = make(1)
  assert data.image_shape == (32, 32, 3) and data.info["train_images"] == 20
  first = next(data.train)["images"]
  for _ in range(2):
    next(data.train)
  state = data.train.get_state()
  expected = [next(data.train)["images"] for _ in range(5)]  # crosses epoch boundaries
  again = make(1)
  np.testing.assert_array_equal(next(again.train)["images"], first)  # deterministic
  again.train.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(again.train)["images"], want)
  assert not np.array_equal(next(make(2).train)["images"], first)


def test_cifar_flips(cifar_archive):
  """Each training image appears as itself or mirrored; both occur; eval images never flip."""
  train, test = images.load_images({"dataset": "cifar10", "path": str(cifar_archive)})
  assert train.shape == (20, 32, 32, 3) and test.shape == (4, 32, 32, 3)
  data = images.create_image_datasets({"dataset": "cifar10", "path": str(cifar_archive)},
                                      batch_size=10, seed=0, eval_batch_size=4)
  flipped = 0
  for _ in range(20):
    for image in next(data.train)["images"]:
      matches = [i for i in range(20) if np.array_equal(image, train[i])]
      mirrored = [i for i in range(20) if np.array_equal(image, train[i][:, ::-1])]
      assert len(matches) + len(mirrored) == 1
      flipped += len(mirrored)
  assert 60 < flipped < 140  # 200 images, about half flipped (binomial sd 7)
  (batch,) = list(data.eval_batches())
  np.testing.assert_array_equal(batch["images"], test)


@pytest.mark.parametrize("channels,max_count", [(1, 1), (3, 255)])
def test_png_grid(tmp_path, channels, max_count):
  batch = np.random.default_rng(0).integers(0, max_count + 1, (5, H, W, channels))
  path = tmp_path / "samples" / "grid.png"
  images.save_image_grid(batch, path, max_count)
  with Image.open(path) as png:
    assert png.format == "PNG" and png.mode == ("L" if channels == 1 else "RGB")
    grid = np.asarray(png).reshape(png.height, png.width, channels)
  assert grid.shape == (2 * (H + 2) + 2, 3 * (W + 2) + 2, channels)  # 3 columns, 2 rows, pad 2
  np.testing.assert_array_equal(grid[2:2 + H, 2 + (W + 2):2 + (W + 2) + W],
                                np.round(batch[1] * 255 / max_count))
  assert (grid[:2] == 0).all() and (grid[:, :2] == 0).all()  # the padding is black


def test_class_grid_layout():
  """Each block is laid `per_row` images a row (one class a row), blocks side by side."""
  from md4.tools.class_grid import GAP, side_by_side

  rng = np.random.default_rng(1)
  blocks = [rng.integers(0, 256, (6, H, W, 1)) for _ in range(2)]  # 3 classes x 2 per class
  grid = side_by_side(blocks, 255, per_row=2)
  block_width = 2 * (W + 2) + 2
  assert grid.shape == (3 * (H + 2) + 2, 2 * block_width + GAP, 1)
  assert (grid[:, block_width:block_width + GAP] == 255).all()  # the white gap
  # Block 1, image 5 (class 2, second sample) sits in row 2, column 1 of the second block.
  top, left = 2 + 2 * (H + 2), block_width + GAP + 2 + (W + 2)
  np.testing.assert_array_equal(grid[top:top + H, left:left + W], blocks[1][5])


@pytest.mark.skipif(not pathlib.Path("data/mnist5k/train_images.npy").is_file(),
                    reason="run `python -m md4.data.prepare mnist5k --out data` first")
def test_prepared_mnist5k():
  data = images.create_image_datasets({"dataset": "mnist5k"}, batch_size=50, seed=0)
  assert data.image_shape == (28, 28, 1) and data.max_count == 1
  assert data.info["train_images"] == 4500 and data.info["eval_images"] == 500
  batch = next(data.train)["images"]
  assert set(np.unique(batch)) == {0, 1} and 0.05 < batch.mean() < 0.25  # mostly background
  train, test = images.load_images({"dataset": "mnist5k"})
  train_keys = {image.tobytes() for image in train}
  assert not any(image.tobytes() in train_keys for image in test)


def _png_file(image: np.ndarray) -> io.BytesIO:
  """An image as an in-memory PNG file (what tfds stores; its own encoder needs TensorFlow)."""
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
  buffer.seek(0)
  return buffer


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("fashion_mnist", (28, 28, 1)),
                                        ("cifar10", (32, 32, 3))])
def test_tfds_prepared_images(tmp_path, name, shape):
  """A tiny tfds directory (ArrayRecord shards + dataset_info.json) made by tfds's own builder of
  `name` with its downloads replaced, read through data.source=tfds without TensorFlow."""
  tfds = pytest.importorskip("tensorflow_datasets")
  rng = np.random.default_rng(0)
  splits = {"train": rng.integers(0, 256, (10, *shape), dtype=np.uint8),
            "test": rng.integers(0, 256, (4, *shape), dtype=np.uint8)}
  builder_class = {"mnist": tfds.image_classification.MNIST,
                   "fashion_mnist": tfds.image_classification.FashionMNIST,
                   "cifar10": tfds.image_classification.Cifar10}[name]

  class Tiny(builder_class, skip_registration=True):
    code_path = None  # No checksums file to look up (that lookup needs `importlib_resources`).

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(x) for split, x in splits.items()}

    def _generate_examples(self, x):
      for i, image in enumerate(x):
        extra = {"id": f"{i}"} if name == "cifar10" else {}
        yield i, {"image": _png_file(image), "label": i % 10, **extra}

  Tiny.name = name
  Tiny(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  assert list(tmp_path.glob(f"{name}/*/dataset_info.json"))
  assert list(tmp_path.glob(f"{name}/*/{name}-test.array_record-00000-of-00001"))
  config = {"dataset": name, "source": "tfds", "path": str(tmp_path)}
  train, test = images.load_images(config)
  key = lambda x: sorted(image.tobytes() for image in x)  # tfds shuffles the examples
  assert train.shape == (10, *shape) and key(train) == key(splits["train"])
  assert test.shape == (4, *shape) and key(test) == key(splits["test"])
  data = images.create_image_datasets(config, batch_size=2, seed=0)
  assert data.max_count == (1 if name == "mnist" else 255)  # full MNIST is binarized by default
  assert data.image_shape == shape and data.info["eval_images"] == 4
  with pytest.raises(ValueError, match=r"data.source 'npy' is not one of mnist's: \('tfds',\)"):
    images.load_images({"dataset": "mnist", "source": "npy"})
