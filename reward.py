"""
Rewards for GRPO, and the answer matcher that eval.py reuses. Pure `str -> float`, standard
library only (no torch, no numpy, no sympy): extract_answer(completion) -> str | None,
is_equiv(pred, answer, choices) -> bool, accuracy_reward and format_reward -> 1.0 | 0.0.

Extraction: the last complete <answer>...</answer>; else the last \\boxed{...} (nested braces);
else a closing "the answer is X" / "Answer: X" in the last 300 characters; else None.

Matching, after normalizing both sides (NUL bytes dropped, unicode NFKC plus every unicode decimal
digit mapped to ASCII, light LaTeX cleanup, $ and markdown and "the answer is" stripped):
  - multiple choice: with `choices` (option texts for A, B, C...), prediction and truth are each
    resolved to an option index (a letter form like B, (B), B., B), Option B, or the option
    text) and compared; without choices, a letter truth is compared to a letter prediction;
  - text: equal ignoring case, whitespace and trailing punctuation;
  - tuples, lists, intervals: element by element; for two-element ones whose brackets are both
    given, the brackets must agree ([0, 1) != [0, 1]);
  - numbers: commas, units, %, degrees, signs, scientific notation, fractions, \\sqrt, \\pi
    are evaluated by a small hand-written parser; equal within a relative 1e-6, or, when the
    truth is written with k decimals, when the prediction rounds to it (truth 3.14 accepts
    3.14159; truth 3 rejects 3.4). A trailing % is dropped, not divided (50% == 50 != 0.5); a
    trailing word is a unit unless it looks like a variable (12 cm == 12, 3x != 3); 'x = 5'
    counts as 5 when the truth has no '='; the words zero..twelve count as numbers.
How this departs from MathVista's evaluation: MathVista asks GPT-4 to extract the answer from
free text; we use no LLM, only the rules above, so the reward is cheap, deterministic, and the
same in training and eval. Model output is never executed: no eval/exec/sympy, only string
parsing with bounded lengths, so a 1 MB completion scores in milliseconds.
"""

import math
import re
import unicodedata

MAX_PRED_CHARS = 5000   # longer predictions are wrong without further work
MAX_CALC_CHARS = 200    # the arithmetic evaluator gives up on longer inputs
MAX_BOXED_CHARS = 10000  # a \boxed{ whose closing brace is further than this is not an answer

# -----------------------------------------------------------------------------
# extraction

def _braced(s, i):
    """s[i] == '{': the text up to its matching '}' (\\{ and \\} do not count), or None."""
    depth, j, end = 0, i, min(len(s), i + MAX_BOXED_CHARS)
    while j < end:
        c = s[j]
        if c == '\\':
            j += 2
            continue
        if c == '{':
            depth += 1
        elif c == '}':
            depth -= 1
            if depth == 0:
                return s[i + 1:j]
        j += 1
    return None  # unbalanced or too long

def _last_boxed(s):
    """Content of the last \\boxed{...} (or '\\boxed 5'), or None."""
    i = s.rfind('\\boxed')
    if i < 0:
        return None
    j = i + len('\\boxed')
    k = j
    while k < len(s) and s[k] == ' ':
        k += 1
    if k < len(s) and s[k] == '{':
        return _braced(s, k)
    m = re.match(r' +([^\s$]+)', s[j:j + 100])  # '\boxed 5' form
    return m.group(1) if m else None

_PHRASE = re.compile(r'answer\s*(?:is\b|:)', re.I)

def _answer_phrase(tail):
    """X from the last 'the answer is X' / 'answer: X' in tail, cut at the line or sentence end."""
    last = None
    for last in _PHRASE.finditer(tail):
        pass
    if last is None:
        return None
    x = tail[last.end():].lstrip(' \t\n:*')
    x = re.split(r'\n|\.\s', x, maxsplit=1)[0].strip().rstrip('.').strip()
    return x or None

def extract_answer(completion):
    """The model's final answer as a string, or None when it gave none we can find."""
    if not completion:
        return None
    s = str(completion)
    end = s.rfind('</answer>')
    if end >= 0:
        start = s.rfind('<answer>', 0, end)
        if start >= 0:
            inner = s[start + len('<answer>'):end]
            boxed = _last_boxed(inner) if '\\boxed' in inner else None
            return (boxed if boxed is not None else inner).strip()
    boxed = _last_boxed(s)
    if boxed is not None:
        return boxed.strip()
    return _answer_phrase(s[-300:])

# -----------------------------------------------------------------------------
# normalization

# before NFKC (which would turn '²' into a bare '2'), and after it ('½' -> '1⁄2')
_PRE = str.maketrans({'²': '^2', '³': '^3', '−': '-', '–': '-', '×': '*', '÷': '/', '·': '*',
                      'π': '\\pi ', '∞': '\\infty ', '°': '', '\x00': '', '\u200b': ''})
