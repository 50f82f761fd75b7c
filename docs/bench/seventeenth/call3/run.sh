export PYTHONPATH=/tmp/site:$PWD
if [ ! -d /tmp/site/trl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; rm -rf /tmp/site/huggingface_hub*; fi
B="python3 -m align.bench"
Q="--device cuda --size qwen-386m --batch 8 --max_length 1024 --steps 10 --warmup 3"
timeout 110 $B sft $Q --variants align align-liger --align_batch 3 --lora true --json $OUT/q_sft_lora3.jsonl > $OUT/q_sft_lora3.log 2>&1; tail -4 $OUT/q_sft_lora3.log
timeout 90 $B sft $Q --variants align-liger --align_batch 2 --lora true --json $OUT/q_sft_lora2.jsonl > $OUT/q_sft_lora2.log 2>&1; tail -3 $OUT/q_sft_lora2.log
timeout 180 $B dpo $Q --variants trl align-liger --lora true --json $OUT/q_dpo_lora.jsonl > $OUT/q_dpo_lora.log 2>&1; tail -5 $OUT/q_dpo_lora.log
G="grpo --device cuda --size smollm2-135m --prompts 8 --num_generations 8 --max_completion_length 128 --steps 6 --warmup 2"
timeout 190 $B $G --variants trl align-liger-nogc --compile true --json $OUT/grpo_c2.jsonl > $OUT/grpo_c2.log 2>&1; tail -5 $OUT/grpo_c2.log
