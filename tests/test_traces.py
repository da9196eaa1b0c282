"""data.py's trace filters (the first SFT set) on hand-written R1 traces: over-long traces dropped,
"Wait," reflections cut with the answer kept, wrong answers dropped, the shortest correct kept,
unfinished / malformed traces dropped, and the `traces` command's output read back as SFT data."""

import json

import pytest
from PIL import Image

import data
import reward


def rec(answer="6", choices=None, id="r0"):
    return dict(id=id, images=[], question="How many red shapes?", choices_in_question=False,
                answer=answer, choices=choices, solution=None, meta={}, source="t.jsonl:1")


def tr(text, finished=True):
    return dict(text=text, length=len(text), finished=finished)


GOOD = "<think>\nThere are 2 red circles and 4 red squares, so 2 + 4 = 6.\n</think>\n\nThere are 6 red shapes. \\boxed{6}"


def test_over_long_trace_dropped():
    long = "<think>\n" + "count again " * 300 + "so 6.\n</think>\n\n\\boxed{6}"  # 600+ words
    sol, _, c = data.filter_traces(rec(), [tr(long)])
    assert sol is None and c["too_long"] == 1 and c["kept"] == 0
    sol, _, c = data.filter_traces(rec(), [tr(long)], max_words=1000)
    assert sol is not None and c["kept"] == 1
    # the cap is on words, not characters: 500 words pass, 501 do not
    words = lambda n: "<think>" + "x " * (n - 3) + "so 6</think> \\boxed{6}"
    assert data.n_words(words(500)) == 500  # tags are not words
    assert data.filter_traces(rec(), [tr(words(500))])[0] is not None
    assert data.filter_traces(rec(), [tr(words(501))])[2]["too_long"] == 1


def test_wait_reflection_cut_and_answer_kept():
    text = ("<think>\nI see 2 red circles and 4 red squares. 2 + 4 = 6, so there are 6 red shapes. "
            "Wait, let me double-check the squares. One, two, three, four. But wait, is the third one "
            "orange? No, it is red. So 6.\n</think>\n\nThe image has 6 red shapes.\n\n\\boxed{6}")
    sol, cut, c = data.filter_traces(rec(), [tr(text)])
    assert cut and c["kept"] == 1
    assert sol == ("<think>I see 2 red circles and 4 red squares. 2 + 4 = 6, so there are 6 red "
                   "shapes.</think> The image has 6 red shapes. <answer>6</answer>")
    assert "Wait" not in sol and "double-check" not in sol
    assert reward.accuracy_reward(sol, "6") == 1.0 and reward.format_reward(sol) == 1.0


def test_reflection_before_the_answer_is_not_cut():
    # the reflection found the answer: cutting there would leave reasoning without it
    text = ("<think>I count 5 red shapes. Wait, there is one more behind the square, so 6. "
            "But the question asks only for red ones; all 6 are red.</think> \\boxed{6}")
    sol, cut, _ = data.filter_traces(rec(), [tr(text)])
    assert cut  # cut at "But the question", the first marker after "6" first appears
    assert sol == "<think>I count 5 red shapes. Wait, there is one more behind the square, so 6.</think> <answer>6</answer>"
    no_answer_in_think = "<think>Let me see. Wait, the shapes are small. Counting them.</think> So \\boxed{6}."
    sol, cut, _ = data.filter_traces(rec(), [tr(no_answer_in_think)])
    assert not cut and "Wait, the shapes are small" in sol
    # "6" inside "16" or "6.5" is no mention of the answer
    assert data.answer_mention("there are 16 or 6.5", {"6"}) is None
    assert data.answer_mention("there are 16 or 6 here", {"6"}) == len("there are 16 or 6")


def test_multiple_choice_mentions():
    r = rec(answer="B", choices=["3", "5", "8"])
    text = "<think>The sides are 2 and 3, the perimeter is 5. Wait, or is it the area? No.</think> The answer is (B). \\boxed{B}"
    sol, cut, c = data.filter_traces(r, [tr(text)])
    assert c["kept"] == 1 and cut and sol.startswith("<think>The sides are 2 and 3, the perimeter is 5.</think>")
    assert sol.endswith("<answer>B</answer>")
    # a bare capital letter is no mention of option B
    assert data.answer_mention("By the figure", {"B"}) is None
    assert data.answer_mention("so option B", {"B"}) is not None


