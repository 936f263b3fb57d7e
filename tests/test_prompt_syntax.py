"""The A1111 prompt parser: A1111's documented examples, its escapes, BREAK, when it runs prompt editing, what we
tolerate and what we refuse.

The expected lists are A1111's, derived by hand from modules/prompt_parser.py of AUTOMATIC1111/stable-diffusion-webui
(read at commit 28bd8e14): each comment names the part of it that gives the value. Its three steps, in the order
it runs them on a prompt: `re_weight` (the prompt only, not the negative prompt), the lark grammar `schedule_parser`
(prompt editing), `parse_prompt_attention` (the `re_attention` lexemes, `re_break`, the weights).
"""

from __future__ import annotations

import random

import pytest

from ldm.errors import UserError
from ldm.text.prompt_syntax import MAX_WEIGHT, Fragment, parse_prompt

NEGATIVE = "negative prompt"
SQUARE = 1 / 1.1  # A1111's square_bracket_multiplier


def pairs(text: str, what: str = "prompt") -> list[list]:
    """The prompt as `parse_prompt_attention` returns it: [[text, weight], ...], a BREAK as its ["BREAK", -1]."""
    out: list[list] = []
    for i, chunk in enumerate(parse_prompt(text, what).chunks):
        out += [["BREAK", -1]] if i else []
        out += [[f.text, f.weight] for f in chunk]
    return out


# The examples in the docstring of A1111's `parse_prompt_attention`, with its exact float results.
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
    assert pairs(text, NEGATIVE) == A1111_EXAMPLES[text]


def test_emphasis_forms():
    assert pairs("(word)") == [["word", 1.1]]
    assert pairs("((word))") == [["word", 1.1 * 1.1]]  # 1.21
    assert pairs("[word]") == [["word", SQUARE]]
    assert pairs("[[word]]") == [["word", SQUARE * SQUARE]]
    assert pairs("(word:1.5)") == [["word", 1.5]]
    assert pairs("((word:1.5))") == [["word", 1.5 * 1.1]]
    assert pairs("(word:1.0) x") == [["word x", 1.0]]  # weight 1 merges with its neighbours: the same text as "word x"
    assert pairs("(word:-0.5)") == [["word", -0.5]] and pairs("(word:.5)") == [["word", 0.5]]
    assert pairs("(word:2.)") == [["word", 2.0]] and pairs("(word:+2)") == [["word", 2.0]]
    assert pairs("(a, b:1.2), c") == [["a, b", 1.2], [", c", 1.0]]
    assert pairs("(style: anime:1.2)") == [["style: anime", 1.2]]  # a colon followed by a space is text
    assert pairs("(style: 1.5 anime)") == [["style: 1.5 anime", 1.1]]  # no ')' right after the number: text too


def test_spaces_around_a_weight_are_allowed_as_in_a1111():
    # re_attention's weight lexeme :\s*([+-]?[.\d]+)\s*\)
    assert pairs("(word: 1.5)") == [["word", 1.5]]
    assert pairs("(word:1.5 )") == [["word", 1.5]]
    assert pairs("a (red car:\n 0.8\t) b") == [["a ", 1.0], ["red car", 0.8], [" b", 1.0]]
    assert pairs("((word: 1.5))") == [["word", 1.5 * 1.1]]
    # `elif weight is not None and round_brackets: multiply_range(round_brackets.pop(), ...)`: a weight closes the
    # innermost open '(', even from inside a '[' opened after it
    assert pairs("(a [b:1.5)] c") == [["a ", 1.5], ["b", 1.5 * SQUARE], [" c", 1.0]]
    # with no '(' open the weight lexeme falls to the `else` branch: text, and its ')' is no stray closer
    assert pairs("a:1.5) b") == [["a:1.5) b", 1.0]] and parse_prompt("a:1.5) b").warnings == ()
    assert not parse_prompt("plain words, commas: colons").weighted
    assert parse_prompt("(x)").weighted


