"""Labelled image sets as uint8 tensors: ImageFolder trees (plain or zipped), CIFAR, embedded digits.

Everything downstream sees a `Dataset` of uint8 (N, C, H, W) tensors with classes in sorted order,
a seeded validation split carved from the training images, and the training set's mean and std.
"""
from __future__ import annotations

import io
import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from nrrdd import NrrddError
from nrrdd.files import atomic_path, read_json, require_intact, sha256_bytes
from nrrdd.outdir import MANIFEST


IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"}
# Files that commonly sit in data folders and are not samples.
IGNORED_NAMES = {"README.md", "README", "LICENSE", ".DS_Store", "Thumbs.db", "manifest.json", "labels.json"}


@dataclass
class Split:
    images: torch.Tensor  # (N, C, H, W) uint8, or LazyImages of a listed folder
    labels: torch.Tensor  # (N,) int64

    def __len__(self):
        return len(self.labels)

    def subset(self, idx) -> "Split":
        return Split(self.images[idx], self.labels[idx])

    def of_class(self, c: int) -> torch.Tensor:
        return self.images[self.labels == c]


@dataclass
class Dataset:
    name: str
    classes: list[str]
    train: Split  # training images minus the validation split
    val: Split
    test: Split
    mean: tuple[float, ...]
    std: tuple[float, ...]
    info: dict = field(default_factory=dict)  # source checksum, split seed and sizes: recorded in outputs

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]

    @property
    def channels(self) -> int:
        return self.train.images.shape[1]


# ---------------------------------------------------------------- file trees (folder or zip)

class _Tree:
    """Uniform listing/reading of a folder or of a folder inside a zip archive."""

    def __init__(self, root: str | os.PathLike):
        root = str(root)
        self.zip, self.prefix, self.pid = None, "", os.getpid()
        zpath, _, inner = root.partition(".zip")
        if root.endswith(".zip") or (inner.startswith("/") and os.path.isfile(zpath + ".zip")):
            zpath += ".zip"
            if not os.path.isfile(zpath):
                raise NrrddError(f"{zpath}: zip archive not found")
            try:
                self.zip = zipfile.ZipFile(zpath)
            except zipfile.BadZipFile:
                raise NrrddError(f"{zpath}: not a readable zip archive") from None
            self.prefix = inner.strip("/")
        elif not os.path.exists(root):
            raise NrrddError(f"{root}: path not found; give a folder of class sub-folders, a .zip, or a named data set")
        elif not os.path.isdir(root):
            raise NrrddError(f"{root}: not a folder; expected a folder of class sub-folders")
        self.root = root

    def __getstate__(self) -> dict:  # an open ZipFile cannot travel to a spawned decoding worker: reopen it there
        return {**self.__dict__, "zip": self.zip.filename if self.zip else None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, zip=zipfile.ZipFile(state["zip"]) if state["zip"] else None, pid=os.getpid())

    def listdir(self, sub: str = "") -> tuple[list[str], list[str]]:
        """(sub-folders, files) directly under `sub`, sorted."""
        if self.zip is None:
            base = os.path.join(self.root, sub)
            if not os.path.isdir(base):
                return [], []
            entries = sorted(os.listdir(base))
            return ([e for e in entries if os.path.isdir(os.path.join(base, e))],
                    [e for e in entries if os.path.isfile(os.path.join(base, e))])
        base = "/".join(p for p in (self.prefix, sub) if p)
        base = base + "/" if base else ""
        dirs, files = set(), set()
        for n in self.zip.namelist():
            if n.startswith(base) and n != base:
                head, sep, _ = n[len(base):].partition("/")
                (dirs if sep else files).add(head)
        return sorted(dirs), sorted(files)

    def read(self, rel: str) -> bytes:
        if self.zip is None:
            with open(os.path.join(self.root, rel), "rb") as f:
                return f.read()
        if self.pid != os.getpid():  # a forked worker shares the parent's file offset: interleaved reads corrupt
            self.zip, self.pid = zipfile.ZipFile(self.zip.filename), os.getpid()
        return self.zip.read("/".join(p for p in (self.prefix, rel) if p))

    def fingerprints(self, rels: list[str]) -> tuple[str, str]:
        """Two fingerprints of the listed files from one pass over their stats: (names, sizes, times) guards
        the decode cache; (names, sizes; CRCs in a zip) survives a copy and tells whether a teacher saw these
        files."""
        if self.zip is None:
            stats = [(r, os.stat(os.path.join(self.root, r))) for r in rels]
            sized = [f"{r}:{st.st_size}" for r, st in stats]
            timed = [f"{p}:{st.st_mtime_ns}" for p, (_, st) in zip(sized, stats)]
        else:  # a member's CRC is its content: the same with or without times
            info = {i.filename: i for i in self.zip.infolist()}
            sized = timed = [f"{r}:{(i := info['/'.join(p for p in (self.prefix, r) if p)]).file_size}:{i.CRC}"
                             for r in rels]
        return tuple(sha256_bytes("\n".join(parts).encode()) for parts in (timed, sized))

    def where(self, rel: str = "") -> str:
        return os.path.join(self.root, rel) if rel else self.root


