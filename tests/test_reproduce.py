"""reproduce.sh / reproduce.py: the quick pipeline on a tiny slice (`--tiny`: one epoch, a few hundred images),
then checks of every table, figure, the runs CSV and the README it writes; plus the pieces that can be checked
on their own (the transcribed paper numbers, guided backprop, the missing-data message)."""
import collections
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import reproduce as R  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("repro")
    p = subprocess.run(["bash", "reproduce.sh", "--tiny", "--results", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out, p.stdout


def test_tables(tiny):
    out, _ = tiny
    for k in range(1, 7):
        text = (out / f"table{k}.md").read_text()
        assert text.startswith(f"# Table {k}")
        assert "n/a" not in text, f"table{k} has cells without a finished run"
    t1 = (out / "table1.md").read_text()
    # the paper's number beside ours: SVHN vs CIFAR-10 (seen) row of Table 1, and its accuracies
    assert "(47.4 / 99.9)" in t1 and "(93.82 / 94.23)" in t1
    assert "fashion-mnist (as svhn)" in t1 and "(seen)" in t1 and "(unseen)" in t1
    rows = [ln for ln in t1.splitlines() if ln.startswith("| fashion-mnist") or ln.startswith("| mnist")]
    assert len(rows) == 8 and all(ln.count("|") == 9 for ln in rows)
    # GAN regimes ran two seeds: their cells carry a spread
    assert "±" in (out / "table5.md").read_text() and "±" in (out / "table3.md").read_text()
    t4 = (out / "table4.md").read_text()
    assert "| odin |" in t4 and "(82.6 / 100)" in t4
    t6 = (out / "table6.md").read_text()
    assert "(79.61 / 80.56)" in t6 and "(55.12 / 65.7)" in t6
    assert "(81.39)" in (out / "table2.md").read_text() and "(18.45)" in (out / "table3.md").read_text()


def test_figures(tiny):
    out, _ = tiny
    for f in ("figure1", "figure2", "figure3ab", "figure3cd", "figure4", "figure5", "figure7"):
        data = (out / f"{f}.png").read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, f


def test_csv_and_readme(tiny):
    out, _ = tiny
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    need = {"table", "method", "in", "out", "detector", "metric", "value", "seed", "commit", "torch", "device"}
    assert need <= set(rows[0])
    runs = {r["run"] for r in rows}
    assert runs == {r.name for r in R.all_runs("tiny")}
    assert {r["method"] for r in rows} == {"ce", "conf", "conf-gan", "joint", "joint-pt", "kplus1"}
    assert all(r["commit"] and r["torch"] == torch.__version__ for r in rows)
    assert all(0.0 <= float(r["value"]) <= 1.0 for r in rows if r["metric"] != "ece")
    readme = (out / "README.md").read_text()
    for f in ("table1.md", "table6.md", "figure1.png", "figure3cd.png", "figure7.png", "runs.csv"):
        assert f"({f})" in readme
    # every claim has one of the four verdicts; one seed (GAN regimes two) decides nothing
    rows = [ln for ln in readme.splitlines() if ln.startswith("| ") and not ln.startswith("| Claim")]
    assert len(rows) >= 50
    kinds = [ln.rstrip(" |").split(" | ")[-1] for ln in rows]
    assert all(k.startswith(("inconclusive (n = 1)", "inconclusive (n = 2)", "not testable")) for k in kinds), kinds
    assert "two-sided exact Wilcoxon signed-rank test" in readme and "0 supported, 0 contradicted" in readme
    # wall-clock per stage is recorded (speed is measured by benchmarks, not asserted by tests)
    timings = json.loads((out / "timings.json").read_text())
    assert {"runs", "total", *R.STAGES} <= set(timings) and all(v >= 0 for v in timings.values())


def test_finished_runs_are_not_recomputed(tiny):
    out, _ = tiny
    stamp = {p: p.stat().st_mtime_ns for p in (out / "runs" / "tiny").glob("*/results.json")}
    p = subprocess.run(["bash", "reproduce.sh", "--tiny", "table6", "--results", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "run(s) to do" not in p.stdout
    assert stamp == {p: p.stat().st_mtime_ns for p in (out / "runs" / "tiny").glob("*/results.json")}


def test_paper_numbers_transcribed():
    assert len(R.PAPER_T1) == 8 and len(R.PAPER_T4) == 16 and len(R.PAPER_T5) == 6 and len(R.PAPER_T6) == 8
    for table in (R.PAPER_T1, R.PAPER_T4, R.PAPER_T5, R.PAPER_T6):
        for cells in table.values():
            assert len(cells) == 5 and all(len(c) == 2 and all(0 <= v <= 100 for v in c) for c in cells)
    assert R.PAPER_T1[("cifar10", "gaussian")][1] == (10.2, 14.1)
    assert R.PAPER_T4[("odin", "cifar10", "lsun")][3] == (67.2, 72.0)
    assert R.PAPER_T5[("cifar10", "svhn")][0] == (25.4, 13.2)
    assert R.PAPER_T6[("baseline", "gaussian")][4] == (12.2, 47.0)


def test_guided_backprop_matches_hand_computation():
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(3 * 32 * 32, 7), nn.Linear(7, 4)
    net = nn.Sequential(nn.Flatten(), lin1, nn.ReLU(inplace=True), lin2)
    x = torch.rand(3, 3, 32, 32)
    got = R.guided_backprop(net, x)
    with torch.no_grad():
        h = lin1(x.flatten(1))
        top = lin2(torch.relu(h)).argmax(1)
        g_h = lin2.weight[top].clamp(min=0) * (h > 0)          # ReLU backward, then only positive gradients
        want = (g_h @ lin1.weight).view_as(x)
    assert torch.allclose(got, want, atol=1e-6)
    plain = torch.autograd.functional.jacobian(lambda v: net(v)[0, top[0]], x[:1])[0]
    assert not torch.allclose(got[:1], plain)                   # it is not the plain gradient
    assert net[2].inplace                                       # the caller's model is untouched


def test_missing_data_message(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    monkeypatch.setitem(R.MODES["full"], "download", False)
    problems = R.check_data("full")
    text = "\n".join(problems)
    for name in ("svhn", "cifar10", "tinyimagenet", "lsun"):
        assert name in text
    assert "train_32x32.mat" in text and str(tmp_path) in text


def test_quick_all_leaves_out_its_optional_stages_and_render_takes_them_once_finished(tmp_path, monkeypatch):
    skip = R.MODES["quick"]["not_in_all"]
    assert set(skip) == {"table4", "table5", "table6", "figure2"}
    assert R.stages_for("all", "quick", tmp_path) == tuple(st for st in R.STAGES if st not in skip)
    assert R.stages_for("render", "quick", tmp_path) == R.stages_for("all", "quick", tmp_path)
    assert R.stages_for("table4", "quick", tmp_path) == ("table4",)          # on its own it runs
    assert R.stages_for("all", "full", tmp_path) == R.STAGES                 # the paper's mode leaves out nothing
    for run in R.plan("table5", "quick"):                                    # table 5's runs finished: rendered
        d = R.run_dir(run, "quick", tmp_path)
        d.mkdir(parents=True)
        (d / "results.json").write_text("{}")
    assert "table5" in R.stages_for("render", "quick", tmp_path)
    assert "table5" not in R.stages_for("all", "quick", tmp_path)


# ------------------------------------------------------------------------------------------------
# The verdict rule (paired_comparison, judge, holm, signed_rank_test) at its boundaries. Each check runs on the
# rule as written and on a mutant of it (a rule with one thing wrong), which it must catch.

import itertools  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402


def _caught(monkeypatch, check, **mutant):
    """`check` passes on the rule, and fails with the rule's functions replaced by `mutant`."""
    check()
    with monkeypatch.context() as m:
        for name, fn in mutant.items():
            m.setattr(R, name, fn)
        with pytest.raises(AssertionError):
            check()


def _arms(diffs, base=50.0):
    """{seed: A}, {seed: B} with A - B = diffs[seed]."""
    return ({s: base + d for s, d in enumerate(diffs)}, {s: base for s in range(len(diffs))})


def test_signed_rank_p_matches_scipy_exact():
    """Without ties or zeros our exact p-values are scipy's (method="exact"): two-sided and both one-sided."""
    rng = np.random.default_rng(0)
    for n in range(1, 16):
        for _ in range(4):
            d = rng.normal(0.3, 1.0, n)
            got = R.signed_rank_test(d)
            assert got["n"] == n
            for key, alt in (("p", "two-sided"), ("p_greater", "greater"), ("p_less", "less")):
                want = stats.wilcoxon(d, alternative=alt, method="exact").pvalue
                assert got[key] == pytest.approx(want, rel=1e-12, abs=1e-15), (n, key, d)


def test_signed_rank_p_with_ties_by_enumeration():
    """With tied |d| and zeros: zeros dropped, mid-ranks, the null distribution over every sign assignment,
    written out here by enumeration (scipy's exact method does not take ties)."""
    for d in ([1, 1, 2, -2, 3, 0, 0], [0.5, -0.5, 0.5, 1.5, 2.5, 2.5, -2.5, 4], [2, 2, 2, 2, 2, 2]):
        x = np.array([v for v in d if v != 0], dtype=float)
        ranks = stats.rankdata(np.abs(x))                      # mid-ranks
        w = ranks[x > 0].sum()
        ws = [sum(r for r, sgn in zip(ranks, signs) if sgn) for signs in itertools.product((0, 1), repeat=len(x))]
        pg = np.mean([v >= w - 1e-9 for v in ws])
        pl = np.mean([v <= w + 1e-9 for v in ws])
        got = R.signed_rank_test(d)
        assert got["n"] == len(x) and got["w_plus"] == pytest.approx(w)
        assert got["p_greater"] == pytest.approx(pg) and got["p_less"] == pytest.approx(pl)
        assert got["p"] == pytest.approx(min(1.0, 2 * min(pg, pl)))


def test_ties_at_the_threshold_are_dropped(monkeypatch):
    """Six pairs 2-7 points above theta and three exactly at it: n = 6, every sign alike, p = 2/64 < 0.05:
    supported. Counted as losses (the mutant) the three ties make n = 9 and p = 28/512 > 0.05."""
    a, b = _arms([3, 4, 5, 6, 7, 8, 1, 1, 1])

    def check():
        c = R.paired_comparison(a, b, R.THETA["raises"])
        assert (c["n"], c["equal"], c["above"], c["below"]) == (6, 3, 6, 0)
        assert c["p"] == pytest.approx(2 / 64)
        assert R.judge([c]) == ["supported (n = 6)"]

    orig = R.signed_rank_test
    ties_as_losses = lambda d: orig([x if abs(x) > 1e-9 else -1e-6 for x in d])
    _caught(monkeypatch, check, signed_rank_test=ties_as_losses)


def test_pairs_at_the_ceiling_are_dropped_and_all_at_the_ceiling_is_not_testable(monkeypatch):
    """Both arms within 0.05 points of 100 (or of 0): the pair is dropped, not a loss; only such pairs: not
    testable. One arm just outside the band keeps the pair. The mutant judges every pair."""
    orig = R.paired_comparison

    def check():
        a = {s: 100.0 for s in range(6)}
        b = {0: 100.0, 1: 99.96, 2: 100.0, 3: 99.99, 4: 100.0, 5: 99.95}
        c = R.paired_comparison(a, b, 1.0)
        assert (c["pairs"], c["at_bound"], c["n"]) == (6, 6, 0)
        assert R.judge([c]) == ["not testable (every pair at the metric's ceiling or floor)"]
        floor = R.paired_comparison({s: 0.0 for s in range(6)}, {s: 0.04 for s in range(6)}, 1.0)
        assert floor["n"] == 0 and R.judge([floor])[0].startswith("not testable")
        # six pairs at the ceiling beside six real wins: still supported on the six that can show a difference
        a2 = {s: 100.0 for s in range(12)}
        b2 = {s: (100.0 if s < 6 else 90.0 - s) for s in range(12)}
        c2 = R.paired_comparison(a2, b2, 1.0)
        assert (c2["n"], c2["at_bound"]) == (6, 6) and R.judge([c2]) == ["supported (n = 6)"]
        kept = R.paired_comparison({0: 100.0}, {0: 99.94}, 1.0)             # 0.06 below the ceiling: kept
        assert kept["n"] == 1 and kept["at_bound"] == 0

    no_bounds = lambda a, b, theta, lower_is_better=False, bounds=(0.0, 100.0): orig(
        a, b, theta, lower_is_better, bounds=(-math.inf, math.inf))
    _caught(monkeypatch, check, paired_comparison=no_bounds)


def test_one_seed_is_inconclusive(monkeypatch):
    """n = 1 is never supported or contradicted, however large the difference (the old single-seed rule, the
    mutant, called a difference above theta supported)."""
    def check():
        for d in (80.0, -80.0, 1.5):
            a, b = _arms([d])
            c = R.paired_comparison(a, b, 1.0)
            assert c["n"] == 1 and c["p"] == 1.0
            assert R.judge([c]) == ["inconclusive (n = 1)"]
        # five pairs all on one side still cannot reach p < 0.05 (2/32); six can (2/64)
        assert R.judge([R.paired_comparison(*_arms([9, 8, 7, 6, 5]), 1.0)]) == ["inconclusive (n = 5)"]
        assert R.judge([R.paired_comparison(*_arms([9, 8, 7, 6, 5, 4]), 1.0)]) == ["supported (n = 6)"]

    def single_seed_rule(family, alpha=R.ALPHA):
        return [("supported" if c["mean_diff"] > c["theta"] else "contradicted") + f" (n = {c['n']})"
                for c in family]
    _caught(monkeypatch, check, judge=single_seed_rule)


def test_a_one_sided_miss_is_contradicted(monkeypatch):
    """Twelve pairs all above 0 but below theta = 1 point: the two-sided test of d - theta rejects below, so
    'raises TNR by more than a point' is contradicted. Mutants: a one-sided test (only 'above theta' can be
    rejected) calls it inconclusive; a test of d instead of d - theta calls it supported."""
    a, b = _arms([0.1 + 0.07 * k for k in range(12)])             # 0.10 .. 0.87

    def check():
        c = R.paired_comparison(a, b, R.THETA["raises"])
        assert (c["n"], c["above"], c["below"]) == (12, 0, 12) and c["p"] == pytest.approx(2 / 4096)
        assert R.judge([c]) == ["contradicted (n = 12)"]

    orig_test, orig_pc = R.signed_rank_test, R.paired_comparison
    one_sided = lambda d: {**orig_test(d), "p": orig_test(d)["p_greater"]}
    _caught(monkeypatch, check, signed_rank_test=one_sided)
    no_theta = lambda a, b, theta, lower_is_better=False, bounds=(0.0, 100.0): orig_pc(a, b, 0.0, lower_is_better,
                                                                                       bounds)
    _caught(monkeypatch, check, paired_comparison=no_theta)


def test_lower_is_better_flips_the_difference(monkeypatch):
    """ECE: lower is better, d = B - A. Eight pairs where A's ECE is lower: supported; the mutant keeps A - B."""
    a = {s: 2.0 + 0.1 * s for s in range(8)}
    b = {s: 5.0 + 0.3 * s for s in range(8)}

    def check():
        c = R.paired_comparison(a, b, R.THETA["lower"], lower_is_better=True)
        assert c["mean_diff"] > 0 and R.judge([c]) == ["supported (n = 8)"]

    orig = R.paired_comparison
    ignore_lower = lambda a, b, theta, lower_is_better=False, bounds=(0.0, 100.0): orig(a, b, theta, False, bounds)
    _caught(monkeypatch, check, paired_comparison=ignore_lower)


def test_holm_across_a_family(monkeypatch):
    """Six pairs all above: p = 2/64 = 0.031 rejects alone, but not in a family of three (Holm's first step
    needs p <= 0.05 / 3). Holm's step-down on hand values: [0.012, 0.02, 0.5] -> reject, reject, keep
    (Bonferroni would keep the second). The mutant tests each claim at alpha."""
    win = R.paired_comparison(*_arms([9, 8, 7, 6, 5, 4]), 1.0)
    noise = R.paired_comparison(*_arms([3, -3, 4, -4, 5, -5]), 1.0)

    def check():
        assert R.judge([win]) == ["supported (n = 6)"]
        assert R.judge([win, noise, noise]) == ["inconclusive (n = 6)"] * 3
        assert R.holm([0.012, 0.02, 0.5]) == [True, True, False]
        assert R.holm([0.5, 0.012, 0.02]) == [False, True, True]
        assert R.holm([0.04, 0.02]) == [True, True] and R.holm([0.04, 0.03]) == [False, False]
        # claims with no pair to test do not count in the family
        none = R.paired_comparison({}, {}, 1.0)
        assert R.judge([win, none, none]) == ["supported (n = 6)", "not testable (runs missing)",
                                              "not testable (runs missing)"]

    _caught(monkeypatch, check, holm=lambda ps, alpha=R.ALPHA: [p <= alpha for p in ps])


def test_holm_adjusted_p_agrees_with_holm():
    rng = np.random.default_rng(1)
    for _ in range(200):
        ps = list(rng.uniform(0, 0.08, rng.integers(1, 8)))
        assert [q <= R.ALPHA for q in R.holm_adjusted(ps)] == R.holm(ps)


def test_min_pairs():
    """The smallest two-sided p with n pairs is 2/2^n: 6 pairs for one claim, 10 for 19, 12 for 59."""
    assert R.min_pairs(1) == 6 and R.min_pairs(19) == 10 and R.min_pairs(59) == 12


# ------------------------------------------------------------------------------------------------
# The quick mode's claims from fake runs: one seed decides nothing; twelve paired seeds can; ties never count.

def _fake_result(method, model, in_data, seed, tnr, acc=0.9, ece=0.05):
    """A results.json-like record: every OOD set of the mode with baseline / ODIN TNR `tnr(method, out, seed)`."""
    sets = [R.other("quick", in_data)] + list(R.ROLES["quick"]["unseen"])
    return {"accuracy": acc, "ece": ece, "ece_temperature_scaled": ece,
            "ood": {o: {d: {**{m: 0.5 for m in R.METRICS}, "auroc_tie_aware": 0.5,
                            "tnr_at_tpr95": tnr(method, o, seed, d)} for d in ("baseline", "odin")} for o in sets},
            "env": {"commit": "abc", "torch": "t", "python": "p", "device": "cpu"}, "seconds": 1.0}


def _claims_with(monkeypatch, tmp_path, seeds, tnr):
    monkeypatch.setitem(R.MODES, "quick", {**R.MODES["quick"], "seeds": tuple(seeds), "gan_seeds": tuple(seeds)})
    monkeypatch.setattr(R, "load_result", lambda run, mode, results: _fake_result(
        run.method, run.model, run.in_data, run.seed, tnr))
    return {c: (e, v) for c, _, e, v in R.claims("quick", tmp_path, {})}


def test_one_seed_gives_no_supported_or_contradicted_verdict(monkeypatch, tmp_path):
    tnr = lambda m, o, s, d: {"ce": 0.2, "conf": 0.99, "joint": 0.7, "conf-gan": 0.5}.get(m, 0.4)
    rows = _claims_with(monkeypatch, tmp_path, [0], tnr)
    assert len(rows) == 59
    kinds = collections.Counter(v for e, v in rows.values())
    # Table 3's ECE is equal in both arms here: a tie at theta 0, not testable, never a loss
    assert kinds == {"inconclusive (n = 1)": 57, "not testable (every pair at a bound or tied at the threshold)": 2}


def test_twelve_paired_seeds_decide(monkeypatch, tmp_path):
    """conf beats ce by 10 + seed points on the seen set: supported with 12 seeds; both at 100: not testable;
    conf-gan exactly 1 point (theta) below joint on every seed: every pair a tie, not testable, never a loss."""
    def tnr(m, o, s, d):
        if o == "mnist" or o == "fashion-mnist":
            return {"ce": 0.5 - s / 100, "conf": 0.6, "kplus1": 0.5}.get(m, 0.5) if o == "mnist" else 1.0
        return {"joint": 0.80, "conf-gan": 0.79}.get(m, 0.5)
    rows = _claims_with(monkeypatch, tmp_path, range(12), tnr)
    A, B = R.ROLES["quick"]["A"], R.ROLES["quick"]["B"]
    e, v = rows[f"Table 1 (vgg13): the confidence loss raises TNR@TPR95 on the seen OOD set ({A} vs {B})"]
    assert v == "supported (n = 12)" and "n = 12" in e and "p = 0.000488" in e
    e, v = rows[f"Table 1 (vgg13): the confidence loss raises TNR@TPR95 on the seen OOD set ({B} vs {A})"]
    assert v == "not testable (every pair at the metric's ceiling or floor)"
    e, v = rows[f"Figure 4: joint confidence loss beats the confidence loss with original-GAN samples on the "
                f"unseen set photos ({A}; TNR, baseline)"]
    assert v == "not testable (every pair at a bound or tied at the threshold)" and "12 tied" in e


def test_claims_from_runs_csv_equal_claims_from_results_json(tmp_path):
    """A committed results folder keeps runs.csv, not runs/: load_result falls back to its rows, and the claims
    (and tables) rendered from it are the ones rendered from the runs' results.json."""
    rng = np.random.default_rng(3)
    for run in R.all_runs("quick"):
        d = R.run_dir(run, "quick", tmp_path)
        d.mkdir(parents=True)
        res = _fake_result(run.method, run.model, run.in_data, run.seed,
                           lambda *a: float(rng.uniform(0, 1)), acc=float(rng.uniform()), ece=float(rng.uniform()))
        (d / "results.json").write_text(json.dumps(res))
    R.write_csv("quick", tmp_path)
    before = (R.claims("quick", tmp_path, {}), R.table1("quick", tmp_path), R.table3("quick", tmp_path))
    import shutil
    shutil.rmtree(tmp_path / "runs")
    assert R.load_result(R.vgg_runs("quick", "mnist", "ce")[0], "quick", tmp_path)["accuracy"] >= 0
    after = (R.claims("quick", tmp_path, {}), R.table1("quick", tmp_path), R.table3("quick", tmp_path))
    assert before == after
    text = (tmp_path / "runs.csv").read_text()
    R.write_csv("quick", tmp_path)                       # round trip: the CSV rewritten from itself is the same
    assert (tmp_path / "runs.csv").read_text() == text


# ------------------------------------------------------------------------------------------------
# Seeds in every mode

def test_parse_seeds():
    assert R.parse_seeds("0-2") == (0, 1, 2) and R.parse_seeds("0,3,5") == (0, 3, 5)
    assert R.parse_seeds("0-2,7,1") == (0, 1, 2, 7)
    for bad in ("", "a", "3-1", "1-", "-2"):
        with pytest.raises(ValueError, match="--seeds"):
            R.parse_seeds(bad)


def test_seeds_are_paired_across_regimes(monkeypatch):
    monkeypatch.setitem(R.MODES, "quick", dict(R.MODES["quick"]))
    R.set_seeds("quick", (0, 1, 2))
    by_method = collections.defaultdict(set)
    for r in R.plan("table2", "quick"):
        by_method[r.method].add(r.seed)
    assert dict(by_method) == {m: {0, 1, 2} for m in ("ce", "conf-gan", "joint", "conf")}
    assert {r.seed for r in R.plan("figure5", "quick")} == {0}                # the maps: one seed


def test_render_uses_every_finished_seed(monkeypatch, tmp_path):
    """Seeds found in runs/ join the render, finished or partial; a stage renders once each of its runs has
    one seed; Figure 5 draws a seed with all its runs."""
    monkeypatch.setitem(R.MODES, "quick", dict(R.MODES["quick"]))
    R.set_seeds("quick", (0, 1, 2))
    for run in R.plan("table3", "quick"):
        if run.seed != 2 or run.method == "ce":                               # seed 2: joint missing
            d = R.run_dir(run, "quick", tmp_path)
            d.mkdir(parents=True)
            (d / "results.json").write_text("{}")
    R.set_seeds("quick", (0,))
    R.seeds_to_render("quick", tmp_path)
    assert R.MODES["quick"]["seeds"] == (0, 1, 2) and R.MODES["quick"]["gan_seeds"] == (0, 1)
    assert R.renderable("table3", "quick", tmp_path) and not R.renderable("table2", "quick", tmp_path)
    R.set_seeds("quick", (0, 1, 2))
    assert not R.finished("table3", "quick", tmp_path) and R.renderable("table3", "quick", tmp_path)


def test_bad_seeds_exit_2(tmp_path):
    p = subprocess.run([sys.executable, "reproduce.py", "render", "--mode", "tiny", "--seeds", "2-1",
                        "--results", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "error: --seeds '2-1'" in p.stderr


# ------------------------------------------------------------------------------------------------
# The confirmatory study's renderer, on fake runs

GRID_T, GRID_E = [1.0, 1000.0], [0.0, 0.001]


def _grid(val_err, tnr):
    return {"temperatures": GRID_T, "epsilons": GRID_E, "val_detection_error": val_err,
            **{k: [[0.5, 0.5], [0.5, 0.5]] for k in R.METRICS}, "tnr_at_tpr95": tnr}


def _study_result(arm, seed, grid=True):
    """TNRs in [0, 1]: joint 20 + seed points above ce's baseline; ce's ODIN grid's test TNRs name the grid point
    (0.1 * (2t + j + 1)); validation errors make each set's own choice (1, 1) but the other sets' mean (0, 1)."""
    base = {"ce": 0.3, "joint": 0.5 + (seed % 100) / 1000, "joint-ema": 0.3 + 0.005 * (seed % 2)}[arm]
    ood = {}
    for s in R.CONFIRM_SETS:
        own = [[0.30, 0.20], [0.25, 0.01]] if s == "mnist" else [[0.30, 0.10], [0.30, 0.40]]
        if s == "uniform":
            own = [[0.30, 0.10], [0.30, 0.40]]
        ood[s] = {"baseline": {"tnr_at_tpr95": 1.0 if s == "uniform" else base},
                  "odin": {"tnr_at_tpr95": 0.35}}
        if grid:
            ood[s]["odin_grid"] = _grid(own, [[0.1, 0.2], [0.3, 0.4]])
    return {"accuracy": 0.80 + (0.0 if arm == "ce" else 0.001 * (seed % 100)), "ece": 0.05 - (0.01 if arm == "joint" else 0),
            "ood": ood}


def _write_study(root, seeds, arms=R.CONFIRM_ARMS, grid=True):
    for s in seeds:
        for a in arms:
            d = root / f"{a}-s{s}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "results.json").write_text(json.dumps(_study_result(a, s, grid)))


def test_odin_unseen_chooses_on_the_other_sets():
    """mnist's own validation errors pick (T 1000, eps 0.001) (TNR 0.4); the other three sets' mean picks
    (T 1, eps 0.001) (TNR 0.2). A tie in the mean keeps the first point in grid order (T, then eps)."""
    res = _study_result("ce", 100)
    assert R.odin_unseen(res, "mnist") == pytest.approx(0.2)
    for s in R.CONFIRM_SETS:
        res["ood"][s]["odin_grid"]["val_detection_error"] = [[0.3, 0.2], [0.2, 0.3]]
    assert R.odin_unseen(res, "gaussian") == pytest.approx(0.2)              # (0, 1) before (1, 0)
    del res["ood"]["photos"]["odin_grid"]
    with pytest.raises(KeyError):
        R.odin_unseen(res, "mnist")


def test_confirm_renderer_interim_and_complete(tmp_path):
    runs, earlier, out = tmp_path / "runs", tmp_path / "earlier", tmp_path / "out"
    _write_study(runs, range(100, 105))
    _write_study(runs, [105], arms=("ce", "joint"))                           # seed 105 lacks joint-ema
    _write_study(earlier, range(8), grid=False)
    rec = R.render_confirm(runs, out, earlier)
    assert rec["status"] == "interim (n = 5 of 12)" and rec["seeds_finished"] == [100, 101, 102, 103, 104]
    md = (out / "verdicts.md").read_text()
    assert md.startswith("# Confirmatory study: verdicts, interim (n = 5 of 12)")
    P = {r["id"]: r for r in rec["families"]["P"]}
    assert P["P1"]["n"] == 6 and P["P1"]["verdict"] == "inconclusive (n = 6)"    # 6 pairs: not under Holm of 12
    assert P["P3"]["verdict"] == "not testable (every pair at the metric's ceiling or floor)"
    assert P["P9"]["a_values"]["100"] == pytest.approx(50.0) and P["P9"]["b_values"]["100"] == pytest.approx(20.0)
    old = {r["id"]: r for r in rec["earlier"]["families"]["P"]}
    assert old["P9"]["verdict"].startswith("not testable (endpoint not recorded")
    assert old["P1"]["verdict"] == "inconclusive (n = 8)"                          # Holm across 10 testable
    assert "## Earlier evidence (seeds 0-7, NCHW)" in md
    # all twelve: complete, decided
    _write_study(runs, range(100, 112))
    rec = R.render_confirm(runs, out, None)
    assert rec["status"] == "complete (n = 12 of 12)" and "earlier" not in rec
    P = {r["id"]: r for r in rec["families"]["P"]}
    E = {r["id"]: r for r in rec["families"]["E"]}
    for k in ("P1", "P2", "P4", "P5", "P9", "P13", "P14"):
        assert P[k]["verdict"] == "supported (n = 12)" and P[k]["holm_rejected"], (k, P[k])
    assert P["P5"]["mean_diff"] == pytest.approx(15.0 + 5.5 / 10, abs=1e-6)   # joint 50 + s/10 vs ODIN 35
    assert E["E1"]["verdict"] == "contradicted (n = 12)"                      # +0 / +0.5: below theta = 1
    assert E["E5"]["verdict"] == "supported (n = 12)"
    assert json.loads((out / "verdicts.json").read_text())["status"] == "complete (n = 12 of 12)"
    assert "| P1 |" in (out / "verdicts.md").read_text()


def test_confirm_cli(tmp_path):
    runs = tmp_path / "runs"
    _write_study(runs, [100])
    p = subprocess.run([sys.executable, "reproduce.py", "confirm", "--runs", str(runs), "--out", str(tmp_path / "o"),
                        "--earlier", ""], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "interim (n = 1 of 12)" in p.stdout, p.stderr
    assert "inconclusive (n = 1)" in (tmp_path / "o" / "verdicts.md").read_text()
    p = subprocess.run([sys.executable, "reproduce.py", "confirm", "--runs", str(tmp_path / "none")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "error: --runs" in p.stderr
    (runs / "ce-s101").mkdir()
    (runs / "ce-s101" / "results.json").write_text("{")
    p = subprocess.run([sys.executable, "reproduce.py", "confirm", "--runs", str(runs), "--out", str(tmp_path / "o"),
                        "--earlier", ""], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "ce-s101/results.json: not a finished run's results.json" in p.stderr


def test_results_readme_quotes_the_confirmatory_study(tmp_path):
    """results/README.md carries the study's verdicts with n from confirm/verdicts.json, and nothing without it."""
    assert R.confirm_section(tmp_path) == []
    runs = tmp_path / "runs"
    _write_study(runs, range(100, 112))
    R.render_confirm(runs, tmp_path / "confirm", None)
    text = "\n".join(R.confirm_section(tmp_path))
    assert "paired seeds, complete (n = 12 of 12)" in text and "seeds 100-111 paired" in text
    assert "| P1 | Figure 4: joint raises the baseline detector's TNR over ce (mnist) | 12 |" in text
    assert "| P3 |" in text and "| not testable" in text                      # both arms at the ceiling: no n
    assert "| E1 |" in text and "contradicted (n = 12)" in text
    rec = json.loads((tmp_path / "confirm" / "verdicts.json").read_text())
    verdicts = [r["verdict"].split(" (")[0] for rows in rec["families"].values() for r in rows]
    assert f"**{verdicts.count('supported')} supported**" in text and verdicts.count("supported") > 0
