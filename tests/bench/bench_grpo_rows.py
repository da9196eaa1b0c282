"""Benchmark: the GRPO update's log-prob passes, each prompt once (grpo.completion_logps) against one
forward per row over prompt + completion (tests/test_grpo.py's plain_logps, the reference).

    OMP_NUM_THREADS=1 python tests/bench/bench_grpo_rows.py            # the demo's tiny model and rollout
    python tests/bench/bench_grpo_rows.py --config small --device cuda   # bench_sampler.py's small model

The rollout: --prompts prompts x --group-size completions, cut into micro-batches of --micro-batch
rows as grpo.py cuts them. tiny (the default): the demo's model (data.TINY, random weights: the
time does not depend on them) on hard synthetic problems at the demo's image size, each completion
the problem's gold trace (the lengths GRPO sees). small: bench_sampler.py's model and prompts
(64 image tokens), completions of --comp-len random ids.

Timed, for both: the reference pass (no grad, every micro-batch) and the update pass (forward and
backward of sum(adv * logp), every micro-batch). One warm-up, then the median of --reps. Printed:
the token passes per row of each (prompt once per group vs prompt per row), the seconds of each
pass, the max |logp difference| between the two (the same numbers, test_grpo.py asserts it), and
on the last line `speedup_update X`: plain / shared seconds of the update pass.
"""

import argparse
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.dirname(os.path.abspath(__file__))]

import bench_sampler  # noqa: E402
import data  # noqa: E402
import grpo  # noqa: E402
import model as M  # noqa: E402
from test_grpo import plain_logps  # noqa: E402


def rollout(args, cfg, tok):
    """Items as grpo.build_sequences makes them: G rows per prompt, sharing its encoding."""
    g = torch.Generator().manual_seed(0)
    items = []
    if args.config == "tiny":
        recs = data.synth_records(args.prompts, "hard", seed=1)
        for i, r in enumerate(recs):
            enc = data.encode_prompt(tok, data.format_question(r), r["images"])
            comp = torch.tensor(tok(r["solution"] + "<|im_end|>")["input_ids"])
            items += [dict(prompt_id=i, prompt=enc, completion=comp, n_comp=len(comp))] * args.group_size
    else:
        for i, enc in enumerate(bench_sampler.make_prompts(cfg, args.prompts)):
            for _ in range(args.group_size):
                comp = torch.randint(0, 32000, (args.comp_len,), generator=g)
                items.append(dict(prompt_id=i, prompt=enc, completion=comp, n_comp=len(comp)))
    return items


def passes(model, items, mb, f, dev, grad):
    """One pass over the rollout's micro-batches; returns the flat log-probs."""
    out = []
    for m0 in range(0, len(items), mb):
        part = items[m0:m0 + mb]
        if grad:
            lp = f(model, part)
            adv = torch.randn(len(part), generator=torch.Generator().manual_seed(m0)).to(dev)
            (lp * torch.repeat_interleave(adv, torch.tensor([it["n_comp"] for it in part], device=dev))).sum().backward()
        else:
            with torch.no_grad():
                lp = f(model, part)
        out.append(lp.detach())
    return torch.cat(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny", choices=["tiny", "small"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=64, help="rows per forward/backward, as grpo.py's flag")
    p.add_argument("--comp-len", type=int, default=128, help="completion tokens (small config)")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    tok = data.build_tiny_tokenizer()
    cfg = data.tiny_config(tok) if args.config == "tiny" else bench_sampler.make_config("small")
    model = M.Qwen2_5_VL(cfg).init_weights(seed=0).to(dev)
    items = rollout(args, cfg, tok)
    pad = tok.pad_token_id if args.config == "tiny" else 0
    impls = {"plain": lambda m, part: plain_logps(m, part, pad),
             "shared": lambda m, part: grpo.completion_logps(m, part, pad)[0]}
    Tp = statistics.mean(len(it["prompt"]["input_ids"]) for it in items)
    Tc = statistics.mean(it["n_comp"] for it in items)
    G = args.group_size
    print(f"config {args.config}, device {dev}, threads {torch.get_num_threads()}: {args.prompts} prompts x {G}, "
          f"micro-batch {args.micro_batch} rows; prompt {Tp:.0f} tokens, completion {Tc:.0f}")
    print(f"token passes per row: plain {Tp + Tc:.0f}, shared {Tp / G + Tc:.0f} (x{(Tp + Tc) / (Tp / G + Tc):.2f} fewer)")
    res, lps = {}, {}
    for name, f in impls.items():
        for grad in (False, True):
            ts = []
            for _ in range(args.reps + 1):  # the first is the warm-up
                model.zero_grad(set_to_none=True)
                dt, lps[name] = bench_sampler.timed(dev, lambda: passes(model, items, args.micro_batch, f, dev, grad))
                ts.append(dt)
            res[name, grad] = statistics.median(ts[1:])
    diff = (lps["plain"] - lps["shared"]).abs().max().item()
    for grad, label in ((False, "reference pass (no grad)"), (True, "update pass (fwd + bwd)")):
        a, b = res["plain", grad], res["shared", grad]
        print(f"{label}: plain {a:.3f} s, shared {b:.3f} s, x{a / b:.2f}")
    print(f"max |logp plain - logp shared| = {diff:.2e}")
    print(f"speedup_update {res['plain', True] / res['shared', True]:.2f}")


if __name__ == "__main__":
    main()
