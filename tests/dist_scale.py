"""
Worker for tests/test_scale.py (not collected by pytest): a grpo.py run as tests/dist_grpo.py
makes it (the letter-share reward), with log-probs $LOGP_CHUNK tokens at a time and no step
checkpoint (only the exported weights are compared: a 233 M-parameter model's optimizer state
would be written for nothing).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dist_grpo  # noqa: E402
import grpo  # noqa: E402

if __name__ == "__main__":
    grpo.LOGP_CHUNK = int(os.environ.get("LOGP_CHUNK", grpo.LOGP_CHUNK))
    grpo.sft.save_checkpoint = lambda *args, **kw: None
    dist_grpo.run(sys.argv[1:])
    print("dist_scale ok", flush=True)