def scan_image_folder(root) -> tuple[_Tree, list[str], list[tuple[str, int]]]:
    """List an ImageFolder tree: (tree, sorted class names, [(relative path, label)]). Rejects bad layouts."""
    tree = _Tree(root)
    classes, loose = tree.listdir()
    classes = [c for c in classes if not c.startswith(".")]
    if not classes:
        raise NrrddError(f"{tree.where()}: no class sub-folders found (expected <root>/<class>/<image>)")
    items = []
    for label, c in enumerate(classes):
        subdirs, files = tree.listdir(c)
        files = [f for f in files if not f.startswith(".") and f not in IGNORED_NAMES]
        if not files:
            raise NrrddError(f"{tree.where(c)}: class folder '{c}' holds no images; remove it or add images")
        for f in files:
            if Path(f).suffix.lower() not in IMAGE_EXTS:
                raise NrrddError(f"{tree.where(c + '/' + f)}: not an image file (extension "
                                 f"'{Path(f).suffix}'); remove it or move it out of the data folder")
            items.append((f"{c}/{f}", label))
    return tree, classes, items


class LazyImages:
    """The images of a listed folder, decoded only when a batch is asked for (`.to(device)` or `decode()`).
    Indexing gives another lazy view, as tensor indexing gives a tensor, so a class and a seeded candidate
    pool are chosen before anything is decoded: memory follows the pool, not the training set."""

    def __init__(self, tree: "_Tree", rels: list[str], size: int, channels: int = 3):
        self.tree, self.rels, self.size, self.channels = tree, rels, size, channels

    def __len__(self) -> int:
        return len(self.rels)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rels), self.channels, self.size, self.size))

    def __getitem__(self, idx) -> "LazyImages":
        if isinstance(idx, slice):
            return LazyImages(self.tree, self.rels[idx], self.size, self.channels)
        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool:
            idx = torch.nonzero(idx).flatten()
        if idx.dim() != 1:
            raise TypeError("LazyImages takes a slice, a boolean mask or a 1-D index list")
        return LazyImages(self.tree, [self.rels[i] for i in idx.tolist()], self.size, self.channels)

    def decode(self, progress: bool = False) -> torch.Tensor:
        """uint8 (N, C, H, W): the one decoding loop, eager loading's too."""
        out = np.empty((len(self.rels), self.size, self.size, self.channels), np.uint8)
        for i, rel in enumerate(tqdm(self.rels, desc=f"decode {Path(self.tree.where()).name}", disable=not progress,
                                     leave=False, mininterval=1.0)):
            out[i] = decode_image(self.tree.read(rel), self.tree.where(rel), self.size, self.channels)
        return torch.from_numpy(np.ascontiguousarray(out.transpose(0, 3, 1, 2)))

    def to(self, device, non_blocking: bool = False) -> torch.Tensor:
        return self.decode().to(device, non_blocking=non_blocking)


