"""reproduce.sh --gpu (the quick mode's sets at the paper's scale, in three stages) and the packing of several runs
on one device. The stages run here at the tiny sizes on the CPU (REPRODUCE_SIZES=tiny): the same roles, stages,
runs, tables, README and stage bookkeeping as on a GPU, only smaller."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import reproduce as R  # noqa: E402


def _env(**extra) -> dict:
    return {**os.environ, "REPRODUCE_SIZES": "tiny", "REPRODUCE_VERIFY": "0",
            "OMP_NUM_THREADS": os.environ.get("CONFIDENT_TEST_THREADS", "1"), **extra}


def test_choose_jobs_takes_the_fewest_within_5_percent_of_the_best():
    assert R.choose_jobs({1: 100.0, 2: 180.0, 3: 185.0}) == 2          # 180 >= 0.95 * 185
    assert R.choose_jobs({1: 100.0, 2: 150.0, 4: 300.0}) == 4
    assert R.choose_jobs({1: 100.0, 2: 99.0}) == 1
    assert R.choose_jobs({3: 50.0}) == 3


def test_measure_packing_stops_when_one_more_run_adds_little():
    rates = {1: 100.0, 2: 190.0, 3: 260.0, 4: 270.0, 6: 400.0}
    asked = []

    def fake(mode, device, k, steps):
        asked.append(k)
        return rates[k]

    got = R.measure_packing("tiny", "cpu", measure=fake, log=lambda *a: None)
    assert asked == [1, 2, 3, 4]                  # 4 adds < 10% over 3: the search stops there, 6 is never tried
    assert got["jobs"] == 3 and got["images_per_s"] == {"1": 100.0, "2": 190.0, "3": 260.0, "4": 270.0}
    assert got["speedup_vs_one"] == 2.6 and got["device"] == "cpu"


def test_measure_packing_keeps_what_was_measured_when_a_probe_fails():
    def fake(mode, device, k, steps):
        if k == 3:
            raise RuntimeError("CUDA out of memory")
        return {1: 100.0, 2: 190.0}[k]

    said = []
    got = R.measure_packing("tiny", "cpu", measure=fake, log=said.append)
    assert got["jobs"] == 2 and "3" not in got["images_per_s"]
    assert any("3 at once failed" in s and "out of memory" in s for s in said)
    with pytest.raises(R.C.ConfidentError, match="no probe finished"):
        R.measure_packing("tiny", "cpu", measure=lambda *a: 1 / 0, log=lambda *a: None)


def test_measure_jobs_runs_probes_at_once_on_the_cpu():
    rate = R.measure_jobs("tiny", "cpu", 2, steps=2)
    assert rate > 0


def test_every_run_of_the_mode_is_in_exactly_one_gpu_stage():
    runs = list(R.all_runs("gpu"))
    parts = {p: R.stage_runs(p, "gpu") for p in R.GPU_STAGES}
    assert sorted(r.name for p in parts.values() for r in p) == sorted(r.name for r in runs)
    assert len(runs) == sum(len(p) for p in parts.values())
    m = R.MODES["gpu"]
    assert m["width"] == 1.0 and m["lr"] == 2e-4 and m["batch_size"] == -1 and m["seeds"] == (0, 1, 2)
    assert m["gan_seeds"] == (0, 1, 2) and not m["train_limit"]


@pytest.fixture
def tiny_sizes(monkeypatch):
    """This process's view of the gpu mode at the sizes the subprocesses run it at (REPRODUCE_SIZES=tiny)."""
    monkeypatch.setitem(R.MODES, "gpu", R.resized(R.MODES["gpu"], "tiny"))


