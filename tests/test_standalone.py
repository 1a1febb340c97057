"""confident.py copied alone into another folder (no kernels/, no tests/) still works: the kernels are optional."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import torch, confident as C
assert C._kernels() is None, "kernels/ must not be importable here"
torch.manual_seed(0)
m = C.vgg13(10, 0.0625).eval()
x = torch.rand(6, 3, 32, 32)
grid = C.odin_grid(m, x, [1, 1000], [0, 0.01], batch_size=4)
ref = C.odin_scores(m, x, 1000, 0.01, batch_size=4)
assert grid.shape == (2, 2, 6) and torch.allclose(grid[1, 1], ref, atol=1e-6)
z = torch.randn(5, 10)
assert torch.allclose(C.kl_to_uniform(z), (torch.logsumexp(z, 1) - z.mean(1)).mean() - torch.log(torch.tensor(10.0)))
m1 = C.ood_metrics([0.5 + i / 100 for i in range(40)], [0.1, 0.2])    # 40 in-scores: TPR steps of 2.5% reach 95%
assert m1["auroc"] == 1.0 and m1["tnr_at_tpr95"] == 1.0
try:
    C.kl_to_uniform(z, impl="triton")
except C.ConfidentError as e:
    print("refused:", e)
else:
    raise AssertionError("impl='triton' must raise without kernels/")
print("ok")
"""


def test_module_works_copied_alone(tmp_path):
    shutil.copy(ROOT / "confident.py", tmp_path / "confident.py")
    p = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")})
    assert p.returncode == 0, p.stdout + p.stderr
    assert "refused: impl='triton' needs the kernels/ package" in p.stdout
    assert p.stdout.strip().endswith("ok")


# A user's own network (BatchNorm, not one of this project's), trained by the copied module alone: joint training
# (Algorithm 1) on tensors and conf from DataLoaders; the caller's global random state is left as it was.
TRAIN_SCRIPT = r"""
import copy, random
import numpy as np, torch, torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset
import confident as C


class TinyNet(nn.Module):
    def __init__(self, k=3, c=3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, k))

    def forward(self, x):
        return self.body(x)


def global_state():
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def same_state(a, b):
    return (torch.equal(a[0], b[0]) and a[1][0] == b[1][0] and np.array_equal(a[1][1], b[1][1])
            and a[1][2:] == b[1][2:] and a[2] == b[2])


torch.manual_seed(123); np.random.seed(5); random.seed(7)
x, y = torch.rand(64, 3, 32, 32), torch.randint(0, 3, (64,))
net = TinyNet()
twin = copy.deepcopy(net)
quiet = lambda *a: None

cfg = C.Config(method="joint", epochs=1, batch_size=16, width=0.0625, log_every=1000, seed=3)
before = global_state()
tr = C.train(cfg, x, y, model=net, log=quiet)
assert same_state(before, global_state()), "train() changed the caller's global random state"
assert tr.raw["net"] is net                                   # trained in place
w = net.body[0].weight
assert w.is_contiguous() and not w.is_contiguous(memory_format=torch.channels_last)   # not made channels_last
# the authors' loop runs the classifier on G's batch (G's step), then on the real and on the fresh generated batch
# (its own step) in separate forwards: three BatchNorm updates per step, 64 / 16 = 4 steps
assert int(net.body[1].num_batches_tracked) == 12, int(net.body[1].num_batches_tracked)
again = C.train(cfg, x, y, model=twin, log=quiet)          # the same seed, the same start: the same model
assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), twin.state_dict().values()))

# conf (Eq. 1): the training set and the OOD set as DataLoaders
torch.manual_seed(9)
ood = torch.rand(40, 3, 32, 32)
loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
ood_loader = DataLoader(TensorDataset(ood), batch_size=16, shuffle=True)
net = TinyNet()
before = global_state()
tr = C.train(C.Config(method="conf", epochs=2, beta=0.5, log_every=1000), loader, x_ood=ood_loader,
             model=net, num_classes=3, log=quiet)
assert same_state(before, global_state())
assert tr.epoch == 2 and tr.global_step == 8

# a failed run gives the state back too
net = TinyNet(k=3)
before = global_state()
try:
    C.train(C.Config(method="kplus1", epochs=1, batch_size=16), x, y, x_ood=ood, model=net, log=quiet)
except C.ConfidentError as e:
    assert "K + 1 = 4 outputs" in str(e), e
else:
    raise AssertionError("kplus1 with K outputs must be refused")
assert same_state(before, global_state())

# every detector on the joint-trained network: tensors and DataLoaders alike, and inside torch.inference_mode()
net = C.train(cfg, x, y, model=TinyNet(), log=quiet).raw["net"]
x_in, x_out = torch.rand(24, 3, 32, 32), torch.rand(24, 3, 32, 32) * 0.2
dets = {"baseline": lambda m, d: C.baseline_scores(m, d, batch_size=8),
        "odin": lambda m, d: C.odin_scores(m, d, 1000, 0.001, batch_size=8),
        "energy": lambda m, d: C.energy_scores(m, d, batch_size=8),
        "maxlogit": lambda m, d: C.maxlogit_scores(m, d, batch_size=8)}
for name, f in dets.items():
    s_in = f(net, x_in)
    assert s_in.shape == (24,) and torch.isfinite(s_in).all(), name
    s_loader = f(net, DataLoader(TensorDataset(x_in, torch.zeros(24)), batch_size=5))
    with torch.inference_mode():
        s_inf = f(net, x_in)
    assert torch.allclose(s_in, s_loader, atol=1e-6) and torch.allclose(s_in, s_inf, atol=1e-6), name
    m = C.ood_metrics(s_in, f(net, x_out))
    assert all(0 <= m[k] <= 1 for k in ("tnr_at_tpr95", "auroc", "detection_acc", "aupr_in", "aupr_out",
                                         "fpr95_pytorch_ood", "fpr95_openood")), (name, m)
grid = C.odin_grid(net, x_in, [1, 1000], [0, 0.001], batch_size=8)
assert torch.allclose(grid[1, 1], dets["odin"](net, x_in), atol=1e-5)

# a 1-channel network gets its 1 channel
gray = TinyNet(c=1).eval()
g_in = torch.rand(10, 1, 32, 32)
for name, f in dets.items():
    with torch.inference_mode():
        assert f(gray, g_in).shape == (10,), name

# calibration: ECE before and after temperature scaling
with torch.no_grad():
    z = C.predict_logits(net, x)
T = C.fit_temperature(z, y)
ece, ece_t = (C.expected_calibration_error(torch.softmax(z / t, 1), y) for t in (1.0, T))
assert T > 0 and 0 <= ece <= 1 and 0 <= ece_t <= 1
print("ok")
"""


