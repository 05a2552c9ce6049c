// Which copy shape moves all_to_all_v's one-copy ("pool") move fastest (issue 16). Stand-alone (no
// torch): R forked processes share the GPU; each rank copies MiB of input as pool::push does (R
// messages, its own first, each straight into its receiver's arena, a peer's through a CUDA IPC
// mapping), all ranks at once. Run it under MPS, as gpu_suite.sh's ranks run (without, they time-slice):
//
//   nvcc -O3 -arch=sm_90 -std=c++17 -I. -o /tmp/pool_copy_probe tools/pool_copy_probe.cu
//   CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50 /tmp/pool_copy_probe [MiB per rank=64] [ranks=2] [iterations=40]
//
// n = the SM count the device reports to a rank (its MPS share: 66 of 132 at 50 %). The copy loop is
// the library's own (block_copy_call of backend/kernels/copy.cuh); a variant picks threads x 16-byte
// loads in flight per thread, load and store flavours, the grid, and the cut of the rank's stream of
// bytes: a piece per block (total / blocks rounded up to `align` bytes, at least 64 KiB, as
// pool::piece_bytes cuts with align 16), chunks dealt round robin (grid-stride), or ("in turn" rows,
// the library's default, pool::push_pieces) pieces of each message taken from a counter; each block
// ends with __threadfence_system, as pool::push's do. Not emulated: the plan kernel, the done counts and
// flags, the wait for the peers at the end. Each variant is checked word by word on poisoned arenas,
// then timed: `iterations` back-to-back launches per rank, the ranks started together by a barrier,
// CUDA events between launches. Reported: the slowest rank's median, GB/s per rank (each byte once,
// the all_to_all benchmark's algbw) and all ranks together, and two shares in the same run: of
// cudaMemcpyAsync a message at a time into the receivers' arenas (the same move), and of one
// cudaMemcpyAsync of the rank's bytes into its own arena (all_to_all.py's roofline, `dst.copy_(src)`:
// no peer's mapping). "local" rows move the same bytes with every destination in the rank's own
// arena (checked against its own input): whether the gap to the roofline is the copy loop's or the
// peers' mappings'. "vmm" rows write the peers' arenas through mappings of the CUDA virtual memory
// API instead (tools/vmm_share.hpp: cuMemCreate, exported as file descriptors): whether another
// kind of mapping would close that gap; where the driver or MPS refuses them, the rows say why.
#include <algorithm>
#include <cstdint>

#include "backend/kernels/copy.cuh"
#include "tools/forked_ranks.hpp"
#include "tools/vmm_share.hpp"

using namespace ep::kernels;
constexpr int kMaxRanks = 8, kMaxVariants = 48;
constexpr uint64_t kMinPiece = 64 << 10;

struct Move {  // one rank's messages in stream order: message k goes to rank (rank + k) % R
  const char* src[kMaxRanks];
  char* dst[kMaxRanks];
  uint64_t message;  // bytes each
  int count;
};

struct NonCoherentLoad {  // __ldg: ld.global.nc, through the texture path
  template <typename T>
  __device__ __forceinline__ T operator()(const T* p) const { return __ldg(p); }
};

// Block b copies chunks b, b + grid, ... of the stream (one chunk per block: pool::push's cut).
template <int kUnroll, int kThreads, int kBlocksPerSm, typename Load, typename Store>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) pool_move(Move m, uint64_t chunk, bool fence) {
  const uint64_t total = m.message * uint64_t(m.count);
  for (uint64_t lo = blockIdx.x * chunk; lo < total; lo += uint64_t(gridDim.x) * chunk) {
    const uint64_t hi = lo + chunk < total ? lo + chunk : total;
    for (int k = 0; k < m.count; ++k) {
      const uint64_t begin = uint64_t(k) * m.message, end = begin + m.message;
      const uint64_t from = begin > lo ? begin : lo, to = end < hi ? end : hi;
      if (from < to)
        block_copy_call<kUnroll, kThreads>(m.dst[k] + (from - begin), m.src[k] + (from - begin), to - from, Load{},
                                           Store{});
    }
  }
  if (fence) {
    __syncthreads();
    if (threadIdx.x == 0) __threadfence_system();
  }
}

// The library's default cut (pool::push_pieces): each message in pieces of `piece` bytes, numbered
// in stream order, which the blocks take in turn from a counter until none is left; kAhead: a
// block's thread 0 takes its next number while the block copies the current one
// (TORCH_EP_POOL_TICKET_AHEAD). The last block to finish zeroes the counters for the next launch.
__device__ uint32_t next_piece, blocks_done;  // this rank's (each forked rank has its own context)

