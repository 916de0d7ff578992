"""Mamba's token mixer: a depthwise conv, then a selective state-space scan (S6) over the tokens in one of `SCANS` orders."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import selective_scan_kernel
from ..selective_scan_kernel import selective_scan_macs
from .gated_conv import DepthwiseConvMixer

try:  # the CUDA kernel of the Mamba authors, used for GPU inputs when installed
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
except ImportError:
    selective_scan_fn = None

__all__ = ["SCANS", "SelectiveScanMixer", "chunked_selective_scan", "selective_scan", "selective_scan_macs"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Token orders of the SSM scans: row-major (raster) or column-major, forwards or reversed.
SCANS: dict[str, tuple[str, ...]] = {
    "raster": ("row",),  # Mamba: one causal pass
    "bidirectional": ("row", "row_reversed"),  # Vision Mamba
    "cross": ("row", "column", "row_reversed", "column_reversed"),  # VMamba's cross scan
}


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Selective state-space scan (S6): the arguments and results of `mamba_ssm`'s `selective_scan_fn`.

    `h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t` per channel from `h_{-1} = 0`, and
    `y_t = (C_t . h_t + D * u_t) * silu(z_t)`.

    Runs `mamba_ssm`'s CUDA kernel for CUDA inputs where it is installed, the compiled CPU kernel
    (`selective_scan_kernel`) for float32, bfloat16 and float16 inputs on the CPU where it builds
    (and its operator on the meta device, so `FlopCounterMode` counts the scan by its formula),
    else `chunked_selective_scan`. While a graph is traced or exported
    (torch.compile, torch.export, ONNX export, torch.jit.trace) it is always `chunked_selective_scan`,
    so the graph holds only ATen operators.

    Args:
        u: Inputs `[batch, channels, length]`.
        delta: Step sizes `[batch, channels, length]`.
        A: State matrix (diagonal) `[channels, state]`, negative for a decaying state.
        B: Input projections `[batch, groups, state, length]` (or `[batch, state, length]`); the
            channels are split into `groups` consecutive blocks that share them.
        C: Output projections, shaped like `B`.
        D: Skip weights `[channels]`.
        z: Gate `[batch, channels, length]`: the output is multiplied by `silu(z)`.
        delta_bias: Added to `delta` `[channels]`.
        delta_softplus: Pass `delta` (plus bias) through softplus.
        chunk_size: Tokens per chunk of `chunked_selective_scan` where it runs.
    Returns:
        `y`, `[batch, channels, length]`, in the dtype of `u` (computed in float32).
    """
    _check_scan_arguments(u, delta, A, B, C, D, z, delta_bias)
    if not _tracing():
        if u.is_cuda and selective_scan_fn is not None:
            args = (t if t is None else t.float() for t in (u, delta, A, B, C, D, z, delta_bias))
            return selective_scan_fn(*args, delta_softplus=delta_softplus).to(u.dtype)
        on_meta = u.device.type == "meta"  # shapes and FLOP counts only: the operator's fake kernel, built or not
        if u.dtype in _KERNEL_DTYPES and (
            on_meta or (u.device.type == "cpu" and selective_scan_kernel.kernel_available())
        ):
            if B.dim() == 3:
                B, C = B.unsqueeze(1), C.unsqueeze(1)
            return selective_scan_kernel.selective_scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return chunked_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size)


