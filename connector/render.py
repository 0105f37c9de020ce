"""A Rasa bot message → the WhatsApp message objects that best carry it, within Meta's limits.

Meta rejects, rather than trims, anything over its limits (131008/131009), so everything is
fitted here. The objects carry only `type` and its body; the client adds the addressing envelope.
Parts are sent in Rasa's order: text (with its buttons), custom, image, attachment, elements.

- **text**: split at paragraph, line, sentence, then word breaks to ≤ 4,096 characters.
- **buttons / quick_replies** (`{title, payload}`): 1–3 → reply buttons (titles shortened to 20,
  kept unique); 4–10 → a list (row titles ≤ 24, the full title in the description ≤ 72, button
  label "Choose"); more than 10, or a payload longer than an id may be (256 / 200), → numbered
  text, and `Rendered.numbered_choices` maps "1", "2", … to the payloads so the channel can turn
  a typed number into the payload (`numbered_choice()`). A payload is never truncated; buttons
  with the same payload after the first are dropped (reported). The body (the text, or "Please
  choose:") holds ≤ 1,024 characters for buttons, 4,096 for lists; earlier parts go as text.
  URL buttons (`{title, url}` or `type: web_url`): a lone one becomes a `cta_url` button, others
  are listed as "title: url" lines in the body. A quick reply `{content_type: location}` becomes
  a location request; `user_phone_number` / `user_email` have no WhatsApp equivalent (reported).
- **image**: a URL → an image message by link. A URL whose extension WhatsApp cannot show as an
  image (.gif, .webp, .svg, …) goes as a document, a video/audio extension as that type.
- **attachment**, either
  - a URL string: the type comes from the path's extension (jpg/jpeg/png → image;
    mp4/3gp → video; aac/amr/mp3/m4a/ogg/opus → audio; anything else → document, named after
    the URL's file name), or
  - a dict `{"type": "image"|"video"|"audio"|"document"|"file"|"sticker", "payload": {"src"|"url"|"link": URL
    or "id": media id, "filename"?, "caption"?}}` (the payload's keys may also sit at the top
    level; "file" means document; without a type it is inferred from the URL), or
  - Messenger's template attachments `{"type": "template", "payload": {"template_type": "generic",
    "elements": [...]}}` (rendered as elements) and `{"template_type": "button", "text", "buttons"}`.
- **captions** ≤ 1,024: the rest of a longer caption follows as text; audio and stickers take
  no caption, so theirs follows as text. When a message has text, no buttons and no custom, and
  exactly one image/attachment, the text becomes that media's caption if it fits (one bubble
  instead of two); otherwise it goes first, as text.
- **elements** (generic-template cards `{title, subtitle, image_url, buttons}`): a card with an
  image → an image with the caption "*title*\\nsubtitle" (a reply-button message with the image
  as header when it has 1–3 postback buttons); when no card has an image, the cards become one
  list (rows: title, subtitle as description, the first postback payload as id), or numbered
  text beyond 10 cards.
- **custom**: a WhatsApp message object (`{"type": "location", "location": {...}}`), or a list of
  them; `type` may be left out when exactly one message-type key is present. It is VALIDATED
  with the limits Meta enforces (`message_problem()`); a bad one is not sent but reported in
  `not_rendered` and `problems`, with the reason. It may not set `to` / `recipient`.

Anything not sent is named in `Rendered.not_rendered` (the Rasa key) and explained in
`Rendered.problems` ("custom: ..."). Bookkeeping keys (utter_action, timestamp, ...) are ignored.
"""

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import unquote, urlparse

TEXT_LIMIT = 4096
CAPTION_LIMIT = 1024
BUTTON_BODY_LIMIT = 1024
INTERACTIVE_BODY_LIMIT = BUTTON_BODY_LIMIT  # reply buttons, cta_url, location request
LIST_BODY_LIMIT = 4096
HEADER_TEXT_LIMIT = 60
FOOTER_LIMIT = 60
REPLY_BUTTONS_MAX = 3
REPLY_TITLE_LIMIT = 20
REPLY_ID_LIMIT = 256
LIST_ROWS_MAX = 10
LIST_SECTIONS_MAX = 10
LIST_ROW_TITLE_LIMIT = 24
LIST_ROW_ID_LIMIT = 200
LIST_ROW_DESCRIPTION_LIMIT = 72
LIST_SECTION_TITLE_LIMIT = 24
LIST_BUTTON_LIMIT = 20
CTA_DISPLAY_TEXT_LIMIT = 20
LIST_BUTTON_LABEL = "Choose"
CHOICES_PROMPT = "Please choose:"
LOCATION_PROMPT = "Please share your location."

