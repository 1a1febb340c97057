"""Joint training (Algorithm 1) step by step against a transcription of the authors' mini-batch loop, and the
classifier steps of Eq. (1) and Eq. (5) against the paper's equations written out.

The reference below is written from the description of the authors' training script in the project's reference
notes ("Each mini-batch, in order"), in their own terms: a discriminator that ends in a sigmoid scored with
binary cross-entropy on probabilities, the classifier's loss as NLL of log-softmax, and the KL term as
`kl_div(log_softmax(z), U)` with element-mean reduction times K. It shares no helper with confident.py.

Both sides start from the same weights and read the same latent vectors in the same order (D's batch z, then
the classifier's fresh z'). Dropout is off on both sides: the authors run the classifier on the real and the
generated batch in two forwards, this project in one, so the two draw dropout masks in a different order; with
dropout off the two must agree to rounding. Everything else (BatchNorm in G and D in train mode, the
classifier in train mode for every KL term, Adam's settings) is as in training.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import confident
from confident import Config

# the authors' KL is kl_div with reduction "mean" (over elements) times K, which PyTorch warns about
pytestmark = pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")


def _no_dropout(m: nn.Module) -> nn.Module:
    for name, child in m.named_children():
        if isinstance(child, nn.Dropout):
            setattr(m, name, nn.Identity())
        else:
            _no_dropout(child)
    return m


class _AuthorsD(nn.Module):
    """The authors' discriminator returns sigmoid probabilities (their last layer is nn.Sigmoid)."""

    def __init__(self, d_logits: nn.Module):
        super().__init__()
        self.d = d_logits

    def forward(self, x):
        return torch.sigmoid(self.d(x)).view(-1)


def pull_away_paper(samples):
    """App. D: PT = 1 / (M (M - 1)) * sum over i != j of (G(z_i)^T G(z_j) / (|G(z_i)| |G(z_j)|))^2."""
    M, flat = samples.shape[0], samples.reshape(samples.shape[0], -1)
    total = 0.0
    for i in range(M):
        for j in range(M):
            if i != j:
                total = total + (flat[i] @ flat[j] / (flat[i].norm() * flat[j].norm())) ** 2
    return total / (M * (M - 1))


def authors_gan_half(model, netG, netD, optimizerG, optimizerD, data, z, beta, K, pt_weight=0.0):
    """Steps 1 and 2 of the authors' mini-batch: D, then G. beta = 0 is the ordinary GAN (conf-gan's first phase,
    the paper's "pre-trained original GAN"); pt_weight > 0 adds App. D's pull-away term to G's loss (joint-pt;
    not in the authors' code)."""
    bce = nn.BCELoss()
    uniform_dist = torch.full((data.shape[0], K), 1.0 / K)
    # 1. D: real images labelled 1, G(z) (detached) labelled 0; one step
    optimizerD.zero_grad()
    errD_real = bce(netD(data), torch.ones(data.shape[0]))
    errD_real.backward()
    fake = netG(z)
    errD_fake = bce(netD(fake.detach()), torch.zeros(data.shape[0]))
    errD_fake.backward()
    optimizerD.step()
    # 2. G: the same fake batch scored by the updated D, non-saturating form, + beta * KL(U || p(y | G(z)))
    optimizerG.zero_grad()
    errG = bce(netD(fake), torch.ones(data.shape[0]))
    errG_total = errG
    if beta:
        errG_KL = F.kl_div(F.log_softmax(model(fake), dim=1), uniform_dist, reduction="mean") * K
        errG_total = errG_total + beta * errG_KL
    if pt_weight:
        errG_total = errG_total + pt_weight * pull_away_paper(fake)
    errG_total.backward()
    optimizerG.step()
    return {"d": (errD_real + errD_fake).item(), "g": errG_total.item()}


def authors_classifier_step(model, netG, optimizer, data, target, z2, beta, K):
    """Step 3 of the authors' mini-batch: NLL on the real batch + beta * KL on G's samples from a fresh z'."""
    uniform_dist = torch.full((data.shape[0], K), 1.0 / K)
    optimizer.zero_grad()
    loss = F.nll_loss(F.log_softmax(model(data), dim=1), target)
    fake2 = netG(z2)
    KL_loss_fake = F.kl_div(F.log_softmax(model(fake2), dim=1), uniform_dist, reduction="mean") * K
    total = loss + beta * KL_loss_fake
    total.backward()
    optimizer.step()
    return {"c": total.item()}


