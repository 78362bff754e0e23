"""Unit tests for voxcpm_api.textsplit."""

from __future__ import annotations

import random
import re

import pytest

from voxcpm_api.textsplit import split_sentences, split_text, voice_design_prefix

_WS = re.compile(r"\s+")


def nonspace(s: str) -> str:
    return _WS.sub("", s)


def check_invariants(text: str, chunks: list[str], max_chars: int) -> None:
    """Properties every split must have."""
    if len(text.strip()) <= max_chars:
        assert len(chunks) == 1 and chunks[0] is text
        return
    assert chunks, "long text produced no chunks"
    pos = 0
    for c in chunks:
        assert c.strip(), f"empty chunk in {chunks!r}"
        assert c == c.strip()
        assert len(c) <= max_chars, (len(c), c)
        i = text.find(c, pos)
        assert i >= 0, f"chunk {c!r} is not an in-order slice"
        assert text[pos:i].strip() == "", f"lost {text[pos:i]!r}"
        pos = i + len(c)
    assert text[pos:].strip() == ""
    # no loss of non-space characters, whatever the joiner
    assert nonspace(" ".join(chunks)) == nonspace(text)
    assert nonspace("".join(chunks)) == nonspace(text)


def split(text: str, max_chars: int) -> list[str]:
    chunks = split_text(text, max_chars)
    check_invariants(text, chunks, max_chars)
    return chunks


# --------------------------------------------------------------------------- short text


@pytest.mark.parametrize(
    "text",
    ["Hello world.", "  padded text with spaces  \n", "你好，世界。", "", "   ", "x" * 200,
     " " * 5 + "y" * 200 + " " * 5],
)
def test_short_text_is_returned_as_identical_object(text):
    out = split_text(text)
    assert out == [text]
    assert out[0] is text


def test_boundary_length():
    t = "a" * 20
    assert split_text(t, 20)[0] is t
    assert split_text(t + "a", 20) == ["a" * 20, "a"]


def test_invalid_max_chars():
    with pytest.raises(ValueError):
        split_text("hello", 0)


# --------------------------------------------------------------------------- English


EN_PARAGRAPH = (
    "The quick brown fox jumps over the lazy dog. It was a sunny day in the park! "
    "Children were playing near the fountain, and their parents watched from the benches. "
    "Did anyone notice the clouds gathering in the west? Not really. "
    "By the afternoon, a light rain had started to fall, and everybody hurried home."
)


def test_english_paragraph_splits_at_sentences():
    chunks = split(EN_PARAGRAPH, 100)
    assert len(chunks) >= 3
    for c in chunks:
        assert c[-1] in ".!?", c
    assert chunks[0] == "The quick brown fox jumps over the lazy dog. It was a sunny day in the park!"


def test_english_each_sentence_when_small_limit():
    chunks = split(EN_PARAGRAPH, 60)
    assert "Not really." in " ".join(chunks)
    assert any(c.endswith("Did anyone notice the clouds gathering in the west? Not really.") for c in chunks) or (
        "Not really." in chunks
    )


def sentences(text: str) -> list[str]:
    """Sentence-level segmentation, checked to be consistent with split_text."""
    out = split_sentences(text)
    assert nonspace("".join(out)) == nonspace(text)
    longest = max(len(s) for s in out)
    if len(out) > 1:
        # with a limit of the longest sentence, no chunk may straddle a sentence boundary
        # in the middle of a sentence: every chunk is a run of whole sentences
        for chunk in split(text, longest):
            assert any(chunk.startswith(s) for s in out) and any(chunk.endswith(s) for s in out), chunk
    return out


def test_decimals_and_versions_not_split():
    text = "The price rose to 3.14 dollars today. Version 2.0.1 fixed the bug. Pi is about 3.14159 exactly."
    chunks = sentences(text)
    assert chunks == [
        "The price rose to 3.14 dollars today.",
        "Version 2.0.1 fixed the bug.",
        "Pi is about 3.14159 exactly.",
    ]


