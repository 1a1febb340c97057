"""Metrics: `ood_metrics` against a literal transcription of the authors' evaluation loops (calculate_log.py),
the tie-aware AUROC against Mann-Whitney, ECE against a loop over bins, and temperature scaling."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from confident import ConfidentError, expected_calibration_error, fit_temperature, ood_metrics

KEYS = ("tnr_at_tpr95", "auroc", "detection_acc", "aupr_in", "aupr_out")


# ------------------------------------------------------------------------------------------------
# The reference: the five functions of the authors' calculate_log.py (tpr95, auroc, detection, auprIn,
# auprOut) written out as they run, one Python loop per metric and one threshold per iteration. Their edges:
# thresholds np.arange(start, end, gap) from the smallest score up to but excluding the largest (the AUPR-out
# sweep runs down from the largest score to just above the smallest), FPR = 1 when no threshold has TPR in
# [0.94, 0.96], `continue` (auprIn) and `break` (auprOut) when TP + FP = 0, recall * precision added after the
# AUPR loops and nothing after the AUROC loop. They use G = 200,000 thresholds; the tests use fewer.
# `auroc_odin` is the one line by which ODIN's calMetric.py differs: it adds FPR * TPR after its loop.

def authors_loop(score_in, score_out, G=2003):
    s_in, s_out = np.asarray(score_in, np.float64), np.asarray(score_out, np.float64)
    n_in, n_out = float(len(s_in)), float(len(s_out))
    end = max(s_in.max(), s_out.max())
    start = min(s_in.min(), s_out.min())
    gap = (end - start) / G

    # tpr95: FPR averaged over the thresholds with 0.94 <= TPR <= 0.96
    fpr_sum, total = 0.0, 0
    for delta in np.arange(start, end, gap):
        tpr = np.sum(s_in >= delta) / n_in
        fpr = np.sum(s_out > delta) / n_out
        if 0.94 <= tpr <= 0.96:
            fpr_sum += fpr
            total += 1
    fpr95 = 1.0 if total == 0 else fpr_sum / total

    # auroc
    auroc, fpr_prev = 0.0, 1.0
    for delta in np.arange(start, end, gap):
        tpr = np.sum(s_in >= delta) / n_in
        fpr = np.sum(s_out > delta) / n_out
        auroc += (fpr_prev - fpr) * tpr
        fpr_prev = fpr
    auroc_odin = auroc + fpr * tpr

    # detection
    error = 1.0
    for delta in np.arange(start, end, gap):
        miss = np.sum(s_in < delta) / n_in
        false_alarm = np.sum(s_out > delta) / n_out
        error = min(error, (miss + false_alarm) / 2.0)

    # auprIn
    aupr_in, recall_prev = 0.0, 1.0
    for delta in np.arange(start, end, gap):
        tp = np.sum(s_in >= delta) / n_in
        fp = np.sum(s_out >= delta) / n_out
        if tp + fp == 0:
            continue
        precision, recall = tp / (tp + fp), tp
        aupr_in += (recall_prev - recall) * precision
        recall_prev = recall
    aupr_in += recall * precision

    # auprOut: OOD is the positive class, score below the threshold
    aupr_out, recall_prev = 0.0, 1.0
    for delta in np.arange(end, start, -gap):
        fp = np.sum(s_in < delta) / n_in
        tp = np.sum(s_out < delta) / n_out
        if tp + fp == 0:
            break
        precision, recall = tp / (tp + fp), tp
        aupr_out += (recall_prev - recall) * precision
        recall_prev = recall
    aupr_out += recall * precision

    return dict(tnr_at_tpr95=1.0 - fpr95, auroc=auroc, detection_acc=1.0 - error, aupr_in=aupr_in,
                aupr_out=aupr_out, auroc_odin=auroc_odin)


def assert_loop_limit(si, so, G=2003):
    """`ood_metrics` is the limit of the loops as G grows. Between two consecutive distinct scores every threshold
    sees the same rates, so once each such interval holds thresholds (W = shortest interval / gap >= 2) and no
    threshold but the first lands on a score, AUROC, detection accuracy and both AUPRs (which change only when the
    sweep crosses a score) already equal their limit. TNR averages FPR over the thresholds in the band, and each
    interval holds length / gap thresholds give or take one, so the loop is within 1 / (W - 1) of the limit."""
    si, so = np.asarray(si, np.float64), np.asarray(so, np.float64)
    values = np.unique(np.concatenate([si, so]))
    gap = (values[-1] - values[0]) / G
    up = np.arange(values[0], values[-1], gap)
    # a threshold exactly on a tied score is a measure-zero event that the rectangles nevertheless weigh fully
    # (TPR counts the tie, FPR does not); the data and G must avoid it, as continuous softmax scores do
    assert not np.isin(up[1:], values).any(), "a threshold lands on a score: choose another G"
    W = np.diff(values).min() / gap
    assert W >= 2, f"only {W:.1f} thresholds between the closest scores: the grid is too coarse for this data"
    got, want = ood_metrics(si, so), authors_loop(si, so, G)
    for k in ("auroc", "detection_acc", "aupr_in", "aupr_out"):
        assert got[k] == pytest.approx(want[k], abs=1e-12), (k, got[k], want[k])
    assert got["tnr_at_tpr95"] == pytest.approx(want["tnr_at_tpr95"], abs=1 / (W - 1)), (got, want)
    return got, want


def _mann_whitney(si, so):
    si, so = np.asarray(si, np.float64), np.asarray(so, np.float64)
    gt = (si[:, None] > so[None, :]).sum()
    eq = (si[:, None] == so[None, :]).sum()
    return (gt + 0.5 * eq) / (len(si) * len(so))


# ------------------------------------------------------------------------------------------------
# ood_metrics vs the authors' loops

def test_authors_loop_by_hand_with_a_tie_at_the_top():
    """in = {0, 1, 1}, out = {0, 0.5, 1}. Thresholds: 0 (TPR 1, FPR 2/3), then (0, 0.5) (TPR 2/3, FPR 2/3), then
    (0.5, 1) (TPR 2/3, FPR 1/3); the sweep stops below 1. AUROC = 1/3 * 1 + 1/3 * 2/3 = 5/9; ODIN's convention
    adds 1/3 * 2/3 (P_out(1) * P_in(1)) for 7/9; the tie-aware AUROC is 5.5/9."""
    si, so = [0.0, 1.0, 1.0], [0.0, 0.5, 1.0]
    want = authors_loop(si, so)
    hand = dict(tnr_at_tpr95=0.0,                     # TPR is 1 or 2/3: no threshold in the band, FPR = 1
                auroc=5 / 9, detection_acc=2 / 3, aupr_in=1 / 6 + 4 / 9, aupr_out=2 / 9 + 1 / 6 + 1 / 6)
    for k, v in hand.items():
        assert want[k] == pytest.approx(v, abs=1e-12), k
    assert want["auroc_odin"] == pytest.approx(7 / 9, abs=1e-12)
    got, _ = assert_loop_limit(si, so)
    assert got["auroc"] == pytest.approx(5 / 9, abs=1e-12)
    assert got["auroc_tie_aware"] == pytest.approx(5.5 / 9, abs=1e-12)


def test_tnr_averages_fpr_over_the_band_by_threshold_length_by_hand():
    """The authors average FPR over evenly spaced thresholds, so each stretch of scores with one FPR counts by its
    length. In: 0, .02, .04, .06, .10, .11 and 94 x .9; out: 50 x .05, 50 x .5. TPR is in [0.94, 0.96] for
    thresholds in (.06, .9), where FPR is 0.5 below .5 (length .44) and 0 from .5 (length .40): TNR = 1 - 0.5 *
    .44 / .84 = 31/42. An average over the four distinct (TPR, FPR) stretches instead would give 0.625."""
    si = [0, .02, .04, .06, .10, .11] + [.9] * 94
    so = [.05] * 50 + [.5] * 50
    assert ood_metrics(si, so)["tnr_at_tpr95"] == pytest.approx(31 / 42, abs=1e-9)
    assert authors_loop(si, so, G=20_011)["tnr_at_tpr95"] == pytest.approx(31 / 42, abs=1e-3)


def test_tie_aware_aupr_credits_a_tied_group_at_once_by_hand():
    """Every OOD score one tied value with an in-distribution score below it (the main job's Gaussian noise): the
    authors' downward sweep multiplies each drop in recall by the precision after it, so the tie adds nothing and
    AUPR-out is 0. With each distinct score a threshold, by hand (OOD positive, lowest scores first): 0.05 (one of
    four in-scores) recall 0; 0.1 (all five OOD) recall 1, precision 1 / (1 + 1/4) = 0.8: AP 0.8. AUPR-in (highest
    first): 0.9 (three in) recall 3/4, precision 1; 0.1 adds no in-score; 0.05 recall 1, precision 1 / (1 + 1) =
    0.5: AP 3/4 + 1/4 * 1/2 = 0.875."""
    si, so = [0.05, 0.9, 0.9, 0.9], [0.1] * 5
    m = ood_metrics(si, so)
    assert m["aupr_out"] == pytest.approx(authors_loop(si, so)["aupr_out"], abs=1e-9) == 0.0
    assert m["aupr_out_tie_aware"] == pytest.approx(0.8)
    assert m["aupr_in_tie_aware"] == pytest.approx(0.875)
    # without ties, AP over distinct scores and the authors' rectangles meet as the sets grow
    g = np.random.default_rng(4)
    si, so = g.normal(1, 1, 4000), g.normal(0, 1, 3000)
    m = ood_metrics(si, so)
    assert m["aupr_in_tie_aware"] == pytest.approx(m["aupr_in"], abs=1e-3)
    assert m["aupr_out_tie_aware"] == pytest.approx(m["aupr_out"], abs=1e-3)


def test_saturated_top_follows_the_authors_not_odin():
    """Max-softmax scores with 60% of the in- and 20% of the OOD scores exactly 1.0: the authors' loop gives
    AUROC 0.7688; ODIN's calMetric.py convention adds P_in(1) * P_out(1) = 0.12 for 0.8888."""
    si = np.concatenate([np.ones(30), np.arange(30, 50) / 50])              # 1.0 (60%) and 0.60, 0.62, ..., 0.98
    so = np.concatenate([np.ones(10), np.arange(2, 42) / 50])               # 1.0 (20%) and 0.04, 0.06, ..., 0.82
    got, want = assert_loop_limit(si, so, G=5003)
    assert got["auroc"] == pytest.approx(0.7688, abs=1e-12)
    assert want["auroc_odin"] - want["auroc"] == pytest.approx(0.6 * 0.2, abs=1e-12)
    assert abs(got["auroc"] - want["auroc_odin"]) > 0.1
    assert got["auroc_tie_aware"] == pytest.approx(_mann_whitney(si, so), abs=1e-12)


SMALL_SETS = {
    "ties at the top": ([0.2, 0.9, 0.9, 0.9], [0.1, 0.5, 0.9]),
    "top held by OOD only": ([0.1, 0.4], [0.4, 1.0, 1.0]),
    "ties at the bottom": ([0.0, 0.0, 0.5, 1.0], [0.0, 0.25, 0.25]),
    "ties at both ends": ([0.0, 0.5, 1.0, 1.0, 1.0], [0.0, 0.0, 0.75, 1.0]),
    "one in-score value": ([0.5, 0.5, 0.5, 0.5], [0.25, 0.5, 0.75]),
    "single scores": ([0.8], [0.3]),
    "TPR 95% reached": ([0.1] + [0.2] * 3 + [0.6] * 10 + [1.0] * 6, [0.1, 0.2, 0.2, 0.4, 0.6, 1.0]),
}


@pytest.mark.parametrize("name", SMALL_SETS)
def test_ood_metrics_is_the_loop_limit_on_small_sets(name):
    si, so = SMALL_SETS[name]
    got, want = assert_loop_limit(si, so)
    p_top = np.mean(np.equal(si, max(si + so))) * np.mean(np.equal(so, max(si + so)))
    assert want["auroc_odin"] - got["auroc"] == pytest.approx(p_top, abs=1e-12)


@pytest.mark.parametrize("n_in,n_out,shift", [(300, 500, 15), (500, 300, 30), (400, 400, 0), (300, 500, -10)])
def test_ood_metrics_is_the_loop_limit_on_a_coarse_lattice(n_in, n_out, shift):
    rng = np.random.default_rng(n_in + n_out + shift)
    # integers 0..50 / 50: plenty of ties; G prime, so no threshold but the first lands on a score
    si = np.clip(rng.normal(27 + shift / 4, 9, n_in).round(), 0, 50) / 50
    so = np.clip(rng.normal(27 - shift / 4, 9, n_out).round(), 0, 50) / 50
    got, want = assert_loop_limit(si, so, G=5003)
    assert 0 < got["auroc"] < 1 and 0.5 <= got["detection_acc"] <= 1


def test_loop_tnr_converges_to_ood_metrics():
    """Four metrics equal the loop at every grid fine enough; TNR approaches it within 1 / (W - 1)."""
    rng = np.random.default_rng(10)
    si = rng.integers(10, 51, 200) / 50
    so = rng.integers(0, 41, 150) / 50
    for G in (1009, 4001, 16001):
        assert_loop_limit(si, so, G)


def test_ood_metrics_is_the_loop_limit_with_ties_at_the_smallest_score():
    """The first threshold is the smallest score itself: with ties there (in and out), TPR there is 1 while the
    next interval's TPR is not: the first AUROC rectangle must use TPR = 1."""
    rng = np.random.default_rng(9)
    si = np.concatenate([np.zeros(10), rng.integers(1, 51, 290) / 50])       # 3.3%: TPR still meets the band
    so = np.concatenate([np.zeros(200), rng.integers(1, 40, 300) / 50])
    got, want = assert_loop_limit(si, so, G=5003)
    assert got["auroc_tie_aware"] == pytest.approx(_mann_whitney(si, so), abs=1e-12)


def test_ood_metrics_is_the_loop_limit_on_continuous_scores():
    rng = np.random.default_rng(1)
    si, so = rng.beta(5, 2, 150), rng.beta(2, 3, 200)
    # continuous scores: some intervals are narrower than the grid's gap, so the loop is only close
    got, want = ood_metrics(si, so), authors_loop(si, so, G=20_011)
    for k in ("auroc", "detection_acc", "aupr_in", "aupr_out"):
        assert got[k] == pytest.approx(want[k], abs=3e-3), k
    assert got["tnr_at_tpr95"] == pytest.approx(want["tnr_at_tpr95"], abs=2e-2)


def test_ood_metrics_is_the_loop_limit_with_saturated_ties_at_one():
    """Over-confident softmax: many scores exactly 1.0 in both sets (the sweep never reaches the max)."""
    rng = np.random.default_rng(2)
    si = np.concatenate([np.ones(120), rng.integers(25, 51, 180) / 50])
    so = np.concatenate([np.ones(350), rng.integers(15, 51, 150) / 50])
    rng.shuffle(si)
    rng.shuffle(so)
    got, want = assert_loop_limit(si, so, G=5003)
    # a tie-sensitive case: the authors' convention, ODIN's and the tie-aware one all disagree clearly
    assert abs(got["auroc"] - got["auroc_tie_aware"]) > 0.05
    p_top_in, p_top_out = np.mean(si == 1.0), np.mean(so == 1.0)
    assert want["auroc_odin"] - got["auroc"] == pytest.approx(p_top_in * p_top_out, abs=1e-12)
    assert got["auroc_tie_aware"] == pytest.approx(_mann_whitney(si, so), abs=1e-12)


def test_ood_metrics_all_saturated_out_set():
    """Every OOD score is exactly 1.0, and 10% of the in scores: the paper's 'AUROC far below 50% while detection
    accuracy is 50%' case. The sweep stops below 1.0, so FPR is 1 at every threshold and AUROC is 0 (ODIN's
    convention would add FPR * TPR = P(in = 1.0) = 0.1 after the loop)."""
    rng = np.random.default_rng(3)
    si = np.concatenate([np.ones(30), rng.integers(10, 50, 270) / 50])
    so = np.ones(500)
    got, want = assert_loop_limit(si, so, G=5003)
    assert got["auroc"] == pytest.approx(0.0, abs=1e-12)
    assert want["auroc_odin"] == pytest.approx(0.1, abs=1e-12)
    assert got["detection_acc"] == pytest.approx(0.5, abs=1e-12)
    assert got["tnr_at_tpr95"] == pytest.approx(0.0, abs=1e-12)
    assert got["auroc_tie_aware"] == pytest.approx(0.05, abs=1e-12)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_ood_metrics_all_scores_equal():
    """One score value in both sets: the authors' gap is 0 and np.arange cannot step by it; ours returns 0.5 for
    AUROC, detection accuracy and the AUPRs and 0 for TNR."""
    with pytest.raises((ZeroDivisionError, ValueError)):
        authors_loop(np.full(5, 0.7), np.full(8, 0.7))
    got = ood_metrics(np.full(5, 0.7), np.full(8, 0.7))
    assert got == dict(tnr_at_tpr95=0.0, auroc=0.5, detection_acc=0.5, aupr_in=0.5, aupr_out=0.5,
                       auroc_tie_aware=0.5,             # one tied group: half of every pair
                       aupr_in_tie_aware=0.5, aupr_out_tie_aware=0.5,   # one threshold, precision 1 / (1 + 1)
                       fpr95_pytorch_ood=1.0, fpr95_openood=1.0)        # ROC (0, 0), (1, 1): the second point
    si, so = np.full(5, 0.7), np.full(8, 0.7)
    assert got["fpr95_pytorch_ood"] == pytest.approx(pytorch_ood_fpr_at_tpr(si, so))
    assert got["fpr95_openood"] == pytest.approx(openood_fpr_recall(si, so))


def test_ood_metrics_perfect_separation_all_one():
    rng = np.random.default_rng(4)
    si, so = rng.uniform(0.6, 1.0, 300), rng.uniform(0.0, 0.4, 500)
    got = ood_metrics(si, so)
    for k in KEYS:
        assert got[k] == pytest.approx(1.0, abs=1e-12), k
    assert got["auroc_tie_aware"] == 1.0
    want = authors_loop(si, so, G=2003)
    for k in KEYS:
        assert want[k] == pytest.approx(1.0, abs=1e-9), k


def test_ood_metrics_reversed_separation():
    rng = np.random.default_rng(5)
    si, so = rng.uniform(0.0, 0.4, 300), rng.uniform(0.6, 1.0, 500)
    got = ood_metrics(si, so)
    want = authors_loop(si, so, G=2003)
    for k in KEYS:
        assert got[k] == pytest.approx(want[k], abs=3e-3), k
    assert got["tnr_at_tpr95"] == pytest.approx(0.0, abs=1e-12)
    assert got["auroc"] == pytest.approx(0.0, abs=1e-12)
    assert got["detection_acc"] == pytest.approx(0.5, abs=1e-12)
    assert got["auroc_tie_aware"] == 0.0


def test_ood_metrics_accepts_tensors_and_lists():
    rng = np.random.default_rng(6)
    si, so = rng.uniform(0.3, 1, 200), rng.uniform(0, 0.8, 250)
    a = ood_metrics(si, so)
    b = ood_metrics(torch.from_numpy(si).float(), torch.from_numpy(so).float())
    c = ood_metrics(list(si), list(so))
    for k in KEYS:
        assert a[k] == pytest.approx(b[k], abs=1e-6) and a[k] == c[k]


@pytest.mark.parametrize("bad", [np.array([0.1, np.nan, 0.3]), np.array([0.2, np.inf]), np.array([])])
def test_ood_metrics_bad_scores_raise(bad):
    good = np.array([0.1, 0.5, 0.9])
    with pytest.raises(ConfidentError, match="scores"):
        ood_metrics(bad, good)
    with pytest.raises(ConfidentError, match="OOD scores"):
        ood_metrics(good, bad)
    with pytest.raises(ConfidentError):
        ood_metrics(torch.tensor(bad), torch.tensor(good))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_tie_aware_is_mann_whitney(seed):
    rng = np.random.default_rng(seed)
    si = rng.integers(0, 20, 157) / 20
    so = rng.integers(0, 25, 211) / 25
    assert ood_metrics(si, so)["auroc_tie_aware"] == pytest.approx(_mann_whitney(si, so), abs=1e-12)


@pytest.mark.parametrize("transform", [lambda s: 3 * s - 7, np.exp, lambda s: np.log(s + 1e-3), lambda s: s ** 3])
def test_ood_metrics_invariant_to_monotone_transform(transform):
    rng = np.random.default_rng(7)
    si = np.round(rng.beta(4, 2, 300), 2)
    so = np.round(rng.beta(2, 3, 400), 2)
    a, b = ood_metrics(si, so), ood_metrics(transform(si), transform(so))
    for k in ("auroc", "detection_acc", "aupr_in", "aupr_out", "auroc_tie_aware"):
        assert a[k] == pytest.approx(b[k], abs=1e-9), k
    # TNR averages over threshold *positions*, so only an affine map leaves it exactly unchanged
    c = ood_metrics(3 * si - 7, 3 * so - 7)
    assert a["tnr_at_tpr95"] == pytest.approx(c["tnr_at_tpr95"], abs=1e-9)


def test_ood_metrics_rates_weigh_sets_equally():
    """Precision from rates: duplicating every OOD score changes nothing."""
    rng = np.random.default_rng(8)
    si, so = np.round(rng.uniform(0.2, 1, 300), 2), np.round(rng.uniform(0, 0.8, 200), 2)
    a, b = ood_metrics(si, so), ood_metrics(si, np.tile(so, 5))
    for k in KEYS:
        assert a[k] == pytest.approx(b[k], abs=1e-12), k


# ------------------------------------------------------------------------------------------------
# Calibration

def _ece_bruteforce(probs, labels, M=20):
    probs = torch.as_tensor(probs).float()
    conf, pred = probs.max(1)
    n, total = len(labels), 0.0
    for m in range(1, M + 1):
        in_bin = (conf > (m - 1) / M) & (conf <= m / M)
        if in_bin.any():
            acc = (pred[in_bin] == labels[in_bin]).float().mean().item()
            avg = conf[in_bin].double().mean().item()
            total += in_bin.sum().item() / n * abs(acc - avg)
    return total


@pytest.mark.parametrize("K,scale", [(10, 1.0), (10, 4.0), (3, 2.0), (100, 3.0)])
def test_ece_matches_bruteforce(K, scale):
    z = torch.randn(2000, K) * scale
    y = torch.randint(0, K, (2000,))
    y[:1000] = z[:1000].argmax(1)                              # half right by construction
    p = torch.softmax(z, 1)
    assert expected_calibration_error(p, y) == pytest.approx(_ece_bruteforce(p, y), abs=1e-6)


def test_ece_bin_edges_are_right_closed():
    # bins are (m-1)/M < conf <= m/M: 0.75 (wrong) sits in bin 15, the next float32 above it (right) in bin 16
    above = float(np.nextafter(np.float32(0.75), np.float32(1)))
    conf = torch.tensor([0.5, 0.75, above, 1.0, 0.625])
    probs = torch.stack([conf, 1 - conf], 1)                  # K = 2, prediction is class 0 everywhere
    labels = torch.tensor([0, 1, 0, 0, 0])
    got = expected_calibration_error(probs, labels)
    assert got == pytest.approx(_ece_bruteforce(probs, labels), abs=1e-7)
    # one sample per bin: ECE = mean |correct - conf|
    want = (abs(1 - 0.5) + abs(0 - 0.75) + abs(1 - above) + abs(1 - 1.0) + abs(1 - 0.625)) / 5
    assert got == pytest.approx(want, abs=1e-7)
    # had 0.75 and its neighbour shared a bin, the result would be 0.25 * 2 / 5 for that bin instead
    assert abs(got - (0.5 + 2 * abs(0.5 - (0.75 + above) / 2) + 0 + 0.375) / 5) > 0.05


@pytest.mark.parametrize("edge", [0.9, 0.95])
def test_ece_score_just_above_an_edge_where_float32_products_round_onto_it(edge):
    """The next float32 above 0.9 (0.90000004) times 20 rounds to exactly 18.0 in float32: a bin index computed in
    float32 would put it in (0.85, 0.9] beside 0.9 itself. One sample per bin: ECE = mean |correct - conf|."""
    at = float(np.float32(edge))                                # 0.89999998 <= 0.9: the bin below the edge
    above = float(np.nextafter(np.float32(edge), np.float32(1)))
    assert np.float32(above) * np.float32(20) == np.float32(round(edge * 20))   # the rounding this is about
    conf = torch.tensor([at, above])
    probs = torch.stack([conf, 1 - conf], 1)
    labels = torch.tensor([1, 0])                               # the first wrong, the second right
    want = (abs(0 - at) + abs(1 - above)) / 2                   # 0.5; sharing a bin would give |0.5 - conf| = 0.4
    assert expected_calibration_error(probs, labels) == pytest.approx(want, abs=1e-7)
    assert expected_calibration_error(probs, labels) == pytest.approx(_ece_bruteforce(probs, labels), abs=1e-7)


def test_ece_perfectly_calibrated_construction_is_near_zero():
    g = torch.Generator().manual_seed(3)
    n, K = 200_000, 5
    z = torch.randn(n, K, generator=g) * 2
    p = torch.softmax(z, 1)
    y = torch.multinomial(p, 1, generator=g)[:, 0]             # labels drawn from the predicted distribution
    ece = expected_calibration_error(p, y)
    assert ece < 0.01
    # and a badly over-confident version of the same model is far from calibrated
    assert expected_calibration_error(torch.softmax(4 * z, 1), y) > 0.1


def test_ece_bad_input_raises():
    with pytest.raises(ConfidentError):
        expected_calibration_error(torch.rand(5, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ConfidentError):
        expected_calibration_error(torch.rand(3, 3), torch.tensor([0, 1, 3]))
    with pytest.raises(ConfidentError):
        expected_calibration_error(torch.rand(0, 3), torch.tensor([], dtype=torch.long))


def _nll(z, y, T):
    return float(F.cross_entropy(z.double() / T, y))


@pytest.mark.parametrize("T0", [0.5, 2.5])
def test_fit_temperature_recovers_known_temperature(T0):
    """Labels drawn from softmax(z); the classifier reports z * T0, so dividing by T = T0 restores the true
    distribution and is the NLL-optimal temperature (up to sampling noise)."""
    g = torch.Generator().manual_seed(int(T0 * 10))
    n, K = 6000, 10
    z = torch.randn(n, K, generator=g, dtype=torch.float64) * 2
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g)[:, 0]
    logits = (z * T0).float()
    T = fit_temperature(logits, y)
    assert T == pytest.approx(T0, rel=0.1)
    # the fitted T is the optimum of a fine grid search (coarse grid, then a fine one around its minimum) ...
    coarse = np.exp(np.linspace(math.log(0.05), math.log(50), 121))
    t_c = coarse[int(np.argmin([_nll(logits, y, t) for t in coarse]))]
    fine = np.linspace(t_c * 0.93, t_c * 1.07, 141)
    nlls = [_nll(logits, y, t) for t in fine]
    T_grid = fine[int(np.argmin(nlls))]
    assert T == pytest.approx(T_grid, rel=2e-3)
    assert _nll(logits, y, T) <= min(nlls) + 1e-9
    # ... and lowers NLL against no scaling
    assert _nll(logits, y, T) < _nll(logits, y, 1.0) - 1e-2


def test_fit_temperature_is_one_for_calibrated_logits():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(6000, 10, generator=g) * 2
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g)[:, 0]
    assert fit_temperature(z, y) == pytest.approx(1.0, rel=0.1)


