"""
Rewards for GRPO, and the answer matcher eval.py reuses. Pure `str -> float`, standard library
only; model output is never executed (no eval/exec/sympy) and work is bounded (1 MB: ms).
extract_answer(completion) -> str | None: the last complete <answer>...</answer> (spaces inside
the tags allowed; a \\boxed{} inside wins); else the last \\boxed{...}; else a closing "the answer
is X" / "Answer: X" / "the correct option is X" in the last 300 characters; else None.
accuracy_reward also reads a bare completion (no tags, <= 100 characters) as the answer.
is_equiv(pred, truth, choices): a C0 control character other than \\t \\n \\r in pred -> False; a
truth in <answer> tags is unwrapped. Both are normalized (NFKC, unicode digits, LaTeX, \\text{},
$, markdown, "the answer is", a leading "x \\in"; inequalities become intervals: 1 < x \\le 2 ==
(1, 2], x > 3 == (3, \\infty)); then the first rule that applies:
  - choices (option texts for A, B, ...): truth and prediction each resolve to an option by letter
    (B, (B), B., Option B) or exact text, else by value (the closest option; a tie names none),
    and match when the two options' texts do (an option listed twice is right under either letter);
  - a letter truth without choices wants that letter; text is equal ignoring case and spaces;
    'x = 5' counts as 5 when the truth has no '=';
  - tuples/intervals item by item ([0, 1) != [0, 1]); sets {2, 1} == {1, 2}, and a bare truth
    list (x = 1, 2 == 2, 1) against a bare or set prediction, in any order;
  - numbers: thousands (1,000 1{,}000 1,\\!000), units (12 cm, 12 厘米), % and percent dropped
    (50% == 50), degrees, zero..twelve, mixed numbers (2\\frac{1}{2} == 2 1/2 == 2.5), a small
    parser for + - * / ^ \\frac \\sqrt sqrt() \\pi. An integer truth wants an equal integer; other
    truths allow 1e-6 relative or rounding to their decimals (3.14 accepts 3.14159). A sentence
    ending in the number counts (The total is 42); 3x and "12 or 3" are not numbers.
MathVista asks GPT-4 to extract answers; we use no LLM: cheap, deterministic, the same in training
and in eval.
"""

import math
import re
import unicodedata

MAX_PRED_CHARS = 5000   # longer predictions are wrong without further work
MAX_CALC_CHARS = 200    # the arithmetic evaluator gives up on longer inputs
MAX_BOXED_CHARS = 10000  # a \boxed{ whose closing brace is further than this is not an answer
MAX_BARE_CHARS = 100    # a completion with no tags this short may be the bare answer
# whitespace an extracted answer is trimmed of: not the control characters str.strip() also trims
# (\x0b \x0c \x1c-\x1f \x85), so that is_equiv still sees and refuses them
_SPACES = '\t\n\r' + ''.join(c for c in map(chr, range(0x3001))
                           if c.isspace() and unicodedata.category(c) != 'Cc')

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

_PHRASE = re.compile(r'(?:answer|(?:correct|right|best|final)\s+(?:option|choice))\s*(?:is\b|:)',
                     re.I)

def _answer_phrase(tail):
    """X from the last 'the answer is X' / 'answer: X' / 'the correct option is X' in tail, cut at
    the line or sentence end."""
    last = None
    for last in _PHRASE.finditer(tail):
        pass
    if last is None:
        return None
    x = tail[last.end():].lstrip(' \t\n:*')
    x = re.split(r'\n|\.\s', x, maxsplit=1)[0].strip(_SPACES).rstrip('.').strip(_SPACES)
    return x or None

# the last <answer> / </answer>, also written < answer > / < /answer >: a greedy .* anchored at
# the start backtracks from the end, so one linear pass finds the last tag
_OPEN = re.compile(r'.*(<\s{0,4}answer\s{0,4}>)', re.I | re.S)
_CLOSE = re.compile(r'.*(<\s{0,4}/\s{0,4}answer\s{0,4}>)', re.I | re.S)

def _tagged(s):
    """The text inside the last complete <answer>...</answer> of s, or None."""
    end = _CLOSE.match(s)
    start = _OPEN.match(s, 0, end.start(1)) if end else None
    return s[start.end(1):end.start(1)] if start else None

