"""Benchmark the Triton kernels against eager PyTorch and torch.compile.

    python kernels/bench.py [--device cuda] [--dtype fp32|bf16] [--out kernels_bench.csv] [--quick]

Rows:
  kl_uniform_rows fwd+bwd and fwd, batch x K grid, vs the eager reference
  logsumexp(z) - mean(z) - log K (autograd) and torch.compile of it;
  kl_uniform_mean fwd+bwd (the batch mean a loss uses; backward from 1.0),
  vs the eager and compiled mean of that reference;
  odin_logit_grads (nT = 5) vs the eager per-temperature softmax;
  odin_perturb (nE = 4) vs eager x - eps * sign(g) / std.

On CUDA times are medians of triton.testing.do_bench, and effective bandwidth
is also given as a fraction of a measured device-to-device copy (~1 GB,
bytes read + written). On CPU a wall-clock median is used; Triton runs there
only under TRITON_INTERPRET=1, and those are interpreter timings (not
meaningful as performance numbers).
"""

import argparse
import csv
import math
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import kernels  # noqa: E402

try:
    import triton
except Exception:  # pragma: no cover
    triton = None


# ---------------------------------------------------------------- timing


def _cpu_time_ms(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def make_timer(device, quick):
    if device.type == "cuda":
        from triton.testing import do_bench

        def timer(fn):
            try:
                return do_bench(fn, warmup=25, rep=100, return_mode="median")
            except TypeError:  # older signature
                return do_bench(fn, warmup=25, rep=100, quantiles=[0.5])[0]

        return timer
    return lambda fn: _cpu_time_ms(fn, 5 if quick else 10)


def copy_bandwidth_gbs(device, timer):
    """Device-to-device copy bandwidth, counting bytes read + written."""
    n = (1 << 30) // 4
    x = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    ms = timer(lambda: y.copy_(x))
    del x, y
    return 2 * n * 4 / (ms * 1e-3) / 1e9


# ---------------------------------------------------------------- references


def kl_ref(z):
    return torch.logsumexp(z.float(), dim=1) - z.float().mean(dim=1) - math.log(z.shape[1])


def kl_mean_ref(z):
    return kl_ref(z).mean()


def odin_ref(z, temps):
    z = z.float()
    yhat = torch.nn.functional.one_hot(z.argmax(1), z.shape[1]).float()
    scores, grads = [], []
    for T in temps:
        p = torch.softmax(z / T, dim=1)
        scores.append(p.max(1).values)
        grads.append((p - yhat) / T)
    return torch.stack(scores), torch.stack(grads)


def perturb_ref(x, g, eps, std):
    step = torch.where(g >= 0, 1.0, -1.0) / std.view(1, -1, 1, 1)
    return (x.float()[None] - eps.view(-1, 1, 1, 1, 1) * step[None]).to(x.dtype)


def try_compile(fn, dynamic=None):
    try:
        import torch._dynamo

        # one compiled graph per (shape, dtype, grad mode) is expected here
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 64)
    except Exception:  # noqa: BLE001
        pass
    try:
        return torch.compile(fn, dynamic=dynamic)
    except Exception as exc:  # noqa: BLE001
        print(f"torch.compile unavailable: {type(exc).__name__}: {exc}".splitlines()[0])
        return None


