"""Data loading: ImageFolder trees (plain and zipped), the decode cache, bad inputs, splits, digits, tensors."""
from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest
import torch
from conftest import read_tree, write_png
from PIL import Image

from nrrdd import NrrddError
from nrrdd import data as D
from nrrdd.data import (carve_split, channel_stats, denormalize, load_dataset, load_image_folder, normalize,
                        random_crop_flip)


def _load(path, **kw):
    return load_image_folder(path, progress=False, **kw)


# ---------------------------------------------------------------- good folders

def test_load_folder_shapes_dtype_classes_labels(make_folder):
    root = make_folder(classes=("zebra", "ant", "moth"), n=3, size=8)
    split, classes, info = _load(root / "train")
    ref_classes, ref_images, ref_labels = read_tree(root / "train")
    assert classes == ["ant", "moth", "zebra"] == ref_classes
    assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
    assert tuple(split.images.shape) == (9, 3, 8, 8)
    assert split.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # pixels are the files' own pixels, in sorted order, each beside its class's label
    np.testing.assert_array_equal(split.images.numpy(), ref_images)
    np.testing.assert_array_equal(split.labels.numpy(), ref_labels)
    assert info["files"] == 9 and info["image_size"] == 8
    assert len(split) == 9 and split.of_class(1).shape == (3, 3, 8, 8)


def test_resize_to_given_size(make_folder):
    root = make_folder(size=12)
    split, _, info = _load(root / "train", size=6)
    assert tuple(split.images.shape) == (9, 3, 6, 6) and split.images.dtype == torch.uint8
    assert info["image_size"] == 6
    # bilinear resize of the actual file, not some other transform
    f = root / "train" / "ant" / "0.png"
    want = np.asarray(Image.open(f).convert("RGB").resize((6, 6), Image.BILINEAR)).transpose(2, 0, 1)
    np.testing.assert_array_equal(split.images[0].numpy(), want)


def test_images_of_different_sizes_are_resized_to_first(make_folder):
    sizes = {(0, 0): 10, (0, 1): (7, 13), (1, 0): 16, (1, 1): (20, 5)}
    root = make_folder(classes=("a", "b"), n=2, size=lambda c, i: sizes[(c, i)], splits=None)
    split, classes, _ = _load(root)
    assert classes == ["a", "b"]
    assert tuple(split.images.shape) == (4, 3, 10, 10)  # a/0.png (10 px) is the first image
    split, _, _ = _load(root, size=4)
    assert tuple(split.images.shape) == (4, 3, 4, 4)


def test_single_class_folder_loads(make_folder):
    root = make_folder(classes=("only",), n=3, splits=None)
    split, classes, _ = _load(root)
    assert classes == ["only"] and split.labels.tolist() == [0, 0, 0]


def test_ignored_and_hidden_files_are_skipped(make_folder):
    root = make_folder(classes=("a", "b"), n=2, splits=None)
    (root / "a" / "README.md").write_text("notes")
    (root / "a" / ".hidden.txt").write_text("x")
    (root / ".git").mkdir()
    split, classes, _ = _load(root)
    assert classes == ["a", "b"] and len(split) == 4


def test_load_dataset_from_folder(make_folder):
    root = make_folder(classes=("b", "a"), n=10, size=8)
    ds = load_dataset(str(root), val_fraction=0.2, progress=False)
    assert ds.classes == ["a", "b"] and ds.num_classes == 2 and ds.image_size == 8 and ds.channels == 3
    assert len(ds.train) == 16 and len(ds.val) == 4 and len(ds.test) == 20
    assert ds.info["sizes"] == {"train": 16, "val": 4, "test": 20}
    # train + val are exactly the training folder's images
    _, ref, _ = read_tree(root / "train")
    got = torch.cat([ds.train.images, ds.val.images]).numpy()
    assert sorted(map(bytes, got.reshape(20, -1))) == sorted(map(bytes, ref.reshape(20, -1)))
    assert ds.mean == channel_stats(ds.train.images)[0]


# ---------------------------------------------------------------- cache

def test_cache_second_load_identical_and_really_cached(make_folder, cache_path, monkeypatch):
    root = make_folder()
    first, classes, _ = _load(root / "train")
    assert list(cache_path.glob("*.npz")), "first load should write a cache file"

    def boom(*a, **k):
        raise AssertionError("decoded again although cached")
    monkeypatch.setattr(D, "decode_image", boom)
    second, classes2, _ = _load(root / "train", size=8)
    assert classes2 == classes
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)


