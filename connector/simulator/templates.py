"""The approved-template registry the send API checks `type: template` messages against.

The file is a JSON list of template objects in the shape Meta's template management API returns
(`name`, `language`, `category`, `status`, `components[]` with HEADER/BODY/FOOTER/BUTTONS), so a
template can be copied from WhatsApp Manager as is. Parameter counts are derived from the
`{{n}}` placeholders rather than declared, so they cannot drift from the text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_]+)\s*\}\}")
MEDIA_HEADER_FORMATS = ("IMAGE", "VIDEO", "DOCUMENT", "LOCATION")


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
    )


class TemplateRegistry:
    """Templates by (name, language code)."""

    def __init__(self, templates: List[Template]):
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