@pytest.mark.parametrize(
    "sentence",
    [
        "Mr. Smith and Mrs. Smith met Ms. Jones.",
        "Dr. Brown asked Prof. White about it.",
        "Martin Luther King Jr. was born in Atlanta.",
        "They walked down St. James Street slowly.",
        "It was Ali vs. Frazier in the ring.",
        "Bring apples, pears, etc. and some bread.",
        "Use a tool, e.g. a hammer or a wrench.",
        "One fruit, i.e. an apple, is enough.",
        "The U.S. Army arrived in the morning.",
        "We met at 9 a.m. and left by noon.",
        "The train leaves at 5 p.m. tomorrow.",
        "See Fig. 3 for the full details.",
        "He lives at No. 10 Downing Street.",
        "Sr. Garcia will speak after lunch.",
    ],
)
def test_abbreviations_do_not_end_sentences(sentence):
    text = sentence + " " + "This is the next sentence here. And then one more sentence."
    assert sentences(text)[0] == sentence
    assert split(text, 45)[0] == sentence


def test_english_sentence_segmentation():
    assert sentences(EN_PARAGRAPH) == [
        "The quick brown fox jumps over the lazy dog.",
        "It was a sunny day in the park!",
        "Children were playing near the fountain, and their parents watched from the benches.",
        "Did anyone notice the clouds gathering in the west?",
        "Not really.",
        "By the afternoon, a light rain had started to fall, and everybody hurried home.",
    ]


def test_abbreviation_that_ends_a_sentence():
    text = "We bought apples, pears, etc. Then we went home. The meeting ends at 5 p.m. Everyone leaves then."
    assert sentences(text) == [
        "We bought apples, pears, etc.",
        "Then we went home.",
        "The meeting ends at 5 p.m.",
        "Everyone leaves then.",
    ]


def test_initials():
    text = "J. R. R. Tolkien wrote many books. I. M. Pei designed the pyramid. So did I. Then we left."
    assert sentences(text) == [
        "J. R. R. Tolkien wrote many books.",
        "I. M. Pei designed the pyramid.",
        "So did I.",
        "Then we left.",
    ]


def test_list_markers_stay_with_item():
    text = "Shopping list for the week ahead:\n1. Fresh vegetables and fruit\n2. Bread and cheese\n3. Milk"
    assert sentences(text) == [
        "Shopping list for the week ahead:",
        "1. Fresh vegetables and fruit",
        "2. Bread and cheese",
        "3. Milk",
    ]
    chunks = split(text, 30)
    assert "1. Fresh vegetables and fruit" in chunks
    assert any(c.startswith("2. Bread") for c in chunks)


def test_quotes_and_ellipses():
    text = (
        '"Well... I really don\'t know," she said quietly. "Stop!" he cried out loud. '
        "He waited... Nothing happened at all. \"I was thinking...\" she began again."
    )
    assert sentences(text) == [
        '"Well... I really don\'t know," she said quietly.',  # ellipsis inside an open quote
        '"Stop!" he cried out loud.',  # lowercase word after the closing quote
        "He waited...",
        "Nothing happened at all.",
        '"I was thinking..." she began again.',
    ]
    for c in split(text, 50):
        assert not c.startswith('"' + " ")


def test_unicode_ellipsis_and_question_exclamation():
    text = "Wait… What was that?! Nobody answered… Hmm? OK!"
    assert sentences(text) == ["Wait…", "What was that?!", "Nobody answered…", "Hmm?", "OK!"]
    assert split(text, 21) == ["Wait… What was that?!", "Nobody answered… Hmm?", "OK!"]
    assert sentences("He paused… and then went on. Done.") == ["He paused… and then went on.", "Done."]


def test_urls_and_emails_not_broken():
    text = (
        "Please visit https://example.com/docs/v1.2/index.html?lang=en&x=1 for more. "
        "Write to first.last@mail.example.org if it fails. Thanks."
    )
    chunks = split(text, 80)
    joined = " ".join(chunks)
    assert "https://example.com/docs/v1.2/index.html?lang=en&x=1" in joined
    assert any("https://example.com/docs/v1.2/index.html?lang=en&x=1" in c for c in chunks)
    assert any("first.last@mail.example.org" in c for c in chunks)


