"""
bench.py: how long evaluation and training take, ours against the usual ways, measured in one run.

    python bench.py                          # CPU, the defaults behind the README's table
    python bench.py --device cuda --amp      # GPU: also bf16 autocast + channels_last, with score deltas
    python bench.py --channels-last off      # "ours" in NCHW (default auto: NHWC on the CPU, as confident.py)
    python bench.py --quick                  # a smoke test in seconds

It times, on the same model (vgg13, K=10, eval mode) and the same inputs:
  1. the ODIN grid (5 temperatures x 4 epsilons) over N in + N out images:
       ours        `odin_grid`: 1 forward + nT input-gradient backwards + nT*(nE-1) forwards
       per-point   `odin_scores` per (T, eps): forward + input-gradient backward + forward each (public libraries)
       batch-1     the ODIN authors' protocol, one image at a time (a subset timed, then extrapolated)
       floor       1 forward + nT backward + nT*(nE-1) forward from single-pass times at the same batch size
  2. `ood_metrics` (one sort) against the authors' threshold grid (200,000 thresholds) on 26,032 + 10,000 scores;
  3. one training step of `ce` and of `joint` (images/s and their ratio); on CUDA also captured into a CUDA graph
     (--cuda-graphs), and eagerly at --big-batch per --train-batch images;
  4. training throughput with 1 and 2 processes under torchrun (DistributedDataParallel).
The ODIN grid and the training steps are also timed in the other memory format (NCHW / channels_last NHWC) on
the same weights, so the README's ratio for --channels-last comes from one run.
Medians of repeats after a warm-up. Prints a table; writes JSON with machine, versions and commit.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

import confident as C


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timeit(fn, dev, repeats=3, warmup=1):
    for _ in range(warmup):
        fn()
    sync(dev)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def authors_grid_metrics(score_in, score_out, n_thresholds=200_000, chunk=500):
    """The authors' evaluation, vectorised over chunks of an evenly spaced threshold grid (the brute force)."""
    si, so = np.asarray(score_in, np.float64), np.asarray(score_out, np.float64)
    start, end = min(si.min(), so.min()), max(si.max(), so.max())
    gap = (end - start) / n_thresholds
    d = np.arange(start, end, gap)

    def frac(x, op, th):
        return np.concatenate([op(x[None, :], th[i:i + chunk, None]).mean(1) for i in range(0, len(th), chunk)])
    tpr, fpr, fp_ge = frac(si, np.greater_equal, d), frac(so, np.greater, d), frac(so, np.greater_equal, d)
    band = (tpr >= 0.94) & (tpr <= 0.96)
    tnr = 1 - fpr[band].mean() if band.any() else 0.0            # no threshold in the band: FPR = 1
    prev = np.concatenate([[1.0], fpr[:-1]])
    auroc = np.sum((prev - fpr) * tpr)                           # nothing after the sweep (ODIN adds fpr*tpr)
    det_acc = 1 - min(1.0, np.min((1 - tpr + fpr) / 2))          # P(in < d) = 1 - P(in >= d)
    keep = (tpr + fp_ge) > 0
    r, p = tpr[keep], tpr[keep] / (tpr[keep] + fp_ge[keep])
    aupr_in = np.sum((np.concatenate([[1.0], r[:-1]]) - r) * p) + r[-1] * p[-1]
    d2 = np.arange(end, start, -gap)
    tp, fp = frac(so, np.less, d2), frac(si, np.less, d2)
    keep = np.cumprod((tp + fp) > 0).astype(bool)
    r, p = tp[keep], tp[keep] / (tp[keep] + fp[keep])
    aupr_out = np.sum((np.concatenate([[1.0], r[:-1]]) - r) * p) + r[-1] * p[-1]
    return dict(tnr_at_tpr95=tnr, auroc=auroc, detection_acc=det_acc, aupr_in=aupr_in, aupr_out=aupr_out)


