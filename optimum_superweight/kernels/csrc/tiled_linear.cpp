// Fused 2-/3-/4-/8-bit dequantize + GEMM for CPU (optimum_superweight.kernels.build compiles this at first use).
//
// y[T, N] = x[T, K] @ W[N, K]^T with W group-quantized to 4-bit codes (two per byte, low nibble first, each
// group's bytes starting at a byte boundary: the plain packed format of tensor/packing.py), 2- or 3-bit codes
// (runs of 8 codes in 2 or 3 bytes) or 8-bit codes.
// Output rows are processed in tiles: the tile's weights are decoded into a buffer that stays in cache, then
// one GEMM (at::mm_out, oneDNN for bfloat16) multiplies the whole token block by it, writing the output
// columns of the tile in place. A 4-bit group has only 16 distinct weights, so each group's 16 values are
// computed once, exactly as the reference dequantization does (float32 (q - z) * s or q * s + m, then
// rounded to the output dtype), and the codes are decoded by a table lookup (vpermw / vpermps); 8-bit codes
// are converted and scaled 16 at a time with the same float32 operations. The decoded weights are
// bit-identical to the reference's. Super weights are written into the tile at their exact
// value (rounded to the output dtype, as the reference does).
//
// small_linear, for a few tokens per call, writes no tile: each row's weights are decoded in registers and
// multiplied with every token there (see "Few tokens per call" below).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define OSW_AVX512 1
#else
#define OSW_AVX512 0
#endif
#if OSW_AVX512 && defined(__AVX512BF16__)
#define OSW_BF16_DOT 1  // vdpbf16ps: bfloat16 pairs multiplied and summed into float32 lanes
#else
#define OSW_BF16_DOT 0
#endif

namespace {

struct Packed {
  const uint8_t* codes;  // [N, G, B]
  const float* scale;    // [N, G]
  const float* zero;     // [N, G] zero codes, or nullptr with float offsets
  const float* offset;   // [N, G] float offsets (w = s*q + m), or nullptr
  int64_t N, G, B, group, K, bits;
};

struct Patches {
  const int64_t* rows;
  const int64_t* cols;
  const float* values;
  int64_t count;
};

// The 16 values a group decodes to, in float32, computed as the reference does (no fused multiply-add: the
// file is compiled with -ffp-contract=off).
inline void group_values(const Packed& w, int64_t index, float* out) {
  const float s = w.scale[index];
  if (w.offset != nullptr) {
    const float m = w.offset[index];
    for (int c = 0; c < 16; ++c) {
      const float q = static_cast<float>(c) * s;
      out[c] = q + m;
    }
  } else {
    const float z = w.zero[index];
    for (int c = 0; c < 16; ++c) out[c] = (static_cast<float>(c) - z) * s;
  }
}

// Code j of a group of `bits`-bit codes: runs of 8 codes in `bits` bytes, little-endian (tensor/packing.py).
inline int code_at(const uint8_t* src, int64_t j, int bits) {
  const int64_t bit = (j >> 3) * bits * 8 + (j & 7) * bits;
  const uint8_t* byte = src + (bit >> 3);
  const int shift = static_cast<int>(bit & 7);
  unsigned window = byte[0];
  if (shift + bits > 8) window |= static_cast<unsigned>(byte[1]) << 8;
  return static_cast<int>((window >> shift) & ((1u << bits) - 1));
}

#if OSW_AVX512
inline __m512 group_values_avx512(const Packed& w, int64_t index) {
  const __m512 codes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 s = _mm512_set1_ps(w.scale[index]);
  if (w.offset != nullptr) return _mm512_add_ps(_mm512_mul_ps(codes, s), _mm512_set1_ps(w.offset[index]));
  return _mm512_mul_ps(_mm512_sub_ps(codes, _mm512_set1_ps(w.zero[index])), s);
}

// float32 -> 16-bit patterns, rounded to nearest even exactly as c10::BFloat16(float) / c10::Half(float).
template <typename T> inline __m256i to_bits16(__m512 v);
template <> inline __m256i to_bits16<c10::BFloat16>(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}
template <> inline __m256i to_bits16<c10::Half>(__m512 v) {
  return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// 16 packed bytes (32 codes) -> 32 word indices in code order: word 2i = low nibble of byte i, 2i+1 = high.
inline __m512i nibble_words(const uint8_t* src) {
  const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  return _mm512_or_si512(_mm512_and_si512(d, _mm512_set1_epi32(0xF)), _mm512_slli_epi32(_mm512_srli_epi32(d, 4), 16));
}

// 2- or 3-bit codes: 4 runs (32 codes, 4*bits bytes) -> 32 word indices. The bytes are broadcast to the four
// 128-bit lanes (lane L decodes run L); each word gathers the two bytes holding its code (vpshufb), then a
// per-word shift (vpsrlvw) and a mask leave the code.
struct Windows {
  __m512i bytes, shifts, mask;
  const uint8_t* end;
  Windows(int bits, const uint8_t* codes_end) : end(codes_end) {
    alignas(64) uint8_t index[64];
    alignas(64) uint16_t shift[32];
    for (int lane = 0; lane < 4; ++lane) {
      for (int i = 0; i < 8; ++i) {
        const int bit = lane * bits * 8 + i * bits;
        index[lane * 16 + 2 * i] = static_cast<uint8_t>(bit >> 3);
        index[lane * 16 + 2 * i + 1] = static_cast<uint8_t>((bit >> 3) + 1);
        shift[lane * 8 + i] = static_cast<uint16_t>(bit & 7);
      }
    }
    bytes = _mm512_load_si512(index);
    shifts = _mm512_load_si512(shift);
    mask = _mm512_set1_epi16(static_cast<int16_t>((1 << bits) - 1));
  }
  // `end`: the end of the codes buffer. A full 16-byte load is faster than a masked one (bytes past the 4 runs
  // are never used); only the last chunk of the buffer needs the mask, not to read past it.
  __m512i words(const uint8_t* src, int bits, const uint8_t* end) const {
    const __m128i packed = src + 16 <= end ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(src))
                                           : _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << (4 * bits)) - 1), src);
    const __m512i pairs = _mm512_shuffle_epi8(_mm512_broadcast_i32x4(packed), bytes);
    return _mm512_and_si512(_mm512_srlv_epi16(pairs, shifts), mask);
  }
};

