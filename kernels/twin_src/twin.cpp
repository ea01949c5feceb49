// decoder.cu's kernels compiled for the host (kernels/host_twin.py): one C entry point that
// runs a kernel over its launch grid on CPU memory, from the same parameter bytes the GPU gets.
//
// Blocks and threads run one after another. That computes what any GPU schedule computes
// because every kernel here is an elementwise grid-stride loop: no shared memory, no
// barriers, and each element is read and written by exactly one thread.

#define CI_HOST_TWIN 1
#include "cuda_shim.h"
#include "../decoder.cu"

thread_local ci_dim3 threadIdx, blockIdx, blockDim, gridDim;
thread_local int ci_misaligned_loads = 0;

namespace {

using Runner = int (*)(const void*, long long, unsigned, unsigned);

template <typename Params, void (*Kernel)(Params)>
int run(const void* bytes, long long nbytes, unsigned grid, unsigned block) {
  if (nbytes != static_cast<long long>(sizeof(Params))) return -2;
  Params params;
  std::memcpy(&params, bytes, sizeof params);  // by value, as the launch copies it to the constant bank
  gridDim = ci_dim3{grid, 1, 1};
  blockDim = ci_dim3{block, 1, 1};
  ci_misaligned_loads = 0;
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx = ci_dim3{b, 0, 0};
    for (unsigned t = 0; t < block; ++t) {
      threadIdx = ci_dim3{t, 0, 0};
      Kernel(params);
    }
  }
  return ci_misaligned_loads == 0 ? 0 : -3;
}

struct Entry {
  const char* name;
  Runner runner;
  long long param_bytes;
};

#define CI_TWIN_TYPED(SUFFIX)                                                                          \
  {"ci_one_shot_decode_" #SUFFIX, run<OneShotParams, ci_one_shot_decode_##SUFFIX>,                      \
   sizeof(OneShotParams)},                                                                              \
      {"ci_online_update_" #SUFFIX, run<OnlineUpdateParams, ci_online_update_##SUFFIX>,                 \
       sizeof(OnlineUpdateParams)},                                                                     \
      {"ci_general_decode_" #SUFFIX "_r1", run<GeneralParams, ci_general_decode_##SUFFIX##_r1>,         \
       sizeof(GeneralParams)},                                                                          \
      {"ci_general_decode_" #SUFFIX "_r2", run<GeneralParams, ci_general_decode_##SUFFIX##_r2>,         \
       sizeof(GeneralParams)},                                                                          \
      {"ci_general_decode_" #SUFFIX "_r4", run<GeneralParams, ci_general_decode_##SUFFIX##_r4>,         \
       sizeof(GeneralParams)},                                                                          \
      {"ci_general_decode_" #SUFFIX "_r8", run<GeneralParams, ci_general_decode_##SUFFIX##_r8>,         \
       sizeof(GeneralParams)}

const Entry kEntries[] = {CI_TWIN_TYPED(f32), CI_TWIN_TYPED(f16), CI_TWIN_TYPED(bf16)};

const Entry* find(const char* name) {
  for (const Entry& entry : kEntries)
    if (std::strcmp(entry.name, name) == 0) return &entry;
  return nullptr;
}

}  // namespace

// 0: ran; -1: no kernel of that name; -2: `nbytes` is not the size of the kernel's struct;
// -3: ran, but loaded a vector from an address not aligned to its size (a GPU would fault).
extern "C" int ci_twin_launch(const char* name, const void* params, long long nbytes, unsigned grid,
                              unsigned block) {
  const Entry* entry = find(name);
  return entry == nullptr ? -1 : entry->runner(params, nbytes, grid, block);
}

// The kernel's parameter struct size in bytes, or -1 when there is no kernel of that name.
extern "C" long long ci_twin_param_bytes(const char* name) {
  const Entry* entry = find(name);
  return entry == nullptr ? -1 : entry->param_bytes;
}
