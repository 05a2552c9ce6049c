#!/bin/bash
# Session 40, call 2 (any GPU): the new defaults' tests (outputs together), the early-launch what-ifs'
# tests, then the A/B: which part of the early launch costs the 64 MiB staged move, and what the
# what-ifs cost the small calls; a2a_kernels at 64 MiB early / in order; moe_profile (apart in turn).
START=$SECONDS; LIMIT=${LIMIT:-560}
left() { echo $((LIMIT - (SECONDS - START) - 10)); }
nvidia-smi -L
export CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
MAX_JOBS=16 python3 -m pip install --no-build-isolation --no-deps -e . > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
echo "== built $((SECONDS - START)) s"
export PYTHONPATH=$PWD; mkdir -p /tmp/r; nvidia-cuda-mps-control -d
cap() { local l=$(left); echo $(( l < $1 ? (l > 5 ? l : 5) : $1 )); }
TORCH_EP_TIMEOUT_S=30 timeout $(cap 120) python3 -m pytest tests/test_cuda_all_to_all_v.py -q -x > /tmp/r/test_a2av.log 2>&1
echo "== a2av tests ($((SECONDS - START)) s): $(tail -1 /tmp/r/test_a2av.log)"; grep -E "^(FAILED|E )" /tmp/r/test_a2av.log | head
TORCH_EP_TIMEOUT_S=30 timeout $(cap 60) python3 -m pytest tests/test_cuda_moe.py -q -k "small_outputs" > /tmp/r/test_moe.log 2>&1
echo "== moe tests ($((SECONDS - START)) s): $(tail -1 /tmp/r/test_moe.log)"; grep -E "^(FAILED|E )" /tmp/r/test_moe.log | head
a2a() {  # a2a NAME RANKS MIN MAX [ENV...]
  local F=/tmp/r/a2a_$1 R=$2 MIN=$3 MAX=$4; shift 4
  [ $(left) -gt 30 ] || return 0
  env "$@" CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$((100 / R)) timeout 50 torchrun --standalone --nproc-per-node $R \
    benchmarks/all_to_all.py --device cuda --min-bytes $MIN --max-bytes $MAX --gloo-max-bytes 0 --out $F > $F.log 2>&1
  echo "== $(basename $F) ($((SECONDS - START)) s)"; python3 tools/a2a_brief.py $F/all_to_all.json 2>/dev/null | cut -c1-230
}
for run in 1 2; do
  a2a 2ranks_16to64m_default_run$run 2 16777216 67108864
  a2a 2ranks_16to64m_early_off_run$run 2 16777216 67108864 TORCH_EP_EARLY_LAUNCH=0
  a2a 2ranks_16to64m_staged_in_order_run$run 2 16777216 67108864 TORCH_EP_WHATIF_STAGED_IN_ORDER=1
  a2a 2ranks_16to64m_plan_late_run$run 2 16777216 67108864 TORCH_EP_WHATIF_PLAN_LATE_TRIGGER=1
done
CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50 timeout 40 torchrun --standalone --nproc-per-node 2 tools/moe_profile.py > /tmp/r/moe_profile.log 2>&1
echo "== moe ($((SECONDS - START)) s)"; grep -o "rank [01] ROUNDS [a-z_ 0-9,]*: median [0-9.]* us" /tmp/r/moe_profile.log | sort | cut -c1-100
a2a 2ranks_1to4m_default 2 1048576 4194304
a2a 2ranks_1to4m_staged_in_order 2 1048576 4194304 TORCH_EP_WHATIF_STAGED_IN_ORDER=1
a2a 2ranks_1to4m_plan_late 2 1048576 4194304 TORCH_EP_WHATIF_PLAN_LATE_TRIGGER=1
a2a 8ranks_small_default 8 4096 65536
a2a 8ranks_small_staged_in_order 8 4096 65536 TORCH_EP_WHATIF_STAGED_IN_ORDER=1
a2a 8ranks_small_plan_late 8 4096 65536 TORCH_EP_WHATIF_PLAN_LATE_TRIGGER=1
for v in default:X=0 early_off:TORCH_EP_EARLY_LAUNCH=0; do
  [ $(left) -gt 40 ] || break
  env ${v#*:} CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50 timeout 35 torchrun --standalone --nproc-per-node 2 tools/a2a_kernels.py \
    --sizes 67108864 --calls 40 > /tmp/r/a2a_kernels_64m_${v%%:*}.log 2>&1
  echo "== kernels ${v%%:*}"; grep -A4 "device staged" /tmp/r/a2a_kernels_64m_${v%%:*}.log | cut -c1-250
done
echo quit | nvidia-cuda-mps-control
tar czf $OUT/logs.tgz -C /tmp r build.log 2>/dev/null