def test_long_sentence_splits_at_clauses():
    text = (
        "When the committee finally met, after weeks of delay, the members discussed the budget, "
        "the schedule, and the staffing plan; nobody agreed on anything: the chair adjourned early."
    )
    chunks = split(text, 60)
    assert len(chunks) >= 3
    for c in chunks[:-1]:
        assert c[-1] in ",;:", c


def test_very_long_sentence_without_punctuation_splits_at_whitespace():
    words = [f"word{i}" for i in range(200)]
    text = " ".join(words)
    chunks = split(text, 50)
    for c in chunks:
        for w in c.split():
            assert w in words  # never cut inside a word
    assert len(chunks) == pytest.approx(len(text) / 50, rel=0.3)


def test_single_huge_token_is_hard_cut():
    text = "x" * 450
    assert split(text, 200) == ["x" * 200, "x" * 200, "x" * 50]


def test_line_breaks_are_boundaries():
    text = "Chapter One\nIt was a dark and stormy night\nThe end"
    chunks = split(text, 30)
    assert chunks == ["Chapter One", "It was a dark and stormy night", "The end"]


# --------------------------------------------------------------------------- Chinese / Japanese / mixed


ZH_PARAGRAPH = (
    "今天天气很好，阳光明媚。我们一起去公园散步吧！你觉得怎么样？"
    "公园里有很多人，有的在跑步，有的在下棋；孩子们在草地上玩耍……"
    "傍晚的时候，我们才慢慢地走回家。"
)


def test_chinese_paragraph_splits_at_sentences():
    chunks = split(ZH_PARAGRAPH, 20)
    assert chunks[0] == "今天天气很好，阳光明媚。"
    assert "我们一起去公园散步吧！你觉得怎么样？" in chunks
    for c in chunks:
        assert c[-1] in "。！？；…，", c
    assert "".join(chunks) == ZH_PARAGRAPH


def test_chinese_long_sentence_splits_at_commas():
    text = "这是一个非常长的句子，里面有很多逗号，每一段都不算太长，但是合在一起就超过了限制，所以需要在逗号处切开。"
    chunks = split(text, 20)
    assert len(chunks) >= 3
    for c in chunks[:-1]:
        assert c[-1] in "，、", c
    assert "".join(chunks) == text


def test_cjk_without_punctuation_hard_cut():
    text = "我" * 45 + "们" * 30
    chunks = split(text, 20)
    assert [len(c) for c in chunks] == [20, 20, 20, 15]
    assert "".join(chunks) == text


def test_cjk_hard_cut_keeps_latin_words():
    text = "我们今天使用Python语言和TensorFlow框架编写一个没有任何标点符号的很长很长的句子来测试切分功能是否正常工作"
    chunks = split(text, 12)
    joined = "".join(chunks)
    assert joined == text
    assert any("Python" in c for c in chunks)
    assert any("TensorFlow" in c for c in chunks)


def test_japanese():
    text = "今日はいい天気ですね。散歩に行きましょうか？はい、行きましょう！" * 3
    chunks = split(text, 25)
    for c in chunks:
        assert c[-1] in "。？！", c
    assert "".join(chunks) == text


def test_closing_quotes_stay_with_cjk_sentence():
    text = "他说：“今天真冷啊！”然后走了。「明日は雨です。」と彼女は言った。" * 2
    chunks = split(text, 16)
    for c in chunks:
        assert c[0] not in "”」", c


def test_mixed_english_chinese():
    text = (
        "VoxCPM is a tokenizer-free TTS model. 它可以生成非常自然的语音。"
        "It supports Chinese and English! 你可以试一试，效果很好。Version 1.5 is out."
    )
    chunks = split(text, 40)
    assert "VoxCPM is a tokenizer-free TTS model." in chunks[0]
    assert any("Version 1.5 is out." in c for c in chunks)
    assert nonspace("".join(chunks)) == nonspace(text)


def test_ascii_punctuation_directly_before_cjk():
    text = "Hello!你好。Really?真的吗？OK.好的。"
    assert sentences(text) == ["Hello!", "你好。", "Really?", "真的吗？", "OK.", "好的。"]
    assert split(text, 11) == ["Hello!你好。", "Really?真的吗？", "OK.好的。"]


