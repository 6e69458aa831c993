"""Parse a completion into a ranked list of `(title, year)` recommendations.

Rules (SafeRec sheet; the defaults reproduce the authors' parser):
  * If the text holds a complete `<solution>` ... `</solution>`, only its
    inside is read. Without the closing tag the whole text is parsed,
    reasoning lines included (`unclosed_solution="whole_text"`, the
    reference); `unclosed_solution="from_tag"` reads from `<solution>` to the
    end instead (for a generation cut at the length limit).
  * Each non-empty line is cleaned: whitespace collapsed, markdown `*` `_` `#`
    `-` stripped from both ends, list numbering (`1.`, `2)`, `3 -` followed by a
    space) stripped, straight quotes around the whole line / title removed.
    Curly quotes stay part of the title (reference); `strip_curly_quotes=True`
    also removes a surrounding pair of curly quotes.
  * The cleaned line must start with `<title> (<4 digits>)`; anything after the
    year (commentary) is ignored. The title is the shortest prefix before the
    first ` (YYYY)`; parentheses inside it are removed, then it is cleaned again
    until stable. Lines that do not match, or leave an empty title, are skipped.
  * Lines longer than `MAX_LINE_CHARS` are skipped unread (no title is that
    long), so huge or adversarial text stays linear-time. Nothing ever raises.

Most model output is already clean (`Title (1999)`, `3. **Title** (1999)`
per line); those lines take one regex match (`_CLEAN_LINE`) instead of the
cleaning pipeline, with the same result (tests compare both paths). The fast
path never matches a title with a quote at either end, so it is the same
under both quote settings.
"""
from __future__ import annotations

import numbers
import re
from collections.abc import Sequence

MAX_LINE_CHARS = 1000

_SOLUTION_OPEN = "<solution>"
_SOLUTION_CLOSE = "</solution>"
_SPACES = re.compile(r"\s+")
_PARENS = re.compile(r"\([^()]*\)")
_BULLET_OR_NUMBER = re.compile(r"^(?:[*_\-#]+\s+|\d+\s*[.)、\-—–]\s+)")
_HASHES = re.compile(r"^#+\s*")
_MARKS = frozenset("*_-#")           # markdown marks stripped from both ends
# The same two patterns anchored by `.match(text, pos, endpos)` instead of `^`.
_BULLET_OR_NUMBER_AT = re.compile(_BULLET_OR_NUMBER.pattern.removeprefix("^"))
_HASHES_AT = re.compile(_HASHES.pattern.removeprefix("^"))
_TITLE_YEAR = re.compile(r"(.+?)\s+\((\d{4})\)")
_STRAIGHT_QUOTES = (('"', '"'), ("'", "'"))
_CURLY_QUOTES = (("“", "”"), ("‘", "’"))
UNCLOSED_MODES = ("whole_text", "from_tag")

# A line the cleaning pipeline would only strip a list number and markdown
# emphasis from and cut after the year: optional `N. ` / `N) ` / `N - `
# numbering, optional `*`/`_` emphasis around the title, a title that starts
# and ends with a character that is not whitespace, markup, a quote or a
# parenthesis and holds no parentheses and only single spaces, then ` (YYYY)`
# and anything (commentary). Such lines give (title, year) without cleaning.
_EDGE = r"[^\s*_\-#\"'“”‘’()]"
_CLEAN_LINE = re.compile(
    r"(?:\d+ ?[.)、\-—–] )?(?:[*_]{1,3})?(?!\d+\s*[.)、\-—–]\s)"
    rf"({_EDGE}(?:(?:[^\s()]| (?=\S))*{_EDGE})?)(?:[*_]{{1,3}})? \((\d{{4}})\).*")


def _collapse(text: str) -> str:
  return _SPACES.sub(" ", text.strip()).strip()


def _strip_format(text: str) -> str:
  """Remove markdown marks and list numbering from both ends until stable.

  Each round strips, in order: marks `[*_-#]+` at the start, then at the end, one bullet or
  list number at the start, then `#+\\s*` at the start (whitespace around each). The rounds
  move two indices instead of copying the string, so a line of many list numbers
  (`1. 1. 1. ...`) costs time linear in its length, not its square.
  """
  i, j = _strip_span(text, 0, len(text))
  while True:
    start, end = i, j
    while i < j and text[i] in _MARKS:
      i += 1
    i, j = _strip_span(text, i, j)
    while j > i and text[j - 1] in _MARKS:
      j -= 1
    i, j = _strip_span(text, i, j)
    m = _BULLET_OR_NUMBER_AT.match(text, i, j)
    if m is not None:
      i, j = _strip_span(text, m.end(), j)
    m = _HASHES_AT.match(text, i, j)
    if m is not None:
      i = m.end()
    if (i, j) == (start, end):
      return text[i:j]


def _strip_span(text: str, i: int, j: int) -> tuple[int, int]:
  """`text[i:j].strip()` as indices."""
  while i < j and text[i].isspace():
    i += 1
  while j > i and text[j - 1].isspace():
    j -= 1
  return i, j