_POST = str.maketrans({'⁄': '/', '∕': '/', '٫': '.', '٬': ','})

def _unicode(s):
    s = re.sub(r'√\s*(\d+(?:\.\d+)?)', r'\\sqrt{\1}', s.translate(_PRE))
    s = s.replace('√', '\\sqrt')
    s = unicodedata.normalize('NFKC', s).translate(_POST)
    if not s.isascii():  # Arabic-Indic, Devanagari, ... digits -> 0-9
        s = ''.join(str(unicodedata.decimal(c)) if c.isdigit() and unicodedata.decimal(c, None)
                    is not None else c for c in s)
    return s

_LATEX = [(re.compile(a), b) for a, b in [
    (r'\\[dtc]frac', r'\\frac'),
    (r'\\(?:left|right|[bB]igg?[lr]?)\b\.?', ''),
    (r'\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ\b|\\degree\b', ''),
    (r'\\%', '%'),
    (r'\\\$', ''),
    (r'\\[()\[\]]', ''),           # \( \) \[ \] math delimiters
    (r'\\([{}])', r'\1'),          # \{1, 2\} -> {1, 2}
    (r'\\[,!;: ]|\\q?quad\b|~', ' '),
    (r'\\(?:displaystyle|textstyle)\b', ''),
    (r'\\frac\s*(\d)\s*(\d)', r'\\frac{\1}{\2}'),
    (r'\\sqrt\s*(\d)', r'\\sqrt{\1}'),
    (r'\^\{(\w)\}', r'^\1'),
]]
_WRAP = re.compile(r'\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox|operatorname)'
                   r'\s*\{([^{}]*)\}')
_PREFIX = re.compile(r'^(?:so|thus|therefore|hence)?[\s,]*(?:the\s+)?(?:final\s+|correct\s+)*'
                     r'(?:answer|option|choice)\s*(?:is\b|:)\s*:?\s*', re.I)

def _strip_ends(s):
    s = s.strip().strip('*`').strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in '"\'':
        s = s[1:-1].strip()
    return s

def _normalize(s):
    """Unicode, \\boxed, LaTeX, markdown and 'the answer is' cleanup; keeps case."""
    s = _unicode(str(s))
    if '\\boxed' in s:
        b = _last_boxed(s)
        s = b if b is not None else s
    for pat, rep in _LATEX:
        s = pat.sub(rep, s)
    for _ in range(5):  # \text{...} may nest a few times
        s, n = _WRAP.subn(r'\1', s)
        if not n:
            break
    s = _strip_ends(s.replace('$', ''))
    s = _strip_ends(_PREFIX.sub('', s))
    return s.rstrip('.!?;,:').strip()

def _key(s):
    """Text comparison key: lower case, no whitespace."""
    return ''.join(s.lower().split())

# -----------------------------------------------------------------------------
# numbers: plain literals, units, and a tiny bounded arithmetic evaluator

_WORDS = {w: i for i, w in enumerate('zero one two three four five six seven eight nine ten '
                                     'eleven twelve'.split())}
_PLAIN = re.compile(r'[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?')
_THOUSANDS = re.compile(r'[+-]?\d{1,3}(?:(?:,\d{3})+|(?: \d{3})+)(?:\.\d+)?')
# a trailing unit: words (cm, m/s^2, square units), not glued to a preceding letter or backslash
_UNIT = re.compile(r'(?<![\\A-Za-z])[A-Za-z]+(?:\^?[23])?(?:[\s./-]+[A-Za-z]+(?:\^?[23])?)*$')
_UNIT_LETTERS = set('mgshlLKNJWV')  # one-letter words that are units, not variables
_NOT_UNITS = {'pi', 'sqrt', 'frac', 'ln', 'log', 'sin', 'cos', 'tan', 'exp', 'inf', 'infty',
              'mod', 'or', 'and', 'to', 'e', 'i'}

class _Bad(Exception):
    pass

_TOKEN = re.compile(r'\s*(\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+|\\[A-Za-z]+|[A-Za-z]+|\*\*|\S)')
_MUL, _DIV = {'*', '\\cdot', '\\times'}, {'/', '\\div'}
_IMPLICIT = {'(', '{', '\\frac', '\\sqrt', '\\pi', 'pi'}  # 2\sqrt{3}, 2\pi, 3(4); never 2 3

