"""Prints, one per line, what CMakeLists.txt needs to know of the installed torch: its CMake prefix,
version, CUDA version (empty for a CPU build) and the nvidia-* wheel folders beside it ("|"-joined),
where CUDA headers and libraries missing from a partial toolkit can be found."""
import os

import torch
import torch.utils

try:
    import nvidia  # namespace package of the nvidia-* wheels that a CUDA torch depends on

    nvidia_dirs = [os.path.join(p, d) for p in nvidia.__path__ for d in sorted(os.listdir(p))
                   if os.path.isdir(os.path.join(p, d))]
except ImportError:
    nvidia_dirs = []

print(torch.utils.cmake_prefix_path)
print(torch.__version__)
print(torch.version.cuda or "")
print("|".join(nvidia_dirs))
print("end")  # a last line, so that empty fields above survive the stripping of trailing whitespace
