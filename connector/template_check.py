"""The `templates` mapping checked against the templates Meta holds for the business account.

Outside the window a template is the only thing that reaches a customer, so a mapping that
cannot work (a misspelt name, a language it was never approved in, a parameter count that does
not match its placeholders, a button that is not there) must stop `rasa run` naming the key,
not surface a day later as Meta's 132000/132001/132012 for a message that is then gone. A
template that exists but is not APPROVED is a warning: Meta may reinstate it.
"""

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from connector.templates import TemplateBook, TemplateMapping

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_]+)\s*\}\}")
_BUTTON_TYPES = {"quick_reply": "QUICK_REPLY", "url": "URL", "copy_code": "COPY_CODE"}


@dataclass(frozen=True)
class MetaTemplate:
    """One template (in one language) as the Graph API lists it."""

    name: str
    language: str
    status: str
    category: str
    components: Tuple[Mapping[str, Any], ...] = ()

    @classmethod
    def from_graph(cls, raw: Mapping[str, Any]) -> "MetaTemplate":
        return cls(str(raw.get("name")), str(raw.get("language")), str(raw.get("status", "")).upper(),
                   str(raw.get("category", "")).upper(), tuple(raw.get("components") or ()))

    def component(self, kind: str) -> Optional[Mapping[str, Any]]:
        return next((c for c in self.components if str(c.get("type", "")).upper() == kind), None)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.language})"


@dataclass(frozen=True)
class CheckResult:
    errors: Tuple[str, ...]
    warnings: Tuple[str, ...]


def check(book: TemplateBook, catalog: Sequence[MetaTemplate]) -> CheckResult:
    by_key: Dict[Tuple[str, str], MetaTemplate] = {(t.name, t.language): t for t in catalog}
    languages: Dict[str, List[str]] = {}
    for template in catalog:
        languages.setdefault(template.name, []).append(template.language)
    mappings = [(f"templates.{response}", mapping) for response, mapping in book.by_response.items()]
    if book.fallback is not None:
        mappings.append(("fallback_template", book.fallback))
    errors: List[str] = []
    warnings: List[str] = []
    for key, mapping in mappings:
        if mapping.name not in languages:
            errors.append(f"{key}.name: the business account has no template {mapping.name}")
            continue
        template = by_key.get((mapping.name, mapping.language))
        if template is None:
            errors.append(f"{key}.language: {mapping.name} has no {mapping.language} version "
                          f"(it has {', '.join(sorted(languages[mapping.name]))})")
            continue
        errors += _parameters(key, mapping, template)
        if template.status != "APPROVED":
            warnings.append(f"{key}: {template.label} is {template.status or 'of unknown status'} at Meta, "
                            f"which refuses to send it until it is approved again")
    return CheckResult(tuple(errors), tuple(warnings))


def placeholders(text: Any) -> int:
    """Distinct `{{1}}` (or named `{{order_id}}`) placeholders of a component's text."""
    return len(dict.fromkeys(_PLACEHOLDER.findall(text if isinstance(text, str) else "")))


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _a(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def _parameters(key: str, mapping: TemplateMapping, template: MetaTemplate) -> List[str]:
    errors = []
    body = template.component("BODY")
    wanted = placeholders(body.get("text") if body else "")
    if len(mapping.body) != wanted:
        errors.append(f"{key}.body has {_count(len(mapping.body), 'parameter')}; "
                      f"{template.label} has {_count(wanted, 'placeholder')}")
    header = template.component("HEADER")
    header_format = str(header.get("format", "TEXT")).upper() if header else None
    if mapping.header_media is not None:
        kind = mapping.header_media[0].upper()
        if header_format != kind:
            errors.append(f"{key}.header is {_a(mapping.header_media[0])}; {template.label} has "
                          f"{_a(header_format.lower()) + ' header' if header_format else 'no header'}")
    elif header_format in ("IMAGE", "VIDEO", "DOCUMENT"):
        errors.append(f"{key}.header is missing; {template.label} has {_a(header_format.lower())} header")
    else:
        wanted = placeholders(header.get("text") if header else "")
        if len(mapping.header) != wanted:
            errors.append(f"{key}.header has {_count(len(mapping.header), 'parameter')}; "
                          f"{template.label}'s header has {_count(wanted, 'placeholder')}")
    buttons_component = template.component("BUTTONS")
    buttons = list(buttons_component.get("buttons") or []) if buttons_component else []
    for n, button in enumerate(mapping.buttons):
        where = f"{key}.buttons[{n}]"
        if button.index >= len(buttons):
            errors.append(f"{where}.index is {button.index}; {template.label} has {_count(len(buttons), 'button')}")
            continue
        kind = str(buttons[button.index].get("type", "")).upper()
        if kind != _BUTTON_TYPES[button.sub_type]:
            errors.append(f"{where}.sub_type is {button.sub_type}; button {button.index} of {template.label} is {kind}")
        elif kind == "URL" and not placeholders(buttons[button.index].get("url")):
            errors.append(f"{where}: button {button.index} of {template.label} has a fixed URL, it takes no parameter")
    return errors


class TemplateMismatch(RuntimeError):
    """A mapping in credentials.yml that cannot work with the templates Meta holds."""