# ---------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--out", default="kernels_bench.csv")
    ap.add_argument("--quick", action="store_true", help="small grid, for a smoke test")
    ap.add_argument("--batches", default="", help="comma list of batch sizes (overrides the default grid)")
    ap.add_argument("--ks", default="", help="comma list of K (overrides the default grid)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    esize = torch.tensor([], dtype=dtype).element_size()
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    run_triton = kernels.AVAILABLE and (device.type == "cuda" or interp)
    tiny = device.type != "cuda"

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}")
    print(f"torch {torch.__version__}, triton {getattr(triton, '__version__', 'not installed')}, dtype {args.dtype}")
    if device.type != "cuda":
        if run_triton:
            print("NOTE: Triton runs in the CPU interpreter (TRITON_INTERPRET=1): its timings are not performance numbers")
        else:
            print("NOTE: no CUDA device: Triton is skipped (set TRITON_INTERPRET=1 to run the interpreter)")

    timer = make_timer(device, args.quick)
    copy_bw = copy_bandwidth_gbs(device, timer) if device.type == "cuda" else None
    if copy_bw:
        print(f"measured copy bandwidth: {copy_bw:.0f} GB/s (read + write)")

    if args.quick:
        batches, ks = ((64,), (10, 1000)) if tiny else ((4096,), (10, 1000, 32000))
    else:
        batches, ks = ((256, 1024), (10, 100, 1000)) if tiny else ((4096, 16384), (10, 100, 1000, 32000))
    if args.batches:
        batches = tuple(int(b) for b in args.batches.split(","))
    if args.ks:
        ks = tuple(int(k) for k in args.ks.split(","))
    if tiny and run_triton:  # interpreter: keep it to seconds
        batches = tuple(min(b, 64) for b in batches)

    rows = []

    def record(op, mode, impl, shape, ms, nbytes, eager_ms):
        gbs = nbytes / (ms * 1e-3) / 1e9 if ms else None
        rows.append(
            dict(
                op=op,
                mode=mode,
                impl=impl,
                shape=shape,
                ms=ms,
                gbs=gbs,
                frac_copy=(gbs / copy_bw) if (gbs and copy_bw) else None,
                speedup=(eager_ms / ms) if (ms and eager_ms) else None,
            )
        )

    def timed(fn):
        try:
            return timer(fn)
        except Exception as exc:  # noqa: BLE001
            print(f"  failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            return None

    compiled_kl = try_compile(kl_ref, dynamic=True if tiny else None)
    compiled_kl_mean = try_compile(kl_mean_ref, dynamic=True if tiny else None)

    # ---- kl_uniform_rows
    for B in batches:
        for K in ks:
            z = torch.randn(B, K, device=device).to(dtype).requires_grad_(True)
            shape = f"{B}x{K}"
            impls = [("eager", kl_ref)]
            if compiled_kl is not None:
                impls.append(("compile", compiled_kl))
            if run_triton:
                impls.append(("triton", kernels.kl_uniform_rows))
            for mode in ("fwd+bwd", "fwd"):
                nbytes = (2 if mode == "fwd+bwd" else 1) * B * K * esize
                eager_ms = None
                for impl, fn in impls:
                    if mode == "fwd+bwd":

                        def call(fn=fn):
                            return torch.autograd.grad(fn(z).sum(), z)

                    else:

                        def call(fn=fn):
                            with torch.no_grad():
                                return fn(z)

                    ms = timed(call)
                    if impl == "eager":
                        eager_ms = ms
                    record("kl_uniform_rows", mode, impl, shape, ms, nbytes, eager_ms)
            # the batch mean a training loss uses, fwd + loss.backward() (upstream gradient 1)
            impls = [("eager", kl_mean_ref)]
            if compiled_kl_mean is not None:
                impls.append(("compile", compiled_kl_mean))
            if run_triton:
                impls.append(("triton", kernels.kl_uniform_mean))
            eager_ms = None
            for impl, fn in impls:
                ms = timed(lambda fn=fn: torch.autograd.grad(fn(z), z))
                if impl == "eager":
                    eager_ms = ms
                record("kl_uniform_mean", "fwd+bwd", impl, shape, ms, 2 * B * K * esize, eager_ms)
            del z

    # ---- odin_logit_grads, nT = 5
    temps = (1.0, 10.0, 100.0, 500.0, 1000.0)
    for B in batches:
        for K in [k for k in ks if k <= 1000]:
            z = torch.randn(B, K, device=device).to(dtype)
            nbytes = B * K * esize + len(temps) * B * (K + 1) * 4
            eager_ms = timed(lambda: odin_ref(z, temps))
            record("odin_logit_grads", "nT=5", "eager", f"{B}x{K}", eager_ms, nbytes, eager_ms)
            if run_triton:
                ms = timed(lambda: kernels.odin_logit_grads(z, temps))
                record("odin_logit_grads", "nT=5", "triton", f"{B}x{K}", ms, nbytes, eager_ms)

    # ---- odin_perturb, nE = 4, CIFAR-sized images
    eps_list = [0.0, 0.0005, 0.0014, 0.002]
    n_img = 8 if tiny else (256 if args.quick else 1024)
    x = torch.randn(n_img, 3, 32, 32, device=device).to(dtype)
    g = torch.randn(n_img, 3, 32, 32, device=device)
    std = torch.tensor([0.2470, 0.2435, 0.2616], device=device)
    eps_t = torch.tensor(eps_list, device=device)
    nbytes = x.numel() * (esize + 4 + len(eps_list) * esize)
    shape = f"{n_img}x3x32x32"
    eager_ms = timed(lambda: perturb_ref(x, g, eps_t, std))
    record("odin_perturb", "nE=4", "eager", shape, eager_ms, nbytes, eager_ms)
    if run_triton:
        ms = timed(lambda: kernels.odin_perturb(x, g, eps_t, std=std))
        record("odin_perturb", "nE=4", "triton", shape, ms, nbytes, eager_ms)

    # ---- report
    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    header = ["op", "mode", "impl", "shape", "ms", "GB/s", "frac_copy", "speedup"]
    table = [
        [
            r["op"],
            r["mode"],
            r["impl"] + (" (interp)" if r["impl"] == "triton" and device.type != "cuda" else ""),
            r["shape"],
            fmt(r["ms"], ".4f"),
            fmt(r["gbs"], ".1f"),
            fmt(r["frac_copy"], ".2f"),
            fmt(r["speedup"], ".2f"),
        ]
        for r in rows
    ]
    if compiled_kl is None:
        print("torch.compile: n/a")
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths)))

    with open(args.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["device", "torch", "triton", "dtype"] + header)
        for t in table:
            w.writerow([name, torch.__version__, getattr(triton, "__version__", ""), args.dtype] + t)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
