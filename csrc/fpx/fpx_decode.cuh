// Bit-trick decoding of FP4 / int4 / FP6 codes for the small-M GEMV (fpx_gemv.cu), host and device alike, so the
// launcher can check the very same code against the value table it is given.
//
// Every format is sign-magnitude with the sign as the MSB. Placing the magnitude bits so that the format's mantissa
// MSB lands on the fp16 mantissa MSB (bit 9) and the sign on bit 15 gives an fp16 whose value is exactly
// value(code) * 2**-kPow, for normal *and* subnormal codes alike (the fp16 exponent field is the format's exponent
// field, fp16 subnormals are the format's subnormals scaled by the same power of two). int4 is the "format" whose
// three magnitude bits are all mantissa bits of a subnormal. The fp16 -> fp32 conversion is exact; the GEMV folds
// 2**kPow into its output, so no per-code multiply is needed.
//
//   format     bits  mantissa bits  kManShift (= 10 - mantissa bits)  pow
//   fp4_e2m1   4     1              9                                  14  (15 - bias 1)
//   int4       4     3 (all)        7                                  17  (subnormal: mag / 8 * 2**-14)
//   fp6_e3m2   6     2              8                                  12  (15 - bias 3)
//   fp6_e2m3   6     3              7                                  14  (15 - bias 1)
//
// Packed layout (ditkern/formats.py): FP4 / int4 codes 2j and 2j+1 in the low / high nibble of byte j; FP6 as two
// planes per row: bytes [0, K_pad/2) hold the high 4 bits of each code (same nibble order as FP4), bytes
// [K_pad/2, 3*K_pad/4) the low 2 bits (code k: byte K_pad/2 + k/4, bits 2*(k%4)). code = hi4 << 2 | lo2, so hi4 is
// the sign and the top 3 magnitude bits.
//
// Two codes are decoded per 32-bit word operation: the half2 (code j, code j+4) of the 8 codes of one 32-bit word of
// nibbles lies 16 bits apart, so one shift + mask moves both.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define DITKERN_HD __host__ __device__ __forceinline__
#else
#define DITKERN_HD inline
#endif

namespace ditkern {
namespace fpx {

enum : int { kFp4E2m1 = 0, kInt4 = 1, kFp6E3m2 = 2, kFp6E2m3 = 3, kNumFormats = 4 };

// The per-format constants, runtime values (the GEMV is compiled per code width only: the shifts and masks below
// cost the same from registers as from immediates).
struct Decoder {
  uint32_t rs;        // right shift from "high nibble at the top of each fp16 half" to the magnitude's place
  uint32_t mag_mask;  // the magnitude bits the high nibble provides, both halves
  uint32_t lo_shift;  // FP6: left shift of the spread low plane onto the mantissa LSB (= kManShift)
  uint32_t lo_mask;   // FP6: the 2 low magnitude bits, both halves
  int pow;            // value = fp16 value * 2**pow
  int bits;
};

DITKERN_HD uint32_t twice(uint32_t m) { return m | (m << 16); }

// kManShift = 10 - mantissa bits; pow = 15 - bias (int4: 17, its magnitudes are subnormal mantissas / 8 * 2**-14).
DITKERN_HD Decoder decoder(int fmt) {
  const int bits = fmt >= kFp6E3m2 ? 6 : 4;
  const uint32_t ms = fmt == kFp4E2m1 ? 9 : fmt == kFp6E3m2 ? 8 : 7;
  const int pow = fmt == kInt4 ? 17 : fmt == kFp6E3m2 ? 12 : 14;
  const uint32_t top = bits == 4 ? ms : ms + 2;  // where the nibble's 3 magnitude bits go
  return Decoder{12 - top, twice(0x7u << top), ms, twice(0x3u << ms), pow, bits};
}

// half2 bits (low: code j, high: code j + 4) of the 8 nibble codes in `w` (code i in bits [4i, 4i + 4)): shifting
// nibble j to the top of the low half puts nibble j + 4 at the top of the high half and both signs on bits 15 / 31.
DITKERN_HD uint32_t fp4_pair(uint32_t w, int j, const Decoder& d) {
  const uint32_t b = w << (12 - 4 * j);
  return ((b >> d.rs) & d.mag_mask) | (b & 0x80008000u);
}

// The same for 8 FP6 codes: `w` holds their high nibbles (code i in bits [4i, 4i + 4)), `lo_s` their low 2 bits
// spread (code i < 4 in bits [2i, 2i + 2), code i >= 4 in bits [16 + 2(i-4), ...)) and shifted left by lo_shift.
DITKERN_HD uint32_t fp6_pair(uint32_t w, uint32_t lo_s, int j, const Decoder& d) {
  const uint32_t b = w << (12 - 4 * j);
  return ((b >> d.rs) & d.mag_mask) | (b & 0x80008000u) | ((lo_s >> (2 * j)) & d.lo_mask);
}

// PRMT: __byte_perm on the device, the same byte selection on the host (the sign-replicate mode is not used here).
DITKERN_HD uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t s) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(x, y, s);
#else
  const uint64_t v = uint64_t(x) | (uint64_t(y) << 32);
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= uint32_t((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return r;
#endif
}

// Selector that spreads the 16-bit half `half` of a low-plane word (8 codes x 2 bits) so that codes 0-3 sit in
// byte 0 and codes 4-7 in byte 2 (bytes 1 and 3 taken from the zero operand).
DITKERN_HD uint32_t lo_spread_selector(int half) { return half ? 0x4342u : 0x4140u; }

// The fp16 pairs of codes 8q .. 8q + 7 of a 32-code chunk (what the GEMV decodes per step): `hi` is the chunk's
// 32-bit word q of FP4 codes / FP6 high nibbles (bytes 4q .. 4q + 3 of its 16 bytes), `lo` its FP6 low-plane word
// q / 2 (bytes 4(q/2) .. of its 8 bytes; ignored for 4-bit codes). h[j]: low half code 8q + j, high half 8q + j + 4.
template <int BITS> DITKERN_HD void chunk_pairs(uint32_t hi, uint32_t lo, int q, const Decoder& d, uint32_t* h) {
  uint32_t lo_s = 0;
  if constexpr (BITS == 6) lo_s = byte_perm(lo, 0u, lo_spread_selector(q & 1)) << d.lo_shift;
  for (int j = 0; j < 4; ++j) h[j] = BITS == 4 ? fp4_pair(hi, j, d) : fp6_pair(hi, lo_s, j, d);
}

// Exact fp32 value of fp16 bits (host side of the check; the device converts with cvt.f32.f16).
inline float half_bits_to_float(uint32_t h) {
  const int e = (h >> 10) & 0x1F, m = h & 0x3FF;
  const float mag = e == 0 ? float(m) * (1.0f / 1024.0f) * (1.0f / 16384.0f)
                           : (1.0f + float(m) * (1.0f / 1024.0f)) * float(1u << e) * (1.0f / 32768.0f);
  return (h & 0x8000) ? -mag : mag;
}

}  // namespace fpx
}  // namespace ditkern
