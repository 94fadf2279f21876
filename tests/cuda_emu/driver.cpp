// Runs one aofp_ext CUDA entry point (kernels/cuda_kernels.h) under the CPU emulation of
// cuda_runtime.h: `driver <op> <in.bin> <out.bin>`. The files hold named byte arrays
// (int32 name length, name, int64 byte count, bytes); tests/test_cuda_emulated.py writes and
// reads them. Every input lands in a malloc of exactly its size, the workspace too, so an
// AddressSanitizer build reports any out-of-bounds access of the kernels.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_runtime.h"
#include "kernels/cuda_kernels.h"

namespace {

using Blobs = std::map<std::string, std::vector<char>>;

Blobs read_blobs(const char* path) {
  Blobs b;
  FILE* f = std::fopen(path, "rb");
  if (!f) throw std::runtime_error(std::string("cannot open ") + path);
  for (;;) {
    int32_t n = 0;
    if (std::fread(&n, sizeof(n), 1, f) != 1) break;
    std::string name(size_t(n), '\0');
    int64_t bytes = 0;
    if (std::fread(&name[0], 1, size_t(n), f) != size_t(n) ||
        std::fread(&bytes, sizeof(bytes), 1, f) != 1)
      throw std::runtime_error("truncated input");
    std::vector<char> data(static_cast<size_t>(bytes));
    if (bytes > 0 && std::fread(data.data(), 1, size_t(bytes), f) != size_t(bytes))
      throw std::runtime_error("truncated input");
    b[name] = std::move(data);
  }
  std::fclose(f);
  return b;
}

void write_blobs(const char* path, const Blobs& b) {
  FILE* f = std::fopen(path, "wb");
  if (!f) throw std::runtime_error(std::string("cannot open ") + path);
  for (const auto& kv : b) {
    const int32_t n = int32_t(kv.first.size());
    const int64_t bytes = int64_t(kv.second.size());
    std::fwrite(&n, sizeof(n), 1, f);
    std::fwrite(kv.first.data(), 1, kv.first.size(), f);
    std::fwrite(&bytes, sizeof(bytes), 1, f);
    std::fwrite(kv.second.data(), 1, kv.second.size(), f);
  }
  std::fclose(f);
}

// Exactly-sized heap copies ("device memory"), freed at exit.
std::vector<void*> g_allocs;
void* exact_alloc(size_t bytes) {
  void* p = std::malloc(bytes > 0 ? bytes : 1);
  g_allocs.push_back(p);
  return p;
}
template <typename T>
T* dev(const Blobs& b, const std::string& name, bool required = true) {
  auto it = b.find(name);
  if (it == b.end()) {
    if (required) throw std::runtime_error("missing input " + name);
    return nullptr;
  }
  void* p = exact_alloc(it->second.size());
  std::memcpy(p, it->second.data(), it->second.size());
  return static_cast<T*>(p);
}
template <typename T>
std::vector<T> vals(const Blobs& b, const std::string& name) {
  const std::vector<char>& v = b.at(name);
  std::vector<T> out(v.size() / sizeof(T));
  std::memcpy(out.data(), v.data(), out.size() * sizeof(T));
  return out;
}
template <typename T>
std::vector<char> bytes_of(const T* p, size_t n) {
  std::vector<char> v(n * sizeof(T));
  std::memcpy(v.data(), p, v.size());
  return v;
}

aofp::ConvGeom geometry(const Blobs& in) {
  const std::vector<int64_t> g = vals<int64_t>(in, "geom");
  if (g.size() != 19) throw std::runtime_error("geom must hold 19 values");
  aofp::ConvGeom c;
  c.N = g[0], c.C = g[1], c.H = g[2], c.W = g[3], c.O = g[4], c.KH = g[5], c.KW = g[6];
  c.stride_h = g[7], c.stride_w = g[8], c.pad_h = g[9], c.pad_w = g[10];
  c.dil_h = g[11], c.dil_w = g[12], c.HO = g[13], c.WO = g[14];
  for (int i = 0; i < 4; ++i) c.xs[i] = g[15 + i];
  return c;
}

aofp::cuda::Budget budget(const Blobs& in) {
  aofp::cuda::Budget b;
  if (in.count("budget")) {
    const std::vector<int64_t> v = vals<int64_t>(in, "budget");
    b.z_bytes = v.at(0);
    b.mask_bytes = v.at(1);
  }
  return b;
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "driver: %s returned cudaError %d\n", what, int(e));
    std::exit(3);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: driver <op> <in.bin> <out.bin>\n");
    return 2;
  }
  const std::string op = argv[1];
  const Blobs in = read_blobs(argv[2]);
  if (in.count("emu")) {
    const std::vector<int64_t> e = vals<int64_t>(in, "emu");
    aofp_emu::g_seed = unsigned(e.at(0));
    aofp_emu::g_sm_count = int(e.at(1));
  }
  Blobs out;
  if (op == "masked_damage") {
    aofp::MaskedDamageParams p;
    p.g = geometry(in);
    p.K = vals<int64_t>(in, "K").at(0);
    p.norm = aofp::Norm(vals<int64_t>(in, "norm").at(0));
    p.post = aofp::Post(vals<int64_t>(in, "post").at(0));
    p.eps = vals<double>(in, "eps").at(0);
    const int64_t x_offset = vals<int64_t>(in, "x_offset").at(0);
    p.x = dev<float>(in, "x") + x_offset;
    p.weight = dev<float>(in, "weight");
    p.bias = dev<float>(in, "bias", false);
    p.masks = dev<uint8_t>(in, "masks");
    p.scale = dev<float>(in, "scale", false);
    p.shift = dev<float>(in, "shift", false);
    float* damage = static_cast<float*>(exact_alloc(size_t(p.K) * sizeof(float)));
    std::memset(damage, 0xff, size_t(p.K) * sizeof(float));  // NaN until written
    p.damage = damage;
    const aofp::cuda::Budget b = budget(in);
    const size_t ws = aofp::cuda::masked_damage_workspace_bytes(p, b);
    void* w = exact_alloc(ws);
    std::memset(w, 0xff, ws);  // uninitialised workspace reads as NaN
    check(aofp::cuda::masked_damage(p, w, ws, b, nullptr), "masked_damage");
    out["damage"] = bytes_of(damage, size_t(p.K));
    const int64_t wsv = int64_t(ws);
    out["workspace_bytes"] = bytes_of(&wsv, 1);
  } else if (op == "channel_gram") {
    aofp::ChannelGramParams p;
    p.g = geometry(in);
    const int64_t x_offset = vals<int64_t>(in, "x_offset").at(0);
    p.x = dev<float>(in, "x") + x_offset;
    p.weight = dev<float>(in, "weight");
    p.scale = dev<float>(in, "scale", false);
    const size_t n = size_t(p.g.C * p.g.C);
    float* gram = static_cast<float*>(exact_alloc(n * sizeof(float)));
    std::memset(gram, 0xff, n * sizeof(float));
    p.gram = gram;
    const aofp::cuda::Budget b = budget(in);
    const size_t ws = aofp::cuda::channel_gram_workspace_bytes(p, b);
    void* w = exact_alloc(ws);
    std::memset(w, 0xff, ws);
    check(aofp::cuda::channel_gram(p, w, ws, b, nullptr), "channel_gram");
    out["gram"] = bytes_of(gram, n);
  } else if (op == "quadratic_damage") {
    aofp::QuadraticDamageParams p;
    p.C = vals<int64_t>(in, "C").at(0);
    p.K = vals<int64_t>(in, "K").at(0);
    p.gram = dev<float>(in, "gram");
    p.masks = dev<uint8_t>(in, "masks");
    float* damage = static_cast<float*>(exact_alloc(size_t(p.K) * sizeof(float)));
    std::memset(damage, 0xff, size_t(p.K) * sizeof(float));
    p.damage = damage;
    check(aofp::cuda::quadratic_damage(p, nullptr), "quadratic_damage");
    out["damage"] = bytes_of(damage, size_t(p.K));
  } else if (op == "compact") {
    const std::vector<int64_t> s = vals<int64_t>(in, "shape");  // outer, size, inner, elem
    aofp::CompactParams p;
    p.outer = s.at(0), p.size = s.at(1), p.inner = s.at(2), p.elem_size = s.at(3);
    p.keep = dev<int64_t>(in, "keep");
    p.n_keep = int64_t(in.at("keep").size() / sizeof(int64_t));
    p.data = dev<char>(in, "data");
    const int64_t first_moved = vals<int64_t>(in, "first_moved").at(0);
    const int64_t temp_budget = vals<int64_t>(in, "temp_budget").at(0);
    const int64_t tb = aofp::cuda::compact_temp_bytes(p, first_moved, temp_budget);
    void* temp = tb > 0 ? exact_alloc(size_t(tb)) : nullptr;
    if (tb > 0) check(aofp::cuda::compact(p, first_moved, temp, tb, nullptr), "compact");
    const size_t n = size_t(p.outer * p.n_keep * p.inner * p.elem_size);
    out["data"] = bytes_of(static_cast<const char*>(p.data), n);
    out["temp_bytes"] = bytes_of(&tb, 1);
  } else {
    std::fprintf(stderr, "driver: unknown op %s\n", op.c_str());
    return 2;
  }
  const long long nb = aofp_emu::g_barriers;
  out["barriers"] = bytes_of(&nb, 1);
  write_blobs(argv[3], out);
  for (void* p : g_allocs) std::free(p);
  return 0;
}
