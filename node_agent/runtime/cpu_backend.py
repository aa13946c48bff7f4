"""Which llama.cpp CPU backend this node runs, and loading it in a portable build.

A native build (the default dev install) compiles llama.cpp for this machine's
CPU (``-march=native``) and links its CPU backend in. A portable build (the
offline bundle's: ``GGML_NATIVE=OFF GGML_BACKEND_DL=ON GGML_CPU_ALL_VARIANTS=ON``)
ships one CPU backend per instruction-set level (x64, sse42, haswell,
skylakex, icelake, alderlake, ...) as ``libggml-cpu-<variant>.so`` next to
libggml; nothing is registered until ggml loads them, and ggml then picks the
best variant this CPU supports (``ggml_backend_load_best`` scores each one).
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import llama_cpp

log = logging.getLogger(__name__)

_chosen: str | None = None


def library_dir() -> Path:
    return Path(llama_cpp.__file__).parent / "lib"


def variants(lib_dir: Path | None = None) -> list[str]:
    """The CPU variants a portable build ships (empty for a native build)."""
    found = sorted((lib_dir or library_dir()).glob("libggml-cpu-*.so"))
    return [path.name.removeprefix("libggml-cpu-").removesuffix(".so") for path in found]


def loaded_variant(maps: str) -> str | None:
    """The variant whose library is mapped into this process (``/proc/self/maps``)."""
    for line in maps.splitlines():
        name = line.rsplit("/", 1)[-1]
        if name.startswith("libggml-cpu-") and name.endswith(".so"):
            return name.removeprefix("libggml-cpu-").removesuffix(".so")
    return None


def ensure_loaded() -> str:
    """Load the best CPU variant of a portable build (once); returns what runs:
    a variant name, or "native" for a build made for this machine's CPU."""
    global _chosen
    if _chosen is not None:
        return _chosen
    lib_dir = library_dir()
    if not variants(lib_dir):
        _chosen = "native"
        return _chosen
    # Through libllama's own handle: the symbol then resolves in the libggml
    # that libllama linked (libggml.so.0). A wheel holds libggml.so and
    # libggml.so.0 as two copies (no symlinks in wheels); loading the first by
    # name would fill a second backend registry that llama.cpp never sees
    # ("no backends are loaded").
    ggml = llama_cpp.llama_cpp._lib
    ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_load_all_from_path.restype = None
    ggml.ggml_backend_load_all_from_path(str(lib_dir).encode())
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    _chosen = loaded_variant(maps) or "unknown"
    log.info("llama.cpp CPU backend: %s (portable build, of %s)", _chosen, ", ".join(variants()))
    return _chosen