def test_escapes_and_backslashes_as_in_a1111():
    # re_attention's first five lexemes \( \) \[ \] \\ -> `res.append([text[1:], 1.0])`: the character
    assert pairs("\\(a\\) \\[b\\] \\\\ c") == [["(a) [b] \\ c", 1.0]]
    assert pairs("\\\\(a)") == [["\\", 1.0], ["a", 1.1]]  # \\ is a backslash; the '(' after it opens a bracket
    assert pairs("\\\\\\(a)") == [["\\(a)", 1.0]]  # \\ then \( ; the ')' closes nothing
    assert pairs("(a\\)") == [["a)", 1.1]]  # the '(' stays open: x 1.1 to the end
    # the sixth, a lone `\\` -> text[1:] == "": the backslash is dropped, the next character is read as usual
    assert pairs("\\a\\b") == [["ab", 1.0]]
    assert pairs("a \\| b") == [["a | b", 1.0]]
    assert pairs("trailing \\") == [["trailing ", 1.0]]
    # ... so `a\BREAK b` breaks: "a", "", then re_break splits "BREAK b" into "" and "b"
    assert pairs("a\\BREAK b") == [["a", 1.0], ["BREAK", -1], ["b", 1.0]]
    assert pairs("a \\BREAK b") == [["a ", 1.0], ["BREAK", -1], ["b", 1.0]]  # "a " is its own text lexeme
    # ours, on purpose: \: is a literal colon (A1111 drops the backslash and reads (a:1.5) as weight 1.5)
    assert pairs("(time\\: 12\\:30)") == [["time: 12:30", 1.1]]
    assert pairs("(a\\:1.5)") == [["a:1.5", 1.1]]


def test_text_outside_brackets_is_untouched():
    for text in ["<lora:name:0.8> a cat", "a: b | c", "Mr. A & B, 100% {curly}", "", "16:9 ratio", "a:1e3"]:
        assert pairs(text) == [[text, 1.0]]
    assert pairs("12:30", NEGATIVE) == [["12:30", 1.0]]  # in the prompt, a composable weight (below)


def test_break_starts_a_chunk_and_takes_the_spaces_around_it():
    # re_break \s*\bBREAK\b\s* splits each text lexeme; the spaces go with it, and a part may be ""
    assert pairs("a (cat) BREAK a dog") == [["a ", 1.0], ["cat", 1.1], ["", 1.0], ["BREAK", -1], ["a dog", 1.0]]
    assert pairs("a\nBREAK\nb") == [["a", 1.0], ["BREAK", -1], ["b", 1.0]]
    assert pairs("BREAKfast, breakfast, BREAK_x") == [["BREAKfast, breakfast, BREAK_x", 1.0]]  # whole words only
    # a trailing BREAK leaves an empty last chunk, which the encoder drops, as A1111 does
    assert pairs("a BREAK") == [["a", 1.0], ["BREAK", -1], ["", 1.0]]
    assert parse_prompt("a (cat) BREAK a dog").chunks == (
        (Fragment("a ", 1.0), Fragment("cat", 1.1), Fragment("", 1.0)), (Fragment("a dog", 1.0),))
    # ours, on purpose: a BREAK inside brackets still splits (A1111 multiplies its marker to -1.1 and then tokenizes
    # the word "BREAK" at weight -1.1)
    assert pairs("(a BREAK b)") == [["a", 1.1], ["BREAK", -1], ["b", 1.1]]


def test_unbalanced_brackets_are_read_as_a1111_reads_them_with_a_warning():
    parsed = parse_prompt("a (b [c")
    assert [[f.text, f.weight] for f in parsed.chunks[0]] == [["a ", 1.0], ["b ", 1.1], ["c", 1.1 * SQUARE]]
    assert parsed.warnings == (
        "prompt has 1 unclosed '(': it weights everything after it x 1.1 (as A1111 does); close it, or write \\( "
        "for a literal bracket",
        "prompt has 1 unclosed '[': it weights everything after it / 1.1 (as A1111 does); close it, or write \\[ "
        "for a literal bracket",
    )
    stray = parse_prompt("a) b]", NEGATIVE)
    assert [[f.text, f.weight] for f in stray.chunks[0]] == [["a) b]", 1.0]]
    assert stray.warnings == ("negative prompt has 2 closing bracket(s) ')' ']' with nothing to close: kept as "
                              "plain text (as A1111 does)",)
    assert parse_prompt("(a) [b]").warnings == ()


