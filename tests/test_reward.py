"""Tests for reward.py: a table of (prediction or completion, truth, choices, reward) cases,
plus extraction, format, safety (model output never runs), speed and import hygiene."""
import ast
import builtins
import os
import subprocess
import sys
import time

import pytest

import reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C4 = ['3 cm', '4 cm', '5 cm', '6 cm']
YN = ['Yes', 'No']
PI = ['3.14', '3.1416', '2.72']
WORDS = ['red cube', 'blue sphere', 'green cylinder']

# (prediction, or a whole completion if it has <answer>/<think>/\boxed, truth, choices, reward)
CASES = [
    # plain numbers, signs, trailing zeros
    ('42', '42', None, 1), ('42.0', '42', None, 1), ('42.000', '42', None, 1),
    ('+42', '42', None, 1), ('-42', '42', None, 0), ('-3.5', '-3.5', None, 1),
    ('\u22123.5', '-3.5', None, 1), ('- 3.5', '-3.5', None, 1), ('0.50', '0.5', None, 1),
    ('.5', '0.5', None, 1), ('0', '0', None, 1), ('0.0', '0', None, 1), ('-0', '0', None, 1),
    ('0.001', '0', None, 0), ('5.', '5', None, 1), (' 7 ', '7', None, 1),
    # thousands separators
    ('1,000', '1000', None, 1), ('1000', '1,000', None, 1), ('1 000 000', '1000000', None, 1),
    ('12,345.67', '12345.67', None, 1), ('1\\,000', '1000', None, 1), ('1,5', '1.5', None, 0),
    # scientific notation
    ('1.5e3', '1500', None, 1), ('1500', '1.5e3', None, 1), ('3E-2', '0.03', None, 1),
    ('1.5 \\times 10^3', '1500', None, 1), ('1.5 \\times 10^{3}', '1500', None, 1),
    ('1.5\u00d710\u00b3', '1500', None, 1), ('1.5e4', '1500', None, 0),
    # tolerance: relative 1e-6, or rounding to the truth's decimals
    ('3.14159', '3.14', None, 1), ('3.136', '3.14', None, 1), ('3.1', '3.14', None, 0),
    ('3.15', '3.14', None, 0), ('3.4', '3', None, 0), ('2.6', '3', None, 0),
    ('2.9999999999', '3', None, 1), ('3.0001', '3', None, 0), ('3.04', '3.0', None, 1),
    ('0.333', '0.33', None, 1), ('0.33', '\\frac{1}{3}', None, 0),
    # wrong numbers that look alike
    ('0.5', '0.05', None, 0), ('0.05', '0.5', None, 0), ('12', '120', None, 0),
    ('120', '12', None, 0), ('21', '12', None, 0), ('1.2', '12', None, 0),
    # units, currency, percent, degrees
    ('12 cm', '12', None, 1), ('12cm', '12', None, 1), ('12 \\text{ cm}', '12', None, 1),
    ('12 \\mathrm{cm}^2', '12', None, 1), ('12 cm^2', '12', None, 1), ('12 cm\u00b2', '12', None, 1),
    ('5 m/s', '5', None, 1), ('5 m', '5', None, 1), ('7 square units', '7', None, 1),
    ('$12.50', '12.5', None, 1), ('\\$12.50', '12.5', None, 1), ('12 dollars', '12', None, 1),
    ('5 apples', '5', None, 1), ('13 cm', '12', None, 0),
    ('50%', '50', None, 1), ('50\\%', '50', None, 1), ('50', '50%', None, 1), ('50 %', '50', None, 1),
    ('45\u00b0', '45', None, 1), ('45^\\circ', '45', None, 1), ('45^{\\circ}', '45', None, 1),
    ('45 degrees', '45', None, 1), ('45', '45\u00b0', None, 1), ('46\u00b0', '45', None, 0),
    # a trailing letter that is a variable, not a unit
    ('3x', '3', None, 0), ('3 x', '3', None, 0), ('12 or 3', '12', None, 0), ('2 pi', '2', None, 0),
    # number words
    ('five', '5', None, 1), ('Three', '3', None, 1), ('four', '5', None, 0),
    # fractions and LaTeX
    ('\\frac{1}{2}', '0.5', None, 1), ('\\dfrac{1}{2}', '1/2', None, 1),
    ('\\tfrac{3}{4}', '0.75', None, 1), ('1/2', '\\frac{1}{2}', None, 1), ('\\frac12', '0.5', None, 1),
    ('\\frac{1}{3}', '0.33', None, 1), ('\\frac{2}{3}', '\\frac{4}{6}', None, 1),
    ('\\frac{1}{2}', '\\frac{1}{3}', None, 0), ('$\\frac{1}{2}$', '0.5', None, 1),
    ('-\\frac{1}{2}', '-0.5', None, 1), ('\\frac{-1}{2}', '0.5', None, 0),
    ('\\left( \\frac{1}{2} \\right)', '0.5', None, 1), ('\\text{5}', '5', None, 1),
    ('\\(5\\)', '5', None, 1), ('\u00bd', '0.5', None, 1),
    # roots, pi, powers
    ('\\sqrt{2}', '1.41', None, 1), ('\\sqrt{2}', '1.414214', None, 1), ('\\sqrt{2}', '1.42', None, 0),
    ('2\\sqrt{3}', '\\sqrt{12}', None, 1), ('\\sqrt{3}', '\\sqrt{2}', None, 0),
    ('\u221a2', '\\sqrt{2}', None, 1), ('\\sqrt[3]{8}', '2', None, 1), ('\\sqrt{-4}', '2', None, 0),
    ('\\pi', '3.14', None, 1), ('2\\pi', '6.28', None, 1), ('\u03c0/2', '\\frac{\\pi}{2}', None, 1),
    ('\\frac{\\pi}{2}', '1.5708', None, 1), ('3\\pi', '\\pi', None, 0),
    ('2^{10}', '1024', None, 1), ('2^10', '1024', None, 1), ('-2^2', '-4', None, 1),
    ('(2+3)*4', '20', None, 1), ('2(3)', '6', None, 1), ('2 3', '6', None, 0),
    # evaluator guards: huge exponents, division by zero, complex roots, depth
    ('10^10^10', '5', None, 0), ('9^9^9^9', '1', None, 0), ('1/0', '0', None, 0),
    ('(-8)^(1/3)', '-2', None, 0), ('(' * 150 + '1' + ')' * 150, '1', None, 0),
    ('1e999', '1', None, 0),
    # text: case, spacing, trailing punctuation, wrappers
    ('Yes', 'yes', None, 1), ('yes.', 'Yes', None, 1), ('YES', 'yes', None, 1), ('Yes!', 'yes', None, 1),
    ('no', 'yes', None, 0), ('yes', 'no', None, 0), ('Yes, because', 'yes', None, 0),
    ('  New   York ', 'new york', None, 1), ('new york.', 'New York', None, 1),
    ('Paris', 'London', None, 0), ('red', 'Red', None, 1), ('\\text{red}', 'red', None, 1),
    ('**red**', 'red', None, 1), ('"red"', 'red', None, 1), ('`red`', 'red', None, 1),
    ('x + 1', 'x+1', None, 1), ('x+2', 'x+1', None, 0), ('', 'red', None, 0),
    # answer phrases and assignments
    ('The answer is red', 'red', None, 1), ('Answer: 7', '7', None, 1),
    ('**Final answer:** 7', '7', None, 1), ('x = 5', '5', None, 1), ('AB = 12', '12', None, 1),
    ('y = 2x + 1', 'y=2x+1', None, 1), ('x \\geq 5', '5', None, 0),
    # multiple choice: letter forms, option text, truth as letter or as text
    ('C', 'C', C4, 1), ('(C)', 'C', C4, 1), ('C.', 'C', C4, 1), ('C)', 'C', C4, 1),
    ('[C]', 'C', C4, 1), ('Option C', 'C', C4, 1), ('option (c)', 'C', C4, 1), ('c', 'C', C4, 1),
    ('The answer is C', 'C', C4, 1), ('The correct option is (C).', 'C', C4, 1),
    ('**C**', 'C', C4, 1), ('5 cm', 'C', C4, 1), ('5', 'C', C4, 1), ('5 cm', '5 cm', C4, 1),
    ('C', '5 cm', C4, 1), ('(C) 5 cm', 'C', C4, 1), ('C. 5 cm', '5 cm', C4, 1),
    ('B', 'C', C4, 0), ('(B)', 'C', C4, 0), ('4 cm', 'C', C4, 0), ('4 cm', '5 cm', C4, 0),
    ('E', 'C', C4, 0), ('7 cm', 'C', C4, 0), ('B', '(C)', C4, 0),
    ('No', 'B', YN, 1), ('no.', 'No', YN, 1), ('A', 'No', YN, 0), ('Yes', 'B', YN, 0),
    ('3.1416', 'B', PI, 1), ('3.14', 'A', PI, 1), ('3.14159', 'B', PI, 1), ('2.72', 'B', PI, 0),
    ('Blue Sphere', 'B', WORDS, 1), ('blue sphere.', 'blue sphere', WORDS, 1),
    ('red cube', 'B', WORDS, 0),
    # letters without choices
    ('B', '(C)', None, 0), ('(B)', 'B', None, 1), ('B.', 'B', None, 1), ('Option B', 'B', None, 1),
    ('The answer is B', 'B', None, 1), ('b', 'B', None, 1), ('A cat', 'A', None, 0),
    # tuples, lists, intervals
    ('(1, 2)', '(1.0,2)', None, 1), ('(1,2)', '(2,1)', None, 0), ('[0, 1)', '[0, 1]', None, 0),
    ('[0, 1]', '[0,1]', None, 1), ('(0, 1]', '(0, 1]', None, 1), ('(1, 2)', '[1, 2]', None, 0),
    ('1, 2, 3', '1,2,3', None, 1), ('1, 2, 3', '(1, 2, 3)', None, 1),
    ('[1, 2, 3]', '(1, 2, 3)', None, 1), ('1, 2', '1, 2, 3', None, 0),
    ('(\\frac{1}{2}, 3)', '(0.5, 3)', None, 1), ('(-\\infty, 2]', '(-\u221e, 2]', None, 1),
    ('x = 1, y = 2', '(1, 2)', None, 1), ('(3, 4)', '3, 4', None, 1),
    ('\\{1, 2\\}', '{1, 2}', None, 1), ('(1, 2)', '1', None, 0), ('((1,2),3)', '((1,2.0),3)', None, 1),
    # completions: extraction then matching
    ('<think>a</think><answer>42</answer>', '42', None, 1),
    ('<think>a</think> so <answer>\n  42\n</answer>', '42', None, 1),
    ('<answer>41</answer> wait <answer>42</answer>', '42', None, 1),
    ('<answer>42</answer> wait <answer>41</answer>', '42', None, 0),
    ('<answer>\\boxed{7}</answer>', '7', None, 1),
    ('The result is \\boxed{\\frac{1}{2}}.', '0.5', None, 1),
    ('\\boxed{1} no, \\boxed{2}', '2', None, 1), ('\\boxed{{3}}', '3', None, 1),
    ('\\boxed{\\sqrt{\\frac{1}{4}}}', '0.5', None, 1), ('so \\boxed 5.', '5', None, 1),
    ('<think>hmm</think> so the answer is 42.', '42', None, 1),
    ('<think>hmm</think> So the answer is B.', 'B', None, 1),
    ('<think>blah 42</think>', '42', None, 0), ('<answer>42', '42', None, 0),
    ('<think>x</think> \\boxed{4', '4', None, 0), ('<answer></answer>', '0', None, 0),
    # adversarial: code, NUL bytes, unicode digits, unbalanced braces
    ("\\boxed{__import__('os').system('touch PWNED')}", '0', None, 0),
    ("<answer>eval('1+1')</answer>", '2', None, 0),
    ('<answer>4\x002</answer>', '42', None, 0), ('<answer>\x00</answer>', '0', None, 0),
    ('<answer>\uff14\uff12</answer>', '42', None, 1), ('<answer>\u0664\u0662</answer>', '42', None, 1),
    ('<answer>\u096a\u0968</answer>', '42', None, 1), ('<answer>\u0663\u066b\u0661\u0664</answer>', '3.14', None, 1),
    ('<answer>}}{{</answer>', '1', None, 0), ('\\boxed{\\frac{1}{', '0.5', None, 0),
    ('\\boxed{}}}{{{', '1', None, 0), ('<answer>\\frac{1}{</answer>', '0.5', None, 0),
    # LaTeX thousands separators
    ('1{,}000', '1000', None, 1), ('1,\\!000', '1000', None, 1), ('2{,}500{,}000', '2500000', None, 1),
    ('3,\\!141', '3141', None, 1), ('1{,}5', '1.5', None, 0), ('1{,}000', '100', None, 0),
    # mixed numbers: an integer directly followed by a proper fraction
    ('2\\frac{1}{2}', '2.5', None, 1), ('2 1/2', '2.5', None, 1), ('-1\\frac{3}{4}', '-1.75', None, 1),
    ('1\u00be', '1.75', None, 1), ('2 1/2', '\\frac{5}{2}', None, 1), ('3\\frac{1}{2}', '2.5', None, 0),
    ('21/2', '2.5', None, 0), ('2\\frac{3}{2}', '3.5', None, 0),
    # sets in any order; a bare truth list of solutions against a bare or set prediction too
    ('{2, 1}', '{1, 2}', None, 1), ('\\{3, -1\\}', '\\{-1, 3\\}', None, 1), ('{1, 1}', '{1, 2}', None, 0),
    ('-1, 3', '3, -1', None, 1), ('x = 3, -1', '-1, 3', None, 1), ('x = 3, x = -1', '-1, 3', None, 1),
    ('{3, -1}', '-1, 3', None, 1), ('3, 3', '3, -1', None, 0), ('(3, -1)', '(-1, 3)', None, 0),
    ('(3, -1)', '-1, 3', None, 0), ('{3.14, 3.1416}', '{3.1416, 3.14}', None, 1),
    # \text{} around a letter or a word
    ('\\text{B}', 'B', None, 1), ('\\text{B}', 'B', C4, 1), ('\\text{(B)}', 'B', C4, 1),
    ('\\text{yes}', 'yes', None, 1), ('\\textbf{No}', 'no', None, 1), ('\\text{A}', 'B', None, 0),
    # percent written out, CJK units
    ('50 percent', '50', None, 1), ('50 percent', '50%', None, 1), ('51 percent', '50', None, 0),
    ('12 \u5398\u7c73', '12', None, 1), ('12\u5398\u7c73', '12', None, 1), ('3 \u4e2a', '3', None, 1),
    ('4 \u4e2a', '3', None, 0), ('7 \u5e73\u65b9\u7c73', '7', None, 1),
    # a leading 'x \in'
    ('x \\in [1, 2]', '[1, 2]', None, 1), ('t \\in (0, 5]', '(0, 5]', None, 1),
    ('x \u2208 [1, 2]', '[1, 2]', None, 1), ('x \\in [1, 2)', '[1, 2]', None, 0),
    # inequalities against intervals
    ('1 < x < 2', '(1, 2)', None, 1), ('1 \\le x \\le 2', '[1, 2]', None, 1), ('x > 3', '(3, \\infty)', None, 1),
    ('x \\geq 3', '[3, +\\infty)', None, 1), ('x \u2265 3', '[3, \u221e)', None, 1),
    ('5 > y > -1', '(-1, 5)', None, 1), ('(-\\infty, 4]', 'x \\leq 4', None, 1),
    ('x < 3', '(3, \\infty)', None, 0), ('1 \\le x < 2', '[1, 2]', None, 0), ('x > 3', '[3, \\infty)', None, 0),
    ('a < b', '(a, \\infty)', None, 0),
    # sqrt() in plain text
    ('sqrt(2)', '\\sqrt{2}', None, 1), ('3 sqrt(2)', '\\sqrt{18}', None, 1), ('sqrt(3)', '\\sqrt{2}', None, 0),
    # one value written two ways
    ('\\frac{\\sqrt{3}}{2}', '\\sqrt{3}/2', None, 1), ('\\frac{1}{\\sqrt{2}}', '\\frac{\\sqrt{2}}{2}', None, 1),
    ('2^{-1}', '\\frac{1}{2}', None, 1), ('\\frac{\\sqrt{3}}{3}', '\\sqrt{3}/2', None, 0),
    # a sentence that ends with the number
    ('The total is 42.', '42', None, 1), ('There are 42 apples.', '42', None, 1), ('Total: 42', '42', None, 1),
    ('The total is 41.', '42', None, 0), ('The total is not 42.', '42', None, 0),
    ('The total is 42 or 43.', '42', None, 0),
]