def test_cache_invalidated_by_changed_file(make_folder):
    root = make_folder(size=8)
    first, _, info1 = _load(root / "train")
    f = root / "train" / "moth" / "1.png"
    st = os.stat(f)
    new = write_png(f, np.random.default_rng(99), 8)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    second, _, info2 = _load(root / "train")
    assert info1["fingerprint"] != info2["fingerprint"]
    idx = 3 * 1 + 1  # moth is class 1 (ant, moth, zebra); file 1
    np.testing.assert_array_equal(second.images[idx].numpy(), new.transpose(2, 0, 1))
    assert not torch.equal(first.images[idx], second.images[idx])
    others = torch.arange(9) != idx
    assert torch.equal(first.images[others], second.images[others])


def test_cache_does_not_mix_up_look_alike_folders(make_folder):
    """train/ and test/ with the same file names, sizes and times (e.g. unpacked from one archive) differ in pixels."""
    root = make_folder(n=3, size=8)  # random 8x8 PNGs are incompressible: every file has the same size
    t = 1_600_000_000_000_000_000
    for f in root.rglob("*.png"):
        os.utime(f, ns=(t, t))
    train, _, _ = _load(root / "train")
    test, _, _ = _load(root / "test")
    np.testing.assert_array_equal(test.images.numpy(), read_tree(root / "test")[1])
    assert not torch.equal(train.images, test.images)


def test_no_cache_when_disabled(make_folder, cache_path):
    root = make_folder()
    _load(root / "train", use_cache=False)
    assert not list(cache_path.iterdir())


# ---------------------------------------------------------------- zip archives

def _zip_tree(src_root, zpath, inner="inner"):
    with zipfile.ZipFile(zpath, "w") as z:
        for p in sorted(src_root.rglob("*")):
            if p.is_file():
                z.write(p, f"{inner}/{p.relative_to(src_root).as_posix()}")


def test_zip_folder_loads_like_plain_folder(make_folder, tmp_path):
    root = make_folder(classes=("zebra", "ant"), n=3, size=8)
    zpath = tmp_path / "x.zip"
    _zip_tree(root, zpath)
    plain, classes, _ = _load(root / "train")
    zipped, zclasses, info = _load(f"{zpath}/inner/train")
    assert zclasses == classes == ["ant", "zebra"]
    assert torch.equal(zipped.images, plain.images) and torch.equal(zipped.labels, plain.labels)
    assert str(zpath) in info["source"]
    ds = load_dataset(f"{zpath}/inner", progress=False)
    assert ds.classes == ["ant", "zebra"] and len(ds.train) + len(ds.val) == 6 and len(ds.test) == 6


def test_zip_with_directory_entries(make_folder, tmp_path):
    root = make_folder(classes=("a", "b"), n=2, splits=None)
    zpath = tmp_path / "d.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for p in sorted(root.rglob("*")):
            z.write(p, p.relative_to(root).as_posix() + ("/" if p.is_dir() else ""))
    split, classes, _ = _load(zpath)
    assert classes == ["a", "b"] and len(split) == 4


def test_zip_errors(make_folder, tmp_path):
    with pytest.raises(NrrddError, match="zip archive not found") as e:
        _load(tmp_path / "nope.zip")
    assert str(tmp_path / "nope.zip") in str(e.value)
    with pytest.raises(NrrddError, match="not found") as e:
        _load(tmp_path / "nope.zip" / "train")
    assert str(tmp_path / "nope.zip") in str(e.value)
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(NrrddError, match="not a readable zip") as e:
        _load(bad)
    assert str(bad) in str(e.value)
    root = make_folder(classes=("a",), n=1, splits=None)
    zpath = tmp_path / "ok.zip"
    _zip_tree(root, zpath)
    with pytest.raises(NrrddError, match="no class sub-folders"):
        _load(f"{zpath}/elsewhere")


# ---------------------------------------------------------------- bad inputs

def test_empty_class_folder(make_folder):
    root = make_folder(classes=("a", "b"), n=2, splits=None)
    (root / "empty").mkdir()
    with pytest.raises(NrrddError) as e:
        _load(root)
    msg = str(e.value)
    assert str(root / "empty") in msg and "holds no images" in msg


def test_truncated_image(make_folder):
    root = make_folder(classes=("a", "b"), n=2, size=12, splits=None)
    bad = root / "b" / "1.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(NrrddError) as e:
        _load(root)
    msg = str(e.value)
    assert str(bad) in msg and "truncated" in msg


