"""The package builds, registers "ep", and its CUDA kernels compile where nvcc exists."""
import glob
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.distributed as dist

import torch_ep
from conftest import has_nvcc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def _compile_results():
    return {}  # (test, source) -> CompletedProcess, for compile_check


@pytest.fixture
def compile_check(request, _compile_results, tmp_path_factory):
    """compile_check(command) -> the CompletedProcess of command(source, folder) for this case's
    `source` parameter.

    The first case of a test runs that test's every selected source at once, a core each (g++
    parses torch's headers for 10-17 s a file on one core; nvcc takes seconds a kernel), and
    keeps the results; each case then asserts its own. `command` builds the argv in a fresh folder
    of its own, on this thread."""
    test, source = request.node.originalname, request.node.callspec.params["source"]

    def check(command):
        if (test, source) not in _compile_results:
            sources = [item.callspec.params["source"] for item in request.session.items
                       if getattr(item, "originalname", None) == test and hasattr(item, "callspec")]
            sources = [s for s in dict.fromkeys(sources + [source]) if (test, s) not in _compile_results]
            # The folders and commands here: pytest's temporary folders are not made thread-safely.
            commands = [command(s, tmp_path_factory.mktemp("compile")) for s in sources]

            def run(argv):
                return subprocess.run(argv, capture_output=True, text=True)

            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                _compile_results.update({(test, s): r for s, r in zip(sources, pool.map(run, commands))})
        return _compile_results[(test, source)]

    return check


def test_backend_registered():
    assert "EP" in dist.Backend._plugins
    assert dist.Backend._plugins["EP"].extended_api
    assert dist.Backend.default_device_backend_map.get("cpu") != "ep"  # we do not hijack defaults
    assert dist.Backend("ep") == "ep"


def test_extension_matches_torch():
    assert torch_ep._C.has_cuda == (torch.version.cuda is not None and torch_ep._C.has_cuda)


# The kernels that call NVSHMEM's device API need its headers and relocatable device code:
# checked on their own below.
NVSHMEM_KERNELS = ["low_latency_dispatch.cu", "low_latency_combine.cu", "internode_notify.cu", "internode_dispatch.cu",
                   "internode_combine.cu", "internode_exchange.cu"]
KERNELS = sorted(k for k in glob.glob(os.path.join(ROOT, "backend", "kernels", "*.cu"))
                 if os.path.basename(k) not in NVSHMEM_KERNELS)


@pytest.mark.skipif(not has_nvcc, reason="nvcc not on PATH")
@pytest.mark.parametrize("source", KERNELS, ids=os.path.basename)
def test_kernel_compiles_for_sm90(source, compile_check):
    """Kernels are torch-free: they compile with nvcc alone, so CI checks them without a GPU."""
    result = compile_check(lambda s, folder: [
        "nvcc", "-c", "-std=c++17", "-arch=sm_90", "-O2", f"-I{ROOT}", s, "-o", str(folder / "k.o")])
    assert result.returncode == 0, result.stderr


def test_every_kernel_module_is_preloaded():
    """Each kernels/*.cu with a kernel names one for kernel_preload.cpp (module_kernels.hpp), which
    loads its module's kernels at set-up: a file left out would load at its first launch."""
    header = open(os.path.join(ROOT, "backend", "kernels", "module_kernels.hpp")).read()
    preload = open(os.path.join(ROOT, "backend", "transport", "cuda", "kernel_preload.cpp")).read()
    for source in glob.glob(os.path.join(ROOT, "backend", "kernels", "*.cu")):
        if "__global__" not in open(source).read():
            continue
        hook = os.path.basename(source)[:-3] + "_module_kernel"
        assert f"{hook}()" in open(source).read() and f"{hook}();" in header, f"{source}: no {hook}()"
        assert f"kernels::{hook}," in preload, f"kernel_preload.cpp does not list {hook}"


def test_kernels_preloaded_report():
    report = torch_ep._C._kernels_preloaded()
    assert set(report) == {"modules", "functions", "skipped", "error"}
    if not torch_ep._C.has_cuda:
        assert report == {"modules": 0, "functions": 0, "skipped": "built without CUDA", "error": ""}