MESSAGE_TYPES = (
    "text", "image", "audio", "video", "document", "sticker",
    "location", "contacts", "interactive", "template", "reaction",
)
MEDIA_TYPES = ("image", "audio", "video", "document", "sticker")
CAPTION_TYPES = ("image", "video", "document")
INTERACTIVE_TYPES = ("button", "list", "cta_url", "location_request_message", "flow", "product", "product_list")

_IMAGE_EXTENSIONS = {"jpg", "jpeg", "png"}
_VIDEO_EXTENSIONS = {"mp4", "3gp", "3gpp"}
_AUDIO_EXTENSIONS = {"aac", "amr", "mp3", "m4a", "ogg", "oga", "opus"}
# Pictures WhatsApp does not take as `image` (only JPEG and PNG): sent as documents.
_OTHER_IMAGE_EXTENSIONS = {"gif", "webp", "svg", "bmp", "tif", "tiff", "heic", "heif", "avif", "ico"}
_DOCUMENT_EXTENSIONS = {
    "pdf", "doc", "docx", "xls", "xlsx", "ppt", "pptx", "odt", "ods", "odp", "rtf", "txt", "csv",
    "json", "xml", "zip", "ics", "vcf", "epub",
} | _OTHER_IMAGE_EXTENSIONS
_URL = re.compile(r"https?://", re.IGNORECASE)
_NUMBER = re.compile(r"^\s*#?\s*(\d{1,3})\s*[.)]?\s*$")


@dataclass(frozen=True)
class Rendered:
    messages: Tuple[Dict[str, Any], ...]
    not_rendered: Tuple[str, ...] = ()
    # "custom: Param interactive['action']['buttons'] must have between 1 and 3 elements." ...
    problems: Tuple[str, ...] = ()
    # ("1", payload), ("2", payload), ... when choices went out as numbered text
    numbered_choices: Tuple[Tuple[str, str], ...] = ()


def looks_like_a_choice(typed: str) -> bool:
    """Cheap check before looking up the customer's latest numbered options."""
    return bool(_NUMBER.match(typed or ""))


def numbered_choice(typed: str, choices: Sequence[Tuple[str, str]]) -> Optional[str]:
    """The payload for a customer's typed "2" (also "2.", "#2", " 2) ") among numbered choices."""
    match = _NUMBER.match(typed or "")
    if not match:
        return None
    number = str(int(match.group(1)))
    return next((payload for n, payload in choices if n == number), None)


def render(message: Mapping[str, Any]) -> Rendered:
    out = _Out()
    text = _clean(message.get("text"))
    choices_key = "quick_replies" if message.get("quick_replies") else "buttons"
    choices = message.get(choices_key)
    custom = message.get("custom")
    carriers = [key for key in ("image", "attachment", "elements") if message.get(key)]
    # the text may become the caption (or list body) of the only media part
    lead = text if text and not choices and not custom and len(carriers) == 1 else ""

    if choices:
        out.choices_from_rasa(text, choices, choices_key)
    elif text and not lead:
        out.text(text)
    if custom:
        out.custom(custom)
    if message.get("image"):
        out.image(message["image"], lead)
    if message.get("attachment"):
        out.attachment(message["attachment"], lead)
    if message.get("elements"):
        out.elements(message["elements"], lead, "elements")
    return out.result()


def text_message(body: str) -> Dict[str, Any]:
    return {"type": "text", "text": {"body": body, "preview_url": bool(_URL.search(body))}}


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
    half = len(window) // 2
    for separators in (("\n\n",), ("\n",), (". ", "! ", "? ", "… "), ("; ", ", "), (" ",)):
        at = max(window.rfind(separator) for separator in separators)
        if at > half:
            return at + 1 if separators[0] not in ("\n\n", "\n", " ") else at
    at = window.rfind(" ")
    return at if at > 0 else len(window) - 1


def shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def media_kind(url: str, default: str = "document") -> str:
    """The WhatsApp media type for a URL, from its path's extension."""
    extension = _extension(url)
    if extension in _IMAGE_EXTENSIONS:
        return "image"
    if extension in _VIDEO_EXTENSIONS:
        return "video"
    if extension in _AUDIO_EXTENSIONS:
        return "audio"
    if extension in _DOCUMENT_EXTENSIONS:
        return "document"
    return default


# --- rendering -------------------------------------------------------------------------------


@dataclass
class _Option:
    title: str
    payload: str
    description: str = ""


