"""Which pools an operator replica owns: its shard, as a Kubernetes label selector.

Several operator replicas can split the pools between them: each is given a label
selector on pools (`--pool-selector`) and reconciles only the pools (and ModelCaches)
it selects; the API server does the filtering (kopf's `settings.watching.label_selectors`),
so a replica never even hears of another shard's pools. Namespaces (`--namespace`) shard
the same way. This module parses and checks the selector (a bad one is refused at start,
naming what is wrong) and matches labels against it, as the API server would, for the
operator's own listings and for tests. No I/O.

The grammar is the API server's (`k8s.io/apimachinery/pkg/labels`): requirements joined
by commas, each `key`, `!key`, `key=value`, `key==value`, `key!=value`,
`key in (v1,v2)` or `key notin (v1,v2)`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

SELECTOR_LIMIT = 1024
"""Characters in a selector (a command-line setting: bounded like every input)."""
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_KEY = re.compile(rf"^([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_NAME}$")
_VALUE = re.compile(rf"^({_NAME})?$")
_SET = re.compile(r"^(?P<key>\S+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)$")
_EQUALITY = re.compile(r"^(?P<key>[^=!\s]+)\s*(?P<op>==|=|!=)\s*(?P<value>\S*)$")


class Op(Enum):
    EXISTS = "exists"
    ABSENT = "absent"
    IN = "in"
    NOT_IN = "notin"


@dataclass(frozen=True)
class Requirement:
    key: str
    op: Op
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.op is Op.EXISTS:
            return self.key in labels
        if self.op is Op.ABSENT:
            return self.key not in labels
        if self.op is Op.IN:
            return labels.get(self.key) in self.values
        return labels.get(self.key) not in self.values  # notin and != match a missing key too


@dataclass(frozen=True)
class Selector:
    text: str
    """As given (what the API server is sent)."""
    requirements: tuple[Requirement, ...]

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        return all(r.matches(labels or {}) for r in self.requirements)


def parse_selector(text: str) -> Selector:
    """The selector `text` says; ValueError naming the part that is wrong."""
    if len(text) > SELECTOR_LIMIT:
        raise ValueError(f"the selector is {len(text)} characters long, at most {SELECTOR_LIMIT}")
    if not text.strip():
        raise ValueError("the selector is empty (it would select every pool: leave it out instead)")
    return Selector(text.strip(), tuple(_requirement(part.strip()) for part in _split(text)))


def _split(text: str) -> list[str]:
    """Commas separate requirements, except inside `in (...)` lists."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def _requirement(part: str) -> Requirement:
    if not part:
        raise ValueError("an empty requirement (two commas in a row, or one at an end)")
    if (found := _SET.match(part)) is not None:
        values = [v.strip() for v in found["values"].split(",")]
        if not values or any(not v for v in values):
            raise ValueError(f"{part!r}: the value list must name at least one value, none empty")
        for value in values:
            _check_value(value, part)
        return Requirement(_check_key(found["key"], part), Op.IN if found["op"] == "in" else Op.NOT_IN,
                           frozenset(values))
    if (found := _EQUALITY.match(part)) is not None:
        value = _check_value(found["value"], part)
        op = Op.NOT_IN if found["op"] == "!=" else Op.IN
        return Requirement(_check_key(found["key"], part), op, frozenset({value}))
    if part.startswith("!"):
        return Requirement(_check_key(part[1:].strip(), part), Op.ABSENT)
    return Requirement(_check_key(part, part), Op.EXISTS)


def _check_key(key: str, part: str) -> str:
    if not _KEY.match(key):
        raise ValueError(f"{part!r}: {key!r} is not a label key (an optional DNS prefix and '/', then up to 63 "
                         "letters, digits, '-', '_' or '.', starting and ending with a letter or digit)")
    return key


def _check_value(value: str, part: str) -> str:
    if not _VALUE.match(value):
        raise ValueError(f"{part!r}: {value!r} is not a label value (up to 63 letters, digits, '-', '_' or '.', "
                         "starting and ending with a letter or digit)")
    return value
