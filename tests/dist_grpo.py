"""
Worker for tests/test_grpo.py (not collected by pytest): a short grpo.py run with a dense toy
reward, as one plain process (`python tests/dist_grpo.py ...`) or under torchrun (FSDP2, gloo).

The reward replaces the accuracy reward with the share of ASCII letters in the completion: a
random micro model then gets rewards that differ within every group (so every step carries a
real update), and the model can learn to raise it within a few dozen steps. With
DIST_GRPO_REWARD=binary it is 1 above half letters, else 0: some groups then have no signal.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpo  # noqa: E402


def letter_share(completion, answer=None, choices=None):
    return sum(c.isascii() and c.isalpha() for c in completion) / max(len(completion), 1)


def letter_majority(completion, answer=None, choices=None):
    return float(letter_share(completion) > 0.5)


def run(argv):
    binary = os.environ.get("DIST_GRPO_REWARD") == "binary"
    grpo.reward.accuracy_reward = letter_majority if binary else letter_share
    grpo.main(argv)


if __name__ == "__main__":
    run(sys.argv[1:])
    print("dist_grpo ok", flush=True)