def test_wrong_answer_dropped():
    wrong = GOOD.replace("= 6", "= 7").replace("\\boxed{6}", "\\boxed{7}")
    sol, _, c = data.filter_traces(rec(), [tr(wrong)])
    assert sol is None and c["wrong"] == 1
    # multiple choice: the option text counts as the letter, a different option does not
    r = rec(answer="B", choices=["red", "blue", "green"])
    assert data.filter_traces(r, [tr("<think>the tallest is blue</think> \\boxed{blue}")])[0] is not None
    assert data.filter_traces(r, [tr("<think>the tallest is red</think> \\boxed{A}")])[2]["wrong"] == 1


def test_shortest_correct_kept():
    short = "<think>2 + 4 = 6.</think> Six. \\boxed{6}"
    longer = GOOD
    wrong_shorter = "<think>7.</think> \\boxed{7}"
    sol, _, c = data.filter_traces(rec(), [tr(longer), tr(wrong_shorter), tr(short), tr(longer)])
    assert sol == "<think>2 + 4 = 6.</think> Six. 6 <answer>6</answer>"
    assert c == dict(unfinished=0, no_think=0, no_answer=0, too_long=0, wrong=1, not_shortest=2, kept=1)


def test_unfinished_and_malformed_dropped():
    traces = [tr(GOOD, finished=False), tr("There are 6 red shapes. \\boxed{6}"),
              tr("<think>6</think> I do not know.")]
    sol, _, c = data.filter_traces(rec(), traces)
    assert sol is None and (c["unfinished"], c["no_think"], c["no_answer"]) == (1, 1, 1)
    # the opening <think> may be missing (R1-Distill's prompt opens it); <answer> tags work too
    sol, _, _ = data.filter_traces(rec(), [tr("2 + 4 = 6\n</think>\nso <answer>6</answer>")])
    assert sol == "<think>2 + 4 = 6</think> so <answer>6</answer>"  # the span is not repeated


def test_unbox():
    assert data.unbox("so \\boxed{\\frac{1}{2}}.") == "so \\frac{1}{2}."
    assert data.unbox("\\boxed{1} and \\boxed{2}") == "1 and 2"
    assert data.unbox("open \\boxed{3") == "open \\boxed{3"


def test_traces_command_writes_sft_records(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")  # images are checked when read
    rows = [data.record_row(dict(rec(id="a"), images=[str(tmp_path / "img.png")]),
                            caption="two red circles, four red squares",
                            traces=[tr(GOOD), tr("<think>7</think> \\boxed{7}")]),
            data.record_row(rec(id="b"), caption="", traces=[tr("<think>9</think> \\boxed{9}")])]
    data.write_jsonl(tmp_path / "traces.jsonl", rows)
    c = data.main(["traces", "--data", str(tmp_path / "traces.jsonl"), "--out", str(tmp_path / "sft.jsonl")])
    out = capsys.readouterr().out
    assert "3 read, 1 kept" in out and "wrong 2" in out and "1 with a kept trace" in out
    assert c["records_kept"] == 1
    recs, bad = data.load_records(tmp_path / "sft.jsonl")
    assert bad == 0 and [r["id"] for r in recs] == ["a"]
    r = recs[0]
    assert r["images"] == [str(tmp_path / "img.png")] and r["answer"] == "6"
    assert r["solution"].startswith("<think>") and r["solution"].endswith("<answer>6</answer>")
    assert "traces" not in r["meta"] and r["meta"]["caption"].startswith("two red")
    assert r["meta"]["origin"] == "t.jsonl:1"
    # a file without traces is an error naming the line
    data.write_jsonl(tmp_path / "plain.jsonl", [data.record_row(rec())])
    with pytest.raises(SystemExit) as e:
        data.main(["traces", "--data", str(tmp_path / "plain.jsonl"), "--out", str(tmp_path / "x.jsonl")])
    assert e.value.code == 2 and "plain.jsonl:1: key 'traces'" in capsys.readouterr().err


def test_summary_text():
    r1 = "To find the count, add them.\n\n**Final Answer**\nThe answer is $\\boxed{6}$.\n\n$$\n\\boxed{6}\n$$"
    assert data.summary_text(r1) == "To find the count, add them.\n\nThe answer is $6$."
    assert data.summary_text("\\[ \\boxed{\\frac{1}{2}} \\]\n<answer>1/2</answer>") == ""  # the answer goes in <answer>, once
    assert data.summary_text("$$\n2 + 4 = 6\n$$\n\\[\n\\boxed{6}\n\\]") == "$$\n2 + 4 = 6\n$$"
    two = "$$\na\n$$\n$$\nb\n$$"  # adjacent display blocks are left alone
    assert data.summary_text(two) == two
    assert data.summary_text("$$\na\n$$\n\\boxed{6}") == "$$\na\n$$"  # a closer is not an opener
