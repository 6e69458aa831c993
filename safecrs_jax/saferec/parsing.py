"""Parse a completion into a ranked list of `(title, year)` recommendations.

Rules (SafeRec sheet):
  * If the text holds `<solution>`, only what follows it up to `</solution>` is
    read (up to the end of the text when the closing tag is missing, e.g. a
    generation cut at the length limit).
  * Each non-empty line is cleaned: whitespace collapsed, markdown `*` `_` `#`
    `-` stripped from both ends, list numbering (`1.`, `2)`, `3 -` followed by a
    space) stripped, surrounding quotes (straight or curly) removed.
  * The cleaned line must start with `<title> (<4 digits>)`; anything after the
    year (commentary) is ignored. The title is the shortest prefix before the
    first ` (YYYY)`; parentheses inside it are removed, then it is cleaned again
    until stable. Lines that do not match, or leave an empty title, are skipped.
  * Lines longer than `MAX_LINE_CHARS` are skipped unread (no title is that
    long), so huge or adversarial text stays linear-time. Nothing ever raises.

Most model output is already clean (`Title (1999)`, `3. **Title** (1999)`
per line); those lines take one regex match (`_CLEAN_LINE`) instead of the
cleaning pipeline, with the same result (tests compare both paths).
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
_FMT_LEAD = re.compile(r"^[*_\-#]+")
_FMT_TRAIL = re.compile(r"[*_\-#]+$")
_BULLET_OR_NUMBER = re.compile(r"^(?:[*_\-#]+\s+|\d+\s*[.)、\-—–]\s+)")
_HASHES = re.compile(r"^#+\s*")
_TITLE_YEAR = re.compile(r"(.+?)\s+\((\d{4})\)")
_QUOTE_PAIRS = (('"', '"'), ("'", "'"), ("“", "”"), ("‘", "’"))

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
  """Remove markdown marks and list numbering from both ends until stable."""
  text = text.strip()
  while True:
    new = _FMT_LEAD.sub("", text).strip()
    new = _FMT_TRAIL.sub("", new).strip()
    new = _BULLET_OR_NUMBER.sub("", new).strip()
    new = _HASHES.sub("", new)
    if new == text:
      return text
    text = new


def _strip_quotes(text: str) -> str:
  for left, right in _QUOTE_PAIRS:
    if len(text) >= 2 and text.startswith(left) and text.endswith(right):
      return text[1:-1]
  return text


def _clean_title(title: str) -> str:
  while True:
    new = _strip_quotes(_strip_format(_collapse(_PARENS.sub("", title.strip()))))
    if new == title:
      return title
    title = new


def parse_line(line: str) -> tuple[str, int] | None:
  """One line -> (title, year), or None when it is not a recommendation."""
  if len(line) > MAX_LINE_CHARS:
    return None
  line = line.strip()
  if not line:
    return None
  m = _CLEAN_LINE.fullmatch(line)   # the common case: no cleaning needed
  if m is not None:
    return m.group(1), int(m.group(2))
  return _parse_line_slow(line)


def _parse_line_slow(line: str) -> tuple[str, int] | None:
  """The full cleaning pipeline (also the reference for the fast path)."""
  if len(line) > MAX_LINE_CHARS:
    return None
  line = _strip_quotes(_strip_format(_collapse(line)))
  m = _TITLE_YEAR.match(line)
  if m is None:
    return None
  title = _clean_title(m.group(1))
  if not title:
    return None
  return title, int(m.group(2))


def solution_text(text: str) -> str:
  """The part of `text` inside `<solution>` ... `</solution>` (all of it when there is no tag)."""
  start = text.find(_SOLUTION_OPEN)
  if start < 0:
    return text
  start += len(_SOLUTION_OPEN)
  end = text.find(_SOLUTION_CLOSE, start)
  return text[start:] if end < 0 else text[start:end]


def parse_recommendations(text) -> list[tuple[str, int]]:
  """Ranked `(title, year)` list from a completion; [] for garbage, None or non-text input.

  Accepts a string, or a chat message / message list (the last assistant
  message's content is read).
  """
  text = completion_text(text)
  if not text:
    return []
  out = []
  for line in solution_text(text).split("\n"):
    item = parse_line(line)
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


def as_parsed(completion_or_list) -> list[tuple[str, int]]:
  """A completion text, or an already parsed list of (title, year), as a parsed list.

  A list whose first item is a `(str, int)` tuple is taken as parsed and
  returned as is (no copy); other pair lists are converted.
  """
  if isinstance(completion_or_list, list) and completion_or_list:
    first = completion_or_list[0]
    if type(first) is tuple and len(first) == 2 and type(first[0]) is str and type(first[1]) is int:
      return completion_or_list
  if isinstance(completion_or_list, (list, tuple)) and (
      not completion_or_list or _is_pair(completion_or_list[0])):
    return [(str(t), int(y)) for t, y in completion_or_list]
  return parse_recommendations(completion_or_list)


def parse_all(completions: Sequence) -> list[list[tuple[str, int]]]:
  """`as_parsed` over a batch: parse each completion once, reuse the lists everywhere."""
  return [as_parsed(c) for c in completions]


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
