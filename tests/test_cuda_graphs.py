"""--cuda-graphs: a training step captured into one CUDA graph (kernels/graphs.py, GraphedStep).

On the CPU (CI): the flag trains eagerly, bit-identically, with one line saying so; combinations a graph cannot
hold are refused; warm-up and capture leave no trace (snapshot / restore); the masked confidence loss a graph
uses equals the eager one; a checkpoint of a captured run loads into eager Adam.

On a CUDA machine (marked `gpu`; CI deselects them with -m "not gpu"): the first steps of every regime, captured,
give the losses and weights of the same steps run eagerly from the same seed; the graph draws the same random
numbers as eager code; the lr drop captures again; checkpoints resume; a step that cannot be captured falls
back to eager training with one line. Every failure message says which regime, step and number differ.
"""
import dataclasses
import types

import pytest
import torch

import confident as C
from kernels import graphs
from stability import StudyConfig, StudyTrainer          # the stabilisers of joint training (beyond the paper)

gpu = pytest.mark.gpu


def _cfg(method="joint", **kw):
    base = dict(in_data="fashion-mnist", out_data="mnist", method=method, model="vgg13", width=0.0625,
                batch_size=16, lr=1e-3, seed=0, epochs=1)
    return StudyConfig(**{**base, **kw})


def _train(*a, **kw):
    return C.train(*a, trainer_cls=StudyTrainer, **kw)


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
            torch.randint(0, 10, (n,), generator=g))


def _weights(tr):
    return {f"{k}.{n}": t for k, m in tr.raw.items() for n, t in m.state_dict().items()}


# ------------------------------------------------------------------------------------------------ CPU


def test_cli_flag():
    p = C.build_parser()
    assert p.parse_args([]).cuda_graphs is False
    assert p.parse_args(["--cuda-graphs"]).cuda_graphs is True
    assert p.parse_args(["--cuda-graphs", "--no-cuda-graphs"]).cuda_graphs is False


def test_flag_on_the_cpu_trains_eagerly_and_bit_identically():
    x, y = _data()
    cfg = _cfg("joint", d_sn=True, g_ema=0.9, log_every=2)
    lines = []
    a = _train(dataclasses.replace(cfg, cuda_graphs=True), x, y, log=lines.append)
    b = _train(cfg, x, y, log=lambda *_: None)
    assert [ln for ln in lines if "cuda-graphs" in ln] == ["--cuda-graphs needs a CUDA device: training eagerly"]
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a.global_step == b.global_step == 4


@pytest.mark.parametrize("flag,value", [("replay", 8), ("beta_warmup", 10)])
def test_combinations_a_graph_cannot_hold_are_refused(flag, value):
    cfg = _cfg("joint", **{flag: value})
    C.resolve(cfg)                                             # fine eagerly
    with pytest.raises(C.ConfidentError, match=f"--cuda-graphs cannot capture --{flag.replace('_', '-')}"):
        C.resolve(dataclasses.replace(cfg, cuda_graphs=True))


@pytest.mark.parametrize("world,cfg,said", [
    (2, _cfg("ce"), "--cuda-graphs does not work with DistributedDataParallel (2 processes): training eagerly"),
    (1, _cfg("joint", replay=8), "--cuda-graphs cannot capture --replay (its buffer changes size every step): "
                                  "training eagerly"),
])
def test_graphed_step_falls_back_where_it_cannot_capture(world, cfg, said):
    """A library caller skips resolve(); DDP is known only at run time. A stand-in trainer on 'cuda' (nothing
    runs on it): the refusal is decided before any CUDA call."""
    lines = []
    gs = graphs.GraphedStep(types.SimpleNamespace(device=torch.device("cuda"), cfg=cfg), lines.append, world)
    assert gs.why_not and lines == [said]


