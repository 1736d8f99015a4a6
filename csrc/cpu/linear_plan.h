// Tile shapes of the native CPU fused LM head (linear_cpu.cpp), from the cache sizes. Torch-free.
//
// A tile is Nc tokens x Vc vocabulary entries of fp32 logits. Per tile the forward runs one GEMM
// (Nc x H by H x Vc) and one sweep of the row kernel over its output; the backward rebuilds it,
// turns it into d logits in place and runs two more GEMMs on it (d_hidden += dz w, d_weight +=
// dz^T h). So the tile is written and read 2 (forward) to 4 (backward) times right after the
// GEMM that made it: it should stay in the core's own L2. The GEMMs pack their operands in
// blocks of their own, so the tile gets half of L2 and the packed panels the other half:
//     Nc * Vc * 4 bytes <= L2 / 2      (1 MiB L2: 128k floats, e.g. 256 x 512).
// Nc = 256 tokens: d_weight's GEMM has K = Nc, and its fp32 accumulator (Vc x H) is read and
// written once per tile, Nc / 2 flops per byte, enough to stay compute-bound from L2/L3; more
// tokens would shrink Vc (d_hidden's K) below a good GEMM depth. Vc then follows from L2, in
// multiples of 64, at least 128; a weight chunk (Vc x H fp32) is read by every token tile of its
// chunk, so it is also kept to a quarter of the shared L3 when H is large.
//
// The shapes depend on the cache sizes and H only, never on the number of tokens or threads:
// that is what batch_invariant needs (every tile padded to Nc tokens, the same column blocks).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>

#if defined(__linux__)
#include <unistd.h>
#endif

namespace fastdpo::cpu {

struct CacheSizes {
  int64_t l2 = int64_t{1} << 20;   // per core
  int64_t l3 = int64_t{32} << 20;  // shared
};

// "1024K" / "32M" / "512" as bytes (the /sys cache size format); 0 when unreadable.
inline int64_t parse_cache_size(const char* s) {
  long long v = 0;
  char unit = 0;
  if (std::sscanf(s, "%lld%c", &v, &unit) < 1 || v <= 0) return 0;
  if (unit == 'K' || unit == 'k') return v << 10;
  if (unit == 'M' || unit == 'm') return v << 20;
  return v;
}

inline int64_t sysfs_cache(int level) {
#if defined(__linux__)
  for (int idx = 0; idx < 8; ++idx) {
    char path[96];
    std::snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu0/cache/index%d/level", idx);
    FILE* f = std::fopen(path, "r");
    if (!f) break;
    int lv = 0;
    const bool ok = std::fscanf(f, "%d", &lv) == 1;
    std::fclose(f);
    if (!ok || lv != level) continue;
    std::snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu0/cache/index%d/size", idx);
    f = std::fopen(path, "r");
    if (!f) continue;
    char buf[32] = {0};
    const bool read = std::fgets(buf, sizeof(buf), f) != nullptr;
    std::fclose(f);
    if (read) return parse_cache_size(buf);
  }
#endif
  (void)level;
  return 0;
}

// sysconf first (glibc reads CPUID), /sys when it says nothing, the defaults above otherwise.
// Some hypervisors report absurd L3 sizes (the host's); clamp to a sane range.
inline CacheSizes cache_sizes() {
  CacheSizes c;
  int64_t l2 = 0, l3 = 0;
#if defined(__linux__) && defined(_SC_LEVEL2_CACHE_SIZE)
  l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
  l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
  if (l2 <= 0) l2 = sysfs_cache(2);
  if (l3 <= 0) l3 = sysfs_cache(3);
  if (l2 > 0) c.l2 = std::clamp<int64_t>(l2, int64_t{256} << 10, int64_t{8} << 20);
  if (l3 > 0) c.l3 = std::clamp<int64_t>(l3, int64_t{2} << 20, int64_t{256} << 20);
  return c;
}

struct TileShape {
  int64_t rows;  // Nc
  int64_t cols;  // Vc (V when the whole vocabulary fits one tile)
};

constexpr int64_t kTileRows = 256;
constexpr int64_t kMinTileCols = 128;

inline TileShape tile_shape(int64_t V, int64_t H, const CacheSizes& c) {
  int64_t cols = (c.l2 / 2) / (4 * kTileRows);
  const int64_t h = std::max<int64_t>(H, 1);
  cols = std::min(cols, (c.l3 / 4) / (4 * h));
  cols = std::max(kMinTileCols, cols / 64 * 64);
  return TileShape{kTileRows, std::max<int64_t>(1, std::min(cols, V))};
}

// What one thread's buffers (linear_cpu.cpp's Scratch) must hold in a sweep.
struct ScratchNeeds {
  bool softcap = false;  // the tile's tanh, for the chain rule
  bool copy_h = false;   // fp32 copies of the hidden rows (bf16/fp16, or padded tiles)
  bool copy_w = false;   // fp32 copies of a weight chunk (bf16/fp16)
  bool copy_dw = false;  // an fp32 d_weight chunk before it is rounded (bf16/fp16)
  bool rows_h = false;   // a (tile rows x H) product: d_hidden's, or the frozen head's accumulator
};

// Bytes of those buffers at most: each thread allocates them once per call, so a call holds
// threads x this beside its own outputs (and the backward's d_hidden group buffers).
inline int64_t scratch_bytes(const TileShape& t, int64_t H, const ScratchNeeds& n) {
  const int64_t tile = t.rows * t.cols, rows = t.rows * H, cols = t.cols * H;
  return 4 * (tile * (1 + n.softcap) + rows * (n.copy_h + n.rows_h) +
              cols * (n.copy_w + n.copy_dw));
}

}  // namespace fastdpo::cpu