@dataclass
class _Choices:
    options: List[_Option] = field(default_factory=list)
    links: List[Tuple[str, str]] = field(default_factory=list)
    location: bool = False


class _Out:
    def __init__(self) -> None:
        self.messages: List[Dict[str, Any]] = []
        self.not_rendered: List[str] = []
        self.problems: List[str] = []
        self.numbered: List[Tuple[str, str]] = []

    def result(self) -> Rendered:
        return Rendered(tuple(self.messages), tuple(self.not_rendered), tuple(self.problems), tuple(self.numbered))

    def problem(self, key: str, reason: str, *, sent: bool = False) -> None:
        """Something of `key` was dropped (or, `sent=True`, sent differently than given)."""
        if not sent and key not in self.not_rendered:
            self.not_rendered.append(key)
        self.problems.append(f"{key}: {reason}")

    # --- text ------------------------------------------------------------------------------

    def text(self, text: str) -> None:
        self.messages.extend(text_message(part) for part in split_text(text, TEXT_LIMIT))

    def _body(self, text: str, limit: int) -> Dict[str, str]:
        """The last `limit`-sized part of `text` as an interactive body; earlier parts as text."""
        parts = split_text(text, limit) or [CHOICES_PROMPT]
        self.messages.extend(text_message(part) for part in parts[:-1])
        return {"text": parts[-1]}

    # --- buttons, quick replies, lists -----------------------------------------------------

    def choices_from_rasa(self, text: str, raw: Any, key: str) -> None:
        parsed = self._parse_choices(raw, key)
        self.choices(text, parsed, key)

    def _parse_choices(self, raw: Any, key: str) -> _Choices:
        parsed = _Choices()
        for choice in raw if isinstance(raw, (list, tuple)) else [raw]:
            if not isinstance(choice, Mapping):
                self.problem(key, f"a choice must be an object with title and payload, got {type(choice).__name__}", sent=True)
                continue
            content_type = choice.get("content_type")
            if content_type == "location":
                parsed.location = True
                continue
            if content_type in ("user_phone_number", "user_email"):
                self.problem(key, f"quick reply {content_type} has no WhatsApp equivalent", sent=True)
                continue
            title = _clean(choice.get("title"))
            url = _clean(choice.get("url"))
            if url or choice.get("type") == "web_url":
                if title and url.lower().startswith(("http://", "https://")):
                    parsed.links.append((title, url))
                else:
                    self.problem(key, f"a URL button needs a title and an http(s) url: {dict(choice)!r:.120}", sent=True)
                continue
            if not title:
                self.problem(key, f"a button without a title: {dict(choice)!r:.120}", sent=True)
                continue
            payload = _clean(choice.get("payload")) or title
            parsed.options.append(_Option(title, payload))
        return parsed

    def choices(self, text: str, parsed: _Choices, key: str, prefer_list: bool = False) -> None:
        """Reply buttons, a list, or numbered text; `prefer_list` keeps descriptions (cards)."""
        options: List[_Option] = []
        seen = set()
        for option in parsed.options:
            if option.payload in seen:
                self.problem(key, f"dropped {option.title!r}: same payload as an earlier choice ({option.payload[:60]})", sent=True)
                continue
            seen.add(option.payload)
            options.append(option)

        if not options and not parsed.location and len(parsed.links) == 1:
            title, url = parsed.links[0]
            self._cta_url(text or title, title, url)
            return
        body_text = text
        if parsed.links:
            lines = "\n".join(f"{title}: {url}" for title, url in parsed.links)
            body_text = f"{text}\n\n{lines}" if text else lines

        if not options:
            if parsed.location:
                self._location_request(body_text or LOCATION_PROMPT)
            elif body_text:
                self.text(body_text)
            else:
                self.problem(key, "nothing to send: no usable choice and no text")
            return

        fits_buttons = len(options) <= REPLY_BUTTONS_MAX and all(len(o.payload) <= REPLY_ID_LIMIT for o in options)
        if fits_buttons and not (prefer_list and any(o.description for o in options)):
            self._reply_buttons(body_text or CHOICES_PROMPT, options)
        elif len(options) <= LIST_ROWS_MAX and all(len(o.payload) <= LIST_ROW_ID_LIMIT for o in options):
            self._list(body_text or CHOICES_PROMPT, options)
        else:
            self._numbered(body_text, options)
        if parsed.location:
            self._location_request(LOCATION_PROMPT)

    def _reply_buttons(self, text: str, options: List[_Option], header: Optional[Dict[str, Any]] = None) -> None:
        body = self._body(text, BUTTON_BODY_LIMIT)
        titles = _unique([o.title for o in options], REPLY_TITLE_LIMIT)
        buttons = [
            {"type": "reply", "reply": {"id": o.payload, "title": title}} for o, title in zip(options, titles)
        ]
        interactive: Dict[str, Any] = {"type": "button"}
        if header:
            interactive["header"] = header
        interactive.update(body=body, action={"buttons": buttons})
        self.messages.append({"type": "interactive", "interactive": interactive})

    def _list(self, text: str, options: List[_Option]) -> None:
        body = self._body(text, LIST_BODY_LIMIT)
        titles = _unique([o.title for o in options], LIST_ROW_TITLE_LIMIT)
        rows = []
        for option, title in zip(options, titles):
            row = {"id": option.payload, "title": title}
            details = " ".join(
                part for part in (option.title if title != option.title else "", option.description) if part
            )
            if details:
                row["description"] = shorten(details, LIST_ROW_DESCRIPTION_LIMIT)
            rows.append(row)
        interactive = {
            "type": "list",
            "body": body,
            "action": {"button": LIST_BUTTON_LABEL, "sections": [{"rows": rows}]},
        }
        self.messages.append({"type": "interactive", "interactive": interactive})

    def _numbered(self, text: str, options: List[_Option]) -> None:
        start = len(self.numbered) + 1
        lines = []
        for number, option in enumerate(options, start=start):
            line = f"{number}. {' '.join(option.title.split())}"
            if option.description:
                line += f" – {' '.join(option.description.split())}"
            lines.append(line)
            self.numbered.append((str(number), option.payload))
        listing = "\n".join(lines)
        self.text(f"{text}\n\n{listing}" if text else listing)

    def _cta_url(self, text: str, title: str, url: str) -> None:
        body = self._body(text, INTERACTIVE_BODY_LIMIT)
        action = {"name": "cta_url", "parameters": {"display_text": shorten(title, CTA_DISPLAY_TEXT_LIMIT), "url": url}}
        self.messages.append({"type": "interactive", "interactive": {"type": "cta_url", "body": body, "action": action}})

    def _location_request(self, text: str) -> None:
        body = self._body(text, INTERACTIVE_BODY_LIMIT)
        interactive = {"type": "location_request_message", "body": body, "action": {"name": "send_location"}}
        self.messages.append({"type": "interactive", "interactive": interactive})

    # --- media -----------------------------------------------------------------------------

    def image(self, value: Any, lead: str) -> None:
        if isinstance(value, Mapping):  # tolerate an attachment-shaped image
            self.attachment({"type": "image", **value} if "type" not in value else value, lead, key="image")
            return
        url = _clean(value)
        source = _source(url)
        if source is None:
            self.text(lead)
            self.problem("image", f"not an http(s) URL or media id: {url[:120]!r}")
            return
        kind = media_kind(url, default="image") if "link" in source else "image"
        self.media(kind, source, caption="", filename=_filename(url) if kind == "document" else "", lead=lead)

    def attachment(self, value: Any, lead: str, key: str = "attachment") -> None:
        if isinstance(value, str):
            url = value.strip()
            source = _source(url)
            if source is None:
                self.text(lead)
                self.problem(key, f"not an http(s) URL or media id: {url[:120]!r}")
                return
            kind = media_kind(url) if "link" in source else "document"
            self.media(kind, source, "", _filename(url) if kind == "document" else "", lead)
            return
        if not isinstance(value, Mapping):
            self.text(lead)
            self.problem(key, f"must be a URL or an object, got {type(value).__name__}")
            return
        declared = _clean(value.get("type")).lower()
        payload = value.get("payload")
        fields: Mapping[str, Any] = payload if isinstance(payload, Mapping) else value
        if declared == "template":
            self._template_attachment(fields, lead, key)
            return
        url = _clean(fields.get("src") or fields.get("url") or fields.get("link"))
        media_id = _clean(fields.get("id"))
        source = {"id": media_id} if media_id and not url else _source(url)
        if source is None:
            self.text(lead)
            self.problem(key, "needs payload.src (an http(s) URL) or payload.id (a media id)")
            return
        if declared in ("", "auto"):
            kind = media_kind(url) if url else "document"
        elif declared == "file":
            kind = "document"
        elif declared == "image":
            kind = "document" if _extension(url) in _OTHER_IMAGE_EXTENSIONS else "image"
        elif declared in MEDIA_TYPES:
            kind = declared
        else:
            self.text(lead)
            self.problem(key, f"unknown attachment type {declared!r} (image, video, audio, document, file, sticker, template)")
            return
        filename = _clean(fields.get("filename") or fields.get("name") or fields.get("title"))
        if kind == "document" and not filename and url:
            filename = _filename(url)
        self.media(kind, source, _clean(fields.get("caption")), filename if kind == "document" else "", lead)

    def _template_attachment(self, payload: Mapping[str, Any], lead: str, key: str) -> None:
        template_type = payload.get("template_type")
        if template_type == "generic" and isinstance(payload.get("elements"), list):
            self.elements(payload["elements"], lead, key)
        elif template_type == "button":
            if lead:
                self.text(lead)
            self.choices(_clean(payload.get("text")), self._parse_choices(payload.get("buttons") or [], key), key)
        else:
            self.text(lead)
            self.problem(key, f"template attachment {template_type!r} is not supported (generic, button)")

    def media(self, kind: str, source: Dict[str, str], caption: str, filename: str, lead: str) -> None:
        """One media message; a caption over 1,024 (or on audio/sticker) continues as text."""
        if lead:
            if not caption and kind in CAPTION_TYPES and len(lead) <= CAPTION_LIMIT:
                caption = lead
            else:
                self.text(lead)
        body: Dict[str, Any] = dict(source)
        rest = ""
        if caption and kind in CAPTION_TYPES:
            body["caption"] = split_text(caption, CAPTION_LIMIT)[0]
            rest = caption.strip()[len(body["caption"]):].strip()
        elif caption:
            rest = caption
        if filename and kind == "document":
            body["filename"] = filename
        self.messages.append({"type": kind, kind: body})
        if rest:
            self.text(rest)

    # --- elements (generic template cards) -------------------------------------------------

    def elements(self, raw: Any, lead: str, key: str) -> None:
        cards: List[Mapping[str, Any]] = []
        for card in raw if isinstance(raw, (list, tuple)) else [raw]:
            if isinstance(card, Mapping) and _clean(card.get("title")):
                cards.append(card)
            else:
                self.problem(key, f"a card needs a title: {card!r:.120}", sent=True)
        if not cards:
            self.text(lead)
            self.problem(key, "no card to show")
            return
        if not any(_clean(card.get("image_url")) for card in cards):
            parsed = _Choices()
            for card in cards:
                title = _clean(card.get("title"))
                buttons = self._parse_choices(card.get("buttons") or [], key)
                parsed.links.extend(buttons.links)
                payload = buttons.options[0].payload if buttons.options else title
                parsed.options.append(_Option(title, payload, _clean(card.get("subtitle"))))
            self.choices(lead, parsed, key, prefer_list=True)
            return
        if lead:
            self.text(lead)
        for card in cards:
            self._card(card, key)

    def _card(self, card: Mapping[str, Any], key: str) -> None:
        buttons = self._parse_choices(card.get("buttons") or [], key)
        caption = f"*{_clean(card.get('title'))}*"
        subtitle = _clean(card.get("subtitle"))
        if subtitle:
            caption += f"\n{subtitle}"
        if buttons.links:
            caption += "\n" + "\n".join(f"{title}: {url}" for title, url in buttons.links)
        image_url = _clean(card.get("image_url"))
        source = _source(image_url) if image_url else None
        if image_url and source is None:
            self.problem(key, f"card image is not an http(s) URL: {image_url[:120]!r}", sent=True)
        options = _dedupe(buttons.options)
        if source is None:
            self.choices(caption, _Choices(options=options), key)
            return
        kind = media_kind(image_url, default="image") if "link" in source else "image"
        fits_header = kind in ("image", "video", "document") and len(caption) <= BUTTON_BODY_LIMIT
        if 1 <= len(options) <= REPLY_BUTTONS_MAX and fits_header and all(len(o.payload) <= REPLY_ID_LIMIT for o in options):
            header = {"type": kind, kind: dict(source, **({"filename": _filename(image_url)} if kind == "document" else {}))}
            self._reply_buttons(caption, options, header=header)
            return
        self.media(kind, source, caption, _filename(image_url) if kind == "document" else "", "")
        if options:
            self.choices(_clean(card.get("title")), _Choices(options=options), key)

    # --- custom ----------------------------------------------------------------------------

    def custom(self, custom: Any) -> None:
        for item in custom if isinstance(custom, list) else [custom]:
            message, reason = prepare_custom(item)
            if reason is not None:
                self.problem("custom", reason)
            else:
                self.messages.append(message)


