"""Fused forward and backward of the Gated CNN block's mixing: `fc2(act(g) * cat(i, dwconv(c)))`.

Computes exactly the function of the plain module code with the same parameters, but without the
memory copies autograd would make around it: `fc1` is evaluated as two matrix products, one for
`(g, i)` and one for `c`, so that `c` is a dense channels-last image the depthwise convolution reads
in place; `act(g) * cat(i, conv(c))` is written straight into one buffer (no `cat`), and the backward
writes the gradients of `g` and `i` into one buffer (no `cat` for the split's backward) and the
weight gradients into full-size tensors by row blocks.

Used by `GatedCNNBlock` when its token mixer is the (non-causal) depthwise convolution and its
activation is GELU or SiLU; any other block runs the plain module code.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers.activations import GELU as TimmGELU
from torch import nn

__all__ = ['fused_gated_conv', 'supports_fused_activation']

# (forward, backward writing d act(x) / dx * grad into `out`)
_ACTIVATIONS = {
    'gelu': (F.gelu, lambda grad, x, out: torch.ops.aten.gelu_backward.grad_input(grad, x, grad_input=out)),
    'silu': (F.silu, lambda grad, x, out: torch.ops.aten.silu_backward.grad_input(grad, x, grad_input=out)),
}


def supports_fused_activation(act: nn.Module) -> Optional[str]:
    """The fused name of `act` ('gelu' or 'silu'), or None when the fused path cannot compute it."""
    if (type(act) is nn.GELU and act.approximate == 'none') or type(act) is TimmGELU:
        return 'gelu'
    if type(act) is nn.SiLU:
        return 'silu'
    return None


class _FusedGatedConv(torch.autograd.Function):

    @staticmethod
    def forward(
            ctx,
            x: torch.Tensor,
            fc1_weight: torch.Tensor,
            fc1_bias: torch.Tensor,
            conv_weight: torch.Tensor,
            conv_bias: Optional[torch.Tensor],
            fc2_weight: torch.Tensor,
            fc2_bias: torch.Tensor,
            gate_chs: int,
            conv_chs: int,
            padding: int,
            activation: str,
    ) -> torch.Tensor:
        batch, height, width, dim = x.shape
        tokens = x.reshape(-1, dim)
        gi_chs = fc1_weight.shape[0] - conv_chs
        identity_chs = gi_chs - gate_chs
        gi = torch.addmm(fc1_bias[:gi_chs], tokens, fc1_weight[:gi_chs].t())
        c = torch.addmm(fc1_bias[gi_chs:], tokens, fc1_weight[gi_chs:].t())
        c_image = c.view(batch, height, width, conv_chs).permute(0, 3, 1, 2)
        mixed = F.conv2d(c_image, conv_weight, conv_bias, padding=padding, groups=conv_chs)
        mixed = mixed.permute(0, 2, 3, 1).reshape(-1, conv_chs)
        gate = _ACTIVATIONS[activation][0](gi[:, :gate_chs])
        hidden = torch.empty_like(gate)
        torch.mul(gate[:, :identity_chs], gi[:, gate_chs:], out=hidden[:, :identity_chs])
        torch.mul(gate[:, identity_chs:], mixed, out=hidden[:, identity_chs:])
        out = torch.addmm(fc2_bias, hidden, fc2_weight.t())
        ctx.save_for_backward(tokens, fc1_weight, conv_weight, fc2_weight, gi, c_image, mixed, gate, hidden)
        ctx.shape = (batch, height, width)
        ctx.sizes = (gate_chs, conv_chs, padding, activation)
        ctx.has_conv_bias = conv_bias is not None
        return out.view(batch, height, width, -1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        tokens, fc1_weight, conv_weight, fc2_weight, gi, c_image, mixed, gate, hidden = ctx.saved_tensors
        gate_chs, conv_chs, padding, activation = ctx.sizes
        batch, height, width = ctx.shape
        gi_chs = gi.shape[1]
        identity_chs = gi_chs - gate_chs
        grad_out = grad_out.reshape(-1, grad_out.shape[-1])

        grad_fc2_weight = grad_out.t().mm(hidden)
        grad_fc2_bias = grad_out.sum(0)
        grad_hidden = grad_out.mm(fc2_weight)

        grad_gate = torch.empty_like(gate)
        torch.mul(grad_hidden[:, :identity_chs], gi[:, gate_chs:], out=grad_gate[:, :identity_chs])
        torch.mul(grad_hidden[:, identity_chs:], mixed, out=grad_gate[:, identity_chs:])
        grad_gi = torch.empty_like(gi)
        _ACTIVATIONS[activation][1](grad_gate, gi[:, :gate_chs], grad_gi[:, :gate_chs])
        torch.mul(grad_hidden[:, :identity_chs], gate[:, :identity_chs], out=grad_gi[:, gate_chs:])
        grad_mixed = grad_hidden[:, identity_chs:] * gate[:, identity_chs:]

        grad_mixed_image = grad_mixed.view(batch, height, width, conv_chs).permute(0, 3, 1, 2)
        grad_c_image, grad_conv_weight, grad_conv_bias = torch.ops.aten.convolution_backward(
            grad_mixed_image, c_image, conv_weight, [conv_chs] if ctx.has_conv_bias else None,
            [1, 1], [padding, padding], [1, 1], False, [0, 0], conv_chs,
            [True, True, ctx.has_conv_bias],
        )
        grad_c = grad_c_image.permute(0, 2, 3, 1).reshape(-1, conv_chs)

        grad_tokens = grad_gi.mm(fc1_weight[:gi_chs]).addmm_(grad_c, fc1_weight[gi_chs:])
        grad_fc1_weight = torch.empty_like(fc1_weight)
        torch.mm(grad_gi.t(), tokens, out=grad_fc1_weight[:gi_chs])
        torch.mm(grad_c.t(), tokens, out=grad_fc1_weight[gi_chs:])
        grad_fc1_bias = torch.cat((grad_gi.sum(0), grad_c.sum(0)))
        return (
            grad_tokens.view(batch, height, width, -1), grad_fc1_weight, grad_fc1_bias,
            grad_conv_weight, grad_conv_bias, grad_fc2_weight, grad_fc2_bias,
            None, None, None, None,
        )


def fused_gated_conv(
        x: torch.Tensor,
        fc1: nn.Linear,
        conv: nn.Conv2d,
        fc2: nn.Linear,
        gate_chs: int,
        activation: str,
) -> torch.Tensor:
    """`fc2(act(g) * cat(i, conv(c)))` with `g, i, c = split(fc1(x))`, for channels-last `x` [B, H, W, C].

    `gate_chs` is the width of `g`; `c` is the last `conv.out_channels` channels of `fc1`'s output.
    Under autocast the inputs and parameters are cast to the autocast dtype first, as `nn.Linear`
    and `nn.Conv2d` would cast them.
    """
    weights = (fc1.weight, fc1.bias, conv.weight, conv.bias, fc2.weight, fc2.bias)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x = x.to(dtype)
        weights = tuple(None if w is None else w.to(dtype) for w in weights)
        with torch.autocast(device_type, enabled=False):
            return _FusedGatedConv.apply(x, *weights, gate_chs, conv.out_channels, conv.padding[0], activation)
    return _FusedGatedConv.apply(x, *weights, gate_chs, conv.out_channels, conv.padding[0], activation)
