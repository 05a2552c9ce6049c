"""Builds torch_ep._C by driving CMake.

`pip install --no-build-isolation .` (or `-e .`): the build must see the torch that will run it,
so build isolation stays off. With a CUDA torch and nvcc the CUDA sources are built as well.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _cmake_binary() -> str:
    try:  # the PyPI cmake package, when present, is preferred over an old system cmake
        import cmake

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        found = shutil.which("cmake")
        if not found:
            raise RuntimeError("cmake not found: pip install cmake")
        return found


def _nvshmem_root(with_cuda: str) -> str:
    """The nvidia/nvshmem folder of the nvidia-nvshmem-cu13 wheel (torch's own NVSHMEM), or "".

    TORCH_EP_WITH_NVSHMEM=0 leaves it out; =1 makes its absence an error; unset: used when found.
    Only CUDA builds take it."""
    wanted = os.environ.get("TORCH_EP_WITH_NVSHMEM")
    if wanted == "0" or with_cuda != "ON":
        if wanted == "1":
            raise RuntimeError("TORCH_EP_WITH_NVSHMEM=1 needs a CUDA build (a CUDA torch and nvcc)")
        return ""
    try:
        import nvidia.nvshmem

        roots = [Path(p) for p in nvidia.nvshmem.__path__]
    except ImportError:
        roots = []
    for root in roots:
        needed = [root / "include" / "nvshmem.h", root / "lib" / "libnvshmem_host.so.3",
                  root / "lib" / "libnvshmem_device.a"]
        if all(p.exists() for p in needed):
            return str(root)
    if wanted == "1":
        raise RuntimeError("TORCH_EP_WITH_NVSHMEM=1, but no nvidia-nvshmem-cu13 wheel with headers, "
                           "libnvshmem_host.so.3 and libnvshmem_device.a is importable (pip install nvidia-nvshmem-cu13)")
    return ""


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import torch
        import torch.utils

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        with_cuda = os.environ.get("TORCH_EP_WITH_CUDA")
        if with_cuda is None:
            with_cuda = "ON" if (torch.version.cuda and shutil.which("nvcc")) else "OFF"
        cfg = "Debug" if self.debug else os.environ.get("TORCH_EP_BUILD_TYPE", "Release")
        generator = "ninja" if shutil.which("ninja") else "make"
        # A CMake build folder in the tree, one per configuration, kept between builds: pip's
        # editable builds run in a fresh temporary folder each time, and a second install (the
        # README's test command after its demo command) would otherwise compile everything again.
        key = f"{sys.implementation.cache_tag}-torch{torch.__version__}-{cfg}-cuda{with_cuda}-{generator}"
        build_temp = ROOT / "build" / "cmake" / key.replace("+", "_")
        build_temp.mkdir(parents=True, exist_ok=True)

        args = [
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DTORCH_EP_WITH_CUDA={with_cuda}",
        ]
        nvshmem = _nvshmem_root(with_cuda)
        args += [f"-DTORCH_EP_WITH_NVSHMEM={'ON' if nvshmem else 'OFF'}", f"-DTORCH_EP_NVSHMEM_ROOT={nvshmem}"]
        if generator == "ninja":
            args.append("-GNinja")
        cmake = _cmake_binary()
        subprocess.check_call([cmake, str(ROOT), *args], cwd=build_temp)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
        subprocess.check_call([cmake, "--build", ".", "--parallel", jobs], cwd=build_temp)


setup(
    ext_modules=[CMakeExtension("torch_ep._C")],
    cmdclass={"build_ext": CMakeBuild},
)
