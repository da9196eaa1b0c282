"""
torchrun worker for tests/test_sft.py (not collected by pytest): two sft.py runs in one launch
(one process group, so the start-up is paid once).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_sft.py \\
        --model DIR --data FILE --out DIR

  a) OUT/a: steps 1-3 of a 6-step run (FSDP2, gloo, global batch 8 = 2 ranks x 2 accumulation x
     micro-batch 2), stopped with a checkpoint: the test compares its weights with one process
     on the same global batches, and resumes it in one process (2 ranks -> 1).
  b) OUT/b: resume to step 6 from the one-process checkpoint the test put there (1 rank -> 2).
  c) OUT/c: 2 steps with the vision tower frozen, activation checkpointing, and bf16 compute
     (FSDP's MixedPrecisionPolicy: bf16 weights gathered, fp32 gradient reduction).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sft  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    rank, world, device = sft.dist_init("cpu")
    assert world == 2, world
    common = ["--model", a.model, "--data", a.data, "--device", "cpu", "--steps", "6", "--batch-size", "8",
              "--micro-batch-size", "2", "--warmup", "2", "--lr", "3e-3", "--eval-n", "0"]
    s = sft.train(sft.parser().parse_args(common + ["--out", os.path.join(a.out, "a"), "--stop-after", "3"]))
    assert s["steps"] == 3, s
    s = sft.train(sft.parser().parse_args(common + ["--out", os.path.join(a.out, "b"), "--resume"]))
    assert s["steps"] == 6, s
    s = sft.train(sft.parser().parse_args(common[:6] + [
        "--steps", "2", "--batch-size", "4", "--micro-batch-size", "2", "--eval-n", "0", "--out",
        os.path.join(a.out, "c"), "--freeze-vision", "--activation-checkpointing", "--dtype", "bfloat16"]))
    assert s["steps"] == 2, s
    sft.print0("dist_sft ok")
    sft.dist_cleanup()


if __name__ == "__main__":
    main()
