"""Train-stage helper — fused LoRA linear layers.

In: a PEFT model. Out: the same model whose plain LoRA ``Linear`` layers compute
``x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` in one autograd function: the dropout is a list of zeroed positions
(no mask tensor, no fp32 copy of x), the LoRA product is added inside the output's ``addmm``, and backward
gives x, A and B their gradients with three small matmuls and one masked add. PEFT's own forward does
about ten full-size casts, copies and multiplications per layer under autocast; on the 2-core CPU removing
them made a training step 6% faster (PERFORMANCE.md). Any layer this does not cover (merged or
disabled adapters, several active adapters, DoRA and other variants, LoRA bias, extra forward arguments)
runs PEFT's forward unchanged.
"""
from __future__ import annotations

import types

import torch

from tell.packing import dropped_positions


class _LoraLinear(torch.autograd.Function):
    """y = x Wᵀ + b + scale · ((x with `dropped` zeroed) Aᵀ) Bᵀ for a frozen W, b; gradients for x, A, B."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, dropped):
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        with torch.autocast(x.device.type, enabled=False):
            flat = x.reshape(-1, x.shape[-1]).to(dtype)
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            kept = flat
            if dropped is not None:
                kept = flat.clone(memory_format=torch.contiguous_format)  # row-major, as the positions are
                kept.view(-1)[dropped] = 0
            low = kept @ a.T
            # allocated in its final shape: a view returned from a custom Function could not be modified in place
            result = flat.new_empty(*x.shape[:-1], weight.shape[0])
            out = result.view(-1, weight.shape[0])
            if bias is None:
                torch.mm(flat, weight.to(dtype).T, out=out)
            else:
                torch.addmm(bias.to(dtype), flat, weight.to(dtype).T, out=out)
            out.addmm_(low, b.T, alpha=scale)
        ctx.save_for_backward(weight, a, b, kept, low, dropped)
        ctx.scale, ctx.dtypes = scale, (x.dtype, lora_a.dtype, lora_b.dtype)
        return result

    @staticmethod
    def backward(ctx, grad_out):
        weight, a, b, kept, low, dropped = ctx.saved_tensors
        x_dtype, a_dtype, b_dtype = ctx.dtypes
        grad = grad_out.reshape(-1, grad_out.shape[-1]).to(a.dtype)
        grad_low = (grad @ b).mul_(ctx.scale)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            through_lora = grad_low @ a
            if dropped is not None:
                through_lora.view(-1)[dropped] = 0
            grad_x = torch.addmm(through_lora, grad, weight.to(a.dtype))
            grad_x = grad_x.view(*grad_out.shape[:-1], grad_x.shape[-1]).to(x_dtype)
        if ctx.needs_input_grad[3]:
            grad_a = (grad_low.T @ kept).to(a_dtype)
        if ctx.needs_input_grad[4]:
            grad_b = (grad.T @ low).mul_(ctx.scale).to(b_dtype)
        return grad_x, None, None, grad_a, grad_b, None, None


def _fused_forward(self, x, *args, **kwargs):
    """Forward of a PEFT LoRA Linear through _LoraLinear when the layer is plain LoRA; else PEFT's own."""
    adapter = _plain_adapter(self)
    if adapter is None or args or kwargs or type(self.base_layer) is not torch.nn.Linear:
        return type(self).forward(self, x, *args, **kwargs)
    dropout = self.lora_dropout[adapter]
    p = getattr(dropout, "p", 0.0) if self.training and not isinstance(dropout, torch.nn.Identity) else 0.0
    if p >= 1.0:
        return type(self).forward(self, x, *args, **kwargs)
    scale = self.scaling[adapter] / (1.0 - p)
    base = self.base_layer
    return _LoraLinear.apply(x, base.weight, base.bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                             scale, dropped_positions(x.numel(), p, x.device))


def _plain_adapter(layer) -> str | None:
    """Return the one active adapter of a LoRA layer when it is plain LoRA (no variant, no bias, unmerged,
    frozen base layer: the fused backward gives the base weight and bias no gradient)."""
    if any(p.requires_grad for p in layer.base_layer.parameters()):
        return None
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    adapter = layer.active_adapters[0]
    if adapter not in layer.lora_A or adapter in getattr(layer, "lora_variant", {}):
        return None
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    if type(lora_a) is not torch.nn.Linear or type(lora_b) is not torch.nn.Linear or lora_b.bias is not None:
        return None
    return adapter


def fuse_lora_layers(model) -> int:
    """Route every PEFT LoRA Linear layer of `model` through the fused function; return how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    count = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count
