// What kernels/decoder.cu uses from CUDA, for the host (kernels/host_twin.py builds it with g++).
//
// The launch indices are thread-local globals that the launcher (twin.cpp) sets before calling
// a kernel body once per (block, thread); vector types are plain structs with CUDA's layout;
// __half / __nv_bfloat16 store the same 16 bits and convert with the same rounding CUDA's
// intrinsics name (_rn: round to nearest, ties to even; NaN stays NaN, overflow goes to inf).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct ci_dim3 {
  unsigned int x, y, z;
};
extern thread_local ci_dim3 threadIdx, blockIdx, blockDim, gridDim;

struct float2 {
  float x, y;
};
// Without CUDA's alignas(16): g++ would then use aligned SSE moves, and a kernel bug that
// vector-loads a misaligned pointer would crash the test process instead of failing it
// (__ldg below checks the address and reports it).
struct float4 {
  float x, y, z, w;
};
struct uint4 {
  unsigned int x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

// A misaligned vector load faults on the GPU; x86 would just do it, so the twin records it
// and the launch fails (twin.cpp): a wrong alignment test in a kernel cannot pass unseen.
extern thread_local int ci_misaligned_loads;

// The read-only cache load: on the host a plain load, with the device's alignment rule.
template <typename T>
inline T __ldg(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % sizeof(T) != 0 && sizeof(T) <= 16) ++ci_misaligned_loads;
  T value;
  std::memcpy(&value, p, sizeof value);
  return value;
}

using std::fmaf;  // a true fused multiply-add, as on the device

// ---- 16-bit floats --------------------------------------------------------------------------

inline uint32_t ci_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float ci_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t ci_f32_to_f16_rn(float f) {
  const uint32_t x = ci_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t exponent = (x >> 23) & 0xffu;
  uint32_t mantissa = x & 0x7fffffu;
  if (exponent == 0xffu) return static_cast<uint16_t>(sign | 0x7c00u | (mantissa ? 0x200u | (mantissa >> 13) : 0u));
  const int e = static_cast<int>(exponent) - 127 + 15;  // the half's biased exponent
  if (e >= 31) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow: inf
  if (e <= 0) {  // a half subnormal (or zero): units of 2^-24
    if (e < -10) return static_cast<uint16_t>(sign);  // below half the smallest subnormal
    mantissa |= 0x800000u;
    const int shift = 14 - e;
    uint32_t h = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rest > half || (rest == half && (h & 1u))) ++h;  // may carry into the normal range
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = sign | (static_cast<uint32_t>(e) << 10) | (mantissa >> 13);
  const uint32_t rest = mantissa & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry may reach inf: correct
  return static_cast<uint16_t>(h);
}

inline float ci_f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  if (exponent == 0x1fu) return ci_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in fp32
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  return ci_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline uint16_t ci_f32_to_bf16_rn(float f) {
  const uint32_t x = ci_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

inline float ci_bf16_to_f32(uint16_t b) { return ci_float(static_cast<uint32_t>(b) << 16); }

struct __half {
  uint16_t bits;
};
struct __half2 {
  __half x, y;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline float __half2float(__half h) { return ci_f16_to_f32(h.bits); }
inline __half __float2half_rn(float f) { return __half{ci_f32_to_f16_rn(f)}; }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }

inline float __bfloat162float(__nv_bfloat16 b) { return ci_bf16_to_f32(b.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{ci_f32_to_bf16_rn(f)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 b) { return float2{__bfloat162float(b.x), __bfloat162float(b.y)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}

static_assert(sizeof(__half2) == 4 && sizeof(__nv_bfloat162) == 4 && sizeof(uint4) == 16, "CUDA's layouts");
