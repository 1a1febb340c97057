"""torchrun with 2 processes (gloo, CPU) against one process: same training, outputs from rank 0 only,
and a checkpoint that resumes in a single process.

simple_cnn has no dropout and no BatchNorm, so 2 ranks x batch 32 (DDP averages their gradients) compute the
same updates as 1 process x batch 64 over the same global batches, up to the order of floating-point sums.
The runs are 4 steps long (128 images, 2 epochs): Adam's early updates are close to lr * sign(gradient), so a
sum-order difference (1e-7) in a near-zero gradient grows into whole lr-sized steps; after 16 steps the two runs
differed by 7e-3 on one CPU (8 steps: 2e-3) and by under 1e-4 on another, after 4 steps by under 1e-6.
"""
import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["--in", "fashion-mnist", "--out", "mnist", "--model", "simple_cnn", "--width", "0.125",
          "--method", "ce", "--train-limit", "128", "--eval-limit", "300", "--val-size", "100",
          "--extra-ood", "gaussian", "--temperatures", "1,1000", "--epsilons", "0,0.001", "--log-every", "2",
          "--lr", "0.001", "--eval-batch-size", "64"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _run(args, timeout=300):
    p = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    one = _run([sys.executable, "confident.py", *COMMON, "--epochs", "2", "--batch-size", "64", "--output-dir", str(base / "one")])
    two = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}", "confident.py", *COMMON, "--epochs", "2", "--batch-size", "32",
                "--output-dir", str(base / "two")])
    return base, one, two


def test_two_processes_match_one(runs):
    base, _, _ = runs
    a = torch.load(base / "one" / "checkpoint.pt", weights_only=True)
    b = torch.load(base / "two" / "checkpoint.pt", weights_only=True)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, f"weights differ by {worst}"
    ra = json.loads((base / "one" / "results.json").read_text())
    rb = json.loads((base / "two" / "results.json").read_text())
    assert abs(ra["accuracy"] - rb["accuracy"]) <= 0.01
    for name in ("mnist", "gaussian"):
        for det in ("baseline", "odin"):
            for k in ("tnr_at_tpr95", "auroc", "detection_acc", "aupr_in", "aupr_out"):
                assert abs(ra["ood"][name][det][k] - rb["ood"][name][det][k]) <= 0.01, (name, det, k)


def test_rank_zero_alone_logs_and_writes(runs):
    base, _, two = runs
    # one line per log step, rank 1 printed nothing: 128 images / (2 ranks x 32) = 2 steps, 2 epochs, log every 2
    lines = [ln for ln in two.splitlines() if ln.startswith("epoch ")]
    assert len(lines) == 2, two
    assert two.count("wrote ") == 1
    files = sorted(p.name for p in (base / "two").iterdir())
    assert files == ["checkpoint.pt", "config.json", "results.csv", "results.json", "results.md", "train_state.pt"]


def test_distributed_checkpoint_resumes_in_one_process(runs):
    base, _, _ = runs
    out = _run([sys.executable, "confident.py", *COMMON, "--epochs", "3", "--batch-size", "64", "--resume",
                "--output-dir", str(base / "two")])
    assert "resumed from" in out and "at epoch 2" in out
    assert "epoch 3/3" in out
    state = torch.load(base / "two" / "train_state.pt", weights_only=True)
    assert state["epoch"] == 3


# ------------------------------------------------------------------------------------------------
# --amp: bf16 autocast in the training step (on the CPU here; the same code path as on CUDA)

def _fmnist_slice(n, split="train"):
    import confident
    x, y = confident.load_uint8("fashion-mnist", split, ROOT / "data")
    return x[:n], y[:n]


def test_amp_runs_every_network_in_bf16_and_keeps_fp32_weights_and_losses():
    import confident
    cfg = confident.Config(method="joint", model="vgg13", width=0.0625, beta=1.0, amp=True, impl="torch")
    tr = confident.Trainer(cfg, 10, torch.device("cpu"), log=lambda *a: None)
    seen = {}
    for name, m in tr.raw.items():
        m.register_forward_hook(lambda mod, inp, out, name=name: seen.setdefault(name, set()).add(out.dtype))
    x, y = _fmnist_slice(32)
    logs = tr.step(confident.to_float(x), y)
    assert seen == {"net": {torch.bfloat16}, "G": {torch.bfloat16}, "D": {torch.bfloat16}}
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in logs.values()), logs
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
               for m in tr.raw.values() for p in m.parameters() if p.grad is not None)
    # and --no-amp is plain fp32 throughout
    tr32 = confident.Trainer(dataclasses.replace(cfg, amp=False), 10, torch.device("cpu"), log=lambda *a: None)
    seen32 = set()
    tr32.raw["net"].register_forward_hook(lambda mod, inp, out: seen32.add(out.dtype))
    tr32.step(confident.to_float(x), y)
    assert seen32 == {torch.float32}