def authors_minibatch(model, netG, netD, optimizer, optimizerG, optimizerD, data, target, z, z2, beta, K,
                      pt_weight=0.0):
    """One mini-batch of the authors' joint training, in their order: D, G, then the classifier."""
    out = authors_gan_half(model, netG, netD, optimizerG, optimizerD, data, z, beta, K, pt_weight)
    out.update(authors_classifier_step(model, netG, optimizer, data, target, z2, beta, K))
    return out


def _trainer(method, beta, B, K, pt_weight=1.0):
    """A tiny Trainer with dropout off and its classifier's logits spread: the authors' init, N(0, 0.01) linear
    layers, leaves a tiny VGG's logits nearly constant, and so the KL terms' gradients tiny; spread, each term of
    each loss weighs in the comparison."""
    cfg = Config(in_data="fashion-mnist", method=method, width=0.0625, epochs=1, batch_size=B, beta=beta,
                 impl="torch", log_every=10 ** 9, pt_weight=pt_weight)
    tr = confident.Trainer(cfg, K, torch.device("cpu"), log=lambda *a, **k: None)
    _no_dropout(tr.net)
    with torch.no_grad():
        for m in tr.net.head:
            if isinstance(m, nn.Linear):
                m.weight.mul_(30)
    return tr, cfg


def _setup(beta, seed=0, B=8, steps=3, K=10, method="joint", pt_weight=1.0):
    torch.manual_seed(seed)
    tr, cfg = _trainer(method, beta, B, K, pt_weight)
    # the authors' side: copies of the same networks, with the optimisers of their script
    model, netG = copy.deepcopy(tr.net), copy.deepcopy(tr.G)
    netD = _AuthorsD(copy.deepcopy(tr.D))
    opts = (torch.optim.Adam(model.parameters(), lr=2e-4),
            torch.optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999)),
            torch.optim.Adam(netD.parameters(), lr=2e-4, betas=(0.5, 0.999)))
    g = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.rand(B, 3, 32, 32, generator=g), torch.randint(0, K, (B,), generator=g),
                torch.randn(B, cfg.nz, generator=g), torch.randn(B, cfg.nz, generator=g)) for _ in range(steps)]
    return tr, (model, netG, netD), opts, batches


def _record_grads(opt: torch.optim.Optimizer) -> list:
    """Wraps opt.step to keep a copy of every gradient it is about to apply, one list per step."""
    log, step = [], opt.step

    def recording_step(*a, **k):
        log.append([p.grad.detach().clone() for g in opt.param_groups for p in g["params"]])
        return step(*a, **k)
    opt.step = recording_step
    return log


def _run_both(tr, nets, opts, batches, beta, K=10, queue_of=lambda z, z2: [z, z2], pt_weight=0.0):
    """Runs our steps and the authors' on the same batches. Returns the losses of both sides, and for each
    network (net, G, D) both sides' gradients at every step."""
    model, netG, netD = nets
    ours_g = {k: _record_grads(tr.opts[k]) for k in ("net", "G", "D")}
    theirs_g = {k: _record_grads(o) for k, o in zip(("net", "G", "D"), opts)}
    ours, theirs = [], []
    for x, y, z, z2 in batches:
        # each step starts both sides from the same state (weights, BatchNorm statistics, Adam's moments): where a
        # gradient is ~1e-8, Adam's eps, rounding alone moves that weight by a fraction of lr, and such a weight
        # would otherwise make the next step's gradients differ by more than rounding
        for mine, theirs_m in ((tr.net, model), (tr.G, netG), (tr.D, netD.d)):
            theirs_m.load_state_dict(mine.state_dict())
        for k, o in zip(("net", "G", "D"), opts):
            o.load_state_dict(copy.deepcopy(tr.opts[k].state_dict()))     # (Adam would share moment tensors)
        queue = queue_of(z, z2)                          # D's batch first, then the classifier's fresh batch
        tr._noise = lambda n, q=queue: q.pop(0)
        ours.append({k: float(v) for k, v in tr.step(x, y).items() if k in ("d", "g", "c")})
        assert not queue                                 # exactly two latent batches per step, as the authors
        theirs.append(authors_minibatch(model, netG, netD, *opts, x, y, z, z2, beta, K, pt_weight))
    return ours, theirs, {k: (ours_g[k], theirs_g[k]) for k in ours_g}


