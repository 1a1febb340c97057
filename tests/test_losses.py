"""Losses: KL(U || p), the confidence loss (Eq. 1), the GAN losses (Eq. 2-3), the pull-away term (App. D) and
the K+1-class loss (Eq. 5), each against an independent formula."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import confident
from confident import confidence_loss, gan_d_loss, gan_g_loss, kl_to_uniform, kplus1_loss, pull_away_term

SHAPES = [(1, 10), (7, 100), (33, 1000), (128, 10), (5, 2)]


def _kl_closed_form(z):
    z = z.double()
    return (torch.logsumexp(z, 1) - z.mean(1) - math.log(z.shape[1])).mean()


def _kl_authors(z):
    """The authors' code: kl_div(log_softmax(z), U) with element-mean reduction, times K."""
    B, K = z.shape
    U = torch.full((B, K), 1.0 / K, dtype=z.dtype)
    with warnings.catch_warnings():                           # 'mean' is deliberate: it is what they used
        warnings.simplefilter("ignore", UserWarning)
        return F.kl_div(F.log_softmax(z, 1), U, reduction="mean") * K


def _kl_by_definition(z):
    """sum_k U_k (log U_k - log p_k), averaged over rows, written out element by element."""
    B, K = z.shape
    p = torch.softmax(z.double(), 1)
    total = 0.0
    for i in range(B):
        total += sum((1.0 / K) * (math.log(1.0 / K) - math.log(float(p[i, k]))) for k in range(K))
    return total / B


def _check_kl_once(shape, scale, dtype=torch.float32, atol=1e-5, rtol=1e-5):
    B, K = shape
    z = (torch.randn(B, K) * scale).to(dtype)
    z_ref, z_cand = z.detach().clone().requires_grad_(True), z.detach().clone().requires_grad_(True)
    ref = _kl_closed_form(z_ref)
    got = kl_to_uniform(z_cand, impl="torch")
    assert got.shape == ()
    torch.testing.assert_close(got.double(), ref, atol=atol, rtol=rtol)
    ref.backward()
    got.backward()
    grad_formula = (torch.softmax(z.double(), 1) - 1.0 / K) / B
    torch.testing.assert_close(z_cand.grad.double(), grad_formula, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(z_ref.grad.double(), grad_formula, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
def test_kl_to_uniform_closed_form_and_gradient(shape, scale):
    _check_kl_once(shape, scale)


@pytest.mark.parametrize("shape", SHAPES)
def test_kl_to_uniform_matches_authors_kl_div_times_k(shape):
    z = torch.randn(*shape, dtype=torch.float64) * 3
    z1, z2 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    a = _kl_authors(z1)
    b = kl_to_uniform(z2, impl="torch")
    torch.testing.assert_close(b.double(), a, atol=1e-6, rtol=1e-6)
    a.backward()
    b.backward()
    torch.testing.assert_close(z2.grad.double(), z1.grad, atol=1e-7, rtol=1e-5)


def test_kl_to_uniform_by_definition_and_zero_at_uniform():
    z = torch.randn(4, 6) * 2
    assert float(kl_to_uniform(z, impl="torch")) == pytest.approx(_kl_by_definition(z), rel=1e-5, abs=1e-6)
    # constant rows are exactly uniform: KL is 0; any other row has KL > 0
    assert float(kl_to_uniform(torch.full((3, 10), 4.2), impl="torch")) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_to_uniform(torch.tensor([[0.0, 1.0]]), impl="torch")) > 1e-3


def test_kl_to_uniform_upstream_gradient_not_one():
    z = torch.randn(9, 13, requires_grad=True)
    (3.5 * kl_to_uniform(z, impl="torch")).backward()
    want = 3.5 * (torch.softmax(z.detach(), 1) - 1 / 13) / 9
    torch.testing.assert_close(z.grad, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 10), (5, 7), (3, 40)])
