"""The tagged-output parser: every well-formed variant accepted, every incomplete output rejected."""

import itertools
import random

import pytest

from allava_jax.synth.fake_server import NUMBER_STYLES, malformed, well_formed
from allava_jax.synth.parse import ParseError, parse, section, split_questions

QS = [f"Why is object {i} placed where it is?" for i in range(1, 6)]


def laion_text(caption="A red bicycle by a wall.", questions=QS, answer="Because of the light.", style="{n}. ",
               open_="<{t}>", close="</{t}>", sep="\n"):
    def part(t, body):
        return f"{open_.format(t=t, T=t.upper())}{sep}{body}{sep}{close.format(t=t, T=t.upper())}"
    qs = "\n".join(style.format(n=i + 1) + q for i, q in enumerate(questions))
    return "\n".join([part("caption", caption), part("questions", qs), part("answer", answer)])


@pytest.mark.parametrize("style", NUMBER_STYLES + ("", "* ", "• ", "Q{n}. ", "question {n}: ", "#{n} ", "{n}: ",
                                                   "{n} - ", "**Q{n}:** ", "- {n}. "))
def test_numbering_styles(style):
    p = parse("laion", laion_text(style=style))
    assert list(p.questions) == QS
    assert p.caption == "A red bicycle by a wall." and p.answer == "Because of the light."


@pytest.mark.parametrize("open_,close", [("<{t}>", "</{t}>"), ("**<{t}>**", "**</{t}>**"), ("< {T} >", "</ {T} >"),
                                         ("`<{t}>`", "`</{t}>`"), ("### <{t}>", "### </{t}>"),
                                         ("__<{t}>__", "__</{t}>__"), ("<{T}>", "</{T}>")])
@pytest.mark.parametrize("sep", ["\n", "\n\n  ", " ", "\t\n"])
def test_tag_decoration_and_whitespace(open_, close, sep):
    p = parse("laion", laion_text(open_=open_, close=close, sep=sep))
    assert p.caption == "A red bicycle by a wall."
    assert list(p.questions) == QS
    assert p.answer == "Because of the light."


def test_code_fence_and_chatter_around_output():
    text = "Sure! Here you go:\n```markdown\n" + laion_text() + "\n```\nHope this helps."
    assert list(parse("laion", text).questions) == QS


def test_multiline_questions_and_markdown_inside_answer():
    qs = "1. What is\n   on the left?\n2) b?\n3) c?\n4) d?\n5) e?"
    answer = "**Step 1.** look\n\n- point one\n- point two\n\n```python\nprint(1)\n```"
    text = f"<caption>\ncap\n</caption>\n<questions>\n{qs}\n</questions>\n<answer>\n{answer}\n</answer>"
    p = parse("laion", text)
    assert p.questions[0] == "What is on the left?"
    assert p.answer == answer  # content inside the answer is kept verbatim


@pytest.mark.parametrize("text,reason", [
    (laion_text().replace("</answer>", ""), "end tag"),
    (laion_text().rsplit("<answer>", 1)[0], "<answer>"),
    (laion_text(questions=QS[:4]), "found 4"),
    (laion_text(questions=QS + ["extra?"]), "found 6"),
    (laion_text(caption="  "), "empty"),
    (laion_text(caption="**"), "empty"),
    (laion_text(answer=""), "empty"),
    (laion_text() + "\n<answer>\nagain\n</answer>", "more than once"),
    ("", "empty response"),
    ("I cannot help with that.", "<caption>"),
    ("</caption> text <caption>\n" + laion_text().split("</caption>", 1)[1], "before"),
])
def test_rejects_incomplete(text, reason):
    with pytest.raises(ParseError, match=reason):
        parse("laion", text)


def test_truncated_finish_reason_rejected_even_if_tags_close():
    with pytest.raises(ParseError, match="truncated"):
        parse("laion", laion_text(), finish_reason="length")


def test_vflan_and_text_modes():
    v = parse("vflan", "<caption>\nA chart.\n</caption>\n<answer>\nThe bar is tallest, so B.\n</answer>")
    assert v.caption == "A chart." and v.answer.endswith("so B.") and v.questions is None
    t = parse("text", "Here:\n< Answer >\nUse a heap.\n</ANSWER>")
    assert t.answer == "Use a heap." and t.caption is None
    with pytest.raises(ParseError):
        parse("vflan", "<answer>\nonly an answer\n</answer>")
    with pytest.raises(ParseError):
        parse("text", "<answer>\nunterminated")


def test_section_rejects_reversed_tags():
    with pytest.raises(ParseError, match="before"):
        section("</answer> x <answer>", "answer")


def test_split_questions_plain_lines():
    assert split_questions("a?\n\nb?\nc?") == ["a?", "b?", "c?"]


def test_fake_server_outputs_round_trip():
    """The server's own generators: every well-formed style parses, every malformed one is rejected."""
    for mode, seed in itertools.product(("laion", "vflan", "text"), range(60)):
        parse(mode, well_formed(mode, random.Random(seed)))
        text, finish = malformed(mode, random.Random(seed), None)
        with pytest.raises(ParseError):
            parse(mode, text, finish)
