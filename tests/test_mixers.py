"""Token mixers against naive references, causality, gradients, the per-stage choice and bad input."""

import functools
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

from mambaout_pl.models import MambaOut, create_model, mixers
from mambaout_pl.models.mixers import (
    AttentionMixer,
    DepthwiseConvMixer,
    MixerSpec,
    SelectiveScanMixer,
    chunked_selective_scan,
    create_mixer,
    selective_scan,
    stage_mixers,
)

SMALL = dict(depths=(1, 1, 2, 1), dims=(16, 32, 48, 64), num_classes=10)


def small_model(**kwargs) -> MambaOut:
    torch.manual_seed(0)
    return MambaOut(**dict(SMALL, **kwargs))


# Naive references


def loop_selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """The S6 recurrence one token at a time."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, channels, length = u.shape
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    per_group = channels // B.shape[1]
    state = torch.zeros(batch, channels, A.shape[1], dtype=torch.float64)
    outputs = []
    for t in range(length):
        for channel in range(channels):
            group = channel // per_group
            decay = torch.exp(delta[:, channel, t, None] * A[channel])
            state[:, channel] = (
                decay * state[:, channel] + (delta[:, channel, t] * u[:, channel, t])[:, None] * B[:, group, :, t]
            )
        outputs.append(
            torch.stack([(state[:, c] * C[:, c // per_group, :, t]).sum(-1) for c in range(channels)], dim=1)
        )
    y = torch.stack(outputs, dim=-1)
    return y if D is None else y + D[:, None] * u


def scan_order(direction, height, width):
    """Token indices (row-major) in the order a direction visits them."""
    if direction.startswith("row"):
        order = [y * width + x for y in range(height) for x in range(width)]
    else:
        order = [y * width + x for x in range(width) for y in range(height)]
    return order[::-1] if direction.endswith("reversed") else order


def reference_ssm_mixer(mixer: SelectiveScanMixer, x: torch.Tensor) -> torch.Tensor:
    """The SSM mixer, one direction at a time, with explicit token orders and the loop scan."""
    batch, height, width, channels = x.shape
    tokens = F.silu(mixer.conv(x)).reshape(batch, height * width, channels).double()
    A = -torch.exp(mixer.A_log.double())
    out = torch.zeros_like(tokens)
    for k, direction in enumerate(mixer.directions):
        order = scan_order(direction, height, width)
        seq = tokens[:, order]  # [batch, length, channels]
        projected = seq @ mixer.x_proj_weight[k].double().T
        dt, B, C = projected.split([mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
        delta = dt @ mixer.dt_proj_weight[k].double().T
        part = slice(k * channels, (k + 1) * channels)
        y = loop_selective_scan(
            seq.transpose(1, 2),
            delta.transpose(1, 2),
            A[part],
            B.transpose(1, 2),
            C.transpose(1, 2),
            mixer.D[part].double(),
            mixer.dt_bias[part].double(),
            delta_softplus=True,
        )
        out[:, order] += y.transpose(1, 2)
    return out.reshape(batch, height, width, channels)


def reference_attention(mixer: AttentionMixer, x: torch.Tensor) -> torch.Tensor:
    """Explicit softmax(q k^T / sqrt(d)) v over each window's real tokens (the whole grid without windows)."""
    batch, height, width, channels = x.shape
    size = mixer.window_size
    heads, head_dim = mixer.num_heads, channels // mixer.num_heads
    windows = (
        [[(y, x_) for y in range(height) for x_ in range(width)]]
        if size is None
        else [
            [(y, x_) for y in range(wy, min(wy + size, height)) for x_ in range(wx, min(wx + size, width))]
            for wy in range(0, height, size)
            for wx in range(0, width, size)
        ]
    )
    out = torch.zeros_like(x)
    for window in windows:
        ys, xs = zip(*window)
        tokens = x[:, list(ys), list(xs)]  # [batch, n, channels]
        q, k, v = (tokens @ mixer.qkv.weight.T).split(channels, dim=-1)
        q, k, v = (t.view(batch, len(window), heads, head_dim).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        if mixer.causal:
            scores = scores.masked_fill(torch.ones(len(window), len(window)).triu(1).bool(), float("-inf"))
        weights = scores.exp() / scores.exp().sum(-1, keepdim=True)
        out[:, list(ys), list(xs)] = (weights @ v).transpose(1, 2).reshape(batch, len(window), channels)
    return out


# Against the references


@pytest.mark.parametrize("chunk_size", [None, 1, 5, 16, 64])
def test_selective_scan_matches_the_loop(chunk_size):
    torch.manual_seed(0)
    batch, groups, channels, state, length = 2, 2, 6, 4, 23
    u = torch.randn(batch, channels, length, dtype=torch.float64)
    delta = torch.randn(batch, channels, length, dtype=torch.float64)
    A = -torch.rand(channels, state, dtype=torch.float64) * 3
    B = torch.randn(batch, groups, state, length, dtype=torch.float64)
    C = torch.randn(batch, groups, state, length, dtype=torch.float64)
    D = torch.randn(channels, dtype=torch.float64)
    bias = torch.randn(channels, dtype=torch.float64)

    expected = loop_selective_scan(u, delta, A, B, C, D, bias, delta_softplus=True)
    got = selective_scan(u, delta, A, B, C, D, delta_bias=bias, delta_softplus=True, chunk_size=chunk_size)
    assert got.dtype == u.dtype
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)

    # shared B and C (3-dim), no skip, raw step sizes
    expected = loop_selective_scan(u, delta.abs(), A, B[:, 0], C[:, 0])
    got = selective_scan(u, delta.abs(), A, B[:, 0], C[:, 0], chunk_size=chunk_size)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_selective_scan_stays_finite_for_strong_decay():
    torch.manual_seed(0)
    u = torch.randn(1, 3, 50)
    delta = torch.full((1, 3, 50), 30.0)
    A = -torch.full((3, 2), 50.0)  # decays of exp(-1500) per token: far below float32's range
    B, C = torch.randn(1, 2, 50), torch.randn(1, 2, 50)
    expected = loop_selective_scan(u.double(), delta.double(), A.double(), B.double(), C.double())
    for chunk_size in (None, 8):
        got = selective_scan(u, delta, A, B, C, chunk_size=chunk_size)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scan", ["raster", "bidirectional", "cross"])