def decode_image(data: bytes, where: str, size: int | None, channels: int = 3) -> np.ndarray:
    """Decode to uint8 (size, size, channels); a bad file raises one error naming it."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except UnidentifiedImageError:
        raise NrrddError(f"{where}: unreadable or truncated image (no image format PIL recognises); remove or "
                         "replace the file") from None
    except (OSError, SyntaxError, ValueError) as e:
        why = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e)).strip() or type(e).__name__
        raise NrrddError(f"{where}: unreadable or truncated image ({why}); remove or replace the file") from None
    img = img.convert("RGB" if channels == 3 else "L")
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def cache_dir() -> Path:
    return Path(os.environ.get("NRRDD_CACHE", Path.home() / ".cache" / "nrrdd"))


def decode_limit_bytes() -> int:
    """Decoded size above which `lazy="auto"` streams a folder instead of decoding it ($NRRDD_DECODE_MB)."""
    return int(float(os.environ.get("NRRDD_DECODE_MB", 4096)) * 2**20)


def load_image_folder(root, size: int | None = None, use_cache: bool = True, progress: bool = True,
                      lazy: bool | str = False) -> tuple[Split, list[str], dict]:
    """Decode an ImageFolder tree to a Split. Images are resized to `size` (default: the first image's side).

    Decoded arrays are cached under $NRRDD_CACHE keyed by the files' names, sizes and times,
    so a second load takes seconds and any change to the source invalidates the cache. With `lazy`, the
    tree is only listed: the Split holds `LazyImages`, and no cache is read or written; "auto" does that when
    the decoded images would pass `decode_limit_bytes()`.
    """
    tree, classes, items = scan_image_folder(root)
    key, files_digest = tree.fingerprints([r for r, _ in items])
    if size is None:
        size = decode_image(tree.read(items[0][0]), tree.where(items[0][0]), None).shape[0]
    # the source path is part of the key: look-alike trees (train/ and test/ unpacked from one archive, with
    # the same names, sizes and times) must not share a cache entry
    cache = cache_dir() / f"{sha256_bytes(f'{os.path.abspath(tree.where())}:{key}:{size}'.encode())[:24]}.npz"
    info = {"source": tree.where(), "files": len(items), "fingerprint": key, "image_size": size,
            "files_digest": files_digest}
    listed = LazyImages(tree, [r for r, _ in items], size)
    labels = np.array([lab for _, lab in items], np.int64)
    if lazy == "auto":
        lazy = len(items) * 3 * size * size > decode_limit_bytes()
    if lazy:
        return Split(listed, torch.from_numpy(labels)), classes, info
    if use_cache and cache.exists():
        with np.load(cache) as z:
            return Split(torch.from_numpy(z["images"]), torch.from_numpy(z["labels"])), classes, info
    images = listed.decode(progress).numpy()
    if use_cache:
        try:
            with atomic_path(cache) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, images=images, labels=labels)
        except OSError:
            pass  # a read-only or full cache location only costs speed
    return Split(torch.from_numpy(images), torch.from_numpy(labels)), classes, info


# ---------------------------------------------------------------- splits and statistics

def carve_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic per-class split: (kept indices, carved indices), `fraction` of each class carved."""
    g = torch.Generator().manual_seed(seed)
    keep, carve = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n = int(round(fraction * len(idx)))
        if fraction > 0 and n == 0 and len(idx) > 1:
            n = 1
        carve.append(idx[:n])
        keep.append(idx[n:])
    return torch.sort(torch.cat(keep)).values, torch.sort(torch.cat(carve)).values


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images in [0, 1], accumulated in float64 over chunks so
    memory stays at one chunk (4,096 CIFAR images; as many values at any size: 4,096 images at 224 px would
    hold 10 GB) rather than eight bytes per pixel of the whole set."""
    chunk = max(1, 4096 * 3 * 32 * 32 // max(1, images[0].numel())) if len(images) else 1
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    sq = torch.zeros_like(total)
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].double() / 255
        total += x.sum(dim=(0, 2, 3))
        sq += (x * x).sum(dim=(0, 2, 3))
    n = images.numel() / images.shape[1]
    mean = total / n
    std = (sq / n - mean * mean).clamp_min(0).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


# ---------------------------------------------------------------- named data sets: a registry

# name -> loader(image_size, progress, lazy) -> (training split before validation is carved, test split, classes, info)
DATASETS: dict[str, Callable] = {}


def register_dataset(name: str):
    def add(loader: Callable) -> Callable:
        DATASETS[name] = loader
        return loader
    return add


def dataset_names() -> list[str]:
    return list(DATASETS)


@register_dataset("digits")
def digits(image_size: int | None = None, progress: bool = False, lazy: bool = False):
    """scikit-learn's 8x8 digits (1,797 images, shipped inside the package): a demo set with no download;
    small enough that `lazy` changes nothing.

    Upsampled bilinearly to `image_size` (32) and replicated to 3 channels so every model sees the same
    input shape; a fixed 20% per class is the test split.
    """
    from sklearn.datasets import load_digits
    size = image_size or 32
    d = load_digits()
    x = torch.from_numpy(d.images).float()[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    y = torch.from_numpy(d.target).long()
    train_idx, test_idx = carve_split(y, 0.2, seed=12345)
    return (Split(x[train_idx], y[train_idx]), Split(x[test_idx], y[test_idx]), [str(i) for i in range(10)],
            {"source": "sklearn.datasets.load_digits"})


digits.where = lambda: "embedded (scikit-learn's load_digits)"


def shared_roots() -> list[Path]:
    """Where named image-folder sets are looked for: $NRRDD_DATA, ./shared/datasets, ../shared/datasets."""
    env = os.environ.get("NRRDD_DATA")
    roots = [Path(env)] if env else []
    return roots + [Path.cwd() / "shared" / "datasets", Path.cwd().parent / "shared" / "datasets"]


def find_shared(name: str, rel: str) -> str | None:
    """The first of `shared_roots` that holds `rel` (a folder, or a folder inside a .zip), else None."""
    for root in shared_roots():
        head = (root / rel.split(".zip")[0]).with_suffix(".zip") if ".zip" in rel else root / rel
        if head.exists():
            return str(root / rel)
    return None


def register_shared_folder(name: str, rel: str) -> None:
    """A named set kept as train/ and test/ image folders (plain or zipped) under one of `shared_roots`."""
    def load(image_size: int | None = None, progress: bool = True, lazy: bool = False):
        root = find_shared(name, rel)
        if root is None:
            raise NrrddError(f"data set '{name}' not found under {', '.join(map(str, shared_roots()))}; set "
                             f"NRRDD_DATA to the folder that holds {rel.split('/')[0]}/ (README: Data)")
        return folder_splits(root, image_size, progress, lazy)
    load.where = lambda: find_shared(name, rel) or f"not found under {', '.join(map(str, shared_roots()))}"
    register_dataset(name)(load)


register_shared_folder("cifar10", "cifar10")
register_shared_folder("cifar100", "cifar100/cifar100.zip/cifar100")


def folder_splits(root: str, image_size: int | None, progress: bool, lazy: bool = False):
    """train/ and test/ ImageFolder trees under `root` (a folder, a .zip, or a folder inside one)."""
    if ".zip" not in root and not os.path.isdir(root):
        raise NrrddError(f"--data {root}: {'not a folder' if os.path.exists(root) else 'not found'}; give a "
                         f"named data set ({', '.join(DATASETS)}), a .npz from export-arrays, or a folder (or .zip) "
                         "holding train/ and test/, each with one sub-folder per class")
    tree = _Tree(root)
    subs, _ = tree.listdir()
    if not {"train", "test"} <= set(subs):
        raise NrrddError(f"{tree.where()}: expected 'train' and 'test' sub-folders, found {subs or 'none'}")
    full, classes, info = load_image_folder(os.path.join(root, "train"), image_size, progress=progress, lazy=lazy)
    test, test_classes, test_info = load_image_folder(os.path.join(root, "test"), full.images.shape[-1],
                                                      progress=progress, lazy=lazy)
    if test_classes != classes:
        only = sorted(set(classes) ^ set(test_classes))
        raise NrrddError(f"{tree.where()}: train and test class folders differ (only in one: {only}); "
                         "both splits need the same classes")
    return full, test, classes, {"train": info, "test": test_info}


def load_dataset(spec: str, image_size: int | None = None, val_fraction: float = 0.1, split_seed: int = 0,
                 progress: bool = True, lazy: bool | str = False) -> Dataset:
    """Load `spec`: a registered name (digits, cifar10, cifar100...), a .npz from export-arrays, or a path
    holding train/ and test/ ImageFolder trees. `lazy`: image folders are listed, not decoded (the splits hold
    LazyImages; mean and std are None, see `dataset_stats`); "auto": only folders too large to hold decoded."""
    if spec in DATASETS:
        full, test, classes, info = DATASETS[spec](image_size, progress, lazy=lazy)
    elif spec.endswith(".npz"):
        full, test, classes, info = load_arrays(spec)
    else:
        full, test, classes, info = folder_splits(spec, image_size, progress, lazy)
    keep, val = carve_split(full.labels, val_fraction, split_seed)
    train = full.subset(keep)
    mean, std = channel_stats(train.images) if isinstance(train.images, torch.Tensor) else (None, None)
    info.update(val_fraction=val_fraction, split_seed=split_seed,
                sizes={"train": len(keep), "val": len(val), "test": len(test)})
    return Dataset(spec, classes, train, full.subset(val), test, mean, std, info)


def dataset_stats(ds: Dataset, sample: int = 10_000, seed: int = 0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The training images' channel mean and std; for a listed (lazy) set, those of a seeded sample of
    `sample` images, so that no pass over the whole set is needed."""
    if ds.mean is not None:
        return ds.mean, ds.std
    idx = torch.randperm(len(ds.train), generator=torch.Generator().manual_seed(seed))[:sample]
    return channel_stats(ds.train.images[torch.sort(idx).values].decode())


def image_batches(images, batches: list[torch.Tensor], device, workers: int = 0):
    """uint8 image batches in the given index order: slices of a tensor (on its own device), or LazyImages
    decoded by `workers` processes a few batches ahead of the training step (a torch DataLoader)."""
    if isinstance(images, torch.Tensor):
        for idx in batches:
            yield images[idx.to(images.device)]
        return
    loader = torch.utils.data.DataLoader(_Decoded(images), sampler=[b.cpu() for b in batches], batch_size=None,
                                         num_workers=workers, pin_memory=torch.device(device).type == "cuda")
    for x in loader:
        yield x.to(device, non_blocking=True)


class _Decoded(torch.utils.data.Dataset):
    def __init__(self, images: LazyImages):
        self.images = images

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return self.images[idx].decode()

    def __len__(self) -> int:
        return len(self.images)


def decode_workers() -> int:
    """Decoding processes beside the training process: every core but one, at most 8."""
    return min(8, max(0, (os.cpu_count() or 1) - 1))


def save_arrays(path, spec: str, image_size: int | None = None) -> None:
    """Both splits of a data set as one uint8 .npz: a portable copy for machines without the source folders."""
    ds = load_dataset(spec, image_size, val_fraction=0.0)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, train_images=ds.train.images.numpy(), train_labels=ds.train.labels.numpy(),
                                test_images=ds.test.images.numpy(), test_labels=ds.test.labels.numpy(),
                                classes=np.array(ds.classes))