def test_a_failed_capture_says_why_and_trains_on_as_if_never_tried(monkeypatch):
    """The fallback on the CPU: _record (the CUDA part) is replaced by one that changes the trainer, as a warm-up
    would, then fails as a host read inside a capture does (the step's error, then capture_end's after it).
    GraphedStep names the step's error in one line, undoes the changes, and its eager steps are bit-identical
    to a run that never tried."""
    def failing_record(self):
        self.tr.global_step += 3
        with torch.no_grad():
            next(self.tr.net.parameters()).add_(1.0)
        torch.rand(7)
        try:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")
        except RuntimeError:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    monkeypatch.setattr(graphs.GraphedStep, "_record", failing_record)
    cfg = _cfg("joint", batch_size=8)
    x, y = C.to_float(_data(8)[0]), _data(8)[1]
    runs, lines = [], []
    for graphed in (True, False):
        torch.manual_seed(0)
        tr = StudyTrainer(cfg, 10, torch.device("cpu"), log=lambda *_: None)
        step = tr.step
        if graphed:
            step = graphs.GraphedStep(tr, lines.append)
            assert lines == ["--cuda-graphs needs a CUDA device: training eagerly"]
            step.why_not = None                       # as if on CUDA: the next call captures (and fails)
        runs.append(([step(x, y) for _ in range(3)], _weights(tr), tr.global_step, tr))
    assert lines[1:] == ["--cuda-graphs could not capture the joint step (RuntimeError: CUDA error: operation not "
                         "permitted when stream is capturing): training eagerly"]
    (la, wa, sa, tra), (lb, wb, sb, _) = runs
    assert sa == sb == 3
    assert all(torch.equal(a[k], b[k]) for a, b in zip(la, lb) for k in a)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not any(g["capturable"] for o in tra.opts.values() for g in o.param_groups)


@pytest.mark.parametrize("method,extra", [("joint", dict(g_ema=0.9, g_ema_debias=True, d_sn=True, r1=1.0)), ("ce", {}),
                                          ("joint-pt", dict(amp=True)), ("conf-gan", {})])
@pytest.mark.parametrize("first_steps", [0, 2])
def test_warm_up_leaves_no_trace(method, extra, first_steps):
    """GraphedStep's warm-up steps are undone by restore(): weights, buffers (BatchNorm, spectral norm, G's EMA),
    Adam's state (zeroed when it was made by the warm-up: the same as none), RNG and step counter. The steps
    after a restore are bit-identical to those of a trainer that never warmed up."""
    cfg = _cfg(method, batch_size=8, **extra)
    x, y = C.to_float(_data(8)[0]), _data(8)[1]
    runs = []
    for warm in (True, False):
        torch.manual_seed(0)
        tr = StudyTrainer(cfg, 10, torch.device("cpu"), log=lambda *_: None)
        for _ in range(first_steps):
            tr.step(x, y)
        if warm:
            snap = graphs.snapshot(tr)
            for _ in range(3):
                tr.step(x.flip(0), y.flip(0))
            graphs.restore(tr, snap)
        runs.append(([tr.step(x, y) for _ in range(2)], _weights(tr), tr.global_step))
    (la, wa, sa), (lb, wb, sb) = runs
    assert sa == sb == first_steps + 2
    for i, (a, b) in enumerate(zip(la, lb)):
        for k in a:
            assert torch.equal(a[k], b[k]), f"step {i + 1}: {k} {float(a[k])} after a restore, {float(b[k])} without"
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])][:3]


@pytest.mark.parametrize("targets", [[0, 1, -1, 4, -1, 2, -1, 3, 0, -1], [1] * 10, [-1] * 10])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_confidence_loss_matches_the_eager_one(targets, dtype):
    """The loss a CUDA graph uses (masks instead of boolean indexing, no checks): value and gradient."""
    z = (torch.randn(10, 5) * 3).to(dtype).requires_grad_(True)
    t = torch.tensor(targets)
    want = C.confidence_loss(z, t, 0.7, impl="torch")
    (gw,) = torch.autograd.grad(want, z)
    got = C._confidence_loss_masked(z, t, 0.7)
    (gg,) = torch.autograd.grad(got, z)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gg, gw, rtol=1e-5, atol=1e-7)


def test_a_captured_runs_checkpoint_loads_into_eager_adam():
    """A --cuda-graphs checkpoint holds capturable Adam (step counts on the device); loading makes it eager."""
    cfg = _cfg("joint", batch_size=8)
    x, y = C.to_float(_data(8)[0]), _data(8)[1]
    tr = StudyTrainer(cfg, 10, torch.device("cpu"), log=lambda *_: None)
    tr.step(x, y)
    sd = tr.state_dict()
    for o in sd["opts"].values():                     # as a captured run saves it
        for g in o["param_groups"]:
            g["capturable"] = True
    tr2 = StudyTrainer(cfg, 10, torch.device("cpu"), log=lambda *_: None)
    tr2.load_state_dict(sd)
    for o in tr2.opts.values():
        assert all(not g["capturable"] for g in o.param_groups)
        assert all(s["step"].device.type == "cpu" and float(s["step"]) == 1 for s in o.state.values())
    tr2.step(x, y)                                    # eager Adam on the CPU takes it


