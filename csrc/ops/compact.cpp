// compact_: in-place channel compaction. The glue views each tensor in memory order (so any
// dense layout, e.g. channels-last, is compacted without a copy), runs the backend's kernel on
// the raw buffer and re-points the same TensorImpl at the packed data with the new sizes.
#include "ops/compact.h"

#include <ATen/native/Resize.h>
#include <torch/library.h>

#include <numeric>

#include "ops/common.h"

namespace aofp {
namespace glue {

namespace {
// Dims ordered from the outermost (largest stride) to the innermost in memory.
std::vector<int64_t> memory_order(const at::Tensor& t) {
  std::vector<int64_t> perm(t.dim());
  std::iota(perm.begin(), perm.end(), 0);
  std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) {
    if (t.stride(a) != t.stride(b)) return t.stride(a) > t.stride(b);
    return t.size(a) > t.size(b);
  });
  return perm;
}

bool dense_in_order(const at::Tensor& t, const std::vector<int64_t>& perm) {
  int64_t expected = 1;
  for (int64_t i = t.dim() - 1; i >= 0; --i) {
    const int64_t d = perm[i];
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}
}  // namespace

void compact_impl(at::TensorList tensors, at::IntArrayRef dims, const at::Tensor& keep,
                  const CompactRun& run, const StorageShrink& shrink) {
  const char* op = "compact_";
  TORCH_CHECK(tensors.size() == dims.size(), op, ": got ", tensors.size(), " tensors but ",
              dims.size(), " dims; give one dim per tensor");
  TORCH_CHECK(keep.dim() == 1 && keep.scalar_type() == at::kLong, op,
              ": keep must be a 1-D int64 tensor of sorted, unique indices, got ",
              keep.scalar_type(), " of shape ", shape_str(keep));
  const at::Tensor keep_cpu = keep.to(at::kCPU).contiguous();
  const int64_t* kp = keep_cpu.data_ptr<int64_t>();
  const int64_t n_keep = keep_cpu.numel();
  for (int64_t i = 1; i < n_keep; ++i) {
    TORCH_CHECK(kp[i] > kp[i - 1], op, ": keep must be sorted and unique (strictly increasing), "
                "but keep[", i - 1, "] = ", kp[i - 1], " and keep[", i, "] = ", kp[i]);
  }
  if (tensors.empty()) return;

  std::vector<int64_t> ds(tensors.size());
  int64_t size = -1;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.defined(), op, ": tensors[", i, "] is undefined");
    TORCH_CHECK(t.dim() >= 1, op, ": tensors[", i, "] is 0-dimensional; nothing to compact");
    TORCH_CHECK(dims[i] >= -t.dim() && dims[i] < t.dim(), op, ": dims[", i, "] = ", dims[i],
                " is out of range for tensors[", i, "] of shape ", shape_str(t));
    ds[i] = dims[i] < 0 ? dims[i] + t.dim() : dims[i];
    if (size < 0) size = t.size(ds[i]);
    TORCH_CHECK(t.size(ds[i]) == size, op,
                ": every tensor must have the same size along its dim; tensors[0] has ", size,
                " along dim ", ds[0], " but tensors[", i, "] (shape ", shape_str(t), ") has ",
                t.size(ds[i]), " along dim ", ds[i]);
  }
  if (n_keep > 0) {
    TORCH_CHECK(kp[0] >= 0 && kp[n_keep - 1] < size, op, ": keep indices must lie in [0, ", size,
                "), got range [", kp[0], ", ", kp[n_keep - 1], "]");
  }

  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    const int64_t d = ds[i];
    std::vector<int64_t> new_sizes = t.sizes().vec();
    new_sizes[d] = n_keep;
    const std::vector<int64_t> perm = memory_order(t);
    if (!dense_in_order(t, perm)) {
      // Overlapping or gappy layout: no in-place packing exists; take one compacted copy.
      t.set_(t.index_select(d, keep.to(t.device())).contiguous());
      continue;
    }
    if (t.numel() > 0 && n_keep > 0 && n_keep < size) {
      int64_t outer = 1, inner = 1;
      bool before = true;
      for (int64_t j : perm) {
        if (j == d) {
          before = false;
          continue;
        }
        (before ? outer : inner) *= t.size(j);
      }
      CompactParams p;
      p.data = t.data_ptr();
      p.outer = outer;
      p.size = size;
      p.inner = inner;
      p.elem_size = t.element_size();
      p.n_keep = n_keep;
      const at::Tensor keep_dev = t.device() == keep_cpu.device() ? keep_cpu
                                                                   : keep_cpu.to(t.device());
      p.keep = keep_dev.data_ptr<int64_t>();
      run(p, keep_dev);
    }
    // The same memory order, packed.
    std::vector<int64_t> new_strides(t.dim());
    int64_t st = 1;
    for (int64_t j = t.dim() - 1; j >= 0; --j) {
      new_strides[perm[j]] = st;
      st *= new_sizes[perm[j]];
    }
    const c10::Storage storage = t.storage();
    const int64_t offset = t.storage_offset();
    t.set_(storage, offset, new_sizes, new_strides);
    // Free the cut channels' memory when nothing else uses this storage.
    const size_t need = size_t(st) * t.element_size();
    if (shrink && offset == 0 && storage.use_count() == 2 /* t and `storage` */ &&
        storage.resizable() && storage.nbytes() > need) {
      shrink(storage.unsafeGetStorageImpl(), need);
    }
  }
}

namespace {
void compact_cpu(at::TensorList tensors, at::IntArrayRef dims, const at::Tensor& keep) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(!tensors[i].defined() || tensors[i].device().is_cpu(), "compact_: tensors[", i,
                "] is on ", tensors[i].device(), " but another tensor is on the CPU; ",
                "compact the tensors of each device in a separate call");
  }
  compact_impl(
      tensors, dims, keep,
      [](CompactParams& p, const at::Tensor&) { cpu::compact(p); },
      [](c10::StorageImpl* s, size_t nbytes) { at::native::resize_bytes_cpu(s, nbytes); });
}
}  // namespace

}  // namespace glue
}  // namespace aofp

TORCH_LIBRARY_IMPL(aofp, CPU, m) { m.impl("compact_", &aofp::glue::compact_cpu); }
