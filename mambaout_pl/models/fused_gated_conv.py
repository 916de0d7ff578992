"""Fused forward and backward of the Gated CNN block's mixing: `fc2(act(g) * cat(i, dwconv(c)))`.

Computes exactly the function of the plain module code with the same parameters, but without the
copies and strided passes autograd makes around it. `fc1` is evaluated by row blocks of its weight
(the gate of `i`, the gate of `c`, `i`, `c`), so every activation is a dense matrix: `c` is a
channels-last image the depthwise convolution reads in place, and `act(g) * cat(i, conv(c))` is
never concatenated; `fc2` takes the two gated halves through the matching column blocks of its
weight. The backward mirrors this and writes the weight gradients by row blocks into full-size
tensors, so neither the forward `cat` nor the backward of the split copies activations. The
depthwise convolution's backward is `depthwise_conv2d_backward` (a faster weight gradient on CPU).

Used by `GatedCNNBlock` when its token mixer is the (non-causal) depthwise convolution and its
activation is GELU or SiLU; any other block runs the plain module code.
"""

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function
from timm.layers.activations import GELU as TimmGELU
from torch import nn

from .depthwise_conv_backward import depthwise_conv2d_backward

__all__ = ["fused_gated_conv", "fused_gated_conv_weights", "supports_fused_activation"]

# (forward, backward computing d act(x) / dx * grad in place in `grad`)
_ACTIVATIONS = {
    "gelu": (F.gelu, lambda grad, x: torch.ops.aten.gelu_backward.grad_input(grad, x, grad_input=grad)),
    "silu": (F.silu, lambda grad, x: torch.ops.aten.silu_backward.grad_input(grad, x, grad_input=grad)),
}


def supports_fused_activation(act: nn.Module) -> str | None:
    """The fused name of `act` ('gelu' or 'silu'), or None when the fused path cannot compute it."""
    if (type(act) is nn.GELU and act.approximate == "none") or type(act) is TimmGELU:
        return "gelu"
    if type(act) is nn.SiLU:
        return "silu"
    return None


def _fc1_row_blocks(gate_chs: int, conv_chs: int) -> tuple[tuple[int, int], ...]:
    """Rows of `fc1.weight` producing the gate of `i`, the gate of `c`, `i` and `c`."""
    identity_chs = gate_chs - conv_chs
    bounds = (0, identity_chs, gate_chs, gate_chs + identity_chs, 2 * gate_chs)
    return tuple(zip(bounds[:-1], bounds[1:], strict=True))


