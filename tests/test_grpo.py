"""GRPO's math against hand-computed values."""
import math

import pytest
import torch

import grpo


def test_advantages_zero_mean_per_group_and_std_scaled():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    adv, signal = grpo.group_advantages(r, 4)
    g = adv.view(2, 4)
    assert torch.allclose(g.mean(1), torch.zeros(2), atol=1e-7)
    # group 0: mean 0.5, unbiased std sqrt(1/3)
    s = math.sqrt(1 / 3)
    assert torch.allclose(g[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + 1e-6))
    assert signal == 2
    adv2, _ = grpo.group_advantages(r, 4, scale_std=False)
    assert torch.allclose(adv2.view(2, 4)[1], torch.tensor([0.5, 0.5, -0.5, -0.5]))


def test_equal_rewards_give_zero_advantage_no_nan():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    adv, signal = grpo.group_advantages(r, 3)
    assert torch.equal(adv, torch.zeros(6)) and signal == 0
    assert not torch.isnan(adv).any()


def loss_of(logp, old, adv, beta=0.0, ref=None, **kw):
    n = torch.tensor(float(logp.numel()))
    return grpo.grpo_loss(logp, old, ref, adv, n, beta=beta, **kw)


def test_ratio_one_gradient_is_reinforce():
    logp = torch.tensor([-1.0, -2.0, -0.5, -0.3], requires_grad=True)
    adv = torch.tensor([1.5, 1.5, -0.7, -0.7])
    loss, _ = loss_of(logp, logp.detach(), adv)
    loss.backward()
    # REINFORCE: d/dlogp of -(A * logp).mean()
    assert torch.allclose(logp.grad, -adv / 4)
    assert loss.item() == pytest.approx(-adv.sum().item() / 4)


@pytest.mark.parametrize("ratio,adv,value,grad_flows", [
    (1.5, 1.0, -1.3, False),   # A > 0, ratio above 1 + eps_high: clipped, no gradient
    (1.2, 1.0, -1.2, True),    # inside the trust region
    (0.5, 1.0, -0.5, True),    # A > 0, ratio below 1 - eps_low: the unclipped term is larger
    (0.5, -1.0, 0.8, False),   # A < 0, ratio below 1 - eps_low: clipped, no gradient
    (1.5, -1.0, 1.5, True),    # A < 0, ratio above 1 + eps_high: the unclipped term is larger
    (5.0, -1.0, 3.0, False),   # A < 0, far off policy: dual clip caps the loss at 3|A|
    (5.0, 1.0, -1.3, False),   # dual clip does not touch positive advantages
])
def test_clipping(ratio, adv, value, grad_flows):
    logp = torch.tensor([math.log(ratio)], requires_grad=True)
    loss, st = loss_of(logp, torch.zeros(1), torch.tensor([adv]), clip_low=0.2, clip_high=0.3, dual_clip=3.0)
    assert loss.item() == pytest.approx(value, rel=1e-6)
    loss.backward()
    assert (logp.grad.abs().item() > 0) == grad_flows


def test_kl_nonnegative_and_zero_at_reference():
    logp = torch.tensor([-1.0, -2.0, -0.1])
    ref = torch.tensor([-1.5, -0.5, -0.1])
    adv = torch.zeros(3)
    loss_eq, st_eq = loss_of(logp, logp, adv, beta=1.0, ref=logp)
    assert loss_eq.item() == 0.0 and st_eq["kl"] == 0.0
    loss, st = loss_of(logp, logp, adv, beta=1.0, ref=ref)
    d = ref - logp
    k3 = (torch.exp(d) - d - 1)
    assert (k3 >= 0).all()
    assert loss.item() == pytest.approx(k3.mean().item())
    assert st["kl"] == pytest.approx(k3.sum().item())