template <int kUnroll, int kThreads, bool kAhead>
__global__ void __launch_bounds__(kThreads, 2) pool_move_in_turn(Move m, uint64_t piece, bool fence) {
  __shared__ uint32_t taken;
  const uint64_t per_message = (m.message + piece - 1) / piece, pieces = per_message * uint64_t(m.count);
  if (threadIdx.x == 0) taken = atomicAdd(&next_piece, 1u);
  for (;;) {
    __syncthreads();  // thread 0's `taken` is written
    const uint64_t number = taken;
    __syncthreads();  // every thread has read it before thread 0 writes the next
    if (number >= pieces) break;
    uint32_t ahead = 0;
    if (kAhead && threadIdx.x == 0) ahead = atomicAdd(&next_piece, 1u);
    const int k = int(number / per_message);
    const uint64_t from = (number % per_message) * piece, to = from + piece < m.message ? from + piece : m.message;
    block_copy_call<kUnroll, kThreads>(m.dst[k] + from, m.src[k] + from, to - from, StreamingLoad{}, PlainStore{});
    if (threadIdx.x == 0) taken = kAhead ? ahead : atomicAdd(&next_piece, 1u);
  }
  if (threadIdx.x != 0) return;
  if (fence) __threadfence_system();
  __threadfence();  // this block's last number taken before its count
  if (atomicAdd(&blocks_done, 1u) + 1 == gridDim.x) {
    next_piece = 0;
    blocks_done = 0;
    __threadfence();
  }
}

__host__ __device__ uint32_t pattern(int rank, uint64_t word) {  // never the poison 0xffffffff
  return uint32_t(word * 2654435761u + uint64_t(rank) * 0x9E3779B9u) & 0x7fffffffu;
}

__global__ void fill(uint32_t* p, uint64_t words, int rank) {
  for (uint64_t i = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x; i < words; i += uint64_t(gridDim.x) * blockDim.x)
    p[i] = pattern(rank, i);
}

// Rank `me`'s arena: source s's message at s * message, the words of s's input from me * message.
// `local`: a local row's arena, a copy of this rank's own input.
__global__ void count_wrong(const uint32_t* arena, uint64_t message_words, int ranks, int me, bool local,
                            unsigned long long* wrong) {
  for (uint64_t i = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x; i < message_words * ranks;
       i += uint64_t(gridDim.x) * blockDim.x) {
    const uint32_t expected =
        local ? pattern(me, i) : pattern(int(i / message_words), me * message_words + i % message_words);
    if (arena[i] != expected) atomicAdd(wrong, 1ull);
  }
}

using Launch = void (*)(const Move&, int blocks, uint64_t chunk, bool fence, cudaStream_t);
// U loads in flight per thread of T, registers for 1024 / T blocks per SM (B) unless given.
template <int U, int T, typename L, typename S, int B = 1024 / T>
void launch(const Move& m, int blocks, uint64_t chunk, bool fence, cudaStream_t stream) {
  pool_move<U, T, B, L, S><<<blocks, T, 0, stream>>>(m, chunk, fence);
}
constexpr Launch kToday = launch<8, 512, StreamingLoad, PlainStore>;
template <bool kAhead>
void launch_in_turn(const Move& m, int blocks, uint64_t piece, bool fence, cudaStream_t stream) {
  pool_move_in_turn<8, 512, kAhead><<<blocks, 512, 0, stream>>>(m, piece, fence);
}

// Where a variant's messages land: the receivers' arenas through CUDA IPC mappings (as the library's
// pool), every message in this rank's own arena, or the receivers' arenas of the virtual memory API.
enum Dest { kPeers, kLocal, kVmm };

struct Variant {
  const char* name;
  Launch run;  // nullptr: cudaMemcpyAsync per message (kLocal: one for the whole stream)
  int blocks;
  uint64_t chunk;
  bool fence;
  Dest dest = kPeers;
};
constexpr size_t kMemcpyRow = 0, kLocalCopyRow = 1;  // the two references, first in the list

uint64_t piece(uint64_t total, int blocks, uint64_t align) {  // pool::piece_bytes, rounded to `align`
  const uint64_t even = ((total + blocks - 1) / blocks + align - 1) / align * align;
  return std::max(even, kMinPiece);
}