def _strip_quotes(text: str, curly: bool = False) -> str:
  for left, right in _STRAIGHT_QUOTES + (_CURLY_QUOTES if curly else ()):
    if len(text) >= 2 and text.startswith(left) and text.endswith(right):
      return text[1:-1]
  return text


def _clean_title(title: str, curly: bool = False) -> str:
  while True:
    new = _strip_quotes(_strip_format(_collapse(_PARENS.sub("", title.strip()))), curly)
    if new == title:
      return title
    title = new


def parse_line(line: str, strip_curly_quotes: bool = False) -> tuple[str, int] | None:
  """One line -> (title, year), or None when it is not a recommendation."""
  if len(line) > MAX_LINE_CHARS:
    return None
  line = line.strip()
  if not line:
    return None
  m = _CLEAN_LINE.fullmatch(line)   # the common case: no cleaning needed
  if m is not None:
    return m.group(1), int(m.group(2))
  return parse_line_full(line, strip_curly_quotes)


def parse_line_full(line: str, strip_curly_quotes: bool = False) -> tuple[str, int] | None:
  """The full cleaning pipeline (also the reference for the fast path)."""
  if len(line) > MAX_LINE_CHARS:
    return None
  line = _strip_quotes(_strip_format(_collapse(line)), strip_curly_quotes)
  m = _TITLE_YEAR.match(line)
  if m is None:
    return None
  title = _clean_title(m.group(1), strip_curly_quotes)
  if not title:
    return None
  return title, int(m.group(2))


def solution_text(text: str, unclosed_solution: str = "whole_text") -> str:
  """The inside of the first complete `<solution>` ... `</solution>`; without one, all of
  `text` ("whole_text", reference) or, with "from_tag", what follows an unclosed tag."""
  if unclosed_solution not in UNCLOSED_MODES:
    raise ValueError(f"unclosed_solution={unclosed_solution!r}: expected one of {UNCLOSED_MODES}")
  start = text.find(_SOLUTION_OPEN)
  if start < 0:
    return text
  start += len(_SOLUTION_OPEN)
  end = text.find(_SOLUTION_CLOSE, start)
  if end >= 0:
    return text[start:end]
  return text[start:] if unclosed_solution == "from_tag" else text


def parse_recommendations(text, *, unclosed_solution: str = "whole_text",
                          strip_curly_quotes: bool = False) -> list[tuple[str, int]]:
  """Ranked `(title, year)` list from a completion; [] for garbage, None or non-text input.

  Accepts a string, or a chat message / message list (the last assistant
  message's content is read). Defaults follow the reference parser; the
  options are described in the module docstring.
  """
  body = solution_text(completion_text(text), unclosed_solution)
  if not body:
    return []
  out = []
  for line in body.split("\n"):
    item = parse_line(line, strip_curly_quotes)
    if item is not None:
      out.append(item)
  return out


def completion_text(completion) -> str:
  """Normalise a completion (str | message dict | message list) to its text; '' if none."""
  if isinstance(completion, str):
    return completion
  if isinstance(completion, dict):
    content = completion.get("content")
    return content if isinstance(content, str) else ""
  if isinstance(completion, (list, tuple)) and completion:
    messages = [m for m in completion if isinstance(m, dict)]
    assistant = [m for m in messages if m.get("role", "assistant") == "assistant"]
    chosen = assistant[-1] if assistant else (messages[-1] if messages else None)
    if chosen is not None:
      return completion_text(chosen)
  return ""


def as_parsed(completion_or_list, **parse_options) -> list[tuple[str, int]]:
  """A completion text, or an already parsed list of (title, year), as a parsed list.

  A list whose first item is a `(str, int)` tuple is taken as parsed and
  returned as is (no copy); other pair lists are converted. `parse_options`
  go to `parse_recommendations` for texts.
  """
  if isinstance(completion_or_list, list) and completion_or_list:
    first = completion_or_list[0]
    if type(first) is tuple and len(first) == 2 and type(first[0]) is str and type(first[1]) is int:
      return completion_or_list
  if isinstance(completion_or_list, (list, tuple)) and (
      not completion_or_list or _is_pair(completion_or_list[0])):
    return [(str(t), int(y)) for t, y in completion_or_list]
  return parse_recommendations(completion_or_list, **parse_options)


def parse_all(completions: Sequence, **parse_options) -> list[list[tuple[str, int]]]:
  """`as_parsed` over a batch: parse each completion once, reuse the lists everywhere."""
  return [as_parsed(c, **parse_options) for c in completions]


def _is_pair(x) -> bool:
  if not (isinstance(x, (list, tuple)) and len(x) == 2 and isinstance(x[0], str)):
    return False
  year = x[1]
  return (isinstance(year, numbers.Integral) and not isinstance(year, bool)) or (
      isinstance(year, str) and year.strip().isdigit())


def format_recommendations(items: Sequence[tuple[str, int]]) -> str:
  """`Title (Year)` lines inside `<solution>` tags (the SafeRec completion format)."""
  body = "".join(f"{t} ({int(y)})\n" for t, y in items)
  return f"{_SOLUTION_OPEN}\n{body}{_SOLUTION_CLOSE}"
