// Transposing copies of the CPU kernels: a block of an image's (D, HW) plane
// to (n, D) rows and back (the row path), and the prototype sums' 16 x 16
// blocks. On a plane both are bound by the memory here (one thread, AVX-512,
// 64 blocks of 720 x 1024 from a 720 x 65,536 plane: 37.5 ms element by
// element in 16 x 16 blocks, 39.9 ms through transpose_block).
#pragma once
#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_isa.h"

namespace protoseg {
namespace PROTOSEG_CPU_CAPABILITY {  // one copy per instruction-set variant (cpu_isa.h)

constexpr int64_t kTransposeBlock = 16;

// dst row j (stride ld_dst) <- column j of the 16 x 16 block of src (16 rows
// of stride ld_src), j = 0..15. In float with AVX-512: 16 loads and 64
// in-register shuffles (pairs of rows interleaved by element, then by pairs,
// then 128-bit lanes twice); otherwise element by element.
template <typename T>
inline void transpose_block(const T* src, int64_t ld_src, T* dst, int64_t ld_dst) {
  for (int64_t d = 0; d < kTransposeBlock; ++d)
    for (int64_t j = 0; j < kTransposeBlock; ++j) dst[j * ld_dst + d] = src[d * ld_src + j];
}

#if defined(__AVX512F__)
template <>
inline void transpose_block<float>(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane L: rows 2i, 2i+1 of columns 4L, 4L+1 (lo) and 4L+2, 4L+3 (hi)
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // r[4g + c], lane L: column 4L + c, rows 4g..4g+3
    const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * g + 2]), d = _mm512_castps_pd(t[4 * g + 3]);
    r[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int c = 0; c < 4; ++c) {  // lane L of r[c], r[4 + c], r[8 + c], r[12 + c]: column 4L + c
    const __m512 v = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88), w = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xdd);
    const __m512 v2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    const __m512 w2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xdd);
    _mm512_storeu_ps(dst + c * ld_dst, _mm512_shuffle_f32x4(v, v2, 0x88));
    _mm512_storeu_ps(dst + (8 + c) * ld_dst, _mm512_shuffle_f32x4(v, v2, 0xdd));
    _mm512_storeu_ps(dst + (4 + c) * ld_dst, _mm512_shuffle_f32x4(w, w2, 0x88));
    _mm512_storeu_ps(dst + (12 + c) * ld_dst, _mm512_shuffle_f32x4(w, w2, 0xdd));
  }
}
#endif

// dst (cols, rows) <- the transpose of src (rows, cols), with row strides
// ld_dst and ld_src. 16 x 16 blocks, so both sides stream whole cache lines
// (a strided element-wise copy would touch one line per element).
template <typename T>
void transpose(T* dst, int64_t ld_dst, const T* src, int64_t ld_src, int64_t rows, int64_t cols) {
  constexpr int64_t kB = kTransposeBlock;
  for (int64_t r0 = 0; r0 < rows; r0 += kB) {
    const int64_t r1 = std::min(rows, r0 + kB);
    for (int64_t c0 = 0; c0 < cols; c0 += kB) {
      const int64_t c1 = std::min(cols, c0 + kB);
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
    }
  }
}

}  // namespace PROTOSEG_CPU_CAPABILITY
}  // namespace protoseg
