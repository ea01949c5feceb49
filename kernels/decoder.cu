// Coded-InvNet online-decoder kernels (fused, memory-bound), loaded by kernels/cuda_decoder.py.
//
// Notation: every result is a flat vector of `n` elements (a batch of B d-vectors is n = B*d,
// all operations are elementwise, so the batch axis needs no special handling). T is the
// storage type (float, __half, __nv_bfloat16); arithmetic always happens in fp32.
//
// Calling convention: each kernel takes ONE struct by value (kernel parameters live in the
// constant bank, so the pointer lists and the small decoding matrix are broadcast reads and
// no host->device copy precedes a launch). Inputs are an array of up to 64 device pointers,
// one per result; a packed [k-1, B, d] buffer is passed as pointers base + i*B*d elements. The host packs these structs byte for byte;
// the static_asserts below pin the layout that kernels/cuda_decoder.py writes.
//
// Kernels (extern "C", one per storage type suffix _f32 / _f16 / _bf16):
//   ci_one_shot_decode_*       out = parity_scale * parity - sum_{i<m} inputs[i]   (n = k+1 code)
//   ci_online_update_*         est = beta*est + alpha*x   (est fp32), optional fused copy of x,
//                              or, on the last arrival, out = final_scale*(beta*est + alpha*x)
//   ci_general_decode_*_r{1,2,4,8}  outputs[r] = sum_j coeffs[r][j] * inputs[j], r < R
//   ci_spin_wait               keeps a stream busy (benchmark only: hides host launch gaps)
//
// Every kernel uses a grid-stride loop over 16-byte packs (float4 / 8 halves) when all its
// pointers are 16-byte aligned, and a scalar loop for the tail (and for unaligned pointers).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stddef.h>
#include <stdint.h>

#define CI_MAX_INPUTS 64
#define CI_MAX_OUTPUTS 8
#define CI_BLOCK 256
// At least 3 resident blocks per SM caps registers at 85/thread: enough for the one-shot
// kernel to keep 8 16-byte loads in flight and for the general decode's accumulators
// (8 rows x 8 halves) without spills; plain __launch_bounds__(256) made ptxas cap at 32.
#define CI_MIN_BLOCKS 3

struct OneShotParams {
  const void* inputs[CI_MAX_INPUTS];  // the m systematic results that arrived
  const void* parity;
  void* out;
  long long n;  // elements per vector
  float parity_scale;
  int num_inputs;  // m (k - 1 for the n = k+1 code), 0 <= m <= CI_MAX_INPUTS
};
static_assert(sizeof(OneShotParams) == 544, "layout pinned by kernels/cuda_decoder.py");
static_assert(offsetof(OneShotParams, parity) == 512, "layout");
static_assert(offsetof(OneShotParams, n) == 528, "layout");
static_assert(offsetof(OneShotParams, num_inputs) == 540, "layout");

struct OnlineUpdateParams {
  float* est;         // fp32 running estimate (unused and not touched when final_out is set)
  const void* x;      // the result that just arrived
  void* copy_out;     // nullable: also store x here (an arrived systematic row of the output)
  void* final_out;    // nullable: write final_scale * (beta*est + alpha*x) here instead of est
  long long n;
  float alpha;
  float beta;         // 0 -> est is not read (first arrival; no memset needed)
  float final_scale;
  int pad_;
};
static_assert(sizeof(OnlineUpdateParams) == 56, "layout pinned by kernels/cuda_decoder.py");
static_assert(offsetof(OnlineUpdateParams, n) == 32, "layout");
static_assert(offsetof(OnlineUpdateParams, final_scale) == 48, "layout");

struct GeneralParams {
  const void* inputs[CI_MAX_INPUTS];
  void* outputs[CI_MAX_OUTPUTS];
  float coeffs[CI_MAX_OUTPUTS][CI_MAX_INPUTS];  // row r, column j; rows >= R, cols >= K unused
  long long n;
  int num_inputs;   // K
  int num_outputs;  // R <= the kernel's compile-time R_MAX
};
static_assert(sizeof(GeneralParams) == 2640, "layout pinned by kernels/cuda_decoder.py");
static_assert(offsetof(GeneralParams, coeffs) == 576, "layout");
static_assert(offsetof(GeneralParams, n) == 2624, "layout");