inline __m512i code_words(const uint8_t* src, int64_t j, int bits, const Windows* windows) {
  return bits == 4 ? nibble_words(src + j / 2) : windows->words(src + (j >> 3) * bits, bits, windows->end);
}

template <typename T>
inline void decode_group(const uint8_t* src, T* dst, int64_t n, __m512 values, int bits, const Windows* windows) {
  const __m512i table = _mm512_zextsi256_si512(to_bits16<T>(values));
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    _mm512_storeu_si512(dst + j, _mm512_permutexvar_epi16(code_words(src, j, bits, windows), table));
  }
  if (j < n) {
    alignas(64) uint16_t lut[32];
    _mm512_store_si512(lut, table);
    for (; j < n; ++j) std::memcpy(dst + j, lut + code_at(src, j, bits), sizeof(uint16_t));
  }
}

template <>
inline void decode_group<float>(const uint8_t* src, float* dst, int64_t n, __m512 values, int bits,
                                const Windows* windows) {
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512i words = code_words(src, j, bits, windows);
    const __m512i low = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(words));
    const __m512i high = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(words, 1));
    _mm512_storeu_ps(dst + j, _mm512_permutexvar_ps(low, values));
    _mm512_storeu_ps(dst + j + 16, _mm512_permutexvar_ps(high, values));
  }
  if (j < n) {
    alignas(64) float lut[16];
    _mm512_store_ps(lut, values);
    for (; j < n; ++j) dst[j] = lut[code_at(src, j, bits)];
  }
}

// 8-bit codes: 16 at a time, (q - z) * s or q * s + m in float32, rounded to T.
inline __m512 scaled16(const uint8_t* src, __m512 s, __m512 zm, bool offset) {
  const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
  return offset ? _mm512_add_ps(_mm512_mul_ps(q, s), zm) : _mm512_mul_ps(_mm512_sub_ps(q, zm), s);
}

template <typename T>
inline void decode_group8_avx512(const uint8_t* src, T* dst, int64_t n, float s, float zm, bool offset) {
  const __m512 vs = _mm512_set1_ps(s), vzm = _mm512_set1_ps(zm);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 w = scaled16(src + j, vs, vzm, offset);
    if constexpr (std::is_same_v<T, float>) {
      _mm512_storeu_ps(dst + j, w);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), to_bits16<T>(w));
    }
  }
  for (; j < n; ++j) {
    const float q = static_cast<float>(src[j]);
    dst[j] = static_cast<T>(offset ? q * s + zm : (q - zm) * s);
  }
}
#endif

