"""Builds dagan_fast: the Python package plus one compiled op library, through CMakeLists.txt.

Environment switches: DAGAN_FAST_CUDA=0/1 (default: build CUDA kernels when nvcc is found),
DAGAN_FAST_CUDA_ARCHS="80;86;89;90", MAX_JOBS (parallel compile jobs).
Install with `pip install --no-build-isolation .` so the build sees the torch already installed.
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
    """An extension whose sources CMakeLists.txt lists (csrc/*.cpp, csrc/cpu/*.cpp, csrc/cuda/*.cu)."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        try:
            import torch
        except ImportError as exc:  # pragma: no cover - explained to the user
            raise RuntimeError(
                "dagan_fast builds against the installed PyTorch: install torch first and use "
                "`pip install --no-build-isolation .`"
            ) from exc
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("dagan_fast needs CMake >= 3.18 to build (apt-get install cmake, or pip install cmake)")
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = os.environ.get("DAGAN_FAST_CUDA", "").strip().lower()
        cuda_mode = {"0": "OFF", "off": "OFF", "false": "OFF", "1": "ON", "on": "ON", "true": "ON"}.get(cuda, "AUTO")
        args = [
            f"-DDAGAN_FAST_TORCH_DIR={Path(torch.__file__).parent}",
            f"-DDAGAN_FAST_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DDAGAN_FAST_CUDA={cuda_mode}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if os.environ.get("DAGAN_FAST_CUDA_ARCHS"):
            args.append(f"-DDAGAN_FAST_CUDA_ARCHS={os.environ['DAGAN_FAST_CUDA_ARCHS']}")
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.check_call([cmake, "-S", str(ROOT), "-B", str(build_dir), *args])
        subprocess.check_call([cmake, "--build", str(build_dir), "--parallel", jobs])
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(build_dir / "libdagan_fast_ops.so", target)


setup(ext_modules=[CMakeExtension("dagan_fast._C")], cmdclass={"build_ext": CMakeBuild})
