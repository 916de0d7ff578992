"""The depthwise convolution's backward on CPU: the compiled weight-gradient kernel, the flipped-kernel
input gradient, and the fallback to `aten.convolution_backward` where the kernel cannot be built."""

from __future__ import annotations

import warnings

import pytest
import torch

from mambaout_pl.models import depthwise_conv_backward as dw
from mambaout_pl.models.mambaout import GatedCNNBlock

# (batch, channels, height, width, kernel): MambaOut's stages, channel counts off the SIMD width,
# images smaller than the kernel, batch 1, every kernel size the kernel covers.
SHAPES = [
    (2, 48, 56, 56, 7),
    (3, 96, 14, 14, 7),
    (2, 288, 7, 7, 7),
    (1, 20, 9, 13, 7),
    (2, 37, 3, 5, 7),
    (1, 5, 1, 1, 7),
    (2, 24, 11, 10, 3),
    (2, 24, 11, 10, 5),
    (2, 24, 11, 10, 9),
    (2, 24, 11, 10, 11),
]


def channels_last_pair(batch, channels, height, width, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    grad, x = (
        torch.randn(batch, channels, height, width, generator=generator)
        .to(dtype)
        .contiguous(memory_format=torch.channels_last)
        for _ in range(2)
    )
    return grad, x


def exact_weight_grad(grad, x, kernel):
    """The weight gradient of the tensors' values in float64: exact products, nearly exact sums."""
    shape = (x.shape[1], 1, kernel, kernel)
    return torch.nn.grad.conv2d_weight(x.double(), shape, grad.double(), padding=kernel // 2, groups=x.shape[1])


def assert_relative_close(actual, expected, rtol):
    """Equal within `rtol` of each element, or of the largest magnitude for elements near zero."""
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=rtol * expected.abs().max().item())


@pytest.fixture(scope="module")
def kernel():
    return dw.load_kernel()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_weight_grad_equals_conv2d_weight_in_float32(shape):
    batch, channels, height, width, kernel = shape
    grad, x = channels_last_pair(batch, channels, height, width)
    got = dw.depthwise_conv2d_weight_grad(grad, x, kernel)
    assert got.shape == (channels, 1, kernel, kernel) and got.dtype == torch.float32
    assert_relative_close(got, exact_weight_grad(grad, x, kernel), rtol=1e-5)
    expected = torch.nn.grad.conv2d_weight(x, got.shape, grad, padding=kernel // 2, groups=channels)
    assert_relative_close(got, expected, rtol=1e-5)


@pytest.mark.parametrize("shape", [(4, 48, 56, 56, 7), (2, 40, 7, 9, 7), (3, 24, 11, 10, 5)], ids=str)
def test_bfloat16_weight_grad_accumulates_in_float32(shape):
    batch, channels, height, width, kernel = shape
    grad, x = channels_last_pair(batch, channels, height, width, torch.bfloat16)
    got = dw.depthwise_conv2d_weight_grad(grad, x, kernel)
    assert got.dtype == torch.bfloat16
    exact = exact_weight_grad(grad, x, kernel)
    # one rounding to bfloat16 at the end (half a unit: 2**-8 of the value) after float32 sums
    assert ((got.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-5 * exact.abs().max()).all()


def test_every_simd_width_and_thread_count_gives_the_same_sums(kernel, monkeypatch):
    grad, x = channels_last_pair(3, 40, 15, 12)
    expected = exact_weight_grad(grad, x, 7)
    results = []
    for level in range(kernel.simd_level + 1):
        monkeypatch.setattr(kernel, "simd_level", level)
        for threads in (1, 2):
            out = torch.empty(40, 1, 7, 7)
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                kernel(grad, x, 7, out)
            finally:
                torch.set_num_threads(previous)
            assert_relative_close(out, expected, rtol=1e-5)
            results.append(out)
    for level_results in zip(results[::2], results[1::2]):  # bitwise the same for 1 and 2 threads
        assert torch.equal(*level_results)


def test_layouts_other_than_channels_last_give_the_same_gradient():
    grad, x = channels_last_pair(2, 24, 9, 8)
    expected = dw.depthwise_conv2d_weight_grad(grad, x, 7)
    torch.testing.assert_close(dw.depthwise_conv2d_weight_grad(grad.contiguous(), x.contiguous(), 7), expected)


def test_operator_is_registered_with_torch_library():
    grad, x = channels_last_pair(2, 16, 6, 5)
    assert torch.ops.mambaout_pl.depthwise_conv2d_weight_grad.default is not None
    torch.testing.assert_close(
        torch.ops.mambaout_pl.depthwise_conv2d_weight_grad(grad, x, 7), dw.depthwise_conv2d_weight_grad(grad, x, 7)
    )
    torch.library.opcheck(dw.depthwise_conv2d_weight_grad, (grad, x, 7))
    with torch.device("meta"):
        assert dw.depthwise_conv2d_weight_grad(grad.to("meta"), x.to("meta"), 7).shape == (16, 1, 7, 7)


@pytest.mark.parametrize("kernel_disabled", [False, True], ids=["kernel", "aten-weight-grad"])
@pytest.mark.parametrize("mask", [(True, True, True), (True, True, False), (False, True, True), (True, False, False)])
def test_backward_equals_aten_convolution_backward(mask, kernel_disabled):
    grad, x = channels_last_pair(2, 40, 13, 11)
    weight = torch.randn(40, 1, 7, 7)
    expected = torch.ops.aten.convolution_backward(
        grad, x, weight, [40], [1, 1], [3, 3], [1, 1], False, [0, 0], 40, list(mask)
    )
    if kernel_disabled:
        with dw.kernel_disabled():
            got = dw.depthwise_conv2d_backward(grad, x, weight, 3, mask)
    else:
        got = dw.depthwise_conv2d_backward(grad, x, weight, 3, mask)
    for name, g, e, wanted in zip(("input", "weight", "bias"), got, expected, mask):
        if not wanted:
            assert g is None, name
            continue
        assert g.shape == e.shape and g.dtype == e.dtype, name
        assert_relative_close(g, e, rtol=1e-5)
    if mask[0]:
        assert got[0].is_contiguous(memory_format=torch.channels_last)  # the fused block reshapes it without a copy


def test_bfloat16_backward_matches_aten_within_one_rounding():
    grad, x = channels_last_pair(2, 48, 28, 28, torch.bfloat16)
    weight = torch.randn(48, 1, 7, 7).to(torch.bfloat16)
    mask = [True, True, True]
    got = dw.depthwise_conv2d_backward(grad, x, weight, 3, mask)
    expected = torch.ops.aten.convolution_backward(
        grad, x, weight, [48], [1, 1], [3, 3], [1, 1], False, [0, 0], 48, mask
    )
    for g, e in zip(got, expected):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), e.float(), rtol=2**-7, atol=2**-7 * e.abs().max().item())


def fused_block_gradients(block, x):
    x = x.clone().requires_grad_()
    out = block(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {"input": x.grad, **{name: p.grad for name, p in block.named_parameters()}}
    block.zero_grad(set_to_none=True)
    return grads


@pytest.fixture
def fresh_kernel_state(monkeypatch, tmp_path):
    """The module as in a new process, with an empty kernel cache."""
    monkeypatch.setattr(dw, "_loaded", None)
    monkeypatch.setattr(dw, "_load_attempted", False)
    monkeypatch.setenv("MAMBAOUT_PL_CACHE", str(tmp_path))
    return tmp_path


def test_without_a_compiler_the_block_warns_once_and_trains_on_aten(fresh_kernel_state, monkeypatch):
    torch.manual_seed(0)
    fused = GatedCNNBlock(32)
    plain = GatedCNNBlock(32, fused=False)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 9, 10, 32)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = fused_block_gradients(fused, x)
        second = fused_block_gradients(fused, x)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "no C++ compiler found ($CXX=/nonexistent/c++" in messages[0]
    assert "MAMBAOUT_PL_DEPTHWISE_KERNEL=0" in messages[0]
    assert not list(fresh_kernel_state.rglob("*.so"))
    expected = fused_block_gradients(plain, x)
    for name, grad in expected.items():
        torch.testing.assert_close(first[name], grad, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close(second[name], first[name], atol=0, rtol=0)
    with pytest.raises(dw.KernelUnavailableError, match="could not be built"):
        dw.depthwise_conv2d_weight_grad(*channels_last_pair(1, 8, 4, 4), 7)


def test_a_failing_compiler_is_named_with_its_error(tmp_path):
    fake = tmp_path / "broken-c++"
    fake.write_text("#!/bin/sh\necho 'fatal error: omp.h: No such file or directory' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(dw.KernelUnavailableError, match=r"broken-c\+\+ failed on .*\(exit 1\): fatal error: omp.h"):
        dw.build_kernel(compiler=str(fake), cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())  # nothing half-written left behind


def test_the_kernel_can_be_turned_off_without_a_warning(fresh_kernel_state, monkeypatch):
    monkeypatch.setenv("MAMBAOUT_PL_DEPTHWISE_KERNEL", "0")
    block = GatedCNNBlock(16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_block_gradients(block, torch.randn(1, 5, 6, 16))
    assert dw._kernel() is None
    assert not list(fresh_kernel_state.rglob("*.so"))


def test_the_kernel_is_built_once_into_the_cache_and_reused(fresh_kernel_state):
    path = dw.build_kernel()
    assert path.parent == fresh_kernel_state / "kernels" and path.suffix == ".so"
    modified = path.stat().st_mtime_ns
    assert dw.build_kernel(compiler="/nonexistent/c++") == path  # found in the cache: no compiler needed
    assert path.stat().st_mtime_ns == modified
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_fused_block_uses_the_kernel_and_matches_aten_under_bf16_autocast(monkeypatch):
    torch.manual_seed(0)
    block = GatedCNNBlock(48)
    x = torch.randn(2, 14, 14, 48)
    calls = []
    original = dw.depthwise_conv2d_weight_grad
    monkeypatch.setattr(
        dw, "depthwise_conv2d_weight_grad", lambda *args: calls.append(args[0].dtype) or original(*args)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = fused_block_gradients(block, x)
    assert calls == [torch.bfloat16]
    with dw.kernel_disabled(), torch.autocast("cpu", dtype=torch.bfloat16):
        aten = fused_block_gradients(block, x)
    for name, grad in aten.items():
        assert ours[name].dtype == grad.dtype, name
        torch.testing.assert_close(ours[name], grad, rtol=2**-7, atol=2**-7 * grad.abs().max().item())


# Kernel size as an ablation axis: the kernel covers the odd sizes 3-15, larger ones fall back to oneDNN.


@pytest.mark.parametrize("kernel", [13, 15])
def test_the_large_kernels_weight_grad_equals_conv2d_weight(kernel):
    grad, x = channels_last_pair(2, 20, 17, 12)  # wider than the 13 and 15 kernels, 20 channels off the SIMD width
    got = dw.depthwise_conv2d_weight_grad(grad, x, kernel)
    assert got.shape == (20, 1, kernel, kernel)
    assert_relative_close(got, exact_weight_grad(grad, x, kernel), rtol=1e-5)


def test_kernels_beyond_the_compiled_sizes_warn_once_and_match_aten(monkeypatch):
    monkeypatch.setattr(dw, "_warned_sizes", set())
    grad, x = channels_last_pair(2, 12, 9, 21)
    mask = [True, True, True]
    for kernel in (15, 17):
        weight = torch.randn(12, 1, kernel, kernel)
        padding = kernel // 2
        expected = torch.ops.aten.convolution_backward(
            grad, x, weight, [12], [1, 1], [padding, padding], [1, 1], False, [0, 0], 12, mask
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = dw.depthwise_conv2d_backward(grad, x, weight, padding, mask)
            second = dw.depthwise_conv2d_backward(grad, x, weight, padding, mask)
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        if kernel == 15:
            assert messages == []
        else:
            assert len(messages) == 1 and "a 17x17 kernel's comes from oneDNN" in messages[0], messages
        for got in (first, second):
            for g, e in zip(got, expected):
                assert_relative_close(g, e, rtol=1e-5)


def test_fused_block_with_a_15x15_kernel_trains_as_the_plain_module_code():
    torch.manual_seed(0)
    fused = GatedCNNBlock(24, kernel_size=15)
    plain = GatedCNNBlock(24, kernel_size=15, fused=False)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 10, 17, 24)
    expected = fused_block_gradients(plain, x)
    got = fused_block_gradients(fused, x)
    assert got["conv.weight"].shape == (24, 1, 15, 15)
    for grad, reference in zip(got.values(), expected.values()):
        assert_relative_close(grad, reference, rtol=1e-5)
