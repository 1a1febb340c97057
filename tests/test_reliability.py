"""Reliability and security: bad data, faults and hostile files lose nothing and run nothing.

1. Data integrity: idx files are checked (size, magic, shape, label range, md5 of the decompressed bytes);
   downloads from a local HTTP server on 127.0.0.1 (good, truncated, wrong, slow, missing) either leave the
   right bytes at `dest` or raise ConfidentError and leave no file and no temporary file behind.
2. Hostile files: a CIFAR batch whose pickle would run code is refused and the code does not run; tar
   members with absolute paths, '..' or links are refused and nothing lands outside the target folder;
   a training checkpoint holding an arbitrary pickled object is refused on --resume.
3. Faults: a run killed with SIGKILL mid-epoch and resumed with --resume ends bit-identical (weights and
   metrics) to an uninterrupted run; a NaN loss stops training with exit code 2, naming loss, step and
   regime, and keeps the last good checkpoint.
4. Bad input at the API and CLI: wrong shapes, empty sets, NaN scores, bad labels, negative beta or eps,
   T <= 0 raise ConfidentError instead of returning a wrong number.
5. Output folders: a refused command changes no file of a finished run; one run per folder (a second is refused,
   a killed one leaves no lock); --resume continues exactly the run in the folder or refuses naming the setting;
   a labelled folder's validation and --eval-limit take every class alike; 16-bit, .tif, skipped files and links
   out of a folder; a full disk is one error line that names the file and keeps the last checkpoint.
"""
import dataclasses
import errno
import gzip
import hashlib
import http.server
import json
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import confident  # noqa: E402
from confident import ConfidentError  # noqa: E402


# ------------------------------------------------------------------------------------------------
# Small fixture helpers (self-contained: the formats are written here byte by byte)

def _idx(arr: np.ndarray, kind: str) -> bytes:
    arr = np.asarray(arr, dtype=np.uint8)
    magic = 2051 if kind == "images" else 2049
    return struct.pack(">i", magic) + b"".join(struct.pack(">i", d) for d in arr.shape) + arr.tobytes()


def _synthetic_digits(n: int, seed: int):
    """28x28 uint8 images whose class (0..9) is a bright 6x6 block at one of ten positions, plus noise:
    learnable in a few steps, so a short run moves the weights a lot."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n).astype(np.uint8)
    x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(y):
        r, col = 2 + 12 * (c // 5), 1 + 5 * (c % 5)
        x[i, r:r + 6, col:col + 6] = 220
    return x, y


def _idx_set_files(n_train=384, n_test=150) -> dict:
    """{file name: raw idx bytes} for a tiny MNIST-layout set."""
    xtr, ytr = _synthetic_digits(n_train, 1)
    xte, yte = _synthetic_digits(n_test, 2)
    return {"train-images-idx3-ubyte": _idx(xtr, "images"), "train-labels-idx1-ubyte": _idx(ytr, "labels"),
            "t10k-images-idx3-ubyte": _idx(xte, "images"), "t10k-labels-idx1-ubyte": _idx(yte, "labels")}


def _write_idx_root(root: Path, name: str, files: dict, gz: bool = False) -> dict:
    """root/name/<file>[.gz]; returns the md5 table (of the decompressed bytes) keyed as confident.MD5 is."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    for fn, raw in files.items():
        (d / (fn + (".gz" if gz else ""))).write_bytes(gzip.compress(raw) if gz else raw)
    return {(name, fn): hashlib.md5(raw).hexdigest() for fn, raw in files.items()}


