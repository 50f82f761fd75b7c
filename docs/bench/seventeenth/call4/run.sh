export PYTHONPATH=/tmp/site:$PWD
if [ ! -d /tmp/site/trl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; rm -rf /tmp/site/huggingface_hub*; fi
B="python3 -m align.bench"
Q="--device cuda --size qwen-386m --batch 8 --max_length 1024 --steps 10 --warmup 3"
timeout 130 $B sft $Q --variants trl align --align_batch 3 --lora true --json $OUT/q_sft_lora_a.jsonl > $OUT/q_sft_lora_a.log 2>&1; tail -4 $OUT/q_sft_lora_a.log
timeout 200 $B dpo $Q --variants trl align align-liger --lora true --json $OUT/q_dpo_lora_a.jsonl > $OUT/q_dpo_lora_a.log 2>&1; tail -5 $OUT/q_dpo_lora_a.log
python3 -c "import json;[print(r['variant'], r.get('pre_pass_peak_gib'), r['peak_gib']) for r in map(json.loads, open('$OUT/q_dpo_lora_a.jsonl'))]"
G="grpo --device cuda --size smollm2-135m --prompts 8 --num_generations 8 --max_completion_length 128 --steps 6 --warmup 2"
timeout 120 $B $G --variants trl align --json $OUT/grpo3.jsonl > $OUT/grpo3.log 2>&1; tail -4 $OUT/grpo3.log