// Rows in groups: today's kernel and cut (the library's automatic grid: 2 blocks per SM of the share,
// less the plan's); today with one thing changed; other threads x loads and grids (pieces aligned to
// 4 KiB: compare with "today, pieces aligned to 4 KiB"); pieces and chunks of a fixed size.
std::vector<Variant> variants(uint64_t total, int n) {
  const int today = std::max(1, 2 * n - 1);
  const uint64_t cut = piece(total, today, 16);
  auto aligned = [&](int blocks) { return piece(total, blocks, 4096); };
  auto pieces = [&](uint64_t bytes) { return int((total + bytes - 1) / bytes); };
  return {
      {"cudaMemcpyAsync, a copy per message", nullptr, 0, 0, false},
      {"local: cudaMemcpyAsync of the whole stream (the roofline's copy)", nullptr, 0, 0, false, kLocal},
      {"today: 512x8, ld.cs / st plain, 2n-1 blocks, pieces /16 B, fence", kToday, today, cut, true},
      {"local: today", kToday, today, cut, true, kLocal},
      {"vmm: cudaMemcpyAsync, a copy per message", nullptr, 0, 0, false, kVmm},
      {"vmm: today", kToday, today, cut, true, kVmm},
      {"vmm: 512x8, 2n blocks, chunks of 64 KiB round robin", kToday, 2 * n, 64 << 10, true, kVmm},
      {"vmm: 512x8, a piece of 128 KiB per block", kToday, pieces(128 << 10), 128 << 10, true, kVmm},
      // The library's default cut (pieces in turn, 2n-1 blocks), of each size, with and without the
      // ticket taken ahead (Options.all_to_all_pool_piece_bytes, TORCH_EP_POOL_TICKET_AHEAD).
      {"in turn: pieces of 64 KiB (the library's default)", launch_in_turn<false>, today, 64 << 10, true},
      {"in turn: pieces of 64 KiB, ticket ahead", launch_in_turn<true>, today, 64 << 10, true},
      {"in turn: pieces of 128 KiB", launch_in_turn<false>, today, 128 << 10, true},
      {"in turn: pieces of 128 KiB, ticket ahead", launch_in_turn<true>, today, 128 << 10, true},
      {"in turn: pieces of 256 KiB", launch_in_turn<false>, today, 256 << 10, true},
      {"in turn: pieces of 256 KiB, ticket ahead", launch_in_turn<true>, today, 256 << 10, true},
      {"local: today, 8n blocks (4 waves)", kToday, 8 * n, aligned(8 * n), true, kLocal},
      {"local: today, loads plain", launch<8, 512, PlainLoad, PlainStore>, today, cut, true, kLocal},
      {"local: today, stores st.cs", launch<8, 512, StreamingLoad, StreamingStore>, today, cut, true, kLocal},
      {"local: 1024x8, n blocks", launch<8, 1024, StreamingLoad, PlainStore>, n, aligned(n), true, kLocal},
      {"local: 512x8, a piece of 128 KiB per block", kToday, pieces(128 << 10), 128 << 10, true, kLocal},
      {"today, pieces aligned to 128 B", kToday, today, piece(total, today, 128), true},
      {"today, pieces aligned to 4 KiB", kToday, today, aligned(today), true},
      {"today, no fence", kToday, today, cut, false},
      {"today, loads plain", launch<8, 512, PlainLoad, PlainStore>, today, cut, true},
      {"today, loads __ldg", launch<8, 512, NonCoherentLoad, PlainStore>, today, cut, true},
      {"today, stores st.cs", launch<8, 512, StreamingLoad, StreamingStore>, today, cut, true},
      {"today, loads __ldg, stores st.cs", launch<8, 512, NonCoherentLoad, StreamingStore>, today, cut, true},
      {"today, unroll 4", launch<4, 512, StreamingLoad, PlainStore>, today, cut, true},
      {"512x8, n blocks (1 per SM)", kToday, n, aligned(n), true},
      // 16 int4 in flight spill at 64 registers: 1 block per SM, as many bytes in flight per SM as today.
      {"512x16, n blocks (1 per SM, 128 registers)", launch<16, 512, StreamingLoad, PlainStore, 1>, n, aligned(n),
       true},
      {"1024x4, n blocks", launch<4, 1024, StreamingLoad, PlainStore>, n, aligned(n), true},
      {"1024x8, n blocks", launch<8, 1024, StreamingLoad, PlainStore>, n, aligned(n), true},
      {"512x8, 2n blocks", kToday, 2 * n, aligned(2 * n), true},
      {"512x8, 4n blocks (2 waves)", kToday, 4 * n, aligned(4 * n), true},
      {"512x8, 8n blocks (4 waves)", kToday, 8 * n, aligned(8 * n), true},
      {"512x8, a piece of 256 KiB per block", kToday, pieces(256 << 10), 256 << 10, true},
      {"512x8, a piece of 128 KiB per block", kToday, pieces(128 << 10), 128 << 10, true},
      {"512x8, a piece of 64 KiB per block", kToday, pieces(64 << 10), 64 << 10, true},
      {"512x8, 2n blocks, chunks of 64 KiB round robin", kToday, 2 * n, 64 << 10, true},
      {"512x8, 2n blocks, chunks of 256 KiB round robin", kToday, 2 * n, 256 << 10, true},
      {"512x8, 2n blocks, chunks of 1 MiB round robin", kToday, 2 * n, 1 << 20, true},
      {"512x8, 2n blocks, chunks of 2 MiB round robin", kToday, 2 * n, 2 << 20, true},
  };
}

