"""Split long input text into chunks a TTS model handles well.

Only text longer than ``max_chars`` (after stripping) is touched; shorter text
is handed back as the very same ``str`` object, so single-chunk requests feed
the model exactly what the official package would.

Long text is split hierarchically, each level only where the one above left a
piece longer than ``max_chars``:

1. sentences and line breaks (English ``. ! ? …``, CJK ``。！？；…｡``);
2. clauses (``, ; :`` followed by whitespace, CJK ``，、；：``, a dash ``—``);
3. whitespace;
4. a hard cut every ``max_chars`` characters (CJK without spaces, or one
   enormous token), backed off so that Latin words/URLs, closing punctuation
   and combining marks are not cut when there is room to avoid it.

At each level neighbouring pieces are packed greedily into chunks of at most
``max_chars`` characters. Every chunk is a stripped slice of the original text,
so chunks are never empty, appear in order, and together contain every
non-whitespace character of the input exactly once.

Sentence ends in English are recognised heuristically: the terminator must be
followed by whitespace (or a CJK character) and the next word must not start
with a lowercase letter; decimals/versions (``3.14``, ``v1.2.3``), URLs and
e-mails are therefore never split, and titles (``Mr. Dr. St. vs. …``), dotted
acronyms (``U.S. e.g. i.e. Ph.D.``), numbered abbreviations (``No. 5``,
``Fig. 3``), initials (``J. R. R. Tolkien``) and list markers (``1. Item``)
do not end a sentence. An ellipsis inside an open double quote does not end a
sentence either. When in doubt the splitter does *not* split, which only ever
makes a sentence-level piece longer (and lower levels still enforce the limit).
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["split_sentences", "split_text", "voice_design_prefix"]

# --------------------------------------------------------------------------- characters

_CJK_TERMINATORS = "。！？；｡"
_ELLIPSIS = "…"
_TERMINATOR_RUN = re.compile(r"[.!?。！？；｡…]+")
# Characters that close a sentence after its terminator and belong to it.
_CLOSERS = "\"'”’»」』）)]】》〕〉"
# Opening quotes/brackets that may precede a word.
_OPENERS = "\"'“‘«「『（([【《〔〈"
_CLAUSE_ASCII = ",;:"
_CLAUSE_CJK = "，、；："


def _is_cjk(ch: str) -> bool:
    """True for characters of scripts written without spaces (Han, kana, Hangul) and CJK punctuation."""
    o = ord(ch)
    return (
        0x3000 <= o <= 0x303F  # CJK symbols and punctuation
        or 0x3040 <= o <= 0x30FF  # hiragana, katakana
        or 0x3100 <= o <= 0x312F  # bopomofo
        or 0x3130 <= o <= 0x318F  # hangul compatibility jamo
        or 0x3400 <= o <= 0x4DBF  # CJK ext A
        or 0x4E00 <= o <= 0x9FFF  # CJK unified
        or 0xAC00 <= o <= 0xD7AF  # hangul syllables
        or 0xF900 <= o <= 0xFAFF  # CJK compatibility ideographs
        or 0xFF00 <= o <= 0xFFEF  # half/full-width forms
        or 0x20000 <= o <= 0x2FA1F  # CJK ext B..F, compatibility supplement
    )


def _is_word_char(ch: str) -> bool:
    """Part of a non-CJK token we would rather not cut (Latin words, numbers, URLs)."""
    return not ch.isspace() and not _is_cjk(ch)


# --------------------------------------------------------------------------- abbreviations

# Never end a sentence, whatever follows (titles, Latin abbreviations, dotted acronyms).
_ALWAYS_ABBREV = frozenset(
    """
    mr mrs ms mx dr prof sr jr st mt ft vs v gen col lt sgt capt cmdr adm maj rev hon gov sen rep pres
    messrs mme mlle e.g i.e cf viz u.s u.k u.n u.s.a ph.d approx dept univ assn bros
    """.split()
)
# Do not end a sentence when the next word starts with a digit ("No. 5", "Fig. 3").
_NUMBER_ABBREV = frozenset("no nos fig figs vol vols p pp ch chap sec eq eqs art op tab ex".split())
# Dotted acronyms: U.S.A, Ph.D, e.g, a.m -- segments of one or two letters.
_DOTTED_ACRONYM = re.compile(r"^(?:[A-Za-z]{1,2}\.)+[A-Za-z]{1,2}$")
# Dotted abbreviations that commonly end sentences too; split when a capital follows.
_SENTENCE_FINAL_OK = frozenset("a.m p.m".split())
_INITIAL = re.compile(r"^[" + re.escape(_OPENERS) + r"]*[A-Z]\.")
# an initial ("J.") right before the current token, e.g. the "M." in "I. M. Pei" seen from "M"
_PREV_INITIAL = re.compile(r"(?:^|[\s" + re.escape(_OPENERS) + r"])[A-Z]\.\s+$")


def _token_before(text: str, end: int) -> str:
    """The whitespace-delimited token ending at ``end`` with leading openers removed."""
    start = end
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    return text[start:end].lstrip(_OPENERS)


def _next_word(text: str, pos: int) -> tuple[str, bool]:
    """(next whitespace-delimited token after ``pos`` with openers stripped, whether a newline was skipped)."""
    n = len(text)
    i = pos
    newline = False
    while i < n and text[i].isspace():
        newline = newline or text[i] in "\n\r\u2028\u2029"
        i += 1
    j = i
    while j < n and not text[j].isspace():
        j += 1
    return text[i:j].lstrip(_OPENERS), newline


class _QuoteState:
    """Incremental double-quote balance of the current line, for positions queried in increasing order."""

    __slots__ = ("text", "pos", "curly", "straight")

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.curly = 0
        self.straight = 0

    def inside(self, pos: int) -> bool:
        """Whether ``pos`` lies inside an unclosed double quote of its line (linear over all queries)."""
        text = self.text
        nl = text.rfind("\n", self.pos, pos)
        if nl >= 0:
            self.pos, self.curly, self.straight = nl + 1, 0, 0
        seg = text[self.pos : pos]
        self.curly += seg.count("“") - seg.count("”")
        self.straight += seg.count('"')
        self.pos = max(self.pos, pos)
        return self.curly > 0 or self.straight % 2 == 1


def _is_sentence_end(text: str, run_start: int, run_end: int, end: int, quotes: _QuoteState) -> bool:
    """Decide whether the terminator run ``text[run_start:run_end]`` (closers up to ``end``) ends a sentence."""
    run = text[run_start:run_end]
    if any(c in _CJK_TERMINATORS for c in run):
        return True
    if end >= len(text):
        return True
    nxt = text[end]
    if _is_cjk(nxt):
        return True
    if not nxt.isspace():
        return False  # 3.14, v1.2, a.b@c.com, http://x.y/?q, "Yahoo!Inc"
    word, newline = _next_word(text, end)
    if newline or not word:
        return True
    first = word[0]
    if first.islower():
        return False  # "e.g. this", "etc. and", '"Stop!" she said', "Well... maybe"
    if "!" in run or "?" in run:
        return True
    if _ELLIPSIS in run or len(run) >= 2:
        # ellipsis ("...", "…", "……"): a pause inside an open quote, else a sentence end
        return not quotes.inside(run_start)

    # A single ".": check the token it closes.
    token = _token_before(text, run_start)
    if not token:
        return True
    low = token.lower()
    if low in _SENTENCE_FINAL_OK:
        return True
    if low in _ALWAYS_ABBREV:
        return False
    if low in _NUMBER_ABBREV and first.isdigit():
        return False
    if _DOTTED_ACRONYM.match(token):
        return False
    if len(token) == 1 and token.isalpha() and token.isupper():
        # initial ("J. R. R. Tolkien"); a lone "I" is an initial only next to other initials
        if token != "I":
            return False
        if _INITIAL.match(word):
            return False
        return not _PREV_INITIAL.search(text, max(0, run_start - 24), run_start - 1)
    if token.isdigit() and len(token) <= 3:
        # list marker "1. Item" at the start of a line
        i = run_start - len(token) - 1
        while i >= 0 and text[i] in " \t\u3000":
            i -= 1
        if i < 0 or text[i] in "\n\r\u2028\u2029":
            return False
    return True


# --------------------------------------------------------------------------- boundaries per level

_LEVEL_SENTENCE, _LEVEL_CLAUSE, _LEVEL_SPACE, _LEVEL_CHAR = range(4)


def _sentence_cuts(text: str, s: int, e: int) -> list[int]:
    """Cut positions (exclusive sentence ends) inside ``[s, e)``: after sentences and at line breaks."""
    cuts: list[int] = []
    quotes = _QuoteState(text)
    for m in _TERMINATOR_RUN.finditer(text, s, e):
        run_start, run_end = m.start(), m.end()
        end = run_end
        while end < e and text[end] in _CLOSERS:
            end += 1
        if _is_sentence_end(text, run_start, run_end, end, quotes):
            cuts.append(end)
    for i in range(s, e):
        if text[i] in "\n\r\u2028\u2029":
            cuts.append(i)
    return cuts


def _clause_cuts(text: str, s: int, e: int) -> list[int]:
    cuts: list[int] = []
    for i in range(s, e):
        ch = text[i]
        if ch in _CLAUSE_CJK or ch == "—" and i + 1 < e and text[i + 1] != "—":
            j = i + 1
            while j < e and text[j] in _CLOSERS:
                j += 1
            cuts.append(j)
        elif ch in _CLAUSE_ASCII and i + 1 < e and text[i + 1].isspace():
            cuts.append(i + 1)
    return cuts


def _space_cuts(text: str, s: int, e: int) -> list[int]:
    return [i for i in range(s + 1, e) if text[i].isspace() and not text[i - 1].isspace()]


def _hard_cuts(text: str, s: int, e: int, max_chars: int) -> list[tuple[int, int]]:
    """Cut ``[s, e)`` (already stripped) into pieces of at most ``max_chars`` characters."""
    pieces: list[tuple[int, int]] = []
    while e - s > max_chars:
        cut = s + max_chars
        # keep a Latin word / number / URL whole if it started inside this piece
        if _is_word_char(text[cut - 1]) and _is_word_char(text[cut]):
            k = cut
            while k > s and _is_word_char(text[k - 1]):
                k -= 1
            if k > s:
                cut = k
        # keep closing punctuation with what it closes
        k = cut
        while k > s + 1 and (text[k] in _CLOSERS or text[k] in "。！？；，、：｡…"):
            k -= 1
        if k > s + 1:
            cut = k
        # do not split combining marks / joiner sequences off their base character
        while cut > s + 1 and (
            unicodedata.combining(text[cut]) or text[cut] in "\u200d\ufe0e\ufe0f" or text[cut - 1] == "\u200d"
        ):
            cut -= 1
        pieces.append(_strip(text, s, cut))
        s, e = _strip(text, cut, e)
    if e > s:
        pieces.append((s, e))
    return [p for p in pieces if p[1] > p[0]]


# --------------------------------------------------------------------------- packing


def _strip(text: str, s: int, e: int) -> tuple[int, int]:
    while s < e and text[s].isspace():
        s += 1
    while e > s and text[e - 1].isspace():
        e -= 1
    return s, e


def _pieces(text: str, s: int, e: int, cuts: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    prev = s
    for c in sorted(set(cuts)):
        if s < c < e:
            ps, pe = _strip(text, prev, c)
            if pe > ps:
                out.append((ps, pe))
            prev = c
    ps, pe = _strip(text, prev, e)
    if pe > ps:
        out.append((ps, pe))
    return out


def _split_span(text: str, s: int, e: int, level: int, max_chars: int) -> list[tuple[int, int]]:
    s, e = _strip(text, s, e)
    if e <= s:
        return []
    if e - s <= max_chars:
        return [(s, e)]
    if level == _LEVEL_CHAR:
        return _hard_cuts(text, s, e, max_chars)
    if level == _LEVEL_SENTENCE:
        cuts = _sentence_cuts(text, s, e)
    elif level == _LEVEL_CLAUSE:
        cuts = _clause_cuts(text, s, e)
    else:
        cuts = _space_cuts(text, s, e)

    out: list[tuple[int, int]] = []
    cur: tuple[int, int] | None = None
    for ps, pe in _pieces(text, s, e, cuts):
        if pe - ps > max_chars:
            if cur is not None:
                out.append(cur)
                cur = None
            out.extend(_split_span(text, ps, pe, level + 1, max_chars))
        elif cur is None:
            cur = (ps, pe)
        elif pe - cur[0] <= max_chars:
            cur = (cur[0], pe)
        else:
            out.append(cur)
            cur = (ps, pe)
    if cur is not None:
        out.append(cur)
    return out


def split_text(text: str, max_chars: int = 200) -> list[str]:
    """Split ``text`` into chunks of at most ``max_chars`` characters, at the most natural boundaries.

    If ``len(text.strip()) <= max_chars`` the result is ``[text]`` with the
    original object, unstripped and unnormalised (also for empty or
    whitespace-only text -- callers validate emptiness). Otherwise every chunk
    is a non-empty, stripped, in-order slice of ``text``; whitespace inside a
    chunk is kept as written (line breaks included).
    """
    if max_chars < 1:
        raise ValueError("max_chars must be >= 1")
    if len(text.strip()) <= max_chars:
        return [text]
    return [text[s:e] for s, e in _split_span(text, 0, len(text), _LEVEL_SENTENCE, max_chars)]


def split_sentences(text: str) -> list[str]:
    """The sentence-level pieces of ``text`` (sentences and lines), stripped, without packing or length limit.

    This is level 1 of :func:`split_text`, exposed for callers and tests that
    want the raw segmentation.
    """
    s, e = _strip(text, 0, len(text))
    return [text[ps:pe] for ps, pe in _pieces(text, s, e, _sentence_cuts(text, s, e))]


# --------------------------------------------------------------------------- voice design

_OPEN_PARENS = "(（"
_CLOSE_PARENS = ")）"


def voice_design_prefix(text: str) -> tuple[str, str]:
    """Separate a VoxCPM2 voice-design description ``(...)`` / ``（...）`` from the start of ``text``.

    Returns ``(prefix, rest)`` with ``prefix + rest == text``: ``prefix`` runs
    from the start (including any leading whitespace) through the matching
    closing parenthesis (ASCII and full-width parentheses may be mixed, nesting
    is honoured), ``rest`` is the untouched remainder. Returns ``("", text)``
    when there is no leading parenthesis, it is never closed, the description
    is empty, or nothing but whitespace follows it (then the whole input is the
    text to speak).
    """
    i = 0
    n = len(text)
    while i < n and text[i].isspace():
        i += 1
    if i >= n or text[i] not in _OPEN_PARENS:
        return "", text
    depth = 0
    for j in range(i, n):
        ch = text[j]
        if ch in _OPEN_PARENS:
            depth += 1
        elif ch in _CLOSE_PARENS:
            depth -= 1
            if depth == 0:
                prefix, rest = text[: j + 1], text[j + 1 :]
                if not text[i + 1 : j].strip() or not rest.strip():
                    return "", text
                return prefix, rest
    return "", text