# ------------------------------------------------------------------------------------------------
# FPR at TPR 95% as the two libraries most PyTorch users compare with compute it, each transcribed from its own
# code (written out here from reading it). Both treat OOD as the positive class and take an outlier score
# (higher = more OOD); ours is -score.
#
# pytorch-ood, src/pytorch_ood/utils/metrics.py: `OODMetrics._compute` maps OOD (label < 0) to 1 and ID to 0 and
# calls `fpr_at_tpr(scores, labels)`, which takes torchmetrics' `binary_roc(pred, target)` (functional/
# classification/roc.py `_binary_roc_compute` on precision_recall_curve.py `_binary_clf_curve`: predictions
# outside [0, 1] go through a sigmoid; sorted descending; one point per distinct value with cumulative TP and
# FP counts; a (0, 0) point prepended; TPR = TP / TP[-1], FPR = FP / FP[-1]), then
# idx = torch.searchsorted(tpr, 0.95) (the first TPR >= 0.95) and returns fpr[idx] (fpr[idx - 1] if idx is past
# the end). No interpolation.

def pytorch_ood_fpr_at_tpr(score_in, score_out, k=0.95):
    outlier = -torch.cat([torch.as_tensor(score_in, dtype=torch.float64),
                          torch.as_tensor(score_out, dtype=torch.float64)])
    target = torch.cat([torch.zeros(len(score_in), dtype=torch.long), torch.ones(len(score_out), dtype=torch.long)])
    # OODMetrics._compute: a stable sort first
    outlier, idx = torch.sort(outlier, stable=True)
    target = target[idx]
    # binary_roc -> _binary_precision_recall_curve_format: sigmoid unless every prediction is in [0, 1]
    preds = outlier
    if not torch.all((0 <= preds) * (preds <= 1)):
        preds = preds.sigmoid()
    # _binary_clf_curve
    order = torch.argsort(preds, descending=True)
    preds, target = preds[order], target[order]
    distinct = torch.where(preds[1:] - preds[:-1])[0]
    threshold_idxs = F.pad(distinct, [0, 1], value=target.size(0) - 1)
    tps = torch.cumsum(target, dim=0)[threshold_idxs]
    fps = 1 + threshold_idxs - tps
    # _binary_roc_compute
    tps = torch.cat([torch.zeros(1, dtype=tps.dtype), tps])
    fps = torch.cat([torch.zeros(1, dtype=fps.dtype), fps])
    fpr, tpr = fps / fps[-1], tps / tps[-1]
    # fpr_at_tpr
    i = torch.searchsorted(tpr, k)
    if i == fpr.shape[0]:
        return float(fpr[i - 1])
    return float(fpr[i])