def test_truncated_first_image(make_folder):
    """The first image is also decoded to pick the size: its error must be just as clear."""
    root = make_folder(classes=("a",), n=2, size=12, splits=None)
    bad = root / "a" / "0.png"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(NrrddError) as e:
        _load(root)
    assert str(bad) in str(e.value) and "unreadable or truncated" in str(e.value)


def test_garbage_with_image_extension(make_folder):
    root = make_folder(classes=("a",), n=1, splits=None)
    bad = root / "a" / "fake.jpg"
    bad.write_bytes(b"hello, I am text")
    with pytest.raises(NrrddError) as e:
        _load(root, size=8)
    assert str(bad) in str(e.value) and "unreadable" in str(e.value)


def test_file_that_is_not_an_image(make_folder):
    root = make_folder(classes=("a", "b"), n=2, splits=None)
    (root / "b" / "notes.txt").write_text("some notes")
    with pytest.raises(NrrddError) as e:
        _load(root)
    msg = str(e.value)
    assert str(root / "b" / "notes.txt") in msg and "not an image" in msg and ".txt" in msg


def test_missing_path(tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(NrrddError) as e:
        _load(missing)
    assert str(missing) in str(e.value) and "not found" in str(e.value)
    with pytest.raises(NrrddError) as e:
        load_dataset(str(missing), progress=False)
    assert str(missing) in str(e.value) and "not found" in str(e.value)


def test_path_is_a_file(tmp_path):
    f = tmp_path / "file.png"
    write_png(f, np.random.default_rng(0))
    with pytest.raises(NrrddError) as e:
        _load(f)
    assert str(f) in str(e.value) and "not a folder" in str(e.value)


def test_root_without_class_folders(tmp_path):
    root = tmp_path / "flat"
    for i in range(3):
        write_png(root / f"{i}.png", np.random.default_rng(i))
    with pytest.raises(NrrddError) as e:
        _load(root)
    assert str(root) in str(e.value) and "no class sub-folders" in str(e.value)


def test_dataset_without_train_test(make_folder):
    root = make_folder(splits=("train", "val"))
    with pytest.raises(NrrddError) as e:
        load_dataset(str(root), progress=False)
    assert str(root) in str(e.value) and "'train' and 'test'" in str(e.value)


def test_train_and_test_class_sets_differ(make_folder):
    root = make_folder(classes=("a", "b"), n=2)
    write_png(root / "test" / "c" / "0.png", np.random.default_rng(5))
    with pytest.raises(NrrddError) as e:
        load_dataset(str(root), progress=False)
    msg = str(e.value)
    assert str(root) in msg and "differ" in msg and "'c'" in msg


# ---------------------------------------------------------------- splits

def test_carve_split_deterministic_disjoint_covering():
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 3 + [3] * 1)[torch.randperm(21, generator=torch.Generator().manual_seed(1))]
    keep, carve = carve_split(labels, 0.3, seed=7)
    keep2, carve2 = carve_split(labels, 0.3, seed=7)
    assert torch.equal(keep, keep2) and torch.equal(carve, carve2)
    assert set(keep.tolist()).isdisjoint(carve.tolist())
    assert sorted(keep.tolist() + carve.tolist()) == list(range(21))
    assert torch.equal(keep, keep.sort().values) and torch.equal(carve, carve.sort().values)
    per_class = {c: int((labels[carve] == c).sum()) for c in range(4)}
    assert per_class == {0: round(0.3 * 10), 1: round(0.3 * 7), 2: round(0.3 * 3), 3: 0}
    # another seed: another carve, same per-class counts
    others = [carve_split(labels, 0.3, seed=s)[1] for s in range(8, 14)]
    assert any(not torch.equal(o, carve) for o in others)
    assert all({c: int((labels[o] == c).sum()) for c in range(4)} == per_class for o in others)


def test_carve_split_edges():
    labels = torch.tensor([0] * 5 + [1] * 5)
    keep, carve = carve_split(labels, 0.0, seed=0)
    assert len(carve) == 0 and keep.tolist() == list(range(10))
    keep, carve = carve_split(labels, 0.05, seed=0)  # round(0.25) == 0, but a non-zero fraction carves >= 1
    assert [int((labels[carve] == c).sum()) for c in (0, 1)] == [1, 1]