def _completion(text):
    if any(tag in text for tag in ('<answer>', '<think>', '\\boxed')):
        return text
    return f'<think>work</think> done <answer>{text}</answer>'


def test_case_count():
    assert len(CASES) >= 140


@pytest.mark.parametrize('text,truth,choices,expected', CASES)
def test_accuracy_table(text, truth, choices, expected):
    assert reward.accuracy_reward(_completion(text), truth, choices) == float(expected)
    if _completion(text) != text:  # a bare prediction: the matcher alone agrees
        assert reward.is_equiv(text, truth, choices) is bool(expected)


@pytest.mark.parametrize('completion,expected', [
    ('<answer>42</answer>', '42'),
    ('<think>t</think>\n<answer>\nline 1\nline 2\n</answer>', 'line 1\nline 2'),
    ('<answer>1</answer> <answer>2</answer>', '2'),
    ('<answer>1</answer> <answer>2', '1'),  # the last complete pair
    ('\\boxed{\\frac{1}{2}}', '\\frac{1}{2}'),
    ('\\boxed{a} then \\boxed{b}', 'b'),
    ('\\boxed{ {x} + {y} }', '{x} + {y}'),
    ('\\boxed{\\{1, 2\\}}', '\\{1, 2\\}'),
    ('<answer>\\boxed{7}</answer>', '7'),
    ('<answer>9</answer> \\boxed{7}', '9'),  # tags beat boxes
    ('So the answer is 12 cm. Done.', '12 cm'),
    ('Final Answer: (B)', '(B)'),
    ('The answer is 3.14', '3.14'),
    ('\\boxed{unclosed', None), ('no answer here', None), ('', None), (None, None),
    ('\x00\x00', None), ('{{{{', None),
    ('< answer >42< /answer >', '42'), ('<think>t</think>< answer > 5 cm </ answer >', '5 cm'),
    ('<Answer>7</Answer>', '7'), ('< answer >1< /answer > <answer>2</answer>', '2'),
    ('Comparing the sides, the correct option is (C).', '(C)'), ('So the best choice is B', 'B'),
    ('42', None),  # a bare completion is no extraction; accuracy_reward reads it (below)
])
def test_extract_answer(completion, expected):
    assert reward.extract_answer(completion) == expected