class _Marker:
    """Unpickling this object opens (creates) `path` for writing: the stand-in for hostile code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class _SystemCall:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _files_under(d: Path) -> list:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


# ------------------------------------------------------------------------------------------------
# A local HTTP server: good, truncated, wrong, slow and missing files. Bounded: it shuts itself down
# after 120 s whatever happens, and the fixture stops it at the end of the module.

GOOD = os.urandom(50_000)
WRONG = GOOD[:-1] + bytes([GOOD[-1] ^ 0xFF])
SLOW_S = 1.5                     # the server's delay before answering /slow; downloads use timeout 0.3 s


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def log_message(self, *args):          # keep pytest output clean
        pass

    def _send(self, body: bytes, length: int | None = None):
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/good":
            self._send(GOOD)
        elif path == "/wrong":
            self._send(WRONG)
        elif path == "/truncated":           # announces more than it sends, then closes the connection
            self._send(GOOD[:20_000], length=len(GOOD))
            self.close_connection = True
        elif path == "/slow":
            time.sleep(SLOW_S)
            try:
                self._send(GOOD)
            except OSError:
                pass
        elif path in self.routes:
            self._send(self.routes[path])
        else:
            self.send_error(404)


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.block_on_close = False
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    stopper = threading.Timer(120, httpd.shutdown)
    stopper.daemon = True
    stopper.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    stopper.cancel()
    httpd.shutdown()
    httpd.server_close()
    _Handler.routes = {}


def test_download_good_file_lands_with_right_bytes(server, tmp_path):
    dest = tmp_path / "dl" / "file.bin"
    out = confident.download(server + "/good", dest, md5=hashlib.md5(GOOD).hexdigest(), timeout=5)
    assert out == dest and dest.read_bytes() == GOOD
    assert _files_under(tmp_path / "dl") == ["file.bin"]                  # no temporary file left


@pytest.mark.parametrize("route,md5,match", [
    ("/truncated", None, "truncat|download failed"),                     # Content-Length check alone
    ("/truncated", hashlib.md5(GOOD).hexdigest(), "truncat|download failed"),
    ("/wrong", hashlib.md5(GOOD).hexdigest(), "checksum"),
    ("/slow", None, "download failed .*timed out"),                      # the client's timeout ended it
    ("/missing", None, "download failed"),                               # HTTP 404
])
def test_download_bad_leaves_nothing(server, tmp_path, route, md5, match):
    dest = tmp_path / "dl" / "file.bin"
    with pytest.raises(ConfidentError, match=match):
        confident.download(server + route, dest, md5=md5, timeout=0.3)
    assert not dest.exists()
    assert _files_under(tmp_path / "dl") == []                           # and no .part file either


def test_download_check_hook_rejects_before_rename(server, tmp_path):
    dest = tmp_path / "file.bin"

    def check(p):
        assert p != dest and p.read_bytes() == GOOD                      # runs on the temporary file
        raise ConfidentError("rejected by check")
    with pytest.raises(ConfidentError, match="rejected"):
        confident.download(server + "/good", dest, check=check, timeout=5)
    assert _files_under(tmp_path) == []


@pytest.fixture
def mnist_server(server, monkeypatch, tmp_path):
    """URLS['mnist'] -> the local server, which serves the tiny set as .gz files; MD5 of the fixture."""
    files = _idx_set_files(n_train=40, n_test=30)
    _Handler.routes = {f"/mnist/{fn}.gz": gzip.compress(raw) for fn, raw in files.items()}
    bad = dict(files)
    bad["t10k-images-idx3-ubyte"] = bad["t10k-images-idx3-ubyte"][:-1] + b"\x07"   # right size, wrong bytes
    _Handler.routes.update({f"/mnist-bad/{fn}.gz": gzip.compress(raw) for fn, raw in bad.items()})
    _Handler.routes["/mnist-notidx/t10k-images-idx3-ubyte.gz"] = gzip.compress(b"<html>not found</html>")
    monkeypatch.setitem(confident.URLS, "mnist", server + "/mnist/")
    monkeypatch.setitem(confident.OFFLINE_DIRS, "mnist", [])
    for (name, fn), h in _write_idx_root(tmp_path / "unused", "mnist", files).items():
        monkeypatch.setitem(confident.MD5, (name, fn), h)
    monkeypatch.chdir(tmp_path)
    yield server, files
    _Handler.routes = {}


def test_loader_downloads_missing_idx_set_and_verifies_it(mnist_server, tmp_path):
    _, files = mnist_server
    root = tmp_path / "data"
    with pytest.raises(ConfidentError, match="not found"):              # no download unless allowed
        confident.load_uint8("mnist", "test", root, download_ok=False)
    x, y = confident.load_uint8("mnist", "test", root, download_ok=True)
    assert x.shape == (30, 1, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(y, torch.from_numpy(np.frombuffer(files["t10k-labels-idx1-ubyte"][8:], np.uint8).astype(np.int64)))
    assert _files_under(root / "mnist") == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    x2, y2 = confident.load_uint8("mnist", "test", root, download_ok=False)      # now found locally
    assert torch.equal(x, x2) and torch.equal(y, y2)


@pytest.mark.parametrize("prefix,verify,match", [("/mnist-bad/", True, "checksum"),
                                                  ("/mnist-notidx/", True, "checksum"),
                                                  ("/mnist-notidx/", False, "magic")])   # structure checked too
def test_loader_wrong_download_leaves_no_complete_looking_file(mnist_server, monkeypatch, tmp_path, prefix,
                                                               verify, match):
    server, _ = mnist_server
    monkeypatch.setitem(confident.URLS, "mnist", server + prefix)
    root = tmp_path / "data"
    with pytest.raises(ConfidentError, match=match):
        confident.load_uint8("mnist", "test", root, verify=verify, download_ok=True)
    assert _files_under(root / "mnist") == []                           # the bad images file was never renamed in


# ------------------------------------------------------------------------------------------------
# Data integrity of local idx files

@pytest.mark.parametrize("mutate,match", [
    (lambda f: f.update({"t10k-images-idx3-ubyte": f["t10k-images-idx3-ubyte"][:-5]}), "truncated"),
    (lambda f: f.update({"t10k-images-idx3-ubyte": f["t10k-images-idx3-ubyte"] + b"\0"}), "oversized"),
    (lambda f: f.update({"t10k-images-idx3-ubyte": f["t10k-labels-idx1-ubyte"]}), "magic"),
    (lambda f: f.update({"t10k-labels-idx1-ubyte": f["t10k-labels-idx1-ubyte"][:6]}), "header"),
    (lambda f: f.update({"t10k-labels-idx1-ubyte": _idx(np.full(30, 10), "labels")}), r"outside \[0, 10\)"),
    (lambda f: f.update({"t10k-labels-idx1-ubyte": _idx(np.zeros(29), "labels")}), "labels"),
    (lambda f: f.update({"t10k-images-idx3-ubyte": _idx(np.zeros((30, 20, 20)), "images")}), "size"),
])
def test_corrupt_idx_files_are_refused(tmp_path, mutate, match):
    files = _idx_set_files(n_train=10, n_test=30)
    mutate(files)
    _write_idx_root(tmp_path, "mnist", files)
    with pytest.raises(ConfidentError, match=match):
        confident.load_uint8("mnist", "test", tmp_path, verify=False)


def test_corrupt_gzip_and_checksum_mismatch(tmp_path, monkeypatch):
    files = _idx_set_files(n_train=10, n_test=30)
    md5 = _write_idx_root(tmp_path, "mnist", files, gz=True)
    for k, v in md5.items():
        monkeypatch.setitem(confident.MD5, k, v)
    x, _ = confident.load_uint8("mnist", "test", tmp_path)             # verified: passes
    assert len(x) == 30
    p = tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(files["t10k-images-idx3-ubyte"])
    raw[100] ^= 1                                                      # one flipped bit, same size
    p.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(ConfidentError, match="checksum"):
        confident.load_uint8("mnist", "test", tmp_path)
    p.write_bytes(gzip.compress(bytes(raw))[:-20])                     # cut-off gzip stream
    with pytest.raises(ConfidentError, match="gzip"):
        confident.load_uint8("mnist", "test", tmp_path)


# the offline copy confident.py knows of (README "Data"); CI installs it, and the test fails where it is missing
FASHION = next((Path(d) for d in confident.OFFLINE_DIRS["fashion-mnist"]
                if (Path(d) / "t10k-labels-idx1-ubyte.gz").exists()), Path("missing"))


def test_real_fashion_mnist_checksum_of_decompressed_bytes(tmp_path):
    """The Debian .gz files are recompressed: the check is on the decompressed bytes, so they pass, and a
    one-byte change in the decompressed labels fails."""
    for fn in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / "fashion-mnist").mkdir(exist_ok=True)
        (tmp_path / "fashion-mnist" / fn).write_bytes((FASHION / fn).read_bytes())
    x, y = confident.load_uint8("fashion-mnist", "test", tmp_path)
    assert x.shape == (10000, 1, 32, 32) and int(y.max()) == 9
    p = tmp_path / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(p.read_bytes()))
    raw[-1] = (raw[-1] + 1) % 10                                        # still a valid label
    p.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(ConfidentError, match="checksum"):
        confident.load_uint8("fashion-mnist", "test", tmp_path)


# ------------------------------------------------------------------------------------------------
# Hostile files: pickles, archives, checkpoints

def _cifar_dict(data, labels):
    return {b"batch_label": b"test", b"labels": labels, b"data": data, b"filenames": [b"a.png"] * len(labels)}


def test_cifar_plain_batch_loads(tmp_path):
    base = tmp_path / "cifar10" / "cifar-10-batches-py"
    base.mkdir(parents=True)
    data = np.random.default_rng(0).integers(0, 256, (4, 3072), dtype=np.uint8)
    (base / "test_batch").write_bytes(pickle.dumps(_cifar_dict(data, [0, 3, 9, 1]), protocol=4))
    x, y = confident.load_uint8("cifar10", "test", tmp_path)
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 3, 9, 1]
    assert torch.equal(x[1, 2].reshape(-1), torch.from_numpy(data[1, 2048:]))   # blue plane


@pytest.mark.parametrize("evil", [_Marker, _SystemCall])
@pytest.mark.parametrize("where", ["top", "labels", "object_array"])
def test_cifar_pickle_that_runs_code_is_refused(tmp_path, evil, where):
    marker = tmp_path / "pwned"
    payload = evil(marker)
    data = np.zeros((1, 3072), np.uint8)
    obj = {"top": payload, "labels": _cifar_dict(data, [payload]),
           "object_array": _cifar_dict(np.array([payload], dtype=object), [0])}[where]
    base = tmp_path / "cifar10" / "cifar-10-batches-py"
    base.mkdir(parents=True)
    (base / "test_batch").write_bytes(pickle.dumps(obj, protocol=4))     # bytes as BINBYTES: no other global
    assert not marker.exists()
    refused = r"refused to load (io\.open|builtins\.open|posix\.system|nt\.system|os\.system)"
    with pytest.raises(ConfidentError, match=refused):
        confident.load_uint8("cifar10", "test", tmp_path)
    with pytest.raises(ConfidentError, match=refused):
        confident.read_cifar_batch(base / "test_batch")
    assert not marker.exists()                                           # the code did not run


def _tar(path: Path, members: list) -> Path:
    """members: (name, bytes) files, (name, 'symlink'|'hardlink', target), (name, 'dir'), (name, 'chr')."""
    import io
    with tarfile.open(path, "w:gz") as tf:
        for m in members:
            info = tarfile.TarInfo(m[0])
            if len(m) == 3:
                info.type = tarfile.SYMTYPE if m[1] == "symlink" else tarfile.LNKTYPE
                info.linkname = m[2]
                tf.addfile(info)
            elif m[1] == "dir":
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            elif m[1] == "chr":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
                tf.addfile(info)
            else:
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    return path


def test_safe_extract_good_archive(tmp_path):
    arc = _tar(tmp_path / "ok.tar.gz", [("set", "dir"), ("set/a.txt", b"a"), ("set/sub/b.txt", b"bb")])
    dest = tmp_path / "dest"
    dest.mkdir()
    confident.safe_extract(arc, dest)
    assert (dest / "set" / "a.txt").read_bytes() == b"a" and (dest / "set" / "sub" / "b.txt").read_bytes() == b"bb"


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "dotdot_nested", "symlink_out", "symlink_then_write",
                                  "symlink_abs", "hardlink_out", "device"])
def test_safe_extract_refuses_escapes(tmp_path, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "work" / "dest"
    dest.mkdir(parents=True)
    (outside / "secret.txt").write_bytes(b"keep me")
    abs_target = str(outside / "abs_written.txt")
    members = {
        "absolute": [("ok.txt", b"fine"), (abs_target, b"evil")],
        "dotdot": [("ok.txt", b"fine"), ("../../outside/evil.txt", b"evil")],
        "dotdot_nested": [("a/b/../../../escape.txt", b"evil")],
        "symlink_out": [("ok.txt", b"fine"), ("link", "symlink", "../../outside")],
        "symlink_then_write": [("link", "symlink", str(outside)), ("link/evil.txt", b"evil")],
        "symlink_abs": [("passwd", "symlink", "/etc/passwd")],
        "hardlink_out": [("secret_link", "hardlink", str(outside / "secret.txt"))],
        "device": [("null", "chr")],
    }[kind]
    arc = _tar(tmp_path / "work" / "evil.tar.gz", members)
    before_outside, before_work = _files_under(outside), _files_under(tmp_path / "work")
    with pytest.raises(ConfidentError, match="refused"):
        confident.safe_extract(arc, dest)
    assert _files_under(outside) == before_outside and (outside / "secret.txt").read_bytes() == b"keep me"
    assert _files_under(tmp_path / "work") == before_work                # not even the harmless members
    assert not Path(abs_target).exists()


def test_corrupt_archive_is_a_clear_error(tmp_path):
    arc = tmp_path / "x.tar.gz"
    arc.write_bytes(gzip.compress(b"definitely not a tar file" * 40))
    with pytest.raises(ConfidentError, match="corrupt archive"):
        confident.safe_extract(arc, tmp_path / "d")


def _tiny_cfg(tmp_path, **kw):
    base = dict(in_data="mnist", out_data="gaussian", method="ce", model="simple_cnn", width=0.0625, epochs=1,
                batch_size=16, output_dir=str(tmp_path / "run"), device="cpu", log_every=1000)
    base.update(kw)
    return confident.resolve(confident.Config(**base))


def _tiny_data(n=32):
    x, y = _synthetic_digits(n, 5)
    return confident.resize_uint8(torch.from_numpy(x).unsqueeze(1), 32), torch.from_numpy(y.astype(np.int64))


@pytest.mark.parametrize("content", ["pickled_object", "wrong_structure", "garbage"])
def test_resume_refuses_hostile_or_broken_checkpoint(tmp_path, content):
    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    out.mkdir()
    state = out / "train_state.pt"
    if content == "pickled_object":
        torch.save({"epoch": 1, "models": {}, "extra": _Marker(marker)}, state)
    elif content == "wrong_structure":
        torch.save({"epoch": 1, "models": {"net": {"w": torch.zeros(3)}}}, state)
    else:
        state.write_bytes(b"\x80\x02not a checkpoint at all")
    x, y = _tiny_data()
    cfg = _tiny_cfg(tmp_path, resume=True)
    with pytest.raises(ConfidentError, match="--resume"):
        confident.train(cfg, x, y, None, out, log=lambda *a: None)
    assert not marker.exists()


def test_train_state_is_weights_only_loadable(tmp_path):
    """What train() writes loads with weights_only=True (so --resume never needs a full unpickler)."""
    x, y = _tiny_data()
    out = tmp_path / "run"
    confident.train(_tiny_cfg(tmp_path), x, y, None, out, log=lambda *a: None)
    sd = torch.load(out / "train_state.pt", weights_only=True)
    assert sd["epoch"] == 1 and set(sd) >= {"models", "opts", "scheds", "rng", "epoch"}
    assert [p.name for p in out.iterdir()] == ["train_state.pt"]          # no temporary files left


def test_written_files_get_an_ordinary_files_mode(tmp_path):
    """Written through a private temporary file (mode 0600), results and checkpoints end with the mode any new
    file gets: 0644 under umask 022, 0640 under 027."""
    for mask, want in ((0o022, 0o644), (0o027, 0o640)):
        old = os.umask(mask)
        try:
            confident.atomic_write_text("{}", tmp_path / f"r{mask}.json")
            confident.atomic_save({"w": torch.zeros(2)}, tmp_path / f"c{mask}.pt")
        finally:
            os.umask(old)
        for name in (f"r{mask}.json", f"c{mask}.pt"):
            assert (tmp_path / name).stat().st_mode & 0o777 == want, name


# ------------------------------------------------------------------------------------------------
# Faults: SIGKILL mid-epoch + --resume is bit-identical; NaN stops training and keeps the last checkpoint

WRAPPER = """
import sys
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
import confident
for key, value in {md5!r}.items():          # checksums of the test's tiny fixture set
    confident.MD5[tuple(key.split("/"))] = value
