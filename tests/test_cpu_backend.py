"""Which llama.cpp CPU backend a node runs (native build, or a portable build's variant)."""

from __future__ import annotations

from node_agent.runtime import cpu_backend

MAPS = """\
7f00-7f01 r-xp 00000000 08:01 1 /opt/ef/llama_cpp/lib/libggml-base.so
7f02-7f03 r-xp 00000000 08:01 2 /opt/ef/llama_cpp/lib/libggml-cpu-haswell.so
"""


def test_the_loaded_variant_is_read_from_the_process_maps():
    assert cpu_backend.loaded_variant(MAPS) == "haswell"
    assert cpu_backend.loaded_variant("7f00-7f01 r-xp 0 0 1 /usr/lib/libc.so.6\n") is None


def test_variants_are_the_cpu_libraries_a_portable_build_ships(tmp_path):
    for name in ("libggml.so", "libggml-base.so", "libggml-cpu-x64.so", "libggml-cpu-haswell.so"):
        (tmp_path / name).write_bytes(b"")
    assert cpu_backend.variants(tmp_path) == ["haswell", "x64"]
    assert cpu_backend.variants(tmp_path / "none") == []


def test_this_install_reports_its_backend():
    # The dev install is a native build; a portable one names the variant it loaded.
    chosen = cpu_backend.ensure_loaded()
    assert chosen == "native" if not cpu_backend.variants() else chosen in cpu_backend.variants()
    if cpu_backend.variants():
        # llama.cpp's own backend registry (the libggml libllama linked) has the
        # CPU device: models load ("no backends are loaded" otherwise).
        import ctypes

        import llama_cpp

        lib = llama_cpp.llama_cpp._lib
        lib.ggml_backend_dev_count.restype = ctypes.c_size_t
        assert lib.ggml_backend_dev_count() >= 1