RANGES = ['0.0 - 0.2', '0.2 - 0.4', '0.4 - 0.6', '0.6 - 0.8']
AGES = ['10', '12', '15']


@pytest.mark.parametrize('pred,truth,choices,expected', [
    # ranges read as numbers are all negative (0.2 - 0.4 = -0.2 = 0.0 - 0.2): text names the option
    ('A', '0.2 - 0.4', RANGES, False), ('0.0 - 0.2', '0.2 - 0.4', RANGES, False),
    ('0.2 - 0.4', 'B', RANGES, True), ('B', '0.2 - 0.4', RANGES, True), ('C', '0.4-0.6', RANGES, True),
    ('(D) 0.6 - 0.8', '0.6 - 0.8', RANGES, True), ('0.6 - 0.8', 'A', RANGES, False),
    ('-0.2', 'B', RANGES, False),  # a value two options share names neither
    # no option named: the value must be the truth's option's value
    ('12.0', 'B', AGES, True), ('twelve', 'B', AGES, True), ('12 years', '12', AGES, True),
    ('12.5', 'B', AGES, False), ('15', 'B', AGES, False),
    ('1.5', 'C', ['1.5', '15', '150'], False), ('1.50', 'A', ['1.5', '15', '150'], True),
])
def test_choices_resolve_to_an_option_first(pred, truth, choices, expected):
    assert reward.is_equiv(pred, truth, choices) is expected