confident.main(sys.argv[2:])
"""


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    """A data root with a tiny MNIST-layout set and a wrapper that runs the real CLI with its checksums."""
    d = tmp_path_factory.mktemp("cli")
    md5 = _write_idx_root(d / "data", "mnist", _idx_set_files(n_train=256, n_test=150))
    wrapper = d / "run_confident.py"
    wrapper.write_text(WRAPPER.format(md5={"/".join(k): v for k, v in md5.items()}))
    return d, wrapper, md5


def _cli_args(data_root, out_dir, *extra):
    return ["--in", "mnist", "--out", "gaussian", "--method", "joint", "--model", "vgg13", "--width", "0.0625",
            "--epochs", "3", "--batch-size", "16", "--eval-limit", "150", "--val-size", "50",
            "--extra-ood", "none", "--temperatures", "1,100", "--epsilons", "0,0.002", "--log-every", "1",
            "--seed", "3", "--device", "cpu", "--no-download", "--data-root", str(data_root),
            "--output-dir", str(out_dir), *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _run_to_end(wrapper, args, timeout=240):
    p = subprocess.run([sys.executable, str(wrapper), str(REPO), *args], capture_output=True, text=True,
                       timeout=timeout, env=_env())
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def _run_and_kill(wrapper, args, kill_at: str, state: Path, timeout=240):
    """Start the CLI, read its log until a line starting with `kill_at`, then SIGKILL it at once."""
    p = subprocess.Popen([sys.executable, str(wrapper), str(REPO), *args], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=_env())
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in p.stdout] + [lines.put(None)], daemon=True).start()
    deadline, seen = time.time() + timeout, []
    try:
        while True:
            ln = lines.get(timeout=max(0.1, deadline - time.time()))
            if ln is None:
                raise AssertionError("the run ended before it could be killed:\n" + "".join(seen[-30:]))
            seen.append(ln)
            if ln.startswith(kill_at):
                assert state.exists(), "no train_state.pt after epoch 1"   # the epoch-1 checkpoint is there
                p.send_signal(signal.SIGKILL)
                break
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL
    return seen


def _tensors(obj, prefix=""):
    """Every tensor in a nested dict/list, by path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}/{i}"))
    return out