template <typename T>
void decode_group8(const uint8_t* src, T* dst, int64_t n, float s, float zm, bool offset) {
#if OSW_AVX512
  decode_group8_avx512<T>(src, dst, n, s, zm, offset);
#else
  for (int64_t j = 0; j < n; ++j) {
    const float q = static_cast<float>(src[j]);
    if (offset) {
      const float scaled = q * s;
      dst[j] = static_cast<T>(scaled + zm);
    } else {
      dst[j] = static_cast<T>((q - zm) * s);
    }
  }
#endif
}

template <typename T>
void decode_rows(const Packed& w, const Patches& p, int64_t r0, int64_t r1, T* out) {
  const int bits = static_cast<int>(w.bits);
#if OSW_AVX512
  const Windows windows(bits < 4 ? bits : 2, w.codes + w.N * w.G * w.B);
#endif
  for (int64_t r = r0; r < r1; ++r) {
    T* row = out + (r - r0) * w.K;
    for (int64_t g = 0; g < w.G; ++g) {
      const int64_t index = r * w.G + g;
      const int64_t start = g * w.group;
      const int64_t n = std::min(w.group, w.K - start);
      const uint8_t* src = w.codes + index * w.B;
      if (w.bits == 8) {
        const bool offset = w.offset != nullptr;
        decode_group8<T>(src, row + start, n, w.scale[index], offset ? w.offset[index] : w.zero[index], offset);
        continue;
      }
#if OSW_AVX512
      decode_group<T>(src, row + start, n, group_values_avx512(w, index), bits, &windows);
#else
      float values[16];
      group_values(w, index, values);
      T lut[16];
      for (int c = 0; c < 16; ++c) lut[c] = static_cast<T>(values[c]);
      for (int64_t j = 0; j < n; ++j) row[start + j] = lut[code_at(src, j, bits)];
#endif
    }
  }
  for (int64_t i = 0; i < p.count; ++i) {  // super weights: few per layer
    const int64_t r = p.rows[i];
    if (r >= r0 && r < r1) out[(r - r0) * w.K + p.cols[i]] = static_cast<T>(p.values[i]);
  }
}

// One growing, 64-byte aligned decode buffer per thread (no page faults per call).
void* tile_buffer(size_t bytes) {
  struct Buffer {
    void* data = nullptr;
    size_t size = 0;
    ~Buffer() { std::free(data); }
  };
  static thread_local Buffer buffer;
  if (buffer.size < bytes) {
    std::free(buffer.data);
    const size_t size = (bytes + 63) / 64 * 64;
    buffer.data = std::aligned_alloc(64, size);
    TORCH_CHECK(buffer.data != nullptr, "optimum-superweight tiled kernel: cannot allocate ", size, " bytes");
    buffer.size = size;
  }
  return buffer.data;
}

Packed packed_of(const torch::Tensor& codes, const torch::Tensor& scale, const torch::Tensor& zero,
                 const torch::Tensor& offset, int64_t group, int64_t bits, int64_t K) {
  TORCH_CHECK((bits >= 2 && bits <= 4) || bits == 8, "bits: 2, 3, 4 or 8, got ", bits);
  TORCH_CHECK(codes.dtype() == torch::kUInt8 && codes.dim() == 3 && codes.is_contiguous(), "codes: uint8 [N, G, B]");
  TORCH_CHECK(scale.dtype() == torch::kFloat32 && scale.is_contiguous(), "scale: float32 [N, G]");
  const int64_t N = codes.size(0), G = codes.size(1), B = codes.size(2);
  TORCH_CHECK(scale.numel() == N * G, "scale: one per group");
  TORCH_CHECK(B == (bits == 8 ? group : (group + 7) / 8 * bits) && G * group >= K && (G - 1) * group < K,
              "codes do not match group and K");
  const bool has_offset = offset.numel() > 0;
  TORCH_CHECK(has_offset ? offset.numel() == N * G && offset.dtype() == torch::kFloat32 && offset.is_contiguous()
                         : zero.numel() == N * G && zero.dtype() == torch::kFloat32 && zero.is_contiguous(),
              "zero codes or offsets: float32 [N, G]");
  return Packed{codes.data_ptr<uint8_t>(), scale.data_ptr<float>(), has_offset ? nullptr : zero.data_ptr<float>(),
                has_offset ? offset.data_ptr<float>() : nullptr, N, G, B, group, K, bits};
}

