"""Tests of the synthetic visual-reasoning world (data.py synth)."""
import hashlib
import json
import os
import random
import re

import pytest

import data as S

TRACE = re.compile(r"^<think>([^<>]+)</think> ([^<>]+) <answer>([^<>]+)</answer>$")


def read_dir(d):
    """{relative path: bytes} of every file under d."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, d)] = open(p, "rb").read()
    return out


def load(d):
    with open(os.path.join(d, "data.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def expected(rec):
    """The record's answer recomputed from the scene alone (a letter for multiple choice)."""
    value = S.answer_from_scene(rec["family"], rec["scene"], rec["kind"])
    return "ABCD"[rec["choices"].index(value)] if "choices" in rec else value


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    return d, S.write_split(str(d), 120, "mix", 0)


def test_same_seed_byte_identical(tmp_path):
    S.write_split(str(tmp_path / "a"), 24, "mix", 3)
    S.write_split(str(tmp_path / "b"), 24, "mix", 3)
    a, b = read_dir(tmp_path / "a"), read_dir(tmp_path / "b")
    assert len(a) == 25 and a == b


def test_different_seeds_differ(tmp_path):
    S.write_split(str(tmp_path / "a"), 16, "easy", 0)
    S.write_split(str(tmp_path / "b"), 16, "easy", 1)
    ra, rb = load(tmp_path / "a"), load(tmp_path / "b")
    assert [r["scene"] for r in ra] != [r["scene"] for r in rb]
    pa = {r["image"]: open(tmp_path / "a" / r["image"], "rb").read() for r in ra}
    pb = {r["image"]: open(tmp_path / "b" / r["image"], "rb").read() for r in rb}
    assert not set(pa.values()) & set(pb.values())


def test_records_and_images(mixed):
    d, recs = mixed
    assert load(d) == recs
    assert {r["family"] for r in recs} == set(S.FAMILIES)
    assert {(r["family"], r["level"]) for r in recs} == {(f, l) for f in S.FAMILIES for l in S.LEVELS}
    from PIL import Image
    for r in recs[:8]:
        im = Image.open(os.path.join(d, r["image"]))
        assert im.mode == "RGB" and im.size == (S.IMAGE_SIZE, S.IMAGE_SIZE)
    for r in recs:
        assert set(r) >= {"id", "image", "question", "answer", "solution", "family", "level", "scene"}
        json.dumps(r["scene"])  # the scene is plain JSON
        assert len(r["question"]) < 60


def test_answers_match_scene(mixed):
    _, recs = mixed
    kinds = set()
    for r in recs:
        assert r["answer"] == expected(r), r
        kinds.add((r["family"], r["kind"].split("=")[0]))
        if "choices" in r:
            assert 2 <= len(r["choices"]) <= 4 and len(set(r["choices"])) == len(r["choices"])
    # every question kind of every family shows up
    assert kinds >= {("count", "color"), ("count", "kind"), ("bars", "tallest"), ("bars", "shortest"),
                     ("bars", "value"), ("table", "col_sum"), ("table", "col_max"),
                     ("geometry", "area"), ("geometry", "perimeter")}
    assert any("choices" in r for r in recs) and any("choices" not in r for r in recs)


def test_answer_from_scene_by_hand():
    shapes = [dict(color="red", kind="circle"), dict(color="red", kind="square"),
              dict(color="blue", kind="circle")]
    assert S.answer_from_scene("count", {"shapes": shapes}, "color=red") == "2"
    assert S.answer_from_scene("count", {"shapes": shapes}, "kind=circle") == "2"
    assert S.answer_from_scene("count", {"shapes": shapes}, "color=green") == "0"
    bars = {"bars": [dict(color="red", value=3), dict(color="green", value=5), dict(color="blue", value=1)]}
    assert S.answer_from_scene("bars", bars, "tallest") == "green"
    assert S.answer_from_scene("bars", bars, "shortest") == "blue"
    assert S.answer_from_scene("bars", bars, "value=red") == "3"
    table = {"cells": [[1, 2, 3], [4, 5, 6]]}
    assert S.answer_from_scene("table", table, "col_sum=2") == "7"
    assert S.answer_from_scene("table", table, "col_sum=3") == "9"
    assert S.answer_from_scene("table", table, "col_max=1") == "4"
    assert S.answer_from_scene("geometry", {"shape": "rect", "a": 4, "b": 3}, "area") == "12"
    assert S.answer_from_scene("geometry", {"shape": "rect", "a": 4, "b": 3}, "perimeter") == "14"
    assert S.answer_from_scene("geometry", {"shape": "tri", "a": 4, "b": 3}, "area") == "6"


