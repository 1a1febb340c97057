"""Tests for the Triton kernels in kernels/ against pure-PyTorch references.

Run on CPU through Triton's interpreter; TRITON_INTERPRET must be set before
triton (or kernels) is imported, because @triton.jit reads it at decoration.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import kernels  # noqa: E402

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytestmark = pytest.mark.skip(reason="no GPU and TRITON_INTERPRET is not 1")

if kernels.AVAILABLE:
    from kernels import confidence_loss, kl_uniform_rows, odin_logit_grads, odin_perturb
    from kernels.kl_uniform import MAX_BLOCK

    BIG_K = MAX_BLOCK + 7232  # 40000 with the default cap: more than one column block
else:  # pragma: no cover
    BIG_K = 40000


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- references


def kl_uniform_ref(z):
    """KL(U || softmax(z)) per row = logsumexp(z) - mean(z) - log K."""
    return torch.logsumexp(z, dim=1) - z.mean(dim=1) - math.log(z.shape[1])


def confidence_loss_ref(z, targets, beta):
    zin, zout = z[targets >= 0], z[targets == -1]
    loss = z.new_zeros(())
    if zin.shape[0]:
        loss = loss + F.cross_entropy(zin, targets[targets >= 0])
    if zout.shape[0]:
        loss = loss + beta * kl_uniform_ref(zout).mean()
    return loss


# ---------------------------------------------------------------- kl_uniform_rows


def _check_kl_once(shape, dtype, atol, rtol, scale=1.0, weighted=True):
    B, K = shape
    z0 = (torch.randn(B, K, device=DEVICE) * scale).to(dtype)
    z = z0.clone().requires_grad_(True)
    w = torch.rand(B, device=DEVICE) + 0.5 if weighted else torch.ones(B, device=DEVICE)

    out = kl_uniform_rows(z)
    assert out.shape == (B,) and out.dtype == torch.float32
    (out * w).sum().backward()
    assert z.grad.dtype == dtype and z.grad.shape == (B, K)
    assert torch.isfinite(out).all() and torch.isfinite(z.grad).all()

    zr = z0.float().clone().requires_grad_(True)
    ref = kl_uniform_ref(zr)
    (ref * w).sum().backward()
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(z.grad.float(), zr.grad, atol=atol, rtol=rtol)

    closed = w[:, None] * (torch.softmax(z0.float(), dim=1) - 1.0 / K)
    torch.testing.assert_close(z.grad.float(), closed, atol=atol, rtol=rtol)


SHAPES = [(1, 10), (7, 100), (33, 1000), (5, 5000), (3, BIG_K)]


@pytest.mark.parametrize("shape", SHAPES)
def test_kl_uniform_fp32(shape):
    _check_kl_once(shape, torch.float32, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(7, 100), (5, 5000), (3, BIG_K)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kl_uniform_half(shape, dtype):
    # Inputs are exactly representable in the low dtype and accumulation is fp32,
    # so values match closely; only the stored gradient is rounded.
    _check_kl_once(shape, dtype, atol=2e-2 if dtype == torch.bfloat16 else 2e-3, rtol=1e-2)


@pytest.mark.parametrize("shape", [(4, 10), (3, 3000)])
def test_kl_uniform_large_logits(shape):
    _check_kl_once(shape, torch.float32, atol=1e-5, rtol=1e-5, scale=1e4)


def test_kl_uniform_extreme_rows():
    z = torch.tensor([[1e4, -1e4, 0.0, 5.0], [-1e4, -1e4, -1e4, -1e4], [1e4, 1e4, -1e4, -1e4]], device=DEVICE)
    zk = z.clone().requires_grad_(True)
    out = kl_uniform_rows(zk)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(zk.grad).all()
    torch.testing.assert_close(out, kl_uniform_ref(z), atol=1e-3, rtol=1e-6)
    expect = torch.softmax(z, 1) - 0.25
    torch.testing.assert_close(zk.grad, expect, atol=1e-6, rtol=1e-6)
    assert out[1].abs() < 1e-6  # constant row: softmax is uniform, KL = 0


def test_kl_uniform_unit_upstream():
    _check_kl_once((6, 50), torch.float32, atol=1e-5, rtol=1e-5, weighted=False)


def test_kl_uniform_mean_reduction():
    z = torch.randn(9, 37, device=DEVICE, requires_grad=True)
    kl_uniform_rows(z).mean().backward()
    expect = (torch.softmax(z.detach(), 1) - 1.0 / 37) / 9
    torch.testing.assert_close(z.grad, expect, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weight", [1.0, 0.3])
def test_kl_uniform_mean(shape, weight):
    B, K = shape
    z0 = torch.randn(B, K, device=DEVICE)
    z = z0.clone().requires_grad_(True)
    out = kernels.kl_uniform_mean(z, weight)
    assert out.shape == () and out.dtype == torch.float32
    out.backward()
    torch.testing.assert_close(out, weight * kl_uniform_ref(z0).mean(), atol=1e-5, rtol=1e-5)
    closed = weight * (torch.softmax(z0, 1) - 1.0 / K) / B
    torch.testing.assert_close(z.grad, closed, atol=1e-6, rtol=1e-5)


def test_kl_uniform_mean_upstream_retain_graph_and_half():
    z0 = torch.randn(6, 300, device=DEVICE)
    closed = (torch.softmax(z0, 1) - 1.0 / 300) / 6
    z = z0.clone().requires_grad_(True)
    out = kernels.kl_uniform_mean(z)
    (2.5 * out).backward(retain_graph=True)        # upstream 2.5: scaled once
    torch.testing.assert_close(z.grad, 2.5 * closed, atol=1e-6, rtol=1e-5)
    out.backward(retain_graph=True)                # upstream 1: the saved gradient, accumulated, never aliased
    out.backward()
    torch.testing.assert_close(z.grad, 4.5 * closed, atol=1e-6, rtol=1e-5)
    g = torch.zeros_like(z0).requires_grad_(True)  # a first backward lands in an empty .grad: if .grad were
    out = kernels.kl_uniform_mean(g + z0)          # the saved tensor itself, the third would give 4x, not 3x
    out.backward(retain_graph=True)
    first = g.grad.clone()
    out.backward(retain_graph=True)
    out.backward()
    torch.testing.assert_close(g.grad, 3 * first)
    zb = z0.to(torch.bfloat16).requires_grad_(True)
    kernels.kl_uniform_mean(zb).backward()
    assert zb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(zb.grad.float(), (torch.softmax(zb.detach().float(), 1) - 1.0 / 300) / 6,
                               atol=1e-4, rtol=1e-2)


def test_kl_uniform_mean_backward_from_one_is_the_forward_gradient(monkeypatch):
    """loss.backward() hands autograd the gradient the forward launch wrote (already scaled): no further pass."""
    from kernels import kl_uniform as ku
    written = []
    real = ku.kl_uniform_forward

    def spy(*a, **k):
        loss, grad = real(*a, **k)
        written.append(grad)
        return loss, grad
    monkeypatch.setattr(ku, "kl_uniform_forward", spy)
    z = torch.randn(4, 30, device=DEVICE, requires_grad=True)
    seen = []
    z.register_hook(seen.append)
    kernels.kl_uniform_mean(z, 0.5).backward()
    assert len(written) == 1 and len(seen) == 1
    assert seen[0].data_ptr() == written[0].data_ptr()
    torch.testing.assert_close(z.grad, 0.5 * (torch.softmax(z.detach(), 1) - 1.0 / 30) / 4)


def test_kl_uniform_mean_no_grad_empty_and_bad_weight():
    z = torch.randn(5, 40, device=DEVICE, requires_grad=True)
    with torch.no_grad():
        out = kernels.kl_uniform_mean(z, 2.0)
    assert not out.requires_grad
    torch.testing.assert_close(out, 2.0 * kl_uniform_ref(z.detach()).mean(), atol=1e-5, rtol=1e-5)
    assert float(kernels.kl_uniform_mean(torch.empty(0, 10, device=DEVICE))) == 0.0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weight"):
            kernels.kl_uniform_mean(z, bad)


def test_kl_uniform_no_grad():
    z = torch.randn(8, 300, device=DEVICE, requires_grad=True)
    with torch.no_grad():
        out = kl_uniform_rows(z)
    assert not out.requires_grad
    torch.testing.assert_close(out, kl_uniform_ref(z.detach()), atol=1e-5, rtol=1e-5)
    plain = torch.randn(8, 300, device=DEVICE)  # requires_grad False
    out2 = kl_uniform_rows(plain)
    assert not out2.requires_grad
    torch.testing.assert_close(out2, kl_uniform_ref(plain), atol=1e-5, rtol=1e-5)


def test_no_grad_skips_gradient(monkeypatch):
    import kernels.kl_uniform as klu

    calls = []
    for fname in ("kl_uniform_forward", "confidence_loss_forward"):
        real = getattr(klu, fname)

        def spy(*args, _real=real, _name=fname, **kw):
            calls.append((_name, kw.get("write_grad")))
            return _real(*args, **kw)

        monkeypatch.setattr(klu, fname, spy)
    z = torch.randn(4, 20, device=DEVICE, requires_grad=True)
    t = torch.tensor([0, -1, 3, -1], device=DEVICE)
    with torch.no_grad():
        klu.kl_uniform_rows(z)
        klu.confidence_loss(z, t, 1.0)
    klu.kl_uniform_rows(z.detach())
    assert calls == [("kl_uniform_forward", False), ("confidence_loss_forward", False), ("kl_uniform_forward", False)]
    calls.clear()
    klu.kl_uniform_rows(z).sum().backward()
    klu.confidence_loss(z, t, 1.0).backward()
    assert calls == [("kl_uniform_forward", True), ("confidence_loss_forward", True)]


def test_kl_uniform_forward_only_writes_no_grad():
    from kernels.kl_uniform import kl_uniform_forward

    z = torch.randn(4, 20, device=DEVICE)
    loss, grad = kl_uniform_forward(z, write_grad=False)
    assert grad is None
    loss2, grad2 = kl_uniform_forward(z, write_grad=True)
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(grad2, torch.softmax(z, 1) - 1.0 / 20, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["slice", "padded"])
def test_kl_uniform_strided_rows(kind):
    if kind == "slice":
        big = torch.randn(6, 2 * 300, device=DEVICE)
        view = big[:, ::2]  # stride(1) == 2: copied to contiguous by the wrapper
    else:
        big = torch.randn(6, 300 + 45, device=DEVICE)
        view = big[:, 7:307]  # row stride 345 != K, stride(1) == 1: used in place
        assert not view.is_contiguous() and view.stride(1) == 1
    z = view.clone().requires_grad_(True)  # reference grad on a plain copy
    leaf = big.clone().requires_grad_(True)
    sub = leaf[:, ::2] if kind == "slice" else leaf[:, 7:307]
    w = torch.rand(6, device=DEVICE)
    out = kl_uniform_rows(sub)
    (out * w).sum().backward()
    ref = kl_uniform_ref(z)
    (ref * w).sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grad_sub = leaf.grad[:, ::2] if kind == "slice" else leaf.grad[:, 7:307]
    torch.testing.assert_close(grad_sub, z.grad, atol=1e-6, rtol=1e-5)
    mask = torch.ones_like(leaf.grad, dtype=torch.bool)
    if kind == "slice":
        mask[:, ::2] = False
    else:
        mask[:, 7:307] = False
    assert (leaf.grad[mask] == 0).all()


def test_kl_uniform_reference_gradcheck():
    z = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(kl_uniform_ref, (z,))
    # and the closed form the kernel uses is the reference gradient
    (g,) = torch.autograd.grad(kl_uniform_ref(z).sum(), z)
    torch.testing.assert_close(g, torch.softmax(z.detach(), 1) - 1.0 / 7)


def test_kl_uniform_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        kl_uniform_rows(torch.randn(3, 4, 5, device=DEVICE))
    with pytest.raises(ValueError, match="float32"):
        kl_uniform_rows(torch.randint(0, 3, (3, 4), device=DEVICE))


# ---------------------------------------------------------------- confidence_loss


def _check_conf_once(B, K, n_ood, beta, dtype=torch.float32, atol=1e-5, rtol=1e-5, upstream=1.0):
    z0 = torch.randn(B, K, device=DEVICE).to(dtype)
    targets = torch.randint(0, K, (B,), device=DEVICE)
    targets[torch.randperm(B, device=DEVICE)[:n_ood]] = -1

    z = z0.clone().requires_grad_(True)
    loss = confidence_loss(z, targets, beta)
    assert loss.shape == () and loss.dtype == torch.float32
    (loss * upstream).backward()

    zr = z0.float().clone().requires_grad_(True)
    ref = confidence_loss_ref(zr, targets, beta)
    (ref * upstream).backward()
    torch.testing.assert_close(loss, ref.detach(), atol=atol, rtol=rtol)
    torch.testing.assert_close(z.grad.float(), zr.grad, atol=atol, rtol=rtol)
    return loss, z.grad


@pytest.mark.parametrize(
    "B,K,n_ood,beta",
    [(16, 10, 5, 1.0), (33, 100, 11, 0.5), (8, 1000, 7, 2.0), (3, BIG_K, 1, 1.0), (12, 10, 0, 1.0), (12, 10, 12, 3.0)],
)
def test_confidence_loss(B, K, n_ood, beta):
    _check_conf_once(B, K, n_ood, beta)


def test_confidence_loss_upstream_scale_and_beta0():
    _check_conf_once(10, 20, 4, 1.5, upstream=0.3)
    _check_conf_once(10, 20, 4, 0.0)


def test_confidence_loss_bf16():
    _check_conf_once(16, 100, 6, 1.0, dtype=torch.bfloat16, atol=1e-2, rtol=1e-2)


def test_confidence_loss_all_ood_vs_kl():
    z = torch.randn(9, 30, device=DEVICE)
    t = torch.full((9,), -1, dtype=torch.long, device=DEVICE)
    got = confidence_loss(z, t, 2.0)
    torch.testing.assert_close(got, 2.0 * kl_uniform_ref(z).mean(), atol=1e-5, rtol=1e-5)


def test_confidence_loss_no_grad():
    z = torch.randn(10, 20, device=DEVICE, requires_grad=True)
    t = torch.tensor([0, 1, -1, 3, -1, 5, 6, 7, -1, 19], device=DEVICE)
    with torch.no_grad():
        got = confidence_loss(z, t, 1.0)
    assert not got.requires_grad
    torch.testing.assert_close(got, confidence_loss_ref(z.detach(), t, 1.0), atol=1e-5, rtol=1e-5)


def test_confidence_loss_int32_targets_and_strided_rows():
    big = torch.randn(10, 64, device=DEVICE)
    z = big[:, 3:43]
    t = torch.tensor([0, 1, -1, 3, -1, 5, 6, 7, -1, 39], dtype=torch.int32, device=DEVICE)
    got = confidence_loss(z, t, 0.7)
    torch.testing.assert_close(got, confidence_loss_ref(z, t.long(), 0.7), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "targets,beta,match",
    [
        (torch.tensor([0, 1, 10, -1]), 1.0, r"\[0, 10\)"),
        (torch.tensor([0, 1, -2, -1]), 1.0, r"\[0, 10\)"),
        (torch.tensor([0.0, 1.0, 2.0, -1.0]), 1.0, "integer"),
        (torch.tensor([0, 1, 2]), 1.0, r"shape \(B,\)"),
        (torch.tensor([[0, 1, 2, -1]]), 1.0, r"shape \(B,\)"),
        (torch.tensor([0, 1, 2, -1]), -0.5, "beta"),
        (torch.tensor([0, 1, 2, -1]), float("nan"), "beta"),
    ],
)
def test_confidence_loss_invalid(targets, beta, match):
    z = torch.randn(4, 10, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match=match):
        confidence_loss(z, targets.to(DEVICE), beta)


# ---------------------------------------------------------------- ODIN

TEMPS = (1.0, 10.0, 100.0, 500.0, 1000.0)


def odin_ref(z, temps):
    """Per temperature: score = max softmax(z/T); grad of sum CE(z/T, argmax z)."""
    yhat = z.argmax(1)
    scores, grads = [], []
    for T in temps:
        zz = z.detach().float().clone().requires_grad_(True)
        scores.append(torch.softmax(zz.detach() / T, 1).max(1).values)
        loss = F.cross_entropy(zz / T, yhat, reduction="sum")
        (g,) = torch.autograd.grad(loss, zz)
        grads.append(g)
    return torch.stack(scores), torch.stack(grads)


def _check_odin_once(B, K, dtype=torch.float32, scale=3.0, temps=TEMPS, atol=1e-5):
    z = (torch.randn(B, K, device=DEVICE) * scale).to(dtype)
    scores, grads = odin_logit_grads(z, temps)
    assert scores.shape == (len(temps), B) and grads.shape == (len(temps), B, K)
    assert scores.dtype == torch.float32 and grads.dtype == torch.float32
    rs, rg = odin_ref(z.float(), temps)
    torch.testing.assert_close(scores, rs, atol=atol, rtol=1e-5)
    torch.testing.assert_close(grads, rg, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("B,K", [(1, 10), (16, 10), (9, 100), (4, 1000), (2, BIG_K)])
def test_odin_logit_grads(B, K):
    _check_odin_once(B, K)


def test_odin_logit_grads_bf16_and_tensor_temps():
    z = torch.randn(8, 50, device=DEVICE).to(torch.bfloat16)
    temps = torch.tensor(TEMPS, dtype=torch.float64)
    scores, grads = odin_logit_grads(z, temps)
    rs, rg = odin_ref(z.float(), TEMPS)
    torch.testing.assert_close(scores, rs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads, rg, atol=1e-5, rtol=1e-5)


def test_odin_logit_grads_ties_and_strided():
    z = torch.zeros(3, 8, device=DEVICE)
    z[0, [2, 5]] = 4.0  # tie: torch.argmax picks the first
    z[1] = torch.arange(8.0)
    big = torch.randn(3, 20, device=DEVICE)
    big[:, 4:12] = z
    _, grads = odin_logit_grads(big[:, 4:12], [1.0, 2.0])
    _, rg = odin_ref(z, [1.0, 2.0])
    torch.testing.assert_close(grads, rg, atol=1e-6, rtol=1e-5)
    assert grads[0, 0, 2] < 0 and grads[0, 0, 5] > 0


def test_odin_logit_grads_invalid():
    z = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="temperatures"):
        odin_logit_grads(z, [1.0, 0.0])
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        odin_logit_grads(z[0], [1.0])


def perturb_ref(x, grad, eps, std=None):
    sign = torch.where(grad >= 0, 1.0, -1.0)
    outs = []
    for e in eps:
        step = e * sign
        if std is not None:
            step = step / torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        outs.append((x.float() - step).to(x.dtype))
    return torch.stack(outs)


EPS = (0.0, 0.0014, 0.002, 0.05)
STD = (0.2470, 0.2435, 0.2616)


@pytest.mark.parametrize("use_std", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_odin_perturb(use_std, dtype):
    x = torch.randn(3, 3, 9, 11, device=DEVICE).to(dtype)
    grad = torch.randn(3, 3, 9, 11, device=DEVICE)
    grad[grad.abs() < 0.3] = 0.0  # plenty of exact zeros: sign +1
    assert (grad == 0).sum() > 50
    std = STD if use_std else None
    out = odin_perturb(x, grad, EPS, std=std)
    assert out.shape == (len(EPS),) + x.shape and out.dtype == dtype
    ref = perturb_ref(x, grad, EPS, std)
    # fp32: bit-exact. bf16: within one bf16 ulp, since Triton's CPU interpreter
    # rounds fp32 -> bf16 toward zero while torch (and the GPU) round to nearest.
    # fp32: Triton's default fp32 division on a GPU is not IEEE-rounded, so
    # eps / std may differ by an ulp (<< the smallest step, 0.0014 / 0.26).
    tol = dict(atol=1e-6, rtol=0.0) if dtype == torch.float32 else dict(atol=0.0, rtol=2.0**-7)
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    assert torch.equal(out[0], x)  # eps = 0 is the identity
    # zero gradient moves against +1: x - eps / std
    zero = grad == 0
    s = torch.tensor(STD).view(1, 3, 1, 1) if use_std else torch.ones(1, 3, 1, 1)
    expect = (x.float() - 0.05 / s.to(DEVICE)).to(dtype)
    torch.testing.assert_close(out[3][zero].float(), expect.expand_as(x)[zero].float(), **tol)
    assert (out[3][zero].float() < x[zero].float()).all()


def test_odin_perturb_any_shape_and_tensor_args():
    x = torch.randn(5, 7, device=DEVICE)
    g = torch.randn(5, 7, device=DEVICE).t().contiguous().t()  # non-contiguous grad
    eps = torch.tensor([0.01, 0.1], device=DEVICE)
    out = odin_perturb(x, g, eps)
    torch.testing.assert_close(out, perturb_ref(x, g, [0.01, 0.1]), atol=0, rtol=0)
    with pytest.raises(ValueError, match="channels"):
        odin_perturb(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), [0.1], std=[1.0, 2.0])


class TinyNet(nn.Module):
    def __init__(self, n_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, n_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


@pytest.fixture
def no_tf32():
    # on GPUs cuDNN convolutions default to TF32; the 1e-5 comparison needs fp32
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("use_std", [False, True])
def test_odin_end_to_end(use_std, no_tf32):
    net = TinyNet().to(DEVICE).eval()
    net.fc.weight.data *= 5.0  # spread the logits so temperatures matter
    x = torch.randn(6, 3, 16, 16, device=DEVICE)
    temps = (1.0, 10.0, 1000.0)
    std = STD if use_std else None
    std_t = torch.tensor(STD, device=DEVICE).view(1, 3, 1, 1) if use_std else 1.0

    # reference: the ODIN recipe, one temperature and one eps at a time
    ref = torch.empty(len(temps), len(EPS), x.shape[0], device=DEVICE)
    for ti, T in enumerate(temps):
        xr = x.clone().requires_grad_(True)
        out = net(xr)
        loss = F.cross_entropy(out / T, out.argmax(1), reduction="sum")
        loss.backward()
        sign = torch.where(xr.grad >= 0, 1.0, -1.0)
        for ei, eps in enumerate(EPS):
            xp = x - eps * sign / std_t
            with torch.no_grad():
                ref[ti, ei] = torch.softmax(net(xp) / T, 1).max(1).values

    # kernels: one forward, logit gradients for all T, one backward per T,
    # perturbations for all eps in one launch, one batched forward
    xk = x.clone().requires_grad_(True)
    logits = net(xk)
    scores0, grads = odin_logit_grads(logits.detach(), temps)
    got = torch.empty_like(ref)
    for ti, T in enumerate(temps):
        (gx,) = torch.autograd.grad(logits, xk, grad_outputs=grads[ti], retain_graph=True)
        xp = odin_perturb(x, gx, EPS, std=std)
        with torch.no_grad():
            out = net(xp.flatten(0, 1)) / T
        got[ti] = torch.softmax(out, 1).max(1).values.view(len(EPS), -1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # eps = 0 reproduces the unperturbed scores of odin_logit_grads
    torch.testing.assert_close(got[:, 0], scores0, atol=1e-5, rtol=1e-5)
    # the perturbation raises the max softmax score on average (ODIN's premise)
    assert (got[:, -1] - got[:, 0]).mean() > 0


# ---------------------------------------------------------------- package


def test_package_flags():
    assert kernels.AVAILABLE is True
    assert kernels.can_run(torch.zeros(1, device=DEVICE))
    for name in ("kl_uniform_rows", "confidence_loss", "odin_logit_grads", "odin_perturb"):
        assert callable(getattr(kernels, name))


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")           # the authors' kl_div(...) * K, on purpose
def test_float64_logits_take_the_exact_path_under_auto_and_are_refused_by_triton():
    """The kernels take fp32/fp16/bf16: with impl auto, where they could run, float64 logits go to the torch path
    (exact, the authors' kl_div times K in float64) instead of failing; impl triton names the dtype."""
    import confident
    z = (torch.randn(6, 10, dtype=torch.float64) * 3).to(DEVICE)
    t = torch.tensor([1, -1, 3, -1, 0, 9], device=DEVICE)
    U = torch.full_like(z, 0.1)
    authors = F.kl_div(F.log_softmax(z, dim=1), U, reduction="mean") * 10
    got = confident.kl_to_uniform(z, impl="auto")
    assert got.dtype == torch.float64 and abs(float(got - authors)) < 1e-12
    cl = confident.confidence_loss(z, t, 0.5, impl="auto")
    want = F.nll_loss(F.log_softmax(z[t >= 0], 1), t[t >= 0]) \
        + 0.5 * F.kl_div(F.log_softmax(z[t < 0], 1), U[t < 0], reduction="mean") * 10
    assert cl.dtype == torch.float64 and abs(float(cl - want)) < 1e-12
    for fn in (lambda: confident.kl_to_uniform(z, impl="triton"),
               lambda: confident.confidence_loss(z, t, 0.5, impl="triton")):
        with pytest.raises(confident.ConfidentError, match="torch.float64 logits"):
            fn()
