"""Data sets of the workflow: Fashion-MNIST (the default), CIFAR-10 and any ImageFolder.

Every loader returns a :class:`DataBundle` with a *training* split (used for baseline
training, BatchNorm recalibration and fine-tuning) and a *held-out* split (used only to
report accuracy). The seed article fine-tuned on the very split it reported; here the two
never mix:

- Fashion-MNIST and CIFAR-10 have an official test split, which is the held-out split.
- An ImageFolder with ``train/`` and ``val/`` (or ``test/``) subfolders uses them; a single
  folder (such as an ImageNet ``val/`` folder as in the seed) is split by a fixed seeded
  permutation into a training part and a held-out part (``holdout_fraction``).

Nothing is downloaded unless ``download=True`` is passed explicitly.

Fashion-MNIST and CIFAR-10 are read straight from their files (IDX and the python pickle
batches) into memory as uint8 tensors: they are small, and it keeps data loading off the
critical path on a 2-core machine.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from fxprune.workflow.errors import ConfigError, DataError, DataNotFoundError

__all__ = [
    "FASHION_MNIST_ROOT",
    "FASHION_MNIST_CLASSES",
    "CIFAR10_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataBundle",
    "resize_images",
    "TensorImageDataset",
    "ShardSampler",
    "load_data",
    "load_fashion_mnist",
    "load_cifar10",
    "load_image_folder",
    "read_idx",
    "read_cifar_pickle",
    "read_image",
    "CifarUnpickler",
    "limit_dataset",
    "make_loader",
    "example_batch",
    "default_download_root",
]

#: Where the Debian package ``dataset-fashion-mnist`` installs the IDX files.
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
# Per-pixel mean/std of the Fashion-MNIST training images (scaled to [0, 1]).
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_FMNIST_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_DATA_ALIASES = {"fashion-mnist": "fashion-mnist", "fashion_mnist": "fashion-mnist",
                 "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
                 "cifar10": "cifar10", "cifar-10": "cifar10"}


def default_download_root() -> Path:
    """Where ``download=True`` puts data sets: ``$FXPRUNE_DATA`` or ``~/.cache/fxprune/data``."""
    env = os.environ.get("FXPRUNE_DATA")
    return Path(env) if env else Path.home() / ".cache" / "fxprune" / "data"


@dataclass
class DataBundle:
    """A training split and a held-out split plus what a model needs to know about them."""

    name: str
    train: Dataset
    test: Dataset
    classes: list[str]
    in_channels: int
    image_size: int
    #: Where the data was read from, for the report.
    source: str
    mean: tuple[float, ...] = field(default_factory=tuple)
    std: tuple[float, ...] = field(default_factory=tuple)
    #: Loader workers that pay off for this data (decoding files does; in-memory tensors don't).
    num_workers: int = 0
    #: What identifies the data's content (a hash of the files read, or of their names, sizes
    #: and modification times for image trees): part of the resume fingerprint and of the
    #: baseline cache's key, so a checkpoint is never continued on other data.
    identity: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def summary(self) -> dict[str, Any]:
        """Plain-data description for ``report.json``."""
        return {
            "name": self.name,
            "source": self.source,
            "train_samples": len(self.train),  # type: ignore[arg-type]
            "test_samples": len(self.test),  # type: ignore[arg-type]
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "identity": self.identity,
        }


class TensorImageDataset(Dataset):
    """Images held in memory as a uint8 tensor ``N x C x H x W``, normalised on access.

    Keeping uint8 (not float) keeps Fashion-MNIST at 47 MB and CIFAR-10 at 150 MB.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ConfigError(f"expected uint8 images N x C x H x W, got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ConfigError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()
        channels = images.shape[1]
        self._mean = torch.tensor(mean, dtype=torch.float32).view(channels, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(channels, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index].float().div_(255.0)
        return (image - self._mean) / self._std, self.labels[index]


# --------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------
def read_idx(path: Union[str, Path], digest: Optional[Any] = None) -> torch.Tensor:
    """Read an IDX file (as used by MNIST / Fashion-MNIST), gzip-compressed or not.

    ``digest`` (a :mod:`hashlib` object), when given, is updated with the file's bytes.
    """
    path = Path(path)
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError, zlib.error) as exc:
        # zlib.error: a gzip file whose deflate stream is corrupt (not an OSError).
        raise DataNotFoundError(f"cannot read IDX file {path}: the file is corrupt or truncated "
                                f"({type(exc).__name__}: {exc})") from exc
    if digest is not None:
        digest.update(raw)
    # Header: two zero bytes, a dtype code, the number of dimensions, then one big-endian
    # uint32 per dimension.
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataNotFoundError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataNotFoundError(
            f"{path} is truncated or corrupt: header says {dims} ({expected} bytes of data), "
            f"file holds {len(raw) - header}")
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return torch.from_numpy(array.astype(dtype.newbyteorder("=")).copy())


def _find_fmnist_dir(root: Path) -> Optional[Path]:
    """The folder below ``root`` holding the four IDX files (plain or .gz), if any."""
    # torchvision's FashionMNIST(download=True) puts them in FashionMNIST/raw.
    for candidate in (root, root / "FashionMNIST" / "raw", root / "fashion-mnist"):
        if all(_idx_file(candidate, name) is not None for name in _FMNIST_FILES.values()):
            return candidate
    return None


def _idx_file(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _fmnist_missing_message(root: Path) -> str:
    looked = ", ".join(str(p) for p in (root, root / "FashionMNIST" / "raw"))
    return (
        f"Fashion-MNIST not found: looked for {_FMNIST_FILES[('train', 'images')]}.gz and the "
        f"other three IDX files in {looked}. Install it with `apt-get install "
        f"dataset-fashion-mnist` (puts it in {FASHION_MNIST_ROOT}), point --data at a folder "
        f"holding the IDX files (or at a CIFAR-10 or ImageFolder directory), or pass "
        f"--download to fetch it into {default_download_root() / 'fashion-mnist'}."
    )


def load_fashion_mnist(root: Union[str, Path, None] = None, *, download: bool = False) -> DataBundle:
    """Fashion-MNIST from its IDX files: 60 000 training and 10 000 test images, 28x28 gray.

    ``root`` defaults to :data:`FASHION_MNIST_ROOT`; with ``download=True`` and no files there,
    torchvision downloads them into ``root`` (or the download root when ``root`` is None).
    """
    given = Path(root) if root is not None else None
    folder = _find_fmnist_dir(given or FASHION_MNIST_ROOT)
    if folder is None and given is None:
        # A previous --download put it in the cache; use it before complaining.
        folder = _find_fmnist_dir(default_download_root() / "fashion-mnist")
    if folder is None and download:
        target = given or default_download_root() / "fashion-mnist"
        from torchvision.datasets import FashionMNIST  # only needed to download

        FashionMNIST(str(target), train=True, download=True)
        FashionMNIST(str(target), train=False, download=True)
        folder = _find_fmnist_dir(target)
    if folder is None:
        raise DataNotFoundError(_fmnist_missing_message(given or FASHION_MNIST_ROOT))

    digest = hashlib.sha256()

    def read(split: str, kind: str) -> tuple[Path, torch.Tensor]:
        path = _idx_file(folder, _FMNIST_FILES[(split, kind)])
        if path is None:  # removed since _find_fmnist_dir looked
            raise DataNotFoundError(_fmnist_missing_message(folder))
        return path, read_idx(path, digest)

    splits = {}
    sizes: dict[str, tuple[int, ...]] = {}
    classes = list(FASHION_MNIST_CLASSES)
    for split in ("train", "test"):
        (image_path, images), (label_path, labels) = read(split, "images"), read(split, "labels")
        if images.dim() != 3 or images.dtype != torch.uint8 or len(images) != len(labels):
            raise DataNotFoundError(
                f"Fashion-MNIST {split} files in {folder} do not match: images "
                f"{tuple(images.shape)} {images.dtype}, labels {tuple(labels.shape)}")
        _check_labels(labels, len(classes), label_path)
        sizes[split] = tuple(images.shape[1:])
        splits[split] = TensorImageDataset(images, labels, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    if sizes["train"] != sizes["test"]:
        raise DataError(
            f"Fashion-MNIST files in {folder}: the training images are {sizes['train'][0]}x"
            f"{sizes['train'][1]} but the test images are {sizes['test'][0]}x{sizes['test'][1]}; "
            f"both splits must have the same image size")
    height, width = sizes["train"]
    if height != width:
        raise DataError(f"Fashion-MNIST files in {folder}: images are {height}x{width}, expected square images")
    return DataBundle(
        name="fashion-mnist", train=splits["train"], test=splits["test"],
        classes=classes, in_channels=1, image_size=height, source=str(folder),
        mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, identity="sha256:" + digest.hexdigest(),
    )


def _check_labels(labels: Any, num_classes: Optional[int], path: Path) -> None:
    """Labels are one integer class index per sample, in ``[0, num_classes)``."""
    labels = torch.as_tensor(labels)
    if labels.dim() != 1:
        raise DataError(f"{path}: labels must be one class index per sample (a 1-d array), "
                        f"got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise DataError(f"{path}: labels must be integer class indices, got {labels.dtype} "
                        f"(a float label file would be truncated to the wrong classes)")
    if labels.numel() == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or (num_classes is not None and high >= num_classes):
        bound = f"[0, {num_classes - 1}]" if num_classes is not None else ">= 0"
        raise DataError(f"{path}: labels must be class indices in {bound}, found values from {low} to {high}")


# --------------------------------------------------------------------------------------------
# CIFAR-10 (python version: data_batch_1..5 and test_batch, pickled dicts of plain arrays)
# --------------------------------------------------------------------------------------------
def _find_cifar_dir(root: Path) -> Optional[Path]:
    for candidate in (root, root / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").is_file() and (candidate / "test_batch").is_file():
            return candidate
    return None


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    # What pickle protocol 2 from Python 3 uses to store bytes: _codecs.encode(str, "latin1").
    # Only that codec is admitted: a codec name from the file must not pick a codec module.
    if encoding not in ("latin1", "latin-1", "iso-8859-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with codec {encoding!r} is not part of the CIFAR format")
    return text.encode("latin-1")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The numpy callables a pickled ndarray names, under numpy 1's and numpy 2's module names."""
    try:
        from numpy._core import multiarray  # numpy >= 2 (numpy.core is a deprecated alias)
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core import multiarray  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                           ("_codecs", "encode"): _latin1_encode}
    try:
        from numpy._core import numeric
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core import numeric  # type: ignore[no-redef]
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        # Protocol 5 stores an array's bytes as a buffer rebuilt by _frombuffer.
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only what the CIFAR python format holds.

    dicts, lists, bytes, str and numbers need no globals at all; numpy arrays need
    ``numpy.ndarray``, ``numpy.dtype`` and numpy's ``_reconstruct`` / ``scalar`` /
    ``_frombuffer`` (and a
    protocol-2 pickle written by Python 3 stores bytes through ``_codecs.encode``). Any other
    global (``os.system``, ``builtins.eval``, a class to instantiate...) is refused *before*
    it is looked up, so a crafted file cannot run code.
    """

    allowed: dict[tuple[str, str], Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        allowed = self.allowed or _numpy_globals()
        found = allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not allowed: a CIFAR-10 batch holds only dicts, "
                f"lists, bytes and numpy arrays")
        return found


def read_cifar_pickle(path: Union[str, Path], digest: Optional[Any] = None) -> Any:
    """Unpickle a CIFAR python-format file with :class:`CifarUnpickler` (never runs its code).

    Raises :class:`DataError` for a file that is not such a pickle, including one that names
    anything outside the allow-list. ``digest`` (a :mod:`hashlib` object) is fed the bytes.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataNotFoundError(f"cannot read {path}: {exc}") from exc
    if digest is not None:
        digest.update(raw)
    try:
        # encoding="bytes": the official batches were written by Python 2, and this is how
        # their keys and strings are documented to be read in Python 3.
        return CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # any unpickling problem means this file cannot be used
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path} is not a CIFAR-10 python batch ({type(exc).__name__}: {reason}); "
                        f"--data must point at the files of the official CIFAR-10 python version") from exc


def _read_cifar_batch(path: Path, digest: Optional[Any] = None) -> tuple[torch.Tensor, torch.Tensor]:
    batch = read_cifar_pickle(path, digest)
    try:
        data = batch[b"data"]
        labels = batch[b"labels"]
    except (TypeError, KeyError, IndexError) as exc:
        raise DataError(f"{path} is not a CIFAR-10 python batch: no b'data' / b'labels' entries") from exc
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise DataError(f"{path}: CIFAR-10 b'data' must be a uint8 numpy array, got "
                        f"{getattr(data, 'dtype', type(data).__name__)}")
    if isinstance(labels, np.ndarray) and labels.dtype.kind in "iu":
        labels_array = labels
    elif isinstance(labels, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        labels_array = np.asarray(labels, dtype=np.int64)
    else:
        raise DataError(f"{path}: CIFAR-10 b'labels' must be a list of integer class indices")
    _check_labels(torch.from_numpy(np.ascontiguousarray(labels_array)), None, path)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels_array):
        raise DataNotFoundError(f"{path}: unexpected CIFAR-10 batch shape {data.shape}")
    return (torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()),
            torch.from_numpy(labels_array.astype(np.int64)))


def load_cifar10(root: Union[str, Path, None] = None, *, download: bool = False) -> DataBundle:
    """CIFAR-10 from the python-format batch folder (``data_batch_1..5``, ``test_batch``).

    Training uses every ``data_batch_*`` present; the held-out split is ``test_batch``.
    """
    base = Path(root) if root is not None else default_download_root() / "cifar10"
    folder = _find_cifar_dir(base)
    if folder is None and download:
        from torchvision.datasets import CIFAR10  # only needed to download

        CIFAR10(str(base), train=True, download=True)
        folder = _find_cifar_dir(base)
    if folder is None:
        raise DataNotFoundError(
            f"CIFAR-10 not found: looked for data_batch_1 and test_batch in {base} and "
            f"{base / 'cifar-10-batches-py'}. Point --data at the extracted "
            f"cifar-10-batches-py folder, or pass --download to fetch it into {base}.")
    train_files = sorted(folder.glob("data_batch_*"), key=lambda p: p.name)
    digest = hashlib.sha256()
    parts = [_read_cifar_batch(p, digest) for p in train_files]
    train_x = torch.cat([p[0] for p in parts])
    train_y = torch.cat([p[1] for p in parts])
    test_x, test_y = _read_cifar_batch(folder / "test_batch", digest)
    classes = list(CIFAR10_CLASSES)
    meta = folder / "batches.meta"
    if meta.is_file():
        # Read with the same restricted unpickler: a malicious meta file fails like a batch.
        content = read_cifar_pickle(meta)
        names = content.get(b"label_names") if isinstance(content, dict) else None
        if isinstance(names, list) and names and all(isinstance(n, (bytes, str)) for n in names):
            classes = [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]
    num_classes = int(max(train_y.max().item(), test_y.max().item())) + 1
    if num_classes > len(classes):
        classes = classes + [str(i) for i in range(len(classes), num_classes)]
    return DataBundle(
        name="cifar10", train=TensorImageDataset(train_x, train_y, CIFAR10_MEAN, CIFAR10_STD),
        test=TensorImageDataset(test_x, test_y, CIFAR10_MEAN, CIFAR10_STD), classes=classes,
        in_channels=3, image_size=32, source=str(folder), mean=CIFAR10_MEAN, std=CIFAR10_STD,
        identity="sha256:" + digest.hexdigest(),
    )


# --------------------------------------------------------------------------------------------
# ImageFolder (e.g. ImageNet val/ as in the seed article)
# --------------------------------------------------------------------------------------------
def _image_folder_transform(image_size: int) -> Any:
    from torchvision import transforms

    # The seed's evaluation transform (Resize 256, CenterCrop 224 for ImageNet), scaled to
    # other sizes by the same 256/224 ratio. Deterministic: random augmentation is applied to
    # whole batches in the training loop, so data order and augmentation are functions of
    # (seed, epoch) and a resumed run sees exactly the same batches.
    resize = int(round(image_size * 256 / 224))
    return transforms.Compose([
        transforms.Resize(resize),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def read_image(path: str) -> Any:
    """Open ``path`` as an RGB PIL image; a corrupt, truncated or non-image file is a :class:`DataError`.

    (torchvision's default loader lets PIL's ``UnidentifiedImageError`` / ``OSError: image
    file is truncated`` escape from deep inside the DataLoader.)
    """
    from PIL import Image

    try:
        with open(path, "rb") as handle:
            image = Image.open(handle)
            return image.convert("RGB")  # convert() decodes the whole file: truncation shows here
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot read image {path}: the file is corrupt, truncated or not an image "
                        f"({type(exc).__name__}: {reason}); remove or replace it") from exc


def _tree_identity(samples: Sequence[tuple[str, int]], root: Path) -> str:
    """A hash of every image's relative path, class, size and modification time.

    Hashing the content of an ImageNet-sized tree would take minutes; a file rewritten in
    place changes its size or modification time.
    """
    digest = hashlib.sha256()
    for path, target in samples:
        try:
            stat = os.stat(path)
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        digest.update(f"{os.path.relpath(path, root)}\0{target}\0{size}\0{mtime}\n".encode("utf-8", "replace"))
    return "files-sha256:" + digest.hexdigest()


def load_image_folder(root: Union[str, Path], *, image_size: int = 224,
                      holdout_fraction: float = 0.2, split_seed: int = 0) -> DataBundle:
    """Any ``class_name/image`` folder tree read with :class:`torchvision.datasets.ImageFolder`.

    If ``root`` has ``train/`` and ``val/`` (or ``test/``) subfolders they are the two splits.
    Otherwise ``root`` itself is split by a permutation seeded with ``split_seed``:
    ``holdout_fraction`` of the images are held out for evaluation, the rest are used for
    training and recalibration.
    """
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise DataNotFoundError(
            f"data folder {root} does not exist. --data takes 'fashion-mnist', 'cifar10', a "
            f"folder of Fashion-MNIST IDX files, a CIFAR-10 python folder, or an ImageFolder "
            f"tree (one subfolder per class, e.g. an ImageNet val/ folder).")
    if not 0.0 < holdout_fraction < 1.0:
        raise ConfigError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    transform = _image_folder_transform(image_size)

    def open_folder(path: Path) -> Any:
        try:
            return ImageFolder(str(path), transform=transform, loader=read_image)
        except (FileNotFoundError, RuntimeError) as exc:
            raise DataNotFoundError(f"{path} is not an ImageFolder tree of images: {exc}") from exc

    held_out_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and held_out_dir is not None:
        train_set, test_set = open_folder(root / "train"), open_folder(held_out_dir)
        if train_set.classes != test_set.classes:
            raise DataNotFoundError(
                f"{root / 'train'} and {held_out_dir} have different class folders")
        classes = list(train_set.classes)
        identity = _tree_identity(list(train_set.samples) + list(test_set.samples), root)
    else:
        full = open_folder(root)
        classes = list(full.classes)
        identity = _tree_identity(full.samples, root)
        count = len(full)
        held_out = max(1, int(round(count * holdout_fraction)))
        if count - held_out < 1:
            raise DataNotFoundError(f"{root} holds {count} images: too few to split for training and evaluation")
        order = torch.randperm(count, generator=torch.Generator().manual_seed(split_seed)).tolist()
        train_set, test_set = Subset(full, order[held_out:]), Subset(full, order[:held_out])
    return DataBundle(
        name="imagefolder", train=train_set, test=test_set, classes=classes, in_channels=3,
        image_size=image_size, source=str(root), mean=IMAGENET_MEAN, std=IMAGENET_STD,
        num_workers=min(4, os.cpu_count() or 1), identity=identity,
    )


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def load_data(spec: Union[str, Path] = "fashion-mnist", *, download: bool = False,
              limit: Optional[int] = None, image_size: Optional[int] = None) -> DataBundle:
    """Load the data set named by ``spec`` (the CLI's ``--data``).

    ``spec`` is ``"fashion-mnist"`` (the default, from :data:`FASHION_MNIST_ROOT`),
    ``"cifar10"`` (from the download root), or a path: a folder of Fashion-MNIST IDX files, a
    CIFAR-10 python batch folder, or any ImageFolder tree. ``limit`` keeps the first ``limit``
    samples of a fixed seeded permutation of each split (for tests and quick trials).
    ``image_size`` sets the crop size of ImageFolder data (default 224) and resizes in-memory
    images (Fashion-MNIST, CIFAR-10) to that size (:func:`resize_images`).
    """
    text = str(spec)
    alias = _DATA_ALIASES.get(text.lower())
    if alias == "fashion-mnist":
        bundle = load_fashion_mnist(download=download)
    elif alias == "cifar10":
        bundle = load_cifar10(download=download)
    else:
        path = Path(text).expanduser()
        if _find_fmnist_dir(path) is not None:
            bundle = load_fashion_mnist(path)
        elif _find_cifar_dir(path) is not None:
            bundle = load_cifar10(path)
        elif not path.exists():
            raise DataNotFoundError(
                f"--data {text!r}: no such folder. Use 'fashion-mnist' (the default, read from "
                f"{FASHION_MNIST_ROOT}; `apt-get install dataset-fashion-mnist`), 'cifar10' "
                f"(with --download the first time), or the path of a Fashion-MNIST IDX folder, "
                f"a CIFAR-10 python folder or an ImageFolder tree.")
        else:
            bundle = load_image_folder(path, image_size=image_size or 224)
    if image_size is not None and image_size != bundle.image_size and isinstance(bundle.train, TensorImageDataset):
        # In-memory images (Fashion-MNIST, CIFAR-10) are resized once here; an ImageFolder
        # tree was already cropped to image_size as it is read.
        bundle = resize_images(bundle, image_size)
    if limit is not None:
        bundle.train = limit_dataset(bundle.train, limit)
        bundle.test = limit_dataset(bundle.test, limit)
    return bundle


def resize_images(bundle: DataBundle, image_size: int) -> DataBundle:
    """``bundle`` with its in-memory images resized to ``image_size`` square (bilinear, antialiased).

    For models whose downsampling needs larger inputs than the data's own (ConvNeXt's stride-32
    stages on 28 px Fashion-MNIST). Images stay uint8; the identity records the size, so a
    cached baseline is never reused across sizes.

    >>> import torch
    >>> data = TensorImageDataset(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), torch.zeros(2), [0.5], [0.5])
    >>> bundle = DataBundle("toy", data, data, ["a"], 1, 28, "memory", identity="x")
    >>> resize_images(bundle, 32).train.images.shape
    torch.Size([2, 1, 32, 32])
    """
    if image_size < 1:
        raise ConfigError(f"--image-size must be a positive number of pixels, got {image_size}")
    splits = []
    for split in (bundle.train, bundle.test):
        if not isinstance(split, TensorImageDataset):
            raise ConfigError(f"--image-size resizes in-memory images only; {bundle.name} is read from files")
        images = torch.nn.functional.interpolate(split.images.float(), size=(image_size, image_size),
                                                 mode="bilinear", antialias=True, align_corners=False)
        resized = TensorImageDataset(images.round_().clamp_(0, 255).to(torch.uint8), split.labels,
                                     split._mean.flatten().tolist(), split._std.flatten().tolist())
        splits.append(resized)
    return DataBundle(bundle.name, splits[0], splits[1], bundle.classes, bundle.in_channels, image_size,
                      f"{bundle.source} (resized to {image_size}x{image_size})", bundle.mean, bundle.std,
                      bundle.num_workers, f"{bundle.identity};size={image_size}")


def limit_dataset(dataset: Dataset, limit: int, seed: int = 0) -> Dataset:
    """The first ``limit`` samples of a fixed permutation of ``dataset`` (all if it is smaller).

    A permutation rather than the first ``limit`` rows, so a small subset still mixes classes
    in data sets stored sorted by class (ImageFolder).
    """
    if limit < 1:
        raise ConfigError(f"limit must be a positive number of samples, got {limit}")
    count = len(dataset)  # type: ignore[arg-type]
    if limit >= count:
        return dataset
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:limit]
    return Subset(dataset, sorted(order.tolist()))


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order: an evaluation shard without padding.

    :class:`DistributedSampler` pads the data set so that every rank gets the same count,
    which would count some samples twice in an accuracy; this sampler does not, and the
    per-rank counts are summed with an all-reduce.
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, seed: int = 0,
                rank: int = 0, world_size: int = 1, num_workers: int = 0,
                pin_memory: bool = False, drop_last: Optional[bool] = None) -> DataLoader:
    """A DataLoader whose order is a function of ``(seed, epoch)`` only.

    Training loaders use :class:`DistributedSampler` even in a single process (with
    ``num_replicas=1``): it shuffles with a generator seeded by ``seed + epoch``, so calling
    ``loader.sampler.set_epoch(epoch)`` reproduces an epoch's order exactly, which is what
    lets a resumed run match an uninterrupted one. Evaluation loaders read their shard in order.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    sampler: Sampler[int]
    if train:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                     seed=seed, drop_last=False)
    else:
        sampler = ShardSampler(len(dataset), rank, world_size)  # type: ignore[arg-type]
    if drop_last is None:
        # A last batch of one sample breaks BatchNorm in train mode; dropping a partial last
        # batch when training is the usual remedy. Evaluation sees every sample.
        drop_last = train and len(sampler) > batch_size  # type: ignore[arg-type]
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=drop_last,
                      persistent_workers=False)


def example_batch(dataset: Dataset, count: int = 1) -> torch.Tensor:
    """The first ``count`` inputs of ``dataset`` stacked into a batch (for tracing and MACs)."""
    count = min(count, len(dataset))  # type: ignore[arg-type]
    if count < 1:
        raise DataNotFoundError("the data set is empty")
    return torch.stack([dataset[i][0] for i in range(count)])
