#!/bin/bash
# Third lease call: does padding packed bf16 micro-batches to a multiple of 64 tokens speed up tell's training on AMX?
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TELL_CACHE=/tmp/tellcache TOKENIZERS_PARALLELISM=false
D=.devrun; O=${OUT:-/tmp/out}; mkdir -p $O /tmp/r; PY=${PY:-python3}
rm -rf /tmp/site; $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $D/whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD/src
$PY $D/make_random.py $D/smol /tmp/smol-random > /tmp/r/make_random.log 2>&1 || { cat /tmp/r/make_random.log; exit 4; }
M=/tmp/smol-random
chain() { local c=$1; shift
  ( for m in "$@"; do echo "$c $(OMP_NUM_THREADS=2 timeout 80 taskset -c $c $PY $D/pad_ab.py $M $m bf16 5 2>/dev/null | tail -1)" >> /tmp/r/ab.txt; done ) & }
chain 0,1 64 0 64
chain 2,3 0 64 0
chain 4,5 64 0 64
chain 6,7 0 64 0
( OMP_NUM_THREADS=2 timeout 200 taskset -c 8,9 $PY benchmarks/train_throughput.py --quick --model $M > $O/train_quick_pad64.json 2> /tmp/r/tq.err ) &
( OMP_NUM_THREADS=2 timeout 100 taskset -c 10,11 $PY $D/jit2.py > $O/jit2.jsonl 2>&1 ) &
wait
cp /tmp/r/ab.txt $O/ab.txt; cat $O/ab.txt $O/jit2.jsonl; tail -2 /tmp/r/tq.err
python3 -c "import json; d=json.load(open('$O/train_quick_pad64.json')); print({k: d[k] for k in ('tell_tokens_per_s','trl_tokens_per_s','speedup_vs_trl','fraction_of_limit','limit_gflops')})"