// Super weights of an N x K matrix. Every coordinate is checked here, on every call: they are written into
// tiles and read from activations by raw index, and a state can be built from indices changed after the load.
Patches patches_of(const torch::Tensor& rows, const torch::Tensor& cols, const torch::Tensor& values, int64_t N,
                   int64_t K) {
  TORCH_CHECK(rows.dtype() == torch::kInt64 && cols.dtype() == torch::kInt64 && values.dtype() == torch::kFloat32 &&
                  rows.numel() == cols.numel() && rows.numel() == values.numel() && rows.is_contiguous() &&
                  cols.is_contiguous() && values.is_contiguous() && rows.device().is_cpu() && cols.device().is_cpu() &&
                  values.device().is_cpu(),
              "super weights: int64 rows, int64 cols, float32 values of one length, on the CPU");
  const int64_t* r = rows.data_ptr<int64_t>();
  const int64_t* c = cols.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.numel(); ++i) {
    TORCH_CHECK(r[i] >= 0 && r[i] < N && c[i] >= 0 && c[i] < K, "super weight #", i, " at (", r[i], ", ", c[i],
                ") is outside the ", N, "x", K, " matrix");
  }
  return Patches{r, c, values.data_ptr<float>(), rows.numel()};
}

template <typename T>
void tiled_mm(const torch::Tensor& x, const Packed& w, const Patches& p, const torch::Tensor& bias, int64_t tile,
              torch::Tensor& y) {
  const int64_t tiles = (w.N + tile - 1) / tile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    T* buffer = static_cast<T*>(tile_buffer(sizeof(T) * tile * w.K));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = t * tile, r1 = std::min(w.N, r0 + tile);
      decode_rows<T>(w, p, r0, r1, buffer);
      auto weight = torch::from_blob(buffer, {r1 - r0, w.K}, x.options());
      auto out = y.narrow(1, r0, r1 - r0);
      if (bias.defined()) {
        at::addmm_out(out, bias.narrow(0, r0, r1 - r0), x, weight.t());  // as F.linear adds it: before rounding
      } else {
        at::mm_out(out, x, weight.t());
      }
    }
  });
}

// ---- Few tokens per call: no decoded tile -----------------------------------------------------------------
// With a handful of tokens the GEMM is too small to pay for writing and re-reading a decoded tile. Instead
// each row's weights are decoded in registers (float32: the reference's values before rounding to the output
// dtype, by the same operations) and multiplied with every token's activations, converted to float32 once per
// call, accumulating in float32 (explicit fused multiply-adds); R rows share each activation load.
constexpr int kMaxSmallTokens = 16;  // tiled.BYTE_TOKENS
constexpr int64_t kPrefetchBytes = 2048;  // codes requested this far ahead of the ones decoded

// The float32 weight a code decodes to, as the reference computes it before rounding.
inline float decoded_value(const Packed& w, int64_t index, int code) {
  const float s = w.scale[index];
  if (w.offset != nullptr) {
    const float q = static_cast<float>(code) * s;
    return q + w.offset[index];
  }
  return (static_cast<float>(code) - w.zero[index]) * s;
}

inline int code_of(const Packed& w, const uint8_t* src, int64_t j) {
  return w.bits == 8 ? src[j] : code_at(src, j, static_cast<int>(w.bits));
}

// Held-out super weights of rows [r0, r1): the exact value replaces what their code decodes to.
// `rounded`: the rows were multiplied with their weights rounded to bfloat16.
template <typename X>
void patch_rows(const Packed& w, const Patches& p, const std::vector<int64_t>& order, const X* x, int64_t T,
                int64_t r0, int64_t r1, bool rounded, float* sums /* [r1 - r0][T] */) {
  auto first = std::lower_bound(order.begin(), order.end(), r0, [&](int64_t i, int64_t r) { return p.rows[i] < r; });
  for (auto it = first; it != order.end() && p.rows[*it] < r1; ++it) {
    const int64_t r = p.rows[*it], c = p.cols[*it], index = r * w.G + c / w.group;
    float decoded = decoded_value(w, index, code_of(w, w.codes + index * w.B, c % w.group));
    if (rounded) decoded = static_cast<float>(c10::BFloat16(decoded));
    const float delta = p.values[*it] - decoded;
    for (int64_t t = 0; t < T; ++t) sums[(r - r0) * T + t] += static_cast<float>(x[t * w.K + c]) * delta;
  }
}

