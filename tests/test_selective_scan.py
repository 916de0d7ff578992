"""The selective scan (S6): the compiled CPU kernel, the pure-PyTorch scan and its chunks against a
per-token recurrence, forward and every gradient; the operators' registration, fallback, export and
MAC count."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from mambaout_pl.models import selective_scan_kernel as kernel_module
from mambaout_pl.models.mixers import ssm
from mambaout_pl.models.mixers.ssm import (
    SelectiveScanMixer,
    chunked_selective_scan,
    selective_scan,
    selective_scan_macs,
)

INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def recurrence(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The scan one token at a time, in float64: `h = exp(dt A) h + dt B u`, `y = (C . h + D u) silu(z)`."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, channels, length = u.shape
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    group = torch.arange(channels) // (channels // B.shape[1])  # each channel's group
    h = torch.zeros(batch, channels, A.shape[1], dtype=torch.float64)
    ys = []
    for t in range(length):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * B[:, group, :, t] * u[:, :, t, None]
        ys.append((h * C[:, group, :, t]).sum(-1))
    y = torch.stack(ys, -1)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        y = y * F.silu(z.double())
    return y


def scan_inputs(batch, channels, length, state, groups, D=True, z=True, delta_bias=True, positive=False, seed=0):
    """Float32 inputs by name; groups=0 gives 3-dim B and C; `positive` step sizes for a scan without softplus."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator) * scale

    bc_shape = (batch, groups, state, length) if groups else (batch, state, length)
    delta = randn(batch, channels, length, scale=0.5)
    bias = randn(channels, scale=0.3)
    return dict(
        u=randn(batch, channels, length),
        delta=delta.abs() if positive else delta,
        A=-(0.2 + torch.rand(channels, state, generator=generator) * 1.5),
        B=randn(*bc_shape),
        C=randn(*bc_shape),
        D=randn(channels) if D else None,
        z=randn(batch, channels, length) if z else None,
        delta_bias=(bias.abs() if positive else bias) if delta_bias else None,
    )


def value_and_gradients(scan, inputs, delta_softplus, weights, dtype=None):
    """The scan's output and the gradient of `(output * weights).sum()` for every given input (as `dtype`)."""
    leaves = {
        name: None if t is None else t.to(dtype or t.dtype, copy=True).requires_grad_() for name, t in inputs.items()
    }
    y = scan(**leaves, delta_softplus=delta_softplus)
    (y.double() * weights).sum().backward()
    return y, {name: t.grad for name, t in leaves.items() if t is not None}


@pytest.fixture(scope="module", autouse=True)
def compiled_kernel():
    """The kernel must build here: every test of the kernel path runs it, not the fallback."""
    assert kernel_module.kernel_available(), "the selective scan kernel did not build"
    return kernel_module._kernel()


@pytest.fixture
def kernel_calls(monkeypatch):
    """The arguments of each call `selective_scan` makes to the forward operator."""
    calls = []
    original = kernel_module.selective_scan_forward
    monkeypatch.setattr(kernel_module, "selective_scan_forward", lambda *args: calls.append(args) or original(*args))
    return calls


PATHS = {
    "kernel": selective_scan,
    "pytorch": chunked_selective_scan,
    "pytorch-chunks-of-5": lambda **kwargs: chunked_selective_scan(**kwargs, chunk_size=5),
}

# (batch, channels, length, state, groups): groups 1, 2, 4 and 0 (3-dim B and C); one token, odd
# lengths and lengths over the kernel's 32-token tiles; channel blocks of the SIMD width, partial
# ones, several per work item (8 x 4 items with 3 blocks each); state 1 (VMamba v2+) and 16.
SHAPES = [
    (2, 8, 1, 4, 1),
    (2, 12, 37, 4, 2),
    (1, 40, 70, 16, 4),
    (2, 20, 33, 3, 0),
    (3, 36, 65, 1, 1),
    (8, 4 * 40, 9, 2, 4),
]
OPTIONS = {
    "D-z-bias-softplus": dict(D=True, z=True, delta_bias=True, delta_softplus=True),
    "plain": dict(D=False, z=False, delta_bias=False, delta_softplus=False),
    "D-softplus": dict(D=True, z=False, delta_bias=False, delta_softplus=True),
    "z-bias": dict(D=False, z=True, delta_bias=True, delta_softplus=False),
}