def bench_odin(args, dev, rows, notes):
    torch.manual_seed(0)
    model = C.vgg13(10, args.width).to(dev).eval()
    amp = contextlib.nullcontext
    if args.amp:
        amp = lambda: torch.autocast(dev.type, dtype=torch.bfloat16)   # noqa: E731
    cl = channels_last(args, dev)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    x = torch.rand(2 * args.n, 3, 32, 32).to(dev)     # N in + N out: the grid does not care which is which
    Ts, Es = [1.0, 10.0, 100.0, 500.0, 1000.0], [0.0, 0.0001, 0.001, 0.01]
    nT, nE, bs, N = len(Ts), len(Es), args.batch_size, len(x)
    R = args.repeats

    def ours():
        with amp():
            return C.odin_grid(model, x, Ts, Es, bs, impl=args.impl)

    def per_point():
        with amp():
            return torch.stack([torch.stack([C.odin_scores(model, x, T, e, bs) for e in Es]) for T in Ts])

    # warm up on one batch (kernels, allocator, autotuning), then time the whole grid
    with amp():
        C.odin_grid(model, x[:bs], Ts, Es, bs, impl=args.impl)
        C.odin_scores(model, x[:bs], Ts[0], Es[1], bs)
    t_ours = timeit(ours, dev, R, warmup=0)
    t_pp = timeit(per_point, dev, R, warmup=0)
    # single passes at the same batch size, for the floor
    xb = x[:bs]

    def fwd():
        with torch.no_grad(), amp():
            model(xb)

    def fwd_graph():
        with amp():
            return model(xb.clone().requires_grad_(True))

    def fwd_bwd():
        xg = xb.clone().requires_grad_(True)
        with amp():
            out = model(xg)
        torch.autograd.grad(out, xg, grad_outputs=torch.ones_like(out))
    t_f, t_fg, t_fb = (timeit(f, dev, max(R, 5)) for f in (fwd, fwd_graph, fwd_bwd))
    t_b = max(t_fb - t_fg, 0.0)
    n_batches = N / bs
    t_floor = n_batches * (t_fg + nT * t_b + nT * (nE - 1) * t_f)
    # batch 1: time a subset of images over the whole grid, extrapolate to N
    n1 = args.batch1_images
    x1 = x[:n1]

    def batch1():
        for i in range(n1):
            for T in Ts:
                for e in Es:
                    with amp():
                        C.odin_scores(model, x1[i:i + 1], T, e, 1)
    t_b1 = timeit(batch1, dev, 1) * N / n1
    notes.append(f"batch-1: {n1} images x {nT * nE} grid points timed, extrapolated to {N} images")
    # equality of scores: ours vs per-point, on the same inputs (fp32 unless --amp)
    diff = float((ours() - per_point()).abs().max())
    if args.amp:
        model32 = C.vgg13(10, args.width).to(dev).eval()
        model32.load_state_dict(model.state_dict())
        ref = C.odin_grid(model32, x, Ts, Es, bs, impl="torch")
        notes.append(f"bf16 autocast + channels_last vs fp32: max |score diff| = {float((ours() - ref).abs().max()):.2e}")
    notes.append(f"max |odin_grid - per-point odin_scores| over the grid = {diff:.2e}")
    # the same weights in the other memory format
    other = C.vgg13(10, args.width).to(dev).eval()
    other.load_state_dict(model.state_dict())
    other = other.to(memory_format=torch.contiguous_format if cl else torch.channels_last)

    def ours_other():
        with amp():
            return C.odin_grid(other, x, Ts, Es, bs, impl=args.impl)
    ours_other()                                                  # warm-up
    t_other = timeit(ours_other, dev, R, warmup=0)
    notes.append(f"odin_grid NCHW vs NHWC weights: max |score diff| = {float((ours_other() - ours()).abs().max()):.2e}")
    for name, t in (("ODIN grid: ours (odin_grid)", t_ours), ("ODIN grid: per-point batched", t_pp),
                    ("ODIN grid: per-image batch 1 (extrap.)", t_b1), ("ODIN grid: floor", t_floor),
                    (f"ODIN grid: ours, {'NCHW' if cl else 'NHWC'} (the other memory format)", t_other)):
        rows.append(dict(what=name, seconds=t, images_per_s=N / t, vs_ours=t / t_ours))
    rows.append(dict(what="single forward (no grad)", seconds=t_f, images_per_s=bs / t_f, vs_ours=None))
    rows.append(dict(what="single input-gradient backward", seconds=t_b, images_per_s=bs / t_b if t_b else None,
                     vs_ours=None))
    return dict(ours=t_ours, per_point=t_pp, batch1=t_b1, floor=t_floor, fwd=t_f, fwd_graph=t_fg, bwd=t_b,
                max_abs_diff=diff, other_format=t_other)


def bench_metrics(args, rows, notes):
    rng = np.random.default_rng(0)
    n_in, n_out = (26_032, 10_000) if not args.quick else (2_603, 1_000)
    s_in = rng.beta(5, 1, n_in).astype(np.float32)           # a realistic mix of overlap
    s_out = rng.beta(2, 2, n_out).astype(np.float32)
    t_fast = timeit(lambda: C.ood_metrics(s_in, s_out), torch.device("cpu"), 5)
    nth = args.metric_thresholds
    t0 = time.perf_counter()
    grid = authors_grid_metrics(s_in, s_out, nth)
    t_grid = time.perf_counter() - t0
    fast = C.ood_metrics(s_in, s_out)
    worst = max(abs(fast[k] - grid[k]) for k in grid)
    notes.append(f"ood_metrics vs the authors' {nth:,}-threshold grid on {n_in:,} + {n_out:,} scores: "
                 f"max |difference| = {worst:.1e}")
    rows.append(dict(what=f"metrics: ood_metrics ({n_in}+{n_out})", seconds=t_fast, images_per_s=None, vs_ours=1.0))
    rows.append(dict(what=f"metrics: authors' grid ({nth} thr.)", seconds=t_grid, images_per_s=None,
                     vs_ours=t_grid / t_fast))
    return dict(fast=t_fast, grid=t_grid, max_abs_diff=worst)


