"""Dataset readers: synthetic patterns, CIFAR pickles, ImageFolder trees (and their cache), real CIFAR JPEGs."""
from __future__ import annotations

import io
import os
import pickle
import re
import shlex
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eit_fast.data import folder as folder_mod
from eit_fast.data.arrays import DataError, ImageArrays
from eit_fast.data.cifar import find_cifar, load_pickle, read_cifar
from eit_fast.data.folder import decode_folder, decode_images, scan_image_folder
from eit_fast.data.synthetic import PATTERNS, make_synthetic

CIFAR_JPEG_TARBALL = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10-jpeg.tar.gz"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ---- ImageArrays ----------------------------------------------------------------------------------------

def test_image_arrays_rejects_malformed_tensors():
    good = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    labels = torch.tensor([0, 1])
    assert len(ImageArrays(good, labels, ["a", "b"], "src")) == 2
    with pytest.raises(DataError, match="src.*uint8"):
        ImageArrays(good.float(), labels, ["a", "b"], "src")
    with pytest.raises(DataError, match="src.*int64"):
        ImageArrays(good, labels.int(), ["a", "b"], "src")
    with pytest.raises(DataError, match="src.*labels span"):
        ImageArrays(good, torch.tensor([0, 2]), ["a", "b"], "src")


# ---- synthetic ------------------------------------------------------------------------------------------

def test_synthetic_is_deterministic():
    # 600 images at 32 px span two render chunks, so the chunking is covered too.
    a, b = make_synthetic(600, seed=3), make_synthetic(600, seed=3)
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.labels, b.labels)
    assert a.source == b.source


def test_synthetic_seed_changes_the_images():
    a, b = make_synthetic(200, seed=0), make_synthetic(200, seed=1)
    assert not torch.equal(a.labels, b.labels)
    differing = (a.images != b.images).float().mean().item()
    assert differing > 0.5, f"only {differing:.2%} of pixels differ between seeds"


@pytest.mark.parametrize("num_samples, img_size, num_classes", [(103, 32, 10), (50, 48, 2), (77, 16, 7)])
def test_synthetic_shapes_dtypes_and_balance(num_samples, img_size, num_classes):
    d = make_synthetic(num_samples, img_size=img_size, num_classes=num_classes, seed=5)
    assert d.images.shape == (num_samples, 3, img_size, img_size)
    assert d.images.dtype == torch.uint8 and d.images.is_contiguous() and d.images.device.type == "cpu"
    assert d.labels.shape == (num_samples,) and d.labels.dtype == torch.int64
    assert d.classes == list(PATTERNS[:num_classes])
    counts = torch.bincount(d.labels, minlength=num_classes)
    assert len(counts) == num_classes and counts.min() >= 1
    assert counts.max() - counts.min() <= 1  # exactly balanced up to the remainder
    assert d.images.float().std() > 30  # real contrast, not a flat or empty image
    assert "synthetic" in d.source


def test_synthetic_classes_not_separable_by_mean_colour():
    train, val = make_synthetic(3000, seed=0), make_synthetic(1000, seed=1)
    feat = lambda d: d.images.float().mean(dim=(2, 3)) / 255  # noqa: E731
    f_train, f_val = feat(train), feat(val)
    centroids = torch.stack([f_train[train.labels == c].mean(0) for c in range(10)])
    acc = (torch.cdist(f_val, centroids).argmin(1) == val.labels).float().mean().item()
    # Chance is 0.10; the sampling noise of 1000 validation images is about 0.01.
    assert acc < 0.16, f"nearest-class-mean on mean colour reaches {acc:.3f}: colours give the class away"


