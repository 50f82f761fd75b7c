# twenty-third session: FA4 only from MIN_TOKENS query tokens a call (align/model/flash.py). Tasks: setup,
# t:B:S (compiled train bench, align's default attention), a:B:S (--attn_implementation sdpa), f:B:S (FA4 forced:
# MIN_TOKENS=0), r:B:S (reduce-overhead, default attention), score, test
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD PYTHONUNBUFFERED=1
B="python3 -m align.bench"
F="python3 -c 'import sys; from align.model import flash; flash.MIN_TOKENS = 0; from align.bench.__main__ import main; sys.exit(main(sys.argv[1:]))'"
A="model --device cuda --dtype bf16 --size medium --steps ${ST:-8} --repeats ${RP:-1} --new_tokens 8 --liger true --compile true"
bench() { # name, json, runner, extra args
  timeout ${BT:-240} bash -c "$3 $A --json $OUT/$2 $4" > $OUT/$1.log 2>&1; echo "rc $?"
  grep -A4 "^| metric" $OUT/$1.log | tail -3; grep MFU $OUT/$1.log; }
for task in "$@"; do SECONDS=0; IFS=: read -r kind a b <<< "$task"; case $kind in
setup)
  cat /tmp/p/part00 .fa4b/part01 > /tmp/cu13.tar.xz
  echo "$(cat .fa4b/sha)  /tmp/cu13.tar.xz" | sha256sum -c - || exit 3
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .fa4b/*.whl 2>&1 | tail -3
  tar xJf /tmp/cu13.tar.xz -C /tmp/site
  python3 -c "from align.model import flash, kernels; print('fa4', flash.INSTALLED, flash._capable(), flash.MIN_TOKENS, 'liger', kernels.available())" ;;
t) bench train_b${a}_s${b} train_sweep.jsonl "$B" "--batch $a --seq $b" ;;
a) bench train_sdpa_b${a}_s${b} train_variants.jsonl "$B" "--attn_implementation sdpa --batch $a --seq $b" ;;
f) bench train_fa4_b${a}_s${b} train_variants.jsonl "$F" "--batch $a --seq $b" ;;
r) bench train_ro_b${a}_s${b} train_variants.jsonl "$B" "--compile_mode reduce-overhead --batch $a --seq $b" ;;
score) timeout ${SCT:-150} $B score --device cuda --n 1024 --size medium > $OUT/score.log 2>&1; echo "rc $?"; grep "^|" $OUT/score.log ;;
test) timeout ${TT:-200} python3 -m pytest -q -p no:cacheprovider tests/test_flash.py > $OUT/test_flash.log 2>&1; tail -3 $OUT/test_flash.log ;;
esac; echo "== $task ${SECONDS}s"; done
touch $OUT/done
