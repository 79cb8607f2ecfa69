#!/bin/bash
# One lease: GPU readiness check (cores 4-13) while three CPU benchmarks run on 2 pinned cores each.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TELL_CACHE=/tmp/tellcache TOKENIZERS_PARALLELISM=false
D=.devrun; O=${OUT:-/tmp/out}; mkdir -p $O
PY=${PY:-python3}
if [ -z "${NOINSTALL:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $D/whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=${SHADOW:+$SHADOW:}$PWD/src
fi
T=${T:-380}
{ date -u; nproc; lscpu; for c in 0 1 2 3; do echo "cpu$c siblings: $(cat /sys/devices/system/cpu/cpu$c/topology/thread_siblings_list 2>/dev/null)"; done
  grep -o -E 'avx512_bf16|amx_bf16|avx512f|avx2' /proc/cpuinfo | sort | uniq -c; free -g; nvidia-smi 2>&1 | head -15
  $PY -c "import torch,transformers,peft;print('torch',torch.__version__,'transformers',transformers.__version__,'peft',peft.__version__, 'cuda', torch.cuda.is_available())"
  $PY -c "import pyarrow, datasets, trl; print('pyarrow', pyarrow.__version__, 'datasets', datasets.__version__, 'trl', trl.__version__)"
  $PY $D/make_random.py $D/smol /tmp/smol-random; } > $O/machine.txt 2>&1
GPU_ARGS=${GPU_ARGS:-}
( timeout $T taskset -c ${GPU_CORES:-4-13} $PY benchmarks/gpu_check.py --tokenizer $D/smol $GPU_ARGS > $O/gpu_check.json 2> $O/gpu_check.log ) &
( OMP_NUM_THREADS=2 timeout $T taskset -c ${SEL_CORES:-0,1} $PY benchmarks/select_speed.py --rows ${ROWS:-2048} --dtype ${SEL_DTYPE:-bf16} --model /tmp/smol-random > $O/select_bf16.json 2> /tmp/select.log ) &
( OMP_NUM_THREADS=2 timeout $T taskset -c ${TRAIN_CORES:-2,3} $PY benchmarks/train_throughput.py --quick --model /tmp/smol-random ${TRAIN_ARGS:-} > $O/train_quick.json 2> /tmp/train.log ) &
sleep 2
( OMP_NUM_THREADS=2 timeout $T taskset -c ${EVAL_CORES:-14,15} $PY benchmarks/eval_throughput.py ${EVAL_ARGS:---quick} --model /tmp/smol-random --out /tmp/bench-eval > $O/eval_quick.json 2> /tmp/eval.log ) &
wait
{ for f in /tmp/select.log /tmp/train.log /tmp/eval.log; do echo "=== $f"; tail -c 6000 $f; done
  for f in /tmp/bench-eval/*/*.json; do echo "=== $f"; $PY -c "import json,sys; d=json.load(open(sys.argv[1])); d.pop('outputs',None); print(json.dumps(d))" $f; done; } > $O/cpu_logs.txt 2>&1
date -u >> $O/machine.txt