#if OSW_AVX512
// Rows r .. r+R-1, all T tokens: sums[i * ld + t] = dot(decoded row r+i, x[t]).
// EVEN: every group a multiple of 32 weights and none ragged; then the loop has no scalar tail and the
// accumulators stay in registers from one group to the next.
template <int T, int R, bool BYTES, bool EVEN>
void small_dot(const Packed& w, const Windows* windows, const float* x, int64_t r, float* sums, int64_t ld) {
  __m512 acc[R][T];
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < T; ++t) acc[i][t] = _mm512_setzero_ps();
  const int bits = static_cast<int>(w.bits);
  const bool offset = w.offset != nullptr;
  for (int64_t g = 0; g < w.G; ++g) {
    const int64_t start = g * w.group, n = std::min(w.group, w.K - start);
    const uint8_t* src[R];
    __m512 lut[R], s[R], zm[R];
    for (int i = 0; i < R; ++i) {
      const int64_t index = (r + i) * w.G + g;
      src[i] = w.codes + index * w.B;
      if constexpr (BYTES) {
        s[i] = _mm512_set1_ps(w.scale[index]);
        zm[i] = _mm512_set1_ps(offset ? w.offset[index] : w.zero[index]);
      } else {
        lut[i] = group_values_avx512(w, index);
      }
    }
    const float* xg = x + start;
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) {
      __m512 lo[R], hi[R];
      for (int i = 0; i < R; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(src[i] + (BYTES ? j : j / 8 * bits) + kPrefetchBytes), _MM_HINT_T0);
        if constexpr (BYTES) {
          lo[i] = scaled16(src[i] + j, s[i], zm[i], offset);
          hi[i] = scaled16(src[i] + j + 16, s[i], zm[i], offset);
        } else {
          const __m512i words = code_words(src[i], j, bits, windows);
          lo[i] = _mm512_permutexvar_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(words)), lut[i]);
          hi[i] = _mm512_permutexvar_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(words, 1)), lut[i]);
        }
      }
      for (int t = 0; t < T; ++t) {
        const __m512 a = _mm512_loadu_ps(xg + t * w.K + j), b = _mm512_loadu_ps(xg + t * w.K + j + 16);
        for (int i = 0; i < R; ++i) acc[i][t] = _mm512_fmadd_ps(hi[i], b, _mm512_fmadd_ps(lo[i], a, acc[i][t]));
      }
    }
    for (; !EVEN && j < n; j += 16) {  // a group that is not a multiple of 32: scalar decode, masked activations
      const int64_t m = std::min<int64_t>(16, n - j);
      const __mmask16 mask = static_cast<__mmask16>((1u << m) - 1);
      __m512 v[R];
      for (int i = 0; i < R; ++i) {
        alignas(64) float buffer[16] = {};
        const int64_t index = (r + i) * w.G + g;
        for (int64_t k = 0; k < m; ++k) buffer[k] = decoded_value(w, index, code_of(w, src[i], j + k));
        v[i] = _mm512_load_ps(buffer);
      }
      for (int t = 0; t < T; ++t) {
        const __m512 a = _mm512_maskz_loadu_ps(mask, xg + t * w.K + j);
        for (int i = 0; i < R; ++i) acc[i][t] = _mm512_fmadd_ps(v[i], a, acc[i][t]);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < T; ++t) sums[i * ld + t] = _mm512_reduce_add_ps(acc[i][t]);
}