def extract_answer(completion):
    """The model's final answer as a string, or None when it gave none we can find."""
    if not completion:
        return None
    s = str(completion)
    inner = _tagged(s)
    if inner is not None:
        boxed = _last_boxed(inner) if '\\boxed' in inner else None
        return (boxed if boxed is not None else inner).strip(_SPACES)
    boxed = _last_boxed(s)
    if boxed is not None:
        return boxed.strip(_SPACES)
    return _answer_phrase(s[-300:])

# -----------------------------------------------------------------------------
# normalization

# before NFKC (which would turn '²' into a bare '2'), and after it ('½' -> '1⁄2')
_PRE = str.maketrans({'²': '^2', '³': '^3', '−': '-', '–': '-', '×': '*', '÷': '/', '·': '*',
                      'π': '\\pi ', '∞': '\\infty ', '°': '', '\u200b': '', '≤': '\\le ',
                      '≥': '\\ge ', '∈': '\\in '})
_POST = str.maketrans({'⁄': '/', '∕': '/', '٫': '.', '٬': ','})

def _unicode(s):
    s = re.sub(r'√\s*(\d+(?:\.\d+)?)', r'\\sqrt{\1}', s.translate(_PRE))
    s = re.sub('[\u00bc-\u00be\u2150-\u215e]', r' \g<0>', s)  # 2½ -> 2 1/2, a mixed number
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
    (r'(\d)\s*(?:\{,\}|,\\!)\s*(?=\d{3}(?!\d))', r'\1,'),  # 1{,}000 and 1,\!000 -> 1,000
    (r'\\([{}])', r'\1'),          # \{1, 2\} -> {1, 2}
    (r'\\[,!;: ]|\\q?quad\b|~', ' '),
    (r'\\(?:displaystyle|textstyle)\b', ''),
    (r'\\frac\s*(\d)\s*(\d)', r'\\frac{\1}{\2}'),
    (r'\\sqrt\s*(\d)', r'\\sqrt{\1}'),
    (r'\^\{(\w)\}', r'^\1'),
    (r'\+\s*\\infty\b', r'\\infty'),
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
    s = _IN.sub('', s.rstrip('.!?;,:').strip())
    return _interval(s)

_VAR = r'[A-Za-z](?:_\{?\w+\}?)?'  # x, x_1, x_{10}
_IN = re.compile(r'^' + _VAR + r'\s*\\in(?![A-Za-z])\s*')  # 'x \in [1, 2]' -> '[1, 2]'
_REL = re.compile(r'\s*(<=|>=|<|>|\\l[et]q?(?:slant)?|\\g[et]q?(?:slant)?)(?![A-Za-z])\s*')

def _interval(s):
    """'1 < x \\le 2' -> '(1, 2]', 'x > 3' -> '(3, \\infty)', '2 \\ge y' -> '(-\\infty, 2]';
    anything else (a < b, no variable, mixed directions) unchanged."""
    if len(s) > MAX_CALC_CHARS or not re.search(r'[<>]|\\[lg][et]', s):
        return s
    parts = _REL.split(s)
    terms, ops = [x.strip() for x in parts[::2]], parts[1::2]
    isvar = [bool(re.fullmatch(_VAR, x)) for x in terms]
    less = {op.startswith(('<', '\\l')) for op in ops}
    if not all(terms) or len(less) != 1 or len(terms) not in (2, 3) or sum(isvar) != 1:
        return s
    less, opens = less.pop(), ['(' if op in ('<', '>', '\\lt', '\\gt') else '[' for op in ops]
    if len(terms) == 3:
        if not isvar[1]:
            return s
        (lo, hi), (a, b) = (terms[::2], opens) if less else (terms[::-2], opens[::-1])
        return f'{a}{lo}, {hi}{")" if b == "(" else "]"}'
    bound, op = terms[isvar.index(False)], opens[0]
    if less == isvar[0]:  # x < 2, 2 > x: bounded above
        return f'(-\\infty, {bound}{")" if op == "(" else "]"}'
    return f'{op}{bound}, \\infty)'

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
_IMPLICIT = {'(', '{', '\\frac', '\\sqrt', 'sqrt', '\\pi', 'pi'}  # 2\sqrt{3}, 2\pi, 3(4); never 2 3