def load_arrays(path) -> tuple[Split, Split, list[str], dict]:
    if not os.path.isfile(path):
        raise NrrddError(f"{path}: array file not found")
    try:
        z = np.load(path)  # allow_pickle stays off: an array file never runs code
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise NrrddError(f"{path}: not an nrrdd array file ({str(e).splitlines()[0][:120]})") from None
    with z:
        missing = {"train_images", "train_labels", "test_images", "test_labels", "classes"} - set(z.files)
        if missing:
            raise NrrddError(f"{path}: not an nrrdd array file (lacks {sorted(missing)})")
        train = Split(torch.from_numpy(z["train_images"]), torch.from_numpy(z["train_labels"]).long())
        test = Split(torch.from_numpy(z["test_images"]), torch.from_numpy(z["test_labels"]).long())
        return train, test, [str(c) for c in z["classes"]], {"source": str(path)}


def data_mismatch(trained_on: dict, given: dict) -> str | None:
    """Why a teacher's recorded data (its `data_info`) is not the data set given, or None: other training files,
    or another validation split (then some validation images may be ones it trained on)."""
    a, b = (trained_on.get("train") or {}).get("files_digest"), (given.get("train") or {}).get("files_digest")
    if a and b and a != b:
        return "it was trained on other training files"
    split = ("val_fraction", "split_seed")
    if all(k in trained_on and k in given for k in split) and any(trained_on[k] != given[k] for k in split):
        return (f"it was trained with validation split {[trained_on[k] for k in split]}, not "
                f"{[given[k] for k in split]}, so validation images may be ones it saw")
    return None


