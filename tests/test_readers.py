"""Dataset readers: one fixture per schema (written here into tmp_path: small PIL images and rows
in that schema), all loaded into the same record form; bad rows name file:line; skip_bad counts
them; MathVista's annotation JSON keyed by pid; write_jsonl; format_question."""

import json
import os
import re

import pytest
from PIL import Image

import data as rd

RECORD_KEYS = {"id", "images", "question", "choices_in_question", "answer", "choices", "solution",
               "meta", "source"}
THINK = "<think>red 2 green 1 blue 3. red is 2.</think> The red count is 2. <answer>2</answer>"


def save_image(folder, rel, color=(200, 30, 30)):
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path)
    return str(path)


def write_lines(path, rows):
    """rows: dicts (dumped as JSON) or raw strings (written as they are)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return str(path)


def check_form(recs):
    for r in recs:
        assert set(r) == RECORD_KEYS
        assert isinstance(r["id"], str) and isinstance(r["question"], str)
        assert isinstance(r["answer"], str) and isinstance(r["meta"], dict)
        assert all(os.path.isabs(p) and os.path.isfile(p) for p in r["images"])
        assert r["choices"] is None or all(isinstance(c, str) for c in r["choices"])


# -----------------------------------------------------------------------------
# one fixture per schema


def test_ours(tmp_path):
    img = save_image(tmp_path, "images/train-0.png")
    other = save_image(tmp_path / "elsewhere", "abs.png")  # an absolute path is kept as is
    rows = [
        {"id": "train-0", "image": "images/train-0.png",
         "question": "How many red shapes are there?", "answer": "2", "solution": THINK,
         "family": "count", "level": "easy", "kind": "color=red",
         "scene": {"shapes": [{"color": "red", "kind": "circle"}]}},
        {"id": "train-1", "image": "images/train-0.png", "question": "Which bar is the tallest?",
         "answer": "B", "choices": ["red", "green", "blue"], "solution": "<think>..</think> "
         "<answer>B</answer>", "family": "bars", "level": "hard", "kind": "tallest", "scene": {}},
        "",  # empty lines are ignored
        {"id": 7, "images": [other, "images/train-0.png"], "question": "Compare.", "answer": 3},
        {"id": "t", "question": "What is 2+2?", "answer": "4"},  # text-only
    ]
    path = write_lines(tmp_path / "data.jsonl", rows)
    recs, n_bad = rd.load_records(path)
    check_form(recs)
    assert n_bad == 0 and len(recs) == 4
    a, b, c, d = recs
    assert a["id"] == "train-0" and a["images"] == [img] and a["answer"] == "2"
    assert a["choices"] is None and a["solution"] == THINK and a["choices_in_question"] is False
    assert a["meta"] == {"family": "count", "level": "easy", "kind": "color=red",
                         "scene": {"shapes": [{"color": "red", "kind": "circle"}]}}
    assert a["source"] == f"{path}:1"
    assert b["choices"] == ["red", "green", "blue"] and b["answer"] == "B"
    assert b["meta"]["family"] == "bars" and b["source"] == f"{path}:2"
    assert c["id"] == "7" and c["answer"] == "3" and c["images"] == [other, img]
    assert c["solution"] is None and c["source"] == f"{path}:4"
    assert d["images"] == [] and d["meta"] == {}


MATHVISTA_META = {"category": "math-targeted-vqa", "context": "geometry diagram",
                  "grade": "high school", "img_height": 426, "img_width": 596,
                  "language": "english", "skills": ["geometry reasoning", "algebraic reasoning"],
                  "source": "Geometry3K", "split": "testmini", "task": "geometry problem solving"}
MATHVISTA_ROWS = [
    {"pid": "5", "question": "Find $m\\angle H$", "image": "images/5.jpg",
     "choices": ["97", "102", "107", "122"], "unit": None, "precision": None, "answer": "97",
     "question_type": "multi_choice", "answer_type": "text", "metadata": MATHVISTA_META,
     "query": "Hint: Please answer the question and provide the correct option letter, e.g., A, "
              "B, C, D, at the end.\nQuestion: Find $m\\angle H$\nChoices:\n(A) 97\n(B) 102\n"
              "(C) 107\n(D) 122"},
    {"pid": "8", "question": "What is the value of the smallest bar?", "image": "images/8.png",
     "choices": None, "unit": None, "precision": 1.0, "answer": "1.5",
     "question_type": "free_form", "answer_type": "float",
     "metadata": {"category": "general-vqa", "context": "bar chart", "source": "FigureQA",
                  "task": "figure question answering", "skills": ["statistical reasoning"]},
     "query": "Hint: Please answer the question requiring a floating-point number with one "
              "decimal place and provide the final value, e.g., 1.2, 1.3, 1.4, at the end.\n"
              "Question: What is the value of the smallest bar?"},
]


def check_mathvista(recs, tmp_path):
    check_form(recs)
    mc, ff = recs
    assert mc["id"] == "5" and mc["images"] == [str(tmp_path / "images/5.jpg")]
    assert mc["question"] == MATHVISTA_ROWS[0]["query"] and mc["choices_in_question"] is True
    assert mc["choices"] == ["97", "102", "107", "122"] and mc["answer"] == "97"
    assert mc["meta"]["question"] == "Find $m\\angle H$"
    assert mc["meta"]["question_type"] == "multi_choice" and mc["meta"]["answer_type"] == "text"
    assert mc["meta"]["precision"] is None and mc["meta"]["unit"] is None
    assert mc["meta"]["source"] == "Geometry3K" and mc["meta"]["skills"][0] == "geometry reasoning"
    assert ff["choices"] is None and ff["answer"] == "1.5" and ff["meta"]["precision"] == 1.0
    assert ff["meta"]["answer_type"] == "float" and ff["meta"]["context"] == "bar chart"
    assert rd.format_question(mc) == mc["question"]  # the query already shows the options


def test_mathvista_jsonl(tmp_path):
    save_image(tmp_path, "images/5.jpg")
    save_image(tmp_path, "images/8.png")
    path = write_lines(tmp_path / "testmini.jsonl", MATHVISTA_ROWS)
    recs, n_bad = rd.load_records(path)
    check_mathvista(recs, tmp_path)
    assert n_bad == 0 and recs[1]["source"] == f"{path}:2"


def test_mathvista_annotation_json_keyed_by_pid(tmp_path):
    save_image(tmp_path, "images/5.jpg")
    save_image(tmp_path, "images/8.png")
    path = tmp_path / "testmini.json"
    path.write_text(json.dumps({r["pid"]: r for r in MATHVISTA_ROWS}, indent=4), encoding="utf-8")
    recs, n_bad = rd.load_records(str(path))
    check_mathvista(recs, tmp_path)
    assert n_bad == 0 and recs[0]["source"] == f"{path}:[5]"
    # without `query` the raw question is shown and format_question adds the options
    rows = {r["pid"]: {k: v for k, v in r.items() if k != "query"} for r in MATHVISTA_ROWS}
    rows["9"] = dict(rows["8"], pid="9", image="images/missing.png")
    path.write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"testmini\.json:\[9\]: image not found: .*missing\.png"):
        rd.load_records(str(path))
    recs, n_bad = rd.load_records(str(path), skip_bad=True)
    assert n_bad == 1 and len(recs) == 2 and recs[0]["choices_in_question"] is False
    assert rd.format_question(recs[0]) == (
        "Find $m\\angle H$\nChoices:\nA. 97\nB. 102\nC. 107\nD. 122")


def test_mathverse(tmp_path):
    img = save_image(tmp_path, "images_version_1-4/image_1.png")
    q = ("As shown in the figure, in triangle ABC, it is known that angle A = 80.0, angle B = "
         "60.0, DE parallel BC, then the size of angle CED is ()\nChoices:\nA:40°\nB:60°\n"
         "C:120°\nD:140°")
    cot = ("Please first conduct reasoning, and then answer the question and provide the correct "
           "option letter, e.g., A, B, C, D, at the end.\nQuestion: ")
    meta = {"split": "testmini", "source": "GeoQA", "subject": "Plane Geometry",
            "subfield": "Angle"}
    rows = [
        {"sample_index": "1", "problem_index": "1", "problem_version": "Text Dominant",
         "question": q, "image": "images_version_1-4/image_1.png", "answer": "D",
         "question_type": "multi-choice", "metadata": meta, "query_wo": "Please directly answer "
         "the question and provide the correct option letter.\nQuestion: " + q,
         "query_cot": cot + q, "question_for_eval": q},
        {"sample_index": "5", "problem_index": "1", "problem_version": "Vision Only",
         "question": "", "image": "images_version_1-4/image_1.png", "answer": "D",
         "question_type": "multi-choice", "metadata": meta,
         "query_cot": "According to the question shown in the image, please first conduct "
                      "reasoning, and then answer the question and provide the correct option "
                      "letter, e.g., A, B, C, D, at the end."},
        {"sample_index": "3941", "problem_index": "788", "problem_version": "Text Only",
         "question": "In a right triangle the legs are 3 and 4. Find the hypotenuse.", "image": "",
         "answer": "5", "question_type": "free-form", "metadata": meta,
         "query_wo": "Please directly answer the question.\nQuestion: In a right triangle the "
                     "legs are 3 and 4. Find the hypotenuse."},
    ]
    path = write_lines(tmp_path / "testmini.jsonl", rows)
    recs, n_bad = rd.load_records(path)
    check_form(recs)
    mc, vision_only, text_only = recs
    assert mc["id"] == "1" and mc["images"] == [img] and mc["answer"] == "D"
    assert mc["question"] == cot + q and mc["choices_in_question"] is True
    assert mc["choices"] == ["40°", "60°", "120°", "140°"]
    assert mc["meta"]["problem_version"] == "Text Dominant" and mc["meta"]["question"] == q
    assert mc["meta"]["question_type"] == "multi-choice"
    assert mc["meta"]["subject"] == "Plane Geometry" and mc["meta"]["subfield"] == "Angle"
    assert rd.format_question(mc) == cot + q
    assert vision_only["choices"] is None and vision_only["question"].startswith("According")
    assert text_only["images"] == [] and text_only["choices"] is None
    assert text_only["question"] == rows[2]["query_wo"] and text_only["answer"] == "5"


@pytest.mark.parametrize("text,choices", [
    ("Find x.\nChoices:\nA:3\nB:4\nC:5", ["3", "4", "5"]),
    ("Find x.\nChoices:\nA. 3 cm\nB. 4.5 cm", ["3 cm", "4.5 cm"]),
    ("Find x.\nChoices: (A) 3 (B) 4 (C) 5", ["3", "4", "5"]),
    ("Which color?\n(A) red\n(B) blue", ["red", "blue"]),
    ("Find x.\nChoices:\nA:3\nC:5", None),  # letters out of order
    ("Find the area of triangle ABC.", None),
    ("Choices:\nA: only one", None),
])
def test_parse_choices(text, choices):
    assert rd.parse_choices(text) == choices


def test_mathvision(tmp_path):
    img = save_image(tmp_path, "images/1.jpg")
    save_image(tmp_path, "images/3.jpg")
    rows = [
        {"id": "1", "question": "Which number should be written in place of the question mark?"
         "\n<image1>", "options": [], "image": "images/1.jpg", "answer": "60",
         "solution": None, "level": 2, "subject": "arithmetic"},
        {"id": "3", "question": "Which of the pictures <image1> shows the cube from above?",
         "options": ["A", "B", "C", "D", "E"], "image": "images/3.jpg", "answer": "C",
         "solution": "Looking from above we see two squares.", "level": 1,
         "subject": "solid geometry"},
    ]
    path = write_lines(tmp_path / "test.jsonl", rows)
    recs, n_bad = rd.load_records(path)
    check_form(recs)
    ff, mc = recs
    assert ff["question"] == "Which number should be written in place of the question mark?"
    assert ff["images"] == [img] and ff["choices"] is None and ff["answer"] == "60"
    assert ff["meta"] == {"question_type": "free_form", "level": 2, "subject": "arithmetic"}
    assert mc["question"] == "Which of the pictures shows the cube from above?"
    assert mc["choices"] == ["A", "B", "C", "D", "E"] and mc["answer"] == "C"
    assert mc["solution"] == "Looking from above we see two squares."
    assert mc["meta"]["question_type"] == "multi_choice" and mc["choices_in_question"] is False
    assert rd.format_question(mc, "Think step by step.") == (
        "Which of the pictures shows the cube from above?\nChoices:\nA. A\nB. B\nC. C\nD. D\n"
        "E. E\nThink step by step.")


def test_sharegpt(tmp_path):
    img = save_image(tmp_path, "imgs/a.png")
    img2 = save_image(tmp_path, "imgs/b.png")
    rows = [
        {"messages": [{"role": "user", "content": "<image>How many red shapes are there?"},
                      {"role": "assistant", "content": THINK}], "images": ["imgs/a.png"]},
        {"id": "geo-3", "conversations": [
            {"from": "system", "value": "You are a helpful assistant."},
            {"from": "human", "value": "<image>\n<image>\nAre the two figures congruent?"},
            {"from": "gpt", "value": "<think>sides match</think> yes <answer>no</answer> "
                                     "wait <answer>yes</answer>"}],
         "images": ["imgs/a.png", "imgs/b.png"], "dataset": "geometry3k"},
        {"messages": [{"role": "user", "content": "What is 2+2?"},
                      {"role": "assistant", "content": "<think>2+2=4</think> 4"}]},
    ]
    path = write_lines(tmp_path / "sft.jsonl", rows)
    recs, n_bad = rd.load_records(path)
    check_form(recs)
    a, b, c = recs
    assert a["id"] == "sft.jsonl:1" and a["question"] == "How many red shapes are there?"
    assert a["images"] == [img] and a["solution"] == THINK and a["answer"] == "2"
    assert a["choices"] is None and a["meta"] == {}
    assert b["id"] == "geo-3" and b["images"] == [img, img2]
    assert b["question"] == "Are the two figures congruent?" and b["answer"] == "yes"
    assert b["meta"] == {"dataset": "geometry3k", "system": "You are a helpful assistant."}
    assert c["images"] == [] and c["answer"] == ""  # no <answer> tag


# -----------------------------------------------------------------------------
# bad rows


def test_bad_rows_name_file_and_line(tmp_path):
    save_image(tmp_path, "images/ok.png")
    good = {"id": "g", "image": "images/ok.png", "question": "Q?", "answer": "1"}
    cases = [
        ('{"id": "x", "question": ', r"malformed JSON"),
        ({"id": "x", "image": "images/ok.png", "answer": "1"}, r"missing key 'question'"),
        (dict(good, image="images/gone.png"), r"image not found: .*gone\.png"),
        (dict(good, choices="A,B"), r"key 'choices' has type str"),
        (dict(good, question=None), r"key 'question' is null"),
        ('[1, 2]', r"expected a JSON object"),
    ]
    for bad, problem in cases:
        path = write_lines(tmp_path / "d.jsonl", [good, "", bad, good])
        with pytest.raises(ValueError, match=rf"^{re.escape(path)}:3: {problem}"):
            rd.load_records(path)
        recs, n_bad = rd.load_records(path, skip_bad=True)
        assert n_bad == 1 and [r["source"] for r in recs] == [f"{path}:1", f"{path}:4"]


def test_bad_rows_other_schemas(tmp_path):
    save_image(tmp_path, "a.png")
    msgs = [{"role": "user", "content": "<image>Q?"}, {"role": "assistant", "content": "x"}]
    rows = [
        {"messages": msgs, "images": ["a.png"]},
        {"messages": msgs, "images": []},  # one <image> marker, no image
        {"messages": msgs[::-1], "images": ["a.png"]},  # assistant first
        {"messages": [msgs[0], msgs[0]], "images": ["a.png"]},  # two user turns
    ]
    path = write_lines(tmp_path / "sft.jsonl", rows)
    with pytest.raises(ValueError, match=rf"{re.escape(path)}:2: 1 <image> markers but 0 images"):
        rd.load_records(path)
    recs, n_bad = rd.load_records(path, skip_bad=True)
    assert len(recs) == 1 and n_bad == 3
    # a MathVista row without answer_type, read with an explicit format
    row = {k: v for k, v in MATHVISTA_ROWS[1].items() if k != "answer_type"}
    path = write_lines(tmp_path / "mv.jsonl", [row])
    with pytest.raises(ValueError, match=rf"{re.escape(path)}:1: missing key 'answer_type'"):
        rd.load_records(path, fmt="mathvista")
    with pytest.raises(ValueError, match="unknown format"):
        rd.load_records(path, fmt="csv")


def test_format_override_and_detection():
    assert rd.detect_format({"conversations": []}) == "sharegpt"
    assert rd.detect_format(MATHVISTA_ROWS[0]) == "mathvista"
    assert rd.detect_format({"sample_index": "1", "query_cot": ""}) == "mathverse"
    assert rd.detect_format({"id": "1", "options": [], "subject": "arithmetic"}) == "mathvision"
    assert rd.detect_format({"id": "1", "question": "q", "answer": "a"}) == "ours"
    assert set(rd.READERS) == set(rd.READER_FORMATS)


# -----------------------------------------------------------------------------
# writing and prompts


def test_write_jsonl_round_trip(tmp_path):
    img = save_image(tmp_path, "images/a.png")
    path = write_lines(tmp_path / "a.jsonl", [{"id": "a", "image": "images/a.png", "question":
                                               "Which?", "answer": "B", "choices": ["x", "y"],
                                               "family": "bars"}])
    recs, _ = rd.load_records(path)
    out = tmp_path / "out" / "next.jsonl"
    rd.write_jsonl(out, recs)
    assert os.listdir(out.parent) == ["next.jsonl"]  # no temp file left behind
    again, n_bad = rd.load_records(out)
    assert n_bad == 0 and again[0]["images"] == [img] and again[0]["choices"] == ["x", "y"]
    assert again[0]["meta"] == {"family": "bars", "origin": f"{path}:1"}
    assert rd.format_question(again[0]) == rd.format_question(recs[0])
    with pytest.raises(TypeError):  # a failed write leaves the old file and no temp file
        rd.write_jsonl(out, [{"id": "z"}, {"bad": object()}])
    assert os.listdir(out.parent) == ["next.jsonl"] and rd.load_records(out)[0] == again


def test_format_question():
    rec = {"question": "Which bar is the tallest?", "choices": ["red", "green", "blue"],
           "choices_in_question": False}
    assert rd.format_question(rec) == (
        "Which bar is the tallest?\nChoices:\nA. red\nB. green\nC. blue")
    suffix = ("You FIRST think about the reasoning process as an internal monologue and then "
              "provide the final answer.")
    assert rd.format_question(dict(rec, choices=None), suffix) == (
        "Which bar is the tallest?\n" + suffix)
    assert rd.format_question(dict(rec, choices_in_question=True), suffix) == (
        "Which bar is the tallest?\n" + suffix)