# OpenOOD v1.5, openood/evaluators/metrics.py `auc_and_fpr_recall(conf, label, tpr_th)`: ood_indicator = 1 where
# label == -1; `fpr_list, tpr_list, _ = sklearn.metrics.roc_curve(ood_indicator, -conf)`;
# fpr = fpr_list[np.argmax(tpr_list >= tpr_th)] with tpr_th = 0.95. scikit-learn's roc_curve (metrics/_ranking.py)
# with its default drop_intermediate=True: `_binary_clf_curve` (stable descending sort, the last index of each
# distinct value, cumulative TP, FP = 1 + index - TP), then the points whose second differences of FP and TP are
# both 0 are dropped (first and last kept), then a (0, 0) point is prepended; FPR = FP / FP[-1], TPR = TP / TP[-1].

def openood_fpr_recall(score_in, score_out, tpr_th=0.95):
    conf = np.concatenate([np.asarray(score_in, np.float64), np.asarray(score_out, np.float64)])
    label = np.concatenate([np.zeros(len(score_in), int), np.full(len(score_out), -1)])
    ood_indicator = np.zeros_like(label)
    ood_indicator[label == -1] = 1
    y_true, y_score = ood_indicator, -conf
    # _binary_clf_curve
    desc = np.argsort(y_score, kind="mergesort")[::-1]
    y_score, y_true = y_score[desc], y_true[desc]
    distinct_value_indices = np.where(np.diff(y_score))[0]
    threshold_idxs = np.r_[distinct_value_indices, y_true.size - 1]
    tps = np.cumsum(y_true * 1.0)[threshold_idxs]
    fps = 1 + threshold_idxs - tps
    # roc_curve, drop_intermediate=True
    if len(fps) > 2:
        optimal_idxs = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        fps, tps = fps[optimal_idxs], tps[optimal_idxs]
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    fpr_list, tpr_list = fps / fps[-1], tps / tps[-1]
    return float(fpr_list[np.argmax(tpr_list >= tpr_th)])


