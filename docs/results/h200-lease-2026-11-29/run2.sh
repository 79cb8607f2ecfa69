#!/bin/bash
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TELL_CACHE=/tmp/tellcache TOKENIZERS_PARALLELISM=false
D=.devrun; O=${OUT:-/tmp/out}; mkdir -p $O; PY=${PY:-python3}; T=${T:-210}
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $D/whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD/src
$PY $D/make_random.py $D/smol /tmp/smol-random > /dev/null 2>&1
M=/tmp/smol-random; E="benchmarks/eval_throughput.py --quick --model $M --out /tmp/be"
i=0
for part in loop tell tell_bf16 loop_bf16; do
  ( OMP_NUM_THREADS=2 timeout $T taskset -c $((2*i)),$((2*i+1)) $PY $E --parts $part > /tmp/e_$part.out 2> /tmp/e_$part.err ) &
  i=$((i+1))
done
( OMP_NUM_THREADS=2 timeout $T taskset -c 8,9 $PY benchmarks/select_speed.py --rows 4007 --dtype bf16 --model $M > $O/select_bf16_4007.json 2> /dev/null ) &
( OMP_NUM_THREADS=2 timeout $T taskset -c 10,11 $PY benchmarks/select_speed.py --rows 512 --dtype fp32 --model $M > $O/select_fp32_512.json 2> /dev/null ) &
( OMP_NUM_THREADS=2 timeout $T taskset -c 12,13 $PY $D/probe.py > $O/probe.json 2> /tmp/probe.err; ONEDNN_VERBOSE=1 OMP_NUM_THREADS=2 taskset -c 12,13 $PY -c "
import torch, torch.nn.functional as F
a=torch.randn(2048,2048,dtype=torch.bfloat16); b=torch.randn(2048,2048,dtype=torch.bfloat16); a@b; F.linear(a,b)
with torch.autocast('cpu',dtype=torch.bfloat16): F.linear(a.float(),b.float())
" 2>&1 | grep -i "exec\|info" | cut -c1-400 | head -12 > /tmp/onednn.txt ) &
wait
OMP_NUM_THREADS=2 taskset -c 0,1 $PY $E --parts "" > $O/eval_quick.json 2>&1
{ cat /tmp/probe.err /tmp/onednn.txt; for p in loop tell tell_bf16 loop_bf16; do echo "== $p"; tail -c 800 /tmp/e_$p.err; done
  for f in /tmp/be/*/*.json; do echo "=== $f"; $PY -c "import json,sys; d=json.load(open(sys.argv[1])); d.pop('outputs',None); print(json.dumps(d))" $f; done; } > $O/logs2.txt 2>&1
