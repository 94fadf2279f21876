// A small CPU emulation of the CUDA features that aofp_ext's kernels use, so that the unchanged
// kernel sources (csrc/kernels/*.cu, with only the <<<...>>> launch syntax rewritten by
// tests/test_cuda_emulated.py) can run on a machine without a GPU.
//
// Each block runs as blockDim cooperative fibers (ucontext) on one OS thread; a __syncthreads()
// or a warp shuffle switches to the next fiber, so shared memory, barriers and warp shuffles
// keep their CUDA meaning. The scheduler checks that every barrier is reached by every thread of
// the block (of the warp, for a shuffle) -- a divergent barrier is an error -- and can run the
// threads of each phase in a shuffled order, which makes a missing barrier visible as a wrong
// result. Device memory is host
// memory; streams are ignored (everything runs at launch). This checks the kernels' logic
// (indexing, tiling, reductions, the overlap scheme of compact) -- not their speed, not races
// between concurrently running blocks, not nvcc's code generation.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define AOFP_EMU_ASAN 1
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

typedef enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
} cudaError_t;
enum cudaMemcpyKind { cudaMemcpyDeviceToDevice = 3 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
typedef struct CUstream_st* cudaStream_t;

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

using std::max;
using std::min;

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double atomicAdd(double* p, double v) {
  const double old = *p;
  *p = old + v;
  return old;
}

namespace aofp_emu {

enum class State { Run, BlockBarrier, WarpBarrier, Done };

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  State state = State::Run;
};

constexpr size_t kStack = size_t(256) << 10;

inline ucontext_t g_sched;
inline std::vector<Fiber> g_fibers;
inline int g_cur = -1;
inline std::function<void()> g_body;
inline std::vector<unsigned char> g_dyn_smem;
inline unsigned char g_shfl[1024 * 8];
inline unsigned g_seed = 0;  // 0: threads in order; else shuffled order per phase
inline int g_sm_count = 3;
inline long long g_barriers = 0;
#ifdef AOFP_EMU_ASAN
inline void* g_fake_stack = nullptr;
inline const void* g_sched_bottom = nullptr;
inline size_t g_sched_size = 0;
#endif

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda_emu: %s (block %u,%u,%u thread %d)\n", what, blockIdx.x, blockIdx.y,
               blockIdx.z, g_cur);
  std::abort();
}

inline void to_fiber(int i) {
#ifdef AOFP_EMU_ASAN
  __sanitizer_start_switch_fiber(&g_fake_stack, g_fibers[i].stack, kStack);
#endif
  swapcontext(&g_sched, &g_fibers[i].ctx);
#ifdef AOFP_EMU_ASAN
  __sanitizer_finish_switch_fiber(g_fake_stack, nullptr, nullptr);
#endif
}

inline void to_scheduler(bool finished) {
  Fiber& f = g_fibers[g_cur];
#ifdef AOFP_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(finished ? nullptr : &fake, g_sched_bottom, g_sched_size);
#endif
  swapcontext(&f.ctx, &g_sched);
#ifdef AOFP_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, &g_sched_bottom, &g_sched_size);
#endif
}

inline void fiber_entry() {
#ifdef AOFP_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_sched_bottom, &g_sched_size);
#endif
  g_body();
  g_fibers[g_cur].state = State::Done;
  to_scheduler(true);
}

inline void set_thread(int tid) {
  g_cur = tid;
  threadIdx.x = unsigned(tid) % blockDim.x;
  threadIdx.y = (unsigned(tid) / blockDim.x) % blockDim.y;
  threadIdx.z = unsigned(tid) / (blockDim.x * blockDim.y);
}

