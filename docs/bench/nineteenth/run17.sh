# MFU experiments on the compiled 100M step (align_fa4). Stage "setup" joins the cu13 libs (call A copied part00)
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD
for stage in "$@"; do case $stage in
setup)
  cat /tmp/p/part00 .fa4b/part01 > /tmp/cu13.tar.xz
  echo "$(cat .fa4b/sha)  /tmp/cu13.tar.xz" | sha256sum -c - || exit 3
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .fa4b/*.whl 2>&1 | tail -3
  tar xJf /tmp/cu13.tar.xz -C /tmp/site
  python3 -c "from align.model import flash; print('fa4 installed', flash.INSTALLED, flash._capable())" ;;
mfu) timeout 540 python3 .gpu-k/mfu.py ${MFU_V:-foreach,fused,fused_cdt,fused_qkv} ${MFU_P:-p=fused} 2>&1 | grep -v Warning | grep -v exe_args | tee $OUT/mfu.log | tail -40 ;;
test) timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_flash.py tests/test_model.py -k "flash or rope" 2>&1 | tail -3 ;;
test2) timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_generate.py tests/test_model.py -k "compiled_decode or cuda_graph or rope or detached" 2>&1 | tail -3 ;;
bench) timeout 400 python3 -m align.bench model --device cuda --dtype bf16 --size medium --batch 16 --seq 1024 --steps 8 --repeats 3 --new_tokens 16 --compile true > $OUT/bench_compiled$N.log 2>&1; tail -4 $OUT/bench_compiled$N.log ;;
eager) timeout 300 python3 -m align.bench model --device cuda --dtype bf16 --size medium --batch 16 --seq 1024 --steps 8 --repeats 3 --new_tokens 16 --liger true > $OUT/bench_eager_liger.log 2>&1; tail -9 $OUT/bench_eager_liger.log ;;
code) grep -l "32000" -r /tmp/torchinductor_*/ --include=*.py 2>/dev/null | head -50 > $OUT/code_files.txt
  for f in $(cat $OUT/code_files.txt); do grep -n -E "zeros|fill|full\(|memset" $f | head -20 | sed "s|^|$f: |"; done > $OUT/code_fills.txt; wc -l $OUT/code_fills.txt ;;
esac; done
