"""ODIN scores, logit gradients and input perturbation (Liang et al., ICLR 2018).

Math
----
For logits z = f(x) in R^K and temperature T > 0 let S(x; T) = softmax(z / T).
The ODIN score is max_y S_y(x; T). With m = max_k z_k (so max_k z_k / T = m / T)

    S_k = exp((z_k - m) / T) / D_T,   D_T = sum_j exp((z_j - m) / T),

and the largest probability is exactly 1 / D_T.

The input perturbation follows the gradient of L = -log S_yhat(x; T) with
yhat = argmax_k z_k (the same class for every T since T > 0). With
L = logsumexp(z / T) - z_yhat / T,

    dL/dz_k = (S_k - [k == yhat]) / T.

``odin_logit_grads`` returns these (nT, B, K) logit gradients for every T from
one pass; the caller backpropagates them to the input,
``torch.autograd.grad(logits, x, grad_outputs=grads[t])``, and
``odin_perturb`` forms

    x' = x - eps * sign(dL/dx) / std[c]

for every eps at once, with sign(g) = +1 for g >= 0 and -1 otherwise (the
convention of the ODIN reference code, which maps a zero gradient to +1),
and std the optional per-channel normalisation std (channel = dim 1).

Kernels
-------
``_odin_grad_kernel``: one program per row. When K fits in one block the row is
loaded once and reused for all temperatures; otherwise a first pass over column
blocks finds the max and first argmax, and for each temperature one pass
accumulates D_T and one writes the gradient. fp32 throughout. The argmax takes
the lowest index among ties, like ``torch.argmax``.

``_odin_perturb_kernel``: elementwise over x; each program loads a block of x
and of the gradient once and writes one output block per eps.
"""

import torch
import triton
import triton.language as tl

MAX_BLOCK = 8192
PERTURB_BLOCK = 1024


def _as_1d_float(values, name, device):
    if isinstance(values, torch.Tensor):
        t = values.detach().to(device=device, dtype=torch.float32).reshape(-1)
    else:
        try:
            t = torch.tensor([float(v) for v in values], dtype=torch.float32, device=device)
        except TypeError:
            t = torch.tensor([float(values)], dtype=torch.float32, device=device)
    if t.numel() == 0:
        raise ValueError(f"{name} must contain at least one value")
    return t.contiguous()


@triton.jit
def _odin_grad_kernel(
    X_ptr,
    X_stride,
    T_ptr,
    S_ptr,
    G_ptr,
    n_rows,
    n_cols,
    temp_stride,
    N_TEMPS: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_BLOCKS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X_ptr + row * X_stride
    # Pointers advance by one temperature slice per loop step (64-bit pointer
    # arithmetic, so nT * B * K may exceed 2**31).
    s_ptr = S_ptr + row
    g_row = G_ptr + row * n_cols

    if NUM_BLOCKS == 1:
        offs = tl.arange(0, BLOCK)
        mask = offs < n_cols
        x = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=0)
        arg = tl.min(tl.where(x == m, offs, n_cols), axis=0)
        onehot = tl.where(offs == arg, 1.0, 0.0)
        for t in range(N_TEMPS):
            temp = tl.load(T_ptr + t)
            e = tl.exp((x - m) / temp)
            d = tl.sum(e, axis=0)
            tl.store(s_ptr, 1.0 / d)
            g = (e / d - onehot) / temp
            tl.store(g_row + offs, g, mask=mask)
            s_ptr += n_rows
            g_row += temp_stride
    else:
        m = float("-inf")
        arg = 0
        for b in range(NUM_BLOCKS):
            start = b * BLOCK
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n_cols
            x = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
            bm = tl.max(x, axis=0)
            barg = tl.min(tl.where(x == bm, offs, n_cols), axis=0)
            arg = tl.where(bm > m, barg, arg)
            m = tl.maximum(m, bm)
        for t in range(N_TEMPS):
            temp = tl.load(T_ptr + t)
            d = 0.0
            for b in range(NUM_BLOCKS):
                start = b * BLOCK
                offs = start + tl.arange(0, BLOCK)
                mask = offs < n_cols
                x = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
                d += tl.sum(tl.exp((x - m) / temp), axis=0)
            tl.store(s_ptr, 1.0 / d)
            for b in range(NUM_BLOCKS):
                start = b * BLOCK
                offs = start + tl.arange(0, BLOCK)
                mask = offs < n_cols
                x = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
                onehot = tl.where(offs == arg, 1.0, 0.0)
                g = (tl.exp((x - m) / temp) / d - onehot) / temp
                tl.store(g_row + offs, g, mask=mask)
            s_ptr += n_rows
            g_row += temp_stride


