"""The A1111 prompt-emphasis parser: A1111's documented examples, BREAK, what we tolerate and what we refuse."""

from __future__ import annotations

import pytest

from ldm.errors import UserError
from ldm.text.prompt_syntax import MAX_WEIGHT, Fragment, parse_prompt


def pairs(text: str) -> list[list]:
    """[[text, weight], ...] of a prompt without BREAK, in the form A1111's doctests use."""
    parsed = parse_prompt(text)
    assert len(parsed.chunks) == 1
    return [[f.text, f.weight] for f in parsed.chunks[0]]


# The examples in the docstring of AUTOMATIC1111's `parse_prompt_attention` (modules/prompt_parser.py,
# github.com/AUTOMATIC1111/stable-diffusion-webui), with its exact float results.
A1111_EXAMPLES = {
    "normal text": [["normal text", 1.0]],
    "an (important) word": [["an ", 1.0], ["important", 1.1], [" word", 1.0]],
    "(unbalanced": [["unbalanced", 1.1]],
    "\\(literal\\]": [["(literal]", 1.0]],
    "(unnecessary)(parens)": [["unnecessaryparens", 1.1]],
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).": [
        ["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
        [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1],
    ],
}


@pytest.mark.parametrize("text", A1111_EXAMPLES)
def test_a1111_documented_examples_give_the_same_weights(text):
    assert pairs(text) == A1111_EXAMPLES[text]  # equal floats, not approximately: same products in the same order


def test_emphasis_forms():
    assert pairs("(word)") == [["word", 1.1]]
    assert pairs("((word))") == [["word", 1.1 * 1.1]]  # 1.21
    assert pairs("[word]") == [["word", 1 / 1.1]]
    assert pairs("[[word]]") == [["word", (1 / 1.1) * (1 / 1.1)]]
    assert pairs("(word:1.5)") == [["word", 1.5]]
    assert pairs("((word:1.5))") == [["word", 1.5 * 1.1]]
    assert pairs("(word:1.0) x") == [["word x", 1.0]]  # weight 1 merges with its neighbours: the same text as "word x"
    assert pairs("(word:-0.5)") == [["word", -0.5]] and pairs("(word:.5)") == [["word", 0.5]]
    assert pairs("(word:2.)") == [["word", 2.0]] and pairs("(word:+2)") == [["word", 2.0]]
    assert pairs("(a, b:1.2), c") == [["a, b", 1.2], [", c", 1.0]]
    assert pairs("(style: anime:1.2)") == [["style: anime", 1.2]]  # a colon followed by a space is text
    assert pairs("(style: 1.5 anime)") == [["style: 1.5 anime", 1.1]]  # no ')' right after the number: text too


def test_spaces_around_a_weight_are_allowed_as_in_a1111():
    # A1111's re_attention (modules/prompt_parser.py) reads a weight as :\s*([+-]?[.\d]+)\s*\)
    assert pairs("(word: 1.5)") == [["word", 1.5]]
    assert pairs("(word:1.5 )") == [["word", 1.5]]
    assert pairs("a (red car:\n 0.8\t) b") == [["a ", 1.0], ["red car", 0.8], [" b", 1.0]]
    assert pairs("((word: 1.5))") == [["word", 1.5 * 1.1]]
    # as in A1111, a weight closes the innermost open '(', even from inside a '[' opened after it
    assert pairs("(a [b:1.5)] c") == [["a ", 1.5], ["b", 1.5 * (1 / 1.1)], [" c", 1.0]]
    assert not parse_prompt("plain words, commas: colons").weighted
    assert parse_prompt("(x)").weighted


def test_escapes_are_literal_characters():
    assert pairs("\\(a\\) \\[b\\] \\\\ c") == [["(a) [b] \\ c", 1.0]]
    assert pairs("(time\\: 12\\:30)") == [["time: 12:30", 1.1]]
    assert pairs("a \\| b") == [["a | b", 1.0]]
    assert pairs("trailing \\") == [["trailing ", 1.0]]  # a lone backslash at the end is dropped, as in A1111


def test_text_outside_brackets_is_untouched():
    for text in ["<lora:name:0.8> a cat", "a: b | c", "12:30", "Mr. A & B, 100% {curly}", ""]:
        assert pairs(text) == [[text, 1.0]]


