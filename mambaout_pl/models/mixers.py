"""Token mixers a Gated CNN block can hold on its `c` branch: gated conv (MambaOut), SSM (Mamba), attention.

Every mixer maps channels-last tokens `[B, H, W, C]` to `[B, H, W, C]`:

- `gated_conv` (`DepthwiseConvMixer`): MambaOut's depthwise k x k convolution.
- `ssm` (`SelectiveScanMixer`): the Mamba block's mixer, the convolution then an activation and a
  selective state-space scan (S6) over the H*W tokens, in one of the `SCANS` orders.
- `attention` (`AttentionMixer`): multi-head self-attention over the H*W tokens, causal or fully
  visible, optionally within windows.

`stage_mixers` resolves a model's per-stage choice (a name or one name per stage, plus the mixers'
arguments) and `create_mixer` builds one mixer by name.
"""
import inspect
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

try:  # the CUDA kernel of the Mamba authors, used for GPU inputs when installed
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
except ImportError:
    selective_scan_fn = None

__all__ = [
    'DepthwiseConvMixer',
    'SelectiveScanMixer',
    'AttentionMixer',
    'TOKEN_MIXERS',
    'SCANS',
    'selective_scan',
    'create_mixer',
    'mixer_arguments',
    'stage_mixers',
]

# Token orders of the SSM scans: row-major (raster) or column-major, forwards or reversed.
SCANS: Dict[str, Tuple[str, ...]] = {
    'raster': ('row',),  # Mamba: one causal pass
    'bidirectional': ('row', 'row_reversed'),  # Vision Mamba
    'cross': ('row', 'column', 'row_reversed', 'column_reversed'),  # VMamba's cross scan
}


