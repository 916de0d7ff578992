"""The selective scan (S6) on CPU as compiled `torch.library` operators, forward and backward.

- `mambaout_pl::selective_scan_forward` runs the scan of `mamba_ssm`'s `selective_scan_fn` (skip `D`,
  gate `z`, step-size bias and softplus) in the C++ kernel `csrc/selective_scan.cpp`: OpenMP over
  batch elements and blocks of channels, one SIMD lane per channel, the N states in registers,
  tokens in sequence. float32 and bfloat16 tensors are read as they are (other dtypes are converted
  to float32); the arithmetic is float32 and the output has `u`'s dtype.
- `mambaout_pl::selective_scan_backward` gives every input's gradient by the reverse-time
  recurrence. It keeps no [batch, channels, length, state] tensor: it recomputes the states from
  checkpoints every 32 tokens, so autograd saves only the inputs.

The kernel is compiled on first use with the machine's C++ compiler and OpenMP into the cache of
`cpu_kernels` and loaded with ctypes. Where it cannot be built, `kernel_available()` is False after
one warning and `mixers.ssm.selective_scan` runs its pure-PyTorch scan; `MAMBAOUT_PL_SCAN_KERNEL=0`
chooses that without the warning. `FlopCounterMode` counts the forward operator as
`2 * selective_scan_macs(...)` FLOPs.
"""

import ctypes
import os
import threading
import warnings
from pathlib import Path

import torch
from torch.utils.flop_counter import register_flop_formula

from .cpu_kernels import KernelUnavailableError, build_library

__all__ = [
    "KernelUnavailableError",
    "build_kernel",
    "kernel_available",
    "load_kernel",
    "selective_scan_backward",
    "selective_scan_forward",
    "selective_scan_macs",
]

SOURCE = Path(__file__).parent / "csrc" / "selective_scan.cpp"
COMPILE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=fast")
DISABLE_VARIABLE = "MAMBAOUT_PL_SCAN_KERNEL"
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def selective_scan_macs(
    batch: int, channels: int, length: int, state: int, with_D: bool = True, with_z: bool = False
) -> int:
    """Multiply-accumulates of one selective scan, as VMamba's fvcore handle counts them.

    VMamba's `flops_selective_scan_fn` (vmamba.py): 9 per token, channel and state, plus one per
    token and channel for the skip `D` and one for the gate `z`; the softplus, bias and dtype
    casts are not counted. VMamba's handle always counts `D` (`with_D=True`) and never `z`.
    """
    per_token = 9 * state + int(with_D) + int(with_z)
    return batch * channels * length * per_token


class _Tensors(ctypes.Structure):
    """The kernel's `Tensors`: data pointers, null for the absent ones."""

    _fields_ = [
        (name, ctypes.c_void_p)
        for name in (
            "u",
            "delta",
            "A",
            "B",
            "C",
            "D",
            "z",
            "delta_bias",
            "grad_out",
            "out",
            "grad_u",
            "grad_delta",
            "grad_A",
            "grad_B",
            "grad_C",
            "grad_D",
            "grad_z",
            "grad_delta_bias",
        )
    ]


class _Shape(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("batch", "channels", "length", "state", "groups")] + [
        ("softplus", ctypes.c_int32),
        ("dtype", ctypes.c_int32),
    ]


class _Kernel:
    """The loaded shared library: its entry point and the SIMD level this CPU runs."""

    def __init__(self, path: Path):
        library = ctypes.CDLL(str(path))
        self.path = path
        self.function = library.mambaout_selective_scan
        self.function.restype = ctypes.c_int
        self.function.argtypes = [ctypes.POINTER(_Tensors), ctypes.POINTER(_Shape)] + [ctypes.c_int] * 3
        library.mambaout_scan_simd_level.restype = ctypes.c_int
        self.simd_level = library.mambaout_scan_simd_level()

    def __call__(self, backward: bool, shape: _Shape, **tensors: torch.Tensor | None) -> None:
        pointers = _Tensors(**{name: None if t is None else t.data_ptr() for name, t in tensors.items()})
        status = self.function(
            ctypes.byref(pointers), ctypes.byref(shape), int(backward), self.simd_level, torch.get_num_threads()
        )
        if status == 2:
            raise MemoryError(f"selective_scan: out of memory for {shape.batch}x{shape.channels}x{shape.length}")
        if status != 0:
            raise ValueError(f"selective_scan: the kernel rejected the arguments (status {status})")


