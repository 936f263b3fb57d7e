"""A1111's prompt emphasis syntax: a prompt -> BREAK-separated chunks of (text, weight) fragments.

    (word)        weight x 1.1        ((word)) x 1.21, and so on: nested brackets multiply
    [word]        weight x 1 / 1.1
    (word:1.5)    weight x 1.5        a number after the colon, then ')'; spaces around the number are allowed,
                                      `(word: 1.5 )`, as in A1111
    \\( \\) \\[ \\] \\\\  the literal character; any other backslash is dropped and the character after it read as
                  usual (`a\\BREAK b` breaks, as in A1111); `\\:` is a literal colon (ours, see below)
    BREAK         ends the current 75-token chunk and starts the next one; the spaces around it go with it

We read a prompt as AUTOMATIC1111 does (modules/prompt_parser.py, github.com/AUTOMATIC1111/stable-diffusion-webui),
in its three steps:
1. The prompt (not the negative prompt: A1111 sends that to `get_learned_conditioning` directly) goes through
   `get_multicond_prompt_list`, whose `re_weight` removes the trailing whitespace and reads a trailing `:number`
   (`a cat:1.2`, `16:9`) as a composable-diffusion weight, which scales the guidance. A weight of 1 changes
   nothing and is removed, as there; any other is refused (see below).
2. Its lark grammar (`get_learned_conditioning_prompt_schedules`) looks for prompt editing `[from:to:when]`,
   `[to:when]` and alternation `[a|b]`. We do not implement those schedules (no code here or in the pipeline
   switches the conditioning during sampling), so a prompt A1111 would run with one is refused, naming the group.
   `_prompt_editing` decides it from the grammar's rules (escaped characters are plain text there): a `|` outside
   every well-formed `[...|...]`, or a lone backslash at the end (or before a newline), makes the parse fail, and
   A1111 then reads the whole prompt as text, so `a|b [c|d]`, `[a|b` and `[a:b|c]` are not alternation. Otherwise
   every well-formed `[P:when]`, `[P:P:when]` (`when` a number, spaces allowed around it) and `[P|P...]` is
   editing, wherever it is: also inside a broken group, `(a [b:3]` (the `(` is then a bare bracket). P holds text
   and well-formed groups: `(..)`, `(..:..)`, `[..]`. Some `[P:when]` followed by bare brackets (`[a:3]]`,
   `[a:3](`) can also be read as text; lark's Earley parser then picks a reading by set order, which follows
   PYTHONHASHSEED: the same webui runs the schedule after one start and not after another. We refuse those too.
3. `parse_prompt_attention` reads the emphasis: the lexemes of its `re_attention` in its order, `re_break` splitting
   the text runs, the same float products in the same order (so the weights are equal, not just close), the same
   merging of neighbours of equal weight and the same empty fragments. As there, a weight `:\\s*([+-]?[.\\d]+)\\s*\\)`
   closes the innermost open `(` even when a `[` was opened after it, a colon and text that are not a weight are
   text (`(a:b`, `(12:30 pm)`, `(style: anime)`), an unclosed bracket weights the rest of the prompt and a stray
   `)` or `]` is text; we warn about the last two.

What A1111 runs in a way we cannot honour, or reads silently in a way the user rarely meant, we refuse (`UserError`,
one line naming the group):
- prompt editing and alternation (step 2), and a composable weight other than 1 (step 1);
- a weight A1111's pattern matches but float() refuses, `(word:1.2.3)`, `(word:.)` (A1111 fails there too);
- a weight outside [-10, 10] (MIN_WEIGHT, MAX_WEIGHT) or not finite: almost surely a typo (15 for 1.5) or a time,
  `(12:30)`, which A1111 reads as weight 30. Only the numbers written are checked, not the products of brackets;
- a colon directly inside `( )` followed at once, with no space, by one word that is not a weight and then `)`:
  `(word:abc)`, `(word:)`, `(word:1.5x)`, `(word:1,5)`, a weight written wrong (A1111 reads them as text x 1.1).
  Write `\\:` for a literal colon. A space after the colon, `(12:30 pm)`, or no `)`, `(a:b`, keeps it text;
- an empty chunk: a BREAK at the start, or two BREAKs with nothing but spaces between them (A1111 encodes an empty,
  all-padding chunk there). A trailing BREAK is accepted and adds no chunk, as in A1111 (its chunk is empty here
  and `chunk_tokens` drops it).

Differences from A1111, on purpose: BREAK inside brackets still starts a chunk (A1111 then multiplies its internal
marker and tokenizes the word "BREAK"); `\\:` is a literal colon everywhere (A1111 drops the backslash and may then
read the colon as a weight, or as a composable weight at the end). `AND` (composable diffusion) is plain text here
(step 1 reads the whole prompt as A1111 reads its last AND part; step 2 looks at each AND part on its own, as A1111
does). `<lora:name:w>` tags are removed before parsing, by ldm/lora/prompt_tags.py; any other `<...>` is text.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ldm.errors import UserError

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1  # a multiplier, as in A1111, so that the float products come out the same
MIN_WEIGHT, MAX_WEIGHT = -10.0, 10.0

# Step 3: A1111's re_attention alternatives in its order, plus `\:` (a literal colon, ours) before the lone backslash
_LEXEME = re.compile(
    r"""
    \\(?P<escaped>[()\[\]\\:])             # \( \) \[ \] \\ and \: : the character
  | (?P<backslash>\\)                      # any other backslash: dropped; the next character is read as usual
  | (?P<open>[(\[])
  | (?P<weight>:\s*(?P<number>[+-]?[.\d]+)\s*\))   # a weight closes the innermost '(' (text when none is open)
  | (?P<close>[)\]])
  | (?P<text>[^\\()\[\]:]+)
  | (?P<colon>:)
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\bBREAK\b")  # A1111's re_break \s*\bBREAK\b\s* without the spaces (see _split_at_breaks)
_NOT_A_WEIGHT = re.compile(r":[^\s()\[\]\\:]*\)")  # at a colon inside '(': one word, no space, then ')'
# Step 1: re_weight's composable weight after the last colon (digits with at most one dot; no exponent)
_COMPOSABLE_WEIGHT = re.compile(r":\s*([+-]?(?:\d+\.?|\d*\.\d+))\s*")
_AND = re.compile(r"\bAND\b")
# Step 2: what the lark grammar sees: escaped pairs (plain text), a lone backslash (the parse fails), structure
_EDIT_LEXEME = re.compile(r"\\.|(?P<lone>\\)|(?P<mark>[()\[\]:|])")
# a `when`: lark's SIGNED_NUMBER (ASCII digits, an optional exponent), optional whitespace on both sides
_WHEN = re.compile(r"\s*[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*")