def display_names(path, classes: list[str]) -> list[str]:
    """Readable class names for pictures, from a file that maps folder names to names: lines "<folder> <name>"
    (ImageNet's LOC_synset_mapping.txt, Tiny-ImageNet's words.txt; the name up to its first comma) or a JSON
    object. A folder the file does not name keeps its own name; a file that names none of them is refused."""
    p = Path(path)
    if not p.is_file():
        raise NrrddError(f"--class-names {path}: file not found")
    text = p.read_text(errors="replace")
    if text.lstrip().startswith("{"):
        try:
            mapping = {str(k): str(v) for k, v in json.loads(text).items()}
        except (json.JSONDecodeError, AttributeError) as e:
            raise NrrddError(f"--class-names {path}: not a JSON object of folder: name ({e})") from None
    else:
        mapping = dict(parts for ln in text.splitlines() if len(parts := ln.strip().split(None, 1)) == 2)
    if not any(c in mapping for c in classes):
        raise NrrddError(f"--class-names {path}: names none of the {len(classes)} class folders (such as "
                         f"'{classes[0]}'); expected lines '<folder> <name>' or a JSON object")
    return [mapping[c].split(",")[0].strip() or c if c in mapping else c for c in classes]


def distilled_root(path) -> Path:
    """Where a distilled set's class folders are: images/ of an nrrdd folder, else the folder itself."""
    path = Path(path)
    return path / "images" if (path / "images").is_dir() else path