# Prompts A1111 does not run as prompt editing, alternation or a weight: read as its parse_prompt_attention reads
# them. Why the grammar runs no schedule is said for each; "fails" means `schedule_parser.parse` raises and
# `get_schedule` returns `[[steps, prompt]]`, the prompt as it is.
NOT_EDITING = {
    # fails: '|' is only in `alternate: "[" prompt ("|" [prompt])+ "]"`, and this '[' is never closed
    "[a|b": [["a|b", SQUARE]],
    # fails: the first '|' is outside every '[', and `!start` takes only /[][():]/ as bare characters
    "a|b [c|d]": [["a|b ", 1.0], ["c|d", SQUARE]],
    # fails: no rule takes both ':' and '|' directly inside one [ ]
    "[a:b|c]": [["a:b|c", SQUARE]],
    # fails: \] is plain text (`plain: /([^\\\[\]():|]|\\.)+/`), so the '[' is never closed
    "[a|b\\]": [["a|b]", SQUARE]],
    "\\[a|b]": [["[a|b]", 1.0]],
    # fails: `plain` takes a backslash only with the character after it, so a lone one at the end fails the parse
    "[a|b] x\\": [["a|b", SQUARE], [" x", 1.0]],
    "[a:3] \\": [["a:3", SQUARE], [" ", 1.0]],
    # no '[' at all: parsed, no schedule. re_attention: ':' then text, not a weight (no ')' right after the number)
    "(a:b": [["a:b", 1.1]],
    "(12:30 pm": [["12:30 pm", 1.1]],
    "(12:30 pm)": [["12:30 pm", 1.1]],
    "(a:b:1.2)": [["a:b", 1.2]],  # the first colon is text, the second a weight
    # `scheduled` needs a NUMBER (lark's SIGNED_NUMBER) right before ']': these are bare brackets and text
    "[a:b]": [["a:b", SQUARE]],
    "[a:3x]": [["a:3x", SQUARE]],
    "[a:1.5.]": [["a:1.5.", SQUARE]],
    "[a:b:c:3]": [["a:b:c:3", SQUARE]],  # at most two colons
    "[a:(b:3)]": [["a:", SQUARE], ["b", 3 * SQUARE]],  # the number is inside ( ): a weight, not a step
    "[(a:1.2)]": [["a", 1.2 * SQUARE]],
    "[a:3 x": [["a:3 x", SQUARE]],  # never closed
    # fails: (a|b) is no rule, so its '|' is in no `alternate`; the [c:3] after it never runs either
    "(a|b) [c:3]": [["a|b", 1.1], [" ", 1.0], ["c:3", SQUARE]],
}


@pytest.mark.parametrize("text", NOT_EDITING)
def test_what_a1111_does_not_run_as_prompt_editing_is_read_as_it_reads_it(text):
    assert pairs(text) == NOT_EDITING[text]
    assert pairs(text, NEGATIVE) == NOT_EDITING[text]


EDITING = {
    "[cat:dog:0.5]": "prompt: '[cat:dog:0.5]' is A1111 prompt editing [from:to:when], which is not supported: "
                     "remove it, or write \\: for a literal ':'",
    "[cat|dog]": "prompt: '[cat|dog]' is A1111 alternation [a|b], which is not supported: remove it, or write \\| "
                 "for a literal '|'",
    "[dog: 10]": "'[dog: 10]' is A1111 prompt editing",  # `[WHITESPACE] NUMBER [WHITESPACE]`
    "[a: 3 ]": "'[a: 3 ]' is A1111 prompt editing",
    "a [b : c : 1] d": "'[b : c : 1]' is A1111 prompt editing",  # A1111's doctests
    "((a][:b:c [d:3]": "'[d:3]' is A1111 prompt editing",
    "[fe|]male": "'[fe|]' is A1111 alternation",
    "[:3]": "'[:3]' is A1111 prompt editing",  # an empty `prompt`
    "[a:1e2]": "'[a:1e2]' is A1111 prompt editing",  # SIGNED_NUMBER takes an exponent
    "[a:-1]": "'[a:-1]' is A1111 prompt editing",
    "[[a]:3]": "'[[a]:3]' is A1111 prompt editing",  # groups nest: emphasized inside scheduled
    "[(a:1.2):3]": "'[(a:1.2):3]' is A1111 prompt editing",
    "[a|[b:3]]": "'[a|[b:3]]' is A1111 alternation",  # the outermost group is named
    # a broken group around it is bare brackets to the grammar; the group inside still runs
    "(x [a:3]": "'[a:3]' is A1111 prompt editing",
    "(a:b:c [a|b])": "'[a|b]' is A1111 alternation",
    "( ] ) [a:3]": "'[a:3]' is A1111 prompt editing",  # the broken ( ] ) before it changes nothing
    # a group beside stray brackets: lark's Earley parser finds both readings and picks one by set order, which
    # follows PYTHONHASHSEED: the same webui runs the schedule after one start and not after another. Refused.
    "[a:3]]": "'[a:3]' is A1111 prompt editing",
}


@pytest.mark.parametrize("text", EDITING)
def test_prompt_editing_and_alternation_are_refused_naming_the_group(text):
    for what in ("prompt", NEGATIVE):
        with pytest.raises(UserError) as e:
            parse_prompt(text, what)
        message = str(e.value)
        assert "\n" not in message and message.startswith(what) and EDITING[text] in message


