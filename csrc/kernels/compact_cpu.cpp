// In-place compaction of one dense buffer, CPU. Slices move only towards the start of the
// buffer (destination offset <= source offset), visited in increasing order, so every source
// is read before anything overwrites it; memmove handles the overlap inside one slice.
#include <cstring>

#include "kernels/kernels.h"

namespace aofp {
namespace cpu {

void compact(const CompactParams& p) {
  char* base = static_cast<char*>(p.data);
  const size_t slice = size_t(p.inner) * size_t(p.elem_size);
  for (int64_t a = 0; a < p.outer; ++a) {
    char* dst = base + size_t(a) * size_t(p.n_keep) * slice;
    const char* src = base + size_t(a) * size_t(p.size) * slice;
    for (int64_t j = 0; j < p.n_keep; ++j) {
      const char* s = src + size_t(p.keep[j]) * slice;
      char* d = dst + size_t(j) * slice;
      if (s != d) std::memmove(d, s, slice);
    }
  }
}

}  // namespace cpu
}  // namespace aofp
