# twentieth session: eager host/GPU diagnosis, then LoRA GRPO after the dtype fix
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD
for stage in "$@"; do case $stage in
setup)
  cat /tmp/p/part00 .fa4b/part01 > /tmp/cu13.tar.xz
  echo "$(cat .fa4b/sha)  /tmp/cu13.tar.xz" | sha256sum -c - || exit 3
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .fa4b/*.whl 2>&1 | tail -3
  tar xJf /tmp/cu13.tar.xz -C /tmp/site
  python3 -c "from align.model import flash; print('fa4 installed', flash.INSTALLED, flash._capable())" ;;
eager) timeout 500 python3 .gpu-k/eager.py ${EV:-hf,plain,plain_sdpa,liger,liger_sdpa,liger_cep,liger_nn,liger_nn_cep,liger_nn_nsw_nro_cep} ${EP:-p=liger p=hf p=plain} 2>&1 | grep -v Warning | tee $OUT/eager$N.log | tail -20; cp /tmp/cprofile_* $OUT/ 2>/dev/null; true ;;
grpo) timeout 560 python3 -m align.bench grpo --device cuda --size smollm2-135m --prompts 8 --num_generations 8 --max_completion_length 128 --steps 6 --warmup 2 --variants trl align-nogc --lora true > $OUT/grpo_lora.log 2>&1; echo "rc $?"; tail -12 $OUT/grpo_lora.log ;;
bench) timeout 400 python3 -m align.bench model --device cuda --dtype bf16 --size medium --batch 16 --seq 1024 --steps 8 --repeats 3 --new_tokens 16 --compile true > $OUT/bench_compiled$N.log 2>&1; tail -4 $OUT/bench_compiled$N.log ;;
beager) timeout 300 python3 -m align.bench model --device cuda --dtype bf16 --size medium --batch 16 --seq 1024 --steps 8 --repeats 3 --new_tokens 16 --liger true > $OUT/bench_eager_liger$N.log 2>&1; tail -9 $OUT/bench_eager_liger$N.log ;;
test) timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_flash.py 2>&1 | tail -3 ;;
esac; done
for stage in "$@"; do case $stage in
grpodiag) for l in false true; do timeout 250 python3 .gpu-k/grpodiag.py $l > $OUT/grpodiag_$l.log 2>&1; grep -E "^\| align|^\{'merge" $OUT/grpodiag_$l.log; done ;;
esac; done
for stage in "$@"; do case $stage in
beager_sdpa) timeout 300 python3 -m align.bench model --device cuda --dtype bf16 --size medium --batch 16 --seq 1024 --steps 8 --repeats 3 --new_tokens 16 --liger true --attn_implementation sdpa > $OUT/bench_eager_liger_sdpa.log 2>&1; tail -9 $OUT/bench_eager_liger_sdpa.log ;;
esac; done
