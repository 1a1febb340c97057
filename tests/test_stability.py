"""Joint training's diagnostics and stabilisers (flags beyond the paper; stability.py's StudyConfig and
StudyTrainer, on top of confident.py's Trainer), and stability.py's report and selection rule. The stabilisers
are checked against their definitions written out here, not against our own helpers."""
import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import confident
import stability
from confident import Config, ConfidentError
from stability import StudyConfig, StudyTrainer

DATA = Path(__file__).resolve().parent.parent / "data"


def _quiet(*a, **k):
    pass


def _data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 32, 32, generator=g) * 255).to(torch.uint8), torch.randint(0, 10, (n,), generator=g)


def _cfg(**kw):
    base = dict(in_data="fashion-mnist", method="joint", width=0.0625, epochs=2, batch_size=32, log_every=10 ** 9,
                impl="torch")
    base.update(kw)
    return StudyConfig(**base)


def _train(**kw):
    x, y = _data()
    return confident.train(_cfg(**kw), x, y, log=_quiet, trainer_cls=StudyTrainer)


# ------------------------------------------------------------------------------------------------
# The seam: the study's fields, flags and code outside confident.py

MOVED = ("gan_width", "diag_every", "ema_raw_frac", "g_ema_debias", "d_sn", "d_lr_mult", "gan_lr_mult", "replay",
         "r1", "clip_grad", "beta_warmup")


def test_confident_holds_none_of_the_studys_fields_flags_or_probe():
    fields = {f.name for f in dataclasses.fields(Config)}
    assert fields.isdisjoint(MOVED) and "g_ema" in fields            # --g-ema stays: the study's remedy
    flags = {a.dest for a in confident.build_parser()._actions}
    assert flags.isdisjoint(MOVED) and "g_ema" in flags
    assert not hasattr(confident, "TrainingProbe")
    with pytest.raises(SystemExit) as e:                              # the CLI does not know the study's flags
        confident.main(["--d-sn"])
    assert e.value.code == 2
    study = {f.name for f in dataclasses.fields(StudyConfig)}
    assert study == fields | set(MOVED)


