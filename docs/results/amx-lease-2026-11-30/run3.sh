#!/bin/bash
# One lease call: AMX-CPU figures on 2 pinned cores per job (select speed, training, profiles).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TELL_CACHE=/tmp/tellcache TOKENIZERS_PARALLELISM=false
D=.devrun; O=${OUT:-/tmp/out}; mkdir -p $O /tmp/r; PY=${PY:-python3}; T=${T:-400}
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $D/whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD/src
$PY $D/make_random.py $D/smol /tmp/smol-random > /tmp/r/make_random.log 2>&1 || { cat /tmp/r/make_random.log; exit 4; }
M=/tmp/smol-random
{ lscpu; nproc; grep -o -E 'avx512_bf16|amx_bf16|avx2|avx512f' /proc/cpuinfo | sort | uniq -c; } > /tmp/r/machine.txt 2>&1
p() { local c=$1 n=$2 t=$3; shift 3
  ( OMP_NUM_THREADS=2 timeout $t taskset -c $c "$@" > /tmp/r/$n.out 2> /tmp/r/$n.err; echo "rc $? $(date -u +%T)" >> /tmp/r/$n.err ) & }
p 0,1 select_bf16_4007 $T $PY benchmarks/select_speed.py --rows 4007 --dtype bf16 --device cpu --model $M
p 2,3 select_fp32_1024 $T $PY benchmarks/select_speed.py --rows 1024 --dtype fp32 --device cpu --model $M
p 4,5 train_quick 300 $PY benchmarks/train_throughput.py --quick --model $M
p 6,7 train_quick_mbt1536 300 $PY benchmarks/train_throughput.py --quick --micro-batch-tokens 1536 --model $M
p 8,9 train_8steps $T $PY benchmarks/train_throughput.py --task-rows 16 --ratio 3 --max-steps 8 --default-steps 0 --model $M
p 10,11 prof_train 300 $PY $D/prof.py train $M
p 12,13 prof_eval 300 $PY $D/prof.py eval $M
( OMP_NUM_THREADS=2 timeout 200 taskset -c 14,15 $PY $D/prof.py jit $M > /tmp/r/jit.out 2> /tmp/r/jit.err
  ONEDNN_VERBOSE=1 OMP_NUM_THREADS=2 timeout 200 taskset -c 14,15 $PY benchmarks/train_throughput.py --worker tell \
    --task-rows 4 --ratio 3 --max-steps 2 --micro-batch-tokens 768 --dtype bf16 --model $M 2>/dev/null \
    > /tmp/onednn.log; grep -c . /tmp/onednn.log > /tmp/r/onednn_counts.txt; grep onednn_verbose /tmp/onednn.log | head -30 > /tmp/r/onednn_head.txt
  grep onednn_verbose /tmp/onednn.log | awk -F, '{k=""; for(i=2;i<=5;i++) if ($i ~ /exec|create/) k=$i; n[k]++; t[k]+=$NF} END {for (k in n) printf "%s count %d total_ms %.1f\n", k, n[k], t[k]}' >> /tmp/r/onednn_counts.txt ) &
wait
tar czf $O/results.tgz -C /tmp r
for f in select_bf16_4007 train_quick train_8steps; do cp /tmp/r/$f.out $O/$f.json 2>/dev/null; done
tail -n 3 /tmp/r/*.err; cat /tmp/r/onednn_counts.txt /tmp/r/jit.out
