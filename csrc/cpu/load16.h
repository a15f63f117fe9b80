// 16 values of float32, bfloat16 or float16 memory as float32 (exact), for the AVX-512 tiers
// of every kernel family. Included inside a tier's namespace: the includer brings
// <immintrin.h> and <type_traits>.
#pragma once

#if defined(__AVX512F__)
template <class T, bool kHalf>  // T: float, or uint16_t holding bfloat16 (kHalf false) / float16
inline __m512 load16(const T* a) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(a);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
    if constexpr (kHalf) return _mm512_cvtph_ps(h);
    else return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}
#endif
