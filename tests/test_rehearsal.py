"""A dress rehearsal of `bash reproduce.sh` (the full mode: SVHN, CIFAR-10, TinyImageNet, LSUN, Gaussian; MNIST
for Figure 3) on small files in each set's real on-disk format, so that no stage, table, figure or the README
fails after hours on the paper's data. It runs the full mode's roles, stages, runs, tables, figures and README
renderer through the real entry point; only the sizes (REPRODUCE_SIZES=tiny) and the md5 checks
(REPRODUCE_VERIFY=0: the fixtures cannot match the published files) differ."""
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import reproduce as R  # noqa: E402
from conftest import write_cifar, write_idx_set, write_images, write_svhn  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_TRAIN, N_TEST = 200, 130          # the tiny sizes use 192 training and 120 test images (40 of them tune ODIN)
FULL = R.ROLES["full"]
A, B, UNSEEN = FULL["A"], FULL["B"], list(FULL["unseen"])


def _labelled(rng, n, shape):
    """n images whose brightness follows the label (something to learn), and the labels 0..9."""
    y = rng.integers(0, 10, n)
    x = np.clip(rng.integers(0, 80, (n,) + shape) + 17 * y.reshape((n,) + (1,) * len(shape)), 0, 255)
    return x.astype(np.uint8), y


def write_full_data(root: Path) -> Path:
    """Every set the full mode reads, in its real format, under root (as DATA_ROOT)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        x, y = _labelled(rng, n, (32, 32, 3))
        write_svhn(root, split, np.ascontiguousarray(x.transpose(1, 2, 3, 0)), np.where(y == 0, 10, y)[:, None])
        x, y = _labelled(rng, n, (28, 28))
        write_idx_set(root, "mnist", split, x, y, gz=split == "train")
    batches = {}
    for i in range(1, 6):                                        # five training batches and the test batch
        x, y = _labelled(rng, N_TRAIN // 5, (3, 32, 32))
        batches[f"data_batch_{i}"] = (x.reshape(len(x), -1), y)
    x, y = _labelled(rng, N_TEST, (3, 32, 32))
    batches["test_batch"] = (x.reshape(len(x), -1), y)
    write_cifar(root, batches)
    for name, folder in (("tinyimagenet", "Imagenet_resize"), ("lsun", "LSUN_resize")):
        # the ODIN authors' archives unpack to <folder>/<folder>/*.jpg, 32x32 colour images
        imgs = rng.integers(0, 256, (N_TEST, 32, 32, 3)).astype(np.uint8)
        write_images(root / name / folder / folder, imgs, "jpg")
    return root


def _env(data: Path) -> dict:
    # one intra-op thread, as conftest sets for the in-process tests (the full mode takes torch's default)
    return {**os.environ, "DATA_ROOT": str(data), "REPRODUCE_SIZES": "tiny", "REPRODUCE_VERIFY": "0",
            "OMP_NUM_THREADS": os.environ.get("CONFIDENT_TEST_THREADS", "1")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_full_data(tmp_path_factory.mktemp("full-data"))


@pytest.fixture(scope="module")
def rehearsal(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("rehearsal")
    p = subprocess.run(["bash", "reproduce.sh", "--results", str(out)], cwd=ROOT, env=_env(data),
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out


def _body(text: str) -> list[list[str]]:
    """The body rows of the Markdown table in `text`, as lists of cells (its header and rule left out)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines[2:]]


def _ours_and_paper(cell: str, paper: str) -> None:
    """A cell is "ours (paper)": ours numbers (mean, or mean±std), never "n/a"; the paper's exactly `paper`."""
    assert cell.endswith(f" ({paper})") and "n/a" not in cell, (cell, paper)
    for part in cell[:-len(paper) - 3].split(" / "):
        float(part.split("±")[0])


# table -> (paper numbers, detector column?, in-sets, the paper's key for (detector, in, out))
DETECTION = {1: (R.PAPER_T1, False, (A, B), lambda d, i, o: (i, o)),
             4: (R.PAPER_T4, True, (A, B), lambda d, i, o: (d, i, o)),
             5: (R.PAPER_T5, False, (A, B), lambda d, i, o: (i, o)),
             6: (R.PAPER_T6, True, (B,), lambda d, i, o: (d, o))}
PAPER_ACC = {1: R.PAPER_T1_ACC, 4: R.PAPER_T4_ACC, 5: R.PAPER_T5_ACC, 6: {B: R.PAPER_T6_ACC}}


