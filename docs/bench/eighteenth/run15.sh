# FA4 in align (attn_implementation=align_fa4): GPU test and the 100M bench. Stage "setup" joins the cu13 libs
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD
B="python3 -m align.bench model --device cuda --dtype bf16 --size medium --batch 16 --seq 1024 --steps 8 --repeats 3 --new_tokens 16"
for stage in "$@"; do case $stage in
setup)
  cat /tmp/p/part00 .fa4b/part01 > /tmp/cu13.tar.xz
  echo "$(cat .fa4b/sha)  /tmp/cu13.tar.xz" | sha256sum -c - || exit 3
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .fa4b/*.whl 2>&1 | tail -3
  tar xJf /tmp/cu13.tar.xz -C /tmp/site
  python3 -c "from align.model import flash; print('fa4 installed', flash.INSTALLED, flash._capable())" ;;
test) timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_flash.py 2>&1 | tail -3 ;;
compiled) timeout 300 $B --compile true > $OUT/compiled.log 2>&1; tail -9 $OUT/compiled.log ;;
hffa4) timeout 300 $B --compile true --hf_attn_implementation flash_attention_4 > $OUT/hffa4.log 2>&1; tail -9 $OUT/hffa4.log ;;
eager) timeout 250 $B --liger true > $OUT/eager.log 2>&1; tail -9 $OUT/eager.log ;;
esac; done