def _peer_cases():
    rng = np.random.default_rng(11)
    yield rng.normal(1, 1, 200), rng.normal(0, 1, 150)                     # continuous, distinct
    yield rng.random(1000), rng.random(37)                                  # overlapping, unequal sizes
    yield rng.integers(0, 6, 300) / 5, rng.integers(0, 4, 90) / 5           # heavy ties, in [0, 1]: no sigmoid
    yield np.minimum(1, rng.random(400) * 3), np.minimum(1, rng.random(100) * 1.2)   # saturated tops tied at 1
    yield rng.normal(5, 2, 20), rng.normal(3, 2, 20)                        # 19/20 = 0.95 exactly reachable
    yield rng.normal(0, 1, 64), rng.normal(3, 1, 64)                        # OOD-high scores: near-total failure
    # a tie group straddling 95% OOD recall inside a straight stretch of the ROC: scikit-learn drops that point
    yield np.r_[np.full(18, 5.0), [0.1, 0.2]], np.r_[np.full(18, -5.0), [0.1, 0.2]]


@pytest.mark.parametrize("case", range(7))
def test_fpr95_matches_pytorch_ood_and_openood(case):
    si, so = list(_peer_cases())[case]
    got = ood_metrics(si, so)
    # torchmetrics divides integer counts into float32 rates: equal to float32 precision
    assert got["fpr95_pytorch_ood"] == pytest.approx(pytorch_ood_fpr_at_tpr(si, so), abs=1e-7)
    assert got["fpr95_openood"] == pytest.approx(openood_fpr_recall(si, so), abs=1e-12)
    # the same numbers from torch float32 scores (pytorch-ood's usual input) and from plain lists
    got32 = ood_metrics(torch.tensor(si, dtype=torch.float32), torch.tensor(so, dtype=torch.float32).tolist())
    si32, so32 = np.float32(si).astype(np.float64), np.float32(so).astype(np.float64)
    assert got32["fpr95_pytorch_ood"] == pytest.approx(pytorch_ood_fpr_at_tpr(si32, so32), abs=1e-7)
    assert got32["fpr95_openood"] == pytest.approx(openood_fpr_recall(si32, so32), abs=1e-12)


