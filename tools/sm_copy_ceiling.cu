// The copy rate a given number of SMs can reach on this GPU, whatever the op: the ceiling for
// issue 18's few-SM targets. Stand-alone (no torch), one process, one block per SM:
//
//   nvcc -O3 -arch=sm_90 -std=c++17 -o /tmp/sm_copy_ceiling tools/sm_copy_ceiling.cu
//   /tmp/sm_copy_ceiling [MiB=512] [SM counts, comma-separated]
//
// A device-to-device copy of MiB, cut into one contiguous piece per block, by
//   ldst U    T threads, 16-byte loads, U of them in flight per thread before their stores
//             (T x U x 16 B of loads in flight per SM);
//   bulk S/L  one thread issuing cp.async.bulk through a ring of S stages of 16 KiB, L of them
//             loading while the oldest is stored (L x 16 KiB in flight per SM);
// and cudaMemcpyAsync on the whole GPU as the reference. GB/s counts each byte once (as the
// MoE benchmark's bytes per rank do), best of 5 after a warm-up.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#define CHECK(x)                                                                           \
  do {                                                                                     \
    cudaError_t e_ = (x);                                                                  \
    if (e_ != cudaSuccess) {                                                               \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                        \
    }                                                                                      \
  } while (0)

template <int U>
__global__ void __launch_bounds__(1024) copy_ldst(const int4* __restrict__ src, int4* __restrict__ dst, size_t n16) {
  const size_t per = (n16 + gridDim.x - 1) / gridDim.x;
  const size_t lo = blockIdx.x * per, hi = lo + per < n16 ? lo + per : n16;
  const size_t step = size_t(blockDim.x) * U;
  size_t i = lo + threadIdx.x;
  for (; i + (U - 1) * blockDim.x < hi; i += step) {
    int4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = __ldg(src + i + u * blockDim.x);
#pragma unroll
    for (int u = 0; u < U; ++u) dst[i + u * blockDim.x] = v[u];
  }
  for (; i < hi; i += blockDim.x) dst[i] = src[i];
}

constexpr int kStage = 16 << 10;

__device__ __forceinline__ uint32_t sm_addr(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

template <int S, int L>
__global__ void __launch_bounds__(32) copy_bulk(const char* src, char* dst, size_t bytes) {
  extern __shared__ __align__(128) char ring[];
  uint64_t* full = reinterpret_cast<uint64_t*>(ring + S * kStage);
  if (threadIdx.x != 0) return;
  const size_t per = ((bytes + gridDim.x - 1) / gridDim.x + 15) / 16 * 16;
  const size_t lo = blockIdx.x * per, hi = lo + per < bytes ? lo + per : bytes;
  if (lo >= hi) return;
  for (int s = 0; s < S; ++s) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(sm_addr(full + s)));
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  const size_t n = (hi - lo + kStage - 1) / kStage;
  auto len = [&](size_t k) { return uint32_t(hi - lo - k * kStage < kStage ? hi - lo - k * kStage : kStage); };
  auto load = [&](size_t k) {
    asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(S - L - 1) : "memory");
    uint64_t* bar = full + k % S;
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(sm_addr(bar)), "r"(len(k)) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     sm_addr(ring + (k % S) * kStage)),
                 "l"(src + lo + k * kStage), "r"(len(k)), "r"(sm_addr(bar))
                 : "memory");
  };
  auto store = [&](size_t k) {
    uint32_t done = 0;
    while (!done)
      asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
                   : "=r"(done)
                   : "r"(sm_addr(full + k % S)), "r"(uint32_t(k / S) & 1)
                   : "memory");
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst + lo + k * kStage),
                 "r"(sm_addr(ring + (k % S) * kStage)), "r"(len(k))
                 : "memory");
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
  };
  for (size_t k = 0; k < n; ++k) {
    load(k);
    if (k >= L) store(k - L);
  }
  for (size_t k = n > L ? n - L : 0; k < n; ++k) store(k);
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

__global__ void fill(uint32_t* p, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    p[i] = uint32_t(i * 2654435761u);
}

__global__ void count_wrong(const uint32_t* p, size_t n, unsigned long long* wrong) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    if (p[i] != uint32_t(i * 2654435761u)) atomicAdd(wrong, 1ull);
}

