#!/usr/bin/env bash
# The GPU suite: build, GPU tests with 1, 2, 4 and 8 ranks, then the benchmarks; logs in OUT.
#
#   bash benchmarks/gpu_suite.sh OUT [tests|bench|all|moe|sm-sweep|ll|a2av|profile|ll-profile|internode|compile|deep_ep|pending]
#     sm-sweep: MoE dispatch/combine bandwidth against the SM budget 1..64 and the copy variant
#     (benchmarks/moe.py --sm-sweep --copy, 4096 tokens; TORCH_EP_SM_SWEEP_RANKS, default 2;
#     TORCH_EP_SM_SWEEP_BUDGETS, TORCH_EP_SM_SWEEP_COPIES, default warp,unroll,bulk):
#     LOGS/moe_sm_sweep_Rranks/moe_sm_sweep.{json,png}, whose sm_table_entries go into torch_ep/data/sm_table.json
#     moe: the MoE tests and benchmark only (TORCH_EP_MOE_WORLD_SIZES, TORCH_EP_MOE_BENCH_RANKS pick
#     the ranks); ll: the low-latency tests and benchmark only (TORCH_EP_LL_WORLD_SIZES,
#     TORCH_EP_LL_BENCH_RANKS); internode: tests and benchmark across virtual nodes
#     (TORCH_EP_INTERNODE_TOPOLOGIES, e.g. 2x2,2x4; TORCH_EP_INTERNODE_BENCH, e.g. 2x2), the
#     low-latency ops with the remote path forced among them included; ll-remote: only the latter;
#     a2av: the all_to_all_v tests (TORCH_EP_A2AV_WORLD_SIZES, default 1,2,4) and the all_to_all benchmark,
#     whose all_to_all_v row sits next to all_to_all_single's (TORCH_EP_A2AV_BENCH_RANKS, default 1 2 4);
#     profile: tools/moe_profile.py and tools/ll_profile.py with 2 ranks (ll-profile: the latter only;
#     TORCH_EP_LL_PROFILE_RANKS); compile: the torch.compile tests (tests/test_cuda_compile.py,
#     TORCH_EP_COMPILE_WORLD_SIZES, default 2), the demo with --compile (reduce-overhead) and the
#     compiled-layer benchmark rows, with 2 ranks; deep_ep: torch_ep.deep_ep's GPU tests, its
#     example, and the MoE benchmark through the native API and through the DeepEP API
#     (TORCH_EP_DEEP_EP_WORLD_SIZES, TORCH_EP_DEEP_EP_BENCH_RANKS; default 2 ranks)
#     pending: what was built but has not passed on a GPU yet, most valuable first, each step
#     bounded; TORCH_EP_PENDING_STEPS picks among internode (the device route's tests, at
#     TORCH_EP_INTERNODE_TOPOLOGIES, default 2x2),
#     pool (comm_pool's tests with the all_to_all and all_to_all_v ones; TORCH_EP_POOL_TESTS picks
#     the files, TORCH_EP_POOL_WORLD_SIZES the ranks, TORCH_EP_POOL_LIMIT_S its bound),
#     deep_ep_tests (torch_ep.deep_ep's GPU tests), deep_ep (those, its example and the both-API benchmark), compile_tests (the compile
#     tests alone), deep_ep_bench (the both-API benchmark alone), deep_ep_overhead
#     (tools/deep_ep_overhead.py: the DeepEP API's cost part by part), moe_profile
#     (tools/moe_profile.py), copy_tests (the MoE copy variants' GPU tests), internode_bench,
#     (TORCH_EP_INTERNODE_BENCH_ARGS adds arguments, e.g. --no-host-route; TORCH_EP_INTERNODE_BENCH the
#     topologies, default 2x2; TORCH_EP_INTERNODE_BENCH_VARIANTS runs it and internode_profile once
#     per set of settings, below), ll_remote_bench (the low-latency ops with the remote path forced, same topologies;
#     TORCH_EP_LL_REMOTE_BENCH_VARIANTS runs it once per set of settings, at ll_remote_benches),
#     internode_profile (tools/internode_profile.py: each kernel's time across 2x2 virtual nodes),
#     launch_probe (tools/launch_probe.cu: a launch's host cost against its parameters' size),
#     handshake_probe (tools/handshake_probe.cu: a call's floor where ranks share the GPU),
#     reports (all_to_all's device report tests of session 24),
#     sm_ceiling (tools/sm_copy_ceiling.cu: what k SMs can copy), pool_probe (tools/pool_copy_probe.cu:
#     the one-copy move's copy shapes, 2 ranks under MPS at 64 MiB, then 1 rank), timeouts, faults (a rank killed
#     mid-stream on CUDA), push_tests / push_ab / push_profile (push dispatch and device records:
#     their tests, and the MoE benchmark and profile per TORCH_EP_PUSH_VARIANTS; see the steps),
#     export_probe (tools/export_probe.py), a2a_profile (tools/a2a_profile.py:
#     all_to_all's host time per call), a2a_kernels (tools/a2a_kernels.py: its device time kernel
#     by kernel, every rank, 2 ranks), a2a_bench (at
#     TORCH_EP_PENDING_BENCH_RANKS), a2a_sweep (benchmarks/all_to_all_sweep.py: the device
#     protocol's staged and one-copy settings, TORCH_EP_A2A_SWEEP_STAGED / _POOL, at
#     TORCH_EP_PENDING_BENCH_RANKS), compile (the compile mode) and
#     sm_sweep (the sm-sweep mode); default "deep_ep_bench deep_ep_overhead copy_tests sm_sweep".
#     A short TORCH_EP_TIMEOUT_S makes a hang fail fast
#
# Ranks beyond the GPU count share GPUs; when they do, an MPS daemon is started (and stopped
# at the end) and each rank gets CUDA_MPS_ACTIVE_THREAD_PERCENTAGE = 100 / ranks-per-GPU.
# Finishes within 10 minutes on one H100. Everything lands in OUT/suite.tar.gz plus a summary.
set -uo pipefail
OUT=$(realpath -m "${1:-out/gpu}")
WHAT=${2:-all}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LOGS="$OUT/logs"
mkdir -p "$LOGS"
cd "$ROOT"
export PYTHONUNBUFFERED=1
# Never NVLink multicast on shared machines (KINDS.md); harmless elsewhere.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
SUMMARY="$OUT/summary.md"
echo "# GPU suite $(date -u +%F' '%H:%M) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" > "$SUMMARY"
step() { echo "== $*" | tee -a "$SUMMARY"; }

