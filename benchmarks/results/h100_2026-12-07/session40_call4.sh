#!/bin/bash
# Session 40, call 4 (any GPU): benchmarks/moe.py at 2 ranks with the small outputs together (the
# default since 102d2a5): isolated against stream, fp8 with a layout above all; moe_profile between.
START=$SECONDS; LIMIT=${LIMIT:-320}
left() { echo $((LIMIT - (SECONDS - START) - 10)); }
nvidia-smi -L
export CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
MAX_JOBS=16 python3 -m pip install --no-build-isolation --no-deps -e . > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
echo "== built $((SECONDS - START)) s"
export PYTHONPATH=$PWD; mkdir -p /tmp/r; nvidia-cuda-mps-control -d
cap() { local l=$(left); echo $(( l < $1 ? (l > 5 ? l : 5) : $1 )); }
moe() {
  [ $(left) -gt 40 ] || return 0
  CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50 timeout $(cap 120) torchrun --standalone --nproc-per-node 2 benchmarks/moe.py \
    --out /tmp/r/moe_run$1 > /tmp/r/moe_run$1.log 2>&1
  echo "== moe run $1 ($((SECONDS - START)) s)"; grep "^|" /tmp/r/moe_run$1/moe.md 2>/dev/null | cut -c1-260 | head -14 || tail -5 /tmp/r/moe_run$1.log
}
moe 1
[ $(left) -gt 30 ] && CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50 timeout 30 torchrun --standalone --nproc-per-node 2 tools/moe_profile.py > /tmp/r/moe_profile.log 2>&1
echo "== profile ($((SECONDS - START)) s)"; grep -o "rank [01] ROUNDS [a-z_ 0-9,]*: median [0-9.]* us" /tmp/r/moe_profile.log | sort | cut -c1-100
moe 2
echo quit | nvidia-cuda-mps-control
tar czf $OUT/logs.tgz -C /tmp r build.log 2>/dev/null