@pytest.mark.parametrize("agg, n_norm, want", [
    ("token-mean", 4.0, (-3 + 1) / 4),          # every token alike: -0.5
    ("seq-mean", 2.0, ((-3) / 3 + 1 / 1) / 2),  # mean per completion (-1, +1), then over completions: 0
    ("constant", 2 * 8.0, (-3 + 1) / 16),       # Dr.GRPO: a sum over 2 completions x max_new_tokens 8
])
def test_loss_aggregation(agg, n_norm, want):
    # two completions: 3 tokens with A=1, 1 token with A=-1, at ratio 1 (pg = -A per token)
    logp = torch.zeros(4, requires_grad=True)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0])
    seq_id = torch.tensor([0, 0, 0, 1])
    loss, _ = grpo.grpo_loss(logp, logp.detach(), None, adv, torch.tensor(n_norm), beta=0.0, seq_id=seq_id, agg=agg)
    assert loss.item() == pytest.approx(want)
    loss.backward()
    per_token = {"token-mean": [1 / 4] * 4, "seq-mean": [1 / 6, 1 / 6, 1 / 6, 1 / 2], "constant": [1 / 16] * 4}[agg]
    assert torch.allclose(logp.grad, -adv * torch.tensor(per_token))


def test_gspo_sequence_ratio():
    """GSPO: s = exp(mean_t (logp_t - old_t)) on every token of the completion; its gradient on
    token t is A s / |o| (seq-mean), the same for every token."""
    logp = torch.tensor([0.1, 0.3, -0.2], requires_grad=True)   # old = 0: log-ratios 0.1, 0.3; -0.2
    adv, seq_id = torch.tensor([1.0, 1.0, -1.0]), torch.tensor([0, 0, 1])
    loss, st = grpo.grpo_loss(logp, torch.zeros(3), None, adv, torch.tensor(2.0), clip_low=0.2, clip_high=0.3,
                              beta=0.0, seq_id=seq_id, agg="seq-mean", ratio="sequence")
    s0, s1 = math.exp(0.2), math.exp(-0.2)      # 1.221 (inside 1.3), 0.819 (inside 0.8 for A < 0)
    assert loss.item() == pytest.approx((-s0 + s1) / 2)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([-s0 / 4, -s0 / 4, s1 / 2]))
    # GSPO's own clip range: s0 is above 1 + 4e-4 with A > 0, s1 below 1 - 3e-4 with A < 0: both
    # completions are clipped, their tokens get no gradient
    logp.grad = None
    loss, st = grpo.grpo_loss(logp, torch.zeros(3), None, adv, torch.tensor(2.0), clip_low=3e-4, clip_high=4e-4,
                              beta=0.0, seq_id=seq_id, agg="seq-mean", ratio="sequence")
    assert loss.item() == pytest.approx((-(1 + 4e-4) + (1 - 3e-4)) / 2, abs=1e-6)
    loss.backward()
    assert logp.grad.abs().max() == 0 and st["clipped"] == 3


def test_truncated_importance_weights():
    old, sampled = torch.tensor([-1.0, -1.0, -1.0]), torch.tensor([-1.0, -1.5, -0.2])
    w = grpo.tis_weights(old, sampled, cap=1.5)                 # exp(0), exp(0.5) = 1.65 -> 1.5, exp(-0.8)
    assert torch.allclose(w, torch.tensor([1.0, 1.5, math.exp(-0.8)]))
    logp = old.clone().requires_grad_()
    loss, _ = loss_of(logp, old, torch.ones(3), is_weight=w)   # pg = -A w at ratio 1
    assert loss.item() == pytest.approx(-(1 + 1.5 + math.exp(-0.8)) / 3)


def test_overlong_penalty_and_mask():
    # budget 8, buffer a quarter of it (2 tokens): no penalty up to 6, then -1/2 per token
    got = grpo.overlong_penalty(torch.tensor([3, 6, 7, 8]), 8)
    assert torch.allclose(got, torch.tensor([0.0, 0.0, -0.5, -1.0]))
    # a masked token adds nothing to the loss and gets no gradient
    logp = torch.zeros(3, requires_grad=True)
    loss, _ = grpo.grpo_loss(logp, logp.detach(), None, torch.tensor([1.0, 1.0, -2.0]), torch.tensor(2.0),
                             beta=0.0, weight=torch.tensor([1.0, 1.0, 0.0]))
    assert loss.item() == pytest.approx(-1.0)
    loss.backward()
    assert logp.grad.tolist() == [-0.5, -0.5, 0.0]