def build_kernel(compiler: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The compiled kernel's path in `cache_dir`, compiling it with `compiler` unless it is there already."""
    return build_library(SOURCE, COMPILE_FLAGS, compiler, cache_dir)


def load_kernel(compiler: str | None = None, cache_dir: str | os.PathLike | None = None) -> _Kernel:
    """Build (if needed) and load the kernel; raises `KernelUnavailableError` saying why it cannot."""
    path = build_kernel(compiler, cache_dir)
    try:
        return _Kernel(path)
    except (OSError, AttributeError) as error:
        raise KernelUnavailableError(f"cannot load {path}: {error}") from error


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
            if os.environ.get(DISABLE_VARIABLE, "1") != "0":
                try:
                    _loaded = load_kernel()
                except KernelUnavailableError as error:
                    warnings.warn(
                        f"The selective scan's CPU kernel is unavailable ({error}); CPU inputs use the "
                        "pure-PyTorch scan, many times slower. Install a C++ compiler with OpenMP (g++ or "
                        f"clang++ with libomp), or set {DISABLE_VARIABLE}=0 to silence this.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            _load_attempted = True
    return _loaded


def kernel_available() -> bool:
    """Whether the compiled kernel is loaded (building it on the first call); False also when turned off."""
    return _kernel() is not None


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """bfloat16 where every activation is bfloat16, else float32."""
    present = [t.dtype for t in tensors if t is not None]
    return torch.bfloat16 if all(d == torch.bfloat16 for d in present) else torch.float32


def _dense(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype).contiguous()


def _shape(u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, delta_softplus: bool, dtype: torch.dtype) -> _Shape:
    batch, channels, length = u.shape
    return _Shape(batch, channels, length, A.shape[1], B.shape[1], int(delta_softplus), _DTYPES[dtype])


def _loaded_kernel() -> _Kernel:
    kernel = _kernel()
    if kernel is None:
        raise KernelUnavailableError(
            f"the selective scan's CPU kernel could not be built or loaded, or {DISABLE_VARIABLE}=0"
        )
    return kernel


@torch.library.custom_op("mambaout_pl::selective_scan_forward", mutates_args=(), device_types="cpu")
def selective_scan_forward(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
) -> torch.Tensor:
    """`(C . h_t + D * u_t) * silu(z_t)` of the scan; B, C `[batch, groups, state, length]` (see `selective_scan`)."""
    kernel = _loaded_kernel()
    out_dtype, dtype = u.dtype, _compute_dtype(u, delta, B, C, z)
    u, delta, B, C, z = (_dense(t, dtype) for t in (u, delta, B, C, z))
    A, D, delta_bias = (_dense(t, torch.float32) for t in (A, D, delta_bias))
    out = torch.empty_like(u)
    tensors = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    kernel(False, _shape(u, A, B, delta_softplus, dtype), out=out, **tensors)
    return out.to(out_dtype)


@selective_scan_forward.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    return torch.empty_like(u, memory_format=torch.contiguous_format)


@torch.library.custom_op("mambaout_pl::selective_scan_backward", mutates_args=(), device_types="cpu")
def selective_scan_backward(
    grad_out: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """Gradients `(u, delta, A, B, C, D, z, delta_bias)` of `selective_scan_forward`'s output.

    u, delta and z's in the compute dtype (bfloat16 where every activation is, else float32), the
    others in float32; D's and delta_bias's whether or not they were given, z's empty without z.
    """
    kernel = _loaded_kernel()
    dtype = _compute_dtype(u, delta, B, C, z)
    grad_out, u, delta, B, C, z = (_dense(t, dtype) for t in (grad_out, u, delta, B, C, z))
    A, D, delta_bias = (_dense(t, torch.float32) for t in (A, D, delta_bias))
    grads = dict(
        grad_u=torch.empty_like(u),
        grad_delta=torch.empty_like(u),
        grad_A=torch.zeros_like(A),
        grad_B=torch.zeros(B.shape, dtype=torch.float32),
        grad_C=torch.zeros(C.shape, dtype=torch.float32),
        grad_D=torch.zeros(u.shape[1], dtype=torch.float32),
        grad_z=torch.empty_like(u) if z is not None else u.new_empty(0),
        grad_delta_bias=torch.zeros(u.shape[1], dtype=torch.float32),
    )
    tensors = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, grad_out=grad_out)
    kernel(
        True,
        _shape(u, A, B, delta_softplus, dtype),
        **tensors,
        **dict(grads, grad_z=grads["grad_z"] if z is not None else None),
    )
    return tuple(grads.values())


@selective_scan_backward.register_fake
def _(grad_out, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    dtype = _compute_dtype(u, delta, B, C, z)
    channels = u.shape[1]
    activations = u.new_empty(u.shape, dtype=dtype)
    return (
        activations,
        torch.empty_like(activations),
        A.new_empty(A.shape, dtype=torch.float32),
        B.new_empty(B.shape, dtype=torch.float32),
        C.new_empty(C.shape, dtype=torch.float32),
        u.new_empty(channels, dtype=torch.float32),
        torch.empty_like(activations) if z is not None else u.new_empty(0, dtype=dtype),
        u.new_empty(channels, dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, D, z, delta_bias, delta_softplus = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
    ctx.delta_softplus = delta_softplus


def _backward(ctx, grad_out: torch.Tensor):
    inputs = ctx.saved_tensors
    grads = selective_scan_backward(grad_out, *inputs, ctx.delta_softplus)
    return (*(None if t is None else g.to(t.dtype) for g, t in zip(grads, inputs)), None)


selective_scan_forward.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.mambaout_pl.selective_scan_forward)
def _selective_scan_flops(u_shape, delta_shape, A_shape, B_shape, C_shape, D_shape, z_shape, *args, **kwargs) -> int:
    batch, channels, length = u_shape
    macs = selective_scan_macs(batch, channels, length, A_shape[1], D_shape is not None, z_shape is not None)
    return 2 * macs
