"""The approved-template registry the send API checks `type: template` messages against.

The file is a JSON list of template objects in the shape Meta's template management API returns
(`name`, `language`, `category`, `status`, `components[]` with HEADER/BODY/FOOTER/BUTTONS), so a
template can be copied from WhatsApp Manager as is. Parameter counts are derived from the
`{{n}}` placeholders rather than declared, so they cannot drift from the text.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_]+)\s*\}\}")
MEDIA_HEADER_FORMATS = ("IMAGE", "VIDEO", "DOCUMENT", "LOCATION")
# Meta's template statuses (the send API only sends APPROVED ones), categories and quality scores
STATUSES = ("APPROVED", "PENDING", "REJECTED", "PAUSED", "DISABLED", "IN_APPEAL", "LIMIT_EXCEEDED", "ARCHIVED")
CATEGORIES = ("UTILITY", "MARKETING", "AUTHENTICATION")
QUALITIES = ("GREEN", "YELLOW", "RED", "UNKNOWN")
# what `GET /{waba_id}/message_templates` can return per template; `id` always comes along, as in Graph
GRAPH_FIELDS = ("id", "name", "language", "status", "category", "components", "quality_score",
                "rejected_reason", "previous_category", "parameter_format", "sub_category")
DEFAULT_GRAPH_FIELDS = ("name", "language", "status", "category", "id", "components")


def placeholders(text: str) -> List[str]:
    """Distinct placeholder names in order of first use (`{{1}}` and named `{{order_id}}`)."""
    seen: List[str] = []
    for name in PLACEHOLDER.findall(text or ""):
        if name not in seen:
            seen.append(name)
    return seen


@dataclass(frozen=True)
class ButtonSpec:
    """One template button and how many parameters a send must give it (a range: quick replies
    may omit their payload, which then defaults to the button text)."""

    type: str
    text: str
    min_params: int
    max_params: int


@dataclass(frozen=True)
class Template:
    name: str
    language: str
    category: str
    status: str
    header_format: Optional[str]
    header_text: str
    body_text: str
    footer_text: str
    buttons: Tuple[ButtonSpec, ...] = field(default_factory=tuple)
    id: str = ""  # Meta's template id: digits, stable for one (name, language)
    components: Tuple[Dict[str, Any], ...] = field(default_factory=tuple, compare=False)  # as in the file
    quality: str = "UNKNOWN"
    previous_category: Optional[str] = None
    rejected_reason: str = "NONE"
    pauses: int = 0  # how often it was paused: FIRST_PAUSE, SECOND_PAUSE in the status webhook
    parameter_format: str = "POSITIONAL"

    def to_graph(self, fields: Iterable[str] = DEFAULT_GRAPH_FIELDS) -> Dict[str, Any]:
        """This template as `GET /{waba_id}/message_templates` answers it, restricted to `fields`."""
        full: Dict[str, Any] = {
            "name": self.name,
            "parameter_format": self.parameter_format,
            "components": copy.deepcopy(list(self.components)),
            "language": self.language,
            "status": self.status,
            "category": self.category,
            "sub_category": None,
            "previous_category": self.previous_category,
            "quality_score": {"score": self.quality},
            "rejected_reason": self.rejected_reason,
            "id": self.id,
        }
        wanted = set(fields) | {"id"}
        return {k: v for k, v in full.items() if k in wanted and v is not None}

    @property
    def header_params(self) -> int:
        if self.header_format in MEDIA_HEADER_FORMATS:
            return 1
        return len(placeholders(self.header_text))

    @property
    def body_params(self) -> int:
        return len(placeholders(self.body_text))

    def render(self, body_values: List[str], header_values: Optional[List[str]] = None) -> str:
        """Human-readable text of a sent template, for the conversation log and the CLI."""
        parts = []
        if self.header_text:
            parts.append(_fill(self.header_text, header_values or []))
        parts.append(_fill(self.body_text, body_values))
        if self.footer_text:
            parts.append(self.footer_text)
        if self.buttons:
            parts.append(" ".join(f"[{b.text}]" for b in self.buttons))
        return "\n".join(p for p in parts if p)


def _fill(text: str, values: List[str]) -> str:
    names = placeholders(text)
    mapping = {name: values[i] for i, name in enumerate(names) if i < len(values)}
    return PLACEHOLDER.sub(lambda m: mapping.get(m.group(1), m.group(0)), text)


def _button_spec(raw: Dict[str, Any]) -> ButtonSpec:
    kind = str(raw.get("type", "QUICK_REPLY")).upper()
    text = str(raw.get("text", ""))
    if kind == "QUICK_REPLY":
        return ButtonSpec(kind, text, 0, 1)
    if kind == "URL":
        n = len(placeholders(str(raw.get("url", ""))))
        return ButtonSpec(kind, text, n, n)
    if kind in ("COPY_CODE", "OTP"):
        return ButtonSpec(kind, text, 1, 1)
    return ButtonSpec(kind, text, 0, 0)


def template_id(name: str, language: str) -> str:
    """A 16-digit id derived from name and language, so it is the same on every run (like Meta's,
    which never changes for a template)."""
    digest = hashlib.sha256(f"{name}\x00{language}".encode()).digest()
    return str(10**15 + int.from_bytes(digest[:8], "big") % (9 * 10**15))


def parse_template(raw: Dict[str, Any]) -> Template:
    header_format, header_text, body_text, footer_text = None, "", "", ""
    buttons: List[ButtonSpec] = []
    for comp in raw.get("components", []):
        kind = str(comp.get("type", "")).upper()
        if kind == "HEADER":
            header_format = str(comp.get("format", "TEXT")).upper()
            header_text = comp.get("text", "") if header_format == "TEXT" else ""
        elif kind == "BODY":
            body_text = comp.get("text", "")
        elif kind == "FOOTER":
            footer_text = comp.get("text", "")
        elif kind == "BUTTONS":
            buttons.extend(_button_spec(b) for b in comp.get("buttons", []))
    quality = raw.get("quality_score")
    tid = str(raw.get("id") or template_id(raw["name"], raw["language"]))
    if not tid.isdigit():
        raise ValueError(f"template {raw['name']} ({raw['language']}): id must be digits, got {tid!r}")
    return Template(
        name=raw["name"],
        language=raw["language"],
        category=str(raw.get("category", "UTILITY")).upper(),
        status=str(raw.get("status", "APPROVED")).upper(),
        header_format=header_format,
        header_text=header_text,
        body_text=body_text,
        footer_text=footer_text,
        buttons=tuple(buttons),
        id=tid,
        components=tuple(copy.deepcopy(raw.get("components", []))),
        quality=str((quality.get("score") if isinstance(quality, dict) else quality) or "UNKNOWN").upper(),
        parameter_format=str(raw.get("parameter_format", "POSITIONAL")).upper(),
    )


class TemplateRegistry:
    """Templates by (name, language code), in file order. Status, category and quality can change
    at run time (`update`, the control API); `reset` returns to the templates as loaded."""

    def __init__(self, templates: List[Template]):
        self._loaded = list(templates)
        self._by_key = {(t.name, t.language): t for t in templates}

    @classmethod
    def load(cls, path: Path) -> "TemplateRegistry":
        with Path(path).open(encoding="utf-8") as f:
            raw = json.load(f)
        if not isinstance(raw, list):
            raise ValueError(f"{path}: the template registry must be a JSON list")
        return cls([parse_template(item) for item in raw])

    def get(self, name: str, language: str) -> Optional[Template]:
        return self._by_key.get((name, language))

    def all(self) -> List[Template]:
        return list(self._by_key.values())

    def update(self, name: str, language: str, **changes: Any) -> Tuple[Template, Template]:
        """Replace one template's fields; returns (before, after). KeyError when unknown."""
        before = self._by_key[(name, language)]
        after = replace(before, **changes)
        self._by_key[(name, language)] = after
        return before, after

    def reset(self) -> None:
        self._by_key = {(t.name, t.language): t for t in self._loaded}