def test_study_train_subcommand_names_the_studys_flags(capsys):
    flags = {a.dest: a.option_strings for a in confident.build_parser(StudyConfig)._actions}
    assert flags["d_sn"] == ["--d-sn", "--no-d-sn"] and flags["r1"] == ["--r1"] and flags["in_data"] == ["--in"]
    with pytest.raises(SystemExit) as e:
        stability.main(["train", "--in", "fashion-mnist", "--out", "mnist", "--method", "ce", "--d-sn"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: --d-sn is a stabiliser of joint training: expected --method "
                                               "joint or joint-pt, not ce")
    help_text = " ".join(confident.build_parser(StudyConfig).format_help().split())
    assert "R1 penalty (r1 / 2) * |grad_x D(x)|^2 on real images" in help_text     # StudyConfig's comments


def test_study_trainer_at_the_papers_values_trains_as_confidents_trainer():
    """The hooks' defaults are confident.py's training: StudyTrainer with every study field at its default gives
    the same weights, bit for bit, as confident.Trainer (joint with --g-ema, the one stabiliser both have)."""
    x, y = _data(64)
    out = []
    for cls, cfg_cls in ((confident.Trainer, Config), (StudyTrainer, StudyConfig)):
        cfg = cfg_cls(in_data="fashion-mnist", method="joint", width=0.0625, epochs=1, batch_size=32, g_ema=0.9,
                      log_every=10 ** 9, impl="torch")
        out.append(confident.train(cfg, x, y, log=_quiet, trainer_cls=cls))
    a, b = ({f"{k}.{n}": t for k, m in tr.raw.items() for n, t in m.state_dict().items()} for tr in out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_value_of_a_study_field_its_tensors_depend_on(tmp_path):
    x, y = _data(64)
    cfg = confident.with_defaults(_cfg(epochs=1, d_sn=True, output_dir=str(tmp_path)))   # as run() resolves it
    confident.train(cfg, x, y, out_dir=tmp_path, log=_quiet, trainer_cls=StudyTrainer)
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    with pytest.raises(ConfidentError, match="was trained with --d-sn True; this run has --d-sn False"):
        confident._check_resumable(dataclasses.replace(cfg, d_sn=False), tmp_path)
    confident._check_resumable(cfg, tmp_path)                         # the same values resume it


# ------------------------------------------------------------------------------------------------
# Diagnostics

def test_diagnostics_leave_training_unchanged_and_cover_every_point():
    plain, probed = _train(), _train(diag_every=3)
    for a, b in zip(plain.net.state_dict().values(), probed.net.state_dict().values()):
        assert torch.equal(a, b)                       # no RNG drawn, no state left behind by the probe
    for a, b in zip(plain.G.state_dict().values(), probed.G.state_dict().values()):
        assert torch.equal(a, b)
    # 256 images / batch 32 = 8 steps an epoch: points at steps 3, 6 and the epoch's last (8), two epochs
    assert [(d["epoch"], d["step"]) for d in probed.diagnostics] == [(1, 3), (1, 6), (1, 8), (2, 3), (2, 6), (2, 8)]
    assert [(d["epoch"], d["step"]) for d in plain.diagnostics] == [(1, 8), (2, 8)]
    for d in probed.diagnostics:
        assert 0 <= d["d_acc_real"] <= 1 and 0 <= d["d_acc_fake"] <= 1
        assert 0.1 - 1e-6 <= d["maxsoftmax_gen"] <= 1 and d["kl_gen"] >= -1e-6
        assert d["nn_dist_gen"] > 0 and d["nn_dist_real"] >= 0 and d["diversity"] > 0


def test_probe_measures_what_it_says():
    """NN distance and diversity against a direct computation on the probe's own images and samples."""
    x, y = _data(64)
    tr = StudyTrainer(_cfg(), 10, torch.device("cpu"), log=_quiet)
    probe = stability.TrainingProbe(x, 100, seed=0, device=torch.device("cpu"), n=8, n_ref=40)
    with torch.no_grad():
        state = copy.deepcopy(tr.G.state_dict())
        fake = tr.G(probe.z).flatten(1)
        tr.G.load_state_dict(state)
        tr.net.eval()
        p = F.softmax(tr.net(tr.G(probe.z)), 1)
        tr.G.load_state_dict(state)
        tr.net.train()
    ref, real = probe.ref, probe.real.flatten(1)
    D = ref.shape[1]
    nn_gen = sum(min(float(((f - r) ** 2).mean().sqrt()) for r in ref) for f in fake) / len(fake)
    pair = lambda a: sum(float(((a[i] - a[j]) ** 2).mean().sqrt()) for i in range(len(a)) for j in range(len(a))
                         if i != j) / (len(a) * (len(a) - 1))
    d = probe(tr)
    assert d["nn_dist_gen"] == pytest.approx(nn_gen, rel=1e-4)
    assert d["diversity"] == pytest.approx(pair(fake) / pair(real), rel=1e-4)
    assert d["maxsoftmax_gen"] == pytest.approx(float(p.max(1).values.mean()), rel=1e-5)
    # KL(U || p) = sum_k (1/K) log((1/K) / p_k), the definition
    kl = float((-(p.log()).mean(1) - math.log(10)).mean())
    assert d["kl_gen"] == pytest.approx(kl, rel=1e-4, abs=1e-6)
    assert D == 3 * 32 * 32


def test_results_json_has_diagnostics_and_validation(tmp_path):
    cfg = StudyConfig(in_data="fashion-mnist", out_data="mnist", method="joint", width=0.0625, epochs=1,
                      train_limit=128, eval_limit=150, val_size=50, batch_size=64, temperatures="1", epsilons="0", extra_ood="none",
                      output_dir=str(tmp_path), impl="torch", data_root=str(DATA), val_ood="photos", diag_every=1,
                      log_every=10 ** 9)
    confident.run(cfg, log=_quiet, trainer_cls=StudyTrainer)
    res = json.loads((tmp_path / "results.json").read_text())
    assert len(res["diagnostics"]) == 2                      # 128 / 64 = 2 steps, one point each
    v = res["validation"]
    assert 0 <= v["accuracy"] <= 1 and set(v["ood"]) == {"photos"}
    assert v["ood"]["photos"]["split"] == "train" and v["ood"]["photos"]["n"] == 2000
    assert "photos" not in res["ood"]                        # the validation set is not a test set here


# ------------------------------------------------------------------------------------------------
# Stabilisers, each against its definition

def test_stabilisers_default_to_the_paper():
    cfg = StudyConfig()
    assert (cfg.g_ema, cfg.d_sn, cfg.d_lr_mult, cfg.gan_lr_mult, cfg.replay, cfg.r1, cfg.beta_warmup) == \
        (0.0, False, 1.0, 1.0, 0, 0.0, 0)


@pytest.mark.parametrize("flag", [dict(g_ema=0.9), dict(d_sn=True), dict(d_lr_mult=2.0), dict(gan_lr_mult=0.2),
                                  dict(replay=10), dict(r1=1.0), dict(beta_warmup=5)])
def test_stabilisers_refused_outside_joint_training(flag):
    with pytest.raises(ConfidentError, match="stabiliser of joint training"):
        confident.resolve(StudyConfig(in_data="fashion-mnist", out_data="mnist", method="ce", **flag))
    confident.resolve(StudyConfig(in_data="fashion-mnist", out_data="mnist", method="joint", **flag))


def test_g_ema_is_an_exponential_moving_average():
    x, y = _data(32)
    tr = StudyTrainer(_cfg(g_ema=0.9), 10, torch.device("cpu"), log=_quiet)
    ema0 = [p.detach().clone() for p in tr.G_ema.parameters()]
    tr.step(confident.to_float(x), y)
    for e0, e1, g in zip(ema0, tr.G_ema.parameters(), tr.G.parameters()):
        assert torch.allclose(e1, 0.9 * e0 + 0.1 * g.detach(), atol=1e-6)
    tr._gan_step(confident.to_float(x), 1.0, 0.0)               # BatchNorm statistics copied after each G step
    for be, b in zip(tr.G_ema.buffers(), tr.G.buffers()):
        assert torch.equal(be, b)
    assert all(not p.requires_grad for p in tr.G_ema.parameters())


def test_g_ema_debias_is_the_bias_corrected_average_of_the_updated_generators():
    # Adam's bias correction (Kingma & Ba 2015, Algorithm 1): m_t = d m_(t-1) + (1 - d) g_t from m_0 = 0, and the
    # estimate m_t / (1 - d^t). Here g_t is G's weights after its t-th update; G's initialisation takes no part.
    x, y = _data(32)
    d = 0.9
    tr = StudyTrainer(_cfg(g_ema=d, g_ema_debias=True), 10, torch.device("cpu"), log=_quiet)
    m = [torch.zeros_like(p) for p in tr.G.parameters()]
    for t in range(1, 5):
        tr.step(confident.to_float(x), y)
        m = [d * mi + (1 - d) * p.detach() for mi, p in zip(m, tr.G.parameters())]
        for mi, e in zip(m, tr.G_ema.parameters()):
            assert torch.allclose(e, mi / (1 - d ** t), atol=1e-6)
    g0 = StudyTrainer(_cfg(g_ema=d), 10, torch.device("cpu"), log=_quiet)
    g0.step(confident.to_float(x), y)                           # without the flag: 0.9 of the initialisation left
    assert not torch.allclose(next(g0.G_ema.parameters()), next(g0.G.parameters()))
    with pytest.raises(ConfidentError, match="--g-ema-debias .*expected --g-ema > 0"):
        confident.resolve(_cfg(g_ema_debias=True))


def test_ema_raw_frac_takes_the_batch_tail_from_the_raw_generator():
    x, y = _data(32)
    tr = StudyTrainer(_cfg(g_ema=0.9, ema_raw_frac=0.25), 10, torch.device("cpu"), log=_quiet)
    tr.step(confident.to_float(x), y)                           # G and its EMA now differ
    torch.manual_seed(5)
    out = tr._kl_samples(8)
    torch.manual_seed(5)                                        # the same codes: 8 for the EMA, then 2 for raw G
    with torch.no_grad():
        z_ema, z_raw = torch.randn(8, tr.cfg.nz), torch.randn(2, tr.cfg.nz)
        ema, raw = tr.G_ema(z_ema), tr.G(z_raw)
    assert torch.allclose(out[:6], ema[:6]) and torch.allclose(out[6:], raw)
    assert not torch.allclose(out[6:], tr.G_ema(z_raw))
    with pytest.raises(ConfidentError, match="--ema-raw-frac 0.5 .*expected --g-ema > 0"):
        confident.resolve(_cfg(ema_raw_frac=0.5))
    with pytest.raises(ConfidentError, match="--ema-raw-frac 1.5: expected in \\[0, 1\\]"):
        confident.resolve(_cfg(g_ema=0.9, ema_raw_frac=1.5))


def test_spectral_norm_and_d_learning_rate():
    tr = StudyTrainer(_cfg(d_sn=True, d_lr_mult=4.0, lr=1e-3), 10, torch.device("cpu"), log=_quiet)
    convs = [m for m in tr.D.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4
    for m in convs:                                            # the weight's largest singular value is ~1
        assert torch.nn.utils.parametrize.is_parametrized(m, "weight")
        for _ in range(20):                                    # let the power iteration converge
            tr.D(torch.rand(2, 3, 32, 32))
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert float(sigma) == pytest.approx(1.0, rel=0.05)
    assert tr.opts["D"].param_groups[0]["lr"] == pytest.approx(4e-3)
    assert tr.opts["G"].param_groups[0]["lr"] == tr.opts["net"].param_groups[0]["lr"] == pytest.approx(1e-3)


def test_gan_learning_rate_multiplier_leaves_the_classifier_alone():
    tr = StudyTrainer(_cfg(gan_lr_mult=0.2, d_lr_mult=4.0, lr=1e-3), 10, torch.device("cpu"), log=_quiet)
    assert tr.opts["net"].param_groups[0]["lr"] == pytest.approx(1e-3)
    assert tr.opts["G"].param_groups[0]["lr"] == pytest.approx(2e-4)
    assert tr.opts["D"].param_groups[0]["lr"] == pytest.approx(8e-4)
    with pytest.raises(ConfidentError, match="--gan-lr-mult 0.0: expected > 0"):
        confident.resolve(_cfg(gan_lr_mult=0.0))


def test_gan_width_sets_g_and_d_and_leaves_the_classifier_alone():
    # DCGAN's layer sizes (ngf = ndf = 64; the sizes asserted in test_models.py) times the GAN's width, 1/8 here:
    # G 100 -> 64 -> 32 -> 16 -> 3, D 3 -> 16 -> 32 -> 64 -> 1; the classifier keeps its own width, 1/4.
    torch.manual_seed(0)
    tr = StudyTrainer(_cfg(width=0.25, gan_width=0.125, g_ema=0.9), 10, torch.device("cpu"), log=_quiet)
    for G in (tr.G, tr.G_ema):
        assert [(m.in_channels, m.out_channels) for m in G.modules() if isinstance(m, torch.nn.ConvTranspose2d)] \
            == [(100, 64), (64, 32), (32, 16), (16, 3)]
    assert [(m.in_channels, m.out_channels) for m in tr.D.modules() if isinstance(m, torch.nn.Conv2d)] == \
        [(3, 16), (16, 32), (32, 64), (64, 1)]
    torch.manual_seed(0)                                    # the classifier is built first: the same initial weights
    same = StudyTrainer(_cfg(width=0.25), 10, torch.device("cpu"), log=_quiet)
    assert all(torch.equal(a, b) for a, b in zip(tr.net.state_dict().values(), same.net.state_dict().values()))
    assert [m.out_channels for m in same.D.modules() if isinstance(m, torch.nn.Conv2d)][0] == 32   # default: = width
    with pytest.raises(ConfidentError, match="--gan-width 0.125 sets the GAN's width: expected .* not ce"):
        confident.resolve(_cfg(method="ce", gan_width=0.125))
    with pytest.raises(ConfidentError, match="--gan-width -1.0: expected 0 \\(= width\\) or in \\(0, 8\\]"):
        confident.resolve(_cfg(gan_width=-1.0))


def test_replay_buffer_fills_and_feeds_half_the_kl_batch():
    x, y = _data(32)
    tr = StudyTrainer(_cfg(replay=40), 10, torch.device("cpu"), log=_quiet)
    xb = confident.to_float(x)
    tr.step(xb, y)
    assert len(tr.replay) == 32                              # first step: all fresh, all kept
    first = tr.replay.clone()
    out = tr._kl_samples(32)                                 # now 16 fresh + 16 from the buffer
    from_buffer = out[16:].flatten(1)
    assert all(bool((first.flatten(1) == r).all(1).any()) for r in from_buffer)
    assert len(tr.replay) == 40 and torch.equal(tr.replay[:16], out[:16])   # newest first, capped at 40
    assert torch.equal(tr.replay[32:], first[:8])           # behind the 32 new ones, the first step's newest 8


def test_r1_penalty_adds_half_r1_times_squared_input_gradient():
    x, y = _data(16)
    xb = confident.to_float(x)
    losses = {}
    for r1 in (0.0, 2.0):
        torch.manual_seed(0)
        tr = StudyTrainer(_cfg(r1=r1), 10, torch.device("cpu"), log=_quiet)
        D0 = copy.deepcopy(tr.D)
        torch.manual_seed(1)
        losses[r1] = float(tr._gan_step(xb, 1.0, 0.0)["d"])
    xr = xb.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(D0(xr).sum(), xr)
    penalty = 2.0 / 2 * float(g.pow(2).sum() / len(xb))
    assert losses[2.0] - losses[0.0] == pytest.approx(penalty, rel=1e-4)


def test_beta_warmup_is_linear():
    tr = StudyTrainer(_cfg(beta=0.5, beta_warmup=4), 10, torch.device("cpu"), log=_quiet)
    seen = []
    x, y = _data(32)
    for _ in range(6):
        seen.append(tr.beta_now())
        tr.step(confident.to_float(x), y)
    assert seen == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5, 0.5])


def test_stabiliser_state_survives_a_checkpoint(tmp_path):
    x, y = _data(64)
    cfg = _cfg(g_ema=0.99, replay=50, beta_warmup=100, epochs=1)
    tr = confident.train(cfg, x, y, out_dir=tmp_path, log=_quiet, trainer_cls=StudyTrainer)
    sd = torch.load(tmp_path / "train_state.pt", weights_only=True)
    tr2 = StudyTrainer(cfg, 10, torch.device("cpu"), log=_quiet)
    tr2.load_state_dict(sd)
    assert tr2.global_step == tr.global_step == 2 and torch.equal(tr2.replay, tr.replay)
    assert tr2.diagnostics == tr.diagnostics and len(tr2.diagnostics) == 1
    for a, b in zip(tr2.G_ema.state_dict().values(), tr.G_ema.state_dict().values()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# stability.py: the report and the selection rule on hand-made results

def _res(acc, val_acc, val_tnr, tnrs):
    m = lambda t: {"tnr_at_tpr95": t / 100, "auroc": 0.5, "detection_acc": 0.5, "aupr_in": 0.5, "aupr_out": 0.5}
    return {"accuracy": acc / 100, "ece": 0.05,
            "ood": {n: {"baseline": m(t), "odin": m(t)} for n, t in zip(stability.TEST_SETS, tnrs)},
            "validation": {"accuracy": val_acc / 100, "ood": {"photos": {"baseline": m(val_tnr)}}}}


def test_selection_rule_reads_validation_only():
    data = {
        "ce": {0: _res(80, 80, 30, [10, 10, 10, 10]), 1: _res(82, 82, 30, [10, 10, 10, 10])},
        # best on every test set, but one seed's validation accuracy is 6 points below ce's mean (81): out
        "joint-a": {0: _res(81, 81, 99, [99, 99, 99, 99]), 1: _res(75, 74.9, 99, [99, 99, 99, 99])},
        # worse on the test sets than joint-c, better on the validation set: picked
        "joint-b": {0: _res(80, 80, 70, [20, 20, 20, 20]), 1: _res(80, 80, 72, [20, 20, 20, 20])},
        "joint-c": {0: _res(80, 80, 60, [90, 90, 90, 90]), 1: _res(80, 80, 62, [90, 90, 90, 90])},
    }
    pick, notes = stability.select(data)
    assert pick == "joint-b"
    assert any(n.startswith("joint-a: out") for n in notes)
    data["joint-narrow-gan"] = {0: _res(80, 80, 99, [10] * 4), 1: _res(80, 80, 99, [10] * 4)}   # not a stabiliser
    assert stability.select(data)[0] == "joint-b"


def test_report_counts_collapses_and_wins(tmp_path):
    data = {"ce": {0: _res(80, 80, 30, [10, 50, 50, 50]), 1: _res(82, 82, 30, [10, 50, 50, 50])},
            "joint": {0: _res(75.9, 76, 50, [20, 60, 40, 60]), 1: _res(81, 81, 50, [5, 60, 60, 60])}}
    text = stability.report(data, tmp_path, "t")
    row = next(l for l in text.splitlines() if l.startswith("| joint |"))
    assert "| 1/2 |" in row                                  # 75.9 < 81 - 5: one collapse
    win = [l for l in text.splitlines() if l.startswith("| joint |")][1]
    assert win.startswith("| joint | 1/2 | 2/2 | 1/2 | 2/2 |")
    assert "Selection rule: not applied (no stabilised arm among these runs)." in text   # joint alone: nothing to pick
    data["joint-x"] = data["ce"]                            # validation accuracy 80 and 82, well above the floor
    assert "**Pick: joint-x.**" in stability.report(data, tmp_path, "t")


def test_clip_grad_bounds_the_classifier_gradient_and_logs_its_norm():
    x, y = _data(32)
    xb = confident.to_float(x)
    norms = {}
    for clip in (0.0, 1e-3):
        torch.manual_seed(0)
        tr = StudyTrainer(_cfg(clip_grad=clip), 10, torch.device("cpu"), log=_quiet)
        logs = tr.step(xb, y)
        g = torch.cat([p.grad.flatten() for p in tr.net.parameters() if p.grad is not None])
        norms[clip] = (float(logs["gnorm"]), float(g.norm()))
    unclipped, _ = norms[0.0]
    assert norms[0.0][1] == pytest.approx(unclipped, rel=1e-5)        # the logged norm is the gradient's norm
    assert norms[1e-3][0] == pytest.approx(unclipped, rel=1e-5)       # logged before clipping
    assert norms[1e-3][1] == pytest.approx(1e-3, rel=1e-3)            # the step used the clipped gradient
    with pytest.raises(ConfidentError, match="stabiliser of joint training"):
        confident.resolve(StudyConfig(in_data="fashion-mnist", out_data="mnist", method="ce", clip_grad=1.0))


def test_probe_runs_for_cross_entropy_too():
    tr = _train(method="ce", diag_every=4)
    assert [(d["epoch"], d["step"]) for d in tr.diagnostics] == [(1, 4), (1, 8), (2, 4), (2, 8)]
    d = tr.diagnostics[-1]
    assert {"c", "acc", "gnorm", "gnorm_max", "maxsoftmax_real", "kl_real"} <= set(d)
    assert not any(k.endswith("_gen") or k.startswith("d_acc") for k in d)
    assert d["gnorm_max"] >= d["gnorm"] > 0


def test_sign_test_is_the_binomial_tail():
    # P(X >= k), X ~ Binomial(n, 1/2): 6 of 8 is (C(8,6) + C(8,7) + C(8,8)) / 2^8 = (28 + 8 + 1) / 256 = 37/256;
    # the rest against scipy's exact binomial test, an implementation that is not ours
    from scipy.stats import binomtest
    assert stability.sign_p(6, 8) == 37 / 256 and stability.sign_p(8, 8) == 1 / 256 and stability.sign_p(0, 8) == 1
    for n in (1, 4, 8, 12):
        for k in range(n + 1):
            assert stability.sign_p(k, n) == pytest.approx(binomtest(k, n, 0.5, alternative="greater").pvalue)


def test_report_gives_paired_differences_from_ce(tmp_path):
    # seeds 0-3; joint's mnist TNR minus ce's: +10, +20, -6, 0 (the tie is not a win): mean +6.0, sample std 11.43
    # (squared deviations 16 + 196 + 144 + 36 = 392, / 3, sqrt), 2 wins of 4: p = (6 + 4 + 1) / 16 = 0.6875
    data = {"ce": {s: _res(80, 80, 30, [10, 50, 50, 50]) for s in range(4)},
            "joint": {s: _res(80, 80, 30, [10 + d, 50, 90, 50]) for s, d in enumerate([10, 20, -6, 0])}}
    data["joint"][4] = _res(80, 80, 30, [99, 99, 99, 99])           # no ce seed 4: not paired
    text = stability.report(data, tmp_path, "t")
    row = next(l for l in text.splitlines() if l.startswith("| joint | +"))
    assert row == ("| joint | +6.0 ± 11.4 (p 0.688) | +0.0 ± 0.0 (p 1.000) | +40.0 ± 0.0 (p 0.062) "
                   "| +0.0 ± 0.0 (p 1.000) |")


def test_report_correlates_the_end_of_training_with_detection(tmp_path):
    # five GAN runs whose KL on real images falls as their mnist TNR rises (a rank correlation of -1 by definition)
    # and whose G diversity rises with it (+1); ce's runs are left out of the correlation
    data = {"ce": {s: _res(80, 80, 30, [10, 50, 50, 50]) for s in range(2)},
            "joint": {}}
    for s, (kl, t) in enumerate([(30, 1), (20, 5), (12, 9), (11, 40), (3, 70)]):
        r = _res(80, 80, 50, [t, 50 + s, 60, 60 - s])
        r["diagnostics"] = [{"kl_real": 99.0, "diversity": 0.0}, {"kl_real": kl, "diversity": t / 10}]  # last counts
        data["joint"][s] = r
    text = stability.report(data, tmp_path, "t")
    assert "over the 5 runs of the GAN arms" in text
    kl = next(l for l in text.splitlines() if l.startswith("| KL(U‖p) on real training images |"))
    div = next(l for l in text.splitlines() if l.startswith("| G's diversity |"))
    assert kl.split(" | ")[1].startswith("-1.00") and div.split(" | ")[1].startswith("+1.00")
    assert kl.split(" | ")[2].startswith("-1.00") and kl.split(" | ")[4].startswith("+1.00")   # gaussian, photos
    assert kl.split(" | ")[3] == "—"                                               # uniform: constant, undefined
    grad = next(l for l in text.splitlines() if l.startswith("| classifier gradient norm |"))
    assert grad.endswith("| — | — | — | — |")                                                  # not logged
    # the samples' table: joint's five runs end at diversity 0.1, 0.5, 0.9, 4.0, 7.0 (mean 2.5, sample std 2.950);
    # no NN distance was logged, so no row; ce has no samples
    assert "| arm | G's diversity | G's NN distance |" not in text
    data["joint"][0]["diagnostics"][-1]["nn_dist_gen"] = 0.2
    for s in range(1, 5):
        data["joint"][s]["diagnostics"][-1]["nn_dist_gen"] = 0.1 * s
    text = stability.report(data, tmp_path, "t")
    assert "| joint | 2.500 ± 2.950 | 0.240 ± 0.114 |" in text and "| ce | " not in text.split("G's NN distance |")[1]


def test_load_joins_several_folders_and_refuses_a_seed_twice(tmp_path):
    for folder, arm, seed in (("a", "ce", 0), ("a", "joint", 0), ("b", "joint-narrow-gan", 0), ("b", "joint", 1)):
        d = tmp_path / folder / f"{arm}-s{seed}"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps(_res(80, 80, 30, [10, 50, 50, 50])))
    (tmp_path / "b" / "ce-s1").mkdir()                       # an unfinished run: no results.json, not loaded
    data = stability.load(f"{tmp_path / 'a'},{tmp_path / 'b'}")
    assert {a: sorted(rs) for a, rs in data.items()} == {"ce": [0], "joint": [0, 1], "joint-narrow-gan": [0]}
    assert list(data) == ["ce", "joint", "joint-narrow-gan"]
    (tmp_path / "b" / "joint-s0").mkdir()
    (tmp_path / "b" / "joint-s0" / "results.json").write_text("{}")
    with pytest.raises(SystemExit, match="joint seed 0 is in more than one"):
        stability.load(f"{tmp_path / 'a'},{tmp_path / 'b'}")
    with pytest.raises(SystemExit, match="expected a folder of runs"):
        stability.load(str(tmp_path / "missing"))


def test_run_goes_through_run_many_two_at_a_time_and_skips_finished_runs(tmp_path, monkeypatch, capsys):
    """`stability.py run` launches each (arm, seed) as `stability.py train` through confident.run_many: two
    processes at a time, every run's results.json written; run again, nothing is redone."""
    tiny = ("--in fashion-mnist --out mnist --width 0.0625 --epochs 1 --train-limit 256 --eval-limit 150 "
            "--val-size 50 --extra-ood none --batch-size 64 --temperatures 1 --epsilons 0 --no-download")
    monkeypatch.setitem(stability.SCALES, "tiny", tiny)
    runs = tmp_path / "runs"
    args = ["run", "--arms", "ce,joint-sn", "--seeds", "0", "--scale", "tiny", "--jobs", "2", "--common", "",
            "--runs", str(runs)]
    stability.main(args)
    out = capsys.readouterr().out
    assert "2 run(s) to do, 0 finished before; 2 at a time" in out, out
    for arm in ("ce", "joint-sn"):
        res = json.loads((runs / f"{arm}-s0" / "results.json").read_text())
        assert res["config"]["seed"] == 0 and "mnist" in res["ood"]
    assert json.loads((runs / "joint-sn-s0" / "config.json").read_text())["d_sn"] is True   # the study's flag ran
    stability.main(args)
    assert capsys.readouterr().out.count("finished before, not run again") == 2