class _Calc:
    """Recursive descent over + - * / ^, ( ), { }, \\frac, \\sqrt[n], sqrt(), \\pi. Floats only;
    raises _Bad."""
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
        if tok in ('\\sqrt', 'sqrt'):
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
    """(value, decimals) of a plain literal like '-1,234.50' or '1e3'; decimals None if exponent.
    An integer literal is an exact int with 0 decimals."""
    s = re.sub(r'^([+-])\s+', r'\1', s.strip())
    if _THOUSANDS.fullmatch(s):
        s = s.replace(',', '').replace(' ', '')
    if not _PLAIN.fullmatch(s):
        return None
    if 'e' in s.lower():
        return float(s), None
    return (float(s), len(s.split('.')[1])) if '.' in s else (int(s), 0)

_MIXED = re.compile(r'([+-]?)(\d+)(?:\s*\\frac\{(\d+)\}\{(\d+)\}|\s+(\d+)/(\d+))')

def _mixed(s):
    """(value, None) of a mixed number, an integer then a proper fraction: 2\\frac{1}{2}, 2 1/2."""
    m = _MIXED.fullmatch(s)
    if not m:
        return None
    n, d = int(m.group(3) or m.group(5)), int(m.group(4) or m.group(6))
    if not 0 < n < d:
        return None  # 2\\frac{3}{2} is a product
    return (-1 if m.group(1) == '-' else 1) * (int(m.group(2)) + n / d), None

def _unit_ok(unit):
    words = re.findall(r'[A-Za-z]+', unit)
    return all((len(w) > 1 or w in _UNIT_LETTERS) and w.lower() not in _NOT_UNITS for w in words)

_CJK_UNIT = re.compile(r'(?<=\S)\s*[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]+$')

def _number(s):
    """(value, decimals) of a numeric answer, units, %, $ and degrees dropped; None if not one."""
    s = s.strip()
    if len(s) > MAX_CALC_CHARS:
        return None
    if s.lower() in _WORDS:
        return _WORDS[s.lower()], 0
    s = _CJK_UNIT.sub('', s).lstrip('£€¥').rstrip('%').strip()  # 12 厘米, 3 个
    r = _plain(s)
    if r is None:
        m = _UNIT.search(s)
        if m and m.start() > 0 and _unit_ok(m.group()):
            s = s[:m.start()].rstrip().rstrip('%').strip()
            r = _plain(s)
    r = r or _mixed(s)
    if r is None:
        v = _calc(s)
        r = None if v is None else (v, None)
    return r if r is not None and math.isfinite(r[0]) else None

def _close(p, t, k, loose=True):
    """p equals truth t: an integer truth (k == 0) wants an equal integer (float noise aside);
    others within 1e-6 relative, or (loose) when p rounds to t's k decimals."""
    if k == 0:
        return p == t if isinstance(p, int) else math.isclose(p, t, rel_tol=1e-15, abs_tol=1e-9)
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

# 'The total is 42', 'There are 42 apples', 'Total: 42': words, a verb or colon, then the number
_SENTENCE = re.compile(r"[A-Za-z][A-Za-z' ,]*?(?:\s(?:is|are|was|were|be|equals?)|:)"
                       r"\s+([^A-Za-z\s].*)", re.I | re.S)

def _sentence_number(p):
    """(value, decimals) of the number that ends a sentence like 'The total is 42', or None."""
    m = _SENTENCE.fullmatch(p) if len(p) <= MAX_CALC_CHARS else None
    return _number(m.group(1)) if m else None

def _match(p, t, loose=True, depth=0):
    """Normalized prediction p equals normalized truth t (no choices)."""
    kp, kt = _key(p), _key(t)
    if not kp or not kt:
        return False
    if kp == kt:
        return True
    if '=' in p and '=' not in t:  # 'x = 5' for 5, 'x = 1, 2' for 2, 1
        r = _rhs(p).strip()
        if r != p and _match(r, t, loose, depth + 1):
            return True
    st = _split_seq(t) if depth < 5 else None
    if st is not None:
        return _match_seq(_split_seq(p), st, loose, depth)
    nt = _number(t)
    if nt is None:
        return False
    np_ = _number(p) or _sentence_number(p)
    return np_ is not None and _close(np_[0], nt[0], nt[1], loose)