def test_kl_to_uniform_gradcheck_float64(shape):
    z = torch.randn(*shape, dtype=torch.float64, requires_grad=True) * 2
    z = z.detach().requires_grad_(True)
    out = kl_to_uniform(z, impl="torch")
    assert out.dtype == torch.float64                         # float64 in, float64 math: no silent downcast
    assert torch.autograd.gradcheck(lambda x: kl_to_uniform(x, impl="torch"), (z,))
    assert torch.autograd.gradgradcheck(lambda x: kl_to_uniform(x, impl="torch"), (z,))
    torch.testing.assert_close(out, _kl_closed_form(z), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("big", [1e4, -1e4])
def test_kl_to_uniform_extreme_logits_finite(big):
    B, K = 6, 10
    z = torch.zeros(B, K)
    z[:, 0] = big
    z[3] = big                                                # one row all equal: exactly uniform
    z.requires_grad_(True)
    loss = kl_to_uniform(z, impl="torch")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    # closed form: a row (big, 0, ..., 0) has logsumexp = max(big, 0) + log(1 + ...) and mean = big / K
    if big > 0:
        row = big - big / K - math.log(K)
    else:
        row = math.log(K - 1) - big / K - math.log(K)
    want = (5 * row + 0.0) / 6
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    # float32 resolution at |z| = 1e4 is ~1e-3 in the logits, so ~1e-5 in these gradients (of size ~0.15)
    torch.testing.assert_close(z.grad, (torch.softmax(z.detach().double(), 1) - 1 / K).float() / B,
                               atol=2e-5, rtol=1e-4)


def test_kl_to_uniform_bad_impl_raises():
    with pytest.raises(confident.ConfidentError):
        kl_to_uniform(torch.randn(2, 3), impl="cuda-magic")


# ------------------------------------------------------------------------------------------------
# Confidence loss (Eq. 1)

def _confidence_ref(z, t, beta):
    z = z.double()
    is_in = t >= 0
    loss = torch.zeros((), dtype=torch.float64)
    if is_in.any():
        zi, ti = z[is_in], t[is_in]
        loss = loss + (torch.logsumexp(zi, 1) - zi.gather(1, ti[:, None])[:, 0]).mean()
    if (~is_in).any():
        loss = loss + beta * _kl_closed_form(z[~is_in])
    return loss


@pytest.mark.parametrize("n_in,n_out", [(8, 8), (5, 11), (16, 0), (0, 16), (1, 1)])
@pytest.mark.parametrize("beta", [0.0, 0.1, 1.0, 3.0])
def test_confidence_loss_is_ce_plus_beta_kl(n_in, n_out, beta):
    K = 10
    z = torch.randn(n_in + n_out, K) * 2
    t = torch.cat([torch.randint(0, K, (n_in,)), torch.full((n_out,), -1)])
    perm = torch.randperm(len(t))                              # in and OOD rows interleaved
    z, t = z[perm], t[perm]
    z1, z2 = z.clone().double().requires_grad_(True), z.clone().requires_grad_(True)
    ref = _confidence_ref(z1, t, beta)
    got = confidence_loss(z2, t, beta, impl="torch")
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-5, abs=1e-6)
    ref.backward()
    got.backward()
    torch.testing.assert_close(z2.grad.double(), z1.grad, atol=1e-6, rtol=1e-4)


def test_confidence_loss_all_in_is_cross_entropy_and_all_ood_is_beta_kl():
    z, y = torch.randn(12, 5), torch.randint(0, 5, (12,))
    assert float(confidence_loss(z, y, 0.7, impl="torch")) == pytest.approx(float(F.cross_entropy(z, y)), rel=1e-6)
    t = torch.full((12,), -1)
    assert float(confidence_loss(z, t, 0.7, impl="torch")) == \
        pytest.approx(0.7 * float(_kl_closed_form(z)), rel=1e-5)


# ------------------------------------------------------------------------------------------------
# GAN losses (Eq. 2, 3): the authors use Sigmoid + BCELoss

def test_gan_d_loss_matches_sigmoid_bce():
    d_real, d_fake = torch.randn(16) * 3, torch.randn(16) * 3
    want = F.binary_cross_entropy(torch.sigmoid(d_real), torch.ones(16)) + \
        F.binary_cross_entropy(torch.sigmoid(d_fake), torch.zeros(16))
    assert float(gan_d_loss(d_real, d_fake)) == pytest.approx(float(want), rel=1e-5)
    # by hand: -mean log s(r) - mean log(1 - s(f))
    by_hand = -(torch.sigmoid(d_real).log().mean() + (1 - torch.sigmoid(d_fake)).log().mean())
    assert float(gan_d_loss(d_real, d_fake)) == pytest.approx(float(by_hand), rel=1e-5)


