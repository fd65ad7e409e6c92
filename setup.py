"""Builds the native weight manager (native/) as `mlxpool._native`.

Everything else is declared in pyproject.toml. The same sources are built by
native/CMakeLists.txt for the sanitizer-built C++ tests.
"""

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup

setup(
    ext_modules=[
        Pybind11Extension(
            "mlxpool._native",
            ["native/src/bindings.cpp", "native/src/mapped_file.cpp", "native/src/weight_set.cpp",
             "native/src/safetensors.cpp", "native/src/pinning.cpp", "native/src/prefetching.cpp"],
            include_dirs=["native/src"],
            cxx_std=17,
        )
    ]
)