def test_ssm_mixer_matches_the_reference(scan):
    torch.manual_seed(0)
    mixer = SelectiveScanMixer(6, scan=scan, kernel_size=3, d_state=4).double()
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)  # not square, so rows and columns differ
    with torch.no_grad():
        torch.testing.assert_close(mixer(x), reference_ssm_mixer(mixer, x), atol=1e-8, rtol=1e-6)
    assert mixer.x_proj_weight.shape[0] == len(mixer.directions) == {"raster": 1, "bidirectional": 2, "cross": 4}[scan]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("window_size", [None, 3, 4], ids=["global", "window3", "window4"])
def test_attention_matches_explicit_softmax(causal, window_size):
    torch.manual_seed(0)
    mixer = AttentionMixer(8, num_heads=2, causal=causal, window_size=window_size).double()
    x = torch.randn(2, 5, 7, 8, dtype=torch.float64)  # 5x7 leaves padded windows of 3 and 4
    with torch.no_grad():
        torch.testing.assert_close(mixer(x), reference_attention(mixer, x), atol=1e-10, rtol=1e-8)


def test_causal_conv_drops_the_taps_after_the_centre():
    torch.manual_seed(0)
    causal = DepthwiseConvMixer(4, kernel_size=5, causal=True)
    plain = DepthwiseConvMixer(4, kernel_size=5)
    with torch.no_grad():
        plain.weight.copy_(causal.weight)
        plain.bias.copy_(causal.bias)
        plain.weight[:, :, 2, 3:] = 0  # right of the centre
        plain.weight[:, :, 3:] = 0  # rows below
    x = torch.randn(2, 6, 7, 4)
    torch.testing.assert_close(causal(x), plain(x))
    assert causal.state_dict().keys() == plain.state_dict().keys() == {"weight", "bias"}