// ---- 16-byte packs: load/store E = 16 / sizeof(T) elements as fp32 -------------------------

template <typename T>
struct Pack;

template <>
struct Pack<float> {
  static constexpr int E = 4;
  __device__ __forceinline__ static void load(const void* base, long long i, float (&v)[E]) {
    const float4 r = __ldg(reinterpret_cast<const float4*>(base) + i);
    v[0] = r.x; v[1] = r.y; v[2] = r.z; v[3] = r.w;
  }
  __device__ __forceinline__ static void store(void* base, long long i, const float (&v)[E]) {
    reinterpret_cast<float4*>(base)[i] = make_float4(v[0], v[1], v[2], v[3]);
  }
  __device__ __forceinline__ static float load1(const void* base, long long i) {
    return __ldg(reinterpret_cast<const float*>(base) + i);
  }
  __device__ __forceinline__ static void store1(void* base, long long i, float v) {
    reinterpret_cast<float*>(base)[i] = v;
  }
};

template <>
struct Pack<__half> {
  static constexpr int E = 8;
  __device__ __forceinline__ static void load(const void* base, long long i, float (&v)[E]) {
    const uint4 r = __ldg(reinterpret_cast<const uint4*>(base) + i);
    const __half2* h = reinterpret_cast<const __half2*>(&r);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float2 f = __half22float2(h[q]);
      v[2 * q] = f.x; v[2 * q + 1] = f.y;
    }
  }
  __device__ __forceinline__ static void store(void* base, long long i, const float (&v)[E]) {
    uint4 r;
    __half2* h = reinterpret_cast<__half2*>(&r);
#pragma unroll
    for (int q = 0; q < 4; ++q) h[q] = __floats2half2_rn(v[2 * q], v[2 * q + 1]);
    reinterpret_cast<uint4*>(base)[i] = r;
  }
  __device__ __forceinline__ static float load1(const void* base, long long i) {
    return __half2float(reinterpret_cast<const __half*>(base)[i]);
  }
  __device__ __forceinline__ static void store1(void* base, long long i, float v) {
    reinterpret_cast<__half*>(base)[i] = __float2half_rn(v);
  }
};

template <>
struct Pack<__nv_bfloat16> {
  static constexpr int E = 8;
  __device__ __forceinline__ static void load(const void* base, long long i, float (&v)[E]) {
    const uint4 r = __ldg(reinterpret_cast<const uint4*>(base) + i);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&r);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float2 f = __bfloat1622float2(h[q]);
      v[2 * q] = f.x; v[2 * q + 1] = f.y;
    }
  }
  __device__ __forceinline__ static void store(void* base, long long i, const float (&v)[E]) {
    uint4 r;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&r);
#pragma unroll
    for (int q = 0; q < 4; ++q) h[q] = __floats2bfloat162_rn(v[2 * q], v[2 * q + 1]);
    reinterpret_cast<uint4*>(base)[i] = r;
  }
  __device__ __forceinline__ static float load1(const void* base, long long i) {
    return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(base)[i]);
  }
  __device__ __forceinline__ static void store1(void* base, long long i, float v) {
    reinterpret_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v);
  }
};

__device__ __forceinline__ uintptr_t addr(const void* p) { return reinterpret_cast<uintptr_t>(p); }