class _Calc:
    """Recursive descent over + - * / ^, ( ), { }, \\frac, \\sqrt[n], \\pi. Floats only; raises _Bad."""
    def __init__(self, toks):
        self.toks, self.i, self.depth = toks, 0, 0

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, want=None):
        tok = self.peek()
        if tok is None or (want is not None and tok != want):
            raise _Bad
        self.i += 1
        return tok

    def expr(self):
        self.depth += 1
        if self.depth > 40:
            raise _Bad
        v = self.term()
        while self.peek() in ('+', '-'):
            v = v + self.term() if self.take() == '+' else v - self.term()
        self.depth -= 1
        return v

    def term(self):
        v = self.unary()
        while True:
            tok = self.peek()
            if tok in _MUL or tok in _DIV:
                self.take()
                r = self.unary()
                v = v * r if tok in _MUL else v / r
            elif tok in _IMPLICIT:
                v *= self.power()
            else:
                return v

    def unary(self):
        sign = 1.0
        while self.peek() in ('+', '-'):
            sign = -sign if self.take() == '-' else sign
        return sign * self.power()

    def power(self):
        b = self.atom()
        if self.peek() not in ('^', '**'):
            return b
        self.take()
        e = self.unary()
        # cap exponents so 10^10^10 fails fast; no complex results
        if abs(e) > 1000 or (b < 0 and e != int(e)):
            raise _Bad
        return b ** e

    def group(self):
        if self.peek() == '{':
            self.take()
            v = self.expr()
            self.take('}')
            return v
        return self.atom()

    def atom(self):
        tok = self.take()
        if tok[0].isdigit() or tok[0] == '.':
            return float(tok)
        if tok in ('\\pi', 'pi'):
            return math.pi
        if tok in ('(', '{'):
            v = self.expr()
            self.take(')' if tok == '(' else '}')
            return v
        if tok == '\\frac':
            num = self.group()
            return num / self.group()
        if tok == '\\sqrt':
            n = 2.0
            if self.peek() == '[':
                self.take()
                n = self.expr()
                self.take(']')
            v = self.group()
            if v < 0 or n == 0:
                raise _Bad
            return v ** (1.0 / n)
        raise _Bad

def _calc(s):
    """Value of a small arithmetic/LaTeX expression, or None."""
    if len(s) > MAX_CALC_CHARS:
        return None
    p = _Calc(_TOKEN.findall(s))
    try:
        v = p.expr()
    except (_Bad, ArithmeticError, ValueError):  # ArithmeticError: overflow, division by zero
        return None
    return v if p.i == len(p.toks) else None

def _plain(s):
    """(value, decimals) of a plain literal like '-1,234.50' or '1e3'; decimals None if exponent."""
    s = re.sub(r'^([+-])\s+', r'\1', s.strip())
    if _THOUSANDS.fullmatch(s):
        s = s.replace(',', '').replace(' ', '')
    if not _PLAIN.fullmatch(s):
        return None
    k = None if 'e' in s.lower() else (len(s.split('.')[1]) if '.' in s else 0)
    return float(s), k

def _unit_ok(unit):
    words = re.findall(r'[A-Za-z]+', unit)
    return all((len(w) > 1 or w in _UNIT_LETTERS) and w.lower() not in _NOT_UNITS for w in words)

def _number(s):
    """(value, decimals) of a numeric answer, units, %, $ and degrees dropped; None if not one."""
    s = s.strip()
    if len(s) > MAX_CALC_CHARS:
        return None
    if s.lower() in _WORDS:
        return float(_WORDS[s.lower()]), 0
    s = s.lstrip('£€¥').rstrip('%').strip()
    r = _plain(s)
    if r is None:
        m = _UNIT.search(s)
        if m and m.start() > 0 and _unit_ok(m.group()):
            s = s[:m.start()].rstrip().rstrip('%').strip()
            r = _plain(s)
    if r is None:
        v = _calc(s)
        r = None if v is None else (v, None)
    return r if r is not None and math.isfinite(r[0]) else None

def _close(p, t, k, loose=True):
    """p equals truth t within 1e-6 relative, or (loose) rounds to t's k decimals."""
    if math.isclose(p, t, rel_tol=1e-6, abs_tol=1e-9):
        return True
    return loose and bool(k) and abs(p - t) <= 0.5 * 10.0 ** -k * (1 + 1e-9)

# -----------------------------------------------------------------------------
# sequences and letters

def _split_seq(s):
    """('()' | '[)' | ... | '', [items]) if s is a tuple/list/interval of 2+ items, else None."""
    brackets, inner = '', s
    if len(s) >= 2 and s[0] in '([{' and s[-1] in ')]}':
        depth = 0
        for i, c in enumerate(s):
            depth += (c in '([{') - (c in ')]}')
            if depth == 0:
                break
        if depth == 0 and i == len(s) - 1:  # the first bracket closes at the very end: it wraps everything
            brackets, inner = s[0] + s[-1], s[1:-1]
    if not brackets and _THOUSANDS.fullmatch(s):
        return None  # 1,000 is a number
    items, depth, start = [], 0, 0
    for i, c in enumerate(inner):
        depth += (c in '([{') - (c in ')]}')
        if c == ',' and depth == 0:
            items.append(inner[start:i].strip())
            start = i + 1
    items.append(inner[start:].strip())
    return (brackets, items) if len(items) >= 2 else None

