"""``stitch_compile::stitch_linear_ln``: the fused stitching layer as a PyTorch custom op.

Why an op and not a bare kernel call: torch.export, AOTInductor and FX see one opaque node with a
meta (fake) implementation, so a fused graph traces on any machine; CUDA tensors run the Triton
kernel, CPU tensors the reference ``F.linear`` + ``F.layer_norm`` with the same semantics. Plain
eager calls skip the dispatcher (``stitch_linear_ln``), whose custom-op machinery costs more host
time than the kernel takes on a GPU at batch 1.
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


def check_int32_indexing(x2: torch.Tensor, cb: int) -> None:
    """The kernel indexes with int32: the outputs' ``M * Cb`` elements and x's last element, which a
    transposed x puts at ``Ca * M``, not ``M * stride(0)``, must all be within reach."""
    x_span = 1 + sum((n - 1) * s for n, s in zip(x2.shape, x2.stride()))
    if max(x2.shape[0] * cb, x_span) >= MAX_KERNEL_ELEMENTS:
        raise StitchError(f"stitch_linear_ln: x {list(x2.shape)} (strides {list(x2.stride())}) with Cb = {cb} is "
                          "too large for the kernel's int32 indexing; split the batch")


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, ln_weight: torch.Tensor,
               ln_bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``out = x W^T + b`` and ``LayerNorm(out)``: the op's CPU implementation."""
    check_inputs(x, weight, bias, ln_weight, ln_bias)
    out = F.linear(x, weight, bias)
    return out, F.layer_norm(out, (weight.shape[0],), ln_weight, ln_bias, eps)


def _cuda(x, weight, bias, ln_weight, ln_bias, eps):
    """The op's CUDA implementation: the Triton kernel on 2-D views."""
    check_inputs(x, weight, bias, ln_weight, ln_bias)
    cb, ca = weight.shape
    if cb > MAX_KERNEL_CB:
        raise StitchError(f"stitch_linear_ln: Cb = {cb} exceeds the fused kernel's limit of {MAX_KERNEL_CB}; run this config unfused, net(x, config)")
    x2 = x.reshape(-1, ca)
    check_int32_indexing(x2, cb)
    from . import stitch_ln  # imported here so that CPU-only installs work without Triton

    out, normed = stitch_ln.stitch_linear_ln(x2, weight, bias, ln_weight, ln_bias, eps)
    shape = (*x.shape[:-1], cb)
    return out.view(shape), normed.view(shape)


def _fake(x, weight, bias, ln_weight, ln_bias, eps):
    check_inputs(x, weight, bias, ln_weight, ln_bias)
    shape = (*x.shape[:-1], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape)


op = torch.library.custom_op("stitch_compile::stitch_linear_ln", _reference, mutates_args=(), device_types="cpu")
op.register_kernel("cuda", _cuda)
op.register_fake(_fake)


def _plain_call(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """True when nothing traces, transforms or differentiates this call: no torch.compile or
    jit tracing, a plain tensor (not a fake, functional or other subclass), no dispatch mode (a
    fake mode, a FLOP counter), and no input that needs a gradient. Then the implementation can
    run without the dispatcher, whose custom-op machinery costs more host time per call than the
    kernel's GPU time at batch 1 (benchmarks/op_overhead.py)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or type(x) is not torch.Tensor:
        return False
    if torch._C._len_torch_dispatch_stack():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params)))


def stitch_linear_ln(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, ln_weight: torch.Tensor,
                     ln_bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, LayerNorm(out))`` of ``out = x W^T + b``: the op ``stitch_compile::stitch_linear_ln``.

    A plain eager call runs the op's implementation directly (same code, same results); anything
    that traces or differentiates goes through the registered op, so torch.export and
    torch.compile see one node and backward raises (no autograd formula is registered)."""
    if _plain_call(x, weight, bias, ln_weight, ln_bias):
        return (_cuda if x.is_cuda else _reference)(x, weight, bias, ln_weight, ln_bias, eps)
    return op(x, weight, bias, ln_weight, ln_bias, eps)
