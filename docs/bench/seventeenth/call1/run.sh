export PYTHONPATH=/tmp/site:$PWD
if [ ! -d /tmp/site/trl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; rm -rf /tmp/site/huggingface_hub*; fi
nvidia-smi --query-gpu=name,utilization.gpu,memory.used --format=csv,noheader
B="python3 -m align.bench"
G="grpo --device cuda --size smollm2-135m --prompts 8 --num_generations 8 --max_completion_length 128 --steps 6 --warmup 2"
timeout 240 $B $G --variants trl align align-nogc align-liger-nogc --json $OUT/grpo.jsonl > $OUT/grpo.log 2>&1; tail -8 $OUT/grpo.log
timeout 150 $B $G --variants align-nogc align-liger-nogc --compile true --json $OUT/grpo_c.jsonl > $OUT/grpo_c.log 2>&1; tail -6 $OUT/grpo_c.log
timeout 130 $B $G --variants trl align-nogc --lora true --json $OUT/grpo_l.jsonl > $OUT/grpo_l.log 2>&1; tail -6 $OUT/grpo_l.log
timeout 60 python3 -m pytest -q -x tests/test_generate.py -k cuda_graph > $OUT/cg.log 2>&1; tail -5 $OUT/cg.log