# MathVista testmini lists an option twice in three rows (pids 781, 740, 587); the gold is the text
TWICE_GOLD = ['9', '12', '18', '18']                                # gold '18': C and D
TWICE_OTHER = ['15', '100', '50', '50']                             # gold '15': C and D are wrong
TWICE_ZH = ['20\u6d77\u91cc', '20\u221a{2}\u6d77\u91cc', '15\u6d77\u91cc', '20\u6d77\u91cc']  # gold B


@pytest.mark.parametrize('pred,truth,choices,expected', [
    ('D', '18', TWICE_GOLD, True), ('(D)', '18', TWICE_GOLD, True), ('C', '18', TWICE_GOLD, True),
    ('18', '18', TWICE_GOLD, True), ('18.0', '18', TWICE_GOLD, True), ('D', 'C', TWICE_GOLD, True),
    ('A', '18', TWICE_GOLD, False), ('12', '18', TWICE_GOLD, False), ('B', '18', TWICE_GOLD, False),
    ('A', '15', TWICE_OTHER, True), ('C', '15', TWICE_OTHER, False), ('D', '15', TWICE_OTHER, False),
    ('50', '15', TWICE_OTHER, False), ('50.0', '15', TWICE_OTHER, False),
    ('B', '20\u221a{2}\u6d77\u91cc', TWICE_ZH, True), ('A', '20\u221a{2}\u6d77\u91cc', TWICE_ZH, False),
    ('D', '20\u221a{2}\u6d77\u91cc', TWICE_ZH, False), ('20\u6d77\u91cc', '20\u221a{2}\u6d77\u91cc', TWICE_ZH, False),
])
def test_an_option_listed_twice_is_right_under_either_letter(pred, truth, choices, expected):
    assert reward.is_equiv(pred, truth, choices) is expected
    assert reward.accuracy_reward(f'<answer>{pred}</answer>', truth, choices) == float(expected)