def prepare_custom(item: Any) -> Tuple[Dict[str, Any], Optional[str]]:
    """A Rasa `custom` value → (the message object to send, None) or ({}, the reason it is refused)."""
    if not isinstance(item, Mapping):
        return {}, f"must be a WhatsApp message object, got {type(item).__name__}"
    message = dict(item)
    for key in ("to", "recipient"):
        if key in message:
            return {}, f"must not set '{key}': the channel addresses the message to the customer"
    if message.pop("messaging_product", "whatsapp") != "whatsapp":
        return {}, "messaging_product must be 'whatsapp'"
    if message.pop("recipient_type", "individual") != "individual":
        return {}, "recipient_type must be 'individual'"
    if "type" not in message:
        present = [kind for kind in MESSAGE_TYPES if kind in message]
        if len(present) != 1:
            return {}, f"has no WhatsApp message type (one of {', '.join(MESSAGE_TYPES)})"
        message["type"] = present[0]
    reason = message_problem(message)
    return (message, None) if reason is None else ({}, reason)


# --- validation: the limits Meta enforces (mirrors connector/simulator/validate.py) ---------


class _Invalid(Exception):
    pass


def message_problem(message: Any) -> Optional[str]:
    """Why Meta would refuse this message object (`type` plus its body), or None if it would not.
    Checks the same limits as Meta's 100/131008/131009 answers; templates only structurally."""
    try:
        _check_message(message)
    except _Invalid as problem:
        return str(problem)
    return None