#if OSW_BF16_DOT
// bfloat16 input: the decoded weights are rounded to bfloat16 (as the reference rounds them) and multiplied
// with the activations as they are, 32 products per instruction summed in pairs into float32 lanes.
template <int T, int R, bool BYTES, bool EVEN>
void small_dot_bf16(const Packed& w, const Windows* windows, const c10::BFloat16* x, int64_t r, float* sums,
                    int64_t ld) {
  __m512 acc[R][T];
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < T; ++t) acc[i][t] = _mm512_setzero_ps();
  const int bits = static_cast<int>(w.bits);
  const bool offset = w.offset != nullptr;
  for (int64_t g = 0; g < w.G; ++g) {
    const int64_t start = g * w.group, n = std::min(w.group, w.K - start);
    const uint8_t* src[R];
    __m512 s[R], zm[R];
    __m512i table[R];  // 2- to 4-bit codes: the group's 16 values in bfloat16, looked up 32 at a time (vpermw)
    for (int i = 0; i < R; ++i) {
      const int64_t index = (r + i) * w.G + g;
      src[i] = w.codes + index * w.B;
      if constexpr (BYTES) {
        s[i] = _mm512_set1_ps(w.scale[index]);
        zm[i] = _mm512_set1_ps(offset ? w.offset[index] : w.zero[index]);
      } else {
        table[i] = _mm512_zextsi256_si512(to_bits16<c10::BFloat16>(group_values_avx512(w, index)));
      }
    }
    const c10::BFloat16* xg = x + start;
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) {
      __m512bh v[R];
      for (int i = 0; i < R; ++i) {
        // Cold codes (each layer's weights leave the cache before its next call) stream from memory: ask for them
        // well ahead, with only R rows read at once the hardware prefetcher alone falls behind.
        _mm_prefetch(reinterpret_cast<const char*>(src[i] + (BYTES ? j : j / 8 * bits) + kPrefetchBytes), _MM_HINT_T0);
        if constexpr (BYTES) {
          v[i] = _mm512_cvtne2ps_pbh(scaled16(src[i] + j + 16, s[i], zm[i], offset), scaled16(src[i] + j, s[i], zm[i], offset));
        } else {
          v[i] = (__m512bh)_mm512_permutexvar_epi16(code_words(src[i], j, bits, windows), table[i]);
        }
      }
      for (int t = 0; t < T; ++t) {
        const __m512bh a = (__m512bh)_mm512_loadu_si512(xg + t * w.K + j);
        for (int i = 0; i < R; ++i) acc[i][t] = _mm512_dpbf16_ps(acc[i][t], v[i], a);
      }
    }
    if (!EVEN && j < n) {  // a group that is not a multiple of 32: scalar decode, masked activations
      const int64_t m = n - j;
      const __mmask32 mask = static_cast<__mmask32>((1ull << m) - 1);
      __m512bh v[R];
      for (int i = 0; i < R; ++i) {
        alignas(64) float buffer[32] = {};
        const int64_t index = (r + i) * w.G + g;
        for (int64_t k = 0; k < m; ++k) buffer[k] = decoded_value(w, index, code_of(w, src[i], j + k));
        v[i] = _mm512_cvtne2ps_pbh(_mm512_load_ps(buffer + 16), _mm512_load_ps(buffer));
      }
      for (int t = 0; t < T; ++t) {
        const __m512bh a = (__m512bh)_mm512_maskz_loadu_epi16(mask, xg + t * w.K + j);
        for (int i = 0; i < R; ++i) acc[i][t] = _mm512_dpbf16_ps(acc[i][t], v[i], a);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < T; ++t) sums[i * ld + t] = _mm512_reduce_add_ps(acc[i][t]);
}
#endif

// R rows at a time (a few more with fewer tokens: more rows share each activation load, registers permitting).
// Rows in groups of R (more rows share each activation load) and tokens in runs of up to 11: R * T
// accumulators, R decoded vectors and the decoding constants must fit the 32 registers. More tokens than 11 are
// taken in two runs over the same rows (the second one finds their codes in cache).
template <int T, bool BYTES, bool EVEN, typename X>
void small_run(const Packed& w, const Windows* windows, const X* x, int64_t r0, int64_t r1, float* sums, int64_t ld) {
  constexpr int R = T <= 4 ? 4 : (BYTES || T <= 8) ? 2 : 1;
  int64_t r = r0;
#if OSW_BF16_DOT
  if constexpr (std::is_same_v<X, c10::BFloat16>) {
    for (; r + R <= r1; r += R) small_dot_bf16<T, R, BYTES, EVEN>(w, windows, x, r, sums + (r - r0) * ld, ld);
    for (; r < r1; ++r) small_dot_bf16<T, 1, BYTES, EVEN>(w, windows, x, r, sums + (r - r0) * ld, ld);
    return;
  }
#endif
  if constexpr (std::is_same_v<X, float>) {
    for (; r + R <= r1; r += R) small_dot<T, R, BYTES, EVEN>(w, windows, x, r, sums + (r - r0) * ld, ld);
    for (; r < r1; ++r) small_dot<T, 1, BYTES, EVEN>(w, windows, x, r, sums + (r - r0) * ld, ld);
  }
}

