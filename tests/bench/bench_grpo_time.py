"""Benchmark: where a GRPO run's time goes, with and without --compile, from one start model.

    python tests/bench/bench_grpo_time.py --model runs/sft1              # the demo's GRPO1, 100 rollouts
    python tests/bench/bench_grpo_time.py --model runs/sft1 --steps 20   # a quicker look

Runs `grpo.py --model MODEL --steps N` (every other flag at its default, so the held-out checks
every 50 rollouts are in it) twice, with --no-compile then --compile, each in its own process and
output directory, and reads its metrics.jsonl. Printed for each: the seconds of each phase over
all rollouts (time_sample, time_score, time_reference, time_update), sampling's share of their
sum (the first rollout's compile included), the first rollout's sampling seconds, a rollout's
sampling after the first, and the process's wall-clock; last, `compiled_wall_ratio X`: the
compiled run's wall-clock over the uncompiled one's (below 1: the compile pays for itself).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PHASES = ("sample", "score", "reference", "update")


def run(model, steps, flags, out):
    """One grpo.py process -> (its wall-clock seconds, its metrics rows with phase times)."""
    cmd = [sys.executable, os.path.join(ROOT, "grpo.py"), "--model", model, "--steps", str(steps),
           "--out", out] + flags
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "time_sample" in r]
    return wall, rows


def report(name, wall, rows):
    total = {k: sum(r[f"time_{k}"] for r in rows) for k in PHASES}
    first, rest = rows[0]["time_sample"], [r["time_sample"] for r in rows[1:]]
    share = total["sample"] / sum(total.values())
    print(f"{name:>10}: " + ", ".join(f"{k} {v:.1f} s" for k, v in total.items())
          + f"; sampling {100 * share:.1f}% of them; first rollout's sampling {first:.1f} s, then "
          f"{sum(rest) / max(len(rest), 1):.3f} s a rollout; wall-clock {wall:.1f} s")
    return share


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="runs/sft1", help="the start model (a checkpoint directory)")
    p.add_argument("--steps", type=int, default=100, help="rollouts of each run")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        p.error(f"{args.model}: no checkpoint there (python grpo.py builds runs/sft1 first)")
    walls = {}
    with tempfile.TemporaryDirectory(prefix="bench_grpo_time_") as d:
        for name, flags in (("eager", ["--no-compile"]), ("compiled", ["--compile"])):
            walls[name], rows = run(args.model, args.steps, flags, os.path.join(d, name))
            report(name, walls[name], rows)
    print(f"compiled_wall_ratio {walls['compiled'] / walls['eager']:.2f}")


if __name__ == "__main__":
    main()