# --------------------------------------------------------------------------- voice design prefix


@pytest.mark.parametrize(
    ("text", "prefix", "rest"),
    [
        ("(A young woman, gentle and warm)Hello there.", "(A young woman, gentle and warm)", "Hello there."),
        ("(calm male voice) Good morning.", "(calm male voice)", " Good morning."),
        ("（温柔的女声）你好，欢迎光临。", "（温柔的女声）", "你好，欢迎光临。"),
        ("（mixed parens)Hi.", "（mixed parens)", "Hi."),
        ("(outer (inner) desc)Text.", "(outer (inner) desc)", "Text."),
        ("  (leading space)Text.", "  (leading space)", "Text."),
        ("No prefix here (not at start).", "", "No prefix here (not at start)."),
        ("(never closed text", "", "(never closed text"),
        ("()Empty description.", "", "()Empty description."),
        ("(only a description)", "", "(only a description)"),
        ("(description)   ", "", "(description)   "),
        ("", "", ""),
    ],
)
def test_voice_design_prefix(text, prefix, rest):
    p, r = voice_design_prefix(text)
    assert (p, r) == (prefix, rest)
    assert p + r == text


def test_prefix_then_split_roundtrip():
    text = "(A deep, slow narrator voice)" + EN_PARAGRAPH
    prefix, rest = voice_design_prefix(text)
    assert prefix == "(A deep, slow narrator voice)"
    chunks = split(rest, 100)
    assert len(chunks) > 1
    assert nonspace("".join(chunks)) == nonspace(rest)
    assert all(not c.startswith("(") for c in chunks)
    short = "(warm voice)Hi."
    p, r = voice_design_prefix(short)
    only = split_text(r)
    assert only[0] is r and p + only[0] == short


# --------------------------------------------------------------------------- no-loss property


_ALPHABET = (
    list("abcdefghijklmnopqrstuvwxyz")
    + list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    + list("0123456789")
    + list(".!?,;:'\"()-/@&…")
    + list("。！？；，、：“”「」（）")
    + list("我你他的是了在有和人这中大为上个国")
    + list("あいうえおカキク")
    + [" ", " ", " ", " ", "\n", "\t", "\u3000"]
)
_FRAGMENTS = [
    "Mr.", "Dr.", "e.g.", "U.S.", "3.14", "v1.2.3", "J.", "...", "?!", "https://x.org/a?b=1.",
    "a@b.co", "。", "……", "——", "1.", "No. 5", "p.m.", " I. ", "\u0301", "\u200d",
]


def _random_text(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(0, 120)):
        r = rng.random()
        if r < 0.15:
            parts.append(rng.choice(_FRAGMENTS))
        elif r < 0.3:
            parts.append(" ")
        else:
            parts.append("".join(rng.choice(_ALPHABET) for _ in range(rng.randint(1, 12))))
    return "".join(parts)


def test_no_loss_property_random():
    rng = random.Random(1234)
    for _ in range(2500):
        text = _random_text(rng)
        max_chars = rng.choice([1, 2, 3, 5, 8, 13, 20, 40, 80, 200])
        chunks = split_text(text, max_chars)
        check_invariants(text, chunks, max_chars)


def test_no_loss_property_structured():
    rng = random.Random(99)
    sentences_en = [s + "." for s in EN_PARAGRAPH.split(". ")]
    sentences_zh = [s for s in re.split(r"(?<=[。！？；…])", ZH_PARAGRAPH) if s]
    for _ in range(500):
        pool = []
        for _ in range(rng.randint(1, 30)):
            pool.append(rng.choice(sentences_en + sentences_zh))
        text = rng.choice([" ", "", "\n"]).join(pool)
        max_chars = rng.randint(1, 250)
        check_invariants(text, split_text(text, max_chars), max_chars)


def test_large_input_is_fast():
    import time

    text = ("This is sentence number one. 这是第二句话。 Dr. Who said... Hi! " * 3000)[:150_000]
    t0 = time.perf_counter()
    chunks = split(text, 200)
    assert time.perf_counter() - t0 < 2.0
    assert len(chunks) > 500
