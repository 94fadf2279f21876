# CUDA for aofp_ext: decide whether the CUDA kernels can be built, find the toolkit pieces they
# need (nvcc, cuda_runtime.h, libcudart), choose the architectures, and hand torch's CMake config
# a ready `torch::cudart` target.
#
# Why the last step: a CUDA build of torch runs its own public/cuda.cmake from find_package(Torch),
# which insists on a complete toolkit (nvrtc, cuBLAS, the driver stub, ...) and, with no arch
# named, appends -gencode flags for every architecture torch supports. aofp_ext links none of those
# libraries (libtorch_cuda loads them itself) and names its own architectures, so it defines
# torch::cudart first; cuda.cmake returns at once when that target exists (its include guard).
#
# Inputs: AOFP_CUDA (AUTO|ON|OFF), AOFP_TORCH_CUDA (torch.version.cuda, empty for a CPU torch),
# AOFP_TORCH_NVIDIA_DIRS (the nvidia-* wheel folders beside torch, from Python).
# Outputs: AOFP_WITH_CUDA, AOFP_CUDA_ARCHS_BUILT, AOFP_CUDA_TOOLKIT_ROOT, AOFP_CUDART_LIBRARY.

include(CheckLanguage)

# AUTO: explain and fall back to a CPU-only build; ON: stop with the same explanation.
function(_aofp_cuda_unavailable why)
  if(AOFP_CUDA STREQUAL "ON")
    message(FATAL_ERROR "aofp_ext: AOFP_CUDA=ON but the CUDA kernels cannot be built: ${why}")
  endif()
  message(WARNING "aofp_ext: building WITHOUT the CUDA kernels (AOFP_CUDA=AUTO): ${why}\n"
                  "Pass -Ccmake.define.AOFP_CUDA=ON to make this an error, =OFF to silence it.")
endfunction()

# TORCH_CUDA_ARCH_LIST style ("8.0 8.6+PTX;9.0a") or CMake style ("80-real;90") -> CMake style.
function(_aofp_cuda_archs_from spec out)
  string(REPLACE " " ";" spec "${spec}")
  string(REPLACE "," ";" spec "${spec}")
  set(result "")
  foreach(a IN LISTS spec)
    if(a STREQUAL "")
      continue()
    endif()
    if(a MATCHES "^([0-9]+)\\.([0-9]+)([af]?)(\\+PTX)?$")
      set(sm "${CMAKE_MATCH_1}${CMAKE_MATCH_2}${CMAKE_MATCH_3}")
      list(APPEND result "${sm}-real")
      if(CMAKE_MATCH_4)
        list(APPEND result "${sm}-virtual")
      endif()
    elseif(a MATCHES "^[0-9]+[af]?(-real|-virtual)?$")
      list(APPEND result "${a}")
    else()
      message(FATAL_ERROR "aofp_ext: cannot read the CUDA architecture '${a}' (from TORCH_CUDA_ARCH_LIST "
                          "or AOFP_CUDA_ARCHS). Use e.g. '9.0', '8.6+PTX', '90-real' or '90'.")
    endif()
  endforeach()
  set(${out} "${result}" PARENT_SCOPE)
endfunction()

# Default sm_90 SASS + compute_90 PTX (H100/H200; newer GPUs JIT the PTX), plus what the user asks
# for through TORCH_CUDA_ARCH_LIST / AOFP_CUDA_ARCHS. An explicit CMAKE_CUDA_ARCHITECTURES wins.
function(_aofp_choose_cuda_archs out)
  if(DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT CMAKE_CUDA_ARCHITECTURES STREQUAL ""
     AND NOT CMAKE_CUDA_ARCHITECTURES STREQUAL "OFF")
    set(${out} "${CMAKE_CUDA_ARCHITECTURES}" PARENT_SCOPE)
    return()
  endif()
  set(archs "90-real;90-virtual")
  foreach(var TORCH_CUDA_ARCH_LIST AOFP_CUDA_ARCHS)
    if(DEFINED ENV{${var}} AND NOT "$ENV{${var}}" STREQUAL "")
      _aofp_cuda_archs_from("$ENV{${var}}" extra)
      list(APPEND archs ${extra})
    endif()
  endforeach()
  list(REMOVE_DUPLICATES archs)
  set(${out} "${archs}" PARENT_SCOPE)
endfunction()

# nvcc: an explicit CMAKE_CUDA_COMPILER or CUDACXX first, then CUDA_HOME / CUDA_PATH, then what
# CMake finds on the PATH (a wrapper script there is fine: CMake asks nvcc itself where it lives).
function(_aofp_preferred_nvcc)
  if(DEFINED CMAKE_CUDA_COMPILER OR DEFINED ENV{CUDACXX})
    return()
  endif()
  foreach(var CUDA_HOME CUDA_PATH)
    if(DEFINED ENV{${var}} AND EXISTS "$ENV{${var}}/bin/nvcc")
      set(CMAKE_CUDA_COMPILER "$ENV{${var}}/bin/nvcc" CACHE FILEPATH "CUDA compiler" FORCE)
      return()
    endif()
  endforeach()
endfunction()