# The stand-alone GPU probes (tools/*.cu, gpu_suite.sh builds them with nvcc); pool_copy_probe.cu
# includes backend/kernels/copy.cuh, so a change there must keep it building.
TOOLS = sorted(glob.glob(os.path.join(ROOT, "tools", "*.cu")))


@pytest.mark.skipif(not has_nvcc, reason="nvcc not on PATH")
@pytest.mark.parametrize("source", TOOLS, ids=os.path.basename)
def test_tool_compiles_for_sm90(source, compile_check):
    """Built as gpu_suite.sh builds them (linking needs no GPU)."""
    result = compile_check(lambda s, folder: [
        "nvcc", "-O3", "-std=c++17", "-arch=sm_90", f"-I{ROOT}", s, "-o", str(folder / "probe")])
    assert result.returncode == 0, result.stderr


def _nvshmem_root():
    """The nvidia-nvshmem-cu13 wheel's nvidia/nvshmem folder (TORCH_EP_NVSHMEM_ROOT overrides), or None."""
    roots = [os.environ["TORCH_EP_NVSHMEM_ROOT"]] if os.environ.get("TORCH_EP_NVSHMEM_ROOT") else []
    try:
        import nvidia.nvshmem

        roots += list(nvidia.nvshmem.__path__)
    except ImportError:
        pass
    for root in roots:
        if all(os.path.exists(os.path.join(root, *p)) for p in
               (("include", "nvshmem.h"), ("lib", "libnvshmem_device.a"), ("lib", "libnvshmem_host.so.3"))):
            return root
    return None


@pytest.mark.skipif(not has_nvcc or _nvshmem_root() is None, reason="needs nvcc and the nvidia-nvshmem-cu13 wheel")
def test_nvshmem_kernels_compile_and_device_link(tmp_path):
    """The NVSHMEM kernels (low_latency_*.cu and the device-driven route across nodes,
    internode_*.cu) compile with -rdc against NVSHMEM's headers and device-link with
    libnvshmem_device.a into a shared object, as CMakeLists.txt builds them (sm_90, no -dlto)."""
    nvshmem = _nvshmem_root()
    cuda_root = os.path.dirname(_cuda_include_dir() or "/usr/local/cuda/include")
    cuda_lib = next((d for d in (os.path.join(cuda_root, "lib64"), os.path.join(cuda_root, "lib"))
                     if os.path.exists(os.path.join(d, "libcudart.so"))), os.path.join(cuda_root, "lib64"))
    objs = [str(tmp_path / (k[:-3] + ".o")) for k in NVSHMEM_KERNELS]
    dlink, lib = tmp_path / "ll_dlink.o", tmp_path / "libll.so"
    steps = [
        ["nvcc", "-c", "-rdc=true", "-std=c++17", "-arch=sm_90", "-O2", "-Xcompiler", "-fPIC", f"-I{ROOT}",
         f"-I{nvshmem}/include", os.path.join(ROOT, "backend", "kernels", k), "-o", obj]
        for k, obj in zip(NVSHMEM_KERNELS, objs)
    ] + [
        ["nvcc", "-dlink", "-arch=sm_90", "-Xcompiler", "-fPIC", *objs, f"{nvshmem}/lib/libnvshmem_device.a",
         "-o", str(dlink)],
        ["g++", "-shared", *objs, str(dlink), f"{nvshmem}/lib/libnvshmem_device.a",
         f"{nvshmem}/lib/libnvshmem_host.so.3", f"-L{cuda_lib}", "-lcudart", "-Wl,--exclude-libs,libnvshmem_device.a",
         "-Wl,-z,defs", "-o", str(lib)],
    ]
    for cmd in steps:
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, " ".join(cmd) + "\n" + result.stderr[-4000:]


CUDA_HOST_SOURCES = sorted(glob.glob(os.path.join(ROOT, "backend", "transport", "cuda", "*.cpp"))
                           + glob.glob(os.path.join(ROOT, "backend", "process_group", "cuda", "*.cpp"))
                           + glob.glob(os.path.join(ROOT, "backend", "ops", "cuda", "*.cpp")))