template <int T, bool BYTES, bool EVEN, typename X>
void small_block(const Packed& w, const X* x, int64_t r0, int64_t r1, float* sums) {
  const Windows windows(w.bits < 4 ? static_cast<int>(w.bits) : 2, w.codes + w.N * w.G * w.B);
  if constexpr (T <= 11) {
    small_run<T, BYTES, EVEN>(w, &windows, x, r0, r1, sums, T);
  } else {
    constexpr int half = T / 2;
    for (int64_t r = r0; r < r1; r += 4) {  // 4 rows at a time: both runs read them while in L1
      const int64_t end = std::min(r1, r + 4);
      small_run<half, BYTES, EVEN>(w, &windows, x, r, end, sums + (r - r0) * T, T);
      small_run<T - half, BYTES, EVEN>(w, &windows, x + half * w.K, r, end, sums + (r - r0) * T + half, T);
    }
  }
}

template <int T, typename X>
void small_rows_fixed(const Packed& w, const X* x, int64_t r0, int64_t r1, float* sums) {
  const bool even = w.group % 32 == 0 && w.G * w.group == w.K;
  if (w.bits == 8) {
    even ? small_block<T, true, true>(w, x, r0, r1, sums) : small_block<T, true, false>(w, x, r0, r1, sums);
  } else {
    even ? small_block<T, false, true>(w, x, r0, r1, sums) : small_block<T, false, false>(w, x, r0, r1, sums);
  }
}

template <typename X, int... Ts>
void small_rows_dispatch(std::integer_sequence<int, Ts...>, int64_t T, const Packed& w, const X* x, int64_t r0,
                         int64_t r1, float* sums) {
  ((T == Ts + 1 ? small_rows_fixed<Ts + 1>(w, x, r0, r1, sums) : void()), ...);
}
#endif

// sums[(r - r0) * T + t] = dot(decoded row r, x[t]) for rows [r0, r1). X: float, or bfloat16 where the CPU has
// bfloat16 dot products (the weights are then rounded to bfloat16 first).
template <typename X>
void small_rows(const Packed& w, const X* x, int64_t T, int64_t r0, int64_t r1, float* sums) {
#if OSW_AVX512
  small_rows_dispatch(std::make_integer_sequence<int, kMaxSmallTokens>{}, T, w, x, r0, r1, sums);
#else
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t t = 0; t < T; ++t) sums[(r - r0) * T + t] = 0.0f;
    for (int64_t g = 0; g < w.G; ++g) {
      const int64_t index = r * w.G + g, start = g * w.group, n = std::min(w.group, w.K - start);
      const uint8_t* src = w.codes + index * w.B;
      for (int64_t j = 0; j < n; ++j) {
        const float v = decoded_value(w, index, code_of(w, src, j));
        for (int64_t t = 0; t < T; ++t) sums[(r - r0) * T + t] += v * static_cast<float>(x[t * w.K + start + j]);
      }
    }
  }
#endif
}

template <typename O, typename X>
void small_mm(const X* x, int64_t tokens, const Packed& w, const Patches& p, const torch::Tensor& bias,
              torch::Tensor& y) {
  std::vector<int64_t> order(p.count);
  for (int64_t i = 0; i < p.count; ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return p.rows[a] < p.rows[b]; });
  const O* b = bias.defined() ? bias.data_ptr<O>() : nullptr;
  O* out = y.data_ptr<O>();
  constexpr bool rounded = std::is_same_v<X, c10::BFloat16>;
  constexpr int64_t kBlock = 64;  // rows per task: a few KiB of codes, sums on the stack
  at::parallel_for(0, (w.N + kBlock - 1) / kBlock, 1, [&](int64_t begin, int64_t end) {
    float sums[kBlock * kMaxSmallTokens];
    for (int64_t block = begin; block < end; ++block) {
      const int64_t r0 = block * kBlock, r1 = std::min(w.N, r0 + kBlock);
      small_rows(w, x, tokens, r0, r1, sums);
      patch_rows(w, p, order, x, tokens, r0, r1, rounded, sums);
      for (int64_t r = r0; r < r1; ++r) {
        const float add = b != nullptr ? static_cast<float>(b[r]) : 0.0f;  // as F.linear: before rounding
        for (int64_t t = 0; t < tokens; ++t) out[t * w.N + r] = static_cast<O>(sums[(r - r0) * tokens + t] + add);
      }
    }
  });
}

}  // namespace