# Causality

CAUSAL = {
    "gated_conv causal": ("gated_conv", dict(causal=True)),
    "ssm raster": ("ssm", dict(scan="raster")),
    "attention causal": ("attention", dict(causal=True)),
    "attention causal window": ("attention", dict(causal=True, window_size=4)),
}
NOT_CAUSAL = {
    "gated_conv": ("gated_conv", {}),
    "ssm bidirectional": ("ssm", dict(scan="bidirectional")),
    "ssm cross": ("ssm", dict(scan="cross")),
    "attention full": ("attention", dict(causal=False)),
    "attention full window": ("attention", dict(causal=False, window_size=4)),
}


def outputs_before_and_after_changing_the_future(name, kwargs, t):
    torch.manual_seed(0)
    mixer = create_mixer(name, 8, **kwargs)
    x = torch.randn(2, 6, 7, 8)
    changed = x.clone().view(2, 42, 8)
    changed[:, t + 1 :] = torch.randn_like(changed[:, t + 1 :])
    with torch.no_grad():
        before = mixer(x).reshape(2, 42, 8)
        after = mixer(changed.view(2, 6, 7, 8)).reshape(2, 42, 8)
    return before, after


@pytest.mark.parametrize("mixer", list(CAUSAL), ids=list(CAUSAL))
def test_causal_mixers_ignore_later_tokens(mixer):
    name, kwargs = CAUSAL[mixer]
    for t in (0, 17, 40):
        before, after = outputs_before_and_after_changing_the_future(name, kwargs, t)
        torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], atol=1e-6, rtol=0)
        assert (after[:, t + 1 :] - before[:, t + 1 :]).abs().max() > 1e-3


@pytest.mark.parametrize("mixer", list(NOT_CAUSAL), ids=list(NOT_CAUSAL))
def test_other_mixers_see_later_tokens(mixer):
    name, kwargs = NOT_CAUSAL[mixer]
    before, after = outputs_before_and_after_changing_the_future(name, kwargs, 17)
    assert (after[:, :18] - before[:, :18]).abs().max() > 1e-3


def test_raster_ssm_block_is_causal():
    model = small_model(token_mixer="ssm", scan="raster")
    block = model.stages[1].blocks[0]
    x = torch.randn(1, 4, 5, 32)
    changed = x.clone().view(1, 20, 32)
    changed[:, 9:] += 1.0
    with torch.no_grad():
        before, after = block(x).view(1, 20, 32), block(changed.view(1, 4, 5, 32)).view(1, 20, 32)
    torch.testing.assert_close(after[:, :9], before[:, :9], atol=1e-6, rtol=0)


# Gradients


@pytest.mark.parametrize("mixer", list(CAUSAL) + list(NOT_CAUSAL), ids=list(CAUSAL) + list(NOT_CAUSAL))
def test_gradients_reach_every_parameter_and_the_input(mixer):
    name, kwargs = {**CAUSAL, **NOT_CAUSAL}[mixer]
    torch.manual_seed(0)
    module = create_mixer(name, 8, **kwargs)
    x = torch.randn(2, 5, 6, 8, requires_grad=True)
    module(x).square().sum().backward()
    assert x.grad.abs().sum() > 0
    for param_name, param in module.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name
        assert param.grad.abs().sum() > 0, param_name


def test_model_with_each_mixer_trains_a_step():
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
    for kwargs in (dict(token_mixer="ssm", scan="cross"), dict(token_mixer="attention", causal=True)):
        model = small_model(**kwargs)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# The per-stage choice