@pytest.mark.parametrize("options", list(OPTIONS), ids=list(OPTIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_every_path_matches_the_recurrence_forward_and_backward(shape, options, kernel_calls):
    options = dict(OPTIONS[options])
    delta_softplus = options.pop("delta_softplus")
    inputs = scan_inputs(*shape, **options, positive=not delta_softplus)
    weights = torch.randn(shape[0], shape[1], shape[2], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected, expected_grads = value_and_gradients(recurrence, inputs, delta_softplus, weights, torch.float64)
    for path, scan in PATHS.items():
        got, grads = value_and_gradients(scan, inputs, delta_softplus, weights)
        assert got.dtype == torch.float32 and got.shape == expected.shape, path
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5, msg=lambda m, p=path: f"{p}: {m}")
        assert grads.keys() == expected_grads.keys()
        for name, grad in grads.items():
            assert grad.dtype == inputs[name].dtype and grad.shape == inputs[name].shape, (path, name)
            torch.testing.assert_close(
                grad.double(), expected_grads[name], atol=1e-5, rtol=1e-5, msg=lambda m, p=path, n=name: f"{p} {n}: {m}"
            )
    assert len(kernel_calls) == 1  # the kernel path ran the operator, the others did not


def test_every_simd_width_and_thread_count_gives_the_same_scan(compiled_kernel, monkeypatch):
    inputs = scan_inputs(2, 40, 45, 16, 2)
    weights = torch.randn(2, 40, 45, dtype=torch.float64)
    expected, expected_grads = value_and_gradients(recurrence, inputs, True, weights, torch.float64)
    for level in range(compiled_kernel.simd_level + 1):  # 128-bit, AVX2 and AVX-512 where the CPU has them
        monkeypatch.setattr(compiled_kernel, "simd_level", level)
        results = []
        for threads in (1, 2):
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                results.append(value_and_gradients(selective_scan, inputs, True, weights))
            finally:
                torch.set_num_threads(previous)
        (one, one_grads), (two, two_grads) = results
        torch.testing.assert_close(one.double(), expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(one, two)  # bitwise, whatever the number of threads
        for name in one_grads:
            torch.testing.assert_close(one_grads[name].double(), expected_grads[name], atol=1e-5, rtol=1e-5)
            assert torch.equal(one_grads[name], two_grads[name]), name


def test_bfloat16_inputs_are_read_as_they_are_and_computed_in_float32():
    inputs = {k: v if k in ("A", "D", "delta_bias") else v.bfloat16() for k, v in scan_inputs(2, 40, 40, 8, 2).items()}
    weights = torch.randn(2, 40, 40).bfloat16().double()  # the output's gradient, exact in bfloat16
    expected, expected_grads = value_and_gradients(recurrence, inputs, True, weights, torch.float64)
    got, grads = value_and_gradients(selective_scan, inputs, True, weights)
    assert got.dtype == torch.bfloat16
    # one rounding to bfloat16 (2**-8 of the value) after float32 arithmetic
    scale = expected.abs().max().item()
    assert ((got.double() - expected).abs() <= expected.abs() * 2**-8 + 1e-5 * scale).all()
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, name
        exact, scale = expected_grads[name], expected_grads[name].abs().max().item()
        assert ((grad.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-5 * scale).all(), name


@pytest.mark.parametrize(
    "dtypes",
    [dict(B=torch.bfloat16, delta_bias=torch.float64), dict(u=torch.bfloat16, z=torch.bfloat16), dict(u=torch.float16)],
    ids=["B-bf16", "u-z-bf16", "u-fp16"],
)
def test_mixed_dtypes_are_computed_in_float32_and_return_us_dtype(dtypes, kernel_calls):
    inputs = scan_inputs(1, 20, 40, 4, 1)
    mixed = {name: t.to(dtypes.get(name, t.dtype)) for name, t in inputs.items()}
    # the output's gradient, exact in bfloat16 and float16
    weights = (torch.randn(1, 20, 40, dtype=torch.float64) * 64).round().clamp(-250, 250) / 64
    expected, expected_grads = value_and_gradients(recurrence, mixed, True, weights, torch.float64)
    got, grads = value_and_gradients(selective_scan, mixed, True, weights)
    assert len(kernel_calls) == 1 and got.dtype == mixed["u"].dtype
    rounding = 2**-8 if got.dtype == torch.bfloat16 else 2**-11 if got.dtype == torch.float16 else 1e-5
    torch.testing.assert_close(got.double(), expected, atol=rounding * expected.abs().max().item(), rtol=rounding)
    for name, grad in grads.items():
        assert grad.dtype == mixed[name].dtype, name
        exact = expected_grads[name]
        tolerance = 2**-8 if grad.dtype == torch.bfloat16 else 2**-11 if grad.dtype == torch.float16 else 1e-5
        torch.testing.assert_close(grad.double(), exact, atol=tolerance * exact.abs().max().item(), rtol=tolerance)


def test_backward_saves_the_inputs_only():
    inputs = scan_inputs(2, 16, 50, 16, 2)
    leaves = {name: t.clone().requires_grad_() for name, t in inputs.items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = selective_scan(**leaves, delta_softplus=True)
    assert sorted(saved) == sorted(t.shape for t in inputs.values())  # no [batch, channels, length, state]
    y.sum().backward()
    assert all(t.grad is not None for t in leaves.values())


def test_operators_pass_opcheck():
    inputs = scan_inputs(2, 8, 11, 4, 2)
    args = [inputs[name] for name in INPUTS]
    leaves = [t.clone().requires_grad_() for t in args]
    torch.library.opcheck(kernel_module.selective_scan_forward, (*leaves, True))
    torch.library.opcheck(kernel_module.selective_scan_forward, (*args[:5], None, None, None, False))
    grad = torch.randn_like(inputs["u"])
    torch.library.opcheck(kernel_module.selective_scan_backward, (grad, *args, True))
    assert torch.ops.mambaout_pl.selective_scan_forward.default is not None
    with torch.device("meta"):
        meta = [t.to("meta") for t in args]
        assert kernel_module.selective_scan_forward(*meta, True).shape == inputs["u"].shape


@pytest.fixture
def fresh_kernel_state(monkeypatch, tmp_path):
    """The kernel module as in a new process, with an empty kernel cache."""
    monkeypatch.setattr(kernel_module, "_loaded", None)
    monkeypatch.setattr(kernel_module, "_load_attempted", False)
    monkeypatch.setenv("MAMBAOUT_PL_CACHE", str(tmp_path))
    return tmp_path


def test_turned_off_the_scan_is_the_pure_pytorch_one_without_a_warning(monkeypatch, tmp_path):
    inputs = scan_inputs(2, 12, 30, 4, 2)
    with_kernel = selective_scan(**inputs, delta_softplus=True)
    monkeypatch.setattr(kernel_module, "_loaded", None)  # as in a new process
    monkeypatch.setattr(kernel_module, "_load_attempted", False)
    monkeypatch.setenv("MAMBAOUT_PL_CACHE", str(tmp_path))
    monkeypatch.setenv("MAMBAOUT_PL_SCAN_KERNEL", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fallback = selective_scan(**inputs, delta_softplus=True)
    assert not kernel_module.kernel_available()
    assert torch.equal(fallback, chunked_selective_scan(**inputs, delta_softplus=True))
    torch.testing.assert_close(fallback, with_kernel, atol=1e-5, rtol=1e-5)
    assert not list(tmp_path.rglob("*.so"))
    with FlopCounterMode(display=False) as counter:  # the meta device still counts the scan, without a kernel
        meta = selective_scan(**{name: t.to("meta") for name, t in inputs.items()}, delta_softplus=True)
    assert meta.shape == fallback.shape and counter.get_total_flops() == 2 * selective_scan_macs(
        2, 12, 30, 4, with_z=True
    )
    with pytest.raises(kernel_module.KernelUnavailableError, match="MAMBAOUT_PL_SCAN_KERNEL=0"):
        kernel_module.selective_scan_forward(*(inputs[name] for name in INPUTS), True)


def test_without_a_compiler_one_warning_and_the_pure_pytorch_scan(fresh_kernel_state, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    inputs = scan_inputs(1, 8, 12, 4, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = selective_scan(**inputs, delta_softplus=True)
        second = selective_scan(**inputs, delta_softplus=True)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "no C++ compiler found ($CXX=/nonexistent/c++" in messages[0] and "MAMBAOUT_PL_SCAN_KERNEL=0" in messages[0]
    expected = chunked_selective_scan(**inputs, delta_softplus=True)
    assert torch.equal(first, expected) and torch.equal(second, expected)


class ScanModule(torch.nn.Module):
    def __init__(self, channels, state, groups):
        super().__init__()
        self.A_log = torch.nn.Parameter(torch.rand(channels, state))
        self.D = torch.nn.Parameter(torch.randn(channels))
        self.groups, self.state = groups, state

    def forward(self, u, delta, bc, z):
        B, C = bc.unflatten(1, (self.groups, 2 * self.state)).chunk(2, dim=2)
        A = -torch.exp(self.A_log)
        return selective_scan(u, delta, A, B, C, D=self.D, z=z, delta_softplus=True)


def test_exported_graphs_hold_the_pure_pytorch_scan(kernel_calls):
    torch.manual_seed(0)
    module = ScanModule(8, 4, 2)
    args = (torch.randn(2, 8, 6), torch.randn(2, 8, 6), torch.randn(2, 16, 6), torch.randn(2, 8, 6))
    exported = torch.export.export(module, args)
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert not [t for t in targets if "mambaout_pl" in t], targets
    assert not kernel_calls
    eager = module(*args)
    assert len(kernel_calls) == 1  # outside the export, the same module runs the kernel
    torch.testing.assert_close(exported.module()(*args), eager, atol=1e-5, rtol=1e-5)


def test_tracing_predicates_choose_the_pure_pytorch_scan(kernel_calls, monkeypatch):
    inputs = scan_inputs(1, 8, 5, 2, 1)
    for predicate in ("torch.compiler.is_compiling", "torch.jit.is_tracing", "torch.onnx.is_in_onnx_export"):
        with monkeypatch.context() as patched:
            patched.setattr(predicate, lambda: True)
            assert torch.equal(selective_scan(**inputs), chunked_selective_scan(**inputs)), predicate
    assert not kernel_calls


@pytest.mark.parametrize("with_D, with_z", [(True, False), (False, False), (True, True), (False, True)])
def test_flop_counter_counts_two_flops_per_mac(with_D, with_z):
    batch, channels, length, state = 2, 12, 10, 4
    inputs = scan_inputs(batch, channels, length, state, 3, D=with_D, z=with_z)
    with FlopCounterMode(display=False) as counter:
        selective_scan(**inputs, delta_softplus=True)
    macs = selective_scan_macs(batch, channels, length, state, with_D=with_D, with_z=with_z)
    assert counter.get_total_flops() == 2 * macs
    # VMamba's flops_selective_scan_fn: 9 B L D N, plus B D L for D and for z
    assert macs == 9 * batch * length * channels * state + (with_D + with_z) * batch * channels * length


def test_the_mamba_ssm_kernel_gets_cuda_inputs_in_its_own_order(monkeypatch):
    """A double of `mamba_ssm`'s CUDA `selective_scan_fn` (it cannot run here): the arguments it is given."""
    inputs = scan_inputs(1, 8, 6, 2, 2)
    calls = []

    def cuda_kernel(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        calls.append(dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, softplus=delta_softplus))
        return torch.zeros_like(u)

    monkeypatch.setattr(ssm, "selective_scan_fn", cuda_kernel)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    inputs["u"] = inputs["u"].bfloat16()
    out = selective_scan(**inputs, delta_softplus=True)
    monkeypatch.undo()
    assert out.dtype == torch.bfloat16 and len(calls) == 1
    call = calls[0]
    assert call.pop("softplus") is True
    for name, value in call.items():
        assert value.dtype == torch.float32 and torch.equal(value, inputs[name].float()), name


def test_bad_shapes_name_the_arguments():
    inputs = scan_inputs(2, 12, 10, 4, 2)
    with pytest.raises(ValueError, match=r"delta \(2, 12, 9\) must have the shape of u, \(2, 12, 10\)"):
        selective_scan(**dict(inputs, delta=inputs["delta"][..., :9]))
    with pytest.raises(ValueError, match=r"A \(11, 4\) must be \[channels, state\] with u's 12 channels"):
        selective_scan(**dict(inputs, A=inputs["A"][:11]))
    with pytest.raises(ValueError, match=r"B \(2, 2, 4, 9\) and C \(2, 2, 4, 10\)"):
        selective_scan(**dict(inputs, B=inputs["B"][..., :9]))
    with pytest.raises(ValueError, match="5 groups of B and C must divide the 12 channels"):
        selective_scan(
            **dict(inputs, B=inputs["B"][:, :1].expand(2, 5, 4, 10), C=inputs["C"][:, :1].expand(2, 5, 4, 10))
        )
    with pytest.raises(ValueError, match=r"delta_bias \(11,\) must be \[channels\] = \[12\]"):
        selective_scan(**dict(inputs, delta_bias=inputs["delta_bias"][:11]))


@pytest.mark.parametrize("scan", ["raster", "cross"])
def test_ssm_mixer_on_cpu_runs_the_kernel_with_the_pure_pytorch_results(scan, kernel_calls):
    torch.manual_seed(0)
    mixer = SelectiveScanMixer(12, scan=scan, kernel_size=3, d_state=4)
    x = torch.randn(2, 5, 7, 12)
    outputs, grads = [], []
    for use_kernel in (True, False):
        mixer.use_kernel = use_kernel
        x_leaf = x.clone().requires_grad_()
        out = mixer(x_leaf)
        out.square().sum().backward()
        outputs.append(out)
        grads.append([x_leaf.grad] + [p.grad.clone() for p in mixer.parameters()])
        mixer.zero_grad()
    assert len(kernel_calls) == 1
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    for with_kernel, pure in zip(*grads):
        torch.testing.assert_close(with_kernel, pure, atol=1e-5, rtol=1e-5)
