"""Triton kernels for confidence-calibrated classifiers and ODIN scoring.

``AVAILABLE`` tells whether Triton could be imported; only then are
``kl_uniform_rows``, ``kl_uniform_mean``, ``confidence_loss``, ``odin_logit_grads`` and
``odin_perturb`` exported. Importing this package never touches a GPU.
Use ``can_run(t)`` to decide whether the kernels can run on tensor ``t``:
CUDA tensors, or any tensor when ``TRITON_INTERPRET=1`` (Triton's CPU
interpreter, used by the tests).
"""

import os

import torch

try:
    import triton  # noqa: F401

    from .kl_uniform import confidence_loss, kl_uniform_mean, kl_uniform_rows
    from .odin import odin_logit_grads, odin_perturb

    AVAILABLE = True
except Exception:  # triton missing or unusable on this machine
    AVAILABLE = False

__all__ = ["AVAILABLE", "can_run"]
if AVAILABLE:
    __all__ += ["kl_uniform_rows", "kl_uniform_mean", "confidence_loss", "odin_logit_grads", "odin_perturb"]


def can_run(t: torch.Tensor) -> bool:
    """True if the Triton kernels can process tensor ``t`` here."""
    return AVAILABLE and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