def test_fpr95_conventions_differ_where_the_sources_differ():
    """The straddling tie group: pytorch-ood stops at the point inside the straight stretch, scikit-learn (OpenOOD)
    has dropped it and lands on the next one; and neither is 1 - the paper's TNR at TPR 95%, whose positive class
    is the in-distribution."""
    si, so = list(_peer_cases())[6]
    got = ood_metrics(si, so)
    assert got["fpr95_pytorch_ood"] == pytest.approx(0.05) and got["fpr95_openood"] == pytest.approx(0.10)
    rng = np.random.default_rng(5)
    si, so = rng.normal(2, 1, 500), rng.normal(0, 1.5, 500)
    got = ood_metrics(si, so)
    assert abs((1 - got["tnr_at_tpr95"]) - got["fpr95_pytorch_ood"]) > 0.05
    assert got["fpr95_pytorch_ood"] == pytest.approx(got["fpr95_openood"])      # distinct scores: no dropped point


def test_ood_high_scores_give_mirrored_numbers_not_an_error():
    """The docstring's warning, checked: scores with the wrong direction are not detected; negating them fixes it."""
    rng = np.random.default_rng(2)
    si, so = rng.normal(0, 1, 300), rng.normal(2, 1, 300)          # an "outlier score": OOD high
    wrong, right = ood_metrics(si, so), ood_metrics(-si, -so)
    assert right["auroc_tie_aware"] > 0.85
    assert wrong["auroc_tie_aware"] == pytest.approx(1 - right["auroc_tie_aware"])