def _metrics(res: dict) -> dict:
    return {k: res[k] for k in ("accuracy", "ece", "ece_temperature_scaled", "calibration_temperature",
                                "n_in_test", "ood")}


def test_sigkill_mid_epoch_then_resume_is_bit_identical(cli_env, tmp_path):
    d, wrapper, _ = cli_env
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    # the uninterrupted run, alongside (one thread each)
    ref_proc = subprocess.Popen([sys.executable, str(wrapper), str(REPO), *_cli_args(d / "data", ref)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        # kill during epoch 2 (16 steps per epoch), after epoch 1's checkpoint was written
        seen = _run_and_kill(wrapper, _cli_args(d / "data", killed), "epoch 2/3 step 4/16", killed / "train_state.pt")
        out, err = ref_proc.communicate(timeout=240)
    finally:
        if ref_proc.poll() is None:
            ref_proc.kill()
            ref_proc.wait()
    assert ref_proc.returncode == 0, out[-2000:] + err[-3000:]
    assert any(ln.startswith("epoch 1/3 step 16/16") for ln in seen)
    mid = torch.load(killed / "train_state.pt", weights_only=True)
    assert mid["epoch"] == 1                                             # killed mid-epoch 2
    assert not (killed / "results.json").exists() and not (killed / "checkpoint.pt").exists()
    p = _run_to_end(wrapper, _cli_args(d / "data", killed, "--resume"))
    assert "resumed from" in p.stdout and "at epoch 1" in p.stdout
    assert "epoch 1/3" not in p.stdout                                   # epoch 1 was not redone
    # the final weights: every tensor bit-identical
    a, b = torch.load(ref / "checkpoint.pt", weights_only=True), torch.load(killed / "checkpoint.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the full training state too: classifier, G, D, the three Adam states, schedulers, RNG, epoch
    sa, sb = _tensors(torch.load(ref / "train_state.pt", weights_only=True)), \
        _tensors(torch.load(killed / "train_state.pt", weights_only=True))
    assert sa.keys() == sb.keys() and any(k.startswith("/models/G/") for k in sa) and \
        any(k.startswith("/opts/D/") for k in sa)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # and the metrics
    ra, rb = json.loads((ref / "results.json").read_text()), json.loads((killed / "results.json").read_text())
    assert _metrics(ra) == _metrics(rb)
    # the weights moved from epoch 1's, so the comparison is not vacuous
    assert not torch.equal(mid["models"]["net"]["head.6.weight"], sa["/models/net/head.6.weight"])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # NaN on purpose
def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(cli_env, tmp_path, monkeypatch, capsys):
    """confidence_loss returns NaN from the 2nd step of epoch 2 on (the model becomes NaN); with --log-every 5
    the check at step 5 names step 2; exit 2, one 'error:' line, epoch 1's checkpoint kept, no results."""
    d, _, md5 = cli_env
    for k, v in md5.items():
        monkeypatch.setitem(confident.MD5, k, v)
    steps, calls = 256 // 16, {"n": 0}
    real = confident.confidence_loss

    def poisoned(logits, targets, beta, impl="auto"):
        calls["n"] += 1
        loss = real(logits, targets, beta, impl)
        return loss * float("nan") if calls["n"] == steps + 2 else loss
    monkeypatch.setattr(confident, "confidence_loss", poisoned)
    out = tmp_path / "nan"
    args = _cli_args(d / "data", out)
    args[args.index("--log-every") + 1] = "5"
    args[args.index("--width") + 1] = "0.03125"
    capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                       # tiny convolutions: one thread is faster on a busy machine
    try:
        with pytest.raises(SystemExit) as exc:
            confident.main(args)
    finally:
        torch.set_num_threads(threads)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert "classifier loss" in err and "nan" in err and "epoch 2 step 2 " in err and "method joint" in err
    sd = torch.load(out / "train_state.pt", weights_only=True)
    assert sd["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in _tensors(sd["models"]).values())
    assert not (out / "results.json").exists() and not (out / "checkpoint.pt").exists()


def test_nan_detected_on_a_non_logging_step_of_the_first_epoch(tmp_path, monkeypatch):
    """log_every larger than the epoch: the end-of-epoch check still catches a NaN at step 1, before any
    checkpoint is written."""
    real = confident.F.cross_entropy
    calls = {"n": 0}

    def ce(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("inf") if calls["n"] == 1 else out
    monkeypatch.setattr(confident.F, "cross_entropy", ce)
    x, y = _tiny_data(64)
    out = tmp_path / "run"
    with pytest.raises(ConfidentError, match=r"classifier loss \(c\) is (inf|nan) at epoch 1 step 1 \(method ce\)"):
        confident.train(_tiny_cfg(tmp_path, log_every=10_000), x, y, None, out, log=lambda *a: None)
    assert not (out / "train_state.pt").exists()


# ------------------------------------------------------------------------------------------------
# Bad input at the API: a clear ConfidentError, never a silent wrong number

@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return confident.build_classifier("simple_cnn", 10, width=0.0625)


@pytest.mark.parametrize("x", [torch.rand(4, 2, 32, 32), torch.rand(4, 32, 32), torch.rand(0, 3, 32, 32),
                               torch.rand(3, 32, 32, 3)[None, 0], np.zeros((2, 3, 32, 32))])
def test_detectors_refuse_bad_images(tiny_model, x):
    with pytest.raises(ConfidentError):
        confident.baseline_scores(tiny_model, x)
    with pytest.raises(ConfidentError):
        confident.odin_scores(tiny_model, x, 1000.0, 0.001)
    with pytest.raises(ConfidentError):
        confident.odin_grid(tiny_model, x, [1.0], [0.0])


@pytest.mark.parametrize("T,eps", [(0.0, 0.0), (-1.0, 0.0), (float("nan"), 0.0), (float("inf"), 0.0),
                                   (1.0, -1e-3), (1.0, float("nan"))])
def test_odin_refuses_bad_temperature_or_epsilon(tiny_model, T, eps):
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ConfidentError, match="ODIN"):
        confident.odin_scores(tiny_model, x, T, eps)
    with pytest.raises(ConfidentError, match="ODIN"):
        confident.odin_grid(tiny_model, x, [1.0, T], [0.0, eps])


def test_odin_grid_refuses_empty_grids_and_bad_batch(tiny_model):
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ConfidentError):
        confident.odin_grid(tiny_model, x, [], [0.0])
    with pytest.raises(ConfidentError):
        confident.odin_grid(tiny_model, x, [1.0], [])
    with pytest.raises(ConfidentError, match="batch size"):
        confident.baseline_scores(tiny_model, x, batch_size=0)


@pytest.mark.parametrize("si,so,match", [
    ([], [0.1, 0.2], "empty"), ([0.1, 0.2], [], "empty"),
    ([0.1, float("nan")], [0.2], "NaN"), ([0.1], [0.2, float("inf")], "NaN"),
    (np.random.rand(5, 10), np.random.rand(5), "shape"), (torch.rand(4), torch.rand(4, 2), "shape"),
    (["a", "b"], [0.1], "numbers"),
])
def test_ood_metrics_refuses_bad_scores(si, so, match):
    with pytest.raises(ConfidentError, match=match):
        confident.ood_metrics(si, so)


@pytest.mark.parametrize("probs,labels,match", [
    (torch.rand(5), torch.zeros(5, dtype=torch.long), "shape"),
    (torch.softmax(torch.randn(5, 3), 1), torch.zeros(4, dtype=torch.long), "labels"),
    (torch.softmax(torch.randn(0, 3), 1), torch.zeros(0, dtype=torch.long), "N > 0"),
    (torch.randn(5, 3) * 3, torch.zeros(5, dtype=torch.long), "logits"),                    # logits, not probs
    (torch.full((2, 2), float("nan")), torch.zeros(2, dtype=torch.long), "NaN"),
    (torch.softmax(torch.randn(3, 3), 1), torch.tensor([0.0, 1.0, 2.0]), "integer"),
    (torch.softmax(torch.randn(3, 3), 1), torch.tensor([0, 1, 3]), "outside"),
    (torch.softmax(torch.randn(3, 3), 1), torch.tensor([0, -1, 2]), "outside"),
])
def test_ece_refuses_bad_input(probs, labels, match):
    with pytest.raises(ConfidentError, match=match):
        confident.expected_calibration_error(probs, labels)


@pytest.mark.parametrize("z,match", [(torch.randn(10), "shape"), (torch.randn(2, 3, 4), "shape"),
                                     (torch.randn(4, 1), "K >= 2"), (torch.randn(0, 10), "empty"),
                                     (torch.ones(3, 4, dtype=torch.long), "floats")])
def test_kl_to_uniform_refuses_bad_logits(z, match):
    with pytest.raises(ConfidentError, match=match):
        confident.kl_to_uniform(z, impl="torch")


@pytest.mark.parametrize("targets,beta,match", [
    (torch.tensor([0, 1, 10, -1]), 1.0, r"\[0, 10\)"),
    (torch.tensor([0, 1, -2, -1]), 1.0, r"\[0, 10\)"),                  # -2 must not count as OOD
    (torch.tensor([0.0, 1.0, 2.0, -1.0]), 1.0, "integers"),
    (torch.tensor([0, 1, 2]), 1.0, "shape"),
    (torch.tensor([[0, 1, 2, -1]]), 1.0, "shape"),
    (torch.tensor([0, 1, 2, -1]), -0.5, "beta"),
    (torch.tensor([0, 1, 2, -1]), float("nan"), "beta"),
    (torch.tensor([0, 1, 2, -1]), float("inf"), "beta"),
])
def test_confidence_loss_refuses_bad_targets_and_beta(targets, beta, match):
    with pytest.raises(ConfidentError, match=match):
        confident.confidence_loss(torch.randn(4, 10), targets, beta, impl="torch")


def test_gan_g_loss_refuses_negative_beta():
    with pytest.raises(ConfidentError, match="beta"):
        confident.gan_g_loss(torch.randn(4), torch.randn(4, 10), -1.0, impl="torch")


@pytest.mark.parametrize("bad", [10, -1])
def test_training_refuses_labels_outside_range(tmp_path, bad):
    x, y = _tiny_data()
    y[3] = bad
    with pytest.raises(ConfidentError, match=r"labels in \[.*expected \[0, 10\)"):        # 10 classes declared
        confident.train(_tiny_cfg(tmp_path), x, y, None, tmp_path / "run", log=lambda *a: None, num_classes=10)
    assert not (tmp_path / "run" / "train_state.pt").exists()


def test_training_refuses_empty_ood_set_and_mismatched_data(tmp_path):
    x, y = _tiny_data()
    with pytest.raises(ConfidentError, match="OOD"):
        confident.train(_tiny_cfg(tmp_path, method="conf"), x, y, x[:0], None, log=lambda *a: None)
    with pytest.raises(ConfidentError, match="shape"):
        confident.train(_tiny_cfg(tmp_path), x, y[:-1], None, None, log=lambda *a: None)
    with pytest.raises(ConfidentError, match="shape"):                  # 28x28: the models take 32x32
        confident.train(_tiny_cfg(tmp_path), x[:, :, 2:-2, 2:-2], y, None, None, log=lambda *a: None)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_training_refuses_integer_images_other_than_uint8(tmp_path, dtype):
    """int64 pixels 0-255 would enter the network unscaled (to_float divides uint8 only): refused, naming the type,
    for the in-distribution and the OOD training images, before anything is written."""
    x, y = _tiny_data()
    with pytest.raises(ConfidentError, match=f"training images of type {dtype}: expected uint8"):
        confident.train(_tiny_cfg(tmp_path), x.to(dtype), y, None, tmp_path / "run", log=lambda *a: None)
    with pytest.raises(ConfidentError, match=f"OOD training images of type {dtype}"):
        confident.train(_tiny_cfg(tmp_path, method="conf"), x, y, x.to(dtype), tmp_path / "run", log=lambda *a: None)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfidentError, match=f"{dtype}: expected uint8"):
        confident.to_float(x.to(dtype))


def test_training_refuses_a_single_class(tmp_path):
    x, y = _tiny_data()
    with pytest.raises(ConfidentError, match="1 class, expected at least 2"):
        cfg = dataclasses.replace(_tiny_cfg(tmp_path), in_data="folder:mine")     # labels give the class count
        confident.train(cfg, x, torch.zeros_like(y), None, tmp_path / "run", log=lambda *a: None)
    assert not (tmp_path / "run").exists()


def test_pull_away_term_refuses_fewer_than_two_samples():
    with pytest.raises(ConfidentError, match="1 sample"):
        confident.pull_away_term(torch.rand(1, 3, 32, 32))


def test_evaluate_refuses_empty_or_too_small_ood_set(tiny_model, tmp_path):
    cfg = _tiny_cfg(tmp_path, val_size=5, temperatures="1", epsilons="0")
    x, y = _tiny_data(20)
    with pytest.raises(ConfidentError, match=r"evaluate: ood_sets\['empty'\]: an empty set"):
        confident.evaluate(tiny_model, x, y, {"empty": x[:0]}, cfg, log=lambda *a: None)
    with pytest.raises(ConfidentError, match="no images"):
        confident.load_uint8(f"folder:{tmp_path}", "test")              # an empty folder is not an OOD set


@pytest.mark.parametrize("flags,match", [
    (["--beta", "-0.5"], "--beta"), (["--temperatures", "0,1"], "temperatures"),
    (["--temperatures", "nan"], "temperatures"), (["--epsilons=-0.1"], "epsilons"),
    (["--lr", "nan"], "--lr"), (["--log-every", "0"], "--log-every"), (["--batch-size", "1"], "--batch-size"),
    (["--in", "gaussian"], "no labels"), (["--method", "magic"], "unknown method"),
    (["--lr", "inf"], "--lr inf: expected a finite number"), (["--beta", "inf"], "--beta inf"),
    (["--in", "mnist", "--out", "mnist"], "--out mnist is the in-distribution set"),
    (["--device", "foo"], "--device 'foo': expected auto, cpu, cuda or cuda:N"),
    (["--device", "cuda:99"], "--device cuda:99"),                 # no such device, with or without a GPU
    (["--impl", "triton", "--device", "cpu"], "--impl triton needs Triton and a CUDA device"),
    (["--extra-ood", "mnist,foo"], "--extra-ood: unknown data set 'foo'"),
    (["--val-ood", "foo"], "--val-ood: unknown data set 'foo'"), (["--out", "foo"], "--out: unknown data set"),
    (["--channels-last", "yes"], "--channels-last 'yes': expected auto, on or off"),
])
def test_cli_bad_flags_exit_2_with_one_line(flags, match, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)             # (tests/conftest.py sets it)
    with pytest.raises(SystemExit) as exc:
        confident.main(["--epochs", "0", *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0]


def test_output_dir_that_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("keep me")
    with pytest.raises(SystemExit) as exc:
        confident.main(["--epochs", "0", "--output-dir", str(f)])
    assert exc.value.code == 2 and "a file is there, expected a folder" in capsys.readouterr().err
    assert f.read_text() == "keep me"


def test_a_failed_resume_loses_nothing(tmp_path):
    """--resume without a usable checkpoint, or with one trained at another width, stops before the folder's
    earlier results and config are touched."""
    out = tmp_path / "run"
    out.mkdir()
    cfg = confident.Config(in_data="mnist", out_data="gaussian", method="ce", model="simple_cnn", width=0.0625,
                           epochs=1, batch_size=16, extra_ood="none", data_root=str(REPO / "data"),
                           download=False, output_dir=str(out), resume=True, device="cpu")
    (out / "results.json").write_text('{"old": true}')
    (out / "config.json").write_text(json.dumps({**dataclasses.asdict(cfg), "width": 0.125}))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ConfidentError, match="no checkpoint at"):
        confident.run(cfg, log=lambda *a: None)
    (out / "train_state.pt").write_bytes(b"\x80\x02not a checkpoint at all")
    before["train_state.pt"] = (out / "train_state.pt").read_bytes()
    with pytest.raises(ConfidentError, match="is not a training checkpoint of this run.*drop --resume"):
        confident.run(cfg, log=lambda *a: None)
    x, y = _tiny_data()
    confident.train(dataclasses.replace(cfg, resume=False, width=0.125), x, y, None, out,
                    log=lambda *a: None)
    before["train_state.pt"] = (out / "train_state.pt").read_bytes()
    with pytest.raises(ConfidentError, match="trained with --width 0.125; this run has --width 0.0625"):
        confident.run(cfg, log=lambda *a: None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ------------------------------------------------------------------------------------------------
# Output folders, resume and image folders: a refused command changes nothing, one run per folder, a resume
# continues exactly the run that is there, folders are split alike for every class, OS errors are one line.
# The runs are tiny: two-class folders of random 32x32 PNGs, one epoch of a 1/16-width simple CNN.

def _png_folder(root: Path, classes=("a", "b"), n=(24, 15), seed=0) -> Path:
    """root/{train,test}/<class>/NNN.png, random 32x32 RGB images."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "test"), n):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
    return root


def _folder_args(folder: Path, out: Path, *extra) -> list:
    return ["--in", f"folder:{folder}", "--out", "gaussian", "--method", "ce", "--model", "simple_cnn",
            "--width", "0.0625", "--epochs", "1", "--val-size", "10", "--eval-limit", "30", "--extra-ood", "none",
            "--batch-size", "16", "--temperatures", "1,10", "--epsilons", "0,0.001", "--log-every", "1000",
            "--device", "cpu", "--no-download", "--output-dir", str(out), *extra]


def _main(args, capsys) -> tuple[int, str, str]:
    """The CLI in this process: (exit code, stdout, stderr)."""
    try:
        confident.main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _refused(args, capsys, match: str) -> str:
    code, _, err = _main(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
    return lines[0]


def _contents(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    return _png_folder(tmp_path_factory.mktemp("pngs") / "two")


def test_a_refused_command_leaves_a_finished_run_whole(pngs, tmp_path, capsys):
    """A command refused for its data or its resume changes no file of the finished run in its folder.
    python confident.py --in folder:X --out gaussian --method ce --model simple_cnn --width 0.0625 --epochs 1
        --val-size 10 --extra-ood none --batch-size 16 --no-download --output-dir R      (finished), then
      ... --train-limit 10                (fewer images than a batch)
      ... --in folder:ONE_CLASS           (one class)
      ... --resume --width 0.125          (R without config.json: another width than its checkpoint's)
    each exits 2 and R is byte for byte as before; the right --resume then runs."""
    out = tmp_path / "R"
    assert _main(_folder_args(pngs, out), capsys)[0] == 0
    before = _contents(out)
    assert {"results.json", "results.csv", "results.md", "config.json", "checkpoint.pt"} <= set(before)
    _refused(_folder_args(pngs, out, "--train-limit", "10"), capsys, "fewer than one batch of 16")
    assert _contents(out) == before
    one = _png_folder(tmp_path / "one", classes=("only",))
    _refused(_folder_args(one, out), capsys, "1 class, expected at least 2")
    assert _contents(out) == before
    (out / "config.json").unlink()
    before = _contents(out)
    _refused(_folder_args(pngs, out, "--resume", "--width", "0.125"), capsys,
             "trained with --width 0.0625; this run has --width 0.125")
    assert _contents(out) == before
    assert _main(_folder_args(pngs, out, "--resume"), capsys)[0] == 0   # the right resume is not refused
    assert json.loads((out / "results.json").read_text())["config"]["width"] == 0.0625


def test_a_fresh_run_never_leaves_an_old_train_state_to_resume(pngs, tmp_path, capsys, monkeypatch):
    """A fresh run into a folder with an earlier run's train_state.pt, stopped before its first checkpoint,
    must not leave that state for --resume to continue under the new run's settings.
    python confident.py ... --seed 1 --output-dir R          (finished)
    python confident.py ... --seed 2 --lr 1e-3 --output-dir R   (killed in its first epoch)
    python confident.py ... --seed 2 --lr 1e-3 --output-dir R --resume   -> refused: no checkpoint of this run"""
    out = tmp_path / "R"
    assert _main(_folder_args(pngs, out, "--seed", "1"), capsys)[0] == 0

    def killed(*a, **k):
        raise KeyboardInterrupt                               # stopped before its first epoch ended
    with monkeypatch.context() as m:
        m.setattr(confident, "train", killed)
        assert _main(_folder_args(pngs, out, "--seed", "2", "--lr", "1e-3"), capsys)[0] == 130
    code, _, err = _main(_folder_args(pngs, out, "--seed", "2", "--lr", "1e-3", "--resume"), capsys)
    assert code == 2 and "no checkpoint at" in err
    assert json.loads((out / "results.json").read_text())["config"]["seed"] == 1   # the finished run is kept


def test_resume_refuses_other_settings_and_fewer_epochs_but_takes_more(pngs, tmp_path, capsys):
    """--resume continues the run in the folder exactly, or refuses naming the setting.
    python confident.py ... --epochs 2 --output-dir R                     (finished, 2 epochs)
      ... --resume --epochs 3 --lr 1e-3      -> refused: --lr
      ... --resume --epochs 3 --lr-drop-epoch 1 -> refused: --lr-drop-epoch
      ... --resume --epochs 1                -> refused: 2 epochs trained already
      ... --resume --epochs 3 --method conf  (no config.json) -> refused: --method
      ... --resume --epochs 3                -> trains epoch 3; results.json says epochs 3, resumed at 2"""
    out = tmp_path / "R"
    assert _main(_folder_args(pngs, out, "--epochs", "2"), capsys)[0] == 0
    (out / "config.json").unlink()                            # the checkpoint alone says how it was trained
    before = _contents(out)
    _refused(_folder_args(pngs, out, "--resume", "--epochs", "3", "--lr", "1e-3"), capsys,
             "trained with --lr 0.0002; this run has --lr 0.001")
    _refused(_folder_args(pngs, out, "--resume", "--epochs", "3", "--lr-drop-epoch", "1"), capsys,
             "--lr-drop-epoch 60; this run has --lr-drop-epoch 1")
    _refused(_folder_args(pngs, out, "--resume", "--epochs", "1"), capsys, "has 2 epochs trained already")
    _refused(_folder_args(pngs, out, "--resume", "--epochs", "3", "--method", "conf"), capsys,
             "trained with --method 'ce'; this run has --method 'conf'")
    assert _contents(out) == before
    code, stdout, _ = _main(_folder_args(pngs, out, "--resume", "--epochs", "3"), capsys)
    assert code == 0 and "resumed from" in stdout and "epoch 3/3" in stdout and "epoch 2/3" not in stdout
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["epochs"] == 3 and res["resumed_at_epoch"] == 2
    assert torch.load(out / "train_state.pt", weights_only=True)["epoch"] == 3


_HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[1])
import confident
confident.main(sys.argv[2:])
"""


def test_one_run_per_folder_and_a_killed_run_leaves_no_lock(pngs, tmp_path, capsys):
    """Two runs into one --output-dir: the second is refused naming the first; once the first is killed (-9)
    the folder is free again.
    python confident.py ... --epochs 100000 --output-dir R &      (running)
    python confident.py ... --output-dir R                      -> error: ... in use by pid N ...
    kill -9 %1; python confident.py ... --output-dir R          -> runs"""
    out = tmp_path / "R"
    holder = tmp_path / "holder.py"
    holder.write_text(_HOLDER)
    p = subprocess.Popen([sys.executable, str(holder), str(REPO), *_folder_args(pngs, out, "--epochs", "100000")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    try:
        for ln in p.stdout:                                   # training has begun: the lock is held
            if ln.startswith("epoch 1/"):
                break
        else:
            raise AssertionError("the first run ended early")
        line = _refused(_folder_args(pngs, out), capsys, f"in use by pid {p.pid} on ")
        assert "one run per folder" in line
        assert not (out / "results.json").exists() and not (out / "config.json").exists()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    assert _main(_folder_args(pngs, out), capsys)[0] == 0
    assert json.loads((out / "results.json").read_text())["config"]["epochs"] == 1
    assert not (out / ".lock").exists()


def test_labelled_folder_validation_and_eval_limit_take_every_class_alike(tmp_path, capsys, monkeypatch):
    """The first --val-size test images (validation: temperature scaling, ODIN's (T, eps)) and --eval-limit
    take each class in its share, not the first class's images only.
    python confident.py --in folder:X ... --epochs 0 --val-size 10 --eval-limit 20"""
    folder = _png_folder(tmp_path / "X", n=(16, 15))
    seen = {}

    def stop(model, x_in, y_in, *a, **k):
        seen["y"] = y_in.clone()
        raise ConfidentError("stop here")
    monkeypatch.setattr(confident, "evaluate", stop)
    _refused(_folder_args(folder, tmp_path / "R", "--epochs", "0", "--eval-limit", "20"), capsys, "stop here")
    y = seen["y"]
    assert len(y) == 20 and int((y == 0).sum()) == 10
    assert int((y[:10] == 0).sum()) == 5                      # validation: 5 of each class


def test_folder_images_16_bit_tif_skipped_files_and_links(tmp_path):
    """16-bit grayscale PNGs are scaled (32768 -> 128, 65535 -> 255), not saturated; .tif files are read;
    a skipped file is named in the log; a link out of the folder is refused."""
    from PIL import Image
    d = tmp_path / "f"
    d.mkdir()
    Image.fromarray(np.full((32, 32), 32768, np.uint16)).save(d / "a16.png")
    Image.fromarray(np.full((32, 32), 65535, np.uint16)).save(d / "b16.png")
    Image.fromarray(np.full((32, 32, 3), 70, np.uint8)).save(d / "c.tif")
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(d / "d.tiff")
    (d / "e.svg").write_text("<svg/>")
    x, _ = confident.load_uint8(f"folder:{d}", "test", tmp_path)
    assert x.shape == (4, 3, 32, 32)
    assert x[0].unique().tolist() == [128] and x[1].unique().tolist() == [255]
    assert x[2].unique().tolist() == [70] and x[3].unique().tolist() == [90]
    logs = []
    confident.load_uint8(f"folder:{d}", "test", tmp_path, log=logs.append)
    assert len(logs) == 1 and "skipped 1 other file(s): e.svg" in logs[0]
    outside = tmp_path / "elsewhere.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(outside)
    (d / "link.png").symlink_to(outside)
    with pytest.raises(ConfidentError, match=r"link.png: a link to .*elsewhere.png, outside"):
        confident.load_uint8(f"folder:{d}", "test", tmp_path)


def test_an_ood_folder_inside_the_in_folder_is_refused(pngs, tmp_path, capsys):
    """python confident.py --in folder:X --out folder:X/test ...  -> error (X/test holds in-distribution
    images); nothing is written."""
    out = tmp_path / "R"
    args = _folder_args(pngs, out)
    args[args.index("gaussian")] = f"folder:{pngs}/test"
    _refused(args, capsys, "inside the --in folder")
    assert not out.exists()


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_is_one_error_line_and_keeps_the_last_checkpoint(pngs, tmp_path, capsys, monkeypatch):
    """A full disk while epoch 2's checkpoint is written: exit 2, one line naming train_state.pt and errno 28;
    epoch 1's checkpoint is intact and no temporary file is left.
    python confident.py ... --epochs 2 --output-dir R    (the disk fills up during epoch 2)"""
    out = tmp_path / "R"
    calls, real = [], os.fsync

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            _enospc()
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    line = _refused(_folder_args(pngs, out, "--epochs", "2"), capsys, "train_state.pt")
    assert "errno 28" in line
    assert torch.load(out / "train_state.pt", weights_only=True)["epoch"] == 1
    assert not [p for p in out.rglob("*.tmp")]


def test_a_full_disk_at_the_results_keeps_the_table_and_the_previous_results(pngs, tmp_path, capsys, monkeypatch):
    """The results table reaches stdout before any results file is written; a full disk then is one error line,
    and the previous run's results stay whole."""
    out = tmp_path / "R"
    assert _main(_folder_args(pngs, out), capsys)[0] == 0
    before = {n: (out / n).read_bytes() for n in ("results.json", "results.csv", "results.md", "config.json")}
    real = tempfile.mkstemp

    def mkstemp(*a, **k):
        if str(k.get("prefix", "")).startswith(".results"):
            _enospc()
        return real(*a, **k)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    code, stdout, err = _main(_folder_args(pngs, out, "--seed", "5"), capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "results." in err and "errno 28" in err
    assert confident.METRIC_HEADER in stdout and "seed 5" in stdout   # the new run's table, on stdout
    assert {n: (out / n).read_bytes() for n in before} == before


def test_a_checkpoint_written_to_a_full_device_is_an_error_naming_file_and_errno(tmp_path, monkeypatch):
    """The kernel's own ENOSPC (writes to /dev/full fail with it): torch.save into the file reported it as
    "RuntimeError: [enforce fail at inline_container.cc...]"; it is a ConfidentError naming the file and errno 28,
    and the file there before is unchanged, with no temporary file left."""
    def full_device(fd, mode="r", *a, **k):
        os.close(fd)
        return open("/dev/full", mode)
    (tmp_path / "train_state.pt").write_bytes(b"the last good checkpoint")
    monkeypatch.setattr(os, "fdopen", full_device)
    with pytest.raises(ConfidentError, match=r"train_state.pt: could not be written .*errno 28 ENOSPC"):
        confident.atomic_save({"w": torch.zeros(100_000)}, tmp_path / "train_state.pt")
    with pytest.raises(ConfidentError, match=r"results.json: could not be written .*errno 28 ENOSPC"):
        confident.atomic_write_text("{}" * 10_000, tmp_path / "results.json")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["train_state.pt"]
    assert (tmp_path / "train_state.pt").read_bytes() == b"the last good checkpoint"


def test_the_next_run_removes_temporary_files_of_killed_writes(pngs, tmp_path, capsys):
    """A write killed between its temporary file and the rename leaves .<name>.<random>.tmp; the next run in
    that folder removes it (holding the folder's lock)."""
    out = tmp_path / "R"
    out.mkdir()
    (out / ".train_state.pt.x1y2z3.tmp").write_bytes(b"half a checkpoint")
    (out / ".results.json.abc.tmp").write_text("{")
    code, stdout, _ = _main(_folder_args(pngs, out), capsys)
    assert code == 0 and "removed 2 leftover(s)" in stdout
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("flags,match", [
    (["--seed", "99999999999999999999999"], "--seed 99999999999999999999999: expected a whole number"),
    (["--device", "cpu:3"], "--device 'cpu:3'"),
    (["--out", "folder:odd|name"], "a folder name with '|'"),
    (["--out", "folder:odd\nname"], "a folder name with '\\n'"),
])
def test_cli_small_bad_values_exit_2_with_one_line(flags, match, capsys):
    """python confident.py --seed 99999999999999999999999 (an overflow traceback before); --device cpu:3
    (accepted before); a | or newline in a folder name (it broke results.md's table)."""
    _refused(["--epochs", "0", *flags], capsys, match)


def test_detectors_refuse_other_sizes_unscaled_floats_and_non_numbers(tiny_model):
    # any size goes to the model (a user's network may take 64x64); one that refuses it is one clear error
    with pytest.raises(ConfidentError, match=r"the model failed on images of shape \(2, 3, 64, 64\)"):
        confident.baseline_scores(tiny_model, torch.rand(2, 3, 64, 64))
    with pytest.raises(ConfidentError, match=r"values in \[.*\], expected \[0, 1\]"):
        confident.baseline_scores(tiny_model, torch.rand(2, 3, 32, 32) * 255)
    with pytest.raises(ConfidentError, match="ODIN temperature 'abc': a string, expected a number"):
        confident.odin_scores(tiny_model, torch.rand(2, 3, 32, 32), "abc", 0.0)
    with pytest.raises(ConfidentError, match="ODIN epsilon"):
        confident.odin_grid(tiny_model, torch.rand(2, 3, 32, 32), [1], [None])


def test_an_unlabelled_ood_folder_is_split_so_no_scored_image_was_trained_on(pngs, tmp_path, capsys, monkeypatch):
    """An unlabelled folder has one set of images for every split: as --out it is split in halves for every method
    (conf trains on the second, every method is scored on the first, the same images); as --val-ood its second
    half validates; named by --extra-ood alone it is scored whole. A checkpoint that did not split it is not
    resumed into a run that does."""
    from PIL import Image
    ood = tmp_path / "ood"
    ood.mkdir()
    rng = np.random.default_rng(3)
    for i in range(44):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(ood / f"{i:03d}.png")
    seen = {}
    train, evaluate = confident.train, confident.evaluate
    monkeypatch.setattr(confident, "train", lambda cfg, x, y, x_ood=None, *a, **k: (
        seen.__setitem__("train", x_ood), train(cfg, x, y, x_ood, *a, **k))[1])
    monkeypatch.setattr(confident, "evaluate", lambda model, xi, yi, sets, cfg, log, val=None: (
        seen.update(test=dict(sets), val=dict(val or {})), evaluate(model, xi, yi, sets, cfg, log, val))[1])
    rows = lambda t: {bytes(r.numpy().tobytes()) for r in t}                     # noqa: E731
    name = f"folder:{ood}"

    def cli(out, **flags):
        args = _folder_args(pngs, tmp_path / out)
        for flag, value in {"--out": name, "--eval-limit": "0", "--impl": "torch", **flags}.items():
            if flag in args:
                args[args.index(flag) + 1] = value
            else:
                args += [flag, value]
        code, stdout, err = _main(args, capsys)
        assert code == 0, err
        return stdout

    out = cli("conf", **{"--method": "conf"})
    assert f"{name}: one set of images for every split: its first half is scored, its second trained on" in out
    x_train, conf_test = seen["train"], seen["test"][name]
    assert len(x_train) == 22 and len(conf_test) == 22
    assert not rows(x_train) & rows(conf_test) and len(rows(x_train) | rows(conf_test)) == 44
    assert json.loads((tmp_path / "conf" / "results.json").read_text())["ood_halves"] == [name]
    cli("ce")                                                                   # the same 22 for every method
    assert rows(seen["test"][name]) == rows(conf_test)
    cli("val", **{"--out": "gaussian", "--val-ood": name, "--extra-ood": name})
    assert rows(seen["val"][name]) == rows(x_train) and rows(seen["test"][name]) == rows(conf_test)
    cli("whole", **{"--out": "gaussian", "--extra-ood": name})                  # only scored: every image
    assert len(seen["test"][name]) == 44
    # a checkpoint from before the split (its settings record none) is not resumed into a split run
    state = tmp_path / "conf" / "train_state.pt"
    sd = torch.load(state, weights_only=True)
    sd["config"] = json.dumps({k: v for k, v in json.loads(sd["config"]).items() if k != "ood_halves"})
    torch.save(sd, state)
    args = _folder_args(pngs, tmp_path / "conf", "--resume")
    for flag, value in (("--out", name), ("--method", "conf"), ("--eval-limit", "0")):
        args[args.index(flag) + 1] = value
    _refused(args, capsys, f"split in halves, this run splits ['{name}']: its OOD images differ")


def test_val_ood_that_is_the_in_set_is_refused(pngs, tmp_path, capsys):
    _refused(_folder_args(pngs, tmp_path / "o", "--val-ood", f"folder:{pngs}"), capsys,
             "is the in-distribution set (--in)")
    assert not (tmp_path / "o").exists()