def _match_seq(sp, st, loose, depth):
    """Split prediction sp matches split truth st: item by item, or in any order for a set truth
    or a bare truth list against a bare or set prediction."""
    if sp is None or len(sp[1]) != len(st[1]):
        return False
    (bp, ps), (bt, ts) = sp, st
    if len(ts) == 2 and bp and bt and bp != bt:
        return False  # intervals: (0, 1] != (0, 1)
    if (bt == '{}' or (not bt and bp in ('', '{}'))) and len(ts) <= 20:
        ok = [[_match(a, b, loose, depth + 1) for b in ts] for a in ps]
        owner = [None] * len(ts)  # truth item j -> the prediction item matched to it

        def place(i, seen):  # augmenting path: a perfect matching, not a greedy one
            for j in range(len(ts)):
                if ok[i][j] and j not in seen:
                    seen.add(j)
                    if owner[j] is None or place(owner[j], seen):
                        owner[j] = i
                        return True
            return False
        return all(place(i, set()) for i in range(len(ps)))
    return all(_match(a, b, loose, depth + 1) for a, b in zip(ps, ts))

def _choice_index(s, opts):
    """Index of the option that s names by letter or exact text, else by value (the closest
    option; a tie between different options names none), or None. An option listed twice is one
    answer: its text names the first copy."""
    letter = _letter(s)
    if letter is not None and ord(letter) - 65 < len(opts):
        return ord(letter) - 65
    keys = [_key(o) for o in opts]
    if _key(s) in keys:
        return keys.index(_key(s))
    m = re.fullmatch(r'[(\[]?([a-z])[)\]]?', s)  # a bare lower-case letter
    if m and ord(m.group(1)) - 97 < len(opts):
        return ord(m.group(1)) - 97
    hits = [i for i, o in enumerate(opts) if _match(s, o)]
    if len({keys[i] for i in hits}) > 1:  # '3.1416' matches both '3.14' and '3.1416': the closest
        ns, vals = _number(s), [_number(opts[i]) for i in hits]
        if ns is None or None in vals:
            return None
        dist = [abs(v[0] - ns[0]) for v in vals]
        best = min(dist)
        hits = [i for i, d in zip(hits, dist) if d == best]
    return hits[0] if len({keys[i] for i in hits}) == 1 else None

_CONTROL = re.compile(r'[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]')  # C0 controls but \t \n \r; DEL

def _untag(s):
    """A ground truth written '<answer>42</answer>' -> '42'."""
    inner = _tagged(s) if '<' in s and len(s) <= MAX_PRED_CHARS else None
    return s if inner is None else inner.strip()

def is_equiv(pred, answer, choices=None):
    """Does the prediction (an extracted answer) match the ground truth? See the module doc."""
    if pred is None or answer is None or len(str(pred)) > MAX_PRED_CHARS:
        return False
    if _CONTROL.search(str(pred)):
        return False  # '4\x002' is not 42
    p, t = _normalize(pred), _normalize(_untag(str(answer)))
    if not p or not t:
        return False
    if choices:
        opts = [_normalize(c) for c in choices]
        ti = _choice_index(t, opts)
        if ti is not None:
            # the same text: an option listed twice (9, 12, 18, 18) is right under either letter
            pi = _choice_index(p, opts)
            return pi is not None and _key(opts[pi]) == _key(opts[ti])
    tl = _letter(t)
    if tl is not None:
        pl = _letter(p)
        if pl is not None:
            return pl == tl
    return _match(p, t)

# -----------------------------------------------------------------------------
# rewards

_TAGGED = re.compile(r'<\s*/?\s*(?:think|answer)|\\boxed', re.I)

def accuracy_reward(completion, answer, choices=None):
    """1.0 if the completion's final answer matches the ground truth, else 0.0. A short completion
    with no tags and no answer phrase is read as a bare answer ('42', 'B')."""
    pred = extract_answer(completion)
    if pred is None and completion is not None:
        bare = str(completion).strip(_SPACES)
        if len(bare) <= MAX_BARE_CHARS and not _TAGGED.search(bare):
            pred = bare
    return 1.0 if is_equiv(pred, answer, choices) else 0.0

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