def test_amp_training_learns_like_fp32():
    """The same short run (simple_cnn, 2,048 images, 2 epochs, then 1,000 test images) in bf16 autocast and in
    fp32: both learn (over 50%; chance is 10%) and end within 3 points of accuracy of each other."""
    import confident
    x, y = _fmnist_slice(2048)
    xt, yt = _fmnist_slice(1000, "test")
    acc = {}
    for amp in (False, True):
        cfg = confident.Config(method="ce", model="simple_cnn", width=0.25, epochs=2, lr=1e-3, amp=amp, impl="torch")
        tr = confident.train(cfg, x, y, log=lambda *a: None)
        logits = confident.predict_logits(tr.raw["net"], confident.to_rgb(xt))
        acc[amp] = float((logits.argmax(1) == yt).float().mean())
    assert acc[False] > 0.5 and acc[True] > 0.5, acc
    assert abs(acc[True] - acc[False]) < 0.03, acc


# ------------------------------------------------------------------------------------------------
# Each rank's batches, read from train() with DDP itself stubbed out (the process group is tested above)

def _batches_seen(monkeypatch, rank, world, n_ood, n=64, B=8, epochs=1):
    """The (in, OOD) batches train() feeds the step on this rank, each image told apart by its constant pixel
    value: in-distribution images 0..n-1, OOD images 100..100+n_ood-1."""
    import confident
    monkeypatch.setattr(confident, "_wrap_ddp", lambda tr, device: None)
    seen = []

    def step(self, x, y, x_out=None):
        pixel = (lambda t: t[:, 0, 0, 0].mul(255).round().long().tolist())
        seen.append((pixel(x), pixel(x_out)))
        return {}
    monkeypatch.setattr(confident.Trainer, "step", step)
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 32, 32).contiguous()
    x_ood = (100 + torch.arange(n_ood, dtype=torch.uint8)).view(-1, 1, 1, 1).expand(-1, 1, 32, 32).contiguous()
    cfg = confident.Config(in_data="fashion-mnist", method="conf", model="simple_cnn", width=0.125, epochs=epochs,
                           batch_size=B, beta=1.0, impl="torch", log_every=10 ** 9)
    confident.train(cfg, x, torch.arange(n) % 10, x_ood=x_ood, log=lambda *a: None, rank=rank, world=world)
    return seen


@pytest.mark.filterwarnings("ignore:Detected call of")   # the stub step runs no optimiser
def test_each_rank_takes_its_own_ood_images(monkeypatch):
    """2 ranks x 4 steps x batch 8 over 64 OOD images: every OOD image once per epoch, as every in-distribution
    image (before, both ranks read the same OOD batch at each step)."""
    a, b = (_batches_seen(monkeypatch, r, 2, n_ood=64) for r in (0, 1))
    assert len(a) == len(b) == 4
    for (ina, outa), (inb, outb) in zip(a, b):
        assert len(outa) == len(outb) == 8
        assert not set(ina) & set(inb) and not set(outa) & set(outb)
    assert sorted(i for s in a + b for i in s[0]) == list(range(64))
    assert sorted(i for s in a + b for i in s[1]) == list(range(100, 164))


@pytest.mark.filterwarnings("ignore:Detected call of")   # the stub step runs no optimiser
def test_an_ood_set_smaller_than_a_batch_fills_every_batch(monkeypatch):
    seen = _batches_seen(monkeypatch, 0, 1, n_ood=3)
    assert len(seen) == 8 and all(len(out) == 8 and set(out) == {100, 101, 102} for _, out in seen)


@pytest.mark.filterwarnings("ignore:Detected call of")   # the stub step runs no optimiser
def test_too_few_images_for_one_batch_on_each_process(monkeypatch):
    import confident
    with pytest.raises(confident.ConfidentError, match="fewer than one batch of 8 on each of 16 processes"):
        _batches_seen(monkeypatch, 0, 16, n_ood=8, n=64, B=8)
