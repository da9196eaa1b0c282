#!/usr/bin/env bash
# The checks that need a GPU, in one call of at most 11.8 minutes (the sum of the steps' time
# limits; SKIP_3B=1 leaves out the 3B sampler benchmark: 9.3); each step's output goes to $OUT/<step>.log (default
# ./gpu_out), and a failed or timed-out step does not stop the others (a cut GRPO run still returns
# the metrics of the rollouts it finished).
#
#   OUT=/tmp/gpu bash tests/bench/gpu_checks.sh            # on the GPU machine, from the repo root
#   DEVICE=cpu SMOKE=1 bash tests/bench/gpu_checks.sh      # the same steps, tiny, on a CPU
#
# Needs runs/sft1 (the demo's SFT model; 3.3 MB, carry it to the machine) for the GRPO steps, and
# torch, transformers and pytest on the machine.
#   1. the tests marked cuda (bf16 SFT and GRPO, the sampler on CUDA)
#   2. torchrun grpo.py on CUDA (nccl, bf16), 5 rollouts from runs/sft1
#   3. bench_grpo_rows.py (small model) and bench_sampler.py on the device: the demo's shape
#      with GRPO's workload, then Qwen2.5-VL-3B's shapes in bf16 at batch 1 (the share of the HBM
#      roofline) and 64, each against transformers' generate(), compiled (CUDA graphs) and not
#   4. the demo's GRPO at 16x the CPU demo's batch: 256 mixed prompts x 8 per step, lr 3e-4, 100
#      rollouts, the held-out test every 25 (does GRPO's gain grow with the batch?)
set -u
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if [ "${SMOKE:-0}" = 1 ]; then
    PROMPTS=4; STEPS=2; EVAL=2; EVAL_N=8; BENCH="--prompts 2 --reps 1"; SAMPLER="--batch 2 --new-tokens 8 --repeats 1"
else
    PROMPTS=256; STEPS=100; EVAL=25; EVAL_N=400; BENCH=""; SAMPLER=""
fi
step() {  # step NAME SECONDS command...: run it with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "$name: exit $? in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
step cuda_tests 150 python -m pytest -q -m cuda tests
step torchrun_grpo 90 torchrun --standalone --nproc_per_node=1 grpo.py --model runs/sft1 --out "$OUT/grpo_torchrun" \
    --steps "$STEPS" --eval-every 0 --save-every 1000 --device "$DEVICE" --bf16
step bench_grpo_rows 45 python tests/bench/bench_grpo_rows.py --device "$DEVICE" --config small $BENCH
step bench_sampler 90 python tests/bench/bench_sampler.py --device "$DEVICE" --config demo $SAMPLER
[ "${SKIP_3B:-${SMOKE:-0}}" = 1 ] || step bench_sampler_3b 150 python tests/bench/bench_sampler.py --device "$DEVICE" \
    --config 3b --new-tokens 128 --repeats 2 $SAMPLER
step grpo_scale 180 python grpo.py --model runs/sft1 --out "$OUT/grpo_scale" --device "$DEVICE" --no-bf16 \
    --level mix --prompts-per-rollout "$PROMPTS" --prompts-per-step "$PROMPTS" --micro-batch 256 --lr 3e-4 \
    --steps "$STEPS" --eval-every "$EVAL" --eval-n "$EVAL_N" --save-every 1000
cp "$OUT/grpo_scale/metrics.jsonl" "$OUT/grpo_scale_metrics.jsonl" 2>/dev/null
rm -rf "$OUT/grpo_torchrun" "$OUT/grpo_scale"  # the weights need not come back