def test_train_on_a_users_own_model_copied_alone(tmp_path):
    shutil.copy(ROOT / "confident.py", tmp_path / "confident.py")
    p = subprocess.run([sys.executable, "-c", TRAIN_SCRIPT], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600, env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",
                                                                                          "TRITON_INTERPRET")})
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip().endswith("ok")


# Copied into a repo that has a `kernels` package of its own: one that fails to import (a missing shared library)
# is not ours and not an error; one that imports is not used either (its functions are not this project's kernels).
FOREIGN_SCRIPT = r"""
import torch, confident as C
assert C._kernels() is None and C._kernels_package() is None
z = torch.randn(5, 10)
assert torch.allclose(C.kl_to_uniform(z), (torch.logsumexp(z, 1) - z.mean(1)).mean() - torch.log(torch.tensor(10.0)))
y = torch.tensor([0, 1, -1, -1, 2])
assert torch.isfinite(C.confidence_loss(z, y, 1.0))
try:
    C._graphs_module()
except C.ConfidentError as e:
    print("graphs:", e)
print("ok")
"""


def test_a_foreign_kernels_package_is_not_used(tmp_path):
    shutil.copy(ROOT / "confident.py", tmp_path / "confident.py")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("raise OSError('libfoo.so: cannot open shared object file')\n")
    p = subprocess.run([sys.executable, "-c", FOREIGN_SCRIPT], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env=env)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stdout + p.stderr
    assert "(importing it failed: OSError: libfoo.so: cannot open shared object file)" in p.stdout   # says why
    # a working package of that name elsewhere on the path, with none beside confident.py
    shutil.rmtree(tmp_path / "kernels")
    other = tmp_path / "elsewhere" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("AVAILABLE = True\ndef kl_uniform_mean(z):\n    raise RuntimeError('foreign')\n"
                                       "def can_run(t):\n    return True\n")
    p = subprocess.run([sys.executable, "-c", FOREIGN_SCRIPT], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env={**env, "PYTHONPATH": str(tmp_path / "elsewhere")})
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stdout + p.stderr
    assert "(no kernels/ beside confident.py)" in p.stdout


# kernels/ copied beside confident.py is found however confident.py is imported: as a module of a package of the
# user's (its folder not on sys.path), or with another `kernels` package ahead of it on the path (never imported).
FOUND_SCRIPT = r"""
import importlib, os, sys, torch
sys.path[:0] = sys.argv[2:]                     # another folder ahead of everything on the path
C = importlib.import_module(sys.argv[1])
k = C._kernels_package()
assert k is not None and os.path.dirname(k.__file__) == os.path.join(os.path.dirname(C.__file__), "kernels"), k
assert C._graphs_module().__name__ == k.__name__ + ".graphs"
assert "foreign" not in sys.modules and not os.path.exists("foreign-imported")
z = torch.randn(5, 10)
assert torch.isfinite(C.confidence_loss(z, torch.tensor([0, 1, -1, -1, 2]), 1.0))
print("ok", k.__name__)
"""


def test_kernels_beside_the_module_are_found_from_a_package_or_behind_another(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    shutil.copy(ROOT / "confident.py", pkg / "confident.py")
    shutil.copytree(ROOT / "kernels", pkg / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    p = subprocess.run([sys.executable, "-c", FOUND_SCRIPT, "mypkg.confident"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env=env)
    assert p.returncode == 0 and p.stdout.strip() == "ok _confident_kernels", p.stdout + p.stderr
    other = tmp_path / "elsewhere" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("open('foreign-imported', 'w').close()\nAVAILABLE = True\n")
    p = subprocess.run([sys.executable, "-c", FOUND_SCRIPT, "confident", str(tmp_path / "elsewhere")], cwd=pkg,
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0 and p.stdout.strip() == "ok _confident_kernels", p.stdout + p.stderr
    p = subprocess.run([sys.executable, "-c", FOUND_SCRIPT, "confident"], cwd=pkg, capture_output=True, text=True,
                       timeout=120, env=env)                           # the usual case: imported as `kernels`
    assert p.returncode == 0 and p.stdout.strip() == "ok kernels", p.stdout + p.stderr