struct Shared {  // anonymous shared memory of the forked ranks
  RankBarrier ranks_met;
  std::atomic<int> sms{0};
  char device[256];
  cudaIpcMemHandle_t arena[kMaxRanks];
  std::atomic<int> vmm_failed{0};  // any rank's failure skips every rank's vmm rows
  char vmm_why[160];
  float median_ms[kMaxRanks][kMaxVariants];
  unsigned long long wrong[kMaxRanks][kMaxVariants];
};

void barrier(Shared* s, int ranks) { s->ranks_met.wait(ranks); }

void rank_main(Shared* s, const vmm::Pairs& pairs, int me, int ranks, uint64_t bytes, int iterations) {
  CHECK(cudaSetDevice(0));
  int n = 0;
  CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, 0));
  if (me == 0) {
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    std::snprintf(s->device, sizeof(s->device), "%s", prop.name);
    s->sms = n;
  }
  const uint64_t message = bytes / ranks;
  char *input, *arena;
  CHECK(cudaMalloc(&input, bytes));
  CHECK(cudaMalloc(&arena, bytes));
  fill<<<1024, 256>>>(reinterpret_cast<uint32_t*>(input), bytes / 4, me);
  CHECK(cudaIpcGetMemHandle(&s->arena[me], arena));
  barrier(s, ranks);
  Move m{}, mine{};  // mine: the same sources, each message into this rank's own arena
  m.message = mine.message = message;
  m.count = mine.count = ranks;
  for (int k = 0; k < ranks; ++k) {
    const int d = (me + k) % ranks;
    char* peer = arena;
    if (d != me)
      CHECK(cudaIpcOpenMemHandle(reinterpret_cast<void**>(&peer), s->arena[d], cudaIpcMemLazyEnablePeerAccess));
    m.src[k] = mine.src[k] = input + d * message;
    m.dst[k] = peer + me * message;
    mine.dst[k] = arena + d * message;
  }
  std::vector<char*> vmm_arena;  // [r]: rank r's arena of the virtual memory API, as mapped here
  const std::string vmm_failed = vmm::share_arenas(pairs, me, bytes, vmm_arena);
  if (!vmm_failed.empty() && !s->vmm_failed.exchange(1))
    std::snprintf(s->vmm_why, sizeof(s->vmm_why), "rank %d: %s", me, vmm_failed.c_str());
  barrier(s, ranks);
  Move vm = m;  // the same messages, into the peers' arenas of the virtual memory API
  if (!s->vmm_failed)
    for (int k = 0; k < ranks; ++k) vm.dst[k] = vmm_arena[(me + k) % ranks] + me * message;
  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  unsigned long long* wrong;
  CHECK(cudaMalloc(&wrong, sizeof(*wrong)));
  std::vector<cudaEvent_t> events(iterations + 1);
  for (cudaEvent_t& e : events) CHECK(cudaEventCreate(&e));
  const std::vector<Variant> list = variants(bytes, n);
  if (list.size() > kMaxVariants) std::exit(3);
  for (size_t v = 0; v < list.size(); ++v) {
    const Variant& x = list[v];
    if (x.dest == kVmm && s->vmm_failed) continue;  // every rank skips it alike
    const Move& move = x.dest == kLocal ? mine : x.dest == kVmm ? vm : m;
    char* const checked = x.dest == kVmm ? vmm_arena[me] : arena;  // where this rank's messages land
    auto run = [&] {
      if (x.run)
        x.run(move, x.blocks, x.chunk, x.fence, stream);
      else if (x.dest == kLocal)
        CHECK(cudaMemcpyAsync(arena, input, bytes, cudaMemcpyDeviceToDevice, stream));
      else
        for (int k = 0; k < ranks; ++k)
          CHECK(cudaMemcpyAsync(move.dst[k], move.src[k], message, cudaMemcpyDeviceToDevice, stream));
    };
    CHECK(cudaMemset(checked, 0xff, bytes));
    CHECK(cudaDeviceSynchronize());
    barrier(s, ranks);  // every arena poisoned
    run();
    CHECK(cudaStreamSynchronize(stream));
    CHECK(cudaGetLastError());
    barrier(s, ranks);  // every rank's messages landed
    CHECK(cudaMemset(wrong, 0, sizeof(*wrong)));
    count_wrong<<<1024, 256>>>(reinterpret_cast<const uint32_t*>(checked), message / 4, ranks, me, x.dest == kLocal,
                               wrong);
    CHECK(cudaMemcpy(&s->wrong[me][v], wrong, sizeof(*wrong), cudaMemcpyDeviceToHost));
    barrier(s, ranks);  // checked before anyone writes again
    CHECK(cudaEventRecord(events[0], stream));
    for (int i = 0; i < iterations; ++i) {
      run();
      CHECK(cudaEventRecord(events[i + 1], stream));
    }
    CHECK(cudaStreamSynchronize(stream));
    std::vector<float> ms(iterations);
    for (int i = 0; i < iterations; ++i) CHECK(cudaEventElapsedTime(&ms[i], events[i], events[i + 1]));
    std::nth_element(ms.begin(), ms.begin() + iterations / 2, ms.end());
    s->median_ms[me][v] = ms[iterations / 2];
    barrier(s, ranks);
  }
}

