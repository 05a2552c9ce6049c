#!/bin/bash
# Session 40, call 3 (any GPU): 86e95ee's plan that lets the move start at its end, and 102d2a5's
# outputs together by default: the all_to_all_v, comm pool and MoE tests; moe_profile (the outputs
# apart in turn); the default against TORCH_EP_EARLY_LAUNCH=0 at 2 ranks 1-64 MiB and 8 ranks.
START=$SECONDS; LIMIT=${LIMIT:-560}
left() { echo $((LIMIT - (SECONDS - START) - 10)); }
nvidia-smi -L
export CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
MAX_JOBS=16 python3 -m pip install --no-build-isolation --no-deps -e . > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
echo "== built $((SECONDS - START)) s"
export PYTHONPATH=$PWD; mkdir -p /tmp/r; nvidia-cuda-mps-control -d
cap() { local l=$(left); echo $(( l < $1 ? (l > 5 ? l : 5) : $1 )); }
for t in all_to_all_v:90 comm_pool:70 moe:200; do
  TORCH_EP_TIMEOUT_S=30 timeout $(cap ${t#*:}) python3 -m pytest tests/test_cuda_${t%%:*}.py -q > /tmp/r/test_${t%%:*}.log 2>&1
  echo "== ${t%%:*} tests ($((SECONDS - START)) s): $(tail -1 /tmp/r/test_${t%%:*}.log)"; grep -E "^(FAILED|E )" /tmp/r/test_${t%%:*}.log | head
done
CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50 timeout 40 torchrun --standalone --nproc-per-node 2 tools/moe_profile.py > /tmp/r/moe_profile.log 2>&1
echo "== moe ($((SECONDS - START)) s)"; grep -o "rank [01] ROUNDS [a-z_ 0-9,]*: median [0-9.]* us" /tmp/r/moe_profile.log | sort | cut -c1-100
a2a() {  # a2a NAME RANKS MIN MAX [ENV...]
  local F=/tmp/r/a2a_$1 R=$2 MIN=$3 MAX=$4; shift 4
  [ $(left) -gt 30 ] || return 0
  env "$@" CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$((100 / R)) timeout 50 torchrun --standalone --nproc-per-node $R \
    benchmarks/all_to_all.py --device cuda --min-bytes $MIN --max-bytes $MAX --gloo-max-bytes 0 --out $F > $F.log 2>&1
  echo "== $(basename $F) ($((SECONDS - START)) s)"; python3 tools/a2a_brief.py $F/all_to_all.json 2>/dev/null | cut -c1-230
}
a2a 2ranks_default 2 1048576 67108864
a2a 2ranks_early_off 2 1048576 67108864 TORCH_EP_EARLY_LAUNCH=0
a2a 8ranks_small_default 8 4096 65536
a2a 8ranks_small_early_off 8 4096 65536 TORCH_EP_EARLY_LAUNCH=0
a2a 8ranks_1to4m_default 8 1048576 4194304
echo quit | nvidia-cuda-mps-control
tar czf $OUT/logs.tgz -C /tmp r build.log 2>/dev/null
