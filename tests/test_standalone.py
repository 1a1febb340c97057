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