def chunked_selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """`selective_scan` in pure PyTorch on any device, with the same arguments.

    `chunk_size` tokens per chunk: the chunks run side by side, the state entering each chunk from
    a parallel scan over the chunks, then each chunk steps through its tokens. None: one chunk (a
    plain sequential scan, the fastest on CPU) for CPU inputs, 64 for GPU inputs, and `sqrt(length)`
    while a graph is traced or exported (the graph unrolls the steps: 2 sqrt(length) instead of length).
    """
    dtype = u.dtype
    batch, channels, length = u.shape
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    groups, state = B.shape[1], A.shape[1]
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    if chunk_size is None:  # a traced graph unrolls every step: sqrt(length) chunks of sqrt(length) steps
        chunk_size = 64 if u.is_cuda else math.ceil(math.sqrt(length)) if _tracing() else length

    grouped = (batch, groups, channels // groups, length, 1)
    log_decay = delta.view(grouped) * A.view(1, groups, channels // groups, 1, state)
    inputs = (delta * u).view(grouped) * B.transpose(-1, -2).unsqueeze(2)
    y = _chunked_scan(log_decay, inputs, C.transpose(-1, -2).unsqueeze(2), chunk_size)
    y = y.reshape(batch, channels, length)
    if D is not None:
        y = y + D.float()[:, None] * u
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


def _tracing() -> bool:
    """Whether a graph is being traced or exported (dynamo, torch.export, ONNX export, torch.jit.trace)."""
    return (
        torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
    )


def _check_scan_arguments(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
) -> None:
    if u.dim() != 3 or A.dim() != 2:
        raise ValueError(
            f"selective_scan: u {tuple(u.shape)} must be [batch, channels, length] and A {tuple(A.shape)} "
            "[channels, state]"
        )
    batch, channels, length = u.shape
    state = A.shape[1]
    wrong = [
        f"{name} {tuple(t.shape)}" for name, t in (("delta", delta), ("z", z)) if t is not None and t.shape != u.shape
    ]
    if wrong:
        raise ValueError(f"selective_scan: {' and '.join(wrong)} must have the shape of u, {tuple(u.shape)}")
    if A.shape[0] != channels:
        raise ValueError(f"selective_scan: A {tuple(A.shape)} must be [channels, state] with u's {channels} channels")
    grouped = B.dim() == 4
    if B.dim() not in (3, 4) or C.shape != B.shape or B.shape[0] != batch or B.shape[-2:] != (state, length):
        raise ValueError(
            f"selective_scan: B {tuple(B.shape)} and C {tuple(C.shape)} must both be [batch, groups, state, length] "
            f"or [batch, state, length] = [{batch}, {state}, {length}]"
        )
    if grouped and channels % B.shape[1] != 0:
        raise ValueError(f"selective_scan: {B.shape[1]} groups of B and C must divide the {channels} channels")
    for name, value in (("D", D), ("delta_bias", delta_bias)):
        if value is not None and value.shape != (channels,):
            raise ValueError(f"selective_scan: {name} {tuple(value.shape)} must be [channels] = [{channels}]")


def _chunked_scan(
    log_decay: torch.Tensor,
    inputs: torch.Tensor,
    readout: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """`y_t = readout_t . h_t`, `h_t = exp(log_decay_t) * h_{t-1} + inputs_t` along dim -2 (tokens), dim -1 the state.

    Decays are only ever exponentiated as sums of `log_decay <= 0`, never inverted, so every
    factor stays in [0, 1] whatever the step sizes.
    """
    length = log_decay.shape[-2]
    chunk = max(1, min(chunk_size, length))
    padding = -length % chunk
    if padding:  # padded tokens keep the state (decay 1, input 0) and are cut from the output
        log_decay, inputs, readout = (F.pad(t, (0, 0, 0, padding)) for t in (log_decay, inputs, readout))
    num_chunks = (length + padding) // chunk
    log_decay, inputs, readout = (t.unflatten(-2, (num_chunks, chunk)) for t in (log_decay, inputs, readout))

    state = torch.zeros_like(inputs[..., 0, :])  # [..., chunks, state]
    if num_chunks > 1:
        cumulative = log_decay.cumsum(-2)
        total = cumulative[..., -1:, :]
        chunk_ends = (torch.exp(total - cumulative) * inputs).sum(-2)  # each chunk from a zero state
        _, chunk_ends = _associative_scan(torch.exp(total.squeeze(-2)), chunk_ends, dim=-2)
        state = torch.cat([state[..., :1, :], chunk_ends[..., :-1, :]], dim=-2)

    outputs = []
    for decay_t, input_t, readout_t in zip(log_decay.exp().unbind(-2), inputs.unbind(-2), readout.unbind(-2)):
        state = decay_t * state + input_t
        outputs.append((state * readout_t).sum(-1))
    return torch.stack(outputs, -1).flatten(-2)[..., :length]


def _associative_scan(
    decay: torch.Tensor,
    inputs: torch.Tensor,
    dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan of the maps `h -> decay * h + inputs` along `dim`, in log2(size) doubling steps.

    Returns the cumulative decays and the states from a zero start.
    """
    size = decay.shape[dim]
    step = 1
    while step < size:
        head_inputs, tail_inputs = inputs.narrow(dim, 0, step), inputs.narrow(dim, step, size - step)
        head_decay, tail_decay = decay.narrow(dim, 0, step), decay.narrow(dim, step, size - step)
        inputs = torch.cat([head_inputs, tail_inputs + tail_decay * inputs.narrow(dim, 0, size - step)], dim)
        decay = torch.cat([head_decay, tail_decay * decay.narrow(dim, 0, size - step)], dim)
        step *= 2
    return decay, inputs


class SelectiveScanMixer(nn.Module):
    """The token mixer of a Mamba block: depthwise conv -> activation -> selective scan (S6) over the H*W tokens.

    Step sizes `delta`, input and output projections `B`, `C` are computed from each token (the
    "selective" part); `A` (diagonal, `A = -exp(A_log)`) and the skip `D` are learned. Each scan
    direction has its own projections, `A` and `D`; their outputs are summed back on the token grid.
    With `scan='raster'` the conv is causal too, so the whole mixer is: the output at a token
    depends only on the tokens before it in raster order.

    Args:
        dim: Channels.
        scan: Token order, one of `SCANS`: 'raster' (causal, Mamba), 'bidirectional' (Vision
            Mamba) or 'cross' (rows and columns both ways, VMamba).
        kernel_size: Size of the depthwise conv before the scan.
        d_state: State size per channel (N).
        dt_rank: Rank of the step-size projection; None gives ceil(dim / 16).
        chunk_size: Tokens per chunk of the pure-PyTorch scan (see `chunked_selective_scan`); None
            picks by device.
        use_kernel: Scan with the compiled kernels where they apply (see `selective_scan`):
            `mamba_ssm`'s CUDA `selective_scan_fn` for GPU inputs when it is installed, the C++
            kernel on CPU. False: always the pure-PyTorch `chunked_selective_scan`.
        dt_min: Smallest initial step size.
        dt_max: Largest initial step size.
    """

    def __init__(
        self,
        dim: int,
        scan: str = "raster",
        kernel_size: int = 7,
        d_state: int = 16,
        dt_rank: int | None = None,
        chunk_size: int | None = None,
        use_kernel: bool = True,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
    ):
        super().__init__()
        if scan not in SCANS:
            raise ValueError(f"Unknown scan '{scan}', expected one of {', '.join(repr(s) for s in SCANS)}.")
        if d_state < 1 or (chunk_size is not None and chunk_size < 1):
            raise ValueError(f"d_state={d_state} and chunk_size={chunk_size} must be positive.")
        self.scan = scan
        self.directions = SCANS[scan]
        self.d_state = d_state
        self.dt_rank = dt_rank or math.ceil(dim / 16)
        self.chunk_size = chunk_size
        self.use_kernel = use_kernel
        num_directions = len(self.directions)

        self.conv = DepthwiseConvMixer(dim, kernel_size=kernel_size, causal=scan == "raster")
        self.act = nn.SiLU()
        self.x_proj_weight = nn.Parameter(torch.empty(num_directions, self.dt_rank + 2 * d_state, dim))
        self.dt_proj_weight = nn.Parameter(torch.empty(num_directions, dim, self.dt_rank))
        self.dt_bias = nn.Parameter(torch.empty(num_directions * dim))
        self.A_log = nn.Parameter(torch.empty(num_directions * dim, d_state))
        self.D = nn.Parameter(torch.empty(num_directions * dim))
        self.reset_parameters(dt_min, dt_max)

    def reset_parameters(self, dt_min: float = 1e-3, dt_max: float = 1e-1) -> None:
        """Mamba's initialisation: `A = -(1..N)`, `D = 1`, step sizes log-uniform in [dt_min, dt_max]."""
        dim = self.x_proj_weight.shape[-1]
        with torch.no_grad():
            nn.init.uniform_(self.x_proj_weight, -(dim**-0.5), dim**-0.5)
            nn.init.uniform_(self.dt_proj_weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
            dt = torch.exp(torch.rand_like(self.dt_bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
            self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand_as(self.A_log))
            self.D.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        length = height * width
        x = self.act(self.conv(x))
        rows = x.permute(0, 3, 1, 2).reshape(batch, channels, length)
        columns = x.permute(0, 3, 2, 1).reshape(batch, channels, length)
        orders = {"row": rows, "column": columns}
        xs = torch.stack(
            [
                orders[d.replace("_reversed", "")].flip(-1) if d.endswith("_reversed") else orders[d]
                for d in self.directions
            ],
            dim=1,
        )  # [batch, directions, channels, length]

        projected = torch.einsum("bkcl,krc->bkrl", xs, self.x_proj_weight)
        dts, Bs, Cs = torch.split(projected, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kcr->bkcl", dts, self.dt_proj_weight)
        scan_args = (
            xs.reshape(batch, -1, length),
            dts.reshape(batch, -1, length),
            -torch.exp(self.A_log.float()),
            Bs.contiguous(),
            Cs.contiguous(),
            self.D.float(),
        )
        scan = selective_scan if self.use_kernel else chunked_selective_scan
        y = scan(*scan_args, delta_bias=self.dt_bias, delta_softplus=True, chunk_size=self.chunk_size)
        y = y.to(x.dtype).view(batch, len(self.directions), channels, length)

        out = 0
        for k, direction in enumerate(self.directions):
            seq = y[:, k].flip(-1) if direction.endswith("_reversed") else y[:, k]
            if direction.startswith("column"):
                out = out + seq.view(batch, channels, width, height).transpose(-1, -2)
            else:
                out = out + seq.view(batch, channels, height, width)
        return out.permute(0, 2, 3, 1)