@dataclass(frozen=True)
class Fragment:
    text: str
    weight: float


@dataclass(frozen=True)
class ParsedPrompt:
    """`chunks`: the fragments between BREAKs (at least one chunk, each with at least one fragment, possibly ""),
    A1111's list cut at its BREAK markers; the last chunk is empty after a trailing BREAK (`chunk_tokens` adds no
    chunk for it, as A1111 adds none). `warnings`: what was tolerated (unbalanced brackets), one sentence each."""

    chunks: tuple[tuple[Fragment, ...], ...]
    warnings: tuple[str, ...] = ()

    @property
    def weighted(self) -> bool:
        return any(f.weight != 1.0 for chunk in self.chunks for f in chunk)


class _Break:
    """The marker BREAK leaves in the fragment list; weights never apply to it."""


def parse_prompt(text: str, what: str = "prompt") -> ParsedPrompt:
    """Parse `text` (see the module docstring). A `UserError` starts with `what`; a `what` starting with "negative
    prompt" is read as A1111 reads a negative prompt (no composable weight, step 1)."""
    if not what.startswith("negative prompt"):
        text = _without_composable_weight(text, what)
        for part in _AND.split(text):
            _refuse_prompt_editing(part, what)
    else:
        _refuse_prompt_editing(text, what)

    out: list[list | _Break] = []  # [text, weight] pairs (mutable: closing brackets multiply them) and _Break markers
    round_open: list[int] = []  # index into `out` where each open '(' starts
    square_open: list[int] = []
    innermost: list[str] = []  # the kinds of the open brackets, in opening order (only for the `(word:abc)` check)
    stray: list[str] = []

    def multiply(start: int, factor: float) -> None:
        for item in out[start:]:
            if not isinstance(item, _Break):
                item[1] *= factor

    def close(kind: str) -> None:
        del innermost[len(innermost) - 1 - innermost[::-1].index(kind)]  # the last-opened bracket of this kind

    for m in _LEXEME.finditer(text):
        kind, lexeme, pos = m.lastgroup, m.group(0), m.start()
        if kind in ("escaped", "backslash"):
            out.append([m.group("escaped") or "", 1.0])  # a dropped backslash leaves "", as in A1111
        elif kind == "open":
            (round_open if lexeme == "(" else square_open).append(len(out))
            innermost.append(lexeme)
        elif kind == "weight" and round_open:
            multiply(round_open.pop(), _weight_value(m.group("number"), text, pos, what))
            close("(")
        elif kind == "close" and (round_open if lexeme == ")" else square_open):
            if lexeme == ")":
                multiply(round_open.pop(), ROUND_MULTIPLIER)
                close("(")
            else:
                multiply(square_open.pop(), SQUARE_MULTIPLIER)
                close("[")
        else:  # text, a colon, a stray closer, or a weight with no '(' open: text, split at BREAK as in A1111
            if kind == "close":
                stray.append(lexeme)
            elif kind == "colon" and innermost and innermost[-1] == "(" and _NOT_A_WEIGHT.match(text, pos):
                raise UserError(
                    f"{what}: {_excerpt(text, pos)!r} is not a weight: write a number after the colon and then ')', "
                    "like (word:1.2), or \\: for a literal colon"
                )
            for i, part in enumerate(_split_at_breaks(lexeme)):
                if i:
                    out.append(_Break())
                out.append([part, 1.0])

    for start in round_open:  # unclosed brackets weight the rest of the prompt, as in A1111 (round ones first)
        multiply(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply(start, SQUARE_MULTIPLIER)
    return ParsedPrompt(_chunks(out, what), _warnings(what, round_open, square_open, stray))


def check_prompt(text: str, what: str = "prompt") -> None:
    """Raise the `UserError` that `parse_prompt` would, without keeping the result (for early argument checks)."""
    parse_prompt(text, what)


def _without_composable_weight(text: str, what: str) -> str:
    """Step 1: the prompt as A1111's `re_weight` leaves it (trailing whitespace and a `:1` removed), or raise for a
    composable weight other than 1. An escaped colon (`16\\:9`) is a literal colon here, not a weight."""
    colon = text.rfind(":")  # re_weight's weight has no colon after it; str.rstrip() strips what its \s matches
    m = _COMPOSABLE_WEIGHT.fullmatch(text, colon) if colon >= 0 else None
    if m is None or _escaped(text, colon):
        return text.rstrip()
    if float(m.group(1)) != 1.0:
        raise UserError(
            f"{what} ends with {m.group(0).strip()!r}, which A1111 reads as a composable-diffusion weight (it "
            f"multiplies the guidance by {float(m.group(1)):g}), which is not supported: remove it, or write \\: "
            "for a literal colon"
        )
    return text[:colon].rstrip()


def _split_at_breaks(text: str) -> list[str]:
    """`re.split(re_break, text)` as A1111 does it, in linear time (the regex backtracks over long runs of spaces):
    the parts between the words BREAK, without the whitespace next to a BREAK."""
    parts, start = [], 0
    for m in _BREAK.finditer(text):
        parts.append(text[start : m.start()].rstrip())
        start = m.end()
    parts.append(text[start:])
    return parts[:1] + [part.lstrip() for part in parts[1:]]


def _escaped(text: str, pos: int) -> bool:
    """Whether the character at `pos` follows a backslash that escapes it (an odd run of backslashes)."""
    run = pos - len(text[:pos].rstrip("\\"))
    return run % 2 == 1


@dataclass
class _Group:
    """An open bracket of step 2: where it is and the ':' (positions) and '|' (count) directly inside it."""

    bracket: str
    start: int
    colons: list[int] = field(default_factory=list)
    pipes: int = 0


def _refuse_prompt_editing(text: str, what: str) -> None:
    """Step 2: raise if A1111's grammar would run prompt editing or alternation in `text`, naming the first group."""
    found = _prompt_editing(text)
    if found is not None:
        start, end, kind = found
        group = text[start:end] if end - start <= 60 else text[start : start + 57] + "..."
        scheduled = kind == "scheduled"
        construct, escape = ("prompt editing [from:to:when]", ":") if scheduled else ("alternation [a|b]", "|")
        raise UserError(
            f"{what}: {group!r} is A1111 {construct}, which is not supported: remove it, or write \\{escape} for a "
            f"literal '{escape}'"
        )


def _prompt_editing(text: str) -> tuple[int, int, str] | None:
    """(start, end, "scheduled" | "alternate") of the leftmost outermost editing group A1111's lark grammar finds in
    `text`, or None: none, or the parse fails (then A1111 reads the prompt as text). One pass: a group's extent is
    fixed by bracket nesting; a group is broken by a mismatched or missing closer, by a broken group inside it, or
    by the wrong marks directly inside it; a '|' directly inside a broken group (or outside all) fails the parse."""
    stack: list[_Group] = []
    broken_below = 0  # the groups stack[:broken_below] are broken: they hold a broken group or a mismatched closer
    open_pipes = 0  # the '|' directly inside the groups on the stack
    found: tuple[int, int, str] | None = None
    for m in _EDIT_LEXEME.finditer(text):
        if m.group("lone") is not None:
            return None  # lark's plain text takes a backslash only with the character after it
        mark, pos = m.group("mark"), m.start()
        if mark is None:
            continue  # an escaped character: plain text
        if mark in "([":
            stack.append(_Group(mark, pos))
        elif mark == ":":
            if stack:
                stack[-1].colons.append(pos)
        elif mark == "|":
            if not stack:
                return None  # the grammar takes '|' only inside [a|b]
            stack[-1].pipes += 1
            open_pipes += 1
        elif not stack:
            continue  # a closer outside all groups: the grammar's top level takes brackets as text
        elif stack[-1].bracket + mark not in ("()", "[]"):
            if open_pipes:
                return None  # every open group is broken, and a '|' is in one of them
            broken_below = len(stack)
        else:
            group = stack.pop()
            open_pipes -= group.pipes
            kind = None if len(stack) < broken_below else _group_kind(text, group, pos)
            if kind is None:
                if group.pipes:
                    return None
                broken_below = len(stack)  # a broken group breaks every group around it
            elif kind != "emphasized" and (found is None or group.start < found[0]):
                found = (group.start, pos + 1, kind)
    return None if open_pipes else found  # groups left open are broken


def _group_kind(text: str, group: _Group, close: int) -> str | None:
    """A closed group with well-formed groups inside: the grammar's rule for it, or None if none fits."""
    colons, pipes = group.colons, group.pipes
    if group.bracket == "(":
        return "emphasized" if not pipes and len(colons) <= 1 else None  # (P) or (P:P)
    if not colons:
        return "alternate" if pipes else "emphasized"  # [P|P...] or [P]
    if not pipes and len(colons) <= 2 and _WHEN.fullmatch(text, colons[-1] + 1, close):
        return "scheduled"  # [P:when] or [P:P:when]
    return None


def _weight_value(number: str, text: str, pos: int, what: str) -> float:
    """The weight `number` read at the colon `pos`, or raise: not a number (1.2.3), out of range, not finite."""
    try:
        value = float(number)
    except ValueError:  # A1111's pattern takes any run of digits and dots; float() then fails there too
        raise UserError(
            f"{what}: {_excerpt(text, pos)!r} is not a weight: write one number after the colon, like (word:1.2)"
        ) from None
    if not (math.isfinite(value) and MIN_WEIGHT <= value <= MAX_WEIGHT):
        raise UserError(
            f"{what}: weight {number} in {_excerpt(text, pos)!r} is out of range: use "
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
    """Split at BREAK markers, merge runs of equal weight (as A1111 does), refuse empty chunks."""
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
    if any(not any(f.text.strip() for f in g) for g in groups[:-1]):  # every chunk a BREAK ends has text
        raise UserError(
            f"{what} has an empty chunk (BREAK at the start, or two BREAKs with nothing between them): "
            "remove the extra BREAK"
        )
    return tuple(tuple(g) if g else (Fragment("", 1.0),) for g in groups)


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
