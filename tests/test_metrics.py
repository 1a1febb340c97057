"""Metrics: `ood_metrics` against a brute-force transcription of the authors' threshold-grid evaluation code,
the tie-aware AUROC against Mann-Whitney, ECE against a loop over bins, and temperature scaling."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from confident import ConfidentError, expected_calibration_error, fit_temperature, ood_metrics

KEYS = ("tnr_at_tpr95", "auroc", "detection_acc", "aupr_in", "aupr_out")


# ------------------------------------------------------------------------------------------------
# The authors' grid code, one threshold at a time in spirit, vectorised over chunks of thresholds.

def _rates(scores, deltas, op, chunk=2000):
    """mean(op(scores, delta)) for every delta, by explicit comparison (no sorting, no searchsorted)."""
    out = np.empty(len(deltas))
    for i in range(0, len(deltas), chunk):
        d = deltas[i:i + chunk]
        out[i:i + chunk] = op(scores[None, :], d[:, None]).mean(axis=1)
    return out


def _rectangles(recall, precision):
    """sum (recall_prev - recall) * precision from recall_prev = 1, plus recall * precision at the last point."""
    prev = np.concatenate([[1.0], recall[:-1]])
    return float(np.sum((prev - recall) * precision) + recall[-1] * precision[-1])


# G is a prime above 100: on scores from the lattice j/100 no threshold but the first (= the smallest score)
# lands exactly on a score value. A threshold exactly on a tied score is a measure-zero event that the rectangle
# rule nevertheless weighs fully (TPR counts the tie, FPR does not), so whether it happens depends on float
# rounding of np.arange; the authors' continuous softmax scores never hit it, and neither does this grid.
G_PRIME = 40_009


def grid_metrics(score_in, score_out, G=G_PRIME):
    X1, Y1 = np.asarray(score_in, np.float64), np.asarray(score_out, np.float64)
    start, end = min(X1.min(), Y1.min()), max(X1.max(), Y1.max())
    gap = (end - start) / G
    deltas = np.arange(start, end, gap)
    # TNR at TPR 95%: FPR averaged over the thresholds with 0.94 <= TPR <= 0.96
    tpr = _rates(X1, deltas, np.greater_equal)
    fpr = _rates(Y1, deltas, np.greater)
    band = (tpr >= 0.94) & (tpr <= 0.96)
    assert band.any(), "test data must put some thresholds in the TPR band"
    tnr = 1.0 - fpr[band].sum() / band.sum()
    # AUROC: sum (fpr_prev - fpr) * tpr from fpr_prev = 1, plus fpr * tpr at the last threshold
    fpr_prev = np.concatenate([[1.0], fpr[:-1]])
    auroc = float(np.sum((fpr_prev - fpr) * tpr) + fpr[-1] * tpr[-1])
    # detection error: min over delta of (P(in < delta) + P(out > delta)) / 2, starting from 1.0
    err = min(1.0, float(np.min((_rates(X1, deltas, np.less) + fpr) / 2.0)))
    # AUPR-in: tp = P(in >= delta), fp = P(out >= delta); points with tp + fp == 0 skipped ("continue")
    tp, fp = tpr, _rates(Y1, deltas, np.greater_equal)
    keep = (tp + fp) != 0
    aupr_in = _rectangles(tp[keep], tp[keep] / (tp[keep] + fp[keep]))
    # AUPR-out: sweep down from end; tp = P(out < delta), fp = P(in < delta); stop at the first tp + fp == 0
    deltas_down = np.arange(end, start, -gap)
    tp, fp = _rates(Y1, deltas_down, np.less), _rates(X1, deltas_down, np.less)
    zero = (tp + fp) == 0
    stop = int(np.argmax(zero)) if zero.any() else len(tp)
    tp, fp = tp[:stop], fp[:stop]
    aupr_out = _rectangles(tp, tp / (tp + fp))
    return dict(tnr_at_tpr95=tnr, auroc=auroc, detection_acc=1.0 - err, aupr_in=aupr_in, aupr_out=aupr_out)


def _compare(si, so, atol=3e-3, G=G_PRIME):
    got, want = ood_metrics(si, so), grid_metrics(si, so, G)
    for k in KEYS:
        assert got[k] == pytest.approx(want[k], abs=atol), (k, got[k], want[k])
    return got, want


def _mann_whitney(si, so):
    si, so = np.asarray(si, np.float64), np.asarray(so, np.float64)
    gt = (si[:, None] > so[None, :]).sum()
    eq = (si[:, None] == so[None, :]).sum()
    return (gt + 0.5 * eq) / (len(si) * len(so))


# ------------------------------------------------------------------------------------------------
# ood_metrics vs the grid

@pytest.mark.parametrize("n_in,n_out,shift", [(300, 500, 15), (500, 300, 30), (400, 400, 0), (300, 500, -10)])
def test_ood_metrics_match_authors_grid_on_a_coarse_lattice(n_in, n_out, shift):
    rng = np.random.default_rng(n_in + n_out + shift)
    # integers 0..100 / 100: plenty of ties, every interval between scores holds ~G/100 thresholds
    si = np.clip(rng.normal(55 + shift / 2, 18, n_in).round(), 0, 100) / 100
    so = np.clip(rng.normal(55 - shift / 2, 18, n_out).round(), 0, 100) / 100
    got, want = _compare(si, so)
    assert 0 < got["auroc"] < 1 and 0.5 <= got["detection_acc"] <= 1


def test_ood_metrics_match_grid_with_ties_at_the_smallest_score():
    """The first threshold is the smallest score itself: with ties there (in and out), TPR there is 1 while the
    next interval's TPR is not: the first AUROC rectangle must use TPR = 1."""
    rng = np.random.default_rng(9)
    si = np.concatenate([np.zeros(10), rng.integers(1, 101, 290) / 100])      # 3.3%: TPR still meets the band
    so = np.concatenate([np.zeros(200), rng.integers(1, 80, 300) / 100])
    got, want = _compare(si, so)
    assert got["auroc_tie_aware"] == pytest.approx(_mann_whitney(si, so), abs=1e-12)