@pytest.fixture(scope="module")
def gpu3(tmp_path_factory):
    """The last stage alone (the joint-pt runs), two at a time, into a fresh folder."""
    out = tmp_path_factory.mktemp("gpu")
    p = subprocess.run(["bash", "reproduce.sh", "--gpu", "gpu3", "--results", str(out), "--jobs", "2"], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out


def test_a_stage_trains_its_runs_and_says_which_stages_are_still_to_run(gpu3, tiny_sizes):
    runs = R.stage_runs("gpu3", "gpu")
    assert runs and all(r.method == "joint-pt" for r in runs)
    for r in runs:
        assert (R.run_dir(r, "gpu", gpu3) / "results.json").exists()
    others = [r for p in ("gpu1", "gpu2") for r in R.stage_runs(p, "gpu")]
    assert not any(R.run_dir(r, "gpu", gpu3).exists() for r in others)
    readme = (gpu3 / "README.md").read_text()
    assert "Mode **gpu**" in readme and "**Stages still to run: gpu1, gpu2**" in readme
    assert f"| gpu3 | joint-pt | {len(runs)} / {len(runs)} |" in readme
    assert "| gpu1 | ce, conf, kplus1 | 0 / " in readme and "not run |" in readme
    # table 5 needs the joint runs of gpu2: not rendered until they exist; nothing else is complete either
    assert not list(gpu3.glob("table*.md"))
    assert R.stages_for("render", "gpu", gpu3) == ()          # render: nothing complete, figure 1 waits for gpu1
    untested = [ln for ln in readme.splitlines() if ln.endswith("| not testable (runs missing) |")]  # no pairs yet
    assert untested and all(ln.endswith("| — | no paired runs | not testable (runs missing) |") for ln in untested)
    assert "**No paired runs here yet**" in readme
    assert "nan" not in readme and "None/" not in readme
    assert "vgg13" in (gpu3 / "runs.csv").read_text()
    t = json.loads((gpu3 / "timings.json").read_text())
    assert t["gpu3"] > 0


def test_an_interrupted_run_resumes_and_a_finished_one_is_not_redone(gpu3, tiny_sizes):
    runs = R.stage_runs("gpu3", "gpu")
    d = R.run_dir(runs[0], "gpu", gpu3)
    assert R.config_for(runs[0], "gpu", gpu3).resume                      # its train_state.pt is there
    (d / "results.json").unlink()                                          # as if killed before it finished
    before = {r.name: (R.run_dir(r, "gpu", gpu3) / "results.json").stat().st_mtime for r in runs[1:]}
    p = subprocess.run(["bash", "reproduce.sh", "--gpu", "gpu3", "--results", str(gpu3), "--jobs", "2"], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"1 run(s) to do, {len(runs) - 1} finished before" in p.stdout
    assert "resumed from" in (d / "train.log").read_text() and (d / "results.json").exists()
    assert before == {r.name: (R.run_dir(r, "gpu", gpu3) / "results.json").stat().st_mtime for r in runs[1:]}
    fresh = R.stage_runs("gpu1", "gpu")[0]
    assert not R.config_for(fresh, "gpu", gpu3).resume


def test_jobs_auto_measures_once_and_reports_it(tmp_path):
    # render only: packing is measured (two candidates are enough to test the file), no run trains
    p = subprocess.run([sys.executable, "-c",
                        "import reproduce as R, sys; R.measure_packing.__defaults__ = ((1, 2), 2) + "
                        "R.measure_packing.__defaults__[2:]; R.main(sys.argv[1:])",
                        "render", "--mode", "gpu", "--results", str(tmp_path), "--jobs", "auto"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    got = json.loads((tmp_path / "packing.json").read_text())
    assert got["device"] == "cpu" and set(got["images_per_s"]) <= {"1", "2"} and got["jobs"] in (1, 2)
    assert "run(s) at a time" in p.stdout
    readme = (tmp_path / "README.md").read_text()
    assert "Packing (measured on cpu" in readme and f"Chosen: {got['jobs']} at once" in readme


@pytest.mark.parametrize("args, expect", [
    (["gpu1", "--mode", "quick"], "belongs to the gpu mode"),
    (["gpu1", "--mode", "gpu", "--jobs", "many"], "--jobs 'many'"),
])
def test_bad_arguments_get_a_clear_error(args, expect, tmp_path):
    p = subprocess.run([sys.executable, "reproduce.py"] + args + ["--results", str(tmp_path)], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and expect in p.stderr


def test_a_rehearsal_refuses_the_gpu_results_folder():
    p = subprocess.run([sys.executable, "reproduce.py", "gpu3", "--mode", "gpu"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "is a rehearsal" in p.stderr
    assert not (ROOT / "results" / "gpu" / "runs").exists()


def test_gpu_stages_script_passes_its_settings_to_each_stage(tmp_path):
    # .ci/gpu-stages with python3 and nvidia-smi replaced by stubs that record their arguments: the stability
    # stage gets the arms, seeds, scale and extra flags it was given (what a device call would run)
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "calls.txt"
    for name in ("python3", "nvidia-smi"):
        stub = bin_ / name
        stub.write_text(f'#!/bin/sh\nprintf "%s\\n" "{name} $*" >> "{log}"\n')
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"),
           "DATA_ROOT": "gd", "ARMS": "ce,joint-ema-warmup", "SEEDS": "0-3", "SCALE": "paper", "EXTRA": "--epochs 3"}
    subprocess.run(["bash", str(ROOT / ".ci" / "gpu-stages")], env=env, capture_output=True, text=True, timeout=60)
    calls = log.read_text().splitlines()
    stab = [c for c in calls if c.startswith("python3 stability.py run")]
    assert stab == ["python3 stability.py run --arms ce,joint-ema-warmup --seeds 0-3 --jobs 20 --threads 1 "
                    f"--scale paper --runs {tmp_path / 'out'}/stability --extra --data-root gd --epochs 3"]
    assert any(c.startswith("python3 -m pytest") and "tests/test_cuda_graphs.py" in c for c in calls)
    assert any(c.startswith("python3 bench.py --device cuda") for c in calls)
    del env["SCALE"], env["EXTRA"]
    log.unlink()
    subprocess.run(["bash", str(ROOT / ".ci" / "gpu-stages")], env=env, capture_output=True, text=True, timeout=60)
    assert "--scale main " in next(c for c in log.read_text().splitlines() if "stability.py run" in c)
