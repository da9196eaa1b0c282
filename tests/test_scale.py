"""
The recipe at scale, by construction: what bounds grpo.py's memory computes what the unbounded
code computed, and a GRPO step at Qwen2.5-VL-3B's widths on 2 FSDP2 processes equals 1 process.

- the rollout in generate calls of --rollout-batch rows == one call, token for token (sampled, greedy)
- the default --rollout-batch: whole groups whose KV cache fits grpo.KV_BUDGET
- log-probs and entropy LOGP_CHUNK tokens at a time == one full log-softmax: values and gradients
- activation checkpointing through the update pass's KV cache == no checkpointing
- tests/bench/memory_plan.py: the real parameter counts; the 7B recipe fits 8 x 80 GB only chunked
- 3B widths, 2 layers (bf16 weights, fp32 compute): one GRPO step on 2 FSDP2 processes == 1 process
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import data
import grpo
import model as M
from test_grpo import rows, tiny_vl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "bench"))
import memory_plan  # noqa: E402

WORLD_ROWS = 8  # rows of the conftest `world` fixture's data file

# -----------------------------------------------------------------------------
# the rollout in chunks


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_chunked_rollout_equals_one_generate_call(world, monkeypatch, temperature):
    """4 prompts x G = 3: one generate call, or calls of 1 or 2 prompts (--rollout-batch 3, 7):
    the same tokens, lengths, log-probs and texts, rows stopping at different lengths."""
    tok = data.load_tokenizer(world["model"])
    policy = M.load_model(world["model"]).init_weights(std=0.3, seed=1)  # peaked enough to vary by prompt
    recs = data.load_records(world["data"])[0][:4]
    # a random model never says <|im_end|>: stop on any of 40 ids, so rows end at different lengths
    monkeypatch.setattr(grpo.sample, "default_stop_ids", lambda cfg, tokenizer=None: list(range(100, 140)))
    calls, real = [], grpo.sample.generate
    monkeypatch.setattr(grpo.sample, "generate", lambda m, p, **kw: calls.append(len(p)) or real(m, p, **kw))
    out = {}
    for rb in (12, 3, 7):
        a = grpo.get_args(["--group-size", "3", "--rollout-batch", str(rb), "--max-new-tokens", "10",
                           "--temperature", str(temperature), "--top-p", "0.95", "--seed", "3"])
        out[rb] = grpo.rollout(policy, tok, recs, [10, 11, 12, 13], a, torch.autocast("cpu", enabled=False))[1]
    assert calls == [4, 1, 1, 1, 1, 2, 2]
    one = out[12]
    distinct = len({tuple(t.tolist()) for t in one.tokens})  # greedy: one completion per prompt
    assert len(set(one.lengths.tolist())) > 1 and distinct > (4 if temperature else 3)
    for s in (out[3], out[7]):
        assert torch.equal(s.tokens, one.tokens) and torch.equal(s.lengths, one.lengths)
        assert torch.equal(s.finished, one.finished) and s.texts == one.texts
        assert torch.equal(s.prompt_index, one.prompt_index) and torch.equal(s.sample_index, one.sample_index)
        assert torch.allclose(s.logprobs, one.logprobs, atol=1e-5)


def test_default_rollout_batch_fits_the_kv_budget():
    """Whole groups; each prompt's G + 1 rows of max_prompt_len + max_new_tokens slots fit
    KV_BUDGET, one more prompt would not. 7B: 57344 bytes of K/V a token in bf16."""
    cfg = memory_plan.CONFIGS["7b"]()
    assert grpo.kv_bytes_per_token(cfg, 2) == 2 * 28 * 4 * 128 * 2
    for max_prompt, G in ((6144, 5), (512, 5), (512, 8)):
        a = grpo.get_args(["--max-prompt-len", str(max_prompt), "--max-new-tokens", "2048", "--group-size", str(G)])
        rows = grpo.default_rollout_batch(cfg, a, 2)
        per_prompt = grpo.kv_bytes_per_token(cfg, 2) * (max_prompt + 2048) * (G + 1)
        assert rows % G == 0 and rows // G * per_prompt <= grpo.KV_BUDGET < (rows // G + 1) * per_prompt
    tok, a = data.build_tiny_tokenizer(), grpo.get_args([])  # the demo: a whole rollout in one call
    assert grpo.default_rollout_batch(data.tiny_config(tok), a, 4) >= a.prompts_per_rollout * a.group_size

# -----------------------------------------------------------------------------
# log-probs a chunk at a time, checkpointing through the cache


def full_pick(h, head, targets, with_entropy=False, chunk=None):
    """The pick grpo.py had before chunking: one log-softmax over all N x vocab logits in fp32."""
    logp_all = F.log_softmax(head(h).float(), dim=-1)
    ent = -(logp_all.exp() * logp_all).sum(-1).detach() if with_entropy else None
    return logp_all.gather(-1, targets[:, None]).squeeze(1), ent


def logps_and_grads(m, items, w):
    m.zero_grad()
    lp, ent = grpo.completion_logps(m, items, 0, with_entropy=True)
    (lp * w).sum().backward()
    return lp.detach(), ent, {k: q.grad.clone() for k, q in m.named_parameters()}


def same_grads(a, b, rel=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() <= rel * a[k].abs().max(), k


ITEMS = [("a?", "red", [10, 11, 12]), ("longer question?", "blue", [20, 21, 22, 23, 24]), ("a?", "red", [13]),
         ("text only", None, [30, 31]), ("a?", "red", [14, 15, 16, 17, 18, 19]), ("longer question?", "blue", [25, 26])]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_chunked_logps_equal_the_full_log_softmax(monkeypatch, dtype, tol):
    """19 completion tokens in chunks of 4 (the last one short) against one log-softmax over all
    of them: log-probs, entropies and the gradient in every weight. In float64 weights only the
    chunking differs (to 1e-6); in float32 the head's matmul also rounds differently for 4 rows
    than for 13 (1e-5, as tests/test_grpo.py)."""
    tok, m = tiny_vl()
    m.to(dtype)
    items = rows(tok, ITEMS)
    w = torch.randn(19, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(grpo, "LOGP_CHUNK", 4)
    chunked = logps_and_grads(m, items, w)
    monkeypatch.setattr(grpo, "pick", full_pick)
    full = logps_and_grads(m, items, w)
    assert chunked[0].shape == (19,)
    assert torch.allclose(chunked[0], full[0], atol=0, rtol=tol)
    assert torch.allclose(chunked[1], full[1], atol=0, rtol=tol)
    assert all(g.abs().max() > 0 for g in full[2].values())
    same_grads(full[2], chunked[2], tol)


def test_chunks_recompute_their_logits_in_backward(monkeypatch):
    """With grad, a chunk's (n, vocab) logits are not kept for backward: the head runs once per
    chunk in forward and once more in backward; without grad, once."""
    tok, m = tiny_vl(layers=1)
    items = rows(tok, ITEMS)
    monkeypatch.setattr(grpo, "LOGP_CHUNK", 4)
    calls = []
    m.lm_head.register_forward_hook(lambda mod, inp, out: calls.append(out.shape[0]))
    with torch.no_grad():
        grpo.completion_logps(m, items, 0)
    assert calls == [4, 2, 4, 4, 4, 1]  # token 0 of the 6 rows, then the other 13, in chunks of 4
    calls.clear()
    grpo.completion_logps(m, items, 0)[0].sum().backward()
    assert sorted(calls) == sorted([4, 2, 4, 4, 4, 1] * 2)


def test_activation_checkpointing_through_the_cache(monkeypatch):
    """The update pass runs each prompt into a KV cache, then the completions on copies of it:
    with checkpointing each decoder layer reruns in backward and writes the same K/V into the
    same slots. Same log-probs, same gradient in every weight."""
    tok, m = tiny_vl()
    items = rows(tok, ITEMS)
    w = torch.randn(19, generator=torch.Generator().manual_seed(1))
    m.train()
    plain = logps_and_grads(m, items, w)
    m.model.gradient_checkpointing = True
    runs, real = [], M.DecoderLayer.forward
    monkeypatch.setattr(M.DecoderLayer, "forward", lambda self, *a: runs.append(1) or real(self, *a))
    ckpt = logps_and_grads(m, items, w)
    assert len(runs) == 2 * 2 * 2  # 2 layers x (prompt pass, completion pass) x (forward, backward)
    assert torch.equal(ckpt[0], plain[0])
    same_grads(plain[2], ckpt[2])


# -----------------------------------------------------------------------------
# the memory plan


def test_memory_plan_counts_the_real_models():
    """The meta-device models have the released checkpoints' parameter counts."""
    u7, u3 = (memory_plan.units(memory_plan.CONFIGS[k](), 8) for k in ("7b", "3b"))
    assert u7.total == 8_292_166_656 and u3.total == 3_754_622_976
    # the frozen vision tower: the same 32 blocks, a merger to each model's width
    assert (u7.total - u7.trainable, u3.total - u3.trainable) == (676_550_144, 668_684_288)
    assert u7.shard >= u7.total / 8 and u7.shard - u7.total / 8 < 1e6                      # dim 0 padded


