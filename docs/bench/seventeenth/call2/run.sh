export PYTHONPATH=/tmp/site:$PWD
if [ ! -d /tmp/site/trl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; rm -rf /tmp/site/huggingface_hub*; fi
B="python3 -m align.bench"
G="grpo --device cuda --size smollm2-135m --prompts 8 --num_generations 8 --max_completion_length 128 --steps 6 --warmup 2"
timeout 200 $B $G --variants align align-liger-nogc --compile true --json $OUT/grpo_c.jsonl > $OUT/grpo_c.log 2>&1; tail -6 $OUT/grpo_c.log
Q="--device cuda --size qwen-386m --batch 8 --max_length 1024 --steps 10 --warmup 3"
timeout 170 $B sft $Q --variants trl align-liger --align_batch 3 --json $OUT/q_sft.jsonl > $OUT/q_sft.log 2>&1; tail -5 $OUT/q_sft.log
timeout 170 $B sft $Q --variants trl align-liger --align_batch 3 --lora true --json $OUT/q_sft_lora.jsonl > $OUT/q_sft_lora.log 2>&1; tail -5 $OUT/q_sft_lora.log
