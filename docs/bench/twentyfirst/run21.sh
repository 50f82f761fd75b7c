# twenty-first session: the fused loss under compile (MFU), GPU tests, LoRA GRPO after the forward fix
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD
for stage in "$@"; do case $stage in
setup)
  cat /tmp/p/part00 .fa4b/part01 > /tmp/cu13.tar.xz
  echo "$(cat .fa4b/sha)  /tmp/cu13.tar.xz" | sha256sum -c - || exit 3
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .fa4b/*.whl 2>&1 | tail -3
  tar xJf /tmp/cu13.tar.xz -C /tmp/site
  python3 -c "from align.model import flash, kernels; print('fa4', flash.INSTALLED, flash._capable(), 'liger', kernels.available())" ;;
test) SECONDS=0; timeout ${TT:-240} python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_flash.py > $OUT/test$N.log 2>&1; tail -4 $OUT/test$N.log; echo "test ${SECONDS}s" ;;
bench) SECONDS=0; timeout ${BT:-330} python3 -m align.bench model --device cuda --dtype bf16 --size medium --batch 16 --seq 1024 --steps 8 --repeats 3 --new_tokens 16 --compile true --liger true > $OUT/bench_compiled_liger$N.log 2>&1; tail -9 $OUT/bench_compiled_liger$N.log; echo "bench ${SECONDS}s" ;;
mfu) SECONDS=0; timeout ${MT:-280} python3 .gpu-k/mfu.py ${MV:-base,lce} ${MP:-p=lce} > $OUT/mfu$N.log 2>&1; grep -v Warn $OUT/mfu$N.log | tail -12; cp /tmp/profile_* $OUT/ 2>/dev/null; echo "mfu ${SECONDS}s" ;;
grpo) SECONDS=0; timeout ${GT:-330} python3 -m align.bench grpo --device cuda --size smollm2-135m --prompts 8 --num_generations 8 --max_completion_length 128 --steps 6 --warmup 2 --variants trl align-nogc align-liger-nogc --lora true > $OUT/grpo_lora$N.log 2>&1; echo "rc $?"; tail -7 $OUT/grpo_lora$N.log; echo "grpo ${SECONDS}s" ;;
grpoplain) SECONDS=0; timeout ${GT:-300} python3 -m align.bench grpo --device cuda --size smollm2-135m --prompts 8 --num_generations 8 --max_completion_length 128 --steps 6 --warmup 2 --variants trl align-nogc align-liger-nogc > $OUT/grpo_plain$N.log 2>&1; echo "rc $?"; tail -7 $OUT/grpo_plain$N.log; echo "grpoplain ${SECONDS}s" ;;
benchro) SECONDS=0; timeout ${RT:-220} python3 -m align.bench model --device cuda --dtype bf16 --size medium --batch 16 --seq 1024 --steps 8 --repeats 3 --new_tokens 16 --compile_mode reduce-overhead --liger true > $OUT/bench_ro_liger$N.log 2>&1; tail -9 $OUT/bench_ro_liger$N.log; echo "benchro ${SECONDS}s" ;;
beager) SECONDS=0; timeout ${ET:-160} python3 -m align.bench model --device cuda --dtype bf16 --size medium --batch 16 --seq 1024 --steps 8 --repeats 3 --new_tokens 16 --liger true > $OUT/bench_eager_liger$N.log 2>&1; tail -9 $OUT/bench_eager_liger$N.log; echo "beager ${SECONDS}s" ;;
esac; done
