"""
The demo's actors and its staircase: the captions the base learns, its direct answers, the text
reasoner's R1-style data and its faults, the filters' counts on a known set, and a miniature
staircase whose every stage loads and is reported.
"""

import json
import os
import random

import pytest
import torch

import data
import grpo
import reward
import sample
import sft


def test_captions_by_hand():
    count = {"shapes": [dict(color="red", kind="circle"), dict(color="red", kind="square"),
                        dict(color="blue", kind="square")]}
    assert data.caption_text("count", count) == "red 2 green 0 blue 1. circle 1 square 2 triangle 0."
    bars = {"bars": [dict(color="yellow", value=2, col=0), dict(color="red", value=5, col=2)], "max": 6}
    assert data.caption_text("bars", bars) == "red 5 yellow 2."
    table = {"cells": [[1, 4], [3, 2]], "colors": ["blue", "red"]}
    assert data.caption_text("table", table) == "the red column: 4 2. the blue column: 1 3."
    assert data.caption_text("geometry", dict(shape="rect", a=3, b=5)) == "rectangle w 3 h 5."
    assert data.caption_text("geometry", dict(shape="tri", a=4, b=6)) == "triangle legs 4 6."


def test_a_caption_holds_what_every_trace_reads():
    """The trace's reading (its first sentence) is in the caption, so a reasoner that sees only
    the caption has what the image gave; and the caption is the same for any question asked."""
    for p in data.make_split(200, "mix", 5, image_size=28):
        cap = data.caption_text(p["family"], p["scene"])
        think, _, _ = data.split_trace(p["solution"])
        reading = think.split(". ")[0].rstrip(".") + "."
        reading = reading.replace("w ", "rectangle w ", 1) if reading.startswith("w ") else reading
        reading = reading.replace("legs ", "triangle legs ", 1) if reading.startswith("legs ") else reading
        assert reading in cap, (p["solution"], cap)


def test_base_rows_are_captions_and_direct_answers():
    rows = data.base_records(12, "mix", 0, image_size=28)
    caps, direct = rows[0::2], rows[1::2]
    assert len(caps) == len(direct) == 12
    for c, r in zip(caps, direct):
        assert c["question"] == data.CAPTION_PROMPT and c["solution"] == c["answer"]
        assert c["images"] == r["images"] and c["id"] != r["id"]
        assert "<think>" not in r["solution"] and r["solution"].endswith(f"<answer>{r['answer']}</answer>")
        assert r["solution"].startswith("The ")
    assert not any("<think>" in x["solution"] for x in rows)


def test_reasoner_prompt_is_the_one_sample_py_builds(tmp_path):
    """The reasoner learns on the prompt that sample.py --task reason gives it at inference: the
    same token ids, the caption and the question (with its options) in REASON_TEMPLATE."""
    tok = data.build_tiny_tokenizer()
    rows = data.reasoner_records(8, "easy", 0, faults=dict(reflect=0, ramble=0, wrong=0))
    probs = data.make_split(8, "easy", 0, split="reason", image_size=28)
    assert any(p.get("choices") for p in probs + data.make_split(40, "easy", 0, split="reason", image_size=28))
    for r, p in zip(rows, probs):
        assert r["images"] == [] and r["solution"] == p["solution"]
        rec = dict(id=p["id"], question=p["question"], choices=p.get("choices"), source="x",
                   meta=dict(caption=data.caption_text(p["family"], p["scene"])))
        at_inference = sample.reason_prompt(tok, data.REASON_TEMPLATE, rec)
        trained = data.encode_sft(tok, data.format_question(r), r["solution"], [])
        n = len(tok(at_inference, add_special_tokens=False)["input_ids"])
        assert trained["input_ids"][:n].tolist() == tok(at_inference, add_special_tokens=False)["input_ids"]
        assert (trained["labels"][:n] == data.IGNORE_INDEX).all() and (trained["labels"][n:] != data.IGNORE_INDEX).all()