# The folders where a CUDA header or library may be: the toolkit of the nvcc in use, then the
# nvidia-* wheels that came with torch.
function(_aofp_cuda_search_dirs kind out)
  set(dirs "")
  foreach(root IN ITEMS "${CMAKE_CUDA_COMPILER_TOOLKIT_ROOT}" "$ENV{CUDA_HOME}" "$ENV{CUDA_PATH}")
    if(root STREQUAL "")
      continue()
    endif()
    if(kind STREQUAL "include")
      list(APPEND dirs "${root}/include" "${root}/targets/${CMAKE_SYSTEM_PROCESSOR}-linux/include")
    else()
      list(APPEND dirs "${root}/lib64" "${root}/lib" "${root}/targets/${CMAKE_SYSTEM_PROCESSOR}-linux/lib")
    endif()
  endforeach()
  if(kind STREQUAL "include")
    list(APPEND dirs ${CMAKE_CUDA_TOOLKIT_INCLUDE_DIRECTORIES})
  endif()
  foreach(d IN LISTS AOFP_TORCH_NVIDIA_DIRS)
    list(APPEND dirs "${d}/${kind}")
  endforeach()
  list(REMOVE_DUPLICATES dirs)
  set(${out} "${dirs}" PARENT_SCOPE)
endfunction()

macro(aofp_cuda_setup)
  set(AOFP_WITH_CUDA OFF)
  set(AOFP_CUDA_ARCHS_BUILT "")
  if(AOFP_TORCH_CUDA STREQUAL "")
    if(AOFP_CUDA STREQUAL "ON")
      message(FATAL_ERROR "aofp_ext: AOFP_CUDA=ON but the installed torch ${AOFP_TORCH_VERSION} has no CUDA. "
                          "Install a CUDA build of torch first.")
    endif()
  elseif(NOT AOFP_CUDA STREQUAL "OFF")
    _aofp_cuda_try_enable()
  endif()
  if(NOT AOFP_TORCH_CUDA STREQUAL "" AND NOT TARGET torch::cudart)
    # A CUDA torch without our CUDA kernels: libtorch_cuda brings its own cudart at run time.
    add_library(torch::cudart INTERFACE IMPORTED)
  endif()
endmacro()

# A macro, not a function: enable_language() must run at file scope. Leaves _aofp_why empty on
# success, else the reason CUDA cannot be built.
macro(_aofp_cuda_try_enable)
  set(_aofp_why "")
  _aofp_preferred_nvcc()
  check_language(CUDA)
  if(NOT CMAKE_CUDA_COMPILER)
    set(_aofp_why "no CUDA compiler (nvcc) was found. Looked at CMAKE_CUDA_COMPILER, CUDACXX, \
$CUDA_HOME/bin, $CUDA_PATH/bin and the PATH. Point CUDA_HOME at a CUDA ${AOFP_TORCH_CUDA} toolkit \
or put its nvcc on the PATH.")
  else()
    _aofp_choose_cuda_archs(AOFP_CUDA_ARCHS_BUILT)
    set(CMAKE_CUDA_ARCHITECTURES "${AOFP_CUDA_ARCHS_BUILT}")
    enable_language(CUDA)
    set(AOFP_CUDA_TOOLKIT_ROOT "${CMAKE_CUDA_COMPILER_TOOLKIT_ROOT}")
    _aofp_cuda_search_dirs(include _inc_dirs)
    _aofp_cuda_search_dirs(lib _lib_dirs)
    string(REGEX MATCH "^[0-9]+" _cuda_major "${AOFP_TORCH_CUDA}")
    find_path(AOFP_CUDA_INCLUDE_DIR cuda_runtime.h HINTS ${_inc_dirs} NO_DEFAULT_PATH)
    find_library(AOFP_CUDART_LIBRARY NAMES cudart "libcudart.so.${_cuda_major}" HINTS ${_lib_dirs}
                 NO_DEFAULT_PATH)
    set(_aofp_fix "Set CUDA_HOME to a complete CUDA toolkit, or install the nvidia-cuda-runtime wheel \
that matches torch's CUDA ${AOFP_TORCH_CUDA}.")
    if(NOT AOFP_CUDA_INCLUDE_DIR)
      string(REPLACE ";" "\n  " _where "${_inc_dirs}")
      set(_aofp_why "cuda_runtime.h not found. Looked in:\n  ${_where}\n${_aofp_fix}")
    elseif(NOT AOFP_CUDART_LIBRARY)
      string(REPLACE ";" "\n  " _where "${_lib_dirs}")
      set(_aofp_why "the CUDA runtime library (libcudart.so or libcudart.so.${_cuda_major}) not found. \
Looked in:\n  ${_where}\n${_aofp_fix}")
    endif()
  endif()
  if(_aofp_why STREQUAL "")
    # The C++ standard of the host code, also for nvcc. CMake < 3.26 knows no flag for CUDA20
    # (nvcc >= 12 takes -std=c++20): teach it, rather than require a newer CMake.
    set(_std ${CMAKE_CXX_STANDARD})
    if(NOT DEFINED CMAKE_CUDA${_std}_STANDARD_COMPILE_OPTION)
      set(CMAKE_CUDA${_std}_STANDARD_COMPILE_OPTION "-std=c++${_std}")
      set(CMAKE_CUDA${_std}_EXTENSION_COMPILE_OPTION "-std=c++${_std}")
    endif()
    set(CMAKE_CUDA_STANDARD ${_std})
    set(CMAKE_CUDA_STANDARD_REQUIRED ON)
    add_library(torch::cudart INTERFACE IMPORTED)
    set_target_properties(torch::cudart PROPERTIES
      INTERFACE_LINK_LIBRARIES "${AOFP_CUDART_LIBRARY}"
      INTERFACE_INCLUDE_DIRECTORIES "${AOFP_CUDA_INCLUDE_DIR}")
    set(AOFP_WITH_CUDA ON)
  else()
    _aofp_cuda_unavailable("${_aofp_why}")
    set(AOFP_CUDA_ARCHS_BUILT "")
  endif()
endmacro()