def test_default_is_the_gated_conv_with_timm_keys():
    torch.manual_seed(0)
    default = create_model("mambaout_femto")
    torch.manual_seed(0)
    explicit = create_model("mambaout_femto", token_mixer="gated_conv")
    reference = timm.create_model("mambaout_femto", pretrained=False)
    assert list(default.state_dict()) == list(explicit.state_dict()) == list(reference.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(default(x), explicit(x), atol=0, rtol=0)
    assert type(default.stages[0].blocks[0].conv) is DepthwiseConvMixer


def test_one_mixer_per_stage():
    model = small_model(
        token_mixer=["gated_conv", "ssm", "attention", "attention"],
        scan="cross",
        causal=[None, None, True, False],
        window_size=[None, None, 4, None],
        d_state=8,
    )
    first = [stage.blocks[0].conv for stage in model.stages]
    assert [type(m) for m in first] == [DepthwiseConvMixer, SelectiveScanMixer, AttentionMixer, AttentionMixer]
    assert not first[0].causal
    assert first[1].scan == "cross" and first[1].d_state == 8
    assert (first[2].causal, first[2].window_size) == (True, 4)
    assert (first[3].causal, first[3].window_size) == (False, None)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    assert model.stages[1].blocks[0].conv.A_log.shape == (4 * 32, 8)


def test_mixer_arguments_reach_create_model_and_the_mixers():
    model = create_model(
        "mambaout_femto", token_mixer="attention", num_heads=[1, 2, 4, 8], mixer_args={"max_tokens": 10}
    )
    assert [stage.blocks[0].conv.num_heads for stage in model.stages] == [1, 2, 4, 8]
    assert model.stages[0].blocks[0].conv.max_tokens == 10
    ssm = create_model("mambaout_femto", token_mixer="ssm", mixer_args={"dt_rank": 5})
    assert ssm.stages[3].blocks[0].conv.dt_proj_weight.shape == (1, 288, 5)


def test_ssm_decay_stays_out_of_weight_decay():
    model = small_model(token_mixer="ssm")
    assert model.no_weight_decay() == {
        f"stages.{s}.blocks.{b}.conv.A_log" for s, depth in enumerate(SMALL["depths"]) for b in range(depth)
    }
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    block = model.stages[0].blocks[0].conv
    assert id(block.A_log) in no_decay and id(block.D) in no_decay and id(block.dt_bias) in no_decay
    assert id(block.x_proj_weight) not in no_decay


# Bad input


def test_unknown_mixer_lists_the_choices():
    with pytest.raises(ValueError, match="Unknown token_mixer 'mamba'.*'gated_conv', 'ssm', 'attention'"):
        create_model("mambaout_femto", token_mixer="mamba")
    with pytest.raises(ValueError, match=r"Unknown token_mixer 'atention' \(stage 2\)"):
        create_model("mambaout_femto", token_mixer=["gated_conv", "ssm", "atention", "attention"])


def test_mixer_list_must_have_one_entry_per_stage():
    with pytest.raises(ValueError, match="token_mixer has 3 entries .* 4 stages"):
        create_model("mambaout_femto", token_mixer=["ssm", "ssm", "attention"])
    with pytest.raises(ValueError, match="window_size has 2 entries"):
        create_model("mambaout_femto", token_mixer="attention", window_size=[7, 7])


def test_unknown_scan_lists_the_choices():
    with pytest.raises(ValueError, match="Unknown scan 'zigzag'.*'raster', 'bidirectional', 'cross'"):
        create_model("mambaout_femto", token_mixer="ssm", scan="zigzag")


def test_arguments_that_no_chosen_mixer_takes():
    with pytest.raises(ValueError, match="scan='cross' does not apply to token_mixer 'gated_conv': only 'ssm'"):
        create_model("mambaout_femto", scan="cross")
    with pytest.raises(ValueError, match="causal=True does not apply to token_mixer 'ssm'.*scan='raster' is causal"):
        create_model("mambaout_femto", token_mixer="ssm", causal=True)
    with pytest.raises(ValueError, match=r"window_size\[0\]=7, but stage 0 uses token_mixer 'gated_conv'"):
        create_model(
            "mambaout_femto",
            token_mixer=["gated_conv", "attention", "attention", "attention"],
            window_size=[7, 7, None, None],
        )
    with pytest.raises(ValueError, match="takes no argument 'kernel'"):
        create_mixer("gated_conv", 8, kernel=3)
    with pytest.raises(ValueError, match="scan given both by name and inside mixer_args"):
        create_model("mambaout_femto", token_mixer="ssm", scan="raster", mixer_args={"scan": "cross"})
    with pytest.raises(TypeError, match="unexpected keyword argument 'scna'.*scan"):
        create_model("mambaout_femto", token_mixer="ssm", scna="cross")


def test_attention_heads_must_divide_the_channels():
    with pytest.raises(ValueError, match="48 channels cannot use num_heads=5"):
        create_model("mambaout_femto", token_mixer="attention", num_heads=5)


def test_attention_over_a_huge_stage_needs_windows():
    with torch.device("meta"):
        model = create_model("mambaout_femto", token_mixer="attention")
        windowed = create_model("mambaout_femto", token_mixer="attention", window_size=[8, 8, None, None])
    image = torch.empty(1, 3, 800, 1280, device="meta")
    with pytest.raises(ValueError, match=r"200x320 stage is 64000 tokens, more than max_tokens=4096.*window_size"):
        model(image)
    assert windowed(image).shape == (1, 1000)  # shapes only: the meta device computes nothing


def test_stage_mixers_resolves_values_per_stage():
    assert stage_mixers(2, "ssm", {"scan": "cross", "causal": None}) == [MixerSpec("ssm", {"scan": "cross"})] * 2
    assert stage_mixers(2, ["gated_conv", "attention"], {"causal": True}) == [
        MixerSpec("gated_conv", {"causal": True}),
        MixerSpec("attention", {"causal": True}),
    ]
    assert stage_mixers(2, ["ssm", "attention"], {"window_size": 7}) == [
        MixerSpec("ssm"),
        MixerSpec("attention", {"window_size": 7}),
    ]


def test_mixer_args_dict_and_names_build_the_same_model():
    torch.manual_seed(0)
    by_dict = create_model("mambaout_femto", token_mixer="ssm", mixer_args={"scan": "cross", "d_state": 4})
    torch.manual_seed(0)
    by_name = create_model("mambaout_femto", token_mixer="ssm", scan="cross", d_state=4)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(by_dict(x), by_name(x), atol=0, rtol=0)
    assert by_dict.stages[0].blocks[0].conv.scan == "cross" and by_dict.stages[0].blocks[0].conv.d_state == 4


class ShiftMixer(torch.nn.Module):
    """A user token mixer: a learned scale of the tokens shifted one row down."""

    def __init__(self, dim, shift=1):
        super().__init__()
        self.shift = shift
        self.scale = torch.nn.Parameter(torch.full((dim,), 2.0))

    def forward(self, x):
        return torch.roll(x, self.shift, dims=1) * self.scale


def test_layer_factories_reach_the_blocks_unchanged():
    spec = MixerSpec("attention", {"causal": True, "num_heads": 2})
    model = small_model(token_mixer=[functools.partial(ShiftMixer, shift=2), "gated_conv", spec, spec], kernel_size=5)
    first = [stage.blocks[0].conv for stage in model.stages]
    assert type(first[0]) is ShiftMixer and first[0].shift == 2 and first[0].scale.shape == (16,)
    assert first[1].kernel_size == (5, 5)  # a name takes the model's kernel_size
    assert (first[2].causal, first[2].num_heads) == (True, 2)
    x = torch.randn(1, 3, 4, 16)
    torch.testing.assert_close(first[0](x), torch.roll(x, 2, dims=1) * 2.0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    assert MixerSpec("ssm").with_defaults(kernel_size=3)(8).conv.kernel_size == (3, 3)
    assert MixerSpec("ssm", {"kernel_size": 5}).with_defaults(kernel_size=3)(8).conv.kernel_size == (5, 5)
    with pytest.raises(
        ValueError, match=r"causal=True does not apply to token_mixer \['ShiftMixer', 'ssm', 'ssm', 'ssm'\]"
    ):
        small_model(token_mixer=[ShiftMixer, "ssm", "ssm", "ssm"], causal=True)
    with pytest.raises(ValueError, match="token_mixer 'ssm' takes no argument 'causal'"):
        MixerSpec("ssm", {"causal": True})


# The CUDA kernel


def _kernel_available() -> bool:
    return mixers.selective_scan_fn is not None and torch.cuda.is_available()


@pytest.mark.skipif(not _kernel_available(), reason="needs the mamba_ssm package and a CUDA GPU")
def test_pure_pytorch_scan_matches_the_mamba_ssm_kernel():
    torch.manual_seed(0)
    device = torch.device("cuda")
    batch, groups, channels, state, length = 2, 4, 64, 16, 300
    u = torch.randn(batch, channels, length, device=device)
    delta = torch.randn(batch, channels, length, device=device)
    A = -torch.rand(channels, state, device=device) * 8
    B = torch.randn(batch, groups, state, length, device=device)
    C = torch.randn(batch, groups, state, length, device=device)
    D, bias = torch.randn(channels, device=device), torch.randn(channels, device=device)
    kernel = mixers.selective_scan_fn(u, delta, A, B, C, D, delta_bias=bias, delta_softplus=True)
    for chunk_size in (None, 64, length):
        ours = chunked_selective_scan(u, delta, A, B, C, D, delta_bias=bias, delta_softplus=True, chunk_size=chunk_size)
        torch.testing.assert_close(ours, kernel, atol=1e-4, rtol=1e-4)

    for scan in ("raster", "bidirectional", "cross"):
        mixer = SelectiveScanMixer(32, scan=scan).to(device)
        x = torch.randn(2, 14, 14, 32, device=device)
        with torch.no_grad():
            with_kernel = mixer(x)
            mixer.use_kernel = False
            torch.testing.assert_close(mixer(x), with_kernel, atol=1e-4, rtol=1e-4)


# Kernel size as an ablation axis


@pytest.mark.parametrize("kernel_size", [1, 2, 8, 33, 7.0])
def test_gated_conv_kernel_size_must_be_odd_from_3_to_31(kernel_size):
    with pytest.raises(ValueError, match=rf"kernel_size={kernel_size!r} must be an odd integer from 3 to 31"):
        DepthwiseConvMixer(8, kernel_size=kernel_size)


@pytest.mark.parametrize("kernel_size", [3, 15, 31])
def test_gated_conv_kernel_size_reaches_every_block_and_keeps_the_token_grid(kernel_size):
    model = small_model(kernel_size=kernel_size)
    convs = [block.conv for stage in model.stages for block in stage.blocks]
    assert {conv.kernel_size for conv in convs} == {(kernel_size, kernel_size)}
    assert {conv.padding for conv in convs} == {(kernel_size // 2, kernel_size // 2)}
    x = torch.randn(1, 9, 11, 16)
    assert convs[0](x).shape == x.shape
    seven = small_model().state_dict()
    wide = model.state_dict()
    assert wide.keys() == seven.keys()  # only the depthwise weights change shape
    changed = {key for key in seven if seven[key].shape != wide[key].shape}
    mixer_weights = {key for key in seven if ".blocks." in key and key.endswith(".conv.weight")}
    assert len(mixer_weights) == sum(SMALL["depths"])
    assert changed == (mixer_weights if kernel_size != 7 else set())