def _in_layout_of(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`grad` with the strides of `param`, as DDP's gradient buckets expect them.

    A view when the two layouts place the elements alike and differ only in the stride of a size-1
    dimension (the depthwise weight's input-channel dimension), else one copy.
    """
    if grad.stride() == param.stride():
        return grad
    if all(size == 1 or a == b for size, a, b in zip(grad.shape, grad.stride(), param.stride(), strict=True)):
        return grad.as_strided(grad.shape, param.stride(), grad.storage_offset())
    return torch.empty_like(param, dtype=grad.dtype).copy_(grad)


class _FusedGatedConv(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        fc1_weight: torch.Tensor,
        fc1_bias: torch.Tensor,
        conv_weight: torch.Tensor,
        conv_bias: torch.Tensor | None,
        fc2_weight: torch.Tensor,
        fc2_bias: torch.Tensor,
        gate_chs: int,
        conv_chs: int,
        padding: int,
        activation: str,
    ) -> torch.Tensor:
        batch, height, width, dim = x.shape
        tokens = x.reshape(-1, dim)
        identity_chs = gate_chs - conv_chs
        gate_i, gate_c, i, c = (
            torch.addmm(fc1_bias[start:end], tokens, fc1_weight[start:end].t())
            for start, end in _fc1_row_blocks(gate_chs, conv_chs)
        )
        c_image = c.view(batch, height, width, conv_chs).permute(0, 3, 1, 2)
        mixed = F.conv2d(c_image, conv_weight, conv_bias, padding=padding, groups=conv_chs)
        mixed = mixed.permute(0, 2, 3, 1).reshape(-1, conv_chs)
        act = _ACTIVATIONS[activation][0]
        act_i, act_c = act(gate_i), act(gate_c)
        gated_i, gated_c = act_i * i, act_c * mixed
        out = torch.addmm(fc2_bias, gated_c, fc2_weight[:, identity_chs:].t())
        out = torch.addmm(out, gated_i, fc2_weight[:, :identity_chs].t())  # not addmm_: flop counters skip it
        ctx.save_for_backward(
            tokens,
            fc1_weight,
            conv_weight,
            fc2_weight,
            gate_i,
            gate_c,
            act_i,
            act_c,
            i,
            c_image,
            mixed,
            gated_i,
            gated_c,
        )
        ctx.sizes = (batch, height, width, gate_chs, conv_chs, padding, activation, conv_bias is not None)
        return out.view(batch, height, width, -1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (
            tokens,
            fc1_weight,
            conv_weight,
            fc2_weight,
            gate_i,
            gate_c,
            act_i,
            act_c,
            i,
            c_image,
            mixed,
            gated_i,
            gated_c,
        ) = ctx.saved_tensors
        batch, height, width, gate_chs, conv_chs, padding, activation, has_conv_bias = ctx.sizes
        identity_chs = gate_chs - conv_chs
        grad_out = grad_out.reshape(-1, grad_out.shape[-1])

        grad_fc2_weight_t = grad_out.new_empty(fc2_weight.shape[1], fc2_weight.shape[0])
        torch.mm(gated_i.t(), grad_out, out=grad_fc2_weight_t[:identity_chs])
        torch.mm(gated_c.t(), grad_out, out=grad_fc2_weight_t[identity_chs:])
        grad_fc2_bias = grad_out.sum(0)
        grad_gated_i = grad_out.mm(fc2_weight[:, :identity_chs])
        grad_gated_c = grad_out.mm(fc2_weight[:, identity_chs:])

        act_backward = _ACTIVATIONS[activation][1]
        grad_i = grad_gated_i * act_i
        grad_gate_i = act_backward(grad_gated_i.mul_(i), gate_i)
        grad_mixed = grad_gated_c * act_c
        grad_gate_c = act_backward(grad_gated_c.mul_(mixed), gate_c)

        grad_mixed_image = grad_mixed.view(batch, height, width, conv_chs).permute(0, 3, 1, 2)
        grad_c_image, grad_conv_weight, grad_conv_bias = depthwise_conv2d_backward(
            grad_mixed_image, c_image, conv_weight, padding, (True, True, has_conv_bias)
        )
        grad_conv_weight = _in_layout_of(grad_conv_weight, conv_weight)
        grad_c = grad_c_image.permute(0, 2, 3, 1).reshape(-1, conv_chs)

        grads = (grad_gate_i, grad_gate_c, grad_i, grad_c)
        grad_tokens = None
        grad_fc1_weight = torch.empty_like(fc1_weight)
        for grad, (start, end) in zip(grads, _fc1_row_blocks(gate_chs, conv_chs), strict=True):
            weight = fc1_weight[start:end]
            grad_tokens = grad.mm(weight) if grad_tokens is None else grad_tokens.addmm_(grad, weight)
            torch.mm(grad.t(), tokens, out=grad_fc1_weight[start:end])
        grad_fc1_bias = torch.cat([grad.sum(0) for grad in grads])
        return (
            grad_tokens.view(batch, height, width, -1),
            grad_fc1_weight,
            grad_fc1_bias,
            grad_conv_weight,
            grad_conv_bias,
            grad_fc2_weight_t.t(),
            grad_fc2_bias,
            None,
            None,
            None,
            None,
        )


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device without autocast, such as 'meta'
        return False


@register_notrace_function  # a leaf of torch.fx graphs: traced models call the same function
def fused_gated_conv_weights(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
    gate_chs: int,
    padding: int,
    activation: str,
) -> torch.Tensor:
    """`fused_gated_conv` on the layers' tensors: fc1, depthwise conv and fc2 weights and biases."""
    weights = (fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias)
    conv_chs = conv_weight.shape[0]
    device_type = x.device.type
    if _autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x = x.to(dtype)
        weights = tuple(None if w is None else w.to(dtype) for w in weights)
        with torch.autocast(device_type, enabled=False):
            return _FusedGatedConv.apply(x, *weights, gate_chs, conv_chs, padding, activation)
    return _FusedGatedConv.apply(x, *weights, gate_chs, conv_chs, padding, activation)


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
    return fused_gated_conv_weights(
        x, fc1.weight, fc1.bias, conv.weight, conv.bias, fc2.weight, fc2.bias, gate_chs, conv.padding[0], activation
    )