def test_trace_shape(mixed):
    _, recs = mixed
    for r in recs:
        m = TRACE.match(r["solution"])
        assert m, r["solution"]
        assert m.group(3) == r["answer"]
        assert 40 <= len(r["solution"]) <= 170, r["solution"]


def test_traces_score_full_reward(mixed):
    reward = pytest.importorskip("reward")
    if not (hasattr(reward, "accuracy_reward") and hasattr(reward, "format_reward")):
        pytest.skip("reward.py has no accuracy_reward/format_reward yet")
    _, recs = mixed
    for r in recs:
        assert reward.accuracy_reward(r["solution"], r["answer"]) == 1.0, r
        assert reward.format_reward(r["solution"]) == 1.0, r


def test_levels_differ_in_difficulty():
    # hard = more objects and longer listings in the same trace grammar and the same numbers
    easy, hard = S.LEVELS["easy"], S.LEVELS["hard"]
    assert easy["count_n"][1] < hard["count_n"][0]
    assert easy["bars_n"][1] < hard["bars_n"][1] and easy["bars_max"] == hard["bars_max"]
    assert max(r * c for r, c in easy["table_shapes"]) < min(r * c for r, c in hard["table_shapes"])
    assert easy["side"][1] < hard["side"][1]
    # the second iteration's room: one more bar, one more row than any easy problem has
    assert hard["bars_n"][0] == easy["bars_n"][1] + 1
    assert min(r for r, _ in hard["table_shapes"]) == max(r for r, _ in easy["table_shapes"]) + 1
    t = S.make_problem("table", "hard", random.Random(3))
    assert len(t["solution"].split(" column: ")[1].split(".")[0].split()) == 4, t["solution"]
    rng = random.Random(0)
    for level, p in S.LEVELS.items():
        for _ in range(20):
            s = S.make_problem("count", level, rng)["scene"]
            assert p["count_n"][0] <= len(s["shapes"]) <= p["count_n"][1]
            s = S.make_problem("bars", level, rng)["scene"]
            assert p["bars_n"][0] <= len(s["bars"]) <= p["bars_n"][1]
            assert max(b["value"] for b in s["bars"]) <= p["bars_max"]
            assert [b["col"] for b in s["bars"]] == sorted({b["col"] for b in s["bars"]})  # left to right
            s = S.make_problem("table", level, rng)["scene"]
            assert (len(s["cells"]), len(s["cells"][0])) in p["table_shapes"]
            assert s["r0"] + len(s["cells"]) <= 4 and s["c0"] + len(s["cells"][0]) <= 4  # on the token grid
            s = S.make_problem("geometry", level, rng)["scene"]
            assert p["side"][0] <= min(s["a"], s["b"]) and max(s["a"], s["b"]) <= p["side"][1]


def test_test_split_disjoint_from_train(tmp_path):
    n = 80
    test = S.write_test_split(str(tmp_path / "test"), n=n)
    train = S.write_split(str(tmp_path / "train"), n, "mix", 0)
    assert {r["level"] for r in test} == {"easy", "hard"}
    assert not {r["id"] for r in test} & {r["id"] for r in train}

    def keys(d, recs):
        return {(r["question"], hashlib.sha256(open(os.path.join(d, r["image"]), "rb").read()).hexdigest())
                for r in recs}
    assert not keys(tmp_path / "test", test) & keys(tmp_path / "train", train)
    # record i of the test split does not depend on n
    assert S.write_test_split(str(tmp_path / "test2"), n=8) == test[:8]


