"""Backward of the Gated CNN block's depthwise convolution on CPU, at the rate of its forward.

oneDNN computes the weight gradient of a depthwise k x k convolution about ten times slower than
the convolution itself on CPU, although it has the same multiply-adds. Here:

- the weight gradient is `mambaout_pl::depthwise_conv2d_weight_grad`, a `torch.library` operator
  whose CPU kernel (`csrc/depthwise_conv2d_weight_grad.cpp`) is compiled on first use with the
  machine's C++ compiler (`$CXX`, else `c++`, `g++` or `clang++`) and OpenMP into
  `$MAMBAOUT_PL_CACHE/kernels` (default `~/.cache/mambaout_pl/kernels`), then loaded with ctypes;
- the input gradient is the forward convolution of the output gradient with the flipped kernel
  (stride 1, padding k // 2), which oneDNN runs at the forward's rate.

Where the kernel cannot be built or loaded (no compiler, no OpenMP, another platform) the weight
gradient comes from `aten.convolution_backward`, after one warning; `MAMBAOUT_PL_DEPTHWISE_KERNEL=0`
chooses that path without the warning. The kernel covers the odd sizes `KERNEL_SIZES` (3 to 15);
a larger odd kernel takes its weight gradient from `aten.convolution_backward`, after one warning
per size. Other devices (CUDA: cuDNN), dtypes and even kernel sizes run `aten.convolution_backward`
whole.
"""

import ctypes
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from .cpu_kernels import KernelUnavailableError, build_library

__all__ = [
    "KERNEL_SIZES",
    "KernelUnavailableError",
    "build_kernel",
    "depthwise_conv2d_backward",
    "depthwise_conv2d_weight_grad",
    "kernel_disabled",
    "load_kernel",
]

KERNEL_SIZES = (3, 5, 7, 9, 11, 13, 15)
SOURCE = Path(__file__).parent / "csrc" / "depthwise_conv2d_weight_grad.cpp"
COMPILE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp")
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


class _Kernel:
    """The loaded shared library: its entry point and the SIMD level this CPU runs."""

    def __init__(self, path: Path):
        library = ctypes.CDLL(str(path))
        self.path = path
        self.function = library.mambaout_depthwise_conv2d_weight_grad
        self.function.restype = ctypes.c_int
        self.function.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_int64] * 4 + [ctypes.c_int] * 3
        library.mambaout_simd_level.restype = ctypes.c_int
        self.simd_level = library.mambaout_simd_level()

    def __call__(self, grad_output: torch.Tensor, input: torch.Tensor, kernel_size: int, out: torch.Tensor) -> None:
        batch, channels, height, width = input.shape
        status = self.function(
            grad_output.data_ptr(),
            input.data_ptr(),
            out.data_ptr(),
            _DTYPES[input.dtype],
            batch,
            height,
            width,
            channels,
            kernel_size,
            self.simd_level,
            torch.get_num_threads(),
        )
        if status == 2:
            raise MemoryError(f"depthwise_conv2d_weight_grad: out of memory for input {tuple(input.shape)}")
        if status != 0:
            raise ValueError(f"depthwise_conv2d_weight_grad: unsupported kernel size {kernel_size} or dtype")