def test_break_starts_a_chunk():
    parsed = parse_prompt("a (cat) BREAK a dog")
    assert parsed.chunks == (
        (Fragment("a ", 1.0), Fragment("cat", 1.1), Fragment(" ", 1.0)), (Fragment(" a dog", 1.0),))
    # a bracket across a BREAK weights both sides, and the BREAK still splits (A1111 would tokenize the word instead)
    assert parse_prompt("(a BREAK b)").chunks == ((Fragment("a ", 1.1),), (Fragment(" b", 1.1),))
    assert len(parse_prompt("a BREAK").chunks) == 1  # a trailing BREAK makes no chunk
    assert pairs("BREAKfast, breakfast, BREAK_x") == [["BREAKfast, breakfast, BREAK_x", 1.0]]  # whole words only
    assert len(parse_prompt("a\nBREAK\nb").chunks) == 2


def test_unbalanced_brackets_are_read_as_a1111_reads_them_with_a_warning():
    parsed = parse_prompt("a (b [c")
    assert [[f.text, f.weight] for f in parsed.chunks[0]] == [["a ", 1.0], ["b ", 1.1], ["c", 1.1 * (1 / 1.1)]]
    assert parsed.warnings == (
        "prompt has 1 unclosed '(': it weights everything after it x 1.1 (as A1111 does); close it, or write \\( "
        "for a literal bracket",
        "prompt has 1 unclosed '[': it weights everything after it / 1.1 (as A1111 does); close it, or write \\[ "
        "for a literal bracket",
    )
    stray = parse_prompt("a) b]", "negative prompt")
    assert [[f.text, f.weight] for f in stray.chunks[0]] == [["a) b]", 1.0]]
    assert stray.warnings == ("negative prompt has 2 closing bracket(s) ')' ']' with nothing to close: kept as "
                              "plain text (as A1111 does)",)
    assert parse_prompt("(a) [b]").warnings == ()


REFUSED = {
    "(word:abc)": "prompt: '(word:abc)' is not a weight: write a number after the colon and then ')', like "
                  "(word:1.2), or \\: for a literal colon",
    "(word:1.2.3)": "prompt: '(word:1.2.3)' is not a weight: write one number after the colon, like (word:1.2)",
    "(word: 1.2.3 )": "prompt: '(word: 1.2.3 )' is not a weight",  # A1111's pattern takes it; float() fails there
    "(word:)": "prompt: '(word:)' is not a weight",
    "(word:1.5x)": "prompt: '(word:1.5x)' is not a weight",
    "a (12:30) b": "prompt: weight 30 in '(12:30)' is out of range",  # A1111 reads weight 30
    "(word:15)": f"prompt: weight 15 in '(word:15)' is out of range: use -10..{MAX_WEIGHT:g} (1 = unchanged, 1.1-1.5 "
                 "is the usual emphasis)",
    "(word:-11)": "weight -11 in '(word:-11)' is out of range",
    "[cat:dog:0.5]": "prompt: '[cat:dog:0.5]' is A1111 prompt editing ([from:to:when] or [a|b]), which is not "
                     "supported: remove it, or write \\: and \\| for literal characters",
    "[dog: 10]": "is A1111 prompt editing",
    "[cat|dog]": "prompt: '[cat|dog]' is A1111 prompt editing",
    "BREAK a": "prompt has an empty chunk (BREAK at the start, or two BREAKs with nothing between them): remove the "
               "extra BREAK",
    "a BREAK BREAK b": "prompt has an empty chunk",
    "a BREAK  \n BREAK": "prompt has an empty chunk",
    "BREAK": "prompt has an empty chunk",
}


@pytest.mark.parametrize("text", REFUSED)
def test_malformed_prompts_are_one_clear_line(text):
    with pytest.raises(UserError) as e:
        parse_prompt(text)
    message = str(e.value)
    assert "\n" not in message and REFUSED[text] in message


def test_errors_name_the_negative_prompt():
    with pytest.raises(UserError, match=r"^negative prompt: '\(ugly:x\)' is not a weight"):
        parse_prompt("(ugly:x)", "negative prompt")


def test_square_brackets_with_a_colon_that_is_not_prompt_editing_are_text():
    assert pairs("[a:b]") == [["a:b", 1 / 1.1]]  # no step number: A1111's attention parser reads it as text too
    assert pairs("[(b:1.2)]") == [["b", 1.2 * (1 / 1.1)]]