// Runs one block: warp by warp, each warp until all its threads wait at a block barrier or
// are done (releasing warp barriers -- shuffles -- on the way), then releases the block barrier.
inline void run_block(int nthreads) {
  for (int i = 0; i < nthreads; ++i) {
    Fiber& f = g_fibers[i];
    f.state = State::Run;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  const int nwarps = (nthreads + 31) / 32;
  std::vector<int> warps(nwarps), lanes(32);
  for (int w = 0; w < nwarps; ++w) warps[w] = w;
  for (int l = 0; l < 32; ++l) lanes[l] = l;
  std::mt19937 rng(g_seed + 977u * blockIdx.x + 131u * blockIdx.y + 7u * blockIdx.z);
  for (;;) {
    if (g_seed != 0) std::shuffle(warps.begin(), warps.end(), rng);
    for (int w : warps) {
      const int t0 = w * 32, t1 = std::min(nthreads, t0 + 32);
      for (;;) {
        if (g_seed != 0) std::shuffle(lanes.begin(), lanes.end(), rng);
        for (int l : lanes) {
          const int i = t0 + l;
          if (i >= t1 || g_fibers[i].state != State::Run) continue;
          set_thread(i);
          to_fiber(i);
        }
        int at_warp = 0;
        for (int i = t0; i < t1; ++i) at_warp += g_fibers[i].state == State::WarpBarrier;
        if (at_warp == 0) break;
        g_cur = -1;
        if (at_warp != t1 - t0) fail("divergent warp shuffle: not every lane of the warp took part");
        for (int i = t0; i < t1; ++i) g_fibers[i].state = State::Run;
        ++g_barriers;
      }
    }
    int done = 0, waiting = 0;
    for (int i = 0; i < nthreads; ++i) {
      done += g_fibers[i].state == State::Done;
      waiting += g_fibers[i].state == State::BlockBarrier;
    }
    if (done == nthreads) break;
    if (waiting != nthreads) {
      g_cur = -1;
      fail("divergent __syncthreads: some threads exited while others wait at a barrier");
    }
    for (int i = 0; i < nthreads; ++i) g_fibers[i].state = State::Run;
    ++g_barriers;
  }
  g_cur = -1;
}

template <typename F>
void launch(F f, dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  const int nthreads = int(block.x * block.y * block.z);
  if (nthreads <= 0 || nthreads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535) {
    std::fprintf(stderr, "cuda_emu: invalid launch configuration grid (%u,%u,%u) block %d\n",
                 grid.x, grid.y, grid.z, nthreads);
    std::abort();
  }
  if (int(g_fibers.size()) < nthreads) {
    const size_t old = g_fibers.size();
    g_fibers.resize(nthreads);
    for (size_t i = old; i < g_fibers.size(); ++i)
      g_fibers[i].stack = static_cast<char*>(std::malloc(kStack));
  }
  gridDim = grid;
  blockDim = block;
  g_body = [&f]() { f(); };
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = uint3{bx, by, bz};
        g_dyn_smem.assign(smem, 0xff);  // uninitialised shared memory reads as NaN
        run_block(nthreads);
      }
}

template <typename T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(g_dyn_smem.data());
}

}  // namespace aofp_emu

inline void __syncthreads() {
  if (aofp_emu::g_cur < 0) aofp_emu::fail("__syncthreads outside a kernel");
  aofp_emu::g_fibers[aofp_emu::g_cur].state = aofp_emu::State::BlockBarrier;
  aofp_emu::to_scheduler(false);
}

namespace aofp_emu {
inline void warp_sync() {
  if (g_cur < 0) fail("warp shuffle outside a kernel");
  g_fibers[g_cur].state = State::WarpBarrier;
  to_scheduler(false);
}
}  // namespace aofp_emu

// Warp shuffle through an exchange buffer and two warp barriers. Only full-warp masks.
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  if (mask != 0xffffffffu) aofp_emu::fail("partial-warp shuffle masks are not emulated");
  const int tid = aofp_emu::g_cur;
  std::memcpy(aofp_emu::g_shfl + 8 * tid, &v, sizeof(T));
  aofp_emu::warp_sync();
  const int src = (tid & ~31) | ((tid & 31) ^ (lane_mask & 31));
  T r;
  std::memcpy(&r, aofp_emu::g_shfl + 8 * src, sizeof(T));
  aofp_emu::warp_sync();
  return r;
}

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  *v = aofp_emu::g_sm_count;
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t n, cudaStream_t = nullptr) {
  std::memset(p, value, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind,
                                   cudaStream_t = nullptr) {
  const char* d = static_cast<const char*>(dst);
  const char* s = static_cast<const char*>(src);
  if (n > 0 && d < s + n && s < d + n) aofp_emu::fail("cudaMemcpyAsync with overlapping ranges");
  std::memcpy(dst, src, n);
  return cudaSuccess;
}