{ nvidia-smi; python3 -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.device_count())'; } \
  > "$LOGS/machine.txt" 2>&1
head -20 "$LOGS/machine.txt" >> "$SUMMARY"
GPUS=$(python3 -c 'import torch; print(torch.cuda.device_count())')

# The GPU image sets CXX to /opt/gcc's g++, newer than the system libstdc++ that python loads:
# an extension built with it carries its own libstdc++ locale instances and crashes formatting
# a number into any ostringstream (every TORCH_CHECK message with a count). Build with the
# system g++, which matches the runtime; TORCH_EP_CXX overrides.
for candidate in "${TORCH_EP_CXX:-}" /usr/bin/g++ /usr/bin/g++-13 /usr/bin/g++-14; do
  if [ -n "$candidate" ] && [ -x "$candidate" ]; then export CXX=$candidate CUDAHOSTCXX=$candidate; break; fi
done
{ "$CXX" --version | head -1; ldconfig -p | grep "libstdc++.so.6 " | head -2; } >> "$SUMMARY" 2>&1
step "build (CXX=${CXX:-default})"
if ! MAX_JOBS=16 python3 -m pip install --no-build-isolation --no-deps -e . > "$LOGS/build.log" 2>&1; then
  tail -40 "$LOGS/build.log" | tee -a "$SUMMARY"
  tar -czf "$OUT/suite.tar.gz" -C "$OUT" logs; exit 1
fi
python3 -c 'import torch_ep; assert torch_ep._C.has_cuda, "built without CUDA"' 2>&1 | tee -a "$SUMMARY"
grep -h "torch_ep: NVSHMEM from" "$LOGS/build.log" | head -1 >> "$SUMMARY"
python3 -c 'import torch_ep; print("torch_ep built with NVSHMEM:", torch_ep._C.has_nvshmem)' 2>&1 | tee -a "$SUMMARY"
python3 tools/cuda_smoke.py 2>&1 | tail -3 | tee -a "$SUMMARY"  # the error path: a toolchain mismatch crashes here

MPS_STARTED=0
start_mps() {
  command -v nvidia-cuda-mps-control > /dev/null || { echo "no MPS: ranks sharing a GPU are time-sliced" | tee -a "$SUMMARY"; return; }
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/torch_ep_mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/torch_ep_mps_log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  nvidia-cuda-mps-control -d && MPS_STARTED=1 && echo "MPS started" | tee -a "$SUMMARY"
}
stop_mps() {
  if [ "$MPS_STARTED" = 1 ]; then echo quit | nvidia-cuda-mps-control; MPS_STARTED=0; fi
  tar -czf "$OUT/suite.tar.gz" -C "$OUT" logs 2> /dev/null
}
trap stop_mps EXIT
[ "$GPUS" -lt 8 ] && start_mps