@pytest.mark.parametrize('pred,truth,expected', [
    # MathVista's float golds are written to their `precision` field's decimals, and its scorer
    # rounds the prediction to them: a prediction 1% off that rounds to the gold is right there too
    ('0.2121', '0.21', True), ('1.212', '1.2', True), ('-4.343', '-4.3', True),
    ('0.216', '0.21', False), ('1.26', '1.2', False), ('48.076', '47.6', False), ('0.0', '0.1', False),
])
def test_a_float_truth_accepts_what_rounds_to_it_as_mathvista_scores(pred, truth, expected):
    assert reward.is_equiv(pred, truth) is expected


@pytest.mark.parametrize('pred,truth,expected', [
    ('100000001', '100000000', False), ('100000000', '100000000', True), ('1e8', '100000000', True),
    ('100,000,000.0', '100000000', True), ('-7.0000001', '-7', False), ('2,000,001', '2,000,000', False),
    ('12345678901234567891', '12345678901234567890', False), ('7 \\times 10^{8}', '700000000', True),
    # non-integer truths keep their tolerance
    ('1000000.4', '1e6', True), ('0.33333333', '\\frac{1}{3}', True), ('2.5000001', '2.5', True),
    ('3.14159', '3.14', True), ('3.4', '3', False),
])
def test_integer_truth_wants_an_equal_integer(pred, truth, expected):
    assert reward.is_equiv(pred, truth) is expected