template <typename Launch>
float best_ms(Launch launch) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  launch();
  float best = 1e30f;
  for (int r = 0; r < 5; ++r) {
    CHECK(cudaEventRecord(a));
    launch();
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    best = std::min(best, ms);
  }
  CHECK(cudaGetLastError());
  return best;
}

template <int S, int L>
void run_bulk(const char* src, char* dst, size_t bytes, int sms, std::vector<float>& row) {
  const size_t smem = S * kStage + S * sizeof(uint64_t);
  CHECK(cudaFuncSetAttribute(copy_bulk<S, L>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  row.push_back(best_ms([&] { copy_bulk<S, L><<<sms, 32, smem>>>(src, dst, bytes); }));
}

template <int U>
void run_ldst(const char* src, char* dst, size_t bytes, int sms, int threads, std::vector<float>& row) {
  row.push_back(best_ms([&] {
    copy_ldst<U><<<sms, threads>>>(reinterpret_cast<const int4*>(src), reinterpret_cast<int4*>(dst), bytes / 16);
  }));
}

int main(int argc, char** argv) {
  const size_t bytes = size_t(argc > 1 ? std::atoi(argv[1]) : 512) << 20;
  std::vector<int> counts;
  std::stringstream list(argc > 2 ? argv[2] : "1,2,4,6,8,12,16,24,32,48,64,132");
  for (std::string item; std::getline(list, item, ',');) counts.push_back(std::atoi(item.c_str()));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  char *src, *dst;
  CHECK(cudaMalloc(&src, bytes));
  CHECK(cudaMalloc(&dst, bytes));
  fill<<<1024, 256>>>(reinterpret_cast<uint32_t*>(src), bytes / 4);
  unsigned long long* wrong;
  CHECK(cudaMallocManaged(&wrong, sizeof(*wrong)));
  // Every variant on a poisoned destination, checked word by word, so that a fast number is a real one.
  auto check = [&](const char* name, auto launch) {
    CHECK(cudaMemset(dst, 0xff, bytes));
    launch();
    *wrong = 0;
    count_wrong<<<1024, 256>>>(reinterpret_cast<const uint32_t*>(dst), bytes / 4, wrong);
    CHECK(cudaDeviceSynchronize());
    if (*wrong) {
      std::printf("%s: %llu words wrong\n", name, *wrong);
      std::exit(1);
    }
  };
  for (int sms : {1, 3, 8}) {
    std::vector<float> unused;
    check("ldst", [&] { run_ldst<8>(src, dst, bytes, sms, 1024, unused); });
    check("bulk", [&] { run_bulk<13, 11>(src, dst, bytes, sms, unused); });
  }
  std::printf("every variant copies exactly (1, 3, 8 SMs)\n");
  const float memcpy_ms = best_ms([&] { CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice)); });
  std::printf("%s, %d SMs, %zu MiB copied; cudaMemcpyAsync (whole GPU): %.1f GB/s\n", prop.name,
              prop.multiProcessorCount, bytes >> 20, bytes / memcpy_ms / 1e6);
  const char* names[] = {"ldst 512x4", "ldst 512x8", "ldst 1024x8", "ldst 1024x16",
                         "bulk 12/4",  "bulk 12/8",  "bulk 13/11"};
  std::printf("| SMs |");
  for (const char* name : names) std::printf(" %s |", name);
  std::printf(" best GB/s per SM |\n|--:|");
  for (size_t i = 0; i <= sizeof(names) / sizeof(*names); ++i) std::printf("--:|");
  std::printf("\n");
  for (int sms : counts) {
    if (sms > prop.multiProcessorCount) continue;
    std::vector<float> ms;
    run_ldst<4>(src, dst, bytes, sms, 512, ms);
    run_ldst<8>(src, dst, bytes, sms, 512, ms);
    run_ldst<8>(src, dst, bytes, sms, 1024, ms);
    run_ldst<16>(src, dst, bytes, sms, 1024, ms);
    run_bulk<12, 4>(src, dst, bytes, sms, ms);
    run_bulk<12, 8>(src, dst, bytes, sms, ms);
    run_bulk<13, 11>(src, dst, bytes, sms, ms);
    std::printf("| %d |", sms);
    float best = 0;
    for (float m : ms) {
      const float gbs = bytes / m / 1e6f;
      best = std::max(best, gbs);
      std::printf(" %.1f |", gbs);
    }
    std::printf(" %.1f |\n", best / sms);
  }
  return 0;
}