def test_synthetic_patterns_look_like_their_names():
    # Stripes vary across, not along, their direction: a cheap check that the renderers draw what the
    # class names say (a mix-up of labels and patterns would flip these).
    d = make_synthetic(400, seed=2)
    x = d.images.float()
    dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean(dim=(1, 2, 3))
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean(dim=(1, 2, 3))
    horizontal, vertical = d.labels == PATTERNS.index("horizontal_stripes"), d.labels == PATTERNS.index(
        "vertical_stripes")
    assert (dy[horizontal] > dx[horizontal]).all()
    assert (dx[vertical] > dy[vertical]).all()
    # Shapes cover part of the image, stripes about half of it: the disc class has a dominant background.
    disc = x[d.labels == PATTERNS.index("disc")]
    corner_vs_centre = (disc[:, :, 0, 0] - disc[:, :, 16, 16]).abs().mean()
    assert corner_vs_centre > 20


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_samples=10, num_classes=11), "between 2 and 10"),
    (dict(num_samples=10, num_classes=1), "between 2 and 10"),
    (dict(num_samples=0), "num_samples"),
    (dict(num_samples=10, img_size=4), "img_size"),
])
def test_synthetic_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_synthetic(**kwargs)


# ---- CIFAR pickles --------------------------------------------------------------------------------------

class _Py2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2's cPickle wrote the official CIFAR files: every str/bytes is an 8-bit string
    (SHORT_BINSTRING / BINSTRING), arrays via numpy.core.multiarray._reconstruct."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def _write_py2_pickle(path: Path, obj) -> None:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 2 names the module numpy._core; the official files (numpy 1, Python 2) say numpy.core.
    path.write_bytes(buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))


def _batch(data: np.ndarray, labels: list[int], label_key: bytes = b"labels") -> dict:
    return {b"batch_label": b"fake batch", label_key: labels, b"data": data,
            b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]}


