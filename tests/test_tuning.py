"""The paper's protocol (App. B) end to end on slices of real data (Fashion-MNIST in, MNIST out): --tune trains one
run per grid point and picks, per OOD set, the point with the lowest baseline detection error on that set's
validation images; --select-epoch best evaluates after every epoch and picks the epoch the same way. Neither
choice may look at a test image."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import confident
from conftest import main_in_root as _main_in_root
from confident import Config

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
V = 50                                                       # --val-size: the validation images of every set
# `--impl torch`: the Triton kernels have their own tests (see tests/test_cli.py)
TINY = ["--in", "fashion-mnist", "--out", "mnist", "--method", "joint", "--model", "vgg13", "--width", "0.0625",
        "--epochs", "1", "--train-limit", "256", "--lr", "1e-3", "--eval-limit", "150", "--val-size", str(V),
        "--batch-size", "64", "--extra-ood", "none", "--impl", "torch", "--temperatures", "1", "--epsilons", "0"]
METRICS = ("tnr_at_tpr95", "auroc", "detection_acc", "aupr_in", "aupr_out")




def _with(args, flag, value):
    """args with flag's value replaced."""
    i = args.index(flag)
    return args[:i + 1] + [value] + args[i + 2:]


def _json(path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    out = tmp_path_factory.mktemp("tune") / "grid"
    _main_in_root(TINY + ["--tune", "beta=0,1", "--output-dir", str(out)])
    return out


def test_tune_runs_every_point_and_picks_the_lowest_validation_error(tuned):
    t = _json(tuned / "tuning.json")
    assert t["tuned_on_ood"] is True and t["val_size"] == V
    assert t["grid"] == {"beta": [0.0, 1.0], "batch_size": [64], "lr": [1e-3]}      # lr: the run's own --lr
    assert [(p["beta"], p["batch_size"], p["lr"]) for p in t["points"]] == [(0.0, 64, 1e-3), (1.0, 64, 1e-3)]
    # each point is a whole run in its own folder; tuning.json repeats its validation error
    own = {}
    for p in t["points"]:
        res = _json(tuned / p["dir"] / "results.json")
        assert res["config"]["beta"] == p["beta"] and res["config"]["batch_size"] == 64
        own[p["dir"]] = res
        assert p["baseline_val_detection_error"]["mnist"] == res["ood"]["mnist"]["baseline_val_detection_error"]
    errs = {d: r["ood"]["mnist"]["baseline_val_detection_error"] for d, r in own.items()}
    c = t["chosen"]["mnist"]
    assert c["tuned_on_ood"] is True and errs[c["dir"]] == min(errs.values())
    if len(set(errs.values())) == 1:                         # a tie goes to the first point of the grid
        assert c["dir"] == t["points"][0]["dir"]
    # the chosen point's test metrics are its own run's, on the held-out rest
    for det in ("baseline", "odin"):
        for k in METRICS:
            assert c[det][k] == own[c["dir"]]["ood"]["mnist"][det][k]
    assert c["n_out_test"] == 150 - V and c["accuracy"] == own[c["dir"]]["accuracy"]
    md = (tuned / "tuning.md").read_text()
    assert "Tuned on the OOD set" in md and md.count("* |") == 1              # the chosen point, marked
    assert sum(line.startswith("| mnist | ") for line in md.splitlines()) == 2      # baseline and ODIN


def test_tune_validation_error_is_the_baseline_on_the_first_val_size_images(tuned):
    """Recomputed from the chosen point's checkpoint: the baseline detector on the first --val-size test images of
    the in-set and of the OOD set, and on nothing else."""
    c = _json(tuned / "tuning.json")["chosen"]["mnist"]
    model = confident.build_classifier("vgg13", 10, 0.0625)
    model.load_state_dict(torch.load(tuned / c["dir"] / "checkpoint.pt", map_location="cpu", weights_only=True))
    x_in = confident.to_rgb(confident.load_uint8("fashion-mnist", "test", DATA)[0][:V])    # 3 channels for vgg13
    x_out = confident.to_rgb(confident.load_uint8("mnist", "test", DATA)[0][:V])
    m = confident.ood_metrics(confident.baseline_scores(model, x_in), confident.baseline_scores(model, x_out))
    assert 1 - m["detection_acc"] == pytest.approx(c["baseline_val_detection_error"], abs=1e-9)


def test_tune_rerun_reuses_finished_points(tuned, monkeypatch, capsys):
    before = (tuned / "tuning.json").read_text()

    def no_training(*a, **k):
        raise AssertionError("a finished grid point was trained again")
    monkeypatch.setattr(confident, "train", no_training)
    _main_in_root(TINY + ["--tune", "beta=0,1", "--output-dir", str(tuned)])
    assert capsys.readouterr().out.count("finished before, not run again") == 2
    assert (tuned / "tuning.json").read_text() == before
    # a folder run with other settings is not taken for a finished point
    with pytest.raises(SystemExit) as e:
        _main_in_root(_with(TINY, "--epochs", "2") + ["--tune", "beta=0,1", "--output-dir", str(tuned)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--epochs 1" in err[0]


@pytest.mark.parametrize("spec", ["beta=0;beta=1", "gamma=1", "batch=64.5", "lr=0", "beta=x", ";"])
def test_bad_grid_spec_is_one_error_line(tmp_path, capsys, spec):
    with pytest.raises(SystemExit) as e:
        _main_in_root(TINY + ["--tune", spec, "--output-dir", str(tmp_path / "t")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --tune {spec!r}"), err
    assert not (tmp_path / "t").exists()


def test_tune_grid_paper_and_methods_without_beta():
    g = confident.tune_grid(Config(tune="paper", method="joint"))
    assert g["beta"] == [i / 10 for i in range(21)] and g["beta"][3] == 0.3
    assert g["batch_size"] == [64, 128] and g["lr"] == [1e-3, 5e-4, 2e-4]
    # ce has no KL term: beta changes nothing, so the grid is batch x lr at the run's own beta
    g = confident.tune_grid(Config(tune="paper", method="ce", beta=0.5))
    assert g["beta"] == [0.5] and len(g["batch_size"]) * len(g["lr"]) == 6
    g = confident.tune_grid(Config(tune=" lr = 1e-3, 1e-3 ; batch=128 ", method="joint", in_data="cifar10"))
    assert g == {"beta": [0.1], "batch_size": [128], "lr": [1e-3]}       # beta: the paper's default for cifar10


def test_pick_by_validation_never_reads_test_metrics():
    """Per OOD set the lowest validation error wins, the first on ties, whatever the test metrics say."""
    def entry(val, test_acc):
        return {"baseline_val_detection_error": val, "baseline": {"detection_acc": test_acc}}
    cands = [(1, {"a": entry(0.30, 0.99), "b": entry(0.10, 0.50)}),
             (2, {"a": entry(0.20, 0.60), "b": entry(0.10, 0.99)}),
             (3, {"a": entry(0.25, 0.70), "b": entry(0.40, 0.99)})]
    assert confident.pick_by_validation(cands) == {"a": 2, "b": 1}


@pytest.fixture(scope="module")
def best(tmp_path_factory):
    out = tmp_path_factory.mktemp("best") / "run"
    _main_in_root(_with(TINY, "--epochs", "2") + ["--select-epoch", "best", "--output-dir", str(out)])
    return out


def test_select_epoch_best_reports_final_and_best_epoch(best):
    res = _json(best / "results.json")
    assert res["config"]["select_epoch"] == "best" and res["final_epoch"] == 2
    assert [e["epoch"] for e in res["epochs"]] == [1, 2]
    assert _json(best / "epochs.json") == res["epochs"]
    # "ood" stays the final epoch's; "best_epoch" is the epoch with the lowest validation error (first on ties)
    assert res["ood"] == res["epochs"][-1]["ood"] and res["accuracy"] == res["epochs"][-1]["accuracy"]
    errs = [e["ood"]["mnist"]["baseline_val_detection_error"] for e in res["epochs"]]
    b = res["best_epoch"]["mnist"]
    assert b["epoch"] == 1 + errs.index(min(errs))
    stored = res["epochs"][b["epoch"] - 1]
    assert b["accuracy"] == stored["accuracy"]
    for det in ("baseline", "odin"):
        assert b[det] == stored["ood"]["mnist"][det]
    assert "### Best epoch" in (best / "results.md").read_text()


def test_select_epoch_best_does_not_change_training(best):
    """The per-epoch evaluation draws no random number that training would have drawn: the final weights are
    those of a run without it."""
    x, y = confident.load_uint8("fashion-mnist", "train", DATA)
    cfg = confident.resolve(Config(in_data="fashion-mnist", out_data="mnist", method="joint", width=0.0625, epochs=2,
                                   train_limit=256, lr=1e-3, batch_size=64, impl="torch"))
    plain = confident.train(cfg, x[:256], y[:256], log=lambda *a: None).raw["net"].state_dict()
    saved = torch.load(best / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert plain.keys() == saved.keys() and all(torch.equal(plain[k], saved[k]) for k in plain)


def test_best_epoch_table_lists_epochs_that_differ(best):
    res = _json(best / "results.json")
    cfg = Config(**res["config"])
    other = 1 if res["final_epoch"] == 2 else 2
    res["best_epoch"]["mnist"] = {**res["best_epoch"]["mnist"], "epoch": other}
    md = confident.markdown_table(res, cfg, set())
    assert md.count(f"| mnist | {other} |") == 2
    res["best_epoch"]["mnist"]["epoch"] = res["final_epoch"]
    assert "The best epoch is the final epoch for every OOD set." in confident.markdown_table(res, cfg, set())


def test_select_epoch_best_resumes_with_its_epochs(best, tmp_path):
    """epochs.json survives --resume: a third epoch is added to the two evaluated before, and the best of all three
    is picked."""
    out = tmp_path / "run"
    shutil.copytree(best, out)
    _main_in_root(_with(TINY, "--epochs", "3") + ["--select-epoch", "best", "--resume", "--output-dir", str(out)])
    res, before = _json(out / "results.json"), _json(best / "results.json")
    assert [e["epoch"] for e in res["epochs"]] == [1, 2, 3] and res["final_epoch"] == 3
    assert res["epochs"][:2] == before["epochs"]
    errs = [e["ood"]["mnist"]["baseline_val_detection_error"] for e in res["epochs"]]
    assert res["best_epoch"]["mnist"]["epoch"] == 1 + errs.index(min(errs))


def _fake_run(diverge):
    """A stand-in for `run`: a point whose beta is in `diverge` stops on a NaN loss, any other reports a validation
    error of beta / 10 (no training)."""
    def run(cfg, log=print, trainer_cls=None):
        if cfg.beta in diverge:
            raise confident.TrainingDiverged(f"classifier loss (c) is nan at epoch 1 step 1 (method {cfg.method})")
        m = {k: 0.5 for k in METRICS}
        return {"accuracy": 0.9, "ood": {"mnist": {"baseline_val_detection_error": cfg.beta / 10, "baseline": m,
                                                   "odin": {**m, "temperature": 1.0, "epsilon": 0.0}, "n_out_test": 9}}}
    return run


def test_tune_leaves_a_diverged_point_out_and_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(confident, "run", _fake_run(diverge={0.0}))
    t = confident.tune(Config(tune="beta=0,2,1", method="joint", output_dir=str(tmp_path / "t")), log=lambda *a: None)
    assert [p["beta"] for p in t["points"]] == [0.0, 2.0, 1.0] and "nan" in t["points"][0]["diverged"]
    assert t["points"][0]["baseline_val_detection_error"] == {}
    assert t["chosen"]["mnist"]["beta"] == 1.0                # 0 diverged (its error would have been the lowest)
    assert "| 0 | 128 | 0.0002 | diverged |" in (tmp_path / "t" / "tuning.md").read_text()


def test_tune_where_every_point_diverged_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(confident, "run", _fake_run(diverge={0.0, 1.0}))
    with pytest.raises(SystemExit) as e:
        _main_in_root(TINY + ["--tune", "beta=0,1", "--output-dir", str(tmp_path / "t")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --tune 'beta=0,1': every grid point diverged"), err
    assert not (tmp_path / "t" / "tuning.json").exists()
