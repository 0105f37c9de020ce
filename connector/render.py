"""A Rasa bot message → WhatsApp message objects that Meta accepts.

Meta rejects, rather than trims, anything over its limits (131009), so everything is fitted
here: long text is split, titles are shortened, too many buttons become a list or numbered text.
The objects carry only `type` and its body; the client adds the addressing envelope.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

TEXT_LIMIT = 4096
INTERACTIVE_BODY_LIMIT = 1024
REPLY_BUTTONS_MAX = 3
REPLY_TITLE_LIMIT = 20
REPLY_ID_LIMIT = 256
LIST_ROWS_MAX = 10
LIST_ROW_TITLE_LIMIT = 24
LIST_ROW_ID_LIMIT = 200
LIST_ROW_DESCRIPTION_LIMIT = 72
LIST_BUTTON_LABEL = "Choose"
CHOICES_PROMPT = "Please choose:"

# Keys of a Rasa message that render does not turn into WhatsApp messages yet.
_NOT_RENDERED = ("attachment", "elements")


@dataclass(frozen=True)
class Rendered:
    messages: Tuple[Dict[str, Any], ...]
    not_rendered: Tuple[str, ...]


def render(message: Mapping[str, Any]) -> Rendered:
    out: List[Dict[str, Any]] = []
    text = str(message.get("text") or "").strip()
    choices = message.get("quick_replies") or message.get("buttons")
    if choices:
        out.extend(_choices(text, list(choices)))
    elif text:
        out.extend(text_message(part) for part in split_text(text, TEXT_LIMIT))

    custom = message.get("custom")
    if isinstance(custom, Mapping) and isinstance(custom.get("type"), str):
        out.append(dict(custom))
    if message.get("image"):
        out.append({"type": "image", "image": {"link": str(message["image"])}})

    not_rendered = tuple(key for key in _NOT_RENDERED if message.get(key))
    if message.get("custom") and not (isinstance(custom, Mapping) and isinstance(custom.get("type"), str)):
        not_rendered += ("custom",)
    return Rendered(tuple(out), not_rendered)


def text_message(body: str) -> Dict[str, Any]:
    return {"type": "text", "text": {"body": body, "preview_url": "http" in body}}


def split_text(text: str, limit: int) -> List[str]:
    """Cut at the last paragraph, line, sentence or word break that fits; mid-word only when a
    single word is longer than the limit."""
    parts: List[str] = []
    rest = text.strip()
    while len(rest) > limit:
        window = rest[: limit + 1]
        cut = _last_break(window)
        parts.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        parts.append(rest)
    return parts


def _last_break(window: str) -> int:
    """Prefer the strongest break in the window's second half, then any space."""
    for separator in ("\n\n", "\n", ". ", " "):
        at = window.rfind(separator)
        if at > len(window) // 2:
            return at + 1 if separator == ". " else at
    at = window.rfind(" ")
    return at if at > 0 else len(window) - 1


def shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _choices(text: str, choices: Sequence[Any]) -> List[Dict[str, Any]]:
    options = [_option(choice) for choice in choices]
    options = [option for option in options if option is not None]
    if not options:
        return [text_message(part) for part in split_text(text, TEXT_LIMIT)] if text else []
    if len(options) > LIST_ROWS_MAX:
        numbered = "\n".join(f"{n}. {title}" for n, (title, _) in enumerate(options, start=1))
        full = f"{text}\n\n{numbered}" if text else numbered
        return [text_message(part) for part in split_text(full, TEXT_LIMIT)]

    parts = split_text(text, INTERACTIVE_BODY_LIMIT) if text else [CHOICES_PROMPT]
    leading = [text_message(part) for part in parts[:-1]]
    body = {"text": parts[-1]}
    if len(options) <= REPLY_BUTTONS_MAX:
        buttons = [
            {"type": "reply", "reply": {"id": payload[:REPLY_ID_LIMIT], "title": shorten(title, REPLY_TITLE_LIMIT)}}
            for title, payload in options
        ]
        interactive = {"type": "button", "body": body, "action": {"buttons": buttons}}
    else:
        rows = [_row(title, payload) for title, payload in options]
        interactive = {
            "type": "list",
            "body": body,
            "action": {"button": LIST_BUTTON_LABEL, "sections": [{"rows": rows}]},
        }
    return leading + [{"type": "interactive", "interactive": interactive}]


def _row(title: str, payload: str) -> Dict[str, Any]:
    row = {"id": payload[:LIST_ROW_ID_LIMIT], "title": shorten(title, LIST_ROW_TITLE_LIMIT)}
    if row["title"] != title:
        row["description"] = shorten(title, LIST_ROW_DESCRIPTION_LIMIT)
    return row


def _option(choice: Any) -> Optional[Tuple[str, str]]:
    """(title, payload) of a Rasa button or quick reply."""
    if not isinstance(choice, Mapping):
        return None
    title = str(choice.get("title") or "").strip()
    payload = str(choice.get("payload") or title).strip()
    if not title:
        return None
    return title, payload