@pytest.mark.parametrize("k", sorted(DETECTION))
def test_detection_tables_have_every_full_row(rehearsal, k):
    """Every (detector, in-set, OOD set) row the paper has, in the full mode's names, each cell with the paper's
    pair of numbers beside ours; the accuracies on the first row of each in-set."""
    paper, has_det, in_sets, key = DETECTION[k]
    rows = _body((rehearsal / f"table{k}.md").read_text())
    want = [(d, i_, o) for d in (("baseline", "odin") if has_det else (None,)) for i_ in in_sets
            for o in [R.other("full", i_)] + UNSEEN if key(d, i_, o) in paper]
    assert len(want) == {1: 8, 4: 16, 5: 6, 6: 8}[k]
    got = [((r[0] if has_det else None),) + tuple(r[int(has_det):int(has_det) + 2]) for r in rows]
    assert [(d, i_, o.split(" (")[0]) for d, i_, o in got] == want
    for r, (d, i_, o) in zip(rows, want):
        r = r[int(has_det):]
        assert len(r) == 3 + len(R.METRICS)
        if k != 5:                                   # the confidence loss's seen set, and the unseen ones
            assert r[1] == f"{o} ({'seen' if o == R.other('full', i_) else 'unseen'})"
        for j, cell in enumerate(r[3:]):
            a, b = paper[key(d, i_, o)][j]
            _ours_and_paper(cell, f"{a:g} / {b:g}")
        if o == R.other("full", i_):
            _ours_and_paper(r[2], "{:g} / {:g}".format(*PAPER_ACC[k][i_]))
        else:
            assert r[2] == ""
    text = (rehearsal / f"table{k}.md").read_text()
    assert "(as " not in text and "fashion-mnist" not in text      # the full mode's names, not the stand-ins'


def test_tables_2_and_3(rehearsal):
    t2, t3 = (_body((rehearsal / f"table{k}.md").read_text()) for k in (2, 3))
    assert [r[0] for r in t2] == [A, B] and [r[0] for r in t3] == [A, B]
    for r2, r3 in zip(t2, t3):
        for cell, m in zip(r2[1:], ("ce", "conf-gan", "joint", "conf")):
            _ours_and_paper(cell, f"{R.PAPER_T2[r2[0]][m]:g}")
        for cell, k in zip(r3[1:], (("ce", "ece"), ("joint", "ece"), ("ce", "ece_ts"), ("joint", "ece_ts"))):
            _ours_and_paper(cell, f"{R.PAPER_T3[r3[0]][k]:g}")


def test_figures(rehearsal):
    for f in ("figure1", "figure2", "figure3ab", "figure3cd", "figure4", "figure5", "figure7"):
        data = (rehearsal / f"{f}.png").read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, f


def test_runs_csv_has_every_run(rehearsal, monkeypatch):
    with open(rehearsal / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    monkeypatch.setitem(R.MODES, "full", R.resized(R.MODES["full"], "tiny"))    # the rehearsal's seeds
    want = set(R.all_runs("full"))
    assert {r["run"] for r in rows} == {r.name for r in want}
    assert {r["in"] for r in rows} == {A, B, "mnist"}
    for run in want:
        mine = [r for r in rows if r["run"] == run.name]
        outs = {r["out"] for r in mine if r["out"]}
        expect = {run.out_data} | ({x for x in run.extra.split(",")} if run.extra != "none" else set())
        assert outs == expect - {run.in_data}, (run.name, outs)
        assert all(r["mode"] == "full" for r in mine)
    # every run's folder is the full mode's
    assert all((rehearsal / "runs" / "full" / run.name / "results.json").exists() for run in want)


def _check_data(env, results):
    return subprocess.run(["bash", "reproduce.sh", "check-data", "--results", str(results)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _missing(stderr: str) -> list[str]:
    """The sets check-data reports missing, one line each."""
    assert "error: missing data:" in stderr, stderr
    block = stderr.split("error: missing data:\n")[1].split("How to get the data")[0]
    return [ln.strip() for ln in block.strip().splitlines()]


def test_check_data_full(data, tmp_path):
    p = _check_data(_env(data), tmp_path / "r")
    assert p.returncode == 0 and "data for mode full: all present" in p.stdout, p.stderr[-2000:]
    copy = tmp_path / "data"                        # one set removed: check-data names it, and only it
    shutil.copytree(data, copy)
    shutil.rmtree(copy / "lsun")
    p = _check_data(_env(copy), tmp_path / "r")
    assert p.returncode == 2
    missing = _missing(p.stderr)
    assert len(missing) == 1 and missing[0].startswith("lsun (train): data set 'lsun' not found"), missing
    assert "LSUN_resize" in missing[0] and "downloads off" in missing[0]


def test_checksums_are_checked_by_default(data, tmp_path):
    """Without REPRODUCE_VERIFY=0 the fixtures fail their md5 checks (SVHN's .mat, MNIST's idx; the CIFAR-10 batches
    and the resize sets' folders have none, only their archives): the switch does not leak into the default."""
    env = {k: v for k, v in _env(data).items() if k != "REPRODUCE_VERIFY"}
    p = _check_data(env, tmp_path / "r")
    assert p.returncode == 2
    missing = _missing(p.stderr)
    assert [ln.split(":")[0] for ln in missing] == ["svhn (train)", "mnist (train)"], missing
    assert all("checksum mismatch" in ln for ln in missing)


def test_rehearsal_refuses_the_results_folder(data):
    """Its tiny runs would pass for finished full-mode runs in ./results: refused before anything is written."""
    p = subprocess.run(["bash", "reproduce.sh", "check-data"], cwd=ROOT, env=_env(data), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode != 0 and "REPRODUCE_SIZES=tiny is a rehearsal" in p.stderr