def test_digits_dataset():
    ds = load_dataset("digits", progress=False)
    assert ds.classes == [str(i) for i in range(10)]
    for s in (ds.train, ds.val, ds.test):
        assert s.images.shape[1:] == (3, 32, 32) and s.images.dtype == torch.uint8
    assert len(ds.train) + len(ds.val) + len(ds.test) == 1797
    assert ds.info["sizes"] == {"train": len(ds.train), "val": len(ds.val), "test": len(ds.test)}
    # the three channels are copies (grey digits)
    assert torch.equal(ds.train.images[:, 0], ds.train.images[:, 2])
    from sklearn.datasets import load_digits
    counts = np.bincount(load_digits().target, minlength=10)
    for c in range(10):
        n_test = int((ds.test.labels == c).sum())
        n_val = int((ds.val.labels == c).sum())
        n_train = int((ds.train.labels == c).sum())
        assert n_test == round(0.2 * counts[c])
        assert n_val == round(0.1 * (counts[c] - n_test))
        assert n_train + n_val + n_test == counts[c]
    # the split is seeded: loading again gives the same images in the same places
    again = load_dataset("digits", progress=False)
    assert torch.equal(again.val.images, ds.val.images) and torch.equal(again.test.labels, ds.test.labels)
    assert load_dataset("digits", image_size=16, progress=False).image_size == 16


# ---------------------------------------------------------------- tensors