@triton.jit
def _odin_perturb_kernel(
    X_ptr,
    G_ptr,
    E_ptr,
    STD_ptr,
    O_ptr,
    n_elements,
    inner,
    n_channels,
    N_EPS: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_STD: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = tl.load(X_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sgn = tl.where(g >= 0, 1.0, -1.0)
    if HAS_STD:
        c = (offs // inner) % n_channels
        sd = tl.load(STD_ptr + c, mask=mask, other=1.0)
    else:
        sd = tl.full((BLOCK,), 1.0, tl.float32)
    o_ptrs = O_ptr + offs
    for e in range(N_EPS):
        eps = tl.load(E_ptr + e)
        out = x - eps * sgn / sd
        tl.store(o_ptrs, out.to(O_ptr.dtype.element_ty), mask=mask)
        o_ptrs += n_elements


def odin_logit_grads(logits, temperatures):
    """ODIN scores and logit gradients for several temperatures in one launch.

    logits: (B, K) float tensor (any float dtype; computed in fp32).
    temperatures: sequence or 1-D tensor of nT positive values.
    Returns (scores, grads): scores (nT, B) fp32 with scores[t, i] =
    max softmax(logits[i] / T_t); grads (nT, B, K) fp32 with grads[t, i] =
    (softmax(logits[i] / T_t) - onehot(argmax logits[i])) / T_t, the gradient
    of the summed loss -log S_yhat(x; T_t) with respect to the logits.
    Not differentiable (inputs are read detached).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a (B, K) tensor, got {shape}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a floating point tensor, got {logits.dtype}")
    logits = logits.detach()
    if logits.dtype == torch.float64:
        logits = logits.float()
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    n_rows, n_cols = logits.shape
    if n_cols < 1:
        raise ValueError("logits need at least one class")
    temps = _as_1d_float(temperatures, "temperatures", logits.device)
    if not bool((temps > 0).all()) or not bool(torch.isfinite(temps).all()):
        raise ValueError(f"temperatures must be finite and > 0, got {temps.tolist()}")
    n_temps = temps.numel()
    scores = torch.empty((n_temps, n_rows), dtype=torch.float32, device=logits.device)
    grads = torch.empty((n_temps, n_rows, n_cols), dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return scores, grads
    block = min(triton.next_power_of_2(n_cols), MAX_BLOCK)
    num_blocks = triton.cdiv(n_cols, block)
    _odin_grad_kernel[(n_rows,)](
        logits,
        logits.stride(0),
        temps,
        scores,
        grads,
        n_rows,
        n_cols,
        n_rows * n_cols,
        N_TEMPS=n_temps,
        BLOCK=block,
        NUM_BLOCKS=num_blocks,
        num_warps=max(1, min(16, block // 256)),
    )
    return scores, grads


def odin_perturb(x, grad, epsilons, std=None):
    """x - eps * sign(grad) [/ std[c]] for every eps at once.

    x, grad: tensors of the same shape (grad's dtype may differ; it is only
    compared with 0). epsilons: sequence or 1-D tensor of nE values.
    std: optional sequence or tensor of C per-channel values for x of shape
    (B, C, ...); the step becomes eps * sign / std[c]. No clamping.
    Returns a tensor of shape (nE, *x.shape) in x's dtype (computed in fp32).
    """
    if not isinstance(x, torch.Tensor) or not isinstance(grad, torch.Tensor):
        raise TypeError("x and grad must be torch tensors")
    if x.shape != grad.shape:
        raise ValueError(f"x and grad must have the same shape, got {tuple(x.shape)} and {tuple(grad.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating point tensor, got {x.dtype}")
    if grad.device != x.device:
        raise ValueError(f"grad is on {grad.device} but x is on {x.device}")
    x = x.detach().contiguous()
    grad = grad.detach().contiguous()
    eps = _as_1d_float(epsilons, "epsilons", x.device)
    n_eps = eps.numel()
    if std is not None:
        if x.dim() < 2:
            raise ValueError(f"std needs x of shape (B, C, ...), got {tuple(x.shape)}")
        std_t = _as_1d_float(std, "std", x.device)
        n_channels = x.shape[1]
        if std_t.numel() != n_channels:
            raise ValueError(f"std has {std_t.numel()} values but x has {n_channels} channels (dim 1)")
        if not bool((std_t > 0).all()):
            raise ValueError(f"std values must be > 0, got {std_t.tolist()}")
        inner = x[0, 0].numel() if x.numel() else 1
    else:
        std_t, n_channels, inner = eps, 1, 1  # std pointer unused when HAS_STD is False
    out = torch.empty((n_eps,) + tuple(x.shape), dtype=x.dtype, device=x.device)
    n = x.numel()
    if n == 0:
        return out
    grid = (triton.cdiv(n, PERTURB_BLOCK),)
    _odin_perturb_kernel[grid](
        x,
        grad,
        eps,
        std_t,
        out,
        n,
        max(inner, 1),
        n_channels,
        N_EPS=n_eps,
        BLOCK=PERTURB_BLOCK,
        HAS_STD=std is not None,
        num_warps=4,
    )
    return out
