"""
stability.py: does joint training (Algorithm 1) hold on every seed? Runs the main job over many seeds for
cross-entropy, the paper's joint training and stabilised variants (flags beyond the paper), then reports
mean +- std, collapses and seed-by-seed comparisons against cross-entropy, and picks a variant by a rule
that reads validation data only (results/stability/README.md).

    python stability.py run --arms ce,joint,joint-ema --seeds 0-7 --jobs 12 --runs results/stability/runs
    python stability.py report --runs results/stability/runs --out results/stability   # report.md, diagnostics.png
    python stability.py report --runs DIR_A,DIR_B --out OUT      # the arms of several folders in one report

    python stability.py train --method joint --d-sn ...     # one run: confident.py's flags and the stabilisers'

Each run is `python stability.py train <scale flags> <arm flags> --seed S --output-dir <runs>/<arm>-s<S>`; a run
whose results.json exists is not redone, so an interrupted study resumes where it stopped.

The stabilisers of joint training other than confident.py's --g-ema, and the diagnostics of training, live here:
StudyConfig adds their fields (and flags) to confident.Config, StudyTrainer implements them through the Trainer's
hooks; each default is the paper's training, so `stability.py train` without them is `confident.py`.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import confident
from confident import ConfidentError, GAN_METHODS

HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------------
# The study's stabilisers and diagnostics on top of confident.py's Trainer

@dataclass
class StudyConfig(confident.Config):
    gan_width: float = 0.0           # > 0: G's and D's width multiplier instead of `width` (beyond the paper:
                                     # separates the classifier's capacity from the GAN's); 0: = width
    # Diagnostics of training (every regime; G and D too in GAN regimes): logged, and in results.json.
    diag_every: int = 0              # also every N steps (0: only at the end of each epoch)
    # Stabilisers of joint training, beyond the paper (results/stability/README.md); each default is the paper's.
    ema_raw_frac: float = 0.0        # with g_ema: this fraction of each KL batch comes from the raw G instead
    g_ema_debias: bool = False       # with g_ema: average G's trained weights only, without its initialisation
    d_sn: bool = False               # spectral normalisation on D's convolutions
    d_lr_mult: float = 1.0           # D's learning rate = lr * this (two time-scale update)
    gan_lr_mult: float = 1.0         # G's and D's learning rates = lr * this (D's times d_lr_mult); classifier's: lr
    replay: int = 0                  # > 0: keep this many past G samples; half of each KL batch comes from them
    r1: float = 0.0                  # > 0: R1 penalty (r1 / 2) * |grad_x D(x)|^2 on real images
    clip_grad: float = 0.0           # > 0: clip the classifier's gradient to this global L2 norm
    beta_warmup: int = 0             # > 0: beta ramps linearly from 0 over this many steps (G and classifier)

    def check(self, name) -> None:
        checks = [("gan_width", 0 <= self.gan_width <= 8, "0 (= width) or in (0, 8]"),
                  ("diag_every", self.diag_every >= 0, ">= 0"),
                  ("d_lr_mult", self.d_lr_mult > 0, "> 0"), ("gan_lr_mult", self.gan_lr_mult > 0, "> 0"),
                  ("replay", self.replay >= 0, ">= 0"), ("r1", self.r1 >= 0, ">= 0"),
                  ("beta_warmup", self.beta_warmup >= 0, ">= 0"), ("clip_grad", self.clip_grad >= 0, ">= 0"),
                  ("ema_raw_frac", 0 <= self.ema_raw_frac <= 1, "in [0, 1]")]
        for field, ok, want in checks:
            if not ok:
                raise ConfidentError(f"{name(field)} {getattr(self, field)!r}: expected {want}")
        if self.ema_raw_frac and not self.g_ema:
            raise ConfidentError(f"{name('ema_raw_frac')} {self.ema_raw_frac!r} mixes raw G samples into the EMA "
                                 f"generator's: expected {name('g_ema')} > 0 too")
        if self.g_ema_debias and not self.g_ema:
            raise ConfidentError(f"{name('g_ema_debias')} corrects the EMA generator's average: expected "
                                 f"{name('g_ema')} > 0 too")
        if self.gan_width and self.method not in GAN_METHODS:
            raise ConfidentError(f"{name('gan_width')} {self.gan_width!r} sets the GAN's width: expected "
                                 f"{name('method')} conf-gan, joint or joint-pt, not {self.method} (it has no GAN)")
        stabilisers = [n for n in ("d_sn", "replay", "r1", "beta_warmup", "clip_grad") if getattr(self, n)]
        stabilisers += [n for n in ("d_lr_mult", "gan_lr_mult") if getattr(self, n) != 1.0]
        if stabilisers and self.method not in ("joint", "joint-pt"):
            raise ConfidentError(f"{name(stabilisers[0])} is a stabiliser of joint training: "
                                 f"expected {name('method')} joint or joint-pt, not {self.method}")


class StudyTrainer(confident.Trainer):
    """confident.Trainer with StudyConfig's stabilisers and the diagnostics of training (TrainingProbe)."""

    def __init__(self, cfg, num_classes, device=None, log=print, **kw):
        if not isinstance(cfg, StudyConfig):
            cfg = StudyConfig(**dataclasses.asdict(cfg))
        super().__init__(cfg, num_classes, device, log, **kw)
        self.replay = torch.empty(0, *self.image_shape, device=self.device)   # past G samples (--replay)
        self.diagnostics = []                            # one dict per diagnostics point (TrainingProbe)
        self.probe = None

    def _gan_width(self):
        return self.cfg.gan_width or self.cfg.width

    def _discriminator(self, D):
        if self.cfg.d_sn:                                # spectral norm on every conv of D
            for mod in list(D.modules()):
                for name, m in list(mod.named_children()):
                    if isinstance(m, nn.Conv2d):
                        setattr(mod, name, nn.utils.parametrizations.spectral_norm(m))
        return D

    def _gan_lrs(self):
        lr = self.cfg.lr * self.cfg.gan_lr_mult
        return lr, lr * self.cfg.d_lr_mult

    def beta_now(self) -> float:
        """beta, ramped linearly from 0 over the first --beta-warmup steps (the paper: no warm-up)."""
        w = self.cfg.beta_warmup
        return self.cfg.beta * (min(1.0, self.global_step / w) if w > 0 else 1.0)

    def _real_input(self, x):
        return x.detach().requires_grad_(True) if self.cfg.r1 > 0 else x

    def _d_loss(self, d_loss, x_real, d_real):
        r1 = self.cfg.r1
        if r1 > 0:   # R1 penalty, (r1 / 2) * E |grad_x D(x)|^2 on real images (Mescheder et al. 2018)
            (gx,) = torch.autograd.grad(d_real.float().sum(), x_real, create_graph=True)
            d_loss = d_loss + r1 / 2 * gx.float().pow(2).flatten(1).sum(1).mean()
        return d_loss

    def _grad_norm(self):
        if self.cfg.clip_grad > 0:                       # clipped to --clip-grad; the norm before clipping
            return torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.clip_grad)
        return super()._grad_norm()

    def _ema_weight(self, g):
        """With --g-ema-debias, Adam's bias correction (Kingma & Ba 2015, Alg. 1: m_t / (1 - beta1^t)) written as
        one lerp: (1 - d) / (1 - d^t) after G's t-th update, so the EMA is the average of G's first t updated
        weights, each s-th weighted by d^(t - s), with no share left to G's random initialisation (plain EMA: d^t
        of it, 0.245 after the main job's 1,404 steps at 0.999). t is the count Adam keeps for G: on the device
        under --cuda-graphs, so the captured graph reads it when replayed."""
        d = self.cfg.g_ema
        if not self.cfg.g_ema_debias:
            return super()._ema_weight(g)
        t = self.opts["G"].state[next(g.parameters())]["step"]
        w = (1.0 - d) / (1.0 - d ** t)
        return w.item() if w.device.type == "cpu" else w

    def _kl_samples(self, B):
        """Fresh samples of G or of its EMA copy (--g-ema; the last round(B * --ema-raw-frac) of them from the raw
        G), and half of them replaced by past samples once the replay buffer holds enough (--replay)."""
        with torch.no_grad(), self._amp():
            x_out = (self.G_ema if self.G_ema is not None else self.G)(self._noise(B)).float()
            k = round(B * self.cfg.ema_raw_frac)          # allowed only with --g-ema
            if k:                                         # raw G's fresh samples in the batch's tail
                x_out = torch.cat([x_out[:B - k], self.G(self._noise(k)).float()])
        n = self.cfg.replay
        if n > 0:
            fresh = x_out
            if len(self.replay) >= B // 2:
                old = self.replay[torch.randint(len(self.replay), (B // 2,), device=self.device)]
                x_out = torch.cat([fresh[:B - B // 2], old])
            self.replay = torch.cat([fresh.detach(), self.replay])[:n]     # newest first, oldest dropped
        return x_out

    def state_dict(self):
        return {**super().state_dict(), "replay": self.replay, "diagnostics": json.dumps(self.diagnostics)}

    def load_state_dict(self, sd):
        super().load_state_dict(sd)
        self.replay = sd.get("replay", self.replay).to(self.device)
        self.diagnostics = json.loads(sd.get("diagnostics", "[]"))

    # diagnostics: means of the step logs since the last point, and the probe, every --diag-every steps and at
    # the end of each epoch
    def watch(self, x_train, to_input, rank):
        self.probe = TrainingProbe(x_train, self.cfg.nz, self.cfg.seed, self.device, to_input=to_input) \
            if rank == 0 and x_train is not None else None
        self._dsums, self._dn, self._dmax = {}, 0, None

    def after_step(self, logs, epoch, i, steps):
        if self.probe is None or "c" not in logs:         # conf-gan's GAN epochs train no classifier
            return
        self._dn += 1
        for k in ("d_acc_real", "d_acc_fake", "c", "acc", "gnorm"):
            if k in logs:
                self._dsums[k] = self._dsums.get(k, 0.0) + logs[k]
        if "gnorm" in logs:
            self._dmax = logs["gnorm"] if self._dmax is None else torch.maximum(self._dmax, logs["gnorm"])
        every = self.cfg.diag_every
        if (every and (i + 1) % every == 0) or i + 1 == steps:
            d = {"epoch": epoch + 1, "step": i + 1, "global_step": self.global_step, "beta": self.beta_now(),
                 **{k: float(v) / self._dn for k, v in self._dsums.items()},
                 **({"gnorm_max": float(self._dmax)} if self._dmax is not None else {}), **self.probe(self)}
            self.diagnostics.append(d)
            self._dsums, self._dn, self._dmax = {}, 0, None
            self.log(f"diag epoch {epoch + 1} step {i + 1} | " + " ".join(
                f"{k} {v:.3f}" for k, v in d.items() if k not in ("epoch", "step", "global_step", "beta")))

    def results(self):
        return {"diagnostics": self.diagnostics} if self.diagnostics else {}


class TrainingProbe:
    """Diagnostics of training at one point in time, without touching the run's randomness or state:
    fixed latent codes (own generator), fixed real images (own permutation), G's BatchNorm buffers restored.
    What the classifier (eval mode, as the detectors see it) says about G's samples and about real training
    images, how far the samples sit from the data (nearest-neighbour RMS pixel distance to `n_ref` training
    images; real images' own distance to them for scale) and how diverse they are (mean pairwise RMS distance,
    as a fraction of the real images')."""

    def __init__(self, x_train, nz: int, seed: int, device, n: int = 500, n_ref: int = 2000,
                 to_input=confident.to_float):
        g = torch.Generator().manual_seed(seed + 424_242)
        n = max(1, min(n, len(x_train) // 4))                       # small training sets: a quarter probes
        idx = torch.randperm(len(x_train), generator=g)[:n + n_ref]
        self.real = to_input(confident._take(x_train, idx[:n]).to(device))                # (n, 3, 32, 32)
        self.ref = to_input(confident._take(x_train, idx[n:]).to(device)).flatten(1)      # (n_ref, 3072)
        self.z = torch.randn(n, nz, generator=g).to(device)

    def _sample(self, G):
        bufs = [b.clone() for b in G.buffers()]
        fake = G(self.z).float()                                                 # train mode, as in training
        for b, saved in zip(G.buffers(), bufs):
            b.copy_(saved)
        return fake

    @staticmethod
    def _rms(a, b):                                                              # (n, m) RMS pixel distances
        return torch.cdist(a, b).div_(math.sqrt(a.shape[1]))

    @torch.no_grad()
    def __call__(self, tr) -> dict:
        net, G = tr.raw["net"], tr.raw.get("G_ema", tr.raw.get("G"))             # the classifier's sample source
        was = net.training
        net.eval()
        out = {}
        for name, x in (("real", self.real),) if G is None else (("gen", self._sample(G)), ("real", self.real)):
            z = net(x).float()[:, :tr.K]
            out[f"maxsoftmax_{name}"] = float(F.softmax(z, 1).max(1).values.mean())
            out[f"kl_{name}"] = float((torch.logsumexp(z, 1) - z.mean(1)).mean() - math.log(tr.K))
        net.train(was)
        if G is None:
            return out
        f, r = self._sample(G).flatten(1), self.real.flatten(1)
        out["nn_dist_gen"] = float(self._rms(f, self.ref).min(1).values.mean())
        out["nn_dist_real"] = float(self._rms(r, self.ref).min(1).values.mean())
        n = len(f)
        off = ~torch.eye(n, dtype=torch.bool, device=f.device)
        out["diversity"] = float(self._rms(f, f)[off].mean() / self._rms(r, r)[off].mean())
        return out

# The README's main job (CPU-sized) and the paper's settings (full width, lr 2e-4, beta 1, batch 128).
SCALES = {
    "main": "--in fashion-mnist --out mnist --width 0.125 --lr 0.001 --epochs 3 --eval-limit 3000",
    "paper": "--in fashion-mnist --out mnist --epochs 10 --lr-drop-epoch 7",
}
COMMON = "--diag-every 50 --val-ood photos"       # diagnostics, and the one validation OOD source (seen)

# Arms: cross-entropy, the paper's joint training, and one stabiliser each (results/stability/README.md).
ARMS = {
    "ce": "--method ce",
    "joint": "--method joint",
    "joint-ema": "--method joint --g-ema 0.999",
    "joint-ema99": "--method joint --g-ema 0.99",
    "joint-ema-mix": "--method joint --g-ema 0.999 --ema-raw-frac 0.5",
    "joint-ema-debias": "--method joint --g-ema 0.999 --g-ema-debias",
    "joint-ema-beta2": "--method joint --g-ema 0.999 --beta 2",
    "joint-replay": "--method joint --replay 6400",
    "joint-warmup": "--method joint --beta-warmup 468",
    "joint-ttur": "--method joint --d-lr-mult 4",
    "joint-sn": "--method joint --d-sn",
    "joint-r1": "--method joint --r1 1",
    "joint-sn-r1": "--method joint --d-sn --r1 1",
    "joint-sn-beta2": "--method joint --d-sn --beta 2",
    "joint-sn-warmup": "--method joint --d-sn --beta-warmup 468",
    "joint-ganlr": "--method joint --gan-lr-mult 0.2",
    "joint-clip": "--method joint --clip-grad 10",
    "joint-ema-warmup": "--method joint --g-ema 0.999 --beta-warmup 468",
    "joint-ema-replay": "--method joint --g-ema 0.999 --replay 6400",
    # the paper's own entropy option (App. D, the pull-away term in G's loss) on top of the average
    "joint-ema-pt": "--method joint-pt --g-ema 0.999",
    "joint-ema-warmup-pt": "--method joint-pt --g-ema 0.999 --beta-warmup 468",
    # spectral normalisation in D (no collapse on 8 seeds, raw samples) with half of each KL batch from the
    # average (far-away sets held on every seed), or with a smaller KL weight
    "joint-sn-ema-mix": "--method joint --d-sn --g-ema 0.999 --ema-raw-frac 0.5",
    "joint-sn-beta05": "--method joint --d-sn --beta 0.5",
    # Not a stabiliser: the paper's joint training with G and D at width 1/8 whatever the classifier's --width
    # (with --extra "--width 0.25": the classifier's capacity apart from the GAN's). The selection rule skips it.
    "joint-narrow-gan": "--method joint --gan-width 0.125",
}
NOT_STABILISERS = {"joint-narrow-gan"}
TEST_SETS = ("mnist", "gaussian", "uniform", "photos")   # unseen: never read by the selection rule
COLLAPSE_POINTS = 5.0                                     # accuracy more than this below the ce mean


def seeds_of(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def run_dir(runs: Path, arm: str, seed: int) -> Path:
    return runs / f"{arm}-s{seed}"


def _launch(cmd: list, d: Path, threads: int, resume: bool) -> dict:
    """One run as its own process (`threads` CPU threads), its output in <d>/train.log: confident.run_many's task."""
    d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(d / "train.log", "a" if resume else "w") as log:
        rc = subprocess.call(cmd + (["--resume"] if resume else []), stdout=log, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        raise confident.ConfidentError(f"exit code {rc} (see {d / 'train.log'})")
    return json.loads((d / "results.json").read_text())


def cmd_run(args):
    runs = Path(args.runs)
    arms = args.arms.split(",")
    for a in arms:
        if a not in ARMS:
            sys.exit(f"error: unknown arm {a!r}: expected one of {', '.join(ARMS)}")
    tasks = []
    for s in seeds_of(args.seeds):
        for a in arms:
            d = run_dir(runs, a, s)
            cmd = ([sys.executable, str(HERE / "stability.py"), "train"] + SCALES[args.scale].split()
                   + args.common.split() + ARMS[a].split() + ["--seed", str(s), "--output-dir", str(d),
                                                              "--device", args.device] + args.extra.split())
            tasks.append((d, functools.partial(_launch, cmd, d, args.threads)))
    confident.run_many(tasks, jobs=args.jobs, log=lambda m: print(m, flush=True))


# ------------------------------------------------------------------------------------------------
# Report

def load(runs: Path | str) -> dict:
    """{arm: {seed: results.json}} for every finished run in `runs`: a folder, or several joined by commas
    (one arm's seed found in two of them is an error, not a silent choice)."""
    out = {}
    for folder in str(runs).split(","):
        if not Path(folder).is_dir():
            raise SystemExit(f"error: --runs {folder!r}: expected a folder of runs (<arm>-s<seed>/results.json)")
        for d in sorted(Path(folder).glob("*-s*")):
            f = d / "results.json"
            if f.exists():
                arm, _, seed = d.name.rpartition("-s")
                if int(seed) in out.get(arm, {}):
                    raise SystemExit(f"error: {arm} seed {seed} is in more than one of --runs {runs!r}")
                out.setdefault(arm, {})[int(seed)] = json.loads(f.read_text())
    order = list(ARMS)
    return {a: dict(sorted(out[a].items())) for a in sorted(out, key=lambda a: (order.index(a) if a in order
                                                                                  else len(order), a))}


def mean_std(v: list[float]) -> tuple[float, float]:
    m = sum(v) / len(v)
    return m, (math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0)


def fmt(v: list[float]) -> str:
    m, s = mean_std(v)
    return f"{m:.1f} ± {s:.1f}"


def tnr(r: dict, name: str, det: str) -> float:
    return 100 * r["ood"][name][det]["tnr_at_tpr95"]


def over_ce(rs: dict, ce: dict, name: str) -> list[float]:
    """Baseline TNR on `name` minus the same seed's ce, for every seed the arm and ce both have."""
    return [tnr(rs[s], name, "baseline") - tnr(ce[s], name, "baseline") for s in rs if s in ce]


def select(data: dict) -> tuple[str | None, list[str]]:
    """The selection rule, fixed before the comparison ran (results/stability/README.md). It reads only the
    in-distribution validation images (the first --val-size test images) and the validation OOD set (photos,
    train split: photographs disjoint from the test split's). 1. An arm is out if any seed's validation accuracy
    is more than 5 points below the mean validation accuracy of ce. 2. Of the stabilised arms left, the highest
    mean baseline TNR on the validation OOD set wins; ties go to the smaller std."""
    ce_val = [100 * r["validation"]["accuracy"] for r in data["ce"].values()]
    floor = mean_std(ce_val)[0] - COLLAPSE_POINTS
    notes, best = [], None
    for arm, rs in data.items():
        if not arm.startswith("joint-") or arm in NOT_STABILISERS:
            continue
        acc = [100 * r["validation"]["accuracy"] for r in rs.values()]
        val = [100 * r["validation"]["ood"]["photos"]["baseline"]["tnr_at_tpr95"] for r in rs.values()]
        m, s = mean_std(val)
        if min(acc) < floor:
            notes.append(f"{arm}: out (a seed's validation accuracy {min(acc):.1f} < {floor:.1f})")
            continue
        notes.append(f"{arm}: validation photos TNR {m:.1f} ± {s:.1f} over {len(val)} seeds")
        if best is None or (m, -s) > best[1]:
            best = (arm, (m, -s))
    return (best[0] if best else None), notes


def report(data: dict, out: Path, title: str) -> str:
    if "ce" not in data:
        raise SystemExit("error: no finished ce runs to compare against")
    ce = data["ce"]
    ce_acc = mean_std([100 * r["accuracy"] for r in ce.values()])[0]
    lines = [f"# {title}", "",
             f"Runs: {', '.join(f'{a} ({len(rs)} seeds)' for a, rs in data.items())}. "
             "Every OOD set below is unseen (never used in training or selection) except `photos (val)`, the "
             "photos *train* split that the selection rule reads. TNR at TPR 95%, baseline / ODIN, mean ± std "
             "over seeds; accuracy and ECE in %.", "",
             "| arm | accuracy | ECE | collapses | " + " | ".join(TEST_SETS) + " | photos (val) |",
             "|---|---:|---:|---:|" + "---:|" * (len(TEST_SETS) + 1)]
    for arm, rs in data.items():
        acc = [100 * r["accuracy"] for r in rs.values()]
        col = sum(a < ce_acc - COLLAPSE_POINTS for a in acc)
        cells = [f"{fmt([tnr(r, n, 'baseline') for r in rs.values()])} / {fmt([tnr(r, n, 'odin') for r in rs.values()])}"
                 for n in TEST_SETS]
        val = [100 * r["validation"]["ood"]["photos"]["baseline"]["tnr_at_tpr95"] for r in rs.values()]
        lines.append(f"| {arm} | {fmt(acc)} | {fmt([100 * r['ece'] for r in rs.values()])} | {col}/{len(rs)} | "
                     + " | ".join(cells) + f" | {fmt(val)} |")
    lines += ["", f"Collapse: accuracy more than {COLLAPSE_POINTS:g} points below the ce mean ({ce_acc:.2f}%).", "",
              "Seeds where the arm's baseline TNR beats the same seed's ce (targets: gaussian, uniform, photos in "
              ">= 7 of 8; mnist in >= 6 of 8):", "",
              "| arm | " + " | ".join(TEST_SETS) + " | TNR std <= 10 on every set | accuracy at most 1 point below ce |",
              "|---|" + "---:|" * len(TEST_SETS) + "---|---|"]
    for arm, rs in data.items():
        if arm == "ce":
            continue
        common = [s for s in rs if s in ce]
        wins = [f"{sum(x > 0 for x in over_ce(rs, ce, n))}/{len(common)}" for n in TEST_SETS]
        spread = max(mean_std([tnr(r, n, "baseline") for r in rs.values()])[1] for n in TEST_SETS)
        acc = mean_std([100 * r["accuracy"] for r in rs.values()])[0]
        lines.append(f"| {arm} | " + " | ".join(wins) + f" | {'yes' if spread <= 10 else 'no'} (max {spread:.1f}) | "
                     f"{'yes' if acc >= ce_acc - 1 else 'no'} ({acc - ce_acc:+.2f}) |")
    pick, notes = select(data)
    rule = ("Selection rule (validation data only): " + "; ".join(notes) + f". **Pick: {pick}.**" if notes
            else "Selection rule: not applied (no stabilised arm among these runs).")
    lines += ["", rule, "",
              "Per seed (accuracy; baseline TNR on " + ", ".join(TEST_SETS) + "):", "",
              "| arm | " + " | ".join(f"s{s}" for s in sorted({s for rs in data.values() for s in rs})) + " |",
              "|---|" + "---|" * len({s for rs in data.values() for s in rs})]
    for arm, rs in data.items():
        cells = []
        for s in sorted({s for rs2 in data.values() for s in rs2}):
            r = rs.get(s)
            cells.append("" if r is None else f"{100 * r['accuracy']:.1f}; "
                         + "/".join(f"{tnr(r, n, 'baseline'):.0f}" for n in TEST_SETS))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += paired(data) + samples(data) + correlations(data)
    return "\n".join(lines) + "\n"


def sign_p(wins: int, n: int) -> float:
    """One-sided sign test: the chance of at least `wins` wins in n seeds if each seed were a fair coin."""
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n


def paired(data: dict) -> list[str]:
    """How far each arm is from ce, seed by seed: the difference of baseline TNR from the same seed's ce (mean ±
    std over the seeds both have), and the one-sided sign-test p of its win count (ties count as losses, as in the
    targets, so p is if anything too large). A target's win count is weak evidence on its own: 6 of 8 has p 0.145."""
    ce = data["ce"]
    rows = []
    for arm, rs in data.items():
        if arm == "ce" or not any(s in ce for s in rs):
            continue
        cells = []
        for n in TEST_SETS:
            d = over_ce(rs, ce, n)
            m, sd = mean_std(d)
            cells.append(f"{m:+.1f} ± {sd:.1f} (p {sign_p(sum(x > 0 for x in d), len(d)):.3f})")
        rows.append(f"| {arm} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["", "Baseline TNR minus the same seed's ce, mean ± std over seeds (one-sided sign-test p of the win count; "
            "ties count as losses; under chance alone 6 of 8 wins has p 0.145 and 7 of 8 p 0.035):", "",
            "| arm | " + " | ".join(TEST_SETS) + " |", "|---|" + "---:|" * len(TEST_SETS)] + rows


def samples(data: dict) -> list[str]:
    """The classifier's OOD samples at the end of training (the last diagnostics point), per GAN arm: their
    diversity (mean pairwise distance as a fraction of real images') and nearest-neighbour distance to the data."""
    keys = (("diversity", "G's diversity"), ("nn_dist_gen", "G's NN distance"))
    rows = []
    for arm, rs in data.items():
        last = [r["diagnostics"][-1] for r in rs.values() if r.get("diagnostics")]
        vals = [[d[k] for d in last if k in d] for k, _ in keys]
        if all(vals):
            rows.append(f"| {arm} | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in map(mean_std, vals)) + " |")
    if not rows:
        return []
    return ["", "The classifier's OOD samples at the end of training (last diagnostics point), mean ± std over seeds:",
            "", "| arm | " + " | ".join(n for _, n in keys) + " |", "|---|---:|---:|"] + rows


def correlations(data: dict) -> list[str]:
    """What goes with detection, read after the runs (exploratory; no arm is chosen by it): over every run of the
    GAN arms, Spearman's rank correlation between the classifier's state at the end of training (the last
    diagnostics point) and its baseline TNR on each OOD set."""
    from scipy.stats import spearmanr
    runs = [r for a, rs in data.items() if a != "ce" for r in rs.values() if r.get("diagnostics")]
    if len(runs) < 4:
        return []
    keys = (("kl_real", "KL(U‖p) on real training images"), ("maxsoftmax_real", "max-softmax on real training images"),
            ("gnorm", "classifier gradient norm"), ("diversity", "G's diversity"), ("nn_dist_gen", "G's NN distance"))
    out = ["", f"What goes with detection (read after the runs, exploratory; no arm is chosen by it): Spearman's rank "
           f"correlation over the {len(runs)} runs of the GAN arms between the last diagnostics point and the baseline "
           "TNR (p not corrected for the number of correlations):", "", "| at the end of training | " + " | ".join(TEST_SETS) + " |",
           "|---|" + "---:|" * len(TEST_SETS)]
    for k, name in keys:
        xs = [r["diagnostics"][-1].get(k, float("nan")) for r in runs]
        cells = []
        for n in TEST_SETS:
            pairs = [(x, tnr(r, n, "baseline")) for x, r in zip(xs, runs) if not math.isnan(x)]
            a, b = [x for x, _ in pairs], [y for _, y in pairs]
            defined = len(pairs) >= 4 and len(set(a)) > 1 and len(set(b)) > 1      # else a rank correlation is not
            rho, pv = spearmanr(a, b) if defined else (math.nan, math.nan)
            cells.append("—" if math.isnan(rho) else f"{rho:+.2f} (p {pv:.3f})")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


DIAG_KEYS = (("acc", "classifier train accuracy"), ("maxsoftmax_real", "max-softmax, real train images"),
             ("kl_real", "KL(U||p), real train images"), ("gnorm_max", "largest classifier grad norm"),
             ("maxsoftmax_gen", "max-softmax, G samples"), ("d_acc_fake", "D accuracy on G samples"),
             ("nn_dist_gen", "NN distance G -> data"), ("diversity", "G diversity / real diversity"))


def plot(data: dict, out: Path, ce_acc: float):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    arms = [a for a in data if any("diagnostics" in r for r in data[a].values())]
    if not arms:
        return None
    fig, axes = plt.subplots(len(arms), len(DIAG_KEYS), figsize=(3.2 * len(DIAG_KEYS), 2.6 * len(arms)),
                             squeeze=False)
    for i, arm in enumerate(arms):
        for j, (k, name) in enumerate(DIAG_KEYS):
            ax = axes[i][j]
            for s, r in sorted(data[arm].items()):
                d = r.get("diagnostics", [])
                collapsed = 100 * r["accuracy"] < ce_acc - COLLAPSE_POINTS
                ax.plot([p["global_step"] for p in d], [p.get(k, float("nan")) for p in d],
                        color="red" if collapsed else "grey", lw=1.6 if collapsed else 0.8, marker=".", ms=2,
                        label=f"s{s} (collapsed)" if collapsed else None)
            ax.set_title(f"{arm}: {name}", fontsize=8)
            if k in ("kl_real", "gnorm_max"):
                ax.set_yscale("log")
            ax.tick_params(labelsize=7)
            if any(100 * r["accuracy"] < ce_acc - COLLAPSE_POINTS for r in data[arm].values()) and j == 0:
                ax.legend(fontsize=6)
    axes[-1][0].set_xlabel("training step", fontsize=8)
    fig.tight_layout()
    path = out / "diagnostics.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def cmd_report(args):
    data = load(args.runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = report(data, out, args.title)
    ce_acc = mean_std([100 * r["accuracy"] for r in data["ce"].values()])[0]
    png = plot(data, out, ce_acc)
    if png:
        text += f"\n![diagnostics per arm and seed; collapsed seeds in red]({png.name})\n"
    (out / "report.md").write_text(text)
    print(text)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:                            # one run: confident.py's CLI with StudyConfig's flags
        return confident.main(argv[1:], StudyConfig, StudyTrainer, prog="stability.py train")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("train", help="one run: confident.py's flags and the stabilisers' (stability.py train --help)")
    r = sub.add_parser("run")
    r.add_argument("--arms", default="ce,joint")
    r.add_argument("--seeds", default="0-7")
    r.add_argument("--scale", choices=SCALES, default="main")
    r.add_argument("--runs", default="results/stability/runs")
    r.add_argument("--jobs", type=int, default=1)
    r.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    r.add_argument("--device", default="auto")
    r.add_argument("--extra", default="", help="more `stability.py train` flags for every run")
    r.add_argument("--common", default=COMMON, help=f"flags every run of the seed study adds (default {COMMON!r}; "
                   "'' runs the scale's command alone, as results/confirm/ does)")
    q = sub.add_parser("report")
    q.add_argument("--runs", default="results/stability/runs", help="a folder of runs, or several joined by commas")
    q.add_argument("--out", default="results/stability")
    q.add_argument("--title", default="Joint training over seeds")
    args = p.parse_args(argv)
    {"run": cmd_run, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