def _cuda_include_dir():
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return None
    for root in [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] + sorted(glob.glob("/usr/local/cuda*")):
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return os.path.join(root, "include")
    return None


def _syntax_command(defines=(), includes=()):
    """command(source, folder) for compile_check: g++ -fsyntax-only of a CUDA host file against this
    torch's headers. CPU torch ships c10/cuda headers but not the generated cuda_cmake_macros.h;
    an empty stand-in in `folder` is enough."""
    import sysconfig

    torch_include = os.path.join(os.path.dirname(torch.__file__), "include")
    cuda_include = _cuda_include_dir()
    std = "-std=c++20" if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 13) else "-std=c++17"
    python_include = sysconfig.get_paths()["include"]

    def command(source, folder):
        macros = folder / "c10" / "cuda" / "impl"
        macros.mkdir(parents=True)
        (macros / "cuda_cmake_macros.h").write_text("#pragma once\n")
        return ["g++", std, "-fsyntax-only", "-DTORCH_EP_WITH_CUDA=1", *(f"-D{d}=1" for d in defines), f"-I{ROOT}",
                f"-I{torch_include}", f"-I{torch_include}/torch/csrc/api/include", f"-I{folder}",
                *(f"-I{i}" for i in includes), f"-I{cuda_include}", f"-I{cuda_include}/cccl",
                f"-I{python_include}", source]

    return command


@pytest.mark.skipif(_cuda_include_dir() is None or torch.version.cuda is not None,
                    reason="needs the CUDA headers, and a CPU torch (a CUDA torch builds these for real)")
@pytest.mark.parametrize("source", CUDA_HOST_SOURCES, ids=os.path.basename)
def test_cuda_host_code_compiles(source, compile_check):
    """The CUDA transport and its torch glue compile against this torch's headers, so CI catches
    a broken CUDA path without a GPU."""
    result = compile_check(_syntax_command())
    assert result.returncode == 0, result.stderr[-4000:]


NVSHMEM_HOST_SOURCES = sorted(glob.glob(os.path.join(ROOT, "backend", "transport", "nvshmem", "*.cpp"))
                              + [os.path.join(ROOT, "backend", "ops", "cuda", "low_latency_cuda.cpp")]
                              # CUDA host files with an NVSHMEM-only branch (the internode path)
                              + [os.path.join(ROOT, "backend", "transport", "cuda", "kernel_preload.cpp"),
                                 os.path.join(ROOT, "backend", "process_group", "cuda", "internode_path.cpp"),
                                 os.path.join(ROOT, "backend", "ops", "cuda", "moe_internode_cuda.cpp"),
                                 os.path.join(ROOT, "backend", "ops", "cuda", "moe_internode_device.cpp")])


@pytest.mark.skipif(_cuda_include_dir() is None or torch.version.cuda is not None or _nvshmem_root() is None,
                    reason="needs the CUDA headers, NVSHMEM's, and a CPU torch")
@pytest.mark.parametrize("source", NVSHMEM_HOST_SOURCES, ids=os.path.basename)
def test_nvshmem_host_code_compiles(source, compile_check):
    """The NVSHMEM runtime and the low-latency glue compile as the NVSHMEM build compiles them."""
    result = compile_check(_syntax_command(
        defines=["TORCH_EP_WITH_NVSHMEM"], includes=[f"{_nvshmem_root()}/include"]))
    assert result.returncode == 0, result.stderr[-4000:]


EXCHANGE_SCHEDULE_CHECK = r"""
#include <cstdio>
#include <vector>
#include "backend/kernels/internode_exchange.cuh"
using namespace ep::kernels;
int main() {  // every round an involution without fixed points; every ordered pair exactly once
  for (int n = 1; n <= 129; ++n) {
    std::vector<int> seen(n * n, 0);
    for (int k = 0; k < exchange_rounds(n); ++k)
      for (int r = 0; r < n; ++r) {
        const int p = exchange_partner(k, r, n);
        if (p < 0) continue;
        if (p == r || p >= n || exchange_partner(k, p, n) != r) { std::printf("n=%d round %d: %d -> %d\n", n, k, r, p); return 1; }
        ++seen[r * n + p];
      }
    for (int a = 0; a < n; ++a)
      for (int b = 0; b < n; ++b)
        if (a != b && seen[a * n + b] != 1) { std::printf("n=%d: %d -> %d %d times\n", n, a, b, seen[a * n + b]); return 1; }
  }
  return 0;
}
"""