def _check_message(message: Any) -> None:
    message = _object(message, "message")
    kind = message.get("type")
    if kind not in MESSAGE_TYPES:
        raise _Invalid(f"type must be one of {', '.join(MESSAGE_TYPES)}, got {kind!r}")
    if "context" in message:
        context = message["context"]
        if not isinstance(context, Mapping) or not context.get("message_id"):
            raise _Invalid("context['message_id'] is required")
    content = message.get(kind)
    if content is None:
        raise _Invalid(f"{kind} is required")
    checks = {
        "text": _check_text, "location": _check_location, "contacts": _check_contacts,
        "reaction": _check_reaction, "interactive": _check_interactive, "template": _check_template,
    }
    if kind in MEDIA_TYPES:
        _check_media(kind, content, kind)
    else:
        checks[kind](content)


def _object(value: Any, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _Invalid(f"{name} must be an object")
    return value


def _string(obj: Mapping[str, Any], key: str, name: str, limit: int, required: bool) -> str:
    value = obj.get(key)
    if value is None or value == "":
        if required:
            raise _Invalid(f"{name} is required")
        return ""
    if not isinstance(value, str):
        raise _Invalid(f"{name} must be a string")
    if len(value) > limit:
        raise _Invalid(f"{name} must be at most {limit} characters long (has {len(value)})")
    return value


def _check_text(text: Any) -> None:
    text = _object(text, "text")
    body = text.get("body")
    if not isinstance(body, str) or not body.strip():
        raise _Invalid("text['body'] is required")
    if len(body) > TEXT_LIMIT:
        raise _Invalid(f"text['body'] must be at most {TEXT_LIMIT} characters long (has {len(body)})")
    if "preview_url" in text and not isinstance(text["preview_url"], bool):
        raise _Invalid("text['preview_url'] must be a boolean")


def _check_media(kind: str, media: Any, name: str) -> None:
    media = _object(media, name)
    has_id, has_link = bool(media.get("id")), bool(media.get("link"))
    if has_id == has_link:
        raise _Invalid(f"{name} needs exactly one of 'id' and 'link'")
    if has_link and not (isinstance(media["link"], str) and media["link"].startswith(("http://", "https://"))):
        raise _Invalid(f"{name}['link'] must be an http(s) URL")
    if "caption" in media:
        if kind not in CAPTION_TYPES:
            raise _Invalid(f"{name}['caption'] is not allowed for {kind} messages")
        _string(media, "caption", f"{name}['caption']", CAPTION_LIMIT, required=False)


def _check_location(location: Any) -> None:
    location = _object(location, "location")
    for key, bound in (("latitude", 90), ("longitude", 180)):
        value = location.get(key)
        if value is None or value == "" or isinstance(value, bool):
            raise _Invalid(f"location['{key}'] is required")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise _Invalid(f"location['{key}'] must be a number") from None
        if not -bound <= number <= bound:
            raise _Invalid(f"location['{key}'] must be between -{bound} and {bound}")


def _check_contacts(contacts: Any) -> None:
    if not isinstance(contacts, list) or not contacts:
        raise _Invalid("contacts must be a non-empty list")
    for i, contact in enumerate(contacts):
        name = _object(contact, f"contacts[{i}]").get("name")
        if not isinstance(name, Mapping) or not name.get("formatted_name"):
            raise _Invalid(f"contacts[{i}]['name']['formatted_name'] is required")


def _check_reaction(reaction: Any) -> None:
    reaction = _object(reaction, "reaction")
    if not reaction.get("message_id"):
        raise _Invalid("reaction['message_id'] is required")
    if not isinstance(reaction.get("emoji"), str):
        raise _Invalid("reaction['emoji'] is required")


def _check_interactive(interactive: Any) -> None:
    interactive = _object(interactive, "interactive")
    kind = interactive.get("type")
    if kind not in INTERACTIVE_TYPES:
        raise _Invalid(f"interactive['type'] must be one of {', '.join(INTERACTIVE_TYPES)}, got {kind!r}")
    body = interactive.get("body")
    if body is None and kind != "product":
        raise _Invalid("interactive['body'] is required")
    if body is not None:
        limit = LIST_BODY_LIMIT if kind == "list" else BUTTON_BODY_LIMIT
        _string(_object(body, "interactive['body']"), "text", "interactive['body']['text']", limit, required=True)
    if "footer" in interactive:
        footer = _object(interactive["footer"], "interactive['footer']")
        _string(footer, "text", "interactive['footer']['text']", FOOTER_LIMIT, required=True)
    if "header" in interactive:
        header = _object(interactive["header"], "interactive['header']")
        allowed = ("text",) if kind == "list" else ("text", "image", "video", "document")
        header_type = header.get("type")
        if header_type not in allowed:
            raise _Invalid(f"interactive['header']['type'] must be one of {', '.join(allowed)} for {kind}")
        if header_type == "text":
            _string(header, "text", "interactive['header']['text']", HEADER_TEXT_LIMIT, required=True)
        else:
            _check_media(header_type, header.get(header_type), f"interactive['header']['{header_type}']")
    action = interactive.get("action")
    if not isinstance(action, Mapping):
        raise _Invalid("interactive['action'] is required")
    if kind == "button":
        _check_reply_buttons(action)
    elif kind == "list":
        _check_list(action)
    elif kind == "cta_url":
        parameters = action.get("parameters")
        if action.get("name") != "cta_url" or not isinstance(parameters, Mapping):
            raise _Invalid("interactive['action'] needs name 'cta_url' and parameters")
        _string(parameters, "display_text", "interactive['action']['parameters']['display_text']", CTA_DISPLAY_TEXT_LIMIT, True)
        url = parameters.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise _Invalid("interactive['action']['parameters']['url'] must be an http(s) URL")
    elif kind == "location_request_message" and action.get("name") != "send_location":
        raise _Invalid("interactive['action']['name'] must be 'send_location'")


def _check_reply_buttons(action: Mapping[str, Any]) -> None:
    buttons = action.get("buttons")
    if not isinstance(buttons, list) or not buttons:
        raise _Invalid("interactive['action']['buttons'] is required")
    if len(buttons) > REPLY_BUTTONS_MAX:
        raise _Invalid(f"interactive['action']['buttons'] must have between 1 and {REPLY_BUTTONS_MAX} elements")
    ids, titles = set(), set()
    for i, button in enumerate(buttons):
        name = f"interactive['action']['buttons'][{i}]"
        button = _object(button, name)
        if button.get("type") != "reply":
            raise _Invalid(f"{name}['type'] must be 'reply'")
        reply = _object(button.get("reply"), f"{name}['reply']")
        button_id = _string(reply, "id", f"{name}['reply']['id']", REPLY_ID_LIMIT, required=True)
        title = reply.get("title")
        if not isinstance(title, str) or not 1 <= len(title) <= REPLY_TITLE_LIMIT:
            raise _Invalid(f"{name}['reply']['title'] must be 1 to {REPLY_TITLE_LIMIT} characters long")
        if button_id in ids:
            raise _Invalid("button ids must be unique")
        if title in titles:
            raise _Invalid("button titles must be unique")
        ids.add(button_id)
        titles.add(title)


def _check_list(action: Mapping[str, Any]) -> None:
    _string(action, "button", "interactive['action']['button']", LIST_BUTTON_LIMIT, required=True)
    sections = action.get("sections")
    if not isinstance(sections, list) or not sections:
        raise _Invalid("interactive['action']['sections'] is required")
    if len(sections) > LIST_SECTIONS_MAX:
        raise _Invalid(f"interactive['action']['sections'] must have between 1 and {LIST_SECTIONS_MAX} elements")
    total, row_ids = 0, set()
    for s, section in enumerate(sections):
        name = f"interactive['action']['sections'][{s}]"
        section = _object(section, name)
        _string(section, "title", f"{name}['title']", LIST_SECTION_TITLE_LIMIT, required=len(sections) > 1)
        rows = section.get("rows")
        if not isinstance(rows, list) or not rows:
            raise _Invalid(f"{name}['rows'] is required")
        total += len(rows)
        for r, row in enumerate(rows):
            row_name = f"{name}['rows'][{r}]"
            row = _object(row, row_name)
            row_id = _string(row, "id", f"{row_name}['id']", LIST_ROW_ID_LIMIT, required=True)
            _string(row, "title", f"{row_name}['title']", LIST_ROW_TITLE_LIMIT, required=True)
            _string(row, "description", f"{row_name}['description']", LIST_ROW_DESCRIPTION_LIMIT, required=False)
            if row_id in row_ids:
                raise _Invalid("row ids must be unique")
            row_ids.add(row_id)
    if total > LIST_ROWS_MAX:
        raise _Invalid(f"a list has at most {LIST_ROWS_MAX} rows in all (has {total})")


def _check_template(template: Any) -> None:
    """Structure only: whether the template exists and its parameter counts match is Meta's call
    (132000/132001)."""
    template = _object(template, "template")
    if not isinstance(template.get("name"), str) or not template["name"]:
        raise _Invalid("template['name'] is required")
    language = template.get("language")
    if not isinstance(language, Mapping) or not language.get("code"):
        raise _Invalid("template['language']['code'] is required")
    components = template.get("components", [])
    if not isinstance(components, list):
        raise _Invalid("template['components'] must be a list")
    for i, component in enumerate(components):
        name = f"template['components'][{i}]"
        component = _object(component, name)
        component_type = str(component.get("type", "")).lower()
        if component_type not in ("header", "body", "button"):
            raise _Invalid(f"{name}['type'] must be one of header, body, button")
        if component_type == "button":
            if not component.get("sub_type"):
                raise _Invalid(f"{name}['sub_type'] is required")
            if "index" not in component:
                raise _Invalid(f"{name}['index'] is required")
        parameters = component.get("parameters", [])
        if not isinstance(parameters, list):
            raise _Invalid(f"{name}['parameters'] must be a list")
        for j, parameter in enumerate(parameters):
            parameter = _object(parameter, f"{name}['parameters'][{j}]")
            parameter_type = parameter.get("type")
            if not parameter_type:
                raise _Invalid(f"{name}['parameters'][{j}]['type'] is required")
            if parameter_type == "text" and not (isinstance(parameter.get("text"), str) and parameter["text"].strip()):
                raise _Invalid(f"{name}['parameters'][{j}]['text'] is required")
            if parameter_type in ("image", "video", "document"):
                _check_media(parameter_type, parameter.get(parameter_type), f"{name}['parameters'][{j}]['{parameter_type}']")
            if parameter_type == "payload" and not parameter.get("payload"):
                raise _Invalid(f"{name}['parameters'][{j}]['payload'] is required")


# --- helpers ---------------------------------------------------------------------------------


def _clean(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _unique(titles: Sequence[str], limit: int) -> List[str]:
    """Shortened titles, made unique with " (2)", " (3)" … (Meta refuses duplicate button titles)."""
    out: List[str] = []
    for title in titles:
        candidate, n = shorten(title, limit), 2
        while candidate in out:
            suffix = f" ({n})"
            candidate = shorten(title, limit - len(suffix)) + suffix
            n += 1
        out.append(candidate)
    return out


def _dedupe(options: List[_Option]) -> List[_Option]:
    seen, out = set(), []
    for option in options:
        if option.payload not in seen:
            seen.add(option.payload)
            out.append(option)
    return out


def _source(value: str) -> Optional[Dict[str, str]]:
    """{"link": URL} for an http(s) URL, {"id": ...} for an uploaded media id (digits)."""
    if value.lower().startswith(("http://", "https://")) and len(value) > 8:
        return {"link": value}
    if value.isdigit():
        return {"id": value}
    return None


def _extension(url: str) -> str:
    path = urlparse(url).path if url else ""
    name = path.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def _filename(url: str) -> str:
    name = unquote(urlparse(url).path.rsplit("/", 1)[-1]) if url else ""
    return name or "document"