__device__ __forceinline__ long long global_thread() {
  return static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ long long grid_stride() {
  return static_cast<long long>(gridDim.x) * blockDim.x;
}

// ---- (a) one-shot decode for the n = k+1 code ---------------------------------------------

template <typename T>
__device__ __forceinline__ void one_shot_decode(const OneShotParams& p) {
  using P = Pack<T>;
  constexpr int E = P::E;
  const int m = p.num_inputs;
  uintptr_t any = addr(p.parity) | addr(p.out);
  for (int i = 0; i < m; ++i) any |= addr(p.inputs[i]);
  const long long tid = global_thread(), stride = grid_stride();
  long long head = 0;  // elements covered by the vector loop
  if ((any & 15u) == 0) {
    const long long packs = p.n / E;
    for (long long v = tid; v < packs; v += stride) {
      float acc[E];
      P::load(p.parity, v, acc);
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] *= p.parity_scale;
      // Issue 8 independent 16-byte loads before the first use: at small n (one MNIST
      // batch on one SM) the chain of dependent load rounds, not bandwidth, sets the latency.
      int i = 0;
      for (; i + 8 <= m; i += 8) {
        float x[8][E];
#pragma unroll
        for (int u = 0; u < 8; ++u) P::load(p.inputs[i + u], v, x[u]);
#pragma unroll
        for (int u = 0; u < 8; ++u)
#pragma unroll
          for (int e = 0; e < E; ++e) acc[e] -= x[u][e];
      }
      for (; i < m; ++i) {
        float x[E];
        P::load(p.inputs[i], v, x);
#pragma unroll
        for (int e = 0; e < E; ++e) acc[e] -= x[e];
      }
      P::store(p.out, v, acc);
    }
    head = packs * E;
  }
  for (long long j = head + tid; j < p.n; j += stride) {
    float acc = P::load1(p.parity, j) * p.parity_scale;
    for (int i = 0; i < m; ++i) acc -= P::load1(p.inputs[i], j);
    P::store1(p.out, j, acc);
  }
}

// ---- (b) online update: O(n) per arrival, independent of k --------------------------------

template <typename T>
__device__ __forceinline__ void online_update(const OnlineUpdateParams& p) {
  using P = Pack<T>;
  using F = Pack<float>;
  constexpr int E = P::E;
  const bool read_est = p.beta != 0.0f;
  const bool finish = p.final_out != nullptr;
  const uintptr_t any = addr(p.est) | addr(p.x) | addr(p.copy_out) | addr(p.final_out);
  const long long tid = global_thread(), stride = grid_stride();
  long long head = 0;
  if ((any & 15u) == 0) {
    const long long packs = p.n / E;
    for (long long v = tid; v < packs; v += stride) {
      float x[E], acc[E];
      P::load(p.x, v, x);
      if (read_est) {
        // est is fp32: one T-pack of E elements spans E/4 float4 packs. A plain (coherent)
        // load, not __ldg: this kernel writes est, so it is not read-only for its lifetime.
#pragma unroll
        for (int h = 0; h < E / 4; ++h) {
          const float4 part = reinterpret_cast<const float4*>(p.est)[v * (E / 4) + h];
          acc[4 * h + 0] = p.beta * part.x;
          acc[4 * h + 1] = p.beta * part.y;
          acc[4 * h + 2] = p.beta * part.z;
          acc[4 * h + 3] = p.beta * part.w;
        }
      } else {
#pragma unroll
        for (int e = 0; e < E; ++e) acc[e] = 0.0f;
      }
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] += p.alpha * x[e];
      if (p.copy_out != nullptr) P::store(p.copy_out, v, x);
      if (finish) {
#pragma unroll
        for (int e = 0; e < E; ++e) acc[e] *= p.final_scale;
        P::store(p.final_out, v, acc);
      } else {
#pragma unroll
        for (int h = 0; h < E / 4; ++h) {
          float part[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) part[e] = acc[4 * h + e];
          F::store(p.est, v * (E / 4) + h, part);
        }
      }
    }
    head = packs * E;
  }
  for (long long j = head + tid; j < p.n; j += stride) {
    const float x = P::load1(p.x, j);
    float acc = read_est ? p.beta * p.est[j] : 0.0f;
    acc += p.alpha * x;
    if (p.copy_out != nullptr) P::store1(p.copy_out, j, x);
    if (finish) {
      P::store1(p.final_out, j, acc * p.final_scale);
    } else {
      p.est[j] = acc;
    }
  }
}

// ---- (c) general (n, k) decode: R output rows from K inputs, each input read once ----------