class DepthwiseConvMixer(nn.Conv2d):
    """Depthwise k x k convolution on channels-last tokens: the spatial mixer of a Gated CNN block.

    A plain `nn.Conv2d` underneath (its parameters are `weight` and `bias`), taking and returning
    `[B, H, W, C]` like any token mixer the block may hold. `causal=True` keeps only the kernel
    taps at or before the centre in raster order (the rows above, and the centre row up to the
    centre), so the output at a token depends only on the tokens at or before it.
    """

    def __init__(self, dim: int, kernel_size: int = 7, causal: bool = False):
        if kernel_size % 2 != 1:
            raise ValueError(f'kernel_size={kernel_size} must be odd so the conv keeps the token grid.')
        super().__init__(dim, dim, kernel_size=kernel_size, padding=kernel_size // 2, groups=dim)
        self.causal = causal
        mask = None
        if causal:
            mask = torch.zeros(kernel_size, kernel_size)
            mask[:kernel_size // 2] = 1
            mask[kernel_size // 2, :kernel_size // 2 + 1] = 1
            mask = mask.view(1, 1, kernel_size, kernel_size)
        self.register_buffer('causal_mask', mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        if self.causal_mask is None:
            x = super().forward(x)
        else:
            x = F.conv2d(x, self.weight * self.causal_mask, self.bias, padding=self.padding, groups=self.groups)
        return x.permute(0, 2, 3, 1)


def selective_scan(
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: Optional[torch.Tensor] = None,
        delta_bias: Optional[torch.Tensor] = None,
        delta_softplus: bool = False,
        chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Selective state-space scan (S6) in pure PyTorch; the arguments of `mamba_ssm`'s `selective_scan_fn`.

    `h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t`, `y_t = C_t . h_t + D * u_t` per channel,
    from `h_{-1} = 0`.

    Args:
        u: Inputs `[batch, channels, length]`.
        delta: Step sizes `[batch, channels, length]`.
        A: State matrix (diagonal) `[channels, state]`, negative for a decaying state.
        B: Input projections `[batch, groups, state, length]` (or `[batch, state, length]`); the
            channels are split into `groups` consecutive blocks that share them.
        C: Output projections, shaped like `B`.
        D: Skip weights `[channels]`.
        delta_bias: Added to `delta` `[channels]`.
        delta_softplus: Pass `delta` (plus bias) through softplus.
        chunk_size: Tokens per chunk. The chunks run side by side: the state entering each chunk
            comes from a parallel scan over the chunks, then each chunk steps through its tokens.
            None: one chunk (a plain sequential scan, the fastest on CPU) for CPU inputs, 64 for
            GPU inputs.
    Returns:
        `y`, `[batch, channels, length]`, in the dtype of `u` (computed in float32).
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
    if chunk_size is None:
        chunk_size = 64 if u.is_cuda else length

    grouped = (batch, groups, channels // groups, length, 1)
    log_decay = delta.view(grouped) * A.view(1, groups, channels // groups, 1, state)
    inputs = (delta * u).view(grouped) * B.transpose(-1, -2).unsqueeze(2)
    y = _chunked_scan(log_decay, inputs, C.transpose(-1, -2).unsqueeze(2), chunk_size)
    y = y.reshape(batch, channels, length)
    if D is not None:
        y = y + D.float()[:, None] * u
    return y.to(dtype)


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
) -> Tuple[torch.Tensor, torch.Tensor]:
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
        chunk_size: Tokens per chunk of the pure-PyTorch scan (see `selective_scan`); None picks
            by device.
        use_kernel: Use `mamba_ssm`'s CUDA `selective_scan_fn` for GPU inputs when it is installed.
        dt_min: Smallest initial step size.
        dt_max: Largest initial step size.
    """

    def __init__(
            self,
            dim: int,
            scan: str = 'raster',
            kernel_size: int = 7,
            d_state: int = 16,
            dt_rank: Optional[int] = None,
            chunk_size: Optional[int] = None,
            use_kernel: bool = True,
            dt_min: float = 1e-3,
            dt_max: float = 1e-1,
    ):
        super().__init__()
        if scan not in SCANS:
            raise ValueError(f"Unknown scan '{scan}', expected one of {', '.join(repr(s) for s in SCANS)}.")
        if d_state < 1 or (chunk_size is not None and chunk_size < 1):
            raise ValueError(f'd_state={d_state} and chunk_size={chunk_size} must be positive.')
        self.scan = scan
        self.directions = SCANS[scan]
        self.d_state = d_state
        self.dt_rank = dt_rank or math.ceil(dim / 16)
        self.chunk_size = chunk_size
        self.use_kernel = use_kernel
        num_directions = len(self.directions)

        self.conv = DepthwiseConvMixer(dim, kernel_size=kernel_size, causal=scan == 'raster')
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
            nn.init.uniform_(self.x_proj_weight, -dim ** -0.5, dim ** -0.5)
            nn.init.uniform_(self.dt_proj_weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
            dt = torch.exp(torch.rand_like(self.dt_bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
            self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand_as(self.A_log))
            self.D.fill_(1.)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        length = height * width
        x = self.act(self.conv(x))
        rows = x.permute(0, 3, 1, 2).reshape(batch, channels, length)
        columns = x.permute(0, 3, 2, 1).reshape(batch, channels, length)
        orders = {'row': rows, 'column': columns}
        xs = torch.stack([
            orders[d.replace('_reversed', '')].flip(-1) if d.endswith('_reversed') else orders[d]
            for d in self.directions
        ], dim=1)  # [batch, directions, channels, length]

        projected = torch.einsum('bkcl,krc->bkrl', xs, self.x_proj_weight)
        dts, Bs, Cs = torch.split(projected, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum('bkrl,kcr->bkcl', dts, self.dt_proj_weight)
        scan_args = (
            xs.reshape(batch, -1, length),
            dts.reshape(batch, -1, length),
            -torch.exp(self.A_log.float()),
            Bs.contiguous(),
            Cs.contiguous(),
            self.D.float(),
        )
        if self.use_kernel and selective_scan_fn is not None and x.is_cuda:
            y = selective_scan_fn(*(t.float() for t in scan_args), delta_bias=self.dt_bias.float(), delta_softplus=True)
        else:
            y = selective_scan(*scan_args, delta_bias=self.dt_bias, delta_softplus=True, chunk_size=self.chunk_size)
        y = y.to(x.dtype).view(batch, len(self.directions), channels, length)

        out = 0
        for k, direction in enumerate(self.directions):
            seq = y[:, k].flip(-1) if direction.endswith('_reversed') else y[:, k]
            if direction.startswith('column'):
                out = out + seq.view(batch, channels, width, height).transpose(-1, -2)
            else:
                out = out + seq.view(batch, channels, height, width)
        return out.permute(0, 2, 3, 1)

    def scan_macs(self, batch: int, height: int, width: int) -> int:
        """Multiply-accumulates of the scan itself, elementwise work that `FlopCounterMode` does not count.

        Per token, channel and direction: `4 * d_state` (decay, input, state update, readout) plus
        2 (`delta * u` and the skip `D * u`).
        """
        channels = self.x_proj_weight.shape[-1]
        return batch * height * width * len(self.directions) * channels * (4 * self.d_state + 2)


class AttentionMixer(nn.Module):
    """Multi-head self-attention over the H*W tokens (`scaled_dot_product_attention`), no position embedding.

    Positions reach the tokens through the zero-padded convs of the stem and downsampling layers,
    as in MetaFormer's attention baselines. The block's `fc2` after the gate is the output
    projection. `causal=True` lets each token see only the tokens at or before it in raster order;
    `window_size` restricts attention to non-overlapping windows (with padding masked out), which
    large stages need: without windows, more than `max_tokens` tokens is an error.

    Args:
        dim: Channels.
        num_heads: Heads; None gives `dim // head_dim` (at least one).
        head_dim: Channels per head when `num_heads` is None.
        causal: Mask the tokens after each token in raster order (within its window, if windowed).
        window_size: Side of the square attention windows; None attends over the whole stage.
        qkv_bias: Bias in the query/key/value projection.
        max_tokens: Largest H*W attended without windows.
    """

    def __init__(
            self,
            dim: int,
            num_heads: Optional[int] = None,
            head_dim: int = 32,
            causal: bool = False,
            window_size: Optional[int] = None,
            qkv_bias: bool = False,
            max_tokens: int = 4096,
    ):
        super().__init__()
        if num_heads is None:
            if head_dim < 1:
                raise ValueError(f'head_dim={head_dim} must be positive.')
            num_heads = max(1, dim // head_dim)
        if num_heads < 1 or dim % num_heads:
            raise ValueError(
                f'Attention over {dim} channels cannot use num_heads={num_heads}: choose a head count '
                f'that divides {dim}, or leave num_heads unset to get {dim} // head_dim heads.'
            )
        if window_size is not None and window_size < 1:
            raise ValueError(f'window_size={window_size} must be a positive number of tokens, or None for no windows.')
        self.num_heads = num_heads
        self.causal = causal
        self.window_size = window_size
        self.max_tokens = max_tokens
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        size = self.window_size
        mask = None
        if size is None:
            if height * width > self.max_tokens:
                raise ValueError(self._too_many_tokens_message(height, width))
            grid_h, grid_w, pad_h, pad_w = 1, 1, 0, 0
            tokens = x.reshape(batch, 1, height * width, channels)
        else:
            pad_h, pad_w = -height % size, -width % size
            grid_h, grid_w = (height + pad_h) // size, (width + pad_w) // size
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
            tokens = (x.view(batch, grid_h, size, grid_w, size, channels)
                      .permute(0, 1, 3, 2, 4, 5).reshape(batch, grid_h * grid_w, size * size, channels))
            if pad_h or pad_w:
                mask = self._window_mask(height, width, size, grid_h, grid_w, x.device)
        windows, length = tokens.shape[1], tokens.shape[2]

        qkv = self.qkv(tokens).view(batch * windows, length, 3, self.num_heads, channels // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [batch * windows, heads, length, head channels]
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            mask = mask.expand(batch, -1, -1, -1, -1).reshape(batch * windows, 1, length, length)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(batch, windows, length, channels)

        if size is None:
            return out.view(batch, height, width, channels)
        out = (out.view(batch, grid_h, grid_w, size, size, channels)
               .permute(0, 1, 3, 2, 4, 5).reshape(batch, grid_h * size, grid_w * size, channels))
        return out[:, :height, :width]

    def _window_mask(
            self, height: int, width: int, size: int, grid_h: int, grid_w: int, device: torch.device,
    ) -> torch.Tensor:
        """`[windows, 1, size^2, size^2]`: True where a query may attend a key (real key, causal order)."""
        real = torch.zeros(grid_h * size, grid_w * size, dtype=torch.bool, device=device)
        real[:height, :width] = True
        real = real.view(grid_h, size, grid_w, size).permute(0, 2, 1, 3).reshape(grid_h * grid_w, 1, 1, size * size)
        mask = real.expand(-1, 1, size * size, -1)
        if self.causal:
            mask = mask & torch.ones(size * size, size * size, dtype=torch.bool, device=device).tril()
        return mask

    def _too_many_tokens_message(self, height: int, width: int) -> str:
        tokens = height * width
        gigabytes = tokens * tokens * 4 / 1e9
        return (
            f'Attention over a {height}x{width} stage is {tokens} tokens, more than max_tokens={self.max_tokens}: '
            f'its score matrix alone is {gigabytes:.1f} GB per image and head in float32. Set window_size for '
            'the large stages (per stage, e.g. window_size=[8, 8, None, None]), use a smaller input, or raise '
            'max_tokens (mixer_args={"max_tokens": N}).'
        )


TOKEN_MIXERS: Dict[str, Type[nn.Module]] = {
    'gated_conv': DepthwiseConvMixer,
    'ssm': SelectiveScanMixer,
    'attention': AttentionMixer,
}

_HINTS = {
    'causal': "for 'ssm' the scan sets causality: scan='raster' is causal, 'bidirectional' and 'cross' are not",
    'window_size': "windows apply to 'attention' only",
}


def mixer_arguments(token_mixer: str) -> List[str]:
    """Names of the keyword arguments the mixer `token_mixer` takes (besides `dim`)."""
    _check_mixer_name(token_mixer)
    parameters = inspect.signature(TOKEN_MIXERS[token_mixer].__init__).parameters
    return [name for name in parameters if name not in ('self', 'dim')]


def create_mixer(token_mixer: str, dim: int, **kwargs: Any) -> nn.Module:
    """Build the token mixer named `token_mixer` (a key of `TOKEN_MIXERS`) over `dim` channels."""
    accepted = mixer_arguments(token_mixer)
    unknown = [key for key in kwargs if key not in accepted]
    if unknown:
        raise ValueError(
            f"token_mixer '{token_mixer}' takes no argument {', '.join(repr(k) for k in unknown)}; "
            f"it takes {', '.join(accepted)}."
        )
    return TOKEN_MIXERS[token_mixer](dim, **kwargs)


def stage_mixers(
        num_stages: int,
        token_mixer: Union[str, Sequence[str]] = 'gated_conv',
        mixer_args: Optional[Dict[str, Any]] = None,
) -> List[Tuple[str, Dict[str, Any]]]:
    """The mixer name and keyword arguments of each stage.

    `token_mixer` and every value of `mixer_args` is either one value for all stages or a list
    with one entry per stage (None: the mixer's default). A single value applies to the stages
    whose mixer takes it, and must fit at least one; a list entry must fit its own stage.
    """
    names = _per_stage('token_mixer', token_mixer, num_stages)
    for index, name in enumerate(names):
        _check_mixer_name(name, f' (stage {index})' if num_stages > 1 and not isinstance(token_mixer, str) else '')
    stage_args: List[Dict[str, Any]] = [{} for _ in names]
    for key, value in (mixer_args or {}).items():
        values = _per_stage(key, value, num_stages)
        takers = [i for i, name in enumerate(names) if key in mixer_arguments(name)]
        if not any(v is not None for v in values):
            continue
        if not takers:
            users = [name for name in TOKEN_MIXERS if key in mixer_arguments(name)]
            message = (f"{key}={value!r} does not apply to token_mixer {_describe(names)}: "
                       f"only {', '.join(repr(u) for u in users) or 'no mixer'} take{'s' if len(users) == 1 else ''} it")
            if key in _HINTS:
                message += f' ({_HINTS[key]})'
            raise ValueError(message + '. Choose a token_mixer that takes it, or leave it unset.')
        for index, stage_value in enumerate(values):
            if stage_value is None:
                continue
            if index in takers:
                stage_args[index][key] = stage_value
            elif isinstance(value, (list, tuple)):
                raise ValueError(
                    f"{key}[{index}]={stage_value!r}, but stage {index} uses token_mixer '{names[index]}', "
                    f'which takes no {key}: give None for that stage.'
                )
    return list(zip(names, stage_args))


def _per_stage(key: str, value: Any, num_stages: int) -> List[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != num_stages:
            raise ValueError(
                f'{key} has {len(value)} entries {list(value)} but the model has {num_stages} stages: '
                'give one entry per stage, or a single value for all stages.'
            )
        return list(value)
    return [value] * num_stages


def _check_mixer_name(name: Any, where: str = '') -> None:
    if not isinstance(name, str) or name not in TOKEN_MIXERS:
        raise ValueError(
            f"Unknown token_mixer {name!r}{where}, expected one of {', '.join(repr(m) for m in TOKEN_MIXERS)}."
        )


def _describe(names: List[str]) -> str:
    unique = list(dict.fromkeys(names))
    return repr(unique[0]) if len(unique) == 1 else repr(names)