# ------------------------------------------------------------------------------------------------ CUDA

CASES = {                                             # id: (method, Config overrides)
    "ce": ("ce", {}),
    "joint": ("joint", {}),
    "joint-torch-loss": ("joint", dict(impl="torch")),           # the masked loss inside the graph
    "joint-amp-channels-last": ("joint", dict(amp=True, channels_last="on")),
    "joint-pt": ("joint-pt", {}),
    "joint-stabilisers": ("joint", dict(g_ema=0.99, g_ema_debias=True, d_sn=True, r1=1.0, d_lr_mult=2.0)),
    "conf": ("conf", {}),
    "kplus1": ("kplus1", {}),
    "conf-gan-gan-phase": ("conf-gan", {}),
    "alexnet-dropout": ("ce", dict(model="alexnet")),
}
LOSSES = ("d", "g", "c")                              # compared closely; accuracies may flip one near-tie row


def _steps(cfg, batches, graphed, log=lambda *_: None):
    torch.manual_seed(cfg.seed)
    tr = StudyTrainer(cfg, 10, torch.device("cuda"), log=log)
    step = graphs.GraphedStep(tr, log) if graphed else tr.step
    logs = [{k: v.clone() for k, v in step(*b).items()} for b in batches]
    torch.cuda.synchronize()
    return tr, step, logs


def _batches(cfg, n=5):
    x, y = _data(n * cfg.batch_size, seed=1)
    xo = _data(n * cfg.batch_size, seed=2)[0]
    out = []
    for i in range(n):
        s = slice(i * cfg.batch_size, (i + 1) * cfg.batch_size)
        xb = C.to_float(x[s].cuda())
        if C.use_channels_last(cfg, torch.device("cuda")):
            xb = xb.contiguous(memory_format=torch.channels_last)
        out.append((xb, y[s].cuda(), C.to_float(xo[s].cuda()) if cfg.method in ("conf", "kplus1") else None))
    return out


def _compare(name, got, want, rtol, B):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.keys() == w.keys(), f"{name}: step {i + 1} logs {sorted(g)} captured, {sorted(w)} eager"
        for k in w:
            a, b = float(g[k]), float(w[k])
            tol = rtol * max(1.0, abs(b)) if k in LOSSES else 2.0 / B + 1e-6
            assert abs(a - b) <= tol, (f"{name}: step {i + 1} {k} = {a:.6f} captured vs {b:.6f} eager "
                                       f"(|diff| {abs(a - b):.2e} > {tol:.1e})")


@gpu
def test_graph_draws_the_random_numbers_eager_code_draws():
    """The premise of comparing captured with eager steps: a replay draws from the default CUDA generator at the
    offsets eager calls would (PyTorch registers it with the graph and advances it per replay)."""
    def draws():
        return torch.randn(1000, device="cuda"), torch.nn.functional.dropout(torch.ones(1000, device="cuda"), 0.5)

    draws()                                           # kernels loaded before the capture
    torch.manual_seed(0)
    eager = [torch.cat(draws()) for _ in range(3)]
    after_eager = torch.cuda.get_rng_state()
    torch.manual_seed(0)
    state = torch.cuda.get_rng_state()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static = torch.cat(draws())
    torch.cuda.set_rng_state(state)                   # as GraphedStep does after its capture
    captured = []
    for _ in range(3):
        g.replay()
        captured.append(static.clone())
    for i, (a, b) in enumerate(zip(captured, eager)):
        assert torch.equal(a, b), f"replay {i + 1} drew other random numbers than eager call {i + 1}"
    assert torch.equal(torch.cuda.get_rng_state(), after_eager), "3 replays advanced the generator unlike 3 calls"