def _make_cifar10(root: Path, per_batch: int = 3) -> tuple[np.ndarray, list[int]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    all_data, all_labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        _write_py2_pickle(folder / name, _batch(data, labels))
        if name != "test_batch":
            all_data.append(data)
            all_labels += labels
    _write_py2_pickle(folder / "batches.meta", {b"label_names": [c.encode() for c in CIFAR10_CLASSES],
                                                 b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    return np.concatenate(all_data), all_labels


def test_cifar10_pixel_layout_labels_and_classes(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    train_data, train_labels = _make_cifar10(tmp_path)
    # A test batch with known pixels: each row is the R plane, then G, then B, each 32x32 row-major.
    data = np.zeros((2, 3072), dtype=np.uint8)
    data[1, 0 * 1024 + 0 * 32 + 31] = 11   # R, y=0, x=31
    data[1, 1 * 1024 + 5 * 32 + 7] = 22    # G, y=5, x=7
    data[1, 2 * 1024 + 31 * 32 + 0] = 33   # B, y=31, x=0
    _write_py2_pickle(folder / "test_batch", _batch(data, [4, 9]))

    test = read_cifar(tmp_path, "cifar10", train=False)
    assert test.images.shape == (2, 3, 32, 32) and test.images.dtype == torch.uint8
    img = test.images[1]
    assert (img[0, 0, 31], img[1, 5, 7], img[2, 31, 0]) == (11, 22, 33)
    assert int(img.sum()) == 11 + 22 + 33 and int(test.images[0].sum()) == 0
    assert test.labels.tolist() == [4, 9] and test.labels.dtype == torch.int64
    assert test.classes == CIFAR10_CLASSES

    train = read_cifar(tmp_path, "cifar10", train=True)
    assert train.images.shape == (15, 3, 32, 32)
    assert train.labels.tolist() == train_labels  # batches 1..5, in order
    assert torch.equal(train.images, torch.from_numpy(train_data).view(15, 3, 32, 32))
    assert train.images.is_contiguous()


def test_cifar10_accepts_the_inner_folder_as_root(tmp_path):
    _make_cifar10(tmp_path)
    inner = tmp_path / "cifar-10-batches-py"
    a, b = read_cifar(inner, "cifar10", train=False), read_cifar(tmp_path, "cifar10", train=False)
    assert torch.equal(a.images, b.images) and a.labels.tolist() == b.labels.tolist()
    assert find_cifar(tmp_path) == "cifar10" and find_cifar(inner) == "cifar10"
    assert find_cifar(tmp_path / "nowhere") is None
    (tmp_path / "empty").mkdir()
    assert find_cifar(tmp_path / "empty") is None


def test_cifar100_fine_labels_and_names(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = [f"class_{i:02d}" for i in range(100)]
    data = np.zeros((3, 3072), dtype=np.uint8)
    data[2, 2 * 1024 + 3 * 32 + 4] = 250  # B, y=3, x=4 of the third image
    for split, fine in (("train", [99, 0, 42]), ("test", [1, 2, 3])):
        batch = _batch(data, fine, label_key=b"fine_labels")
        batch[b"coarse_labels"] = [19, 0, 7]  # present in the real files; must not be used
        _write_py2_pickle(folder / split, batch)
    _write_py2_pickle(folder / "meta", {b"fine_label_names": [n.encode() for n in names],
                                        b"coarse_label_names": [f"super_{i}".encode() for i in range(20)]})
    for root in (tmp_path, folder):
        assert find_cifar(root) == "cifar100"
        train = read_cifar(root, "cifar100", train=True)
        assert train.labels.tolist() == [99, 0, 42]
        assert train.classes == names
        assert int(train.images[2, 2, 3, 4]) == 250 and int(train.images.sum()) == 250
    assert read_cifar(tmp_path, "cifar100", train=False).labels.tolist() == [1, 2, 3]


def test_cifar_reads_pickles_written_by_python3(tmp_path):
    # Files re-saved by Python 3 (str keys, protocol 5 arrays via numpy._core.numeric._frombuffer).
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    (folder / "test_batch").write_bytes(pickle.dumps({"data": data, "labels": [3, 1]}, protocol=5))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": CIFAR10_CLASSES}, protocol=5))
    d = read_cifar(tmp_path, "cifar10", train=False)
    assert d.labels.tolist() == [3, 1] and d.classes == CIFAR10_CLASSES
    assert torch.equal(d.images.reshape(2, -1), torch.from_numpy(data))


def test_cifar_missing_folder_and_missing_batch(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nope"))):
        read_cifar(tmp_path / "nope", "cifar10", train=True)
    with pytest.raises(DataError, match=re.escape(str(tmp_path))):  # a folder, but no CIFAR in it
        read_cifar(tmp_path, "cifar100", train=True)
    _make_cifar10(tmp_path)
    missing = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    missing.unlink()
    with pytest.raises(DataError, match=re.escape(str(missing))):
        read_cifar(tmp_path, "cifar10", train=True)
    assert len(read_cifar(tmp_path, "cifar10", train=False)) == 3  # the test split does not need it
    with pytest.raises(ValueError, match="cifar10, cifar100"):
        read_cifar(tmp_path, "cifar42", train=True)  # type: ignore[arg-type]


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.mark.skipif(os.name != "posix", reason="the payload uses the POSIX touch command")
def test_cifar_refuses_a_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"data": _Evil(marker), "labels": [0]}, protocol=2)
    # The payload is live: an ordinary unpickler runs the command.
    pickle.loads(payload)
    assert marker.exists()
    marker.unlink()

    _make_cifar10(tmp_path)
    evil = tmp_path / "cifar-10-batches-py" / "test_batch"
    evil.write_bytes(payload)
    with pytest.raises(DataError, match=re.escape(str(evil)) + ".*refusing.*system"):
        read_cifar(tmp_path, "cifar10", train=False)
    assert not marker.exists()
    # The meta file goes through the same unpickler.
    meta = tmp_path / "cifar-10-batches-py" / "batches.meta"
    meta.write_bytes(pickle.dumps({b"label_names": _Evil(marker)}, protocol=4))
    with pytest.raises(DataError, match=re.escape(str(meta))):
        read_cifar(tmp_path, "cifar10", train=True)
    assert not marker.exists()


def test_cifar_truncated_or_garbage_pickle(tmp_path):
    _make_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    full = batch.read_bytes()
    for cut in (len(full) // 2, len(full) - 1, 10):
        batch.write_bytes(full[:cut])
        with pytest.raises(DataError, match=re.escape(str(batch)) + ".*(truncated or corrupt)"):
            read_cifar(tmp_path, "cifar10", train=True)
    batch.write_bytes(b"this is not a pickle at all")
    with pytest.raises(DataError, match=re.escape(str(batch))):
        load_pickle(batch)


def test_cifar_wrong_shape_and_bad_labels(tmp_path):
    _make_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    _write_py2_pickle(batch, _batch(np.zeros((2, 3000), dtype=np.uint8), [0, 1]))
    with pytest.raises(DataError, match=re.escape(str(batch)) + r".*\(N, 3072\)"):
        read_cifar(tmp_path, "cifar10", train=False)
    _write_py2_pickle(batch, _batch(np.zeros((2, 3072), dtype=np.uint8), [0, 1, 2]))
    with pytest.raises(DataError, match=re.escape(str(batch)) + ".*2 images"):
        read_cifar(tmp_path, "cifar10", train=False)
    _write_py2_pickle(batch, _batch(np.zeros((2, 3072), dtype=np.uint8), [0, 10]))
    with pytest.raises(DataError, match=re.escape(str(batch)) + ".*outside"):
        read_cifar(tmp_path, "cifar10", train=False)


class _NumpyLoad:
    def __reduce__(self):
        return np.load, ("/nonexistent.npy",)


def test_cifar_refuses_numpy_functions_other_than_array_rebuilding(tmp_path):
    # An allow-list of "anything from numpy" would let this through; only the array builders may pass.
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({b"data": _NumpyLoad()}, protocol=4))
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*refusing to load numpy.load"):
        load_pickle(path)


# ---- ImageFolder ----------------------------------------------------------------------------------------

def _save(path: Path, array: np.ndarray, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def _rand_image(rng: np.random.Generator, h: int = 8, w: int = 8) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _make_png_tree(root: Path) -> dict[str, np.ndarray]:
    """A small tree with PNGs of known pixels; returns {relative path: HWC pixels}."""
    rng = np.random.default_rng(0)
    pixels = {}
    for rel in ("dog/10.png", "dog/2.png", "dog/sub/1.PNG", "cat/b.png", "cat/a.png", "Zebra/z.png"):
        pixels[rel] = _rand_image(rng)
        _save(root / rel, pixels[rel])
    # Ignored: hidden files and folders, non-image files.
    _save(root / "cat" / ".hidden.png", _rand_image(rng))
    _save(root / ".git" / "x.png", _rand_image(rng))
    _save(root / "dog" / ".cache" / "y.png", _rand_image(rng))
    (root / "cat" / "notes.txt").write_text("not an image")
    return pixels


def test_scan_image_folder_labels_classes_and_sorting(tmp_path):
    _make_png_tree(tmp_path)
    paths, labels, classes = scan_image_folder(tmp_path)
    assert classes == ["Zebra", "cat", "dog"]  # plain sorted(), as torchvision
    rel = [p.relative_to(tmp_path).as_posix() for p in paths]
    assert rel == ["Zebra/z.png", "cat/a.png", "cat/b.png", "dog/10.png", "dog/2.png", "dog/sub/1.PNG"]
    assert labels == [0, 1, 1, 2, 2, 2]


def test_decode_folder_png_pixels_are_exact(tmp_path):
    pixels = _make_png_tree(tmp_path)
    d = decode_folder(tmp_path, num_threads=2)
    paths, _, _ = scan_image_folder(tmp_path)
    assert d.images.shape == (6, 3, 8, 8) and d.images.dtype == torch.uint8
    assert d.labels.tolist() == [0, 1, 1, 2, 2, 2] and d.classes == ["Zebra", "cat", "dog"]
    for i, p in enumerate(paths):
        expected = torch.from_numpy(pixels[p.relative_to(tmp_path).as_posix()]).permute(2, 0, 1)
        assert torch.equal(d.images[i], expected), p
    assert d.source == str(tmp_path)


def test_decode_folder_converts_modes_and_reads_jpeg(tmp_path):
    # A smooth image survives JPEG closely; grey and palette images come out as RGB.
    y, x = np.mgrid[0:16, 0:16]
    smooth = np.stack([x * 16, y * 16, (x + y) * 8], axis=-1).astype(np.uint8)
    _save(tmp_path / "a" / "smooth.jpg", smooth, quality=95)
    grey = np.full((16, 16), 77, dtype=np.uint8)
    _save(tmp_path / "b" / "grey.png", grey)
    Image.fromarray(smooth).convert("P").save(tmp_path / "b" / "palette.bmp")
    d = decode_folder(tmp_path)
    assert d.images.shape == (3, 3, 16, 16)
    err = (d.images[0].permute(1, 2, 0).float() - torch.from_numpy(smooth).float()).abs().mean()
    assert err < 4, f"JPEG decode is off by {err:.1f} on average"
    assert (d.images[1] == 77).all()
    assert d.labels.tolist() == [0, 1, 1]


def test_decode_folder_resize_keeps_the_centre(tmp_path):
    # Thirds of distinct colours: resizing the shorter side and centre-cropping keeps the middle third.
    wide = np.zeros((20, 60, 3), dtype=np.uint8)
    wide[:, :20, 0], wide[:, 20:40, 1], wide[:, 40:, 2] = 255, 255, 255  # red | green | blue
    tall = np.zeros((60, 20, 3), dtype=np.uint8)
    tall[:20, :, 0], tall[20:40, :, 2], tall[40:, :, 1] = 255, 255, 255  # red / blue / green
    _save(tmp_path / "a" / "wide.png", wide)
    _save(tmp_path / "a" / "tall.png", tall)
    exact = np.random.default_rng(1).integers(0, 256, (10, 10, 3), dtype=np.uint8)
    _save(tmp_path / "b" / "exact.png", exact)
    d = decode_folder(tmp_path, img_size=10)
    assert d.images.shape == (3, 3, 10, 10)
    tall_out, wide_out = d.images[0].float(), d.images[1].float()  # sorted: tall.png, wide.png
    inner = (slice(None), slice(2, 8), slice(2, 8))  # away from bicubic ringing at the borders
    assert wide_out[inner].mean(dim=(1, 2)).tolist() == pytest.approx([0, 255, 0], abs=10)
    assert tall_out[inner].mean(dim=(1, 2)).tolist() == pytest.approx([0, 0, 255], abs=10)
    assert torch.equal(d.images[2], torch.from_numpy(exact).permute(2, 0, 1))  # right size: untouched


def test_decode_folder_mixed_sizes_need_img_size(tmp_path):
    rng = np.random.default_rng(0)
    _save(tmp_path / "a" / "1.png", _rand_image(rng, 8, 8))
    _save(tmp_path / "a" / "2.png", _rand_image(rng, 8, 8))
    _save(tmp_path / "b" / "3.png", _rand_image(rng, 9, 8))
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "b" / "3.png")) + ".*img_size"):
        decode_folder(tmp_path)
    assert decode_folder(tmp_path, img_size=8).images.shape == (3, 3, 8, 8)


def test_folder_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="not found: " + re.escape(str(tmp_path / "missing"))):
        scan_image_folder(tmp_path / "missing")
    (tmp_path / "loose.png").write_bytes(b"")
    (tmp_path / ".hidden_dir").mkdir()
    with pytest.raises(DataError, match=re.escape(str(tmp_path)) + " has no class sub-folders"):
        scan_image_folder(tmp_path)
    _save(tmp_path / "full" / "x.png", _rand_image(np.random.default_rng(0)))
    (tmp_path / "hollow").mkdir()
    (tmp_path / "hollow" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="empty class 'hollow': " + re.escape(str(tmp_path / "hollow"))):
        decode_folder(tmp_path)


@pytest.mark.parametrize("content", ["garbage", "truncated_jpeg"])
def test_decode_folder_corrupt_image_is_named(tmp_path, content):
    rng = np.random.default_rng(0)
    for i in range(3):
        _save(tmp_path / "a" / f"{i}.jpg", _rand_image(rng, 16, 16))
    bad = tmp_path / "a" / "1.jpg"
    if content == "garbage":
        bad.write_bytes(b"definitely not a JPEG")
    else:
        bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DataError, match="cannot read image " + re.escape(str(bad))):
        decode_folder(tmp_path, num_threads=2)