def test_dynamic_sampling_replaces_groups_without_signal(monkeypatch):
    """2 prompt slots x G=2; rewards by global prompt index: in draw 0 only slot 0 has signal, in
    draw 1 slot 1 has: the rollout keeps draw 0's group in slot 0, draw 1's in slot 1, and stops."""
    import argparse
    import sample
    right = {0: [1, 0], 1: [0, 0], 2: [1, 1], 3: [0, 1]}        # global prompt -> its 2 samples' rewards
    recs = [dict(id=str(i), answer="7") for i in range(4)]

    def fake_rollout(policy, tok, rs, gidx, a, autocast):
        texts = [f"<answer>{7 if ok else 3}</answer> {g}" for g in gidx for ok in right[g]]
        R = len(texts)
        toks = torch.tensor([[10 * g + j] for g in gidx for j in range(2)])   # (R, 1)
        return ([f"enc{g}" for g in gidx], sample.Samples(toks, torch.zeros(R, 1),
                torch.ones(R, dtype=torch.long), torch.ones(R, dtype=torch.bool),
                torch.arange(len(gidx)).repeat_interleave(2), torch.arange(2).repeat(len(gidx)), texts))
    monkeypatch.setattr(grpo, "rollout", fake_rollout)
    a = argparse.Namespace(dynamic_sampling=True, group_size=2, prompts_per_rollout=2, prompts_per_step=2,
                           format_weight=0.0, overlong="keep", no_std=False, max_new_tokens=8)
    tok = argparse.Namespace(pad_token_id=0)
    got_recs, encs, s, scores, draws = grpo.draw_rollout(None, tok, recs, [0, 1, 2, 3], 0, a, 0, 1, "cpu", None, {})
    assert draws == 2 and [r["id"] for r in got_recs] == ["0", "3"] and encs == ["enc0", "enc3"]
    assert s.texts == ["<answer>7</answer> 0", "<answer>3</answer> 0", "<answer>3</answer> 3", "<answer>7</answer> 3"]
    assert s.tokens[:, 0].tolist() == [0, 1, 30, 31] and s.prompt_index.tolist() == [0, 0, 1, 1]
    assert scores[2].tolist() == [1, 0, 0, 1] and scores[4] == 2
    a.dynamic_sampling = False                                 # off: one draw, the group without signal stays
    assert grpo.draw_rollout(None, tok, recs, [0, 1, 2, 3], 0, a, 0, 1, "cpu", None, {})[4] == 1


def tiny_vl(layers=2, seed=0):
    import data
    import model as M
    tok = data.build_tiny_tokenizer()
    cfg = data.tiny_config(tok, num_hidden_layers=layers, vision_depth=1, fullatt_block_indexes=[0])
    return tok, M.Qwen2_5_VL(cfg).init_weights(std=0.2, seed=seed)


def rows(tok, specs):
    """specs: (question, image colour or None, completion ids) -> items as build_sequences makes
    them; rows with the same question share one prompt (id and encoding)."""
    import data
    from PIL import Image
    encs, items = {}, []
    for q, colour, comp in specs:
        if q not in encs:
            encs[q] = data.encode_prompt(tok, q, [Image.new("RGB", (56, 84), colour)] if colour else [])
        comp = torch.tensor(comp)
        items.append(dict(prompt_id=list(encs).index(q), prompt=encs[q], completion=comp, n_comp=len(comp)))
    return items


