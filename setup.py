"""Builds rnn_fused._C: the C++ CPU kernels always, the CUDA kernels when a CUDA toolkit and a CUDA build of
torch are present (never because a GPU is visible: build machines have none).

Switches: RNN_FUSED_CUDA=1 forces the CUDA build (fails loudly if it cannot), RNN_FUSED_CUDA=0 skips it;
TORCH_CUDA_ARCH_LIST is honoured (default "8.0;9.0"); MAX_JOBS for ninja; DEBUG=1 for -O0 -g -lineinfo.
"""
import glob
import os
import sys

# torch guesses CUDA_HOME from the first nvcc on PATH; a wrapper script there (as on our build machines)
# misleads it, so prefer the standard toolkit location before torch.utils.cpp_extension is imported.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

debug = os.environ.get("DEBUG", "0") == "1"
cuda_switch = os.environ.get("RNN_FUSED_CUDA", "auto")
cuda_possible = torch.version.cuda is not None and CUDA_HOME is not None
if cuda_switch == "1" and not cuda_possible:
    raise RuntimeError(
        f"RNN_FUSED_CUDA=1 but the CUDA build is impossible: torch.version.cuda={torch.version.cuda}, "
        f"CUDA_HOME={CUDA_HOME}. Install a CUDA build of torch and the CUDA toolkit (or set CUDA_HOME)."
    )
with_cuda = cuda_possible and cuda_switch != "0"
if with_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
# -fno-trapping-math: without it g++ refuses to vectorise any loop with a float select or division (the fast
# tanh, relu's derivative), since either could raise an FP exception that scalar code would not; nothing
# here reads FP exception flags. It does not assume finite math: NaN and Inf keep their IEEE behaviour.
cxx_flags = (["-O0", "-g"] if debug else ["-O3"]) + ["-fno-trapping-math"]
# -fopenmp: at::parallel_for is a header template that runs its body serially in a translation unit compiled
# without OpenMP, so without it the CPU kernels' parallel loops (a layer's directions, oneDNN's GEMM blocks)
# never used a second thread. Linked as libgomp.so.1, the soname of the OpenMP runtime torch loads first (its
# wheel ships it), so the process keeps one thread pool.
link_flags = []
if sys.platform.startswith("linux"):
    cxx_flags.append("-fopenmp")
    link_flags.append("-fopenmp")
extra = {"cxx": cxx_flags}
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    extra["nvcc"] = ["-O0", "-g", "-lineinfo"] if debug else ["-O3", "-lineinfo"]
    extension = CUDAExtension("rnn_fused._C", sources, extra_compile_args=extra, extra_link_args=link_flags)
else:
    extension = CppExtension("rnn_fused._C", sources, extra_compile_args=extra, extra_link_args=link_flags)

setup(
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