def _forbid_decode(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("decode_images was called: the cache was not used")
    monkeypatch.setattr(folder_mod, "decode_images", fail)


def test_decode_folder_cache_is_reused(tmp_path, monkeypatch):
    _make_png_tree(tmp_path / "tree")
    cache = tmp_path / "cache"
    first = decode_folder(tmp_path / "tree", cache_dir=cache)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"  # and no temp file left behind
    from safetensors import safe_open
    with safe_open(str(files[0]), framework="pt") as f:
        assert f.metadata()["classes"] == '["Zebra", "cat", "dog"]'

    _forbid_decode(monkeypatch)
    second = decode_folder(tmp_path / "tree", cache_dir=cache)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert first.classes == second.classes and first.source == second.source
    # A different img_size is another cache entry, so it has to decode.
    with pytest.raises(AssertionError, match="cache was not used"):
        decode_folder(tmp_path / "tree", img_size=4, cache_dir=cache)


def test_decode_folder_cache_misses_when_a_file_changes(tmp_path):
    rng = np.random.default_rng(0)
    _save(tmp_path / "tree" / "a" / "1.png", _rand_image(rng))
    _save(tmp_path / "tree" / "b" / "2.png", _rand_image(rng))
    cache = tmp_path / "cache"
    decode_folder(tmp_path / "tree", cache_dir=cache)
    changed = np.full((8, 8, 3), 123, dtype=np.uint8)
    target = tmp_path / "tree" / "b" / "2.png"
    _save(target, changed)
    os.utime(target, ns=(1_000_000_000, 1_000_000_000))  # a distinct mtime, whatever the clock resolution
    d = decode_folder(tmp_path / "tree", cache_dir=cache)
    assert (d.images[1] == 123).all()
    assert len(list(cache.glob("*.safetensors"))) == 2


@pytest.mark.parametrize("damage", ["flip_data_byte", "truncate", "garbage"])
def test_decode_folder_corrupt_cache_is_redecoded(tmp_path, monkeypatch, damage):
    _make_png_tree(tmp_path / "tree")
    cache = tmp_path / "cache"
    first = decode_folder(tmp_path / "tree", cache_dir=cache)
    (cache_file,) = cache.iterdir()
    raw = bytearray(cache_file.read_bytes())
    if damage == "flip_data_byte":  # the header still parses: only the checksum can notice
        raw[-5] ^= 0xFF
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw = bytearray(b"\x00" * 64)
    cache_file.write_bytes(bytes(raw))

    with pytest.warns(UserWarning, match="ignoring the image cache " + re.escape(str(cache_file))):
        again = decode_folder(tmp_path / "tree", cache_dir=cache)
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    # ... and the cache was rewritten, so the next call loads it without decoding.
    _forbid_decode(monkeypatch)
    assert torch.equal(decode_folder(tmp_path / "tree", cache_dir=cache).images, first.images)


def test_decode_images_rejects_no_paths():
    with pytest.raises(ValueError, match="no paths"):
        decode_images([])


# ---- the real CIFAR-10 JPEGs ----------------------------------------------------------------------------

def test_real_cifar10_jpeg_test_split(tmp_path):
    if not CIFAR_JPEG_TARBALL.is_file():
        pytest.skip(f"{CIFAR_JPEG_TARBALL} not present")
    per_class = 100  # 1,000 images over all ten classes: enough for stable channel means
    counts: dict[str, int] = {}
    with tarfile.open(CIFAR_JPEG_TARBALL, "r:gz") as tar:
        for member in tar:  # streamed: stop once past the test split, which the archive stores first
            parts = member.name.split("/")
            if len(parts) == 4 and parts[:2] == ["cifar10", "test"] and member.isfile():
                cls, name = parts[2], parts[3]
                assert re.fullmatch(r"[a-z]+", cls) and re.fullmatch(r"\d+\.jpg", name), member.name
                if counts.get(cls, 0) < per_class:
                    dest = tmp_path / "test" / cls / name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(tar.extractfile(member).read())
                    counts[cls] = counts.get(cls, 0) + 1
            elif counts and parts[1:2] == ["train"]:
                break
    assert sorted(counts) == CIFAR10_CLASSES and set(counts.values()) == {per_class}

    d = decode_folder(tmp_path / "test")
    n = len(list((tmp_path / "test").rglob("*.jpg")))
    assert n == 10 * per_class
    assert d.images.shape == (n, 3, 32, 32) and d.images.dtype == torch.uint8
    assert d.classes == CIFAR10_CLASSES
    assert torch.bincount(d.labels).tolist() == [per_class] * 10
    means = d.images.float().mean(dim=(0, 2, 3)) / 255
    assert means.tolist() == pytest.approx([0.491, 0.482, 0.447], abs=0.05)