STATUS=0
# run_bench R LIMIT_S LOG SUMMARY_LINES SCRIPT ARGS...: torchrun of a benchmark on R ranks, each with
# its share of the GPU it shares, its output in LOGS/LOG and its last lines in the summary.
run_bench() {
  local R=$1 LIMIT=$2 LOG=$3 LINES=$4; shift 4
  local SHARING=$(( (R + GPUS - 1) / GPUS ))
  CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$((100 / SHARING)) timeout "$LIMIT" \
    torchrun --standalone --nproc-per-node "$R" "$@" > "$LOGS/$LOG" 2>&1 || STATUS=1
  tail -"$LINES" "$LOGS/$LOG" >> "$SUMMARY"
}
# The low-latency ops with the remote path forced against intranode, at each TORCH_EP_INTERNODE_BENCH topology,
# once per TORCH_EP_LL_REMOTE_BENCH_VARIANTS entry (space-separated; each a comma-separated list of
# VAR=VALUE set for that run only, or "default"), e.g. "default TORCH_EP_LL_REMOTE_PUTS=batched";
# a variant's logs carry its settings in their names. `ll_remote_benches profile`: tools/ll_profile.py
# instead, with phase stamps.
ll_remote_benches() {
  local TOPO VARIANT TAG ENVS
  for TOPO in ${TORCH_EP_INTERNODE_BENCH:-2x2}; do
    local R=$(( ${TOPO%x*} * ${TOPO#*x} ))
    for VARIANT in ${TORCH_EP_LL_REMOTE_BENCH_VARIANTS:-default}; do
      ENVS=(); TAG=""
      if [ "$VARIANT" != default ]; then
        IFS=, read -ra ENVS <<< "$VARIANT"
        TAG="_$(echo "$VARIANT" | sed 's/TORCH_EP_//g; s/[^A-Za-z0-9=]/_/g; s/=/-/g')"
      fi
      # a subshell, so that the variant's settings end with its run
      if [ "${1:-bench}" = profile ]; then
        step "low-latency profile with phase stamps, $TOPO virtual nodes, remote path forced${TAG:+, $VARIANT}"
        ( [ ${#ENVS[@]} -gt 0 ] && export "${ENVS[@]}"
          export TORCH_EP_FORCE_REMOTE=1 TORCH_EP_RANKS_PER_NODE="${TOPO#*x}" TORCH_EP_LL_TRACE=1
          run_bench "$R" 120 "ll_remote_profile_$TOPO$TAG.log" 45 tools/ll_profile.py
          exit $STATUS ) || STATUS=1
        continue
      fi
      step "low-latency benchmark, $TOPO virtual nodes, remote path forced against intranode${TAG:+, $VARIANT}"
      ( [ ${#ENVS[@]} -gt 0 ] && export "${ENVS[@]}"
        run_bench "$R" 150 "ll_remote_bench_$TOPO$TAG.log" 12 benchmarks/low_latency.py --remote-ranks-per-node "${TOPO#*x}" \
          --out "$LOGS/low_latency_remote_$TOPO$TAG"
        exit $STATUS ) || STATUS=1
    done
  done
}
python3 -c 'import deep_ep; print("deep_ep", deep_ep.__file__)' >> "$SUMMARY" 2>&1 || echo "deep_ep: not importable" >> "$SUMMARY"
if [ "$WHAT" = all ] || [ "$WHAT" = tests ]; then
  step "GPU tests, 1 2 4 8 ranks"
  # Both protocols of all_to_all_single (host control exchange, device): twice the tests.
  TORCH_EP_TEST_WORLD_SIZES=1,2,4,8 timeout 420 python3 -m pytest tests/test_cuda_all_to_all.py tests/test_cuda_all_to_all_chunks.py -q -ra -x \
    > "$LOGS/gpu_tests.log" 2>&1 || STATUS=1
  tail -15 "$LOGS/gpu_tests.log" >> "$SUMMARY"
fi
if [ "$WHAT" = all ] || [ "$WHAT" = tests ]; then
  step "GPU reliability tests (fuzz, ${TORCH_EP_SOAK_CALLS:=10000}-call soak, a rank killed), ${TORCH_EP_RELIABILITY_WORLD_SIZES:-2,4,8} ranks"
  TORCH_EP_TEST_WORLD_SIZES=${TORCH_EP_RELIABILITY_WORLD_SIZES:-2,4,8} TORCH_EP_SOAK_CALLS=$TORCH_EP_SOAK_CALLS \
    timeout 300 python3 -m pytest tests/test_fuzz.py tests/test_soak.py tests/test_faults.py -k cuda -q -ra -x \
    > "$LOGS/gpu_reliability.log" 2>&1 || STATUS=1
  grep -v "^\[rank" "$LOGS/gpu_reliability.log" | tail -15 >> "$SUMMARY"
fi
if [ "$WHAT" = all ] || [ "$WHAT" = tests ] || [ "$WHAT" = moe ]; then
  step "GPU MoE tests, ${TORCH_EP_MOE_WORLD_SIZES:-1,2,4,8} ranks"
  TORCH_EP_TEST_WORLD_SIZES=${TORCH_EP_MOE_WORLD_SIZES:-1,2,4,8} timeout 300 python3 -m pytest tests/test_cuda_moe.py \
    tests/test_cuda_moe_push.py tests/test_cuda_moe_device_records.py -q -ra -x > "$LOGS/gpu_moe_tests.log" 2>&1 || STATUS=1
  grep -v "^\[rank" "$LOGS/gpu_moe_tests.log" | tail -40 >> "$SUMMARY"
fi
if [ "$WHAT" = all ] || [ "$WHAT" = tests ] || [ "$WHAT" = a2av ]; then
  step "GPU all_to_all_v tests, ${TORCH_EP_A2AV_WORLD_SIZES:-1,2,4} ranks"
  TORCH_EP_TEST_WORLD_SIZES=${TORCH_EP_A2AV_WORLD_SIZES:-1,2,4} timeout 300 python3 -m pytest tests/test_cuda_all_to_all_v.py \
    -q -ra -x > "$LOGS/gpu_a2av_tests.log" 2>&1 || STATUS=1
  grep -v "^\[rank" "$LOGS/gpu_a2av_tests.log" | tail -30 >> "$SUMMARY"
fi
if [ "$WHAT" = a2av ]; then
  for R in ${TORCH_EP_A2AV_BENCH_RANKS:-1 2 4}; do
    step "all_to_all benchmark (all_to_all_single and all_to_all_v rows), $R ranks"
    run_bench "$R" 120 "a2av_bench_${R}ranks.log" 16 benchmarks/all_to_all.py --device cuda --max-bytes $((64 << 20)) \
      --out "$LOGS/a2av_${R}ranks"
  done
fi
if [ "$WHAT" = profile ]; then
  for R in 2; do
    step "MoE profile, $R ranks"
    CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$((100 / R)) timeout 120 torchrun --standalone --nproc-per-node "$R" \
      tools/moe_profile.py > "$LOGS/moe_profile_${R}ranks.log" 2>&1 || STATUS=1
    grep -v "^\[rank\|^W1125\|^rank [1-9]\|TRACE" "$LOGS/moe_profile_${R}ranks.log" | head -30 >> "$SUMMARY"
    grep TRACE "$LOGS/moe_profile_${R}ranks.log" | head -40 >> "$SUMMARY"
  done
fi
if [ "$WHAT" = all ] || [ "$WHAT" = bench ] || [ "$WHAT" = moe ]; then
  for R in ${TORCH_EP_MOE_BENCH_RANKS:-2 4 8}; do
    step "MoE benchmark, $R ranks (4096 tokens, hidden 7168, top-8, 256 experts)"
    run_bench "$R" 90 "moe_bench_${R}ranks.log" 18 benchmarks/moe.py --out "$LOGS/moe_${R}ranks"
  done
fi
sm_sweep() {
  # Every budget up to the whole share of the GPU, each with every copy variant (Options.moe_copy);
  # about 2 s per budget and variant at 2 ranks. The last lines are the stream GB/s pivot table.
  local BUDGETS=${TORCH_EP_SM_SWEEP_BUDGETS:-1,2,4,8,16,24,32,48,64} COPIES=${TORCH_EP_SM_SWEEP_COPIES:-warp,unroll,bulk}
  for R in ${TORCH_EP_SM_SWEEP_RANKS:-2}; do
    step "MoE bandwidth against the SM budget ($BUDGETS) and copy variant ($COPIES), $R ranks (4096 tokens, hidden 7168, top-8, 256 experts)"
    run_bench "$R" 240 "moe_sm_sweep_${R}ranks.log" 16 benchmarks/moe.py --sm-sweep "$BUDGETS" --copy "$COPIES" \
      --tokens 4096 --out "$LOGS/moe_sm_sweep_${R}ranks"
    grep "^[0-9]* SMs:" "$LOGS/moe_sm_sweep_${R}ranks.log" >> "$SUMMARY"
  done
}
[ "$WHAT" = sm-sweep ] && sm_sweep

# nvshmem4py (NVSHMEM's Python bindings, which initialise NVSHMEM) is not installed on the GPU
# machine and it has no network: its wheel travels in the repository's git-ignored .whl/.
need_nvshmem4py() {
  if ! python3 -c 'import nvshmem.core' > /dev/null 2>&1; then
    if ls .whl/nvshmem4py*.whl > /dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/nvshmem4py*.whl >> "$LOGS/build.log" 2>&1
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
  fi
  python3 -c 'import nvshmem.core, nvshmem; print("nvshmem4py", nvshmem.__version__)' 2>&1 | tail -1 | tee -a "$SUMMARY"
}
if [ "$WHAT" = pending ]; then
  need_nvshmem4py
  # pending_test NAME LIMIT_S [ENV=VALUE ...] -- PYTEST_ARGS...: one bounded pytest step.
  pending_test() {
    local name=$1 limit=$2; shift 2
    local envs=(); while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
    step "pending: $name"
    env TORCH_EP_TIMEOUT_S=20 "${envs[@]}" timeout -s INT "$limit" python3 -m pytest -o faulthandler_timeout=$((limit - 8)) \
      "$@" -q -ra > "$LOGS/pending_$name.log" 2>&1 || STATUS=1
    grep -v "^\[rank\|^  " "$LOGS/pending_$name.log" | tail -12 >> "$SUMMARY"
    # A step cut by its bound can leave its ranks (the test pool's spawned processes) spinning
    # on the GPU, where they would disturb the next steps' timings.
    if pkill -f "multiprocessing.spawn" 2> /dev/null; then
      echo "(pending: $name left ranks running; killed)" >> "$SUMMARY"; sleep 2
    fi
  }
  # Steps (TORCH_EP_PENDING_STEPS picks, in this order): internode (the device route across nodes,
  # every test at 2x2), pool (torch_ep.comm_pool's tests with the all_to_all and all_to_all_v
  # tests whose kernels it shares, TORCH_EP_POOL_WORLD_SIZES, default 2 ranks), deep_ep
  # (torch_ep.deep_ep's GPU tests, its example, the MoE benchmark through both APIs in one run),
  # internode_bench (the device route's
  # benchmark against the host route and the intranode route), timeouts (the CUDA timeout fault
  # tests), a2a_profile (all_to_all's host time per call), a2a_kernels (its device time kernel by
  # kernel, every rank), a2a_bench (the all_to_all benchmark,
  # with the pool row), sm_ceiling and pool_probe (stand-alone copy probes, tools/*.cu); then compile (the compile
  # mode's checks) and sm_sweep (the sm-sweep mode).
  STEPS=" ${TORCH_EP_PENDING_STEPS:-deep_ep_bench deep_ep_overhead copy_tests sm_sweep} "
  [[ $STEPS == *" internode "* ]] && pending_test internode_device ${TORCH_EP_INTERNODE_LIMIT_S:-200} NVSHMEM_SYMMETRIC_SIZE=3G \
    TORCH_EP_INTERNODE_TOPOLOGIES=${TORCH_EP_INTERNODE_TOPOLOGIES:-2x2} TORCH_EP_INTERNODE_ROUTES=${TORCH_EP_INTERNODE_ROUTES:-device} -- tests/test_cuda_internode.py tests/test_cuda_internode_refusals.py
  [[ $STEPS == *" pool "* ]] && pending_test pool ${TORCH_EP_POOL_LIMIT_S:-110} TORCH_EP_TEST_WORLD_SIZES=${TORCH_EP_POOL_WORLD_SIZES:-2} -- \
    ${TORCH_EP_POOL_TESTS:-tests/test_cuda_comm_pool.py tests/test_cuda_all_to_all_v.py tests/test_cuda_all_to_all.py tests/test_cuda_all_to_all_chunks.py}
  [[ $STEPS == *" deep_ep_tests "* ]] && pending_test deep_ep_tests 60 TORCH_EP_TEST_WORLD_SIZES=2 -- tests/test_cuda_deep_ep.py
  if [[ $STEPS == *" deep_ep "* ]]; then
    pending_test deep_ep 45 TORCH_EP_TEST_WORLD_SIZES=2 -- tests/test_cuda_deep_ep.py tests/test_deep_ep.py -x
    step "examples/deep_ep_drop_in.py, 2 ranks"
    run_bench 2 50 deep_ep_example.log 3 examples/deep_ep_drop_in.py --device cuda
    step "MoE benchmark, the native API and the DeepEP API in the same run, 2 ranks"
    run_bench 2 120 moe_bench_deep_ep_2ranks.log 30 benchmarks/moe.py --api both --out "$LOGS/moe_deep_ep_2ranks"
  fi
  [[ $STEPS == *" compile_tests "* ]] && pending_test compile_tests 240 \
    TORCH_EP_TEST_WORLD_SIZES=${TORCH_EP_COMPILE_WORLD_SIZES:-2} -- tests/test_cuda_compile.py
  if [[ $STEPS == *" deep_ep_bench "* ]]; then
    step "MoE benchmark, the native API and the DeepEP API in the same run, 2 ranks"
    run_bench 2 120 moe_bench_deep_ep_2ranks.log 30 benchmarks/moe.py --api both --out "$LOGS/moe_deep_ep_2ranks"
  fi
  if [[ $STEPS == *" deep_ep_overhead "* ]]; then
    step "torch_ep.deep_ep's overhead over the native API, part by part, 2 ranks"
    CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50 timeout 120 torchrun --standalone --nproc-per-node 2 \
      tools/deep_ep_overhead.py > "$LOGS/deep_ep_overhead_2ranks.log" 2>&1 || STATUS=1
    grep -v "^W1202\|^\*\*\*" "$LOGS/deep_ep_overhead_2ranks.log" | tail -24 >> "$SUMMARY"
  fi
  if [[ $STEPS == *" moe_profile "* ]]; then
    step "MoE profile (native API and DeepEP API), 2 ranks"
    CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50 timeout 100 torchrun --standalone --nproc-per-node 2 \
      tools/moe_profile.py > "$LOGS/moe_profile_2ranks.log" 2>&1 || STATUS=1
    grep "^rank 0" "$LOGS/moe_profile_2ranks.log" >> "$SUMMARY"
  fi
  # Push dispatch and device records (docs/moe_push.md): push_tests, their GPU tests at
  # TORCH_EP_PUSH_WORLD_SIZES (default 2; the device-records file runs 2 and 4 inside); push_ab,
  # benchmarks/moe.py --api both once per TORCH_EP_PUSH_VARIANTS entry (comma-separated VAR=VALUE
  # lists, as the internode variants; default pull, push with device records, and that in one
  # launch), 2 ranks, a 4 GiB MoE pool; push_profile, tools/moe_profile.py per variant likewise.
  PUSH_VARIANTS=${TORCH_EP_PUSH_VARIANTS:-"TORCH_EP_MOE_PUSH=0 TORCH_EP_MOE_PUSH=1,TORCH_EP_MOE_DEVICE_RECORDS=1 TORCH_EP_MOE_PUSH=1,TORCH_EP_MOE_DEVICE_RECORDS=1,TORCH_EP_MOE_ONE_LAUNCH=1"}
  push_tag() { echo "$1" | sed 's/TORCH_EP_MOE_//g; s/[^A-Za-z0-9=]/_/g; s/=/-/g'; }
  [[ $STEPS == *" push_tests "* ]] && pending_test push_tests ${TORCH_EP_PUSH_LIMIT_S:-360} \
    TORCH_EP_TEST_WORLD_SIZES=${TORCH_EP_PUSH_WORLD_SIZES:-2} TORCH_EP_COPY_WORLD_SIZES=${TORCH_EP_PUSH_WORLD_SIZES:-2} -- \
    tests/test_cuda_moe_push.py tests/test_cuda_moe_device_records.py tests/test_cuda_moe_records_combine.py -x
  # push_runs WHAT LIMIT_S LOG_PREFIX SUMMARY_CMD SCRIPT ARGS...: SCRIPT on 2 ranks once per variant.
  push_runs() {
    local what=$1 limit=$2 prefix=$3 summary=$4; shift 4
    for VARIANT in $PUSH_VARIANTS; do
      IFS=, read -ra PUSH_ENV <<< "$VARIANT"
      TAG=$(push_tag "$VARIANT")
      step "$what, 2 ranks, $VARIANT"
      env "${PUSH_ENV[@]}" TORCH_EP_MOE_POOL_BYTES=4294967296 CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50 timeout "$limit" \
        torchrun --standalone --nproc-per-node 2 "$@" ${prefix:+--out "$LOGS/${prefix}_$TAG"} \
        > "$LOGS/${prefix:-moe_profile}_$TAG.log" 2>&1 || STATUS=1
      $summary "$LOGS/${prefix:-moe_profile}_$TAG.log" >> "$SUMMARY"
    done
  }
  summary_tail() { tail -34 "$1"; }
  summary_rank0() { grep "^rank 0" "$1"; }
  [[ $STEPS == *" push_ab "* ]] && push_runs "MoE benchmark, both APIs" 150 moe_ab summary_tail benchmarks/moe.py --api both
  [[ $STEPS == *" push_profile "* ]] && push_runs "MoE profile" 100 "" summary_rank0 tools/moe_profile.py
  # TORCH_EP_INTERNODE_BENCH_VARIANTS: the internode_bench and internode_profile steps once per
  # variant (space-separated), each a comma-separated list of VAR=VALUE set for that run only, or
  # "default" (nothing set; the default is that one run), so that one build compares several, e.g.
  # "default TORCH_EP_INTERNODE_NODE_P2P=0,TORCH_EP_NUM_SMS=16"; a variant's logs
  # carry its settings in their names.
  internode_variants() {
    local variant=$1
    VARIANT_ENV=(); VARIANT_TAG=""
    if [ "$variant" != default ]; then
      IFS=, read -ra VARIANT_ENV <<< "$variant"
      VARIANT_TAG="_$(echo "$variant" | sed 's/TORCH_EP_//g; s/[^A-Za-z0-9=]/_/g; s/=/-/g')"
    fi
  }
  if [[ $STEPS == *" internode_bench "* ]]; then
    # TORCH_EP_INTERNODE_BENCH picks the topologies (default 2x2); every rank gets an equal
    # share of the GPU's 132 SMs.
    for TOPO in ${TORCH_EP_INTERNODE_BENCH:-2x2}; do
      for VARIANT in ${TORCH_EP_INTERNODE_BENCH_VARIANTS:-default}; do
        internode_variants "$VARIANT"
        R=$(( ${TOPO%x*} * ${TOPO#*x} ))
        step "internode benchmark, $TOPO virtual nodes (device route, host route, intranode)${VARIANT_TAG:+, $VARIANT}"
        env ${VARIANT_ENV[@]+"${VARIANT_ENV[@]}"} \
          NVSHMEM_REMOTE_TRANSPORT=none NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=lo NVSHMEM_DISABLE_NCCL=1 NVSHMEM_SYMMETRIC_SIZE=3G \
          CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$((100 / R)) TORCH_EP_NUM_SMS=${TORCH_EP_NUM_SMS:-$((132 / R))} timeout 200 \
          torchrun --standalone --nproc-per-node "$R" benchmarks/internode.py --ranks-per-node "${TOPO#*x}" \
          --out "$LOGS/internode_$TOPO$VARIANT_TAG" ${TORCH_EP_INTERNODE_BENCH_ARGS:-} \
          > "$LOGS/internode_bench_$TOPO$VARIANT_TAG.log" 2>&1 || STATUS=1
        tail -22 "$LOGS/internode_bench_$TOPO$VARIANT_TAG.log" >> "$SUMMARY"
      done
    done
  fi
  [[ $STEPS == *" ll_remote_bench "* ]] && ll_remote_benches
  # ll_remote_profile: tools/ll_profile.py with the remote path forced and phase stamps
  # (TORCH_EP_LL_TRACE), per topology and variant as ll_remote_bench: where the send's time goes.
  [[ $STEPS == *" ll_remote_profile "* ]] && ll_remote_benches profile
  if [[ $STEPS == *" internode_profile "* ]]; then
    for TOPO in ${TORCH_EP_INTERNODE_BENCH:-2x2}; do
      for VARIANT in ${TORCH_EP_INTERNODE_BENCH_VARIANTS:-default}; do
        internode_variants "$VARIANT"
        R=$(( ${TOPO%x*} * ${TOPO#*x} ))
        step "internode profile, $TOPO virtual nodes (each kernel's time per call, every rank)${VARIANT_TAG:+, $VARIANT}"
        env ${VARIANT_ENV[@]+"${VARIANT_ENV[@]}"} \
          NVSHMEM_REMOTE_TRANSPORT=none NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=lo NVSHMEM_DISABLE_NCCL=1 NVSHMEM_DISABLE_NVLS=1 \
          NVSHMEM_SYMMETRIC_SIZE=3G TORCH_EP_RANKS_PER_NODE=${TOPO#*x} CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$((100 / R)) \
          TORCH_EP_NUM_SMS=${TORCH_EP_NUM_SMS:-$((132 / R))} timeout 100 torchrun --standalone --nproc-per-node "$R" \
          tools/internode_profile.py > "$LOGS/internode_profile_$TOPO$VARIANT_TAG.log" 2>&1 || STATUS=1
        grep "^rank " "$LOGS/internode_profile_$TOPO$VARIANT_TAG.log" >> "$SUMMARY"
      done
    done
  fi
  if [[ $STEPS == *" sm_ceiling "* ]]; then
    step "the copy rate of k SMs, whatever the op (tools/sm_copy_ceiling.cu, one process, the whole GPU)"
    NVCC=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
    { "$NVCC" -O3 -arch=sm_90 -std=c++17 -o /tmp/sm_copy_ceiling tools/sm_copy_ceiling.cu && \
      CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=100 timeout 120 /tmp/sm_copy_ceiling 512; } > "$LOGS/sm_copy_ceiling.log" 2>&1 || STATUS=1
    tail -20 "$LOGS/sm_copy_ceiling.log" >> "$SUMMARY"
  fi
  if [[ $STEPS == *" pool_probe "* ]]; then
    # Issue 16: 2 forked ranks at 50 % of the SMs each (the a2a_kernels step's sharing), then 1 rank alone.
    step "the one-copy move's copy shapes (tools/pool_copy_probe.cu, 64 MiB per rank, 2 ranks under MPS, then 1)"
    NVCC=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
    { "$NVCC" -O3 -arch=sm_90 -std=c++17 -I. -o /tmp/pool_copy_probe tools/pool_copy_probe.cu && \
      CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50 timeout 120 /tmp/pool_copy_probe 64 2 && \
      CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=100 timeout 120 /tmp/pool_copy_probe 64 1; } > "$LOGS/pool_copy_probe.log" 2>&1 || STATUS=1
    cat "$LOGS/pool_copy_probe.log" >> "$SUMMARY"
  fi
  if [[ $STEPS == *" launch_probe "* ]]; then
    # Issues 16 and 18: what a launch costs the host against its parameters' size, under MPS at 50 %.
    step "the host's cost of a kernel launch against its parameters' size (tools/launch_probe.cu)"
    NVCC=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
    { "$NVCC" -O3 -arch=sm_90 -std=c++17 -o /tmp/launch_probe tools/launch_probe.cu && \
      CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50 timeout 60 /tmp/launch_probe 10000; } > "$LOGS/launch_probe.log" 2>&1 || STATUS=1
    cat "$LOGS/launch_probe.log" >> "$SUMMARY"
  fi
  if [[ $STEPS == *" handshake_probe "* ]]; then
    # Issue 16: the least a call costs where ranks share the GPU (kernels that meet, no data), 2 and 8 ranks.
    step "a call's floor: kernels that meet their peers and move nothing (tools/handshake_probe.cu, 2 and 8 ranks)"
    NVCC=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
    { "$NVCC" -O3 -arch=sm_90 -std=c++17 -I. -o /tmp/handshake_probe tools/handshake_probe.cu && \
      CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50 timeout 60 /tmp/handshake_probe 2 && \
      CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=12 timeout 60 /tmp/handshake_probe 8; } > "$LOGS/handshake_probe.log" 2>&1 || STATUS=1
    cat "$LOGS/handshake_probe.log" >> "$SUMMARY"
  fi
  # reports: later problems counted by all_to_all's device report (573eac3).
  [[ $STEPS == *" reports "* ]] && pending_test reports 120 TORCH_EP_TEST_WORLD_SIZES=1,2 -- \
    tests/test_cuda_all_to_all_v.py -k "later_problems or overflow_raised"
  [[ $STEPS == *" timeouts "* ]] && pending_test timeouts 150 -- tests/test_faults.py -k "timeout_cuda"
  # faults: a rank SIGKILLed mid-stream on CUDA (2 and 4 ranks, across 2x2 virtual nodes, the
  # device protocol): the survivors name it, within a node at once (its process seen gone).
  [[ $STEPS == *" faults "* ]] && pending_test faults 200 -- tests/test_faults.py -k "killed_mid_stream_cuda"
  if [[ $STEPS == *" export_probe "* ]]; then
    step "what an export costs (tools/export_probe.py: cuPointerGetAttributes, cudaIpcGetMemHandle; GPU idle and busy)"
    timeout 60 python3 tools/export_probe.py > "$LOGS/export_probe.log" 2>&1 || STATUS=1
    tail -20 "$LOGS/export_probe.log" >> "$SUMMARY"
  fi
  # copy_tests: the MoE GPU tests (on the default, auto's pick of the table) and the copy variants
  # (Options.moe_copy warp, unroll and bulk) against the reference at 1, 2, 8 SMs and
  # automatic, their fuzz included, 2 ranks (TORCH_EP_COPY_WORLD_SIZES).
  [[ $STEPS == *" copy_tests "* ]] && pending_test copy_tests 300 TORCH_EP_TEST_WORLD_SIZES=2 \
    TORCH_EP_COPY_WORLD_SIZES=${TORCH_EP_COPY_WORLD_SIZES:-2} -- tests/test_cuda_moe.py tests/test_cuda_moe_push.py \
    tests/test_fuzz.py -k "(not test_fuzz or copy_variant) and not missing_peer"
  if [[ $STEPS == *" a2a_profile "* ]]; then
    step "all_to_all's host time per call (tools/a2a_profile.py), 2 ranks"
    CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50 timeout 90 torchrun --standalone --nproc-per-node 2 \
      tools/a2a_profile.py --cpu-only > "$LOGS/a2a_profile_2ranks.log" 2>&1 || STATUS=1
    grep -v "^W1\|^\*\*\*" "$LOGS/a2a_profile_2ranks.log" | tail -40 >> "$SUMMARY"
  fi
  if [[ $STEPS == *" a2a_kernels "* ]]; then
    step "all_to_all's device time kernel by kernel, every rank (tools/a2a_kernels.py), 2 ranks"
    CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50 timeout 120 torchrun --standalone --nproc-per-node 2 \
      tools/a2a_kernels.py > "$LOGS/a2a_kernels_2ranks.log" 2>&1 || STATUS=1
    grep -v "^W1\|^\*\*\*" "$LOGS/a2a_kernels_2ranks.log" | tail -60 >> "$SUMMARY"
  fi
  if [[ $STEPS == *" a2a_sweep "* ]]; then
    # Settings as Options.all_to_all_* (lanes, slot, blocks, launches=2 for two launches); the
    # defaults at 2 ranks: lanes=32,slot=128K and blocks=131 (two per SM of a half H200, less the plan's).
    STAGED=${TORCH_EP_A2A_SWEEP_STAGED:-"lanes=32,slot=128K;lanes=32,slot=128K,launches=2;lanes=16,slot=1M;lanes=16,slot=128K;lanes=32,slot=64K;lanes=32,slot=256K;lanes=32,slot=1M;lanes=8,slot=128K"}
    POOLED=${TORCH_EP_A2A_SWEEP_POOL:-"blocks=131;blocks=131,launches=2;blocks=32;blocks=65;blocks=97;blocks=263"}
    for R in ${TORCH_EP_PENDING_BENCH_RANKS:-2}; do
      step "all_to_all device protocol settings, $R ranks (staged: $STAGED; one copy: $POOLED)"
      run_bench "$R" ${TORCH_EP_A2A_SWEEP_LIMIT_S:-240} "a2a_sweep_${R}ranks.log" 30 benchmarks/all_to_all_sweep.py \
        --staged "$STAGED" --pool "$POOLED" --out "$LOGS/all_to_all_sweep_${R}ranks"
    done
  fi
  if [[ $STEPS == *" a2a_bench "* ]]; then
    for R in ${TORCH_EP_PENDING_BENCH_RANKS:-2}; do
      step "all_to_all benchmark, $R ranks (ep, ep_device, ep_device_async, ep_graph, all_to_all_v)"
      run_bench "$R" 90 "pending_bench_${R}ranks.log" 12 benchmarks/all_to_all.py --device cuda --max-bytes $((64 << 20)) \
        --out "$LOGS/all_to_all_${R}ranks"
    done
  fi
fi
if [ "$WHAT" = profile ] || [ "$WHAT" = ll-profile ]; then
  need_nvshmem4py
  for R in ${TORCH_EP_LL_PROFILE_RANKS:-2}; do
    step "low-latency profile, $R ranks"
    CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$((100 / R)) timeout 120 torchrun --standalone --nproc-per-node "$R" \
      tools/ll_profile.py > "$LOGS/ll_profile_${R}ranks.log" 2>&1 || STATUS=1
    grep "^rank\|^trace\|^  rank" "$LOGS/ll_profile_${R}ranks.log" >> "$SUMMARY"
  done
fi
if [ "$WHAT" = all ] || [ "$WHAT" = ll ]; then
  need_nvshmem4py
  step "GPU low-latency tests, ${TORCH_EP_LL_WORLD_SIZES:-1,2,4,8} ranks"
  TORCH_EP_TEST_WORLD_SIZES=${TORCH_EP_LL_WORLD_SIZES:-1,2,4,8} timeout 360 python3 -m pytest \
    tests/test_cuda_low_latency.py tests/test_low_latency.py -q -ra -x > "$LOGS/gpu_ll_tests.log" 2>&1 || STATUS=1
  grep -v "^\[rank" "$LOGS/gpu_ll_tests.log" | tail -40 >> "$SUMMARY"
  for R in ${TORCH_EP_LL_BENCH_RANKS:-2 4 8}; do
    step "low-latency benchmark, $R ranks (128 tokens, hidden 7168, top-8, 256 experts)"
    run_bench "$R" 120 "ll_bench_${R}ranks.log" 8 benchmarks/low_latency.py --out "$LOGS/low_latency_${R}ranks"
  done
fi

compile_checks() {
  need_nvshmem4py
  step "GPU torch.compile tests, ${TORCH_EP_COMPILE_WORLD_SIZES:-2} ranks"
  TORCH_EP_TEST_WORLD_SIZES=${TORCH_EP_COMPILE_WORLD_SIZES:-2} timeout 420 python3 -m pytest \
    tests/test_cuda_compile.py -q -ra > "$LOGS/gpu_compile_tests.log" 2>&1 || STATUS=1
  grep -v "^\[rank" "$LOGS/gpu_compile_tests.log" | tail -40 >> "$SUMMARY"
  step "examples/moe_train.py --compile --compile-mode reduce-overhead, 2 ranks"
  CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$((100 / ((2 + GPUS - 1) / GPUS))) timeout 180 torchrun --standalone \
    --nproc-per-node 2 examples/moe_train.py --compile --compile-mode reduce-overhead --steps 30 \
    > "$LOGS/moe_train_compiled.log" 2>&1 || STATUS=1
  tail -3 "$LOGS/moe_train_compiled.log" >> "$SUMMARY"
  step "compiled MoE layer benchmark, 2 ranks (4096 tokens per rank; reduce-overhead against eager)"
  run_bench 2 150 "moe_layer_bench_2ranks.log" 10 benchmarks/moe.py --layer only --out "$LOGS/moe_layer_2ranks"
}
[ "$WHAT" = compile ] && compile_checks

if [ "$WHAT" = all ] || [ "$WHAT" = deep_ep ]; then
  need_nvshmem4py
  step "GPU torch_ep.deep_ep tests, ${TORCH_EP_DEEP_EP_WORLD_SIZES:-2} ranks"
  TORCH_EP_TEST_WORLD_SIZES=${TORCH_EP_DEEP_EP_WORLD_SIZES:-2} timeout 300 python3 -m pytest tests/test_cuda_deep_ep.py \
    tests/test_deep_ep.py -q -ra -x > "$LOGS/gpu_deep_ep_tests.log" 2>&1 || STATUS=1
  grep -v "^\[rank" "$LOGS/gpu_deep_ep_tests.log" | tail -30 >> "$SUMMARY"
  step "examples/deep_ep_drop_in.py, 2 ranks"
  run_bench 2 120 deep_ep_example.log 3 examples/deep_ep_drop_in.py --device cuda
  for R in ${TORCH_EP_DEEP_EP_BENCH_RANKS:-2}; do
    step "MoE benchmark, the native API and the DeepEP API in the same run, $R ranks (4096 tokens, hidden 7168, top-8, 256 experts)"
    run_bench "$R" 150 "moe_bench_deep_ep_${R}ranks.log" 18 benchmarks/moe.py --api both --out "$LOGS/moe_deep_ep_${R}ranks"
  done
fi

if [ "$WHAT" = all ] || [ "$WHAT" = internode ] || [ "$WHAT" = ll-remote ]; then
  need_nvshmem4py
  TESTS="tests/test_cuda_low_latency_across_nodes.py"
  [ "$WHAT" = ll-remote ] || TESTS="tests/test_cuda_internode.py tests/test_cuda_internode_refusals.py $TESTS"
  step "GPU internode tests ($TESTS), virtual nodes ${TORCH_EP_INTERNODE_TOPOLOGIES:=2x2,2x4} (nodes x ranks per node)"
  TORCH_EP_INTERNODE_TOPOLOGIES=$TORCH_EP_INTERNODE_TOPOLOGIES timeout 360 python3 -m pytest $TESTS \
    -q -ra -x > "$LOGS/gpu_internode_tests.log" 2>&1 || STATUS=1
  grep -v "^\[rank" "$LOGS/gpu_internode_tests.log" | tail -30 >> "$SUMMARY"
  ll_remote_benches
fi
if [ "$WHAT" = all ] || [ "$WHAT" = internode ]; then
  for TOPO in ${TORCH_EP_INTERNODE_BENCH:-2x2}; do
    R=$(( ${TOPO%x*} * ${TOPO#*x} ))
    step "internode benchmark, $TOPO virtual nodes"
    # Two groups across nodes and the device route's buffer pass NVSHMEM's 1 GiB default heap.
    NVSHMEM_REMOTE_TRANSPORT=none NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=lo NVSHMEM_DISABLE_NCCL=1 \
      NVSHMEM_SYMMETRIC_SIZE=${NVSHMEM_SYMMETRIC_SIZE:-3G} CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$((100 / R)) timeout 200 torchrun --standalone --nproc-per-node "$R" \
      benchmarks/internode.py --ranks-per-node "${TOPO#*x}" --out "$LOGS/internode_$TOPO" \
      > "$LOGS/internode_bench_$TOPO.log" 2>&1 || STATUS=1
    tail -22 "$LOGS/internode_bench_$TOPO.log" >> "$SUMMARY"
  done
fi

if [ "$WHAT" = pending ]; then
  [[ $STEPS == *" compile "* ]] && compile_checks
  [[ $STEPS == *" sm_sweep "* ]] && sm_sweep
fi

if [ "$WHAT" = all ] || [ "$WHAT" = bench ]; then
  for R in 1 2 4 8; do
    step "all_to_all benchmark, $R ranks"
    run_bench "$R" 120 "bench_${R}ranks.log" 16 benchmarks/all_to_all.py --device cuda --max-bytes $((256 << 20)) \
      --out "$LOGS/all_to_all_${R}ranks"
  done
fi
step "done (status $STATUS)"
exit $STATUS