def _fmt(args, dev) -> str:
    """--channels-last for "ours": the flag's value; --amp on CUDA also turns it on (tensor cores)."""
    return "on" if args.amp and dev.type == "cuda" else args.channels_last


def channels_last(args, dev) -> bool:
    return C.use_channels_last(C.Config(channels_last=_fmt(args, dev)), dev)


def bench_train(args, dev, rows, notes):
    """One training step of ce and joint at --train-batch, eagerly (x ours: against ce). On CUDA also the step
    captured into a CUDA graph (--cuda-graphs; x ours: against the eager step) and the eager step at
    --big-batch, per --train-batch images: how close the captured small batch comes to a big batch's cost."""
    out = {}
    B, big = args.train_batch, args.big_batch
    x = torch.randint(0, 256, (max(B, big) * 4, 3, 32, 32), dtype=torch.uint8).to(dev)
    y = torch.randint(0, 10, (len(x),)).to(dev)

    def time_step(method, bs, graphed=False, fmt=None):
        cfg = C.resolve(C.Config(in_data="fashion-mnist", out_data="mnist", method=method, width=args.width,
                                 batch_size=bs, amp=args.amp, channels_last=fmt or _fmt(args, dev), impl=args.impl))
        torch.manual_seed(0)
        tr = C.Trainer(cfg, 10, dev, log=lambda *a: None)
        said = []
        run = C._graphs_module().GraphedStep(tr, log=said.append) if graphed else tr.step
        i = [0]

        def step():
            j = i[0] % 4
            i[0] += 1
            xb = C.to_float(x[j * bs:(j + 1) * bs])
            run(xb.contiguous(memory_format=torch.channels_last) if C.use_channels_last(cfg, dev) else xb,
                y[j * bs:(j + 1) * bs])
        t = timeit(step, dev, max(args.repeats, 3), warmup=2)       # the first call of a graph captures it
        return t, (run.why_not if graphed else None)

    graphs = dev.type == "cuda" and not args.no_cuda_graphs
    cl = channels_last(args, dev)
    for method in ("ce", "joint"):
        t, _ = time_step(method, B)
        out[method] = t
        rows.append(dict(what=f"train step: {method} (batch {B})", seconds=t, images_per_s=B / t,
                         vs_ours=t / out["ce"]))
        to = time_step(method, B, fmt="off" if cl else "on")[0]
        out[f"{method}_other_format"] = to
        rows.append(dict(what=f"train step: {method} (batch {B}), {'NCHW' if cl else 'NHWC'} (the other memory format)",
                         seconds=to, images_per_s=B / to, vs_ours=to / t))
        if not graphs:
            continue
        tg, why_not = time_step(method, B, graphed=True)
        if why_not:
            notes.append(f"train step: {method} was not captured, timed eagerly: --cuda-graphs {why_not}")
        else:
            out[f"{method}_graph"] = tg
            rows.append(dict(what=f"train step: {method} (batch {B}, CUDA graph)", seconds=tg, images_per_s=B / tg,
                             vs_ours=tg / t))
        tb = time_step(method, big)[0] * B / big
        out[f"{method}_batch{big}_per{B}"] = tb
        rows.append(dict(what=f"train step: {method} (batch {big}), per {B} images", seconds=tb, images_per_s=B / tb,
                         vs_ours=tb / t))
        if not why_not:
            notes.append(f"train step: {method} at batch {B} captured / per-{B}-image cost at batch {big} eager = "
                         f"{tg / tb:.2f} (target <= 1.3); eager / captured at batch {B} = {t / tg:.2f}")
    return out


def ddp_worker(args):
    """Run under torchrun: time training steps with DistributedDataParallel; rank 0 prints one JSON line."""
    import torch.distributed as dist
    dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if args.device == "cuda" else "cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = C.resolve(C.Config(in_data="fashion-mnist", out_data="mnist", method=args.ddp_method, width=args.width,
                             batch_size=args.train_batch, impl=args.impl))
    torch.manual_seed(rank)
    tr = C.Trainer(cfg, 10, dev, log=lambda *a: None)
    C._wrap_ddp(tr, dev)
    B = args.train_batch
    x = C.to_float(torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8)).to(dev)
    y = torch.randint(0, 10, (B,)).to(dev)
    t = timeit(lambda: tr.step(x, y), dev, repeats=max(args.repeats, 5), warmup=2)
    if rank == 0:
        print("DDP_RESULT " + json.dumps(dict(world=world, seconds=t, images_per_s=world * B / t)), flush=True)
    dist.destroy_process_group()