def load_distilled(path, verify: bool = True) -> tuple[Split, list[str], dict]:
    """A distilled set: an nrrdd output folder (images/ + distill.json) or any ImageFolder of images. An nrrdd
    folder must still match its manifest (unless `verify` is off): students never train on a changed set."""
    path = Path(path)
    if not path.is_dir():
        raise NrrddError(f"--distilled {path}: folder not found")
    if verify and (path / "distill.json").exists() and not (path / MANIFEST).exists():
        raise NrrddError(f"{path}: an unfinished distilled set (no {MANIFEST}); finish it with nrrdd distill "
                         "--resume, or pass --no-verify")
    if verify and (path / MANIFEST).exists():
        require_intact(path, "distilled set")
    record = read_json(path / "distill.json") if (path / "distill.json").exists() else {}
    root = distilled_root(path)
    split, classes, _ = load_image_folder(root, use_cache=False, progress=False)
    if record and set(classes) != set(record["classes"]):
        raise NrrddError(f"{root}: class folders {classes} differ from distill.json's {record['classes']}")
    return split, classes, record


# ---------------------------------------------------------------- tensors on the device

def normalize(x_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (or [0,1] float) images -> normalised float, on the images' device."""
    x = x_uint8.float() / 255 if x_uint8.dtype == torch.uint8 else x_uint8
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def denormalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return x * s + m


def random_crop_flip(x: torch.Tensor, pad: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Batched pad-and-crop plus horizontal flip, one draw per image, on the tensor's own device."""
    n, _, h, w = x.shape
    dev = x.device
    if pad:
        xp = F.pad(x, (pad,) * 4, mode="reflect")
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(dev)
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(dev)
        rows = (dy[:, None] + torch.arange(h, device=dev)[None])  # (n, h)
        cols = (dx[:, None] + torch.arange(w, device=dev)[None])  # (n, w)
        index, channel = torch.arange(n, device=dev), torch.arange(x.shape[1], device=dev)
        x = xp[index[:, None, None, None], channel[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]
    flip = (torch.rand(n, generator=gen) < 0.5).to(dev)
    return torch.where(flip[:, None, None, None], x.flip(3), x)
