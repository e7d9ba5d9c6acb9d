set -e
cd /work/main
for cell in "W2A16 tlq" "W3A16 gptq" "W3A16 tlq" "W4A16 gptq" "W4A16 tlq"; do
  set -- $cell
  for v in "default:" "actorder:--act-order"; do
    n=${v%%:*}; f=${v#*:}
    out=/tmp/exp/$1-$2-$n
    .venv/bin/python -m tlq_vllm.calibrate --model testbed --data scenes:calibration --scheme $1 --method $2 --seed 0 --num-samples 32 --output $out --overwrite --no-progress $f > /dev/null 2>&1
    r=$(.venv/bin/python -m tlq_vllm.eval --model $out --data scenes:validation --limit 700 --no-progress --reference /tmp/exp/fp700.pt 2>&1 | tail -1 | grep -o "accuracy [0-9.]*\|mean_kl [0-9.e-]*\|top1_agreement [0-9.]*" | tr '\n' ' ')
    echo "$1 $2 $n: $r"
    rm -rf $out
  done
done
