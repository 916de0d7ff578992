"""Compiling the project's C++ CPU kernels on first use, into a per-user cache of shared libraries.

Each kernel is one C++ file under `csrc/`, compiled with the machine's C++ compiler (`$CXX`, else
`c++`, `g++` or `clang++`) into `$MAMBAOUT_PL_CACHE/kernels` (default `~/.cache/mambaout_pl/kernels`)
and loaded with ctypes by the module that owns it.
"""

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["KernelUnavailableError", "build_library", "cache_dir", "find_compiler"]


class KernelUnavailableError(RuntimeError):
    """A kernel could not be compiled or loaded on this machine."""


def cache_dir() -> Path:
    """Where compiled kernels are kept: `$MAMBAOUT_PL_CACHE/kernels`, default `~/.cache/mambaout_pl/kernels`."""
    root = os.environ.get("MAMBAOUT_PL_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "mambaout_pl") / "kernels"


def find_compiler() -> str:
    """The C++ compiler: `$CXX` when set, else the first of c++, g++ and clang++ on PATH."""
    named = os.environ.get("CXX")
    for candidate in [named] if named else ["c++", "g++", "clang++"]:
        found = shutil.which(candidate)
        if found:
            return found
    looked_for = f"$CXX={named}" if named else "c++, g++ or clang++"
    raise KernelUnavailableError(f"no C++ compiler found ({looked_for} on PATH)")


def build_library(
    source: Path,
    flags: Sequence[str],
    compiler: str | None = None,
    directory: str | os.PathLike | None = None,
) -> Path:
    """The shared library compiled from `source` with `flags`, in `directory` (default `cache_dir()`).

    The file name holds a hash of the source, the flags and the machine architecture, so a library
    found there is reused without a compiler. A new build is written beside it and renamed into
    place, so processes building at once do not collide.
    """
    cache = Path(directory) if directory is not None else cache_dir()
    text = source.read_bytes()
    key = hashlib.sha256(text + " ".join(flags).encode() + platform.machine().encode()).hexdigest()[:16]
    target = cache / f"{source.stem}-{key}.so"
    if target.is_file():
        return target
    compiler = compiler or find_compiler()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(handle)
    except OSError as error:
        raise KernelUnavailableError(
            f"cannot write to {cache} ({error}); set MAMBAOUT_PL_CACHE to a writable folder"
        ) from error
    try:
        result = subprocess.run(
            [compiler, *flags, str(source), "-o", partial], capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            raise KernelUnavailableError(
                f"{compiler} failed on {source.name} (exit {result.returncode}): {result.stderr.strip()[-1000:]}"
            )
        os.replace(partial, target)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise KernelUnavailableError(f"{compiler} could not compile {source.name}: {error}") from error
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target