template <typename T, int R_MAX>
__device__ __forceinline__ void general_decode(const GeneralParams& p) {
  using P = Pack<T>;
  constexpr int E = P::E;
  const int K = p.num_inputs, R = p.num_outputs;
  uintptr_t any = 0;
  for (int j = 0; j < K; ++j) any |= addr(p.inputs[j]);
  for (int r = 0; r < R; ++r) any |= addr(p.outputs[r]);
  const long long tid = global_thread(), stride = grid_stride();
  long long head = 0;
  if ((any & 15u) == 0) {
    const long long packs = p.n / E;
    for (long long v = tid; v < packs; v += stride) {
      float acc[R_MAX][E];
#pragma unroll
      for (int r = 0; r < R_MAX; ++r)
#pragma unroll
        for (int e = 0; e < E; ++e) acc[r][e] = 0.0f;
#pragma unroll 4
      for (int j = 0; j < K; ++j) {
        float x[E];
        P::load(p.inputs[j], v, x);
#pragma unroll
        for (int r = 0; r < R_MAX; ++r) {
          const float c = p.coeffs[r][j];  // rows >= R are zero-filled by the host
#pragma unroll
          for (int e = 0; e < E; ++e) acc[r][e] = fmaf(c, x[e], acc[r][e]);
        }
      }
#pragma unroll
      for (int r = 0; r < R_MAX; ++r)
        if (r < R) P::store(p.outputs[r], v, acc[r]);
    }
    head = packs * E;
  }
  for (long long i = head + tid; i < p.n; i += stride) {
    float acc[R_MAX];
#pragma unroll
    for (int r = 0; r < R_MAX; ++r) acc[r] = 0.0f;
    for (int j = 0; j < K; ++j) {
      const float x = P::load1(p.inputs[j], i);
#pragma unroll
      for (int r = 0; r < R_MAX; ++r) acc[r] = fmaf(p.coeffs[r][j], x, acc[r]);
    }
#pragma unroll
    for (int r = 0; r < R_MAX; ++r)
      if (r < R) P::store1(p.outputs[r], i, acc[r]);
  }
}

// ---- extern "C" entry points (names are looked up by kernels/cuda_decoder.py) --------------

#define CI_DEFINE_TYPED(SUFFIX, T)                                                         \
  extern "C" __global__ void __launch_bounds__(CI_BLOCK, CI_MIN_BLOCKS)                                   \
      ci_one_shot_decode_##SUFFIX(const OneShotParams p) { one_shot_decode<T>(p); }        \
  extern "C" __global__ void __launch_bounds__(CI_BLOCK, CI_MIN_BLOCKS)                                   \
      ci_online_update_##SUFFIX(const OnlineUpdateParams p) { online_update<T>(p); }       \
  extern "C" __global__ void __launch_bounds__(CI_BLOCK, CI_MIN_BLOCKS)                                   \
      ci_general_decode_##SUFFIX##_r1(const GeneralParams p) { general_decode<T, 1>(p); }  \
  extern "C" __global__ void __launch_bounds__(CI_BLOCK, CI_MIN_BLOCKS)                                   \
      ci_general_decode_##SUFFIX##_r2(const GeneralParams p) { general_decode<T, 2>(p); }  \
  extern "C" __global__ void __launch_bounds__(CI_BLOCK, CI_MIN_BLOCKS)                                   \
      ci_general_decode_##SUFFIX##_r4(const GeneralParams p) { general_decode<T, 4>(p); }  \
  extern "C" __global__ void __launch_bounds__(CI_BLOCK, CI_MIN_BLOCKS)                                   \
      ci_general_decode_##SUFFIX##_r8(const GeneralParams p) { general_decode<T, 8>(p); }

CI_DEFINE_TYPED(f32, float)
CI_DEFINE_TYPED(f16, __half)
CI_DEFINE_TYPED(bf16, __nv_bfloat16)

#ifndef CI_HOST_TWIN  // device-only: PTX's global timer (the host twin, kernels/host_twin.py, has no use for it)
// Busy-waits `duration_ns` on one thread so that launches queued behind it run back to back,
// timing the device rather than Python's launch overhead (benchmark use only).
extern "C" __global__ void ci_spin_wait(long long duration_ns) {
  unsigned long long start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    __nanosleep(1000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (static_cast<long long>(now - start) < duration_ns);
}
#endif  // CI_HOST_TWIN
