# the RL command on the GPU with a user's own model (random SmolLM2-shaped HF Llama): Liger, then compiled rollouts
export PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; rm -rf /tmp/site/huggingface_hub*
python3 .gpu-k/mkrand.py .gpu-k/smol /tmp/smolr
A="python3 -m align.grpo configs/grpo.yaml --model_name_or_path /tmp/smolr --max_steps 4 --logging_steps 1 --save_steps 100 --eval_num_prompts 0 --max_completion_length 128 --bf16 true"
timeout 110 $A --output_dir $OUT/liger --use_liger_kernel true > $OUT/liger.log 2>&1; echo "liger rc $?"; grep -E "train_runtime|step_time|'loss'" $OUT/liger.log | tail -3
timeout 120 $A --output_dir $OUT/comp --compile_rollouts true > $OUT/comp.log 2>&1; echo "comp rc $?"; grep -E "train_runtime|'loss'" $OUT/comp.log | tail -3
rm -rf $OUT/*/checkpoint-* $OUT/*/final/*.safetensors