def build_kernel(compiler: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The compiled kernel's path in `cache_dir`, compiling it with `compiler` unless it is there already.

    See `cpu_kernels.build_library`: reused from the cache by a hash of source, flags and machine.
    """
    return build_library(SOURCE, COMPILE_FLAGS, compiler, cache_dir)


def load_kernel(compiler: str | None = None, cache_dir: str | os.PathLike | None = None) -> _Kernel:
    """Build (if needed) and load the kernel; raises `KernelUnavailableError` saying why it cannot."""
    path = build_kernel(compiler, cache_dir)
    try:
        return _Kernel(path)
    except (OSError, AttributeError) as error:
        raise KernelUnavailableError(f"cannot load {path}: {error}") from error


_disabled = False
_loaded: _Kernel | None = None
_load_attempted = False
_load_lock = threading.Lock()


def _kernel() -> _Kernel | None:
    """The process's kernel, loaded on first call; None, after one warning, where it cannot be."""
    global _loaded, _load_attempted
    if _load_attempted:
        return _loaded
    with _load_lock:
        if not _load_attempted:
            if os.environ.get("MAMBAOUT_PL_DEPTHWISE_KERNEL", "1") != "0":
                try:
                    _loaded = load_kernel()
                except KernelUnavailableError as error:
                    warnings.warn(
                        f"The depthwise convolution's weight-gradient kernel is unavailable ({error}); "
                        "training on CPU uses oneDNN's, several times slower. Install a C++ compiler with "
                        "OpenMP (g++ or clang++ with libomp), or set MAMBAOUT_PL_DEPTHWISE_KERNEL=0 to "
                        "silence this.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            _load_attempted = True
    return _loaded


@contextmanager
def kernel_disabled() -> Iterator[None]:
    """Within the block, the weight gradient comes from `aten.convolution_backward` (as without the kernel)."""
    global _disabled
    previous, _disabled = _disabled, True
    try:
        yield
    finally:
        _disabled = previous


@torch.library.custom_op("mambaout_pl::depthwise_conv2d_weight_grad", mutates_args=(), device_types="cpu")
def depthwise_conv2d_weight_grad(grad_output: torch.Tensor, input: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Weight gradient [C, 1, k, k] of `conv2d(input, weight, padding=k // 2, groups=C)`, accumulated in float32.

    `grad_output` and `input` are [B, C, H, W] float32 or bfloat16 tensors, fastest in channels-last
    memory (other layouts are copied to it).
    """
    kernel = _kernel()
    if kernel is None:
        raise KernelUnavailableError("the weight-gradient kernel could not be built or loaded (see the warning)")
    if grad_output.shape != input.shape or grad_output.dtype != input.dtype or input.dtype not in _DTYPES:
        raise ValueError(
            f"grad_output {tuple(grad_output.shape)} {grad_output.dtype} and input {tuple(input.shape)} "
            f"{input.dtype} must have one shape and dtype, float32 or bfloat16"
        )
    if kernel_size not in KERNEL_SIZES:
        raise ValueError(f"kernel_size={kernel_size}: the kernel covers {KERNEL_SIZES}")
    grad_output = grad_output.contiguous(memory_format=torch.channels_last)
    input = input.contiguous(memory_format=torch.channels_last)
    out = torch.empty(input.shape[1], 1, kernel_size, kernel_size, dtype=torch.float32)
    kernel(grad_output, input, kernel_size, out)
    return out.to(input.dtype)


@depthwise_conv2d_weight_grad.register_fake
def _(grad_output: torch.Tensor, input: torch.Tensor, kernel_size: int) -> torch.Tensor:
    return input.new_empty(input.shape[1], 1, kernel_size, kernel_size)


def _cpu_paths_apply(input: torch.Tensor, weight: torch.Tensor, padding: int) -> bool:
    kernel_size = weight.shape[-1]
    return (
        input.device.type == "cpu"
        and input.dtype in _DTYPES
        and weight.shape[-2] == kernel_size
        and kernel_size % 2 == 1
        and padding == kernel_size // 2
    )


_warned_sizes: set[int] = set()


def _kernel_covers(kernel_size: int) -> bool:
    """Whether the compiled kernel computes this size; beyond `KERNEL_SIZES`, False after one warning per size."""
    if kernel_size in KERNEL_SIZES:
        return True
    if kernel_size not in _warned_sizes:
        _warned_sizes.add(kernel_size)
        warnings.warn(
            f"The depthwise convolution's weight-gradient kernel covers kernel sizes {KERNEL_SIZES[0]} to "
            f"{KERNEL_SIZES[-1]}; a {kernel_size}x{kernel_size} kernel's comes from oneDNN on CPU, several times "
            "slower.",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def _aten_backward(
    grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, padding: int, output_mask: Sequence[bool]
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    channels = input.shape[1]
    return torch.ops.aten.convolution_backward(
        grad_output,
        input,
        weight,
        [channels] if output_mask[2] else None,
        [1, 1],
        [padding, padding],
        [1, 1],
        False,
        [0, 0],
        channels,
        list(output_mask),
    )


def depthwise_conv2d_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    padding: int,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """`(grad_input, grad_weight, grad_bias)` of `conv2d(input, weight, bias, padding=padding, groups=C)`.

    The same results as `aten.convolution_backward` for a depthwise convolution with stride 1, as
    `output_mask` asks for them; on CPU through the faster paths above where they apply.
    """
    if not _cpu_paths_apply(input, weight, padding):
        return _aten_backward(grad_output, input, weight, padding, output_mask)
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        grad_input = F.conv2d(grad_output, weight.flip((-2, -1)), padding=padding, groups=input.shape[1])
    if output_mask[1] and not _disabled and _kernel() is not None and _kernel_covers(weight.shape[-1]):
        grad_weight = depthwise_conv2d_weight_grad(grad_output, input, weight.shape[-1])
    elif output_mask[1]:
        _, grad_weight, grad_bias = _aten_backward(grad_output, input, weight, padding, (False, True, output_mask[2]))
    if output_mask[2] and grad_bias is None:
        grad_bias = grad_output.sum((0, 2, 3))
    return grad_input, grad_weight, grad_bias