@gpu
@pytest.mark.parametrize("case", list(CASES))
def test_captured_steps_match_eager_steps(case):
    method, extra = CASES[case]
    cfg = C.with_defaults(_cfg(method, width=0.125, batch_size=32, **extra))
    batches = _batches(cfg)
    lines = []
    tr_g, gs, got = _steps(cfg, batches, graphed=True, log=lines.append)
    assert gs.why_not is None, f"{case}: fell back to eager: {gs.why_not}"
    assert gs.graph is not None and sum("captured" in ln for ln in lines) == 1, lines
    tr_e, _, want = _steps(cfg, batches, graphed=False)
    rtol = 2e-2 if cfg.amp else 2e-3
    _compare(case, got, want, rtol, cfg.batch_size)
    wg, we = _weights(tr_g), _weights(tr_e)
    worst = max((float((wg[k].float() - we[k].float()).abs().max()) / max(1e-3, float(we[k].float().abs().max())), k)
                for k in we if we[k].is_floating_point())
    assert worst[0] < 10 * rtol, f"{case}: after 5 steps {worst[1]} differs by {worst[0]:.2e} (relative)"
    assert tr_g.global_step == tr_e.global_step == 5


@gpu
def test_lr_drop_recaptures_and_checkpoints_resume(tmp_path):
    """Through train(): the lr drop after epoch 1 captures again (the lr is baked into a graph); a captured
    run's checkpoint resumes captured and eagerly; each matches its eager counterpart."""
    x, y = _data(96)
    cfg = _cfg("joint", width=0.125, batch_size=32, epochs=2, lr_drop_epoch=1, log_every=1, device="cuda")
    dev = torch.device("cuda")
    lines = []
    g = _train(dataclasses.replace(cfg, cuda_graphs=True), x, y, out_dir=tmp_path / "g", log=lines.append,
                device=dev)
    e = _train(cfg, x, y, out_dir=tmp_path / "e", log=lambda *_: None, device=dev)
    captures = [ln for ln in lines if "cuda-graphs" in ln]
    assert len(captures) == 2 and all("captured the joint step" in ln for ln in captures), captures
    assert [gr["lr"] for gr in g.opt.param_groups] == [pytest.approx(1e-4)]

    def close(a, b, what, tol=2e-2):
        wa, wb = _weights(a), _weights(b)
        worst = max((float((wa[k] - wb[k]).abs().max()) / max(1e-3, float(wb[k].abs().max())), k)
                    for k in wb if wb[k].is_floating_point())
        assert worst[0] < tol, f"{what}: {worst[1]} differs by {worst[0]:.2e} (relative)"
    close(g, e, "2 epochs captured vs eager")
    more = dict(epochs=3, resume=True)
    g3 = _train(dataclasses.replace(cfg, cuda_graphs=True, **more), x, y, out_dir=tmp_path / "g",
                 log=lambda *_: None, device=dev)
    e3 = _train(dataclasses.replace(cfg, **more), x, y, out_dir=tmp_path / "e", log=lambda *_: None, device=dev)
    close(g3, e3, "resumed captured vs resumed eager")
    (tmp_path / "g2").mkdir()
    (tmp_path / "g2" / "train_state.pt").write_bytes((tmp_path / "g" / "train_state.pt").read_bytes())
    mixed = _train(dataclasses.replace(cfg, epochs=4, resume=True), x, y, out_dir=tmp_path / "g2",
                    log=lambda *_: None, device=dev)              # a captured run's checkpoint, resumed eagerly
    assert all(not gr["capturable"] for gr in mixed.opt.param_groups) and mixed.epoch == 4


@gpu
def test_a_step_that_cannot_be_captured_trains_eagerly(monkeypatch):
    """A host read inside the step (here: one added to the discriminator's loss) breaks the capture; GraphedStep
    says why in one line and trains eagerly from the state it had (warm-up undone), like a run without the flag."""
    orig = C.gan_d_loss

    def reads_the_device(d_real, d_fake):
        loss = orig(d_real, d_fake)
        float(loss)                                   # a host sync: not allowed while capturing
        return loss
    monkeypatch.setattr(C, "gan_d_loss", reads_the_device)
    cfg = C.with_defaults(_cfg("joint", width=0.125, batch_size=32))
    batches = _batches(cfg, 3)
    lines = []
    tr_g, gs, got = _steps(cfg, batches, graphed=True, log=lines.append)
    assert gs.why_not and gs.graph is None
    said = [ln for ln in lines if "cuda-graphs" in ln]
    assert len(said) == 1 and said[0].startswith("--cuda-graphs could not capture the joint step (") \
        and said[0].endswith(": training eagerly"), said
    tr_e, _, want = _steps(cfg, batches, graphed=False)
    _compare("fallback", got, want, 1e-4, cfg.batch_size)
    torch.ones(1, device="cuda").add_(1).item()       # the device still works
