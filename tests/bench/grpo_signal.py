"""Probe: is there anything for GRPO to learn at a checkpoint? The policy gradient of K independent
rollouts, each as grpo.py makes it (P prompts x G samples, the same objective, beta 0), and how
much of it is the same from rollout to rollout.

    OMP_NUM_THREADS=2 python tests/bench/grpo_signal.py --model runs/sft1        # the demo's GRPO1
    python tests/bench/grpo_signal.py --model runs/sft2 --rollouts 16 --freeze-vision

For K rollout gradients g_k = s + n_k (s the expected gradient, n_k each rollout's noise), the mean
of |g_k|^2 is |s|^2 + E|n|^2, and |mean_k g_k|^2 is |s|^2 + E|n|^2 / K, so
    |s|^2 ~ (|mean g|^2 - mean |g|^2 / K) / (1 - 1 / K)
Printed: each rollout's reward and groups with signal, then `signal_to_noise X`: |s|^2 / E|n|^2 for
one rollout, and the mean cosine between two rollouts' gradients. Near 0 (or below, by chance):
the rollouts disagree, and Adam steps on them are a random walk away from the checkpoint.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import data  # noqa: E402
import grpo  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="runs/sft1")
    p.add_argument("--rollouts", type=int, default=8, help="K independent rollouts")
    p.add_argument("--prompts", type=int, default=16, help="P prompts a rollout (grpo.py's default)")
    p.add_argument("--level", default="hard")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--freeze-vision", action="store_true")
    b = p.parse_args()
    a = grpo.get_args(["--model", b.model, "--prompts-per-rollout", str(b.prompts), "--prompts-per-step", str(b.prompts),
                       "--temperature", str(b.temperature), "--beta", "0", "--device", "cpu"]
                      + (["--freeze-vision"] if b.freeze_vision else []))
    dev = torch.device("cpu")
    policy, ref, _, tok, autocast = grpo.setup(a, dev, 1)
    records = data.synth_records(b.prompts * b.rollouts, b.level, seed=1)
    params = [q for q in policy.parameters() if q.requires_grad]
    grads = []
    for k in range(b.rollouts):
        recs, encs, s, scores, _ = grpo.draw_rollout(policy, tok, records, list(range(len(records))), k, a, 0, 1,
                                                     dev, autocast, {})
        items = grpo.build_sequences(encs, s, adv=scores[3])
        grpo.reference_logps(policy, ref, items, a, grpo.pad_of(tok), autocast)
        n_tok = torch.tensor(float(sum(it["n_comp"] for it in items)))
        policy.zero_grad(set_to_none=True)
        for m0 in range(0, len(items), a.micro_batch):
            loss, _, _ = grpo.policy_loss(policy, items[m0:m0 + a.micro_batch], n_tok, a, grpo.pad_of(tok), dev, autocast)
            loss.backward()
        grads.append(torch.cat([q.grad.flatten() for q in params]))
        print(f"rollout {k}: reward {scores[2].mean():.3f}, groups with signal {scores[4]}/{b.prompts}", flush=True)
    g = torch.stack(grads)                                        # (K, parameters)
    K, per = len(g), (g ** 2).sum(1).mean()
    s2 = ((g.mean(0) ** 2).sum() - per / K) / (1 - 1 / K)
    cos = torch.nn.functional.cosine_similarity(g[:, None], g[None], dim=-1)
    print(f"mean |g|^2 {per:.3e}, expected-gradient |s|^2 ~ {s2:.3e}")
    print(f"signal_to_noise {s2 / (per - s2):.4f}, mean cosine between rollouts {(cos.sum() - K) / (K * K - K):.4f}")


if __name__ == "__main__":
    main()