def test_r1_faults_by_hand():
    clean = "<think>the blue column: 3 1 2. 3+1=4 4+2=6.</think> The sum is 6. <answer>6</answer>"
    always = lambda k: {**dict(reflect=0, ramble=0, wrong=0, option=0), k: 1.0}
    rng = random.Random(0)
    assert data.r1_trace(clean, "6", ("7", "7"), rng, always("reflect")) == (
        "<think>the blue column: 3 1 2. 3+1=4 4+2=6. Wait, let me check. 3+1=4 4+2=6.</think> The sum is 6. "
        "<answer>6</answer>")
    assert data.r1_trace(clean, "6", ("5", "5"), rng, always("wrong")) == (
        "<think>the blue column: 3 1 2. so 5.</think> The sum is 5. <answer>5</answer>")
    long = data.r1_trace(clean, "6", ("5", "5"), rng, always("ramble"))
    assert data.n_words(long) > data.MAX_WORDS and long.endswith("</think> The sum is 6. <answer>6</answer>")
    mc = "<think>w 3 h 5. 3*5=15. A 8 vs 15 no. B 15 vs 15 yes.</think> The area is 15. <answer>B</answer>"
    assert data.r1_trace(mc, "15", ("8", "A"), rng, always("wrong")) == (
        "<think>w 3 h 5. so 8.</think> The area is 8. <answer>A</answer>")
    # option: the work, no option checked, the value for the letter (the scorer takes either)
    assert data.r1_trace(mc, "15", ("8", "A"), rng, always("option")) == (
        "<think>w 3 h 5. 3*5=15.</think> The area is 15. <answer>15</answer>")
    assert data.r1_trace(clean, "6", ("5", "5"), rng, always("option")) == clean  # not multiple choice
    assert data.r1_trace(clean, "6", ("5", "5"), rng, dict(reflect=0, ramble=0, wrong=0)) == clean


def test_reasoner_fault_rates_and_the_filters_counts():
    """On the reasoner's own training targets, data.py traces does the paper's work: drops the
    wrong ones and the over-long ones, cuts the reflections, keeps the rest as the clean trace."""
    rows = data.reasoner_records(1000, "mix", 1)
    probs = data.make_split(1000, "mix", 1, split="reason", image_size=28)
    recs = [dict(r, meta=dict(r["meta"], traces=[dict(text=r["solution"], finished=True)])) for r in rows]
    kept, c = data.traces_to_sft(recs, max_words=data.MAX_WORDS)
    final = lambda r: data.split_trace(r["solution"])[2]
    # the option habit: 20% of the ~125 multiple-choice rows answer with the value
    by_value = [r for r in rows if r.get("choices") and final(r) in r["choices"]]
    assert 10 <= len(by_value) <= 45 and all(reward.accuracy_reward(r["solution"], r["answer"], r["choices"])
                                            for r in by_value if "so " not in r["solution"])
    wrong = sum(not reward.accuracy_reward(r["solution"], r["answer"], r.get("choices")) for r in rows)
    assert c["wrong"] == wrong and 60 <= wrong <= 140                      # ~10%
    rambles = sum(r["solution"].count("check again") > 0 for r in rows)
    assert 60 <= rambles <= 140 and c["too_long"] >= rambles               # ~10%, plus long reflections
    assert 150 <= c["cut"] <= 300                                           # ~25% reflect, minus the long ones
    assert c["kept"] == len(kept) == 1000 - c["wrong"] - c["too_long"]
    clean = {p["id"]: p["solution"] for p in probs}
    habit = {r["id"] for r in by_value}
    assert all(k["solution"] == clean[k["id"]] for k in kept if k["id"] not in habit)  # the clean trace
    assert any(k["id"] in habit for k in kept)


def fake_sampler(real):
    """sample.main, except that --task reason and --task distill write each record's gold trace
    k times: a miniature run's random models never write a correct one."""
    def run(args):
        a = dict(zip(args[::2], args[1::2]))
        if a["--task"] not in ("reason", "distill"):
            return real(args)
        records, _ = data.load_records(a["--data"])
        k = int(a.get("--n", 1))
        rows = [data.record_row(r, traces=[dict(text=r["solution"], finished=True)] * k) for r in records]
        data.write_jsonl(a["--out"], rows)
    return run


MINI = dict(base_n=8, base_steps=2, reasoner_n=8, reasoner_steps=2, pool=8, k=2, sft1_steps=2, grpo_n=8,
            grpo1_steps=1, grpo2_steps=1, n_distill=8, k2=2, sft2_steps=2, test_n=8,
            grpo_flags=["--prompts-per-rollout", "2", "--prompts-per-step", "2", "--group-size", "2",
                        "--max-new-tokens", "8"])