@pytest.mark.parametrize('pred,truth,choices,expected', [
    ('4\x002', '42', None, False), ('4\x012', '42', None, False), ('42\x1b', '42', None, False),
    ('\x0742', '42', None, False), ('42\x7f', '42', None, False), ('B\x00', 'B', C4, False),
    ('yes\x0b', 'yes', None, False),
    ('\n42\r\n', '42', None, True), ('x =\t5', '5', None, True),  # ordinary whitespace is fine
])
def test_control_characters_refuse(pred, truth, choices, expected):
    assert reward.is_equiv(pred, truth, choices) is expected
    assert reward.accuracy_reward(f'<answer>{pred}</answer>', truth, choices) == float(expected)


def test_truth_in_answer_tags_is_unwrapped():
    assert reward.is_equiv('42', '<answer>42</answer>') is True
    assert reward.is_equiv('41', '<answer>42</answer>') is False
    assert reward.accuracy_reward('<answer>(B)</answer>', ' < answer > B </answer>', C4) == 1.0
    assert reward.accuracy_reward('<answer>5 cm</answer>', '<answer>C</answer>', C4) == 1.0


@pytest.mark.parametrize('completion,truth,choices,expected', [
    ('42', '42', None, 1.0), (' B\n', 'B', C4, 1.0), ('5 cm', 'C', C4, 1.0), ('0.5', '\\frac{1}{2}', None, 1.0),
    ('41', '42', None, 0.0), ('42 ' + 'x' * 200, '42', None, 0.0), ('<think>42</think>', '42', None, 0.0),
    ('4\x002', '42', None, 0.0),
    ('Comparing the sides, the correct option is (C).', 'C', C4, 1.0),
    ('Comparing the sides, the correct option is (C).', 'B', C4, 0.0),
])
def test_bare_completions_and_option_phrases(completion, truth, choices, expected):
    assert reward.accuracy_reward(completion, truth, choices) == expected


