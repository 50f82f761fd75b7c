# twenty-second session: training throughput against batch and sequence length (PNG), generation against prompt length,
# peak memory rows on the GPU. Tasks: setup, t:BATCH:SEQ (compiled train bench), g:PROMPT_LEN (generate), score
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD PYTHONUNBUFFERED=1
T="python3 -m align.bench model --device cuda --dtype bf16 --size medium --steps ${ST:-8} --repeats ${RP:-1} --new_tokens 8 --liger true --compile true "
for task in "$@"; do SECONDS=0; IFS=: read -r kind a b <<< "$task"; case $kind in
setup)
  cat /tmp/p/part00 .fa4b/part01 > /tmp/cu13.tar.xz
  echo "$(cat .fa4b/sha)  /tmp/cu13.tar.xz" | sha256sum -c - || exit 3
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .fa4b/*.whl 2>&1 | tail -3
  tar xJf /tmp/cu13.tar.xz -C /tmp/site
  python3 -c "from align.model import flash, kernels; print('fa4', flash.INSTALLED, flash._capable(), 'liger', kernels.available())" ;;
t) timeout ${BT:-240} $T --json $OUT/train_sweep.jsonl --batch $a --seq $b > $OUT/train_b${a}_s${b}.log 2>&1; echo "rc $?"; grep -A3 "^| metric" $OUT/train_b${a}_s${b}.log | tail -2; grep MFU $OUT/train_b${a}_s${b}.log ;;
r) timeout ${BT:-240} $T --json $OUT/train_variants.jsonl --compile_mode reduce-overhead --batch $a --seq $b > $OUT/train_ro_b${a}_s${b}.log 2>&1; echo "rc $?"; grep -A4 "^| metric" $OUT/train_ro_b${a}_s${b}.log | tail -3; grep MFU $OUT/train_ro_b${a}_s${b}.log ;;
a) timeout ${BT:-240} $T --json $OUT/train_variants.jsonl --attn_implementation sdpa --batch $a --seq $b > $OUT/train_sdpa_b${a}_s${b}.log 2>&1; echo "rc $?"; grep -A4 "^| metric" $OUT/train_sdpa_b${a}_s${b}.log | tail -3; grep MFU $OUT/train_sdpa_b${a}_s${b}.log ;;
g) timeout ${GT:-150} python3 -m align.bench generate --device cuda --dtype bf16 --size medium --batch 1 16 64 --prompt_len $a --new_tokens 128 --repeats 2 --methods ours --json $OUT/generate_prompt.jsonl > $OUT/gen_p$a.log 2>&1; echo "rc $?"; grep "^|" $OUT/gen_p$a.log | tail -6 ;;
score) timeout ${SCT:-120} python3 -m align.bench score --device cuda --n 1024 --size medium > $OUT/score.log 2>&1; echo "rc $?"; grep "^|" $OUT/score.log ;;
esac; echo "== $task ${SECONDS}s"; done
touch $OUT/done