def plain_logps(model, items, pad_id=0):
    """The reference: one forward per row over its whole prompt + completion, right-padded, no
    cache; log-probs of the completion tokens, row after row."""
    import data
    full = [dict(input_ids=torch.cat([it["prompt"]["input_ids"], it["completion"]]),
                 pixel_values=it["prompt"]["pixel_values"], image_grid_thw=it["prompt"]["image_grid_thw"]) for it in items]
    dev = model.model.embed_tokens.weight.device
    batch = {k: v.to(dev) for k, v in data.collate(full, pad_id, padding_side="right").items()}
    ids = batch["input_ids"]
    at = torch.zeros(ids.shape, dtype=torch.bool, device=dev)  # positions that predict a completion token
    for b, it in enumerate(items):
        n = len(it["prompt"]["input_ids"])
        at[b, n - 1:n - 1 + it["n_comp"]] = True
    nxt = torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), pad_id, device=dev)], dim=1)
    logits = model(ids, batch["attention_mask"], batch.get("pixel_values"), batch.get("image_grid_thw"), logits=at)
    return torch.log_softmax(logits.float(), -1).gather(-1, nxt[at][:, None]).squeeze(1)


def test_shared_prompt_logps_and_gradients_equal_one_forward_per_row():
    """completion_logps runs each prompt once and the completions on copies of its K/V; one
    forward per row over prompt + completion is the reference. Groups out of order, ragged
    completions (one of a single token), prompts of different lengths, with and without an image:
    the same log-probs and the same gradient in every weight."""
    tok, m = tiny_vl()
    items = rows(tok, [("a?", "red", [10, 11, 12]), ("longer question?", "blue", [20, 21, 22, 23, 24]),
                       ("a?", "red", [13]), ("text only", None, [30, 31]), ("a?", "red", [14, 15, 16, 17, 18, 19]),
                       ("longer question?", "blue", [25, 26])])
    w = torch.randn(sum(it["n_comp"] for it in items), generator=torch.Generator().manual_seed(0))
    grads = []
    for f in (plain_logps, lambda m, items: grpo.completion_logps(m, items, 0, with_entropy=True)[0]):
        m.zero_grad()
        lp = f(m, items)
        (lp * w).sum().backward()
        grads.append((lp.detach(), {k: q.grad.clone() for k, q in m.named_parameters()}))
    (ref, g_ref), (ours, g_ours) = grads
    assert ours.shape == ref.shape == (19,)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert all(g.abs().max() > 0 for g in g_ref.values())           # every weight takes part
    for k in g_ref:
        assert (g_ours[k] - g_ref[k]).abs().max() <= 1e-5 * g_ref[k].abs().max(), k
    _, ent = grpo.completion_logps(m, items, 0, with_entropy=True)
    assert ent.shape == (19,) and (ent > 0).all()


def test_masked_rows_leave_the_update_alone():
    """--overlong mask: a row whose keep is 0 adds nothing to the loss, the gradient or the
    divisor: with every row masked the weights do not move, and with one masked the update is
    that of the other rows alone."""
    import argparse
    import contextlib
    import copy
    tok, m = tiny_vl()
    # small advantages: the gradient norm stays under GRAD_CLIP, so the divisor shows in the update
    specs = [("How many?", "red", [5, 6, 7], 0.01), ("How many?", "red", [8, 9], -0.01), ("Which?", None, [10, 11, 12, 13], 0.005)]
    a = argparse.Namespace(mu=1, prompts_per_step=1, micro_batch=2, loss_agg="token-mean", max_new_tokens=8,
                           ratio="token", tis_cap=0.0, clip_low=0.2, clip_high=0.3, dual_clip=3.0, beta=0.0)

    def step(chosen, keep):
        model, items = copy.deepcopy(m), rows(tok, [sp[:3] for sp in chosen])
        for it, sp, k in zip(items, chosen, keep):
            it.update(adv=sp[3], keep=k, old=None, ref=None, sampled=torch.zeros(it["n_comp"]))
        a.group_size = len(items)  # one optimizer step over every row, in micro-batches of 2
        st = grpo.update(model, torch.optim.SGD(model.parameters(), lr=1.0), items, a, 0, 1, "cpu",
                         contextlib.nullcontext())
        return st, model.state_dict()

    st, w = step(specs, [0.0, 0.0, 0.0])
    assert st["loss"] == 0 and all(torch.equal(w[k], v) for k, v in m.state_dict().items())
    (st, w_mask), (_, w_alone) = step(specs, [1.0, 0.0, 1.0]), step([specs[0], specs[2]], [1.0, 1.0])
    assert 0 < st["grad_norm"] < grpo.GRAD_CLIP
    assert all(torch.allclose(w_mask[k], w_alone[k], atol=1e-7) for k in w_alone)
    assert any(not torch.equal(w_mask[k], v) for k, v in m.state_dict().items())