# --- Graph listing: cursor paging ----------------------------------------------------------


class PagingError(ValueError):
    """A `limit`, cursor or field the template list cannot take (answered as Graph error 100)."""


def encode_cursor(template: Template) -> str:
    """Opaque like Meta's: base64 of the template id (a cursor survives status changes)."""
    return base64.urlsafe_b64encode(template.id.encode()).decode().rstrip("=")


def _cursor_index(templates: List[Template], cursor: str) -> int:
    try:
        wanted = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        wanted = None
    for i, t in enumerate(templates):
        if t.id == wanted:
            return i
    raise PagingError(f"Invalid cursor: {cursor!r}")


@dataclass(frozen=True)
class Page:
    """One page of the template list: its templates and where the neighbours start."""

    items: List[Template]
    has_before: bool
    has_after: bool


def page(templates: List[Template], limit: int, after: Optional[str] = None, before: Optional[str] = None) -> Page:
    """Graph cursor paging: `after` starts behind that item, `before` ends in front of it."""
    if after:
        start = _cursor_index(templates, after) + 1
        end = start + limit
    elif before:
        end = _cursor_index(templates, before)
        start = max(0, end - limit)
    else:
        start, end = 0, limit
    return Page(templates[start:end], has_before=start > 0, has_after=end < len(templates))
