"""Which approved Message Template stands in for a Rasa response outside the care window, and
how its parameters are filled from slots.

Configured in the channel's credentials block:

    templates:
      utter_order_update:
        name: order_update
        language: en_US
        header: ["{customer_name}"]          # text parameters, or {type: image, link: "https://..."}
        body: ["{order_id}", "{order_status}"]
        buttons:
          - {sub_type: quick_reply, index: 0, payload: "/opt_out"}
          - {sub_type: url, index: 1, text: "{order_id}"}
    fallback_template: {...}                 # for bot messages without a response name

`{slot}` placeholders are filled from the message's own keys (what a custom action passed to
`utter_message`) and then the tracker's slots; a placeholder with no value makes the template
unusable (Meta would reject or, worse, send an empty parameter).
"""

import re
import string
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

_LANGUAGE = re.compile(r"^[a-z]{2,3}(_[A-Za-z]{2,4})?$")
_MEDIA_HEADERS = ("image", "video", "document")
_BUTTON_PARAMETER = {"quick_reply": "payload", "url": "text", "copy_code": "coupon_code"}


class InvalidTemplate(ValueError):
    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key} {problem}")
        self.key = key
        self.problem = problem


class MissingParameter(LookupError):
    def __str__(self) -> str:
        return f"no value for {{{self.args[0]}}}"


@dataclass(frozen=True)
class ButtonParameter:
    sub_type: str
    index: int
    value: str


@dataclass(frozen=True)
class TemplateMapping:
    name: str
    language: str
    body: Tuple[str, ...] = ()
    header: Tuple[str, ...] = ()
    header_media: Optional[Tuple[str, str]] = None
    buttons: Tuple[ButtonParameter, ...] = ()

    @property
    def placeholders(self) -> Tuple[str, ...]:
        texts = self.body + self.header + tuple(button.value for button in self.buttons)
        return tuple(dict.fromkeys(name for text in texts for name in _placeholders(text)))

    def components(self, values: Mapping[str, Any]) -> Tuple[Dict[str, Any], ...]:
        """Meta's `components` array with every placeholder filled."""
        components = []
        if self.header_media:
            kind, link = self.header_media
            components.append({"type": "header", "parameters": [{"type": kind, kind: {"link": _fill(link, values)}}]})
        elif self.header:
            components.append({"type": "header", "parameters": [_text(text, values) for text in self.header]})
        if self.body:
            components.append({"type": "body", "parameters": [_text(text, values) for text in self.body]})
        for button in self.buttons:
            parameter_type = _BUTTON_PARAMETER[button.sub_type]
            components.append({
                "type": "button",
                "sub_type": button.sub_type,
                "index": str(button.index),
                "parameters": [{"type": parameter_type, parameter_type: _fill(button.value, values)}],
            })
        return tuple(components)


@dataclass(frozen=True)
class TemplateBook:
    by_response: Mapping[str, TemplateMapping]
    fallback: Optional[TemplateMapping] = None

    def for_response(self, response: Optional[str]) -> Optional[TemplateMapping]:
        """A named response uses its own mapping only; a message without a name, the fallback."""
        if response:
            return self.by_response.get(response)
        return self.fallback

    @classmethod
    def parse(cls, templates: Any, fallback: Any) -> "TemplateBook":
        if templates is None:
            templates = {}
        if not isinstance(templates, Mapping):
            raise InvalidTemplate("templates", "must map response names to templates")
        by_response = {
            str(response): parse_mapping(f"templates.{response}", raw) for response, raw in templates.items()
        }
        return cls(by_response, parse_mapping("fallback_template", fallback) if fallback is not None else None)


def parse_mapping(key: str, raw: Any) -> TemplateMapping:
    """One template mapping; `key` names it in errors (the agent API reuses it)."""
    if not isinstance(raw, Mapping):
        raise InvalidTemplate(key, "must be a mapping with name, language, body, header, buttons")
    unknown = sorted(set(raw) - {"name", "language", "body", "header", "buttons"})
    if unknown:
        raise InvalidTemplate(f"{key}.{unknown[0]}", "is unknown; known keys: name, language, body, header, buttons")
    name = raw.get("name")
    if not isinstance(name, str) or not re.match(r"^[a-z0-9_]+$", name):
        raise InvalidTemplate(f"{key}.name", "must be the approved template's name (lowercase, digits, _)")
    language = raw.get("language")
    if not isinstance(language, str) or not _LANGUAGE.match(language):
        raise InvalidTemplate(f"{key}.language", f"must be a language code like en_US, got {language!r}")

    header, header_media = (), None
    raw_header = raw.get("header")
    if isinstance(raw_header, Mapping):
        kind, link = raw_header.get("type"), raw_header.get("link")
        if kind not in _MEDIA_HEADERS or not isinstance(link, str) or not link:
            raise InvalidTemplate(f"{key}.header", "as a mapping needs type image|video|document and a link")
        _check_text(f"{key}.header.link", link)
        header_media = (kind, link)
    elif raw_header is not None:
        header = _texts(f"{key}.header", raw_header)

    buttons = []
    for n, button in enumerate(raw.get("buttons") or []):
        where = f"{key}.buttons[{n}]"
        if not isinstance(button, Mapping) or button.get("sub_type") not in _BUTTON_PARAMETER:
            raise InvalidTemplate(where, f"needs sub_type one of {', '.join(_BUTTON_PARAMETER)}")
        index = button.get("index", n)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= 9:
            raise InvalidTemplate(f"{where}.index", "must be the button's position, 0 to 9")
        parameter = _BUTTON_PARAMETER[button["sub_type"]]
        value = button.get(parameter)
        if not isinstance(value, str) or not value:
            raise InvalidTemplate(f"{where}.{parameter}", "is missing")
        _check_text(f"{where}.{parameter}", value)
        buttons.append(ButtonParameter(button["sub_type"], index, value))

    return TemplateMapping(
        name=name,
        language=language,
        body=_texts(f"{key}.body", raw.get("body") or []),
        header=header,
        header_media=header_media,
        buttons=tuple(buttons),
    )


def _texts(key: str, raw: Any) -> Tuple[str, ...]:
    if not isinstance(raw, list):
        raise InvalidTemplate(key, "must be a list of parameter texts such as \"{order_id}\"")
    for n, text in enumerate(raw):
        if not isinstance(text, str) or not text:
            raise InvalidTemplate(f"{key}[{n}]", "must be a non-empty text")
        _check_text(f"{key}[{n}]", text)
    return tuple(raw)


def _check_text(key: str, text: str) -> None:
    try:
        _placeholders(text)
    except ValueError as problem:
        raise InvalidTemplate(key, f"has a bad placeholder: {problem}") from None


def _placeholders(text: str) -> Tuple[str, ...]:
    names = []
    for _, name, spec, conversion in string.Formatter().parse(text):
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"{{{name}}} is not a slot name")
        names.append(name)
    return tuple(names)


def _fill(text: str, values: Mapping[str, Any]) -> str:
    filled = {}
    for name in _placeholders(text):
        value = values.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise MissingParameter(name)
        filled[name] = value
    return text.format(**filled)


def _text(text: str, values: Mapping[str, Any]) -> Dict[str, Any]:
    return {"type": "text", "text": _fill(text, values)}