int main(int argc, char** argv) {
  const uint64_t bytes = uint64_t(argc > 1 ? std::atoi(argv[1]) : 64) << 20;
  const int ranks = argc > 2 ? std::atoi(argv[2]) : 2, iterations = argc > 3 ? std::atoi(argv[3]) : 40;
  if (ranks < 1 || ranks > kMaxRanks || bytes % (16 * ranks) != 0 || iterations < 20) {
    std::fprintf(stderr, "usage: %s [MiB per rank=64] [ranks=2, 1..%d] [iterations=40, >= 20]\n", argv[0], kMaxRanks);
    return 2;
  }
  vmm::Pairs pairs;
  if (!vmm::make_pairs(ranks, pairs)) {
    std::perror("socketpair");
    return 1;
  }
  Shared* s = run_forked<Shared>(
      ranks, [&](Shared* shared, int r) { rank_main(shared, pairs, r, ranks, bytes, iterations); });
  if (!s) return 1;
  bool failed = false;
  const std::vector<Variant> list = variants(bytes, s->sms);
  const char* mps = std::getenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE");
  std::printf("%s, %d ranks, %d SMs each (n; CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=%s), %llu MiB per rank, "
              "median of %d launches per rank\n", s->device, ranks, s->sms.load(), mps ? mps : "unset",
              (unsigned long long)(bytes >> 20), iterations);
  std::printf("| variant | blocks | piece / chunk bytes | us (ranks' medians, max / min) | GB/s per rank | "
              "GB/s all ranks | share of memcpy | share of the local copy | words wrong |\n"
              "|---|--:|--:|--:|--:|--:|--:|--:|--:|\n");
  float slowest[kMaxVariants] = {};  // each variant's slowest rank's median: the GB/s and the shares
  for (size_t v = 0; v < list.size(); ++v)
    for (int r = 0; r < ranks; ++r) slowest[v] = std::max(slowest[v], s->median_ms[r][v]);
  for (size_t v = 0; v < list.size(); ++v) {
    if (list[v].dest == kVmm && s->vmm_failed) {
      std::printf("| %s | not run: %s |\n", list[v].name, s->vmm_why);
      continue;
    }
    const float ms = slowest[v];
    float fastest = 1e30f;
    unsigned long long wrong = 0;
    for (int r = 0; r < ranks; ++r) {
      fastest = std::min(fastest, s->median_ms[r][v]);
      wrong += s->wrong[r][v];
    }
    failed = failed || wrong != 0;
    std::printf("| %s | %d | %llu | %.1f / %.1f | %.1f | %.1f | %.0f %% | %.0f %% | %llu |\n", list[v].name,
                list[v].blocks, (unsigned long long)list[v].chunk, ms * 1e3f, fastest * 1e3f, bytes / ms / 1e6f,
                ranks * bytes / ms / 1e6f, 100 * slowest[kMemcpyRow] / ms, 100 * slowest[kLocalCopyRow] / ms, wrong);
  }
  std::printf(failed ? "SOME VARIANT COPIED WRONG\n" : "every variant copied exactly\n");
  return failed ? 1 : 0;
}