def test_memory_plan_7b_recipe_fits_8_x_80gb_only_chunked():
    cfg, r = memory_plan.CONFIGS["7b"](), memory_plan.Recipe()
    peak = lambda r: max(p for p, _, _ in memory_plan.peaks(*memory_plan.plan(cfg, r)).values())
    assert memory_plan.fits_in(peak(r), 80)
    assert not memory_plan.fits_in(peak(memory_plan.replace(r, rollout_batch=r.rows)), 80)  # one generate call
    assert not memory_plan.fits_in(peak(memory_plan.replace(r, gpus=2)), 80)

# -----------------------------------------------------------------------------
# one GRPO step at Qwen2.5-VL-3B's widths: 2 FSDP2 processes against 1


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A random checkpoint at Qwen2.5-VL-3B's widths (hidden 2048, MLP 11008, 16 query / 2 KV
    heads of 128, M-RoPE [16, 24, 24], vision 1280 wide with 16 heads, tied head) with 2
    decoder layers and 2 vision blocks, but the tiny tokenizer's 476-entry vocabulary (3B's
    151936 would make the head 2 times the 2 layers and the run slower): 233 M parameters."""
    path = str(tmp_path_factory.mktemp("wide"))
    tok = data.save_tiny_tokenizer(path)
    with torch.device("meta"):  # no default init: init_weights draws every weight anyway
        m = M.Qwen2_5_VL(memory_plan.check_config(tok, len(tok)))
    M.save_model(m.to_empty(device="cpu").init_weights(seed=0).to(torch.bfloat16), path)  # bf16: half the I/O
    return path


# the recipe scaled down: group 5, temperature 1, top-p 0.99, clip 0.2 / 0.3, dual clip 3, k3 KL
# 0.01, vision frozen; 2 prompts of 31 tokens (a 56 px image), 3 new tokens, one optimizer step
SCALE = ["--steps", "1", "--group-size", "5", "--prompts-per-rollout", "2", "--prompts-per-step", "2",
         "--micro-batch", "10", "--max-new-tokens", "3", "--temperature", "1.0", "--top-p", "0.99", "--beta", "0.01",
         "--clip-low", "0.2", "--clip-high", "0.3", "--dual-clip", "3", "--lr", "1e-3", "--freeze-vision",
         "--no-bf16", "--no-compile", "--eval-every", "0", "--device", "cpu"]


def test_3b_widths_two_fsdp2_processes_equal_one(world, wide, tmp_path):
    """2 processes: FSDP2 on gloo, log-probs 4 tokens at a time, activation checkpointing. 1
    process: a generate call per group (--rollout-batch 5), the whole micro-batch's log-probs at
    once, no checkpointing. The same completions, loss and update.

    fp32 compute: on this CPU (AVX2, no bf16 instructions) a bf16 matmul whose weight is not
    transposed, as every linear layer's input gradient is, runs at ~0.1 GFLOP/s (~10 s a call at
    these widths), so a bf16 step takes minutes; the bf16 path is the same code with
    MixedPrecisionPolicy on (tests/test_grpo.py runs it in one process)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    worker = os.path.join(ROOT, "tests", "dist_scale.py")
    args = ["--model", wide, "--data", world["data"], *SCALE]
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    # both at once: the 2 processes spend a third of their time waiting on each other's gloo
    # all-gathers, which the third fills (~60 s instead of ~75 s on an otherwise idle 2-core machine)
    run = lambda cmd, env: subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p2 = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker, *args,
              "--activation-checkpointing", "--out", two], dict(env, LOGP_CHUNK="4"))
    p1 = run([sys.executable, worker, *args, "--rollout-batch", "5", "--out", one], env)
    (out2, err2), (_, err1) = p2.communicate(timeout=600), p1.communicate(timeout=600)
    assert p2.returncode == 0, out2[-2000:] + err2[-6000:]
    assert p1.returncode == 0, err1[-4000:]
    from test_grpo import metrics, weights
    (m1,), (m2,) = metrics(one), metrics(two)
    assert m1["reward"] == pytest.approx(m2["reward"], rel=1e-6) and m1["response_length"] == m2["response_length"] == 3
    assert m1["signal_frac"] == 1.0 and m1["loss"] == pytest.approx(m2["loss"], rel=1e-4, abs=1e-7)
    base, w1, w2 = weights(wide), weights(one), weights(two)
    d1, d2 = ({k: w[k] - base[k] for k in base} for w in (w1, w2))
    assert all(d1[k].abs().max() == d2[k].abs().max() == 0 for k in base if k.startswith("visual."))
    moved = [k for k in base if not k.startswith("visual.")]
    assert all(d1[k].abs().max() > 5e-4 for k in moved)                # Adam's first step: ~lr a weight
    # Adam's first step is lr * g / (|g| + 1e-8): where g is ~1e-8 the last bits of the gradient
    # (summed over 2 ranks or 1) move a weight by up to ~0.1 lr, so the update is compared whole
    d1, d2 = (torch.cat([d[k].flatten() for k in moved]).double() for d in (d1, d2))
    err = ((d1 - d2).norm() / d1.norm()).item()
    print(f"the two updates differ by {err:.1e} of their norm")
    assert err <= 1e-4