def bench_ddp(args, rows, notes):
    """Training throughput with 1 and 2 processes (torchrun), the same per-process batch (weak scaling)."""
    out = {}
    threads = max(1, (os.cpu_count() or 2))
    for world in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
               "--master_addr=127.0.0.1", f"--master_port={29400 + world}", __file__, "--ddp-worker",
               "--device", args.device, "--width", str(args.width), "--train-batch", str(args.train_batch),
               "--repeats", str(args.repeats), "--impl", args.impl, "--ddp-method", args.ddp_method]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, threads // world)))
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("DDP_RESULT ")]
        if p.returncode != 0 or not line:
            notes.append(f"DDP with {world} processes failed: {(p.stderr or p.stdout)[-300:]}")
            continue
        r = json.loads(line[0][len("DDP_RESULT "):])
        out[world] = r
        rows.append(dict(what=f"train {args.ddp_method}: {world} process(es) x batch {args.train_batch} (DDP)",
                         seconds=r["seconds"], images_per_s=r["images_per_s"],
                         vs_ours=out[1]["images_per_s"] / r["images_per_s"] if 1 in out else None))
    notes.append(f"DDP: {threads} cores shared, OMP_NUM_THREADS = cores / processes; gloo on CPU, nccl on CUDA")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--width", type=float, default=0.25, help="vgg13 width multiplier")
    p.add_argument("--n", type=int, default=2000, help="in-distribution images (as many OOD images)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--big-batch", type=int, default=1024, help="CUDA: the eager step at this batch, for comparison")
    p.add_argument("--no-cuda-graphs", action="store_true", help="CUDA: skip the captured training step")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch1-images", type=int, default=10)
    p.add_argument("--metric-thresholds", type=int, default=200_000)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (+ channels_last on CUDA)")
    p.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"),
                   help="memory format of ours (as confident.py's flag; auto: NHWC on the CPU, NCHW on CUDA)")
    p.add_argument("--impl", default="auto", help="auto | torch | triton")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    p.add_argument("--json", default="bench.json")
    p.add_argument("--skip", default="", help="comma list of odin,metrics,train,ddp to skip")
    p.add_argument("--ddp-method", default="ce", help="regime timed with 1 and 2 processes")
    p.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ddp_worker:
        return ddp_worker(args)
    if args.quick:
        args.n, args.batch_size, args.width, args.repeats = 100, 50, 0.0625, 1
        args.batch1_images, args.metric_thresholds, args.train_batch, args.big_batch = 2, 2_000, 32, 128
    dev = torch.device(args.device)
    rows, notes, res = [], [], {}
    skip = set(args.skip.split(","))
    if "odin" not in skip:
        res["odin"] = bench_odin(args, dev, rows, notes)
    if "metrics" not in skip:
        res["metrics"] = bench_metrics(args, rows, notes)
    if "train" not in skip:
        res["train"] = bench_train(args, dev, rows, notes)
    if "ddp" not in skip:
        res["ddp"] = bench_ddp(args, rows, notes)
    env = C.environment()
    env.update(device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
               threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d"))
    head = (f"bench.py on {env['device_name']} ({args.device}, {env['threads']} threads), torch {env['torch']}, "
            f"commit {env['commit']}, {env['date']}; vgg13 width {args.width}, K=10, eval mode, "
            f"{2 * args.n} images, batch {args.batch_size}, {'NHWC (channels_last)' if channels_last(args, dev) else 'NCHW'}"
            f"{', bf16 autocast' if args.amp else ''}")
    lines = [head, "", "| what | seconds | images/s | x ours |", "|---|---:|---:|---:|"]
    for r in rows:
        ips = f"{r['images_per_s']:.0f}" if r["images_per_s"] else ""
        ratio = f"{r['vs_ours']:.2f}" if r["vs_ours"] is not None else ""
        lines.append(f"| {r['what']} | {r['seconds']:.4f} | {ips} | {ratio} |")
    if "odin" in res:
        o = res["odin"]
        lines += ["", f"odin_grid / floor = {o['ours'] / o['floor']:.3f}; per-point / odin_grid = "
                      f"{o['per_point'] / o['ours']:.2f}; batch-1 / odin_grid = {o['batch1'] / o['ours']:.1f}"]
    if "train" in res:
        lines.append(f"joint step / ce step = {res['train']['joint'] / res['train']['ce']:.2f}")
    lines += [f"- {n}" for n in notes]
    print("\n".join(lines))
    with open(args.json, "w") as f:
        json.dump(dict(env=env, args=vars(args), rows=rows, results=res, notes=notes), f, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
