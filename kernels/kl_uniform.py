"""Fused KL(U || softmax(z)) and the confidence loss, with gradients.

Math
----
For a row of logits z in R^K let p = softmax(z) and U the uniform
distribution over the K classes. Then

    KL(U || p) = sum_k (1/K) * (log(1/K) - log p_k)
               = -log K - (1/K) * sum_k (z_k - logsumexp(z))
               = logsumexp(z) - mean(z) - log K.

Gradient: d logsumexp(z) / d z_k = p_k and d mean(z) / d z_k = 1/K, so

    d KL / d z_k = p_k - 1/K.

Cross-entropy of an in-distribution row with label y is
CE = logsumexp(z) - z_y with gradient p - onehot(y).

The confidence loss of Lee et al. (ICLR 2018) for a batch that mixes
in-distribution rows (targets[i] >= 0) and out-of-distribution rows
(targets[i] == -1) is

    L = (1/n_in) * sum_{in} CE_i + beta * (1/n_out) * sum_{ood} KL_i,

with each mean taken over its own row count (an empty group contributes 0),
so dL/dz_i = (p_i - onehot(y_i)) / n_in for in rows and
beta * (p_i - 1/K) / n_out for OOD rows.

Kernel
------
One program per row. The row is read in blocks of BLOCK columns,
BLOCK = next_power_of_2(K) capped at MAX_BLOCK. If the row fits in one block
it is loaded once and everything (max, logsumexp, mean, gradient) is computed
from registers. Otherwise a first pass keeps an online max and a running
sum of exp(z - max) (rescaled whenever the max grows) plus the plain sum of z,
and a second pass writes p - 1/K = exp(z - lse) - 1/K. Masked lanes load -inf
so that they vanish in max and exp; they are zeroed explicitly for the sum.
To avoid cancellation for large logits the sum is taken of shifted values,
z - max(z) in one block or z - z_0 across blocks, and
KL = (max - shift) + log(sum exp(z - max)) - mean(z - shift) - log K
(CE = (max - z_y) + log(sum exp(z - max))), so a constant row gives 0 exactly
even at |z| = 1e4.
All arithmetic is fp32 whatever the input dtype; the gradient is stored in the
input dtype.

Both kernels share one row routine (``_row_loss``): a KL row is a row with
no label (y = -1), and every row's loss and gradient carry a scale (1, or
the 1/B of a batch mean, or beta/n_out).

The gradient is computed in the forward launch and saved. For the scalar
losses (``kl_uniform_mean``, ``confidence_loss``) it is saved already
divided by the row count, so backward returns it as it is when the upstream
gradient is exactly 1.0 (the usual ``loss.backward()``) and otherwise scales
it once. Telling 1.0 apart reads one number from the device (a host sync);
the alternative, an unconditional multiply, re-reads and re-writes the whole
(B, K) gradient. ``kl_uniform_rows`` (per-row output) always scales by the
(B,) upstream gradient in one fused pass.
"""

import functools
import math

import torch
import triton
import triton.language as tl

# Measured on an H200 (fp32 and bf16, K = 32000): keeping a 32000-wide row in
# one block (read once, from registers) beat looping over 8192-wide blocks for
# the forward+gradient launch, and matched it for forward only.
MAX_BLOCK = 32768