def test_padding_does_not_change_logps():
    """The same completion scored alone and beside rows with longer prompts and completions."""
    tok, m = tiny_vl(layers=1)
    items = rows(tok, [("a?", "red", [10, 11, 12]), ("longer q?", "blue", [20, 21, 22, 23, 24, 25, 26])])
    with torch.no_grad():
        lp_alone, _ = grpo.completion_logps(m, items[:1], 0)
        lp_batch, _ = grpo.completion_logps(m, items[::-1], 0)
    assert lp_batch.shape == (10,)
    assert torch.allclose(lp_alone, lp_batch[7:], atol=1e-5)


def test_trainer_scores_the_tokens_the_sampler_drew():
    """The update's log-probs (each prompt once, then the completions) equal the sampler's
    own (KV cache, one token at a time) for every sampled token: GRPO pushes on exactly what
    was drawn, and on-policy rho = 1 is the truth, not an assumption."""
    import data
    import model as M
    import sample
    tok = data.build_tiny_tokenizer()
    m = M.Qwen2_5_VL(data.tiny_config(tok, num_hidden_layers=2, vision_depth=1, fullatt_block_indexes=[0])).init_weights(std=0.2, seed=1)
    recs = data.synth_records(3, "easy", seed=0, image_size=56)
    encs = [data.encode_prompt(tok, data.format_question(r), r["images"]) for r in recs]
    # a random model never says <|im_end|>: stop on any of 40 ids instead, so rows end at different lengths
    s = sample.generate(m, encs, n=2, max_new_tokens=12, temperature=1.0, seed=0, tokenizer=tok, pad_id=0,
                        stop_ids=list(range(100, 140)))
    items = grpo.build_sequences(encs, s)
    with torch.no_grad():
        lp, _ = grpo.completion_logps(m, items, 0)
    drawn = torch.cat([s.logprobs[r, :int(s.lengths[r])] for r in range(len(items))])
    assert lp.shape == drawn.shape and len(set(s.lengths.tolist())) > 1  # ragged rows, right-padded
    assert torch.allclose(lp, drawn, atol=1e-4)

# -----------------------------------------------------------------------------
# the loop: one process against two, and learning


import json
import os
import subprocess
import sys

import data
import dist_grpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD_ROWS = 16  # rows of the conftest `world` fixture's data file
# 2 rollouts of 4 prompts x G=4; 2 optimizer steps per rollout (so logp_old is recomputed and the
# second step is off-policy), micro-batches of 2 rows (accumulation), KL on
LOOP = ["--steps", "2", "--group-size", "4", "--prompts-per-rollout", "4", "--prompts-per-step", "2",
        "--micro-batch", "2", "--max-new-tokens", "8", "--eval-every", "0", "--lr", "3e-3", "--beta", "0.05",
        "--save-every", "2", "--no-compile", "--device", "cpu"]  # compiled decode: tests/test_sample.py


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


