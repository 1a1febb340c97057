"""Detectors: the max-softmax baseline, ODIN against a one-image-at-a-time reference, the batched ODIN grid
against ODIN point by point, the K+1-class score, bad (T, eps), the model's train/eval mode, and models in
bf16, fp16 and float64."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import confident
from confident import ConfidentError, baseline_scores, build_classifier, odin_grid, odin_scores, predict_logits

PAPER_TS = [1, 10, 100, 500, 1000]
PAPER_ES = [0, 0.0001, 0.001, 0.01]


@pytest.fixture
def images():
    return torch.rand(20, 3, 32, 32)


def _model(name="vgg13", ood_class=False, K=10):
    torch.manual_seed(3)
    m = build_classifier(name, K, 0.0625 if name == "vgg13" else 0.125, ood_class=ood_class)
    if name == "vgg13":
        # the authors' init leaves a tiny VGG nearly constant in its logits: spread them so that ODIN's
        # max-softmax actually depends on the input and the sign of its gradient
        with torch.no_grad():
            for p in m.head.parameters():
                if p.ndim == 2:
                    p.mul_(30)
    return m.eval()


def _odin_reference(model, x, T, eps):
    """The ODIN authors' loop: one image at a time; CE(f(x)/T, argmax) summed, backward, x' = x - eps * sign
    (grad >= 0 -> +1), score = max softmax(f(x')/T)."""
    model.eval()
    out = []
    for i in range(len(x)):
        xi = x[i:i + 1].clone().requires_grad_(True)
        logits = model(xi)
        y_hat = logits.detach().argmax(1)
        loss = F.cross_entropy(logits / T, y_hat, reduction="sum")
        loss.backward()
        sign = torch.where(xi.grad >= 0, torch.tensor(1.0), torch.tensor(-1.0))
        with torch.no_grad():
            out.append(torch.softmax(model(xi.detach() - eps * sign) / T, 1).max(1).values[0])
    return torch.stack(out)


def test_baseline_scores_equal_max_softmax(images):
    model = _model()
    with torch.no_grad():
        want = torch.softmax(model(images), 1).max(1).values
    got = baseline_scores(model, images, batch_size=7)
    assert got.shape == (20,) and got.device.type == "cpu"
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert float(got.min()) >= 0.1 - 1e-6 and float(got.max()) <= 1.0


def test_baseline_scores_on_uint8_match_float_and_grayscale_is_not_copied_to_rgb():
    model = _model()                                           # a 3-channel network
    x8 = torch.randint(0, 256, (6, 1, 32, 32), dtype=torch.uint8)
    xf = (x8.float() / 255).expand(-1, 3, -1, -1)
    with pytest.raises(ConfidentError, match=r"shape \(6, 1, 32, 32\).*channels"):
        baseline_scores(model, x8)                             # fed as given: the network's conv refuses it
    torch.testing.assert_close(baseline_scores(model, confident.to_rgb(x8)), baseline_scores(model, xf),
                               atol=1e-6, rtol=1e-6)
    assert confident.to_rgb(x8).data_ptr() == x8.data_ptr()   # a view, no copy


@pytest.mark.parametrize("T,eps", [(1, 0.0), (1, 0.001), (10, 0.01), (1000, 0.0014), (1000, 0.0)])
def test_odin_scores_match_per_image_reference(images, T, eps):
    model = _model()
    want = _odin_reference(model, images, T, eps)
    got = odin_scores(model, images, T, eps, batch_size=8)
    assert got.shape == (20,)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_odin_perturbation_matters(images):
    """Guard against a vacuous comparison: with eps > 0 the scores move, and by more for larger eps."""
    model = _model()
    s0 = odin_scores(model, images, 1, 0.0)
    s1 = odin_scores(model, images, 1, 0.01)
    assert float((s1 - s0).abs().max()) > 1e-3
    # the perturbation raises the predicted class's softmax (a step against the CE gradient)
    assert float((s1 - s0).mean()) > 0
    # at eps = 0 ODIN is the temperature-scaled max softmax
    with torch.no_grad():
        want = torch.softmax(model(images) / 10, 1).max(1).values
    torch.testing.assert_close(odin_scores(model, images, 10, 0.0), want, atol=1e-6, rtol=1e-6)


class _Shift(torch.nn.Module):
    def __init__(self, t):
        super().__init__()
        self.register_buffer("t", t)

    def forward(self, x):
        return x - self.t


def test_odin_sign_of_a_zero_gradient_is_plus_one(images):
    """Pixels behind a dead ReLU have a gradient of exactly 0. The ODIN code maps it to +1 (x' = x - eps), which
    keeps them dead; -1 would wake them up (x - t goes from -eps/2 to +eps/2) and change the score."""
    eps = 0.01
    x = images[:6]
    dead = torch.rand(1, 3, 32, 32) < 0.5                                # half the pixels: t = x + eps / 2
    t = torch.where(dead, x + eps / 2, x - 0.3)
    torch.manual_seed(5)
    model = torch.nn.Sequential(_Shift(t), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(3072, 10)).eval()
    with torch.no_grad():
        model[3].weight.mul_(20)
    per_image = [_odin_reference(torch.nn.Sequential(_Shift(t[i:i + 1]), *list(model)[1:]), x[i:i + 1], 1, eps)
                 for i in range(6)]
    want = torch.cat(per_image)
    # with the opposite convention the scores would differ: check that the construction is sensitive
    xg = x.clone().requires_grad_(True)
    out = model(xg)
    F.cross_entropy(out, out.detach().argmax(1), reduction="sum").backward()
    assert (xg.grad[dead.expand_as(xg)] == 0).all()
    flipped = torch.where(xg.grad > 0, 1.0, -1.0)
    with torch.no_grad():
        other = torch.softmax(model(x - eps * flipped), 1).max(1).values
    assert float((other - want).abs().max()) > 1e-3
    torch.testing.assert_close(odin_scores(model, x, 1, eps, batch_size=6), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(odin_grid(model, x, [1], [0, eps], batch_size=6, impl="torch")[0, 1], want,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["vgg13", "simple_cnn"])
def test_odin_grid_equals_odin_scores_on_paper_grid(images, name):
    model = _model(name)
    grid = odin_grid(model, images, PAPER_TS, PAPER_ES, batch_size=8, impl="torch")
    assert grid.shape == (len(PAPER_TS), len(PAPER_ES), 20)
    for t, T in enumerate(PAPER_TS):
        for j, e in enumerate(PAPER_ES):
            torch.testing.assert_close(grid[t, j], odin_scores(model, images, T, e, batch_size=6),
                                       atol=1e-5, rtol=0, msg=f"T={T} eps={e}")
    # and the grid is not degenerate: different settings give different scores
    assert float((grid[0, 3] - grid[0, 0]).abs().max()) > 1e-4
    assert float((grid[4, 0] - grid[0, 0]).abs().max()) > 1e-3


def test_odin_grid_single_point_and_unordered_lists(images):
    model = _model()
    g = odin_grid(model, images, [500, 1], [0.01, 0], batch_size=20, impl="torch")
    torch.testing.assert_close(g[1, 0], _odin_reference(model, images, 1, 0.01), atol=1e-5, rtol=0)
    torch.testing.assert_close(g[0, 1], _odin_reference(model, images, 500, 0.0), atol=1e-5, rtol=0)
    g1 = odin_grid(model, images[:3], [1], [0.001], impl="torch")
    assert g1.shape == (1, 1, 3)
    torch.testing.assert_close(g1[0, 0], _odin_reference(model, images[:3], 1, 0.001), atol=1e-5, rtol=0)


def test_kplus1_model_score_is_one_minus_last_class(images):
    model = _model("simple_cnn", ood_class=True)
    with torch.no_grad():
        p = torch.softmax(model(images), 1)
    assert p.shape == (20, 11)
    torch.testing.assert_close(baseline_scores(model, images), 1 - p[:, -1], atol=1e-6, rtol=1e-6)
    # ODIN on the K+1 model: eps = 0 gives 1 - p(K+1 | x; T); the grid equals the point-by-point version
    with torch.no_grad():
        pT = torch.softmax(model(images) / 10, 1)
    torch.testing.assert_close(odin_scores(model, images, 10, 0.0), 1 - pT[:, -1], atol=1e-6, rtol=1e-6)
    grid = odin_grid(model, images, [1, 10], [0, 0.001], batch_size=7, impl="torch")
    for t, T in enumerate([1, 10]):
        for j, e in enumerate([0, 0.001]):
            torch.testing.assert_close(grid[t, j], odin_scores(model, images, T, e), atol=1e-5, rtol=0)


def test_kplus1_odin_perturbs_towards_predicted_real_class(images):
    """The predicted label of the K+1 model is the argmax over the K real classes only."""
    model = _model("simple_cnn", ood_class=True)
    with torch.no_grad():
        logits = model(images)
        logits_real = logits[:, :-1]
    x = images[:4].clone().requires_grad_(True)
    out = model(x)
    loss = F.cross_entropy(out, logits_real[:4].argmax(1), reduction="sum")
    (g,) = torch.autograd.grad(loss, x)
    sign = torch.where(g >= 0, 1.0, -1.0)
    with torch.no_grad():
        want = 1 - torch.softmax(model(images[:4] - 0.01 * sign), 1)[:, -1]
    torch.testing.assert_close(odin_scores(model, images[:4], 1, 0.01), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("T,eps", [(0, 0.0), (-1, 0.001), (1, -0.001), (float("nan"), 0.0)])
def test_odin_invalid_settings_raise(images, T, eps):
    model = _model()
    with pytest.raises(ConfidentError, match="ODIN"):
        odin_scores(model, images, T, eps)
    with pytest.raises(ConfidentError, match="ODIN"):
        odin_grid(model, images, [1, T], [0, eps], impl="torch")


def test_detectors_reject_bad_image_tensors():
    model = _model()
    for bad in (torch.rand(3, 32, 32), torch.rand(2, 2, 32, 32), torch.rand(0, 3, 32, 32)):
        for fn in (lambda x: baseline_scores(model, x), lambda x: odin_scores(model, x, 1, 0.0),
                   lambda x: odin_grid(model, x, [1], [0], impl="torch")):
            with pytest.raises(ConfidentError):
                fn(bad)


def test_detectors_use_eval_mode_and_restore_train_mode(images):
    torch.manual_seed(4)
    model = build_classifier("alexnet", 10, 0.125)         # dropout in the head: train mode would be random
    model.train()
    with torch.no_grad():
        model.eval()
        want = torch.softmax(model(images), 1).max(1).values
        model.train()
    for _ in range(2):
        torch.testing.assert_close(baseline_scores(model, images), want, atol=1e-6, rtol=1e-6)
        assert model.training
    a = odin_scores(model, images, 10, 0.001)
    assert model.training
    b = odin_grid(model, images, [10], [0.001], impl="torch")
    assert model.training
    torch.testing.assert_close(a, b[0, 0], atol=1e-5, rtol=0)
    model.eval()
    odin_scores(model, images, 10, 0.001)
    odin_grid(model, images, [10], [0.001], impl="torch")
    baseline_scores(model, images)
    assert not model.training
    assert all(not m.training for m in model.modules())


def test_odin_does_not_touch_parameter_gradients(images):
    model = _model()
    odin_scores(model, images, 1000, 0.001)
    odin_grid(model, images, [1000], [0.001], impl="torch")
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# Models in other dtypes: images go in the model's dtype, scores and the ODIN step are computed in fp32
# (float64 for a float64 model)

def _tiny_cnn(dtype=torch.float32):
    """A small CNN with fixed weights (the same for every dtype), logits spread enough for ODIN to matter."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))
    with torch.no_grad():
        net[-1].weight.mul_(20)
    return net.to(dtype).eval()


# Scores differ from the fp32 model's by the low-precision logits' rounding divided by T, so the tolerance is on
# T * score: measured at most 1.5e-3 (bf16) and 2.0e-4 (fp16) on this model and these images.
LOW_PRECISION = [(torch.bfloat16, 5e-3), (torch.float16, 1e-3)]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype,tol", LOW_PRECISION)
def test_low_precision_model_scores_close_to_its_fp32_copy(dtype, tol, impl):
    # tests/conftest.py turns Triton's CPU interpreter on where there is no GPU: the kernels must run here
    if impl == "triton":
        assert confident._kernels() and confident._kernels().can_run(torch.zeros(1)), "Triton kernels unavailable"
    ref, low = _tiny_cnn(), _tiny_cnn(dtype)
    x = torch.rand(32, 3, 32, 32)
    b = baseline_scores(low, x)
    assert b.dtype == torch.float32
    torch.testing.assert_close(b, baseline_scores(ref, x), atol=tol, rtol=0)
    for T, e in [(1, 0.01), (1000, 0.001)]:
        o = odin_scores(low, x, T, e)
        assert o.dtype == torch.float32
        torch.testing.assert_close(o * T, odin_scores(ref, x, T, e) * T, atol=tol, rtol=0, msg=f"T={T} eps={e}")
    Ts = torch.tensor(PAPER_TS, dtype=torch.float32).view(-1, 1, 1)
    g, g_ref = odin_grid(low, x, PAPER_TS, PAPER_ES, impl=impl), odin_grid(ref, x, PAPER_TS, PAPER_ES, impl="torch")
    assert g.dtype == torch.float32
    torch.testing.assert_close(g * Ts, g_ref * Ts, atol=tol, rtol=0)
    torch.testing.assert_close(g[4, 2], odin_scores(low, x, 1000, 0.001), atol=tol / 1000, rtol=0)
    # the model really ran in low precision, and the perturbation still moves the scores the right way
    assert float((b - baseline_scores(ref, x)).abs().max()) > 0
    assert float((g[:, 3] - g[:, 0]).mean()) > 0
    assert all(p.dtype == dtype for p in low.parameters())


def _odin_formula_fp64(model, x, T, eps):
    """The paper's ODIN (App. C.3) in float64, written out: S(x; T) = softmax(f(x) / T), y_hat = argmax_y S_y,
    x' = x - eps * sign(-grad_x log S_y_hat(x; T)) with sign(g) = +1 for g >= 0, score = max_y S_y(x'; T).
    The network has no batch statistics, so the gradient of the sum over images is each image's own."""
    x = x.detach().clone().requires_grad_(True)
    S = torch.softmax(model(x) / T, dim=1)
    y_hat = S.argmax(dim=1)
    minus_log_S = -torch.log(S[torch.arange(len(x)), y_hat]).sum()
    (g,) = torch.autograd.grad(minus_log_S, x)
    sign = torch.where(g >= 0, torch.ones_like(g), -torch.ones_like(g))
    with torch.no_grad():
        return torch.softmax(model(x.detach() - eps * sign) / T, dim=1).max(dim=1).values


@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_float64_model_scores_equal_the_formula_in_float64(impl):
    model = _tiny_cnn(torch.float64)
    x = torch.rand(16, 3, 32, 32, dtype=torch.float64)
    b = baseline_scores(model, x, batch_size=5)
    assert b.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(b, torch.softmax(model(x), 1).max(1).values, atol=1e-13, rtol=0)
    g = odin_grid(model, x, PAPER_TS, PAPER_ES, batch_size=5, impl=impl)     # "auto": the kernels work in fp32,
    assert g.dtype == torch.float64                                            # so float64 takes the torch path
    for t, T in enumerate(PAPER_TS):
        for j, e in enumerate(PAPER_ES):
            want = _odin_formula_fp64(model, x, T, e)
            torch.testing.assert_close(g[t, j], want, atol=1e-13, rtol=0, msg=f"T={T} eps={e}")
            if T in (1, 1000):
                o = odin_scores(model, x, T, e, batch_size=5)
                assert o.dtype == torch.float64
                torch.testing.assert_close(o, want, atol=1e-13, rtol=0, msg=f"T={T} eps={e}")
    # fp32 images (or uint8) reach a float64 model as exact float64 values
    x32 = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(odin_scores(model, x32, 10, 0.001), _odin_formula_fp64(model, x32.double(), 10, 0.001),
                               atol=1e-13, rtol=0)


def test_predict_logits_follow_the_model_dtype(images):
    for dtype, want in [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                        (torch.float32, torch.float32), (torch.float64, torch.float64)]:
        model = _tiny_cnn(dtype)
        z = predict_logits(model, images, batch_size=7)
        assert z.shape == (20, 10) and z.dtype == want
        with torch.no_grad():
            torch.testing.assert_close(z, model(images.to(dtype)).to(want), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# The evaluation protocol (paper App. B, C.3; REFERENCE: the ODIN and Mahalanobis authors' split): the first
# val_size images of each set choose ODIN's (T, eps) by detection error and fit temperature scaling; every
# reported number comes from the rest.

def _protocol_case():
    g = torch.Generator().manual_seed(5)
    x_in = torch.rand(60, 3, 32, 32, generator=g)
    x_out = (torch.rand(60, 3, 32, 32, generator=g) * 0.6 + 0.2)          # a narrower, greyer kind of noise
    y_in = torch.randint(0, 10, (60,), generator=g)
    cfg = confident.Config(in_data="cifar10", out_data="mine", val_size=20, temperatures="1,10,100,1000",
                           epsilons="0,0.001,0.01,0.05", impl="torch", eval_batch_size=16)
    return _model(), x_in, y_in, x_out, cfg


def test_odin_point_and_temperature_are_chosen_on_validation_images_only():
    model, x_in, y_in, x_out, cfg = _protocol_case()
    v, Ts, Es = 20, [1, 10, 100, 1000], [0, 0.001, 0.01, 0.05]
    res = confident.evaluate(model, x_in, y_in, {"mine": x_out}, cfg, log=lambda *a: None)
    s_in = torch.stack([torch.stack([_odin_reference(model, x_in, T, e) for e in Es]) for T in Ts])
    s_out = torch.stack([torch.stack([_odin_reference(model, x_out, T, e) for e in Es]) for T in Ts])
    err = lambda a, b: 1 - confident.ood_metrics(a, b)["detection_acc"]              # noqa: E731
    points = [(t, j) for t in range(len(Ts)) for j in range(len(Es))]
    val_err = {p: err(s_in[p][:v], s_out[p][:v]) for p in points}
    test_err = {p: err(s_in[p][v:], s_out[p][v:]) for p in points}
    chosen = min(points, key=lambda p: val_err[p])                               # the first of equal errors
    # the case is one where looking at the test images would choose differently
    assert min(test_err.values()) < test_err[chosen] - 1e-9
    odin = res["ood"]["mine"]["odin"]
    assert (odin["temperature"], odin["epsilon"]) == (Ts[chosen[0]], Es[chosen[1]])
    want = confident.ood_metrics(s_in[chosen][v:], s_out[chosen][v:])
    for k in confident.METRIC_KEYS:
        assert odin[k] == pytest.approx(want[k], abs=1e-6), k
    # temperature scaling: fitted on the validation images, ECE on the rest
    with torch.no_grad():
        logits = model(x_in)
    T_val = confident.fit_temperature(logits[:v], y_in[:v])
    assert res["calibration_temperature"] == pytest.approx(T_val, rel=1e-6)
    assert abs(confident.fit_temperature(logits[v:], y_in[v:]) - T_val) > 1e-3 * T_val   # the rest differ
    assert res["ece"] == pytest.approx(confident.expected_calibration_error(torch.softmax(logits[v:], 1), y_in[v:]))
    assert res["ece_temperature_scaled"] == pytest.approx(
        confident.expected_calibration_error(torch.softmax(logits[v:] / T_val, 1), y_in[v:]))
    assert res["n_in_test"] == 40 and res["ood"]["mine"]["n_out_test"] == 40


def test_evaluate_scores_every_requested_detector_on_the_held_out_images():
    """--detectors: energy (T = 1) and MaxLogit on the same held-out images as the baseline and ODIN, from the
    papers' definitions; asking for them changes nothing of the baseline's and ODIN's numbers."""
    model, x_in, y_in, x_out, cfg = _protocol_case()
    v = cfg.val_size
    quiet = lambda *a: None                                                      # noqa: E731
    default = confident.evaluate(model, x_in, y_in, {"mine": x_out}, cfg, log=quiet)
    cfg4 = dataclasses.replace(cfg, detectors="maxlogit,energy,baseline,odin")
    logs = []
    res = confident.evaluate(model, x_in, y_in, {"mine": x_out}, cfg4, log=logs.append)
    r = res["ood"]["mine"]
    assert list(r)[:4] == ["baseline", "odin", "odin_grid", "energy"] and "maxlogit" in r
    assert {k: v_ for k, v_ in r.items() if k not in ("energy", "maxlogit")} == default["ood"]["mine"]
    with torch.no_grad():
        z_in, z_out = model(x_in).double(), model(x_out).double()
    energy = lambda z: -(-1.0 * torch.log(torch.exp(z / 1.0).sum(1)))           # noqa: E731  -E(x; f), T = 1
    maxlogit = lambda z: z.max(1).values                                        # noqa: E731
    for det, f in (("energy", energy), ("maxlogit", maxlogit)):
        want = confident.ood_metrics(f(z_in)[v:], f(z_out)[v:])
        for k in confident.METRIC_KEYS + confident.PEER_KEYS:
            assert r[det][k] == pytest.approx(want[k], abs=1e-6), (det, k)
    assert r["energy"]["temperature"] == 1.0
    assert "energy TNR" in logs[-1] and "MaxLogit TNR" in logs[-1] and "ODIN (T=" in logs[-1]
    only = confident.evaluate(model, x_in, y_in, {"mine": x_out}, dataclasses.replace(cfg, detectors="energy"),
                              log=quiet)["ood"]["mine"]
    assert "odin" not in only and "baseline" not in only and only["energy"] == r["energy"]
    assert only["baseline_val_detection_error"] == r["baseline_val_detection_error"]   # --tune's criterion stays
    with pytest.raises(ConfidentError, match="Config.detectors .odin,mahalanobis.: expected"):
        confident.evaluate(model, x_in, y_in, {"mine": x_out}, dataclasses.replace(cfg, detectors="odin,mahalanobis"))


# ------------------------------------------------------------------------------------------------
# Energy score and MaxLogit against their papers' definitions, written out here:
# Liu, Wang, Owens & Li (NeurIPS 2020), Eq. (1)-(2): the free energy E(x; f) = -T * log sum_i exp(f_i(x) / T),
# and the detector keeps inputs with -E(x; f) above a threshold (higher = in-distribution).
# Hendrycks et al. (ICML 2022): MaxLogit = max_k f_k(x), the largest unnormalised logit.

def _paper_energy(z, T):
    z = z.double()
    return -(-T * torch.log(torch.sum(torch.exp(z / T), dim=1)))


@pytest.mark.parametrize("T", [1.0, 0.5, 10.0])
def test_energy_scores_are_minus_the_free_energy(images, T):
    model = _model()
    with torch.no_grad():
        z = model(images)
    got = confident.energy_scores(model, images, temperature=T, batch_size=7)
    assert got.shape == (20,) and got.dtype == torch.float32 and got.device.type == "cpu"
    torch.testing.assert_close(got.double(), _paper_energy(z, T), atol=1e-4, rtol=1e-6)


def test_maxlogit_scores_are_the_largest_logit(images):
    model = _model()
    with torch.no_grad():
        z = model(images)
    got = confident.maxlogit_scores(model, images, batch_size=7)
    torch.testing.assert_close(got, torch.tensor([max(row.tolist()) for row in z]), atol=1e-6, rtol=1e-6)


def test_energy_and_maxlogit_of_a_k_plus_1_model_use_its_k_logits(images):
    model = _model("simple_cnn", ood_class=True)
    with torch.no_grad():
        z = model(images)[:, :10]                              # the K in-distribution logits, not the OOD class
    torch.testing.assert_close(confident.energy_scores(model, images).double(), _paper_energy(z, 1.0),
                               atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(confident.maxlogit_scores(model, images), z.max(1).values, atol=1e-6, rtol=0)


@pytest.mark.parametrize("T", [0.0, -1.0, float("nan"), float("inf")])
def test_energy_refuses_bad_temperature(images, T):
    with pytest.raises(ConfidentError, match="energy temperature"):
        confident.energy_scores(_model(), images, temperature=T)


# ------------------------------------------------------------------------------------------------
# Detectors the way PyTorch users call them: a DataLoader or any iterable of batches, inside torch.no_grad()
# and torch.inference_mode(), on a 1-channel model, on a model that returns more than its logits.

def _every_detector(model, x, **kw):
    """Every detector (and predict_logits) on x: {name: tensor}."""
    return {"baseline": baseline_scores(model, x, **kw), "energy": confident.energy_scores(model, x, **kw),
            "maxlogit": confident.maxlogit_scores(model, x, **kw), "odin": odin_scores(model, x, 10, 0.001, **kw),
            "odin_grid": odin_grid(model, x, [1, 10], [0, 0.001], impl="torch", **kw),
            "logits": predict_logits(model, x, **kw)}


def _assert_same(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-6, msg=k)


def test_detectors_take_a_dataloader_or_any_iterable_of_batches(images):
    from torch.utils.data import DataLoader, TensorDataset
    model = _model()
    y = torch.arange(20) % 10
    want = _every_detector(model, images)
    _assert_same(_every_detector(model, DataLoader(TensorDataset(images, y), batch_size=7)), want)   # (x, y)
    _assert_same(_every_detector(model, DataLoader(TensorDataset(images), batch_size=6)), want)      # [x]
    _assert_same(_every_detector(model, DataLoader(images, batch_size=8)), want)                     # x
    _assert_same(_every_detector(model, [images[:5], images[5:]]), want)                             # a list
    _assert_same(_every_detector(model, [(images[:12], y[:12]), (images[12:], y[12:])]), want)
    with pytest.raises(ConfidentError, match="TensorDataset.*pass a DataLoader"):
        baseline_scores(model, TensorDataset(images, y))                                            # not batched
    with pytest.raises(ConfidentError, match="batch 0: one image of shape .* DataLoader"):
        baseline_scores(model, [images[0], images[1]])
    x8 = (images * 255).round().to(torch.uint8)
    _assert_same(_every_detector(model, [(x8[i:i + 3], y[i:i + 3]) for i in range(0, 20, 3)]),       # uint8
                 _every_detector(model, x8))
    gen = ((x8[i:i + 3], y[i:i + 3]) for i in range(0, 20, 3))                                          # one pass
    torch.testing.assert_close(baseline_scores(model, gen), baseline_scores(model, x8), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bad,match", [([], "empty"), ([torch.rand(3, 32, 32)], r"batch 0.*\(N, C, H, W\)"),
                                       ([torch.rand(2, 3, 32, 32), torch.zeros(2, 3, 32, 32, dtype=torch.int64)],
                                        "batch 1.*int64"),
                                       ([np.zeros((2, 3, 32, 32))], "batch 0.*ndarray"), (42, "int")])
def test_bad_batches_are_refused_and_the_model_mode_restored(bad, match):
    model = _model().train()
    for fn in (lambda x: baseline_scores(model, x), lambda x: odin_scores(model, x, 1, 0.001),
               lambda x: odin_grid(model, x, [1], [0, 0.001], impl="torch"),
               lambda x: confident.energy_scores(model, x), lambda x: predict_logits(model, x)):
        with pytest.raises(ConfidentError, match=match):
            fn(list(bad) if isinstance(bad, list) else bad)
        assert model.training and all(m.training for m in model.modules())


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_detectors_work_inside_no_grad_and_inference_mode(images, mode):
    model = _model()
    want = _every_detector(model, images)
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with ctx():
        got = _every_detector(model, images)
        x_made_inside = images.clone()                         # under inference_mode: an inference tensor
        got_inside = _every_detector(model, x_made_inside)
    _assert_same(got, want, atol=0)
    _assert_same(got_inside, want, atol=0)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


class _Gray(torch.nn.Module):
    """A 1-channel CNN with BatchNorm (not one of this module's networks)."""
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3, stride=2, padding=1), torch.nn.BatchNorm2d(6),
                                        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
        self.head = torch.nn.Linear(24, 5)
        with torch.no_grad():
            self.head.weight.mul_(15)

    def forward(self, x):
        return self.head(self.body(x))


def test_a_one_channel_model_gets_one_channel():
    model = _Gray().eval()
    x = torch.rand(9, 1, 28, 28)
    with torch.no_grad():
        z = model(x)
    got = _every_detector(model, x, batch_size=4)
    torch.testing.assert_close(got["logits"], z, atol=1e-6, rtol=0)
    torch.testing.assert_close(got["baseline"], torch.softmax(z, 1).max(1).values, atol=1e-6, rtol=0)
    torch.testing.assert_close(got["odin"], _odin_reference(model, x, 10, 0.001), atol=1e-5, rtol=0)
    torch.testing.assert_close(got["odin_grid"][1, 1], got["odin"], atol=1e-5, rtol=0)
    x8 = (x * 255).round().to(torch.uint8)                     # uint8 images: scaled to [0, 1], still 1 channel
    torch.testing.assert_close(baseline_scores(model, x8), baseline_scores(model, x8.float() / 255), atol=0, rtol=0)
    with pytest.raises(ConfidentError, match=r"shape \(9, 3, 28, 28\)"):
        baseline_scores(model, x.expand(-1, 3, -1, -1))


class _Returns(torch.nn.Module):
    """Wraps a classifier so that it returns its logits inside a tuple, a list or a dict."""
    def __init__(self, net, how):
        super().__init__()
        self.net, self.how = net, how

    def forward(self, x):
        z = self.net(x)
        feats = torch.ones(len(x), 7, dtype=z.dtype, device=z.device)
        return {"tuple": lambda: (z, feats), "list": lambda: [z, feats], "second": lambda: (feats, z),
                "dict": lambda: {"features": feats, "logits": z}, "other": lambda: {"out": z, "aux": feats},
                "3d": lambda: z[:, :, None]}[self.how]()


@pytest.mark.parametrize("how,logits", [("tuple", None), ("list", None), ("dict", None), ("second", 1),
                                        ("other", "out"), ("other", lambda out: out["out"])])
def test_a_model_returning_more_than_logits(images, how, logits):
    net = _model()
    want = _every_detector(net, images)
    _assert_same(_every_detector(_Returns(net, how), images, logits=logits), want, atol=0)
    with torch.inference_mode():
        _assert_same(_every_detector(_Returns(net, how), images, logits=logits), want, atol=0)


@pytest.mark.parametrize("how,logits,match", [("other", None, r"keys \['out', 'aux'\].*logits="),
                                              ("tuple", 5, "logits=5"), ("other", "logits", "logits='logits'"),
                                              ("3d", None, r"\(20, 10, 1\).*logits=")])
def test_a_model_output_without_logits_where_looked_is_a_clear_error(images, how, logits, match):
    model = _Returns(_model(), how)
    for fn in (lambda: baseline_scores(model, images, logits=logits),
               lambda: odin_scores(model, images, 10, 0.001, logits=logits),
               lambda: odin_grid(model, images, [10], [0.001], impl="torch", logits=logits)):
        with pytest.raises(ConfidentError, match=match):
            fn()


class _Normalised(torch.nn.Module):
    """(x - mean) / std inside the model, then the network: images stay in [0, 1] outside."""
    def __init__(self, net, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def test_odin_eps_on_a_model_that_normalises_inside_is_the_odin_codes_step():
    """The ODIN code feeds normalised images and divides its gradient sign by each channel's std, so that eps is
    a step in [0, 1] pixel units: x_n' = x_n - eps * sign(grad_{x_n}) / std. With the normalisation inside the
    model the detectors' x' = x - eps * sign(grad_x) is the same step."""
    net, T, eps = _tiny_cnn(), 10.0, 0.004
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    model = _Normalised(net, mean, std).eval()
    x = torch.rand(10, 3, 32, 32)
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    xn = ((x - m) / s).requires_grad_(True)
    logits = net(xn)
    F.cross_entropy(logits / T, logits.detach().argmax(1), reduction="sum").backward()
    sign = torch.where(xn.grad >= 0, 1.0, -1.0)
    with torch.no_grad():
        want = torch.softmax(net(xn.detach() - eps * sign / s) / T, 1).max(1).values
    torch.testing.assert_close(odin_scores(model, x, T, eps), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(odin_grid(model, x, [T], [eps], impl="torch")[0, 0], want, atol=1e-5, rtol=0)


def test_odin_grid_kernels_take_one_channel_batches_from_a_loader():
    """The Triton path (tests/conftest.py: the CPU interpreter) on 1-channel images from an iterable: the same
    scores as the torch path."""
    model = _Gray().eval()
    x = torch.rand(6, 1, 16, 16)
    batches = [(x[:4], None), (x[4:], None)]
    torch.testing.assert_close(odin_grid(model, batches, [1, 10], [0, 0.002], impl="triton"),
                               odin_grid(model, x, [1, 10], [0, 0.002], impl="torch"), atol=1e-5, rtol=0)


def test_evaluate_feeds_a_one_channel_model_one_channel():
    """evaluate copies grayscale sets to 3 channels only for a model whose first convolution takes 3 (the
    built-in networks); a 1-channel model gets its 1 channel, and its scores are those of the detectors."""
    model = _Gray().eval()
    g = torch.Generator().manual_seed(2)
    x_in, x_out = torch.rand(40, 1, 16, 16, generator=g), torch.rand(40, 1, 16, 16, generator=g) * 0.5
    y_in = torch.randint(0, 5, (40,), generator=g)
    cfg = confident.Config(in_data="mine", out_data="other", val_size=10, temperatures="1,10", epsilons="0,0.002",
                           impl="torch", detectors="baseline,odin,maxlogit")
    res = confident.evaluate(model, x_in, y_in, {"other": x_out}, cfg, log=lambda *a: None)
    want = confident.ood_metrics(baseline_scores(model, x_in)[10:], baseline_scores(model, x_out)[10:])
    assert res["ood"]["other"]["baseline"]["auroc"] == pytest.approx(want["auroc"], abs=1e-9)
    ml = confident.maxlogit_scores
    want = confident.ood_metrics(ml(model, x_in)[10:], ml(model, x_out)[10:])
    assert res["ood"]["other"]["maxlogit"]["auroc"] == pytest.approx(want["auroc"], abs=1e-9)