@pytest.mark.parametrize('completion,expected', [
    ('<think>a</think> b <answer>c</answer>', 1.0),
    ('  \n<think>\nlong\n</think>\n<answer>42</answer>\n ', 1.0),
    ('<think></think><answer>42</answer>', 1.0),
    ('<think>a</think><answer>42</answer><|im_end|>', 1.0),
    ('<answer>42</answer>', 0.0),
    ('<think>a</think>', 0.0),
    ('<think>a</think><answer></answer>', 0.0),
    ('<think>a</think><answer>42</answer> trailing', 0.0),
    ('lead <think>a</think><answer>42</answer>', 0.0),
    ('<think>a</think><answer>1</answer><answer>2</answer>', 0.0),
    ('<think>a<think>b</think><answer>42</answer>', 0.0),
    ('<think>a <answer>42</answer></think>', 0.0),
    ('<think>a</think><answer>42', 0.0),
    ('', 0.0),
])
def test_format_reward(completion, expected):
    assert reward.format_reward(completion) == expected


def test_code_in_completion_never_runs(tmp_path, monkeypatch):
    target = tmp_path / 'PWNED'
    code = f"__import__('os').system('touch {target}')"
    called = []
    for name in ('eval', 'exec', 'compile'):  # not __import__: re itself imports lazily
        real = getattr(builtins, name)
        monkeypatch.setattr(builtins, name, lambda *a, _r=real, **k: called.append(a) or _r(*a, **k))
    for completion in (f'\\boxed{{{code}}}', f'<answer>{code}</answer>',
                       f"<answer>open(r'{target}', 'w').write('x')</answer>",
                       f'The answer is {code}'):
        for truth in ('0', 'B', '(1, 2)'):
            assert reward.accuracy_reward(completion, truth) == 0.0
            assert reward.accuracy_reward(completion, truth, C4) == 0.0
    monkeypatch.undo()
    assert not target.exists()
    assert called == []


def test_source_has_no_eval():
    src = open(os.path.join(ROOT, 'reward.py')).read()
    for bad in ('eval(', 'exec(', 'sympify', 'parse_expr', 'literal_eval', '__import__'):
        assert bad not in src.replace('_eval', '')


def test_stdlib_only():
    tree = ast.parse(open(os.path.join(ROOT, 'reward.py')).read())
    names = {a.name.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert names <= {'math', 're', 'unicodedata', '__future__'}
    code = "import reward, sys; assert not {'torch', 'numpy', 'sympy'} & set(sys.modules)"
    subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True)


MB = 1 << 20


@pytest.mark.parametrize('completion,truth', [
    ('x' * MB + '<answer>42</answer>', '42'),
    ('<think>' + 'a' * MB + '</think><answer>42</answer>', '42'),
    ('<answer>' * (MB // 8), '42'),
    ('\\boxed{' * (MB // 7), '42'),
    ('{' * MB, '42'),
    ('(' * MB, '42'),
    ('<answer>' + '1' * MB + '</answer>', '42'),
    ('<answer>' + '(' * MB + '</answer>', '42'),
    ('\\boxed{' + '{' * MB + '}', '42'),
    ('<answer>' + 'the answer is ' * (MB // 14) + '</answer>', '42'),
    ('answer is ' * (MB // 10), '42'),
    ('\x00' * MB, '42'),
    ('\uff14' * MB, '42'),
    ('< ' * (MB // 2), '42'),
    ('< /answer >' * (MB // 11), '42'),
    ('< answer >' * (MB // 10) + '< /answer >', '42'),
    ('<answer>' + '1 < ' * (MB // 4) + 'x</answer>', '42'),
    ('<answer>{' + '1, ' * (MB // 3) + '}</answer>', '{1, 2}'),
    ('<answer>The total is ' + 'very ' * (MB // 5) + '42</answer>', '42'),
])
def test_one_megabyte_is_fast(completion, truth):
    t0 = time.perf_counter()
    reward.accuracy_reward(completion, truth)
    reward.accuracy_reward(completion, truth, C4)
    reward.format_reward(completion)
    assert time.perf_counter() - t0 < 0.5


def test_long_inputs_and_odd_types():
    assert reward.is_equiv('1' * 10000, '1') is False
    assert reward.is_equiv(None, '1') is False
    assert reward.is_equiv(42, 42) is True
    assert reward.is_equiv('2', 2.0) is True
    assert reward.is_equiv('B', 'B', ['1', 2, 3.5]) is True
    assert reward.is_equiv('3.5', 'C', ['1', 2, 3.5]) is True
    assert reward.accuracy_reward('<answer>' + '9' * 400 + '</answer>', '1') == 0.0
