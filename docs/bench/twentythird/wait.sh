# wait up to $1 s for the background run in /tmp/res, then bring back what it has
for i in $(seq $(( $1 / 10 ))); do [ -f /tmp/res/done ] && break; sleep 10; done
cat /tmp/res/run.out; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
cp /tmp/res/*.jsonl $OUT/ 2>/dev/null; (cd /tmp/res && tar czf $OUT/logs.tgz *.log run.out)