def _launch_config(n_cols):
    block = min(triton.next_power_of_2(n_cols), MAX_BLOCK)
    num_blocks = triton.cdiv(n_cols, block)
    if block >= 32768:
        num_warps = 32
    elif block >= 16384:
        num_warps = 16
    else:
        num_warps = max(1, min(8, block // 256))
    return block, num_blocks, num_warps


def _rows_2d(logits, name="logits"):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"{name} must have shape (B, K), got {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.shape[1] < 1:
        raise ValueError(f"{name} needs at least one class, got K={logits.shape[1]}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    return logits


def _capturing(t):
    """True while t's CUDA stream is captured into a CUDA graph, where no device value may be read on the host."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _is_one(grad_output):
    """True for a scalar upstream gradient equal to 1.0 (reads one number). Inside a CUDA graph it cannot
    read, and says False: backward then always scales, which is right for any upstream gradient."""
    return grad_output.numel() == 1 and not _capturing(grad_output) and float(grad_output) == 1.0


@triton.jit
def _row_loss(
    x_row,
    g_row,
    n_cols,
    y,
    x_y,
    scale,
    inv_n,
    log_n,
    BLOCK: tl.constexpr,
    NUM_BLOCKS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    """One row of logits: scale * CE (when y >= 0; x_y = z_y) or scale * KL(U || softmax(z)) (when y < 0).
    With WRITE_GRAD it also stores scale * (softmax(z) - target) at g_row, target = onehot(y) or 1/K."""
    is_in = y >= 0
    if NUM_BLOCKS == 1:
        # the whole row in registers: read once
        offs = tl.arange(0, BLOCK)
        mask = offs < n_cols
        x = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=0)
        e = tl.exp(x - m)
        d = tl.sum(e, axis=0)
        s = tl.sum(tl.where(mask, x - m, 0.0), axis=0)
        log_d = tl.log(d)
        loss = tl.where(is_in, (m - x_y) + log_d, log_d - s * inv_n - log_n)
        if WRITE_GRAD:
            target = tl.where(is_in, tl.where(offs == y, 1.0, 0.0), inv_n)
            g = (e / d - target) * scale
            tl.store(g_row + offs, g.to(g_row.dtype.element_ty), mask=mask)
    else:
        # online pass: running max m, sum of exp(z - m) rescaled as m grows, and sum of (z - z_0)
        c = tl.load(x_row).to(tl.float32)
        m = float("-inf")
        d = 0.0
        s = 0.0
        for b in range(NUM_BLOCKS):
            offs = b * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n_cols
            x = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            s += tl.sum(tl.where(mask, x - c, 0.0), axis=0)
            m = m_new
        log_d = tl.log(d)
        loss = tl.where(is_in, (m - x_y) + log_d, (m - c) + log_d - s * inv_n - log_n)
        if WRITE_GRAD:
            lse = m + log_d
            for b in range(NUM_BLOCKS):
                offs = b * BLOCK + tl.arange(0, BLOCK)
                mask = offs < n_cols
                x = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
                target = tl.where(is_in, tl.where(offs == y, 1.0, 0.0), inv_n)
                g = (tl.exp(x - lse) - target) * scale
                tl.store(g_row + offs, g.to(g_row.dtype.element_ty), mask=mask)
    return loss * scale


@triton.jit
def _kl_uniform_kernel(
    X_ptr,
    X_stride,
    G_ptr,
    G_stride,
    L_ptr,
    n_cols,
    inv_n,
    log_n,
    scale,
    BLOCK: tl.constexpr,
    NUM_BLOCKS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    """Every row is an OOD row: L[i] = scale * KL_i, G[i] = scale * (softmax(z_i) - 1/K)."""
    row = tl.program_id(0).to(tl.int64)
    loss = _row_loss(X_ptr + row * X_stride, G_ptr + row * G_stride, n_cols, -1, 0.0, scale, inv_n, log_n,
                     BLOCK, NUM_BLOCKS, WRITE_GRAD)
    tl.store(L_ptr + row, loss)


@triton.jit
def _confidence_loss_kernel(
    X_ptr,
    X_stride,
    T_ptr,
    N_ptr,
    G_ptr,
    G_stride,
    L_ptr,
    n_cols,
    inv_n,
    log_n,
    beta,
    BLOCK: tl.constexpr,
    NUM_BLOCKS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    """Row i is in-distribution (T[i] >= 0: CE / n_in) or OOD (T[i] == -1: beta * KL / n_out)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X_ptr + row * X_stride
    y = tl.load(T_ptr + row).to(tl.int32)
    # Per-group row counts live on the device (no host sync); empty groups
    # have no rows, so clamping their count to 1 never changes the result.
    n_in = tl.maximum(tl.load(N_ptr).to(tl.float32), 1.0)
    n_out = tl.maximum(tl.load(N_ptr + 1).to(tl.float32), 1.0)
    scale = tl.where(y >= 0, 1.0 / n_in, beta / n_out)
    x_y = tl.load(x_row + tl.maximum(y, 0)).to(tl.float32)
    loss = _row_loss(x_row, G_ptr + row * G_stride, n_cols, y, x_y, scale, inv_n, log_n,
                     BLOCK, NUM_BLOCKS, WRITE_GRAD)
    tl.store(L_ptr + row, loss)


@triton.jit
def _scale_rows_kernel(G_ptr, S_ptr, O_ptr, n_cols, BLOCK: tl.constexpr, NUM_BLOCKS: tl.constexpr):
    """O[i, :] = S[i] * G[i, :] for contiguous (B, K) G and O, fp32 math."""
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(S_ptr + row).to(tl.float32)
    for b in range(NUM_BLOCKS):
        offs = b * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_cols
        g = tl.load(G_ptr + row * n_cols + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(O_ptr + row * n_cols + offs, (g * scale).to(O_ptr.dtype.element_ty), mask=mask)


def scale_rows(grad, row_scale):
    """grad * row_scale[:, None] in grad's dtype, computed in fp32 in one pass."""
    n_rows, n_cols = grad.shape
    out = torch.empty_like(grad)
    if n_rows == 0:
        return out
    row_scale = row_scale.contiguous()
    block, num_blocks, num_warps = _launch_config(n_cols)
    _scale_rows_kernel[(n_rows,)](grad, row_scale, out, n_cols, BLOCK=block, NUM_BLOCKS=num_blocks, num_warps=num_warps)
    return out


def kl_uniform_forward(logits, write_grad=True, scale=1.0):
    """Launch the KL kernel. Returns (scale * loss (B,) fp32, scale * grad (B, K) or None)."""
    logits = _rows_2d(logits)
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if write_grad else None
    if n_rows == 0:
        return loss, grad
    block, num_blocks, num_warps = _launch_config(n_cols)
    g_arg = grad if write_grad else logits  # never written when WRITE_GRAD is False
    _kl_uniform_kernel[(n_rows,)](
        logits,
        logits.stride(0),
        g_arg,
        g_arg.stride(0),
        loss,
        n_cols,
        1.0 / n_cols,
        math.log(n_cols),
        float(scale),
        BLOCK=block,
        NUM_BLOCKS=num_blocks,
        WRITE_GRAD=write_grad,
        num_warps=num_warps,
    )
    return loss, grad


def confidence_loss_forward(logits, targets, beta, write_grad=True):
    """Launch the confidence-loss kernel. Returns (loss () fp32, grad or None)."""
    logits = _rows_2d(logits)
    n_rows, n_cols = logits.shape
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dim() != 1 or targets.shape[0] != n_rows:
        raise ValueError(
            f"targets must have shape (B,) = ({n_rows},) to match logits {tuple(logits.shape)}, "
            f"got {tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if targets.device != logits.device:
        raise ValueError(f"targets are on {targets.device} but logits are on {logits.device}")
    if isinstance(beta, torch.Tensor):
        beta = float(beta)
    beta = float(beta)
    if not (beta >= 0.0) or math.isinf(beta):
        raise ValueError(f"beta must be a finite number >= 0, got {beta}")
    if n_rows > 0 and not _capturing(targets) and bool(((targets < -1) | (targets >= n_cols)).any()):
        lo, hi = int(targets.min()), int(targets.max())
        raise ValueError(
            f"targets must be class indices in [0, {n_cols}) or -1 for OOD rows, "
            f"got values in [{lo}, {hi}]"
        )

    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if write_grad else None
    if n_rows == 0:
        return torch.zeros((), dtype=torch.float32, device=logits.device), grad
    targets = targets.contiguous()
    is_in = targets >= 0
    counts = torch.stack([is_in.sum(), (~is_in).sum()]).to(torch.float32)
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    block, num_blocks, num_warps = _launch_config(n_cols)
    g_arg = grad if write_grad else logits
    _confidence_loss_kernel[(n_rows,)](
        logits,
        logits.stride(0),
        targets,
        counts,
        g_arg,
        g_arg.stride(0),
        row_loss,
        n_cols,
        1.0 / n_cols,
        math.log(n_cols),
        beta,
        BLOCK=block,
        NUM_BLOCKS=num_blocks,
        WRITE_GRAD=write_grad,
        num_warps=num_warps,
    )
    return row_loss.sum(), grad


class KLUniformFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits):
        loss, grad = kl_uniform_forward(logits, write_grad=logits.requires_grad)
        if grad is not None:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        # One fused pass (fp32 math, output in the input dtype) instead of
        # torch's promote-to-fp32 multiply followed by a cast.
        return scale_rows(grad, grad_output.to(torch.float32))


class ScalarLossFunction(torch.autograd.Function):
    """A scalar loss whose forward launch, ``launch(logits, write_grad=True) -> (loss, grad)``, also writes
    d loss / d logits (already divided by the row counts). The usual ``loss.backward()`` (upstream gradient
    exactly 1.0) hands that tensor to autograd as it is: one read of the logits and one write of the gradient
    in all, against two more passes when backward has to scale a saved (B, K)."""

    @staticmethod
    def forward(ctx, logits, launch):
        loss, grad = launch(logits, write_grad=True)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if not _is_one(grad_output):
            grad = (grad_output * grad).to(grad.dtype)
        return grad, None


def kl_uniform_rows(logits):
    """Per-row KL(U || softmax(logits)) as a (B,) float32 tensor, differentiable.

    logits: (B, K) float32/float16/bfloat16 on a CUDA device (or any device
    under TRITON_INTERPRET=1). Rows may be strided (row stride != K).
    """
    if not (torch.is_grad_enabled() and isinstance(logits, torch.Tensor) and logits.requires_grad):
        return kl_uniform_forward(logits, write_grad=False)[0]  # forward-only launch
    return KLUniformFunction.apply(logits)


def kl_uniform_mean(logits, weight=1.0):
    """weight * mean over rows of KL(U || softmax(logits)), a scalar float32 tensor, differentiable.

    The batch mean the confidence loss and the generator's loss use (Eq. 1 and 3), in one launch whose
    gradient needs no further pass when it is the whole loss (see ScalarLossFunction). An empty batch
    gives 0.
    """
    if isinstance(weight, torch.Tensor):
        weight = float(weight)
    weight = float(weight)
    if not (weight >= 0.0) or math.isinf(weight):
        raise ValueError(f"weight must be a finite number >= 0, got {weight}")
    def launch(z, write_grad):
        loss, grad = kl_uniform_forward(z, write_grad=write_grad, scale=weight / max(_rows_2d(z).shape[0], 1))
        return loss.sum(), grad

    if not (torch.is_grad_enabled() and isinstance(logits, torch.Tensor) and logits.requires_grad):
        return launch(logits, write_grad=False)[0]
    return ScalarLossFunction.apply(logits, launch)


def confidence_loss(logits, targets, beta):
    """Confidence loss of Lee et al. as a scalar float32 tensor, differentiable.

    mean CE over rows with targets >= 0 plus beta * mean KL(U || softmax) over
    rows with targets == -1; an empty group contributes 0.
    """
    if not (torch.is_grad_enabled() and isinstance(logits, torch.Tensor) and logits.requires_grad):
        return confidence_loss_forward(logits, targets, beta, write_grad=False)[0]
    return ScalarLossFunction.apply(logits, functools.partial(confidence_loss_forward, targets=targets, beta=beta))