def _worst(pair) -> float:
    """The largest difference between two runs' gradients, relative to the largest gradient of that tensor."""
    ours, theirs = pair
    assert len(ours) == len(theirs) > 0
    return max(((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()
               for sa, sb in zip(ours, theirs) for a, b in zip(sa, sb))


def _buffers_close(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.allclose(p, q, rtol=1e-5, atol=1e-7) for p, q in zip(a.buffers(), b.buffers()))


@pytest.mark.parametrize("beta,method,pt", [(1.0, "joint", 0.0), (0.1, "joint", 0.0), (1.0, "joint-pt", 0.7)])
def test_joint_steps_equal_the_authors_minibatch_loop(beta, method, pt):
    """joint: the authors' loop; joint-pt: the same with App. D's pull-away term (weight 0.7) in G's loss."""
    tr, nets, opts, batches = _setup(beta, method=method, pt_weight=pt or 1.0)
    for ours, theirs in zip(tr.opts.values(), opts):     # the same optimiser settings (net, G, D)
        assert type(ours) is type(theirs) and ours.defaults == theirs.defaults
    ours, theirs, grads = _run_both(tr, nets, opts, batches, beta, pt_weight=pt)
    for o, t in zip(ours, theirs):
        for k in ("d", "g", "c"):
            assert o[k] == pytest.approx(t[k], rel=1e-5, abs=1e-6), (k, ours, theirs)
    # every gradient of the three networks at every step (rounding leaves at most ~6e-6 of the largest)
    for k, pair in grads.items():
        assert _worst(pair) < 3e-5, k
    model, netG, netD = nets
    assert _buffers_close(tr.G, netG) and _buffers_close(tr.D, netD.d)    # BatchNorm's running statistics


def test_the_comparison_tells_a_different_order_apart():
    """The comparison can fail: our step with the classifier's KL batch drawn from D's latent vectors (not a fresh
    z'), or with G's step lacking the KL term (or joint-pt's lacking the pull-away term), gives gradients far
    outside the tolerance above."""
    tr, nets, opts, batches = _setup(1.0)
    _, _, grads = _run_both(tr, nets, opts, batches, 1.0, queue_of=lambda z, z2: [z, z])
    assert _worst(grads["net"]) > 1e-2

    tr, nets, opts, batches = _setup(1.0)
    gan_step = tr._gan_step
    tr._gan_step = lambda x, kl_beta, pt: gan_step(x, 0.0, pt)           # G trained as an ordinary GAN
    _, _, grads = _run_both(tr, nets, opts, batches, 1.0)
    assert _worst(grads["G"]) > 1e-2

    tr, nets, opts, batches = _setup(1.0, method="joint-pt", pt_weight=0.7)
    gan_step = tr._gan_step
    tr._gan_step = lambda x, kl_beta, pt: gan_step(x, kl_beta, 0.0)      # joint-pt without its term
    _, _, grads = _run_both(tr, nets, opts, batches, 1.0, pt_weight=0.7)
    assert _worst(grads["G"]) > 1e-2


# ------------------------------------------------------------------------------------------------
# The regimes with a real OOD batch: one classifier step against the paper's equations written out

def _kl_uniform_by_definition(logits):
    """KL(U || p) = sum_y (1/K) log((1/K) / p(y | x)), averaged over the batch."""
    K = logits.shape[1]
    return ((1.0 / K) * (math.log(1.0 / K) - F.log_softmax(logits, 1))).sum(1).mean()


@pytest.mark.parametrize("method", ["conf", "kplus1"])
def test_classifier_step_with_a_real_ood_batch_follows_eq1_and_eq5(method):
    """conf, Eq. (1): E_in[-log p(y|x)] + beta * E_out[KL(U || p(y|x))]; kplus1, Eq. (5): E_in[-log p(y|x)] +
    E_out[-log p(y = K+1 | x)] on K+1 outputs. One Adam step each from the same weights, gradients compared."""
    torch.manual_seed(0)
    K, B, beta = 10, 8, 0.3
    tr, _ = _trainer(method, beta, B, K)
    model = copy.deepcopy(tr.net)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    g = torch.Generator().manual_seed(1)
    x, x_out = torch.rand(B, 3, 32, 32, generator=g), torch.rand(B, 3, 32, 32, generator=g)
    y = torch.randint(0, K, (B,), generator=g)
    ours = _record_grads(tr.opts["net"])
    theirs = _record_grads(opt)
    got = float(tr.step(x, y, x_out)["c"])
    opt.zero_grad()
    ce_in = -F.log_softmax(model(x), 1).gather(1, y[:, None]).mean()
    if method == "conf":
        loss = ce_in + beta * _kl_uniform_by_definition(model(x_out))
    else:
        loss = ce_in - F.log_softmax(model(x_out), 1)[:, K].mean()       # class K+1 is index K
    loss.backward()
    opt.step()
    assert got == pytest.approx(loss.item(), rel=1e-5)
    assert _worst((ours, theirs)) < 3e-5


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_conf_gan_phases_equal_the_authors_gan_then_the_classifier_step(beta):
    """conf-gan, the paper's "confidence loss with samples from a pre-trained original GAN": while epoch <
    gan_epochs a step is the authors' D and G updates without the KL term, the classifier untouched; afterwards
    it is the authors' classifier step on samples of the trained G, which is no longer updated (nor D)."""
    tr, nets, opts, batches = _setup(beta, method="conf-gan")
    model, netG, netD = nets
    opt_c, opt_g, opt_d = opts
    ours_g = {k: _record_grads(tr.opts[k]) for k in ("net", "G", "D")}
    theirs_g = {k: _record_grads(o) for k, o in zip(("net", "G", "D"), opts)}
    for phase in ("gan", "classifier"):
        if phase == "classifier":
            tr.end_epoch()                               # gan_epochs = epochs = 1: the GAN phase is over
            net_before = copy.deepcopy(tr.net.state_dict())
        for x, y, z, z2 in batches:
            for mine, theirs_m in ((tr.net, model), (tr.G, netG), (tr.D, netD.d)):
                theirs_m.load_state_dict(mine.state_dict())
            for k, o in zip(("net", "G", "D"), opts):
                o.load_state_dict(copy.deepcopy(tr.opts[k].state_dict()))
            g_before, d_before = copy.deepcopy(tr.G.state_dict()), copy.deepcopy(tr.D.state_dict())
            queue = [z] if phase == "gan" else [z2]      # one latent batch per step in either phase
            tr._noise = lambda n, q=queue: q.pop(0)
            got = {k: float(v) for k, v in tr.step(x, y).items() if k in ("d", "g", "c")}
            assert not queue
            if phase == "gan":
                want = authors_gan_half(model, netG, netD, opt_g, opt_d, x, z, 0.0, 10)
                assert set(got) == {"d", "g"}
            else:
                want = authors_classifier_step(model, netG, opt_c, x, y, z2, beta, 10)
                assert set(got) == {"c"}
                for k, v in tr.D.state_dict().items():  # D is not run, G only sampled (BatchNorm statistics move)
                    assert torch.equal(v, d_before[k])
                for k, v in tr.G.named_parameters():
                    assert torch.equal(v, g_before[k])
            for k in got:
                assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), (phase, k)
        if phase == "gan":                               # the classifier was not trained by the GAN phase
            assert ours_g["net"] == [] and theirs_g["net"] == []
    for k, pair in ((k, (ours_g[k], theirs_g[k])) for k in ("net", "G", "D")):
        assert len(pair[0]) == len(batches), k           # G and D: the GAN phase's steps; net: the classifier's
        assert _worst(pair) < 3e-5, k
    assert _buffers_close(tr.G, netG)
    assert not all(torch.equal(v, net_before[k]) for k, v in tr.net.state_dict().items())