def test_gan_d_loss_gradient_matches_sigmoid_bce():
    a, b = torch.randn(10, requires_grad=True), torch.randn(10, requires_grad=True)
    a2, b2 = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    gan_d_loss(a, b).backward()
    (F.binary_cross_entropy(torch.sigmoid(a2), torch.ones(10))
     + F.binary_cross_entropy(torch.sigmoid(b2), torch.zeros(10))).backward()
    torch.testing.assert_close(a.grad, a2.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b.grad, b2.grad, atol=1e-6, rtol=1e-5)


def test_gan_d_loss_finite_for_saturated_logits():
    loss = gan_d_loss(torch.tensor([-200.0, 50.0]), torch.tensor([200.0, -50.0]))
    assert torch.isfinite(loss) and float(loss) > 100          # confidently wrong: a large, finite loss


def test_gan_g_loss_non_saturating_and_kl_term():
    d_fake = torch.randn(16) * 2
    want = F.binary_cross_entropy(torch.sigmoid(d_fake), torch.ones(16))
    assert float(gan_g_loss(d_fake)) == pytest.approx(float(want), rel=1e-5)
    logits = torch.randn(16, 10) * 2
    for beta in (0.1, 1.0):
        got = gan_g_loss(d_fake, logits, beta, impl="torch")
        assert float(got) == pytest.approx(float(want) + beta * float(_kl_closed_form(logits)), rel=1e-5)
    # beta = 0: the original GAN's generator loss, whatever the classifier says
    assert float(gan_g_loss(d_fake, logits, 0.0, impl="torch")) == pytest.approx(float(want), rel=1e-6)


def test_gan_g_loss_kl_gradient_reaches_classifier_logits():
    d_fake = torch.randn(8)
    logits = torch.randn(8, 10, requires_grad=True)
    gan_g_loss(d_fake, logits, 0.5, impl="torch").backward()
    torch.testing.assert_close(logits.grad, 0.5 * (torch.softmax(logits.detach(), 1) - 0.1) / 8,
                               atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Pull-away term (App. D) and K+1 loss (Eq. 5)

def _pull_away_bruteforce(s):
    M = s.shape[0]
    flat = s.reshape(M, -1).double()
    total = 0.0
    for i in range(M):
        for j in range(M):
            if i != j:
                cos = float(flat[i] @ flat[j]) / (float(flat[i].norm()) * float(flat[j].norm()))
                total += cos ** 2
    return total / (M * (M - 1))


@pytest.mark.parametrize("shape", [(2, 5), (7, 3, 4, 4), (16, 3, 32, 32)])
def test_pull_away_term_bruteforce(shape):
    s = torch.randn(*shape)
    assert float(pull_away_term(s)) == pytest.approx(_pull_away_bruteforce(s), rel=1e-5, abs=1e-7)


def test_pull_away_term_extremes_and_gradient():
    v = torch.randn(1, 20)
    same = v.repeat(6, 1) * torch.arange(1, 7.0)[:, None]      # parallel vectors: cos^2 = 1
    assert float(pull_away_term(same)) == pytest.approx(1.0, rel=1e-5)
    ortho = torch.eye(6) * 3                                    # orthogonal: 0
    assert float(pull_away_term(ortho)) == pytest.approx(0.0, abs=1e-7)
    # gradient against autograd through an independent float64 formula (the module computes in float32)
    s = torch.randn(5, 8, requires_grad=True)
    s64 = s.detach().double().requires_grad_(True)
    pull_away_term(s).backward()
    u = s64 / s64.norm(dim=1, keepdim=True)
    cos2 = (u @ u.t()).pow(2)
    ((cos2.sum() - cos2.diagonal().sum()) / (5 * 4)).backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, atol=1e-6, rtol=1e-4)


def test_kplus1_loss_matches_ce_formula():
    K = 10
    zi, zo = torch.randn(9, K + 1) * 2, torch.randn(7, K + 1) * 2
    y = torch.randint(0, K, (9,))
    want = (torch.logsumexp(zi, 1) - zi[torch.arange(9), y]).mean() + (torch.logsumexp(zo, 1) - zo[:, K]).mean()
    assert float(kplus1_loss(zi, y, zo)) == pytest.approx(float(want), rel=1e-5)
    # the extra class is the last column: putting all OOD mass there drives that term to ~0
    zo_sure = torch.zeros(7, K + 1)
    zo_sure[:, K] = 50.0
    assert float(kplus1_loss(zi, y, zo_sure)) == pytest.approx(float(F.cross_entropy(zi, y)), abs=1e-6)
