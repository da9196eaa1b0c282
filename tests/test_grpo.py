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


def test_token_mean_vs_sequence_mean():
    # two completions: 3 tokens with A=1, 1 token with A=-1, at ratio 1 (pg = -A per token)
    logp = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0])
    seq_len = torch.tensor([3.0, 3.0, 3.0, 1.0])
    tok, _ = grpo.grpo_loss(logp, logp, None, adv, torch.tensor(4.0), beta=0.0)
    seq, _ = grpo.grpo_loss(logp, logp, None, adv, torch.tensor(2.0), beta=0.0, seq_mean=True, seq_len=seq_len)
    assert tok.item() == pytest.approx((-3 + 1) / 4)           # token-mean: -0.5
    assert seq.item() == pytest.approx(((-1) + (1)) / 2)       # mean per completion (-1, +1), then mean: 0


def test_padding_does_not_change_logps():
    """The same completion scored alone and inside a right-padded batch with a longer row."""
    import data
    import model as M
    tok = data.build_tiny_tokenizer()
    torch.manual_seed(0)
    m = M.Qwen2_5_VL(data.tiny_config(tok, num_hidden_layers=1, vision_depth=1, fullatt_block_indexes=[0])).init_weights(std=0.2)
    from PIL import Image
    encs = [data.encode_prompt(tok, q, [Image.new("RGB", (56, 56), c)]) for q, c in [("a?", "red"), ("longer q?", "blue")]]
    comps = [torch.tensor([10, 11, 12]), torch.tensor([20, 21, 22, 23, 24, 25, 26])]
    items = [dict(input_ids=torch.cat([e["input_ids"], c]), pixel_values=e["pixel_values"], image_grid_thw=e["image_grid_thw"],
                  n_prompt=len(e["input_ids"]), n_comp=len(c)) for e, c in zip(encs, comps)]
    with torch.no_grad():
        b1, m1, t1 = grpo.collate_rows(items[:1], 0)
        lp_alone, _ = grpo.token_logps(m, b1, m1, t1)
        b2, m2, t2 = grpo.collate_rows(items, 0)
        lp_batch, _ = grpo.token_logps(m, b2, m2, t2)
    assert torch.equal(t1, comps[0])
    assert torch.allclose(lp_alone, lp_batch[:3], atol=1e-5)
    assert lp_batch.shape == (10,)