@pytest.mark.skipif(_cuda_include_dir() is None or shutil.which("g++") is None, reason="needs g++ and the CUDA headers")
def test_exchange_schedule_pairs_every_rank_once(tmp_path):
    """The device hop across nodes pairs ranks by exchange_partner's rounds: both ends of a pair
    must use the same blocks (same round), or a block would wait on one its partner never runs."""
    source = tmp_path / "schedule.cpp"
    source.write_text(EXCHANGE_SCHEDULE_CHECK)
    binary = tmp_path / "schedule"
    subprocess.run(["g++", "-std=c++17", f"-I{ROOT}", f"-I{_cuda_include_dir()}", str(source), "-o", str(binary)],
                   check=True)
    run = subprocess.run([str(binary)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout


MOE_VERDICT_CHECK = r"""
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>
#include "backend/kernels/moe_records.cuh"
using namespace ep::kernels;

static std::mt19937_64 rng(7);
static int failures = 0;
#define EXPECT(cond, ...) do { if (!(cond)) { std::printf(__VA_ARGS__); std::printf("\n"); ++failures; } } while (0)

// R ranks' records of one well-formed call: a random send matrix, capacities that hold it,
// `handle`: every rank expects what its senders send.
static std::vector<std::vector<int64_t>> call(int R, bool handle, int64_t spare) {
  std::vector<std::vector<int64_t>> rec(R, std::vector<int64_t>(kMoeRecordWords, 0));
  for (int s = 0; s < R; ++s) {
    auto& r = rec[s];
    r[kRecOp] = kMoeRecordDispatch; r[kRecCallId] = 41; r[kRecHandleId] = handle ? 17 : 0;
    r[kRecNumExperts] = 8 * R; r[kRecHidden] = 7168; r[kRecDtype] = 15; r[kRecNumTopk] = handle ? 0 : 8;
    r[kRecHasScales] = 1; r[kRecHasWeights] = !handle; r[kRecPush] = 1;
    for (int i = 0; i < 4; ++i) r[kRecOffset + i] = 4096 * (i + 1) * (s + 1);
    for (int d = 0; d < R; ++d) r[kRecSend + d] = int64_t(rng() % 300);
  }
  for (int d = 0; d < R; ++d) {
    int64_t arriving = 0;
    for (int s = 0; s < R; ++s) {
      arriving += rec[s][kRecSend + d];
      rec[d][kRecExpect + s] = handle ? rec[s][kRecSend + d] : -1;
    }
    rec[d][kRecCapacity] = arriving + spare;
  }
  return rec;
}

// What rank `me` evaluates: its own copy of the R records it gathered (the same words everywhere).
static MoeVerdict on_rank(const std::vector<std::vector<int64_t>>& rec, int me) {
  static int64_t mine[kMaxRanksPerNode][kMoeRecordWords];
  std::memset(mine, 0xA5, sizeof(mine));  // words past R differ per rank: the verdict must not read them
  for (size_t s = 0; s < rec.size(); ++s)
    for (int w = 0; w < kMoeRecordWords; ++w) mine[s][w] = rec[s][w];
  for (size_t s = 0; s < rec.size(); ++s)  // send/expect entries past R, garbage that differs per rank
    for (int d = int(rec.size()); d < kMaxRanksPerNode; ++d) {
      mine[s][kRecSend + d] = me * 1000 + d;
      mine[s][kRecExpect + d] = me * 1000 + d;
    }
  return moe_verdict(mine, int(rec.size()));
}

// Every rank reaches the same verdict, equal to `want` (code, detail, rank, peer, value, peer_value).
static void same_everywhere(const std::vector<std::vector<int64_t>>& rec, MoeVerdict want, const char* what) {
  for (int me = 0; me < int(rec.size()); ++me) {
    const MoeVerdict v = on_rank(rec, me);
    EXPECT(v.code == want.code && v.detail == want.detail && v.rank == want.rank && v.peer == want.peer &&
               v.value == want.value && v.peer_value == want.peer_value,
           "R=%zu %s on rank %d: got code %lld detail %lld rank %lld peer %lld values %lld/%lld, want %lld %lld %lld "
           "%lld %lld/%lld", rec.size(), what, me, (long long)v.code, (long long)v.detail, (long long)v.rank,
           (long long)v.peer, (long long)v.value, (long long)v.peer_value, (long long)want.code,
           (long long)want.detail, (long long)want.rank, (long long)want.peer, (long long)want.value,
           (long long)want.peer_value);
  }
}

int main() {
  for (int R : {1, 2, 3, 4, 8, 32})
    for (bool handle : {false, true}) {
      auto ok = call(R, handle, handle ? 0 : 5);
      same_everywhere(ok, {kVerdictOk, 0, -1, -1, 0, 0}, "a well-formed call");
      EXPECT(on_rank(ok, 0).moves(), "a well-formed call moves rows");
      for (int s = 1; s < R; ++s) {
        for (int w = kFirstCheckedWord; w <= kLastCheckedWord; ++w) {  // every checked field, on every rank
          auto bad = ok;
          bad[s][w] += 3;
          same_everywhere(bad, {kVerdictMismatch, w, s, 0, ok[0][w] + 3, ok[0][w]}, "a field mismatch");
          EXPECT(!on_rank(bad, 0).moves(), "a mismatch moves nothing");
        }
        auto late = ok;  // out of step: one rank at another dispatch
        late[s][kRecCallId] = 42;
        same_everywhere(late, {kVerdictOutOfStep, kRecCallId, s, 0, 42, 41}, "out-of-step call ids");
        EXPECT(!on_rank(late, 0).moves(), "out of step moves nothing");
        auto other_handle = ok;
        other_handle[s][kRecHandleId] = 99;
        same_everywhere(other_handle, {kVerdictHandle, 0, s, 0, 99, ok[0][kRecHandleId]}, "another handle");
      }
      for (int s = 0; s < R; ++s) {
        auto refused = ok;  // a rank refuses (its pool, or ids out of range): nothing moves anywhere
        refused[s][kRecStatus] = kRefusedExpertIds;
        refused[s][kRecStatusValue] = -5;
        refused[s][kRecStatusValue2] = 1000;
        same_everywhere(refused, {kVerdictRefused, kRefusedExpertIds, s, -1, -5, 1000}, "a refusal");
        EXPECT(!on_rank(refused, 0).moves(), "a refusal moves nothing");
      }
      if (handle && R > 1) {  // a receiver's handle expects other counts than its sender sends
        auto off = ok;
        off[1][kRecExpect + 0] += 1;
        same_everywhere(off, {kVerdictHandle, 1, 1, 0, ok[1][kRecExpect + 0] + 1, ok[0][kRecSend + 1]},
                        "a handle expecting other counts");
      }
      for (int d = 0; d < R; ++d) {  // overflow past a receiver's capacity: seen alike, rows still move
        auto over = ok;
        int64_t arriving = 0;
        for (int s = 0; s < R; ++s) arriving += over[s][kRecSend + d];
        if (arriving == 0) { over[0][kRecSend + d] = 1; arriving = 1; if (handle) over[d][kRecExpect + 0] += 1; }
        over[d][kRecCapacity] = arriving - 1;
        same_everywhere(over, {kVerdictOverflow, 0, d, -1, arriving, arriving - 1}, "an overflow");
        EXPECT(on_rank(over, 0).moves(), "an overflow still moves the rows that fit");
      }
      if (R > 1) {  // one rank at a combine where the others dispatch: out of step, by op, before the call ids
        auto other_op = ok;
        other_op[R - 1][kRecOp] = kMoeRecordCombine;
        other_op[R - 1][kRecCallId] = 7;
        same_everywhere(other_op, {kVerdictOutOfStep, kRecOp, R - 1, 0, kMoeRecordCombine, kMoeRecordDispatch},
                        "a combine among dispatches");
        EXPECT(!on_rank(other_op, 0).moves(), "ops out of step move nothing");
      }
      {  // a combine: its capacity is its x's rows, never an overflow; its checks and handles as a dispatch's
        auto comb = ok;
        for (int s = 0; s < R; ++s) {
          comb[s][kRecOp] = kMoeRecordCombine;
          comb[s][kRecCapacity] = 0;
        }
        same_everywhere(comb, {kVerdictOk, 0, -1, -1, 0, 0}, "a combine whose x holds fewer rows than arrive");
        if (R > 1) {
          auto bad = comb;
          bad[1][kRecHasWeights] ^= 1;
          same_everywhere(bad, {kVerdictMismatch, kRecHasWeights, 1, 0, bad[1][kRecHasWeights], comb[0][kRecHasWeights]},
                          "a combine's field mismatch");
          auto late = comb;
          late[1][kRecCallId] = 40;
          same_everywhere(late, {kVerdictOutOfStep, kRecCallId, 1, 0, 40, 41}, "combines along other handles");
        }
      }
      auto first = ok;  // several problems: the first in the documented order, alike everywhere
      if (R > 1) {
        first[R - 1][kRecHidden] = 1;
        first[R - 1][kRecCallId] = 40;
        same_everywhere(first, {kVerdictOutOfStep, kRecCallId, R - 1, 0, 40, 41}, "out of step before a mismatch");
      }
    }
  return failures ? 1 : 0;
}
"""


@pytest.mark.skipif(_cuda_include_dir() is None or shutil.which("g++") is None, reason="needs g++ and the CUDA headers")
def test_moe_device_records_verdict(tmp_path):
    """moe_verdict (kernels/moe_records.cuh), compiled for the host: every rank evaluates it on the
    same records (a copy of its own, garbage past R) and reaches the same verdict: every checked
    field's mismatch, out-of-step call ids or ops, another handle, a handle expecting other counts,
    a refusal, an overflow at any receiver (the rows that fit still move; a combine's capacity is
    no bound), the first problem first."""
    source = tmp_path / "verdict.cpp"
    source.write_text(MOE_VERDICT_CHECK)
    binary = tmp_path / "verdict"
    subprocess.run(["g++", "-std=c++17", "-Wall", f"-I{ROOT}", f"-I{_cuda_include_dir()}", str(source), "-o",
                    str(binary)], check=True)
    run = subprocess.run([str(binary)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:]


def test_ci_runs_the_readme_commands():
    """.ci/run runs exactly the README's Quick start commands, so that CI checks what a user runs."""
    with open(os.path.join(ROOT, "README.md")) as f:
        quick_start = f.read().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [block.split("```", 1)[0].strip() for block in quick_start.split("```bash\n")[1:]]
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci_lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert len(commands) == 2, commands
    assert [line for line in ci_lines if line in commands] == commands, (commands, ci_lines)


@pytest.mark.skipif(_cuda_include_dir() is None or shutil.which("g++") is None, reason="needs g++ and the CUDA headers")
def test_peer_mappings_release_logic(tmp_path):
    """peer_mappings.cpp against a fake CUDA runtime that counts each mapping's references, two
    ranks as two threads (tests/scripts/peer_mappings_check.cpp): a freed export is logged once;
    its mapping is closed only once the calls tracked before are complete, never while a call
    holds the mappings; one met again before its close stays mapped; a reader lapped by the log
    lets every mapping of that peer go; the destructor closes the rest."""
    sources = [os.path.join(ROOT, "tests", "scripts", "peer_mappings_check.cpp")] + [
        os.path.join(ROOT, "backend", *p) for p in (("transport", "cuda", "peer_mappings.cpp"),
                                                    ("transport", "host", "shm_segment.cpp"),
                                                    ("transport", "rendezvous.cpp"), ("common", "errors.cpp"))]
    binary = tmp_path / "peer_mappings"
    subprocess.run(["g++", "-std=c++17", "-Wall", f"-I{ROOT}", f"-I{_cuda_include_dir()}", *sources, "-o",
                    str(binary), "-lpthread", "-lrt"], check=True)
    run = subprocess.run([str(binary)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:]
