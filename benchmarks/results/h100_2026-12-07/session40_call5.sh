#!/bin/bash
# Session 40, call 5 (any GPU): the staged slots' flags at GPU scope against the default (system
# scope), now that the plan's trigger (86e95ee) took the early launch's loss away: 2 ranks 16-64 MiB
# in turn, twice; 8 ranks 4-64 KiB once each as far as LIMIT goes.
START=$SECONDS; LIMIT=${LIMIT:-170}
left() { echo $((LIMIT - (SECONDS - START) - 5)); }
export CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
MAX_JOBS=16 python3 -m pip install --no-build-isolation --no-deps -e . > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
echo "== built $((SECONDS - START)) s"
export PYTHONPATH=$PWD; mkdir -p /tmp/r; nvidia-cuda-mps-control -d
a2a() {  # a2a NAME RANKS MIN MAX [ENV...]
  local F=/tmp/r/a2a_$1 R=$2 MIN=$3 MAX=$4; shift 4
  [ $(left) -gt 20 ] || return 0
  env "$@" CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$((100 / R)) timeout $(left) torchrun --standalone --nproc-per-node $R \
    benchmarks/all_to_all.py --device cuda --min-bytes $MIN --max-bytes $MAX --gloo-max-bytes 0 --out $F > $F.log 2>&1
  echo "== $(basename $F) ($((SECONDS - START)) s)"; python3 tools/a2a_brief.py $F/all_to_all.json 2>/dev/null | cut -c1-230
}
for run in 1 2; do
  a2a 2ranks_16to64m_default_run$run 2 16777216 67108864
  a2a 2ranks_16to64m_staged_gpu_scope_run$run 2 16777216 67108864 TORCH_EP_WHATIF_STAGED_GPU_SCOPE=1
done
a2a 8ranks_small_default 8 4096 65536
a2a 8ranks_small_staged_gpu_scope 8 4096 65536 TORCH_EP_WHATIF_STAGED_GPU_SCOPE=1
echo quit | nvidia-cuda-mps-control
tar czf $OUT/logs.tgz -C /tmp r 2>/dev/null