def test_a_trailing_composable_weight_of_the_prompt_is_refused_and_1_is_removed():
    # re_weight ^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$ on the prompt (get_multicond_prompt_list):
    # the weight multiplies the guidance in combine_denoised (`(weight * cond_scale)`); the text loses it and its
    # trailing whitespace
    for text, end, factor in [("a cat:1.2", ":1.2", "1.2"), ("12:30", ":30", "30"), ("a cat : -2 ", ": -2", "-2"),
                              ("x:.5", ":.5", "0.5")]:
        with pytest.raises(UserError) as e:
            parse_prompt(text)
        assert str(e.value) == (
            f"prompt ends with '{end}', which A1111 reads as a composable-diffusion weight (it multiplies the guidance "
            f"by {factor}), which is not supported: remove it, or write \\: for a literal colon"
        )
    assert pairs("a cat :1") == [["a cat", 1.0]] and pairs("a cat: 1.0 \n") == [["a cat", 1.0]]
    assert pairs("a (cat) ") == [["a ", 1.0], ["cat", 1.1]]  # the trailing " " is gone
    assert pairs("(cat:1.2)") == [["cat", 1.2]]  # ends with ')': an emphasis weight
    # the negative prompt goes to get_learned_conditioning directly: no re_weight
    assert pairs("a (cat) ", NEGATIVE) == [["a ", 1.0], ["cat", 1.1], [" ", 1.0]]
    assert pairs("a cat:1.2", NEGATIVE) == [["a cat:1.2", 1.0]]
    assert pairs("16\\:9") == [["16:9", 1.0]]  # ours: \: is a literal colon here too (A1111: "16\", guidance x 9)
    # with AND (plain text here) the grammar looks at each part, as A1111 does: "[a " and " b|c]" run no schedule
    assert pairs("[a AND b|c]") == [["a AND b|c", SQUARE]]


REFUSED = {
    "(word:abc)": "prompt: '(word:abc)' is not a weight: write a number after the colon and then ')', like "
                  "(word:1.2), or \\: for a literal colon",
    "(word:1.2.3)": "prompt: '(word:1.2.3)' is not a weight: write one number after the colon, like (word:1.2)",
    "(word: 1.2.3 )": "prompt: '(word: 1.2.3 )' is not a weight",  # A1111's pattern takes it; float() fails there
    "(word:.)": "prompt: '(word:.)' is not a weight",  # float('.') fails in A1111 too
    "(word:)": "prompt: '(word:)' is not a weight",
    "(word:1.5x)": "prompt: '(word:1.5x)' is not a weight",
    "(word:1,5)": "prompt: '(word:1,5)' is not a weight",
    "a (12:30) b": "prompt: weight 30 in '(12:30)' is out of range",  # A1111 reads weight 30
    "(word:15)": f"prompt: weight 15 in '(word:15)' is out of range: use -10..{MAX_WEIGHT:g} (1 = unchanged, 1.1-1.5 "
                 "is the usual emphasis)",
    "(word:-11)": "weight -11 in '(word:-11)' is out of range",
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
        parse_prompt("(ugly:x)", NEGATIVE)


# Randomized: prompts A1111's grammar cannot run as prompt editing, built from a small alphabet. Words are joined
# by spaces, so no colon is followed by one word and ')' (the `(word:abc)` refusal) and no two numbers run together;
# every number is within -10..10 and every BREAK follows a word (no empty chunk): none of our refusals applies.
WORDS = ["(", ")", "]", ":", "|", "\\", "\\(", "\\)", "\\[", "\\]", "\\\\", "\\|", "x\\BREAK", "a BREAK", "cat",
         "12:30pm", "0.5", "1.2", "-3", ":1.5)", "(a:0.8)", "AND", "\n"]
SQUARES = ["[", "[a:3]", "[a|b]", "[a:b:0.5]", "[(a:1.2):3]", "[a|b|]"]


def random_prompts(rng: random.Random, words: list[str], first: str, count: int) -> list[str]:
    return [first + " ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(count)]


def test_random_prompts_that_a1111_cannot_run_as_prompt_editing_are_never_refused():
    rng = random.Random(0)
    # without '[' no rule of the grammar can run a schedule (both need one); a '|' before any '[' fails the parse
    prompts = random_prompts(rng, WORDS, "", 300) + random_prompts(rng, WORDS[:-2] + SQUARES, "| ", 300)
    weighted = 0
    for text in prompts:
        for what in ("negative prompt", "prompt"):
            parsed = parse_prompt(text + (" end" if what == "prompt" else ""), what)  # " end": no composable weight
            weighted += parsed.weighted
    assert weighted > 600  # most of them have brackets that weight something: the test reads more than plain text