VARIANTS = {  # the objective's fixes, on together (--overlong mask would leave nothing to train
    # on here: a random model never ends a completion; GSPO's ratio with the wider token clip range,
    # so that some tokens are clipped and some not)
    "default": [],
    "variants": ["--dynamic-sampling", "--loss-agg", "constant", "--no-std", "--tis-cap", "2", "--overlong",
                 "penalty", "--ratio", "sequence", "--clip-low", "0.2", "--clip-high", "0.3"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_processes_fsdp_equal_one_process(world, variant):
    """Same rollouts (the sampler's draws depend on prompt keys, not on ranks), same update:
    FSDP2 on 2 ranks (gloo) == 1 process, after 2 rollouts x 2 optimizer steps; with each
    variant of the objective too (dynamic sampling on a 0/1 reward, so groups without signal
    are redrawn)."""
    args = ["--model", world["model"], "--data", world["data"], *LOOP, *VARIANTS[variant]]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    if "--dynamic-sampling" in args:
        env["DIST_GRPO_REWARD"] = "binary"
    out1, out2 = str(world["root"] / variant / "one"), str(world["root"] / variant / "two")
    worker = os.path.join(ROOT, "tests", "dist_grpo.py")
    p1 = subprocess.run([sys.executable, worker, *args, "--out", out1], env=env, capture_output=True, text=True, timeout=300)
    assert p1.returncode == 0, p1.stderr[-4000:]
    p2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker,
                         *args, "--out", out2], env=env, capture_output=True, text=True, timeout=300)
    assert p2.returncode == 0, p2.stdout[-2000:] + p2.stderr[-6000:]
    m1, m2 = metrics(out1), metrics(out2)
    assert [m["step"] for m in m1] == [m["step"] for m in m2] == [1, 2]
    assert [m["draws"] for m in m1] == [m["draws"] for m in m2]
    if "--dynamic-sampling" in args:
        assert max(m["draws"] for m in m1) > 1                           # a redraw happened
    for a, b in zip(m1, m2):
        assert a["reward"] == pytest.approx(b["reward"], rel=1e-6)       # the same completions
        assert a["response_length"] == b["response_length"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-7)
        fam = {k: v for k, v in a.items() if k.startswith("accuracy_")}
        assert fam and fam == {k: v for k, v in b.items() if k.startswith("accuracy_")}  # summed over ranks
    base, w1, w2 = weights(world["model"]), weights(out1), weights(out2)
    moved = max((w1[k] - base[k]).abs().max().item() for k in base)
    assert moved > 1e-4                                                   # the update is real
    err = max((w1[k] - w2[k]).abs().max().item() for k in w1) / max(v.abs().max().item() for v in w1.values())
    assert err <= 1e-5


@pytest.mark.parametrize("flag, dtype", [("--bf16", torch.bfloat16), ("--no-bf16", torch.float32)])
def test_one_process_bf16_computes_in_bf16(world, tmp_path, monkeypatch, flag, dtype):
    """--bf16 without FSDP: the policy's update pass runs under autocast (bf16 activations),
    while its weights and the saved model stay fp32."""
    seen, real = set(), grpo.completion_logps

    def spy(model, items, pad_id, with_entropy=False):
        h = model.lm_head.register_forward_hook(lambda mod, inp, out: seen.add(out.dtype) if with_entropy else None)
        try:
            return real(model, items, pad_id, with_entropy)
        finally:
            h.remove()
    monkeypatch.setattr(grpo, "completion_logps", spy)
    grpo.main(["--model", world["model"], "--data", world["data"], "--out", str(tmp_path), "--steps", "1",
               *LOOP[2:-2], "--device", "cpu", flag])
    assert seen == {dtype}
    assert all(v.dtype == torch.float32 for v in weights(tmp_path).values())


def test_learning_raises_the_reward(world, tmp_path, monkeypatch):
    """30 rollouts on the dense toy reward (share of ASCII letters, tests/dist_grpo.py): the mean
    reward of the last 5 rollouts beats the first 5's by a clear margin."""
    monkeypatch.setattr(grpo.reward, "accuracy_reward", dist_grpo.letter_share)
    grpo.main(["--model", world["model"], "--data", world["data"], "--out", str(tmp_path), "--steps", "30",
               "--group-size", "8", "--prompts-per-rollout", "4", "--prompts-per-step", "4",
               "--max-new-tokens", "8", "--eval-every", "0", "--save-every", "1000", "--lr", "1e-2",
               "--beta", "0.0", "--device", "cpu", "--seed", "0"])
    r = [m["reward"] for m in metrics(tmp_path)]
    first, last = sum(r[:5]) / 5, sum(r[-5:]) / 5
    assert last > first + 0.2, (first, last)
    assert all(m["signal_frac"] > 0 for m in metrics(tmp_path)[:5])