def test_miniature_staircase(tmp_path, monkeypatch):
    monkeypatch.setattr(sample, "main", fake_sampler(sample.main))
    monkeypatch.setattr(grpo, "MAX_NEW", 8)
    root = str(tmp_path / "runs")
    rows = grpo.staircase(root, sizes=MINI)
    with open(os.path.join(root, "staircase.json")) as f:
        assert json.load(f) == rows
    assert list(rows) == ["base", "reasoner", "SFT1", "GRPO1", "SFT2", "GRPO2"]
    for name in rows:
        out = os.path.join(root, name.lower())
        m = grpo.M.load_model(out)
        assert (m.config.vision is None) == (name == "reasoner")
        assert name == "reasoner" or (0 <= rows[name]["accuracy"] <= 1 and len(rows[name]["correct"]) == 8)
    assert rows["SFT1"]["kept"] == 8 and rows["SFT1"]["filters"]["kept"] == 8
    assert rows["SFT1"]["wrong_caption"] == 8  # a random base captions nothing right
    md = open(os.path.join(root, "staircase.md")).read()
    assert all(f"| {n} |" in md for n in ("base", "SFT1", "GRPO1", "SFT2", "GRPO2")) and "| reasoner |" not in md
    from PIL import Image
    assert Image.open(os.path.join(root, "staircase.png")).size == (560, 360)
    # a rerun finds every stage done and trains nothing
    monkeypatch.setattr(sft, "train", lambda args: pytest.fail("a finished stage ran again"))
    assert grpo.staircase(root, sizes=MINI) == rows


def test_staircase_compile_reaches_every_sampler():
    """--staircase --compile: every command that samples (sample.py, grpo.py) gets --compile, no other."""
    for compile in (False, True):
        lines = [line for _, _, cmds in grpo.staircase_stages("r", 0, grpo.DEMO, compile) for line, _ in cmds]
        samplers = [line.startswith(("python sample.py", "python grpo.py")) for line in lines]
        assert sum(samplers) == 5 and [("--compile" in line) for line in lines] == [compile and x for x in samplers]


def test_staircase_levels_and_rollouts_are_each_stages_own():
    """The SFT pools, GRPO1 and GRPO2 each get their own level and GRPO its own rollouts."""
    c = dict(grpo.DEMO, sft_level="hard", grpo1_level="easy", grpo2_level="mix", grpo1_steps=7, grpo2_steps=9)
    lines = {name: [line for line, _ in cmds] for name, _, cmds in grpo.staircase_stages("r", 0, c)}
    level = lambda line: line.split("--level ")[1].split()[0]
    assert [level(lines[n][0]) for n in ("SFT1", "GRPO1", "SFT2", "GRPO2")] == ["hard", "easy", "hard", "mix"]
    assert " --steps 7 " in lines["GRPO1"][0] + " " and " --steps 9 " in lines["GRPO2"][0] + " "
    assert lines["SFT2"][1].startswith("python sample.py --task distill --model r/grpo1 --data r/distill/data.jsonl")


def test_paired_step_by_hand():
    a, b = dict(correct=[1, 0, 0, 1]), dict(correct=[1, 1, 0, 0])
    step, se = grpo.paired_step(a, b)
    assert step == 0.0 and se == pytest.approx(100 * (2 / 3 / 4) ** 0.5)  # diffs 0, 1, 0, -1


def test_grpo_without_its_start_model_builds_it(world, tmp_path, monkeypatch):
    """`python grpo.py` on a fresh clone: no runs/sft1 yet, so it says so and builds the stages
    before GRPO1 with the staircase (until SFT1; its sampling compiled by default on a CPU), then
    trains from what they made."""
    import shutil
    monkeypatch.chdir(tmp_path)
    calls = []

    def built(root="runs", seed=0, until=None, sizes=None, compile=False):
        calls.append((root, seed, until, compile))
        shutil.copytree(world["model"], "runs/sft1")
        with open("runs/staircase.json", "w") as f:
            json.dump({"SFT1": {}}, f)
    monkeypatch.setattr(grpo, "staircase", built)
    real = data.synth_records
    monkeypatch.setattr(grpo.data, "synth_records", lambda n, level, seed: real(4, level, seed, image_size=56))
    grpo.main(["--steps", "1", "--group-size", "2", "--prompts-per-rollout", "2", "--prompts-per-step", "2",
               "--max-new-tokens", "4", "--eval-every", "0", "--device", "cpu"])
    on = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert calls == [("runs", 0, "SFT1", sample.compile_by_default(on))]
    assert os.path.exists("runs/grpo1/model.safetensors")
