// What a kernel launch costs the host, against the size of its parameters (issues 16 and 18: the
// ops' "launch" phase takes 5-7 us on the H100 machine, where a whole copy_ takes 4). Stand-alone
// (no torch). all_to_all's AllToAllVParams is 1216 bytes, dispatch's DispatchParams 2680 and
// combine's CombineParams 2400; torch's own kernels pass tens to a few hundred bytes.
//
//   nvcc -O3 -arch=sm_90 -std=c++17 -o /tmp/launch_probe tools/launch_probe.cu
//   /tmp/launch_probe [launches=20000]
//
// For each parameter size: `launches` launches of a one-block kernel that reads one word of its
// parameters, back to back on one stream; the host's time per cudaLaunchKernel (wall clock over the
// loop, the queue never full: a launch every few microseconds against a kernel of about two), then
// the same after a cudaStreamSynchronize per 64 launches. Also a cudaEventRecord and a
// cudaStreamWaitEvent for scale. The median of 5 rounds.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK(x)                                                                       \
  do {                                                                                 \
    cudaError_t e_ = (x);                                                              \
    if (e_ != cudaSuccess) {                                                           \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); \
      std::exit(1);                                                                    \
    }                                                                                  \
  } while (0)

template <int kBytes>
struct Params {
  int words[kBytes / 4];
};

template <int kBytes>
__global__ void probe_kernel(const Params<kBytes> p, int* sink) {
  if (threadIdx.x == 0 && p.words[kBytes / 4 - 1] == 12345) *sink = 1;  // never: keeps the read
}

using Clock = std::chrono::steady_clock;

template <typename F>
double median_us_per_call(int calls, F&& call) {
  std::vector<double> rounds;
  for (int r = 0; r < 5; ++r) {
    const auto start = Clock::now();
    for (int i = 0; i < calls; ++i) call(i);
    rounds.push_back(std::chrono::duration<double, std::micro>(Clock::now() - start).count() / calls);
    CHECK(cudaDeviceSynchronize());
  }
  std::sort(rounds.begin(), rounds.end());
  return rounds[2];
}

template <int kBytes>
void probe(int launches, cudaStream_t stream, int* sink) {
  Params<kBytes> p{};
  for (int i = 0; i < kBytes / 4; ++i) p.words[i] = i;
  probe_kernel<kBytes><<<1, 32, 0, stream>>>(p, sink);  // loads the module before timing
  CHECK(cudaDeviceSynchronize());
  const double free_run = median_us_per_call(launches, [&](int) { probe_kernel<kBytes><<<1, 32, 0, stream>>>(p, sink); });
  const double synced = median_us_per_call(launches / 8, [&](int i) {
    probe_kernel<kBytes><<<1, 32, 0, stream>>>(p, sink);
    if (i % 64 == 63) CHECK(cudaStreamSynchronize(stream));
  });
  CHECK(cudaGetLastError());
  std::printf("params %5d bytes: %.2f us per launch back to back, %.2f us with a sync every 64\n", kBytes, free_run,
              synced);
}

int main(int argc, char** argv) {
  const int launches = argc > 1 ? std::atoi(argv[1]) : 20000;
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs as this process sees them\n", prop.name, prop.multiProcessorCount);
  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  int* sink;
  CHECK(cudaMalloc(&sink, sizeof(int)));
  probe<16>(launches, stream, sink);
  probe<256>(launches, stream, sink);
  probe<512>(launches, stream, sink);
  probe<1024>(launches, stream, sink);
  probe<1536>(launches, stream, sink);
  probe<2048>(launches, stream, sink);
  probe<2688>(launches, stream, sink);  // about DispatchParams
  probe<4096>(launches, stream, sink);
  cudaEvent_t event;
  CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  const double record = median_us_per_call(launches, [&](int) { CHECK(cudaEventRecord(event, stream)); });
  const double wait = median_us_per_call(launches, [&](int) { CHECK(cudaStreamWaitEvent(stream, event, 0)); });
  std::printf("cudaEventRecord %.2f us, cudaStreamWaitEvent %.2f us\n", record, wait);
  return 0;
}