def test_random_crop_flip_shape_dtype():
    x = torch.rand(6, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    y = random_crop_flip(x, 2, g)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert not torch.equal(y, x)  # something moved
    # every output pixel comes from the input image (reflect padding adds no new values)
    for i in range(6):
        assert set(y[i].flatten().tolist()) <= set(x[i].flatten().tolist())


def test_random_crop_flip_no_pad_is_identity_or_flip():
    x = torch.rand(32, 3, 5, 7)
    y = random_crop_flip(x, 0, torch.Generator().manual_seed(3))
    assert y.shape == x.shape and y.dtype == x.dtype
    same = [torch.equal(y[i], x[i]) for i in range(32)]
    flipped = [torch.equal(y[i], x[i].flip(-1)) for i in range(32)]
    assert all(s != f for s, f in zip(same, flipped))  # exactly one of the two for each image
    assert 0 < sum(flipped) < 32
    y2 = random_crop_flip(x, 0, torch.Generator().manual_seed(3))
    assert torch.equal(y, y2)


def test_random_crop_flip_translation():
    """With pad p and no flip the output is the reflect-padded image shifted by at most p."""
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    xp = torch.nn.functional.pad(x, (2,) * 4, mode="reflect")
    y = random_crop_flip(x, 2, torch.Generator().manual_seed(0))
    for i in range(2):
        windows = [xp[i, :, dy:dy + 6, dx:dx + 6] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(y[i], w) or torch.equal(y[i], w.flip(-1)) for w in windows)


def test_normalize_denormalize_round_trip():
    mean, std = (0.5, 0.25, 0.1), (0.2, 0.3, 0.4)
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    z = normalize(x, mean, std)
    assert z.dtype == torch.float32
    # channel 1 of pixel (0, 0, 0) by hand
    assert z[0, 1, 0, 0].item() == pytest.approx((x[0, 1, 0, 0].item() / 255 - 0.25) / 0.3, abs=1e-6)
    torch.testing.assert_close(denormalize(z, mean, std), x.float() / 255, atol=1e-6, rtol=0)
    f = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(normalize(denormalize(f, mean, std), mean, std), f, atol=1e-6, rtol=0)
    torch.testing.assert_close(normalize(x.float() / 255, mean, std), z)  # float input taken as [0, 1]


def test_channel_stats_by_hand():
    # two 1x2 images, 2 channels: channel 0 values {0, 255, 255, 255}, channel 1 values {51, 51, 102, 102}
    x = torch.tensor([[[[0, 255]], [[51, 51]]],
                      [[[255, 255]], [[102, 102]]]], dtype=torch.uint8)
    mean, std = channel_stats(x)
    # channel 0: values 0,1,1,1 -> mean 0.75, population var = (0.5625 + 3 * 0.0625) / 4 = 0.1875
    # channel 1: values 0.2,0.2,0.4,0.4 -> mean 0.3, std 0.1
    assert mean == pytest.approx((0.75, 0.3), abs=1e-4)
    assert std == pytest.approx((0.1875 ** 0.5, 0.1), abs=1e-4)
    assert len(mean) == 2 and len(std) == 2


def test_channel_stats_over_many_chunks_of_large_images_match_the_whole():
    x = torch.randint(0, 256, (100, 1, 512, 512), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    mean, std = channel_stats(x)  # 48 images per chunk at this size: three chunks
    v = x.double() / 255
    assert mean == pytest.approx((round(v.mean().item(), 4),), abs=1e-4)
    assert std == pytest.approx((round(v.std(unbiased=False).item(), 4),), abs=1e-4)


def test_a_registered_data_set_loads_by_name(monkeypatch, capsys):
    """Adding a named data set is one registered loader; load_dataset, the CLI and `nrrdd datasets` see it."""
    from nrrdd.cli import main
    from nrrdd.data import DATASETS, Split, load_dataset, register_dataset
    monkeypatch.setattr("nrrdd.data.DATASETS", dict(DATASETS))
    import nrrdd.data

    @register_dataset("tiny")
    def tiny(image_size=None, progress=False, lazy=False):
        x = torch.arange(4 * 3 * 2 * 2, dtype=torch.uint8).view(4, 3, 2, 2)
        return Split(x, torch.tensor([0, 0, 1, 1])), Split(x[:2], torch.tensor([0, 1])), ["a", "b"], {"source": "t"}
    tiny.where = lambda: "in this test"
    assert "tiny" in nrrdd.data.DATASETS
    ds = load_dataset("tiny", val_fraction=0.5)
    assert ds.classes == ["a", "b"] and (len(ds.train), len(ds.val), len(ds.test)) == (2, 2, 2)
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "tiny: in this test" in out and "digits: embedded" in out


def test_files_digest_survives_a_copy_and_names_a_changed_file(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        write_png(tmp_path / "t" / c / "0.png", rng, 4)
    _, _, info = load_image_folder(tmp_path / "t", use_cache=False, progress=False)
    os.utime(tmp_path / "t" / "a" / "0.png", (1, 1))  # a copy: same files, other times
    _, _, copied = load_image_folder(tmp_path / "t", use_cache=False, progress=False)
    assert copied["files_digest"] == info["files_digest"] and copied["fingerprint"] != info["fingerprint"]
    write_png(tmp_path / "t" / "b" / "1.png", rng, 4)
    _, _, grown = load_image_folder(tmp_path / "t", use_cache=False, progress=False)
    assert grown["files_digest"] != info["files_digest"]


def test_data_mismatch_says_why_a_teacher_may_not_fit():
    from nrrdd.data import data_mismatch
    seen = {"train": {"files_digest": "x"}, "val_fraction": 0.1, "split_seed": 0}
    assert data_mismatch(seen, dict(seen)) is None
    assert data_mismatch(seen, {**seen, "train": {"files_digest": "y"}}) == "it was trained on other training files"
    assert "validation images may be ones it saw" in data_mismatch(seen, {**seen, "split_seed": 1})
    assert data_mismatch({}, seen) is None  # a teacher that recorded nothing: nothing to say


def test_lazy_folder_lists_without_decoding_and_decodes_what_eager_loading_gives(make_folder):
    """LazyImages index like a tensor (a slice, a mask, an index list give another lazy view) and decode to
    exactly the eagerly loaded pixels; a lazy data set carves the same validation split."""
    from nrrdd.data import LazyImages, load_dataset
    root = make_folder(classes=("a", "b", "c"), n=4, size=8)
    eager, classes, _ = _load(root / "train")
    lazy, lazy_classes, _ = _load(root / "train", lazy=True)
    assert isinstance(lazy.images, LazyImages) and lazy_classes == classes
    assert tuple(lazy.images.shape) == (12, 3, 8, 8) and torch.equal(lazy.labels, eager.labels)
    assert torch.equal(lazy.images.decode(), eager.images)
    for idx in (slice(2, 7), eager.labels == 1, torch.tensor([11, 0, 5])):
        view = lazy.images[idx]
        assert isinstance(view, LazyImages) and torch.equal(view.to("cpu"), eager.images[idx])
    assert torch.equal(lazy.of_class(2).decode(), eager.of_class(2))
    ds, dl = load_dataset(str(root), val_fraction=0.25), load_dataset(str(root), val_fraction=0.25, lazy=True)
    assert dl.mean is None and ds.mean is not None
    assert torch.equal(dl.val.images.decode(), ds.val.images) and torch.equal(dl.train.labels, ds.train.labels)