def test_image_size_and_families(tmp_path):
    recs = S.write_split(str(tmp_path), 4, "hard", 5, families=["table"], image_size=224)
    from PIL import Image
    assert {r["family"] for r in recs} == {"table"}
    assert Image.open(tmp_path / recs[0]["image"]).size == (224, 224)


def test_cli(tmp_path):
    S.synth_main(["synth", "--out", str(tmp_path), "--n", "6", "--level", "hard", "--seed", "2"])
    recs = load(tmp_path)
    assert len(recs) == 6 and [r["family"] for r in recs] == list(S.FAMILIES) + ["count", "bars"]
    assert {r["level"] for r in recs} == {"hard"}
    with pytest.raises(SystemExit):  # families are chosen in Python (families=), not on the CLI
        S.synth_main(["--out", str(tmp_path), "--families", "count"])


def test_table_tallies_and_column_colours_match_the_scene():
    """A cell holding v shows v squares, one per 14x14 patch, in its column's colour; the question
    names the column by that colour, and the trace reads that column top to bottom."""
    rng = random.Random(3)
    for level in S.LEVELS:
        for _ in range(10):
            p = S.make_problem("table", level, rng)
            img, sc = p["image"], p["scene"]
            k = int(p["kind"].split("=")[1]) - 1
            assert f"the {sc['colors'][k]} column" in p["question"]
            col = [row[k] for row in sc["cells"]]
            assert p["solution"].startswith(f"<think>the {sc['colors'][k]} column: {' '.join(map(str, col))}.")
            for r, row in enumerate(sc["cells"]):
                for c, v in enumerate(row):
                    rgb = S.COLORS[sc["colors"][c]]
                    x0, y0 = 28 * (sc["c0"] + c), 28 * (sc["r0"] + r)
                    filled = [any(img.getpixel((x0 + 14 * (q % 2) + i, y0 + 14 * (q // 2) + j)) == rgb
                                  for i in range(14) for j in range(14)) for q in range(4)]
                    assert filled == [q < v for q in range(4)], (r, c, v)


def test_table_trace_names_the_column_with_the_question_token():
    """The trace looks the column up by the question's own token for its colour (" blue"): as the
    trace's first word it was the bare "blue", used nowhere else, and tables fell to 35-77%."""
    tok = S.build_tiny_tokenizer()
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    rng = random.Random(4)
    for level in S.LEVELS:
        for _ in range(10):
            p = S.make_problem("table", level, rng)
            colour = p["scene"]["colors"][int(p["kind"].split("=")[1]) - 1]
            word = tok.convert_tokens_to_ids("Ġ" + colour)  # "Ġblue": " blue" as one token
            assert word in ids(p["question"]) and word in ids(p["solution"])[:4]


def test_bars_read_by_colour_and_compared_one_at_a_time():
    bars = {"bars": [dict(color="yellow", value=2, col=0), dict(color="green", value=5, col=1),
                     dict(color="red", value=3, col=3)], "max": 6}
    q, t = S.text_bars(bars, "tallest", "green")
    assert q == "Which colour is the tallest bar?"
    assert t == ("<think>red 3 green 5 yellow 2. max red 3, green 5 vs 3 green 5, yellow 2 vs 5 green 5."
                 "</think> The tallest is green. <answer>green</answer>")
    _, t = S.text_bars(bars, "shortest", "yellow")
    assert "min red 3, green 5 vs 3 red 3, yellow 2 vs 3 yellow 2." in t
    _, t = S.text_bars(bars, "value=green", "5")
    assert t.startswith("<think>red 3 green 5 yellow 2. green is 5.</think>")


def test_multiple_choice_geometry_checks_options_in_order():
    sc = {"shape": "rect", "a": 4, "b": 3, "dx": 0, "dy": 0}
    _, t = S.text_geometry(sc, "perimeter", "14", ["10", "12", "14", "7"])
    assert t == ("<think>w 4 h 3. 4+3=7 2*7=14. A 10 vs 14 no. B 12 vs 14 no. C 14 vs 14 yes.</think> "
                 "The perimeter is 14. <answer>C</answer>")