def test_ood_metrics_match_grid_on_continuous_scores():
    rng = np.random.default_rng(1)
    si, so = rng.beta(5, 2, 300), rng.beta(2, 3, 500)
    # continuous scores: intervals differ in width, so use a finer grid and a looser TNR tolerance
    got, want = ood_metrics(si, so), grid_metrics(si, so, G=200_000)
    for k in ("auroc", "detection_acc", "aupr_in", "aupr_out"):
        assert got[k] == pytest.approx(want[k], abs=3e-3), k
    assert got["tnr_at_tpr95"] == pytest.approx(want["tnr_at_tpr95"], abs=2e-2)


def test_ood_metrics_match_grid_with_saturated_ties_at_one():
    """Over-confident softmax: many scores exactly 1.0 in both sets (the sweep never reaches the max)."""
    rng = np.random.default_rng(2)
    si = np.concatenate([np.ones(120), np.round(rng.uniform(0.5, 1.0, 180), 2)])
    so = np.concatenate([np.ones(350), np.round(rng.uniform(0.3, 1.0, 150), 2)])
    rng.shuffle(si)
    rng.shuffle(so)
    got, want = _compare(si, so)
    # a tie-sensitive case: the authors' convention and the tie-aware one disagree clearly
    assert abs(got["auroc"] - got["auroc_tie_aware"]) > 0.05
    assert got["auroc_tie_aware"] == pytest.approx(_mann_whitney(si, so), abs=1e-12)


def test_ood_metrics_all_saturated_out_set():
    """Every OOD score is exactly 1.0, and 10% of the in scores: the paper's 'AUROC far below 50% while detection
    accuracy is 50%' case. The sweep stops below 1.0, so FPR is 1 at every threshold and AUROC = P(in = 1.0)."""
    rng = np.random.default_rng(3)
    si = np.concatenate([np.ones(30), rng.integers(20, 100, 270) / 100])
    so = np.ones(500)
    got, want = _compare(si, so)
    assert got["auroc"] == pytest.approx(0.1, abs=1e-12)
    assert got["detection_acc"] == pytest.approx(0.5, abs=1e-12)
    assert got["tnr_at_tpr95"] == pytest.approx(0.0, abs=1e-12)
    assert got["auroc_tie_aware"] == pytest.approx(0.05, abs=1e-12)


def test_ood_metrics_perfect_separation_all_one():
    rng = np.random.default_rng(4)
    si, so = rng.uniform(0.6, 1.0, 300), rng.uniform(0.0, 0.4, 500)
    got = ood_metrics(si, so)
    for k in KEYS:
        assert got[k] == pytest.approx(1.0, abs=1e-12), k
    assert got["auroc_tie_aware"] == 1.0
    want = grid_metrics(si, so, G=20_011)
    for k in KEYS:
        assert want[k] == pytest.approx(1.0, abs=1e-9), k


def test_ood_metrics_reversed_separation():
    rng = np.random.default_rng(5)
    si, so = rng.uniform(0.0, 0.4, 300), rng.uniform(0.6, 1.0, 500)
    got = ood_metrics(si, so)
    want = grid_metrics(si, so, G=20_011)
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