torch::Tensor tiled_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, torch::Tensor zero,
                           torch::Tensor offset, torch::Tensor rows, torch::Tensor cols, torch::Tensor values,
                           c10::optional<torch::Tensor> bias, int64_t group, int64_t bits, int64_t tile) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "x: contiguous 2-D CPU tensor");
  TORCH_CHECK(tile > 0, "tile > 0");
  const Packed w = packed_of(codes, scale, zero, offset, group, bits, x.size(1));
  const Patches p = patches_of(rows, cols, values, w.N, w.K);
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.N && bias->scalar_type() == x.scalar_type(),
                "bias: [N] in the input dtype");
    b = *bias;
  }
  auto y = torch::empty({x.size(0), w.N}, x.options());
  switch (x.scalar_type()) {
    case torch::kBFloat16: tiled_mm<c10::BFloat16>(x, w, p, b, tile, y); break;
    case torch::kHalf: tiled_mm<c10::Half>(x, w, p, b, tile, y); break;
    case torch::kFloat32: tiled_mm<float>(x, w, p, b, tile, y); break;
    default: TORCH_CHECK(false, "x: bfloat16, float16 or float32, got ", x.scalar_type());
  }
  return y;
}

torch::Tensor small_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, torch::Tensor zero,
                           torch::Tensor offset, torch::Tensor rows, torch::Tensor cols, torch::Tensor values,
                           c10::optional<torch::Tensor> bias, int64_t group, int64_t bits) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "x: contiguous 2-D CPU tensor");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxSmallTokens, "x: 1 to ", kMaxSmallTokens, " tokens, got ", x.size(0));
  const Packed w = packed_of(codes, scale, zero, offset, group, bits, x.size(1));
  const Patches p = patches_of(rows, cols, values, w.N, w.K);
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.N && bias->scalar_type() == x.scalar_type() &&
                    bias->is_contiguous(),
                "bias: contiguous [N] in the input dtype");
    b = *bias;
  }
  auto y = torch::empty({x.size(0), w.N}, x.options());
#if OSW_BF16_DOT
  if (x.scalar_type() == torch::kBFloat16) {
    small_mm<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), x.size(0), w, p, b, y);
    return y;
  }
#endif
  const torch::Tensor xf = x.to(torch::kFloat32).contiguous();  // once per call
  const float* xp = xf.data_ptr<float>();
  switch (x.scalar_type()) {
    case torch::kBFloat16: small_mm<c10::BFloat16>(xp, x.size(0), w, p, b, y); break;
    case torch::kHalf: small_mm<c10::Half>(xp, x.size(0), w, p, b, y); break;
    case torch::kFloat32: small_mm<float>(xp, x.size(0), w, p, b, y); break;
    default: TORCH_CHECK(false, "x: bfloat16, float16 or float32, got ", x.scalar_type());
  }
  return y;
}

torch::Tensor dequantize(torch::Tensor codes, torch::Tensor scale, torch::Tensor zero, torch::Tensor offset,
                         torch::Tensor rows, torch::Tensor cols, torch::Tensor values, int64_t group, int64_t bits,
                         int64_t K, torch::ScalarType dtype) {
  const Packed w = packed_of(codes, scale, zero, offset, group, bits, K);
  const Patches p = patches_of(rows, cols, values, w.N, w.K);
  auto out = torch::empty({w.N, K}, torch::dtype(dtype));
  switch (dtype) {
    case torch::kBFloat16: decode_rows<c10::BFloat16>(w, p, 0, w.N, out.data_ptr<c10::BFloat16>()); break;
    case torch::kHalf: decode_rows<c10::Half>(w, p, 0, w.N, out.data_ptr<c10::Half>()); break;
    case torch::kFloat32: decode_rows<float>(w, p, 0, w.N, out.data_ptr<float>()); break;
    default: TORCH_CHECK(false, "dtype: bfloat16, float16 or float32, got ", dtype);
  }
  return out;
}

bool vectorized() { return OSW_AVX512; }

// The products run without the GIL (arguments are converted before it is released and the result after it is
// taken back): Python threads serving one model compute at the same time.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("tiled_linear", &tiled_linear, "y = x @ dequantize(codes)^T, decoded tile by tile", release());
  m.def("small_linear", &small_linear,
        "y = x @ dequantize(codes)^T for a few tokens (up to small_tokens()), decoded in registers", release());
  m.def("small_tokens", []() { return kMaxSmallTokens; }, "the most tokens small_linear takes");
  m.def("dequantize", &dequantize, "the dense weight, decoded as tiled_linear decodes it", release());
  m.def("vectorized", &vectorized, "whether the AVX-512 decoder was compiled in");
}