def test_compile_by_default_where_a_cpu_has_a_compiler(monkeypatch):
    """--compile's default: on a CPU with inductor's C++ compiler ($CXX, else g++), else off."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setenv("CXX", "sh")  # a program every machine has
    assert grpo.sample.compile_by_default(cpu) and not grpo.sample.compile_by_default(cuda)
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert not grpo.sample.compile_by_default(cpu)


@pytest.mark.parametrize("flag,want", [([], None), (["--no-compile"], False), (["--compile"], True)])
def test_compile_flag_reaches_every_sampling_call(world, tmp_path, monkeypatch, flag, want):
    """GRPO's rollouts and its held-out checks sample through the compiled decode step as
    --[no-]compile says, by default where compile_by_default says (the conftest's stand-in
    forward spares the compile itself)."""
    want = grpo.sample.compile_by_default(torch.device("cpu")) if want is None else want
    seen, real = [], grpo.sample.generate

    def spy(*args, **kw):
        seen.append(kw["compile"])
        return real(*args, **kw)
    monkeypatch.setattr(grpo.sample, "generate", spy)
    grpo.main(["--model", world["model"], "--data", world["data"], "--out", str(tmp_path), "--steps", "1",
               "--group-size", "2", "--prompts-per-rollout", "2", "--prompts-per-step", "2", "--max-new-tokens", "4",
               "--eval-every", "1", "--eval-n", "2", "--device", "cpu", *flag])
    assert len(seen) >= 2 and set(seen) == {want}


def test_family_sums_by_hand():
    acc = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    fams = ["bars", "bars", "count", None, "count"]
    got = grpo.family_sums(acc, fams)
    want = {"bars": [1, 2], "count": [1, 2]}
    for i, name in enumerate(grpo.data.FAMILIES):
        assert got[i].tolist() == want.get(name, [0, 0])


def test_synthetic_prompt_pool(world, tmp_path, monkeypatch):
    """Without --data: --n-train synthetic problems of --level (data seed 1), accuracy logged per family."""
    seen = []
    real = grpo.data.synth_records

    def spy(n, level, seed, **kw):
        recs = real(n, level, seed, image_size=56, **kw)
        seen.append((n, level, seed))
        return recs
    monkeypatch.setattr(grpo.data, "synth_records", spy)
    grpo.main(["--model", world["model"], "--n-train", "6", "--level", "easy", "--steps", "1", "--group-size", "2",
               "--prompts-per-rollout", "4", "--prompts-per-step", "4", "--max-new-tokens", "4",
               "--eval-every", "0", "--device", "cpu", "--out", str(tmp_path)])
    assert seen == [(6, "easy", 1)]
    logged = {k for k in metrics(tmp_path)[0] if k.startswith("accuracy_")}
    assert logged == {"accuracy_count", "accuracy_bars", "accuracy_table", "accuracy_geometry"}


@pytest.mark.cuda
def test_cuda_bf16_short_run(world, tmp_path, monkeypatch):
    """grpo.py on CUDA with bf16 compute (the path a real run takes)."""
    monkeypatch.setattr(grpo.reward, "accuracy_reward", dist_grpo.letter_share)
    grpo.main(["--model", world["model"], "--data", world["data"], "--out", str(tmp_path), *LOOP[:-2],
               "--device", "cuda", "--bf16"])
    m = metrics(tmp_path)
    assert [x["step"] for x in m] == [1, 2] and all(math.isfinite(x["loss"]) for x in m)
    w = weights(tmp_path)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in w.values())