_LETTER = [re.compile(p, re.S) for p in (
    r'[(\[]([A-Z])[)\]](?:\s.*)?',                              # (B), [B], (B) 12 cm
    r'([A-Z])(?:[.:)](?:\s.*)?)?',                              # B, B., B), B: 12 cm
    r'(?i:option|choice)\s*:?\s*[(\[]?([A-Za-z])[)\]]?(?:[.:]?\s.*)?',  # Option B, option (b)
)]

def _letter(s):
    for pat in _LETTER:
        m = pat.fullmatch(s)
        if m:
            return m.group(1).upper()
    return None

# -----------------------------------------------------------------------------
# matching

def _rhs(p):
    """'x = 5' -> '5' (not for <=, >=, !=)."""
    i = p.rfind('=')
    return p[i + 1:] if i > 0 and p[i - 1] not in '<>!' else p

def _match(p, t, loose=True, depth=0):
    """Normalized prediction p equals normalized truth t (no choices)."""
    kp, kt = _key(p), _key(t)
    if not kp or not kt:
        return False
    if kp == kt:
        return True
    st = _split_seq(t) if depth < 5 else None
    if st is not None:
        sp = _split_seq(p)
        if sp is None or len(sp[1]) != len(st[1]):
            return False
        if len(st[1]) == 2 and sp[0] and st[0] and sp[0] != st[0]:
            return False  # intervals: (0, 1] != (0, 1)
        return all(_match(a, b, loose, depth + 1) for a, b in zip(sp[1], st[1]))
    if '=' in p and '=' not in t:  # 'x = 5' for 5
        p = _rhs(p).strip()
        if _key(p) == kt:
            return True
    nt = _number(t)
    if nt is None:
        return False
    np_ = _number(p)
    return np_ is not None and _close(np_[0], nt[0], nt[1], loose)

def _choice_index(s, opts):
    """Index of the option that s names, by letter or by text, or None."""
    letter = _letter(s)
    if letter is not None and ord(letter) - 65 < len(opts):
        return ord(letter) - 65
    hits = [i for i, o in enumerate(opts) if _match(s, o)]
    if len(hits) > 1:  # '3.1416' matches both '3.14' and '3.1416': keep the closest
        ns = _number(s)
        if ns is not None:
            dist = lambda i: abs(_number(opts[i])[0] - ns[0]) if _number(opts[i]) else math.inf
            hits.sort(key=dist)
    if hits:
        return hits[0]
    m = re.fullmatch(r'[(\[]?([a-z])[)\]]?', s)  # a bare lower-case letter, last resort
    if m and ord(m.group(1)) - 97 < len(opts):
        return ord(m.group(1)) - 97
    return None

def is_equiv(pred, answer, choices=None):
    """Does the prediction (an extracted answer) match the ground truth? See the module doc."""
    if pred is None or answer is None or len(str(pred)) > MAX_PRED_CHARS:
        return False
    p, t = _normalize(pred), _normalize(answer)
    if not p or not t:
        return False
    if choices:
        opts = [_normalize(c) for c in choices]
        ti = _choice_index(t, opts)
        if ti is not None:
            return _choice_index(p, opts) == ti
    tl = _letter(t)
    if tl is not None:
        pl = _letter(p)
        if pl is not None:
            return pl == tl
    return _match(p, t)

# -----------------------------------------------------------------------------
# rewards

def accuracy_reward(completion, answer, choices=None):
    """1.0 if the completion's final answer matches the ground truth, else 0.0."""
    return 1.0 if is_equiv(extract_answer(completion), answer, choices) else 0.0

_TAGS = ('<think>', '</think>', '<answer>', '</answer>')
_END_TOKENS = ('<|im_end|>', '<|endoftext|>')

def format_reward(completion):
    """1.0 iff the completion is <think>...</think> text <answer>non-empty</answer>, each tag
    exactly once, whitespace (and a trailing <|im_end|>) allowed around; else 0.0."""
    s = str(completion or '').strip()
    while s.endswith(_END_TOKENS):
        s = s[:s.rfind('<|')].rstrip()
    if not (s.startswith('<think>') and s.endswith('</answer>')):
        return 0.0
    if any(s.count(tag) != 1 for tag in _TAGS):
        return 0.0
    close_think, open_answer = s.find('</think>'), s.find('<answer>')
    if open_answer < close_think:
        return 0.0
    return 1.0 if s[open_answer + len('<answer>'):-len('</answer>')].strip() else 0.0
