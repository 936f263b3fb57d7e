"""A1111's prompt emphasis syntax: a prompt -> BREAK-separated chunks of (text, weight) fragments.

    (word)        weight x 1.1        ((word)) x 1.21, and so on: nested brackets multiply
    [word]        weight x 1 / 1.1
    (word:1.5)    weight x 1.5        a number after the colon, then ')'; spaces around the number are allowed,
                                      `(word: 1.5 )`, as in A1111
    \\( \\) \\[ \\] \\:  the literal character (a backslash makes any character literal; a lone one at the end
                  is dropped)
    BREAK         ends the current 75-token chunk and starts the next one

The weights and the way they combine are those of AUTOMATIC1111's `parse_prompt_attention` (modules/prompt_parser.py;
its documented examples are tests here, `tests/test_prompt_syntax.py`); the float products are taken in the same
order, so the weights are equal, not just close. A weight is what A1111's pattern `:\\s*([+-]?[.\\d]+)\\s*\\)` reads,
and, as there, it closes the innermost open `(` even when a `[` was opened after it. Adjacent fragments of equal
weight are merged, as A1111 does, because that changes how the text is tokenized.

What A1111 tolerates, we tolerate, with a warning naming it:
- an unclosed `(` or `[` weights everything after it (x 1.1 or / 1.1);
- a `)` or `]` with nothing to close is plain text.

What A1111 reads silently in a way the user rarely meant, we refuse (`UserError`, one line):
- a colon directly inside `( )` followed at once by something that is not a weight and `)`: `(word:abc)`,
  `(word:1.2.3)`, `(word:)`, `(word:1.5x)`. A1111 reads `(word:abc)` and `(word:)` as text at x 1.1 and fails on
  `(word:1.2.3)` (float() of "1.2.3"). Write `\\:` for a literal colon. A colon followed by whitespace and then no
  weight, `(style: anime)`, stays text, as in A1111;
- a weight outside [-10, 10] (MIN_WEIGHT, MAX_WEIGHT) or not finite: almost surely a typo (15 for 1.5), or a time
  like `(12:30)`, which A1111 reads as weight 30. Only the numbers written in the prompt are checked, not the
  products of nested brackets;
- A1111's prompt editing `[from:to:when]` / `[to:when]` and alternation `[a|b]`, which we do not implement: using
  the text as is would condition on something else than A1111 does;
- an empty chunk: a BREAK at the start, or two BREAKs with nothing but spaces between them (A1111 encodes an empty,
  all-padding chunk there). A trailing BREAK is accepted and makes no chunk, as in A1111.

Differences from A1111, on purpose: BREAK inside brackets still starts a chunk (A1111 then multiplies its internal
marker and tokenizes the word "BREAK"); `\\:` is a literal colon (A1111 drops the backslash and may then read the colon
as a weight). `AND` (composable diffusion) is plain text here. `<lora:name:w>` tags are removed before parsing, by
ldm/lora/prompt_tags.py; any other `<...>` text is plain text.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ldm.errors import UserError

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1  # a multiplier, as in A1111, so that the float products come out the same
MIN_WEIGHT, MAX_WEIGHT = -10.0, 10.0

_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)"
_LEXEME = re.compile(
    r"""
    (?P<escape>\\(?P<char>.)?)          # \( \) \[ \] \: \\ ... ; a lone backslash at the very end
  | (?P<brk>\bBREAK\b)
  | (?P<open>[(\[])
  | (?P<close>[)\]])
  | (?P<colon>:)
  | (?P<pipe>\|)
  | (?P<text>(?:(?!\bBREAK\b)[^\\()\[\]:|])+)
    """,
    re.VERBOSE | re.DOTALL,
)
# at a colon: a weight and its closing bracket, A1111's pattern (re_attention in modules/prompt_parser.py,
# github.com/AUTOMATIC1111/stable-diffusion-webui); what it matches but float() refuses ("1.2.3") is refused
_WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_EDIT_WHEN = re.compile(rf":\s*{_NUMBER}(?:[eE][+-]?\d+)?\s*\]")  # [from:to:when]: a step number before ']'


@dataclass(frozen=True)
class Fragment:
    text: str
    weight: float


@dataclass(frozen=True)
class ParsedPrompt:
    """`chunks`: the fragments between BREAKs (at least one chunk, each with at least one fragment).
    `warnings`: what was tolerated (unbalanced brackets), one sentence each; the caller decides how to show them."""

    chunks: tuple[tuple[Fragment, ...], ...]
    warnings: tuple[str, ...] = ()

    @property
    def weighted(self) -> bool:
        return any(f.weight != 1.0 for chunk in self.chunks for f in chunk)


class _Break:
    """The marker BREAK leaves in the fragment list; weights never apply to it."""


def parse_prompt(text: str, what: str = "prompt") -> ParsedPrompt:
    """Parse `text` (see the module docstring). A `UserError` starts with `what` ("prompt", "negative prompt")."""
    out: list[list | _Break] = []  # [text, weight] pairs (mutable: closing brackets multiply them) and _Break markers
    round_open: list[int] = []  # index into `out` where each open '(' starts
    square_open: list[int] = []
    innermost: list[str] = []  # the kinds of the open brackets, in opening order
    stray: list[str] = []

    def multiply(start: int, factor: float) -> None:
        for item in out[start:]:
            if not isinstance(item, _Break):
                item[1] *= factor

    def close(kind: str) -> None:
        innermost.reverse()
        innermost.remove(kind)  # the last-opened bracket of this kind
        innermost.reverse()

    pos = 0
    while pos < len(text):
        m = _LEXEME.match(text, pos)
        assert m is not None  # the alternatives cover every character
        kind, lexeme = m.lastgroup, m.group(0)
        end = m.end()
        if m.group("escape") is not None:
            out.append([m.group("char") or "", 1.0])
        elif kind == "brk":
            out.append(_Break())
        elif kind == "open":
            (round_open if lexeme == "(" else square_open).append(len(out))
            innermost.append(lexeme)
        elif kind == "close":
            stack, opener = (round_open, "(") if lexeme == ")" else (square_open, "[")
            if stack:
                multiply(stack.pop(), ROUND_MULTIPLIER if lexeme == ")" else SQUARE_MULTIPLIER)
                close(opener)
            else:
                stray.append(lexeme)
                out.append([lexeme, 1.0])
        elif kind == "colon" and round_open and (weight := _WEIGHT.match(text, pos)):
            # A1111 closes the innermost open '(' with it, even from inside a '[' opened after that '('
            multiply(round_open.pop(), _weight_value(weight, text, pos, what))
            close("(")
            end = weight.end()
        elif kind == "colon" and innermost and innermost[-1] == "(":
            if not text[pos + 1 : pos + 2].isspace():
                raise UserError(
                    f"{what}: {_excerpt(text, pos)!r} is not a weight: write a number after the colon and then ')', "
                    "like (word:1.2), or \\: for a literal colon"
                )
            out.append([":", 1.0])  # a colon, whitespace and no weight, (style: anime): text, as in A1111
        elif kind in ("colon", "pipe") and innermost and innermost[-1] == "[":
            if kind == "pipe" or _EDIT_WHEN.match(text, pos):
                raise UserError(
                    f"{what}: {_excerpt(text, pos)!r} is A1111 prompt editing ([from:to:when] or [a|b]), which is not "
                    "supported: remove it, or write \\: and \\| for literal characters"
                )
            out.append([lexeme, 1.0])
        else:  # text, or a colon/pipe that is plain text
            out.append([lexeme, 1.0])
        pos = end

    for start in round_open:  # unclosed brackets weight the rest of the prompt, as in A1111 (round ones first)
        multiply(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply(start, SQUARE_MULTIPLIER)
    return ParsedPrompt(_chunks(out, what), _warnings(what, round_open, square_open, stray))


def check_prompt(text: str, what: str = "prompt") -> None:
    """Raise the `UserError` that `parse_prompt` would, without keeping the result (for early argument checks)."""
    parse_prompt(text, what)


def _weight_value(m: re.Match, text: str, pos: int, what: str) -> float:
    """The weight `_WEIGHT` matched at the colon `pos`, or raise: not a number (1.2.3), out of range, not finite."""
    try:
        value = float(m.group(1))
    except ValueError:  # A1111's pattern takes any run of digits and dots; float() then fails there too
        raise UserError(
            f"{what}: {_excerpt(text, pos)!r} is not a weight: write one number after the colon, like (word:1.2)"
        ) from None
    if not (math.isfinite(value) and MIN_WEIGHT <= value <= MAX_WEIGHT):
        raise UserError(
            f"{what}: weight {m.group(1)} in {_excerpt(text, pos)!r} is out of range: use "
            f"{MIN_WEIGHT:g}..{MAX_WEIGHT:g} (1 = unchanged, 1.1-1.5 is the usual emphasis)"
        )
    return value


def _excerpt(text: str, colon: int) -> str:
    """The bracket group around a colon, for error messages: from the opening bracket to the closing one."""
    start = max(text.rfind("(", 0, colon), text.rfind("[", 0, colon))
    ends = [i for i in (text.find(")", colon), text.find("]", colon)) if i >= 0]
    end = min(ends) + 1 if ends else len(text)
    return text[max(start, 0) : min(end, colon + 40)]


def _chunks(out: list, what: str) -> tuple[tuple[Fragment, ...], ...]:
    """Split at BREAK markers, merge runs of equal weight, refuse empty chunks."""
    groups: list[list[Fragment]] = [[]]
    for item in out:
        if isinstance(item, _Break):
            groups.append([])
            continue
        text, weight = item
        group = groups[-1]
        if group and group[-1].weight == weight:
            group[-1] = Fragment(group[-1].text + text, weight)
        else:
            group.append(Fragment(text, weight))
    if any(not _has_text(g) for g in groups[:-1]):  # every chunk a BREAK ends has text
        raise UserError(
            f"{what} has an empty chunk (BREAK at the start, or two BREAKs with nothing between them): "
            "remove the extra BREAK"
        )
    if len(groups) > 1 and not _has_text(groups[-1]):
        groups.pop()  # a trailing BREAK starts no chunk (A1111 adds none either)
    return tuple(tuple(g) if g else (Fragment("", 1.0),) for g in groups)


def _has_text(group: list[Fragment]) -> bool:
    return any(f.text.strip() for f in group)


def _warnings(what: str, round_open: list[int], square_open: list[int], stray: list[str]) -> tuple[str, ...]:
    notes = []
    for count, bracket, effect in ((len(round_open), "(", "x 1.1"), (len(square_open), "[", "/ 1.1")):
        if count:
            notes.append(
                f"{what} has {count} unclosed '{bracket}': it weights everything after it {effect} (as A1111 does); "
                f"close it, or write \\{bracket} for a literal bracket"
            )
    if stray:
        notes.append(
            f"{what} has {len(stray)} closing bracket(s) {' '.join(repr(s) for s in stray)} with nothing to close: "
            "kept as plain text (as A1111 does)"
        )
    return tuple(notes)
