"""``stitch_compile::stitch_linear_ln``: the fused stitching layer as a PyTorch custom op.

Why an op and not a bare kernel call: torch.export, AOTInductor and FX see one opaque node with a
meta (fake) implementation, so a fused graph traces on any machine; CUDA tensors run the Triton
kernel, CPU tensors the reference ``F.linear`` + ``F.layer_norm`` with the same semantics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stitch_compile.errors import StitchError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_KERNEL_CB = 2048  # the widest stitching layer tested; the kernel walks Cb in column chunks
MAX_KERNEL_ELEMENTS = 2**31  # the kernel indexes with int32


def check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, ln_weight: torch.Tensor,
                 ln_bias: torch.Tensor) -> None:
    """One clear line for the first wrong dtype, shape or device (also runs on fake tensors)."""
    named = {"weight": weight, "bias": bias, "ln_weight": ln_weight, "ln_bias": ln_bias}
    if x.dtype not in FLOAT_DTYPES:
        raise StitchError(f"stitch_linear_ln: x is {x.dtype}; expected float32, float16 or bfloat16")
    for name, t in named.items():
        if t.dtype != x.dtype:
            raise StitchError(f"stitch_linear_ln: {name} is {t.dtype} but x is {x.dtype}; cast the model and input to one dtype")
        if t.device != x.device:
            raise StitchError(f"stitch_linear_ln: {name} is on {t.device} but x is on {x.device}; move both to one device")
    if weight.dim() != 2:
        raise StitchError(f"stitch_linear_ln: weight must be [Cb, Ca], got shape {list(weight.shape)}")
    cb, ca = weight.shape
    if x.dim() < 1 or x.shape[-1] != ca:
        raise StitchError(f"stitch_linear_ln: x has shape {list(x.shape)} but weight {list(weight.shape)} expects a last dimension of {ca}")
    for name in ("bias", "ln_weight", "ln_bias"):
        if tuple(named[name].shape) != (cb,):
            raise StitchError(f"stitch_linear_ln: {name} has shape {list(named[name].shape)}; expected [{cb}] (Cb)")


@torch.library.custom_op("stitch_compile::stitch_linear_ln", mutates_args=(), device_types="cpu")
def stitch_linear_ln(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, ln_weight: torch.Tensor,
                     ln_bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``out = x W^T + b`` and ``LayerNorm(out)``; this body is the CPU reference."""
    check_inputs(x, weight, bias, ln_weight, ln_bias)
    out = F.linear(x, weight, bias)
    return out, F.layer_norm(out, (weight.shape[0],), ln_weight, ln_bias, eps)


@stitch_linear_ln.register_kernel("cuda")
def _cuda(x, weight, bias, ln_weight, ln_bias, eps):
    check_inputs(x, weight, bias, ln_weight, ln_bias)
    cb, ca = weight.shape
    if cb > MAX_KERNEL_CB:
        raise StitchError(f"stitch_linear_ln: Cb = {cb} exceeds the fused kernel's limit of {MAX_KERNEL_CB}; run this config unfused, net(x, config)")
    x2 = x.reshape(-1, ca)
    if x2.shape[0] * max(cb, x2.stride(0)) >= MAX_KERNEL_ELEMENTS:
        raise StitchError(f"stitch_linear_ln: x {list(x.shape)} is too large for the kernel's int32 indexing; split the batch")
    from . import stitch_ln  # imported here so that CPU-only installs work without Triton

    out, normed = stitch_ln.stitch_linear_ln(x2, weight, bias, ln_weight, ln_bias, eps)
    shape = (*x.shape[:-1], cb)
    return out.view(shape), normed.view(shape)


@stitch_linear_ln.register_fake
def _fake(x, weight, bias, ln_weight, ln_bias, eps):
    check_inputs(x, weight, bias, ln_weight, ln_bias)
    shape = (*x.shape[:-1], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape)
