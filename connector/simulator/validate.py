"""Checks on outbound send requests, mirroring the limits Meta enforces.

Each check raises a `GraphError` carrying the code Meta would answer with, so the connector's
handling of rejected messages is tested against the same codes as production:
envelope problems → 100, a missing nested parameter → 131008, a value out of range → 131009,
template problems → 132000 / 132001 / 132012 / 132015 / 132016.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from .errors import GraphError, bad_request, invalid, missing
from .templates import MEDIA_HEADER_FORMATS, Template, TemplateRegistry

MESSAGE_TYPES = (
    "text", "image", "audio", "video", "document", "sticker",
    "location", "contacts", "interactive", "template", "reaction",
)
MEDIA_TYPES = ("image", "audio", "video", "document", "sticker")
NO_CAPTION_TYPES = ("audio", "sticker")
INTERACTIVE_TYPES = ("button", "list", "cta_url", "location_request_message", "flow", "product", "product_list")

TEXT_BODY_MAX = 4096
CAPTION_MAX = 1024
BUTTON_BODY_MAX = 1024
LIST_BODY_MAX = 4096
HEADER_TEXT_MAX = 60
FOOTER_MAX = 60
REPLY_BUTTONS_MAX = 3
REPLY_ID_MAX = 256
REPLY_TITLE_MAX = 20
LIST_BUTTON_MAX = 20
LIST_SECTIONS_MAX = 10
LIST_ROWS_MAX = 10
SECTION_TITLE_MAX = 24
ROW_ID_MAX = 200
ROW_TITLE_MAX = 24
ROW_DESCRIPTION_MAX = 72


def is_mark_read(body: Dict[str, Any]) -> bool:
    """A read receipt (optionally with a typing indicator) rather than a message."""
    return isinstance(body, dict) and body.get("status") == "read" and "message_id" in body


def recipient_of(body: Dict[str, Any]) -> str:
    """`to` (phone number) wins over `recipient` (business-scoped user id), as at Meta."""
    return str(body.get("to") or body.get("recipient") or "")


def validate_send(body: Any, registry: TemplateRegistry) -> Optional[Template]:
    """Raise `GraphError` for anything Meta would refuse; return the template for template sends."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    if body.get("messaging_product") != "whatsapp":
        raise bad_request("The parameter messaging_product is required and must be 'whatsapp'.")
    if body.get("recipient_type", "individual") not in ("individual", "group"):
        raise bad_request("Param recipient_type must be 'individual'.")
    for key in ("to", "recipient"):
        if key in body and not isinstance(body[key], str):
            raise bad_request(f"Param {key} must be a string.")
    if not recipient_of(body):
        raise bad_request("The parameter to is required.")
    kind = body.get("type", "text")
    if kind not in MESSAGE_TYPES:
        raise bad_request(f"Param type must be one of {{{', '.join(MESSAGE_TYPES)}}} - got \"{kind}\".")
    if "context" in body:
        ctx = body["context"]
        if not isinstance(ctx, dict) or not ctx.get("message_id"):
            raise missing("context['message_id']")
    content = body.get(kind)
    if content is None:
        raise missing(kind)
    if kind == "text":
        _check_text(content)
    elif kind in MEDIA_TYPES:
        _check_media(kind, content)
    elif kind == "location":
        _check_location(content)
    elif kind == "contacts":
        _check_contacts(content)
    elif kind == "reaction":
        _check_reaction(content)
    elif kind == "interactive":
        _check_interactive(content)
    elif kind == "template":
        return _check_template(content, registry)
    return None


def _require_dict(value: Any, name: str) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid(f"Param {name} must be a JSON object.")
    return value


def _text_field(obj: Dict[str, Any], key: str, name: str, max_len: int, *, required: bool, min_len: int = 1) -> str:
    value = obj.get(key)
    if value is None or value == "":
        if required:
            raise missing(name)
        return ""
    if not isinstance(value, str):
        raise invalid(f"Param {name} must be a string.")
    if len(value) > max_len:
        raise invalid(f"Param {name} must be at most {max_len} characters long.")
    if len(value) < min_len:
        raise invalid(f"Param {name} must be at least {min_len} characters long.")
    return value


def _check_text(text: Any) -> None:
    text = _require_dict(text, "text")
    body = text.get("body")
    if not isinstance(body, str) or not body.strip():
        raise missing("text['body']")
    if len(body) > TEXT_BODY_MAX:
        raise invalid(f"Param text['body'] must be at most {TEXT_BODY_MAX} characters long.")
    if "preview_url" in text and not isinstance(text["preview_url"], bool):
        raise invalid("Param text['preview_url'] must be a boolean.")


def _check_media(kind: str, media: Any, name: Optional[str] = None) -> None:
    name = name or kind
    media = _require_dict(media, name)
    has_id, has_link = bool(media.get("id")), bool(media.get("link"))
    if has_id and has_link:
        raise invalid(f"Param {name} must have either 'id' or 'link', not both.")
    if not has_id and not has_link:
        raise missing(f"{name}['id'] or {name}['link']")
    if has_link:
        link = media["link"]
        if not isinstance(link, str) or not link.startswith(("http://", "https://")):
            raise invalid(f"Param {name}['link'] must be a valid http(s) URL.")
    if "caption" in media:
        if kind in NO_CAPTION_TYPES:
            raise invalid(f"Param {name}['caption'] is not allowed for {kind} messages.")
        _text_field(media, "caption", f"{name}['caption']", CAPTION_MAX, required=False)


def _check_location(loc: Any) -> None:
    loc = _require_dict(loc, "location")
    for key, bound in (("latitude", 90), ("longitude", 180)):
        value = loc.get(key)
        if value is None or value == "":
            raise missing(f"location['{key}']")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise invalid(f"Param location['{key}'] must be a number.") from None
        if not -bound <= number <= bound:
            raise invalid(f"Param location['{key}'] must be between -{bound} and {bound}.")


def _check_contacts(contacts: Any) -> None:
    if not isinstance(contacts, list) or not contacts:
        raise missing("contacts")
    for i, contact in enumerate(contacts):
        name = _require_dict(contact, f"contacts[{i}]").get("name")
        if not isinstance(name, dict) or not name.get("formatted_name"):
            raise missing(f"contacts[{i}]['name']['formatted_name']")


def _check_reaction(reaction: Any) -> None:
    reaction = _require_dict(reaction, "reaction")
    if not reaction.get("message_id"):
        raise missing("reaction['message_id']")
    if "emoji" not in reaction or not isinstance(reaction["emoji"], str):
        raise missing("reaction['emoji']")


def _check_interactive(inter: Any) -> None:
    inter = _require_dict(inter, "interactive")
    kind = inter.get("type")
    if not kind:
        raise missing("interactive['type']")
    if kind not in INTERACTIVE_TYPES:
        raise invalid(f"Param interactive['type'] must be one of {{{', '.join(INTERACTIVE_TYPES)}}}.")
    body_max = LIST_BODY_MAX if kind == "list" else BUTTON_BODY_MAX
    body = inter.get("body")
    if body is None and kind != "product":
        raise missing("interactive['body']")
    if body is not None:
        _text_field(_require_dict(body, "interactive['body']"), "text", "interactive['body']['text']", body_max, required=True)
    if "footer" in inter:
        footer = _require_dict(inter["footer"], "interactive['footer']")
        _text_field(footer, "text", "interactive['footer']['text']", FOOTER_MAX, required=True)
    if "header" in inter:
        _check_interactive_header(kind, inter["header"])
    action = inter.get("action")
    if not isinstance(action, dict):
        raise missing("interactive['action']")
    if kind == "button":
        _check_reply_buttons(action)
    elif kind == "list":
        _check_list(action)
    elif kind == "cta_url":
        _check_cta_url(action)
    elif kind == "location_request_message" and action.get("name") != "send_location":
        raise invalid("Param interactive['action']['name'] must be 'send_location'.")


def _check_interactive_header(kind: str, header: Any) -> None:
    header = _require_dict(header, "interactive['header']")
    htype = header.get("type")
    if not htype:
        raise missing("interactive['header']['type']")
    allowed = ("text",) if kind == "list" else ("text", "image", "video", "document")
    if htype not in allowed:
        raise invalid(f"Param interactive['header']['type'] must be one of {{{', '.join(allowed)}}} for {kind} messages.")
    if htype == "text":
        _text_field(header, "text", "interactive['header']['text']", HEADER_TEXT_MAX, required=True)
    else:
        _check_media(htype, header.get(htype), f"interactive['header']['{htype}']")


def _check_reply_buttons(action: Dict[str, Any]) -> None:
    buttons = action.get("buttons")
    if not isinstance(buttons, list) or not buttons:
        raise missing("interactive['action']['buttons']")
    if len(buttons) > REPLY_BUTTONS_MAX:
        raise invalid(f"Param interactive['action']['buttons'] must have between 1 and {REPLY_BUTTONS_MAX} elements.")
    ids, titles = set(), set()
    for i, button in enumerate(buttons):
        name = f"interactive['action']['buttons'][{i}]"
        button = _require_dict(button, name)
        if button.get("type") != "reply":
            raise invalid(f"Param {name}['type'] must be 'reply'.")
        reply = button.get("reply")
        if not isinstance(reply, dict):
            raise missing(f"{name}['reply']")
        bid = _text_field(reply, "id", f"{name}['reply']['id']", REPLY_ID_MAX, required=True)
        title = reply.get("title")
        if not isinstance(title, str) or not 1 <= len(title) <= REPLY_TITLE_MAX:
            raise invalid(f"Button title length invalid. Min length: 1, Max length: {REPLY_TITLE_MAX}")
        if bid in ids:
            raise invalid("Buttons ids must be unique.")
        if title in titles:
            raise invalid("Button titles must be unique.")
        ids.add(bid)
        titles.add(title)


def _check_list(action: Dict[str, Any]) -> None:
    button = action.get("button")
    if not isinstance(button, str) or not button:
        raise missing("interactive['action']['button']")
    if len(button) > LIST_BUTTON_MAX:
        raise invalid(f"Param interactive['action']['button'] must be at most {LIST_BUTTON_MAX} characters long.")
    sections = action.get("sections")
    if not isinstance(sections, list) or not sections:
        raise missing("interactive['action']['sections']")
    if len(sections) > LIST_SECTIONS_MAX:
        raise invalid(f"Param interactive['action']['sections'] must have between 1 and {LIST_SECTIONS_MAX} elements.")
    total, row_ids = 0, set()
    for s, section in enumerate(sections):
        sname = f"interactive['action']['sections'][{s}]"
        section = _require_dict(section, sname)
        _text_field(section, "title", f"{sname}['title']", SECTION_TITLE_MAX, required=len(sections) > 1)
        rows = section.get("rows")
        if not isinstance(rows, list) or not rows:
            raise missing(f"{sname}['rows']")
        total += len(rows)
        for r, row in enumerate(rows):
            rname = f"{sname}['rows'][{r}]"
            row = _require_dict(row, rname)
            rid = _text_field(row, "id", f"{rname}['id']", ROW_ID_MAX, required=True)
            _text_field(row, "title", f"{rname}['title']", ROW_TITLE_MAX, required=True)
            _text_field(row, "description", f"{rname}['description']", ROW_DESCRIPTION_MAX, required=False)
            if rid in row_ids:
                raise invalid("Row ids must be unique.")
            row_ids.add(rid)
    if total > LIST_ROWS_MAX:
        raise invalid(f"Total row count exceed max allowed count: {LIST_ROWS_MAX}")


def _check_cta_url(action: Dict[str, Any]) -> None:
    params = action.get("parameters")
    if action.get("name") != "cta_url" or not isinstance(params, dict):
        raise missing("interactive['action']['parameters']")
    _text_field(params, "display_text", "interactive['action']['parameters']['display_text']", REPLY_TITLE_MAX, required=True)
    url = params.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise invalid("Param interactive['action']['parameters']['url'] must be a valid http(s) URL.")


def _check_template(tpl: Any, registry: TemplateRegistry) -> Template:
    tpl = _require_dict(tpl, "template")
    name = tpl.get("name")
    if not isinstance(name, str) or not name:
        raise missing("template['name']")
    language = tpl.get("language")
    code = language.get("code") if isinstance(language, dict) else None
    if not code:
        raise missing("template['language']['code']")
    template = registry.get(name, code)
    if template is None:
        raise GraphError(132001, f"template name ({name}) does not exist in {code}")
    if template.status == "PAUSED":
        raise GraphError(132015, f"Template {name} is paused due to low quality.")
    if template.status == "DISABLED":
        raise GraphError(132016, f"Template {name} has been disabled.")
    if template.status not in ("APPROVED", "ACTIVE"):
        raise GraphError(132001, f"template name ({name}) is not approved in {code}")
    components = tpl.get("components", [])
    if not isinstance(components, list):
        raise invalid("Param template['components'] must be an array.")
    given = _count_template_params(components, template)
    _compare_counts("header", given.pop("header", 0), template.header_params, template.header_params)
    _compare_counts("body", given.pop("body", 0), template.body_params, template.body_params)
    for index, spec in enumerate(template.buttons):
        _compare_counts(f"button at index {index}", given.pop(f"button:{index}", 0), spec.min_params, spec.max_params)
    for extra, count in given.items():
        raise GraphError(132000, f"{extra.replace(':', ' at index ')}: number of localizable_params ({count}) does not match the expected number of params (0)")
    return template


def _count_template_params(components: List[Any], template: Template) -> Dict[str, int]:
    """Parameters given per component: `header`, `body`, `button:<index>`; checks their format."""
    counts: Dict[str, int] = {}
    for i, comp in enumerate(components):
        comp = _require_dict(comp, f"template['components'][{i}]")
        ctype = str(comp.get("type", "")).lower()
        if ctype not in ("header", "body", "button"):
            raise invalid(f"Param template['components'][{i}]['type'] must be one of {{header, body, button}}.")
        params = comp.get("parameters", [])
        if not isinstance(params, list):
            raise invalid(f"Param template['components'][{i}]['parameters'] must be an array.")
        key = ctype
        if ctype == "button":
            if not comp.get("sub_type"):
                raise missing(f"template['components'][{i}]['sub_type']")
            if "index" not in comp:
                raise missing(f"template['components'][{i}]['index']")
            try:
                key = f"button:{int(comp['index'])}"
            except (TypeError, ValueError):
                raise invalid(f"Param template['components'][{i}]['index'] must be an integer.") from None
        for j, param in enumerate(params):
            _check_template_param(param, f"template['components'][{i}]['parameters'][{j}]", ctype, template)
        counts[key] = counts.get(key, 0) + len(params)
    return counts


def _check_template_param(param: Any, name: str, ctype: str, template: Template) -> None:
    param = _require_dict(param, name)
    ptype = param.get("type")
    if not ptype:
        raise missing(f"{name}['type']")
    if ptype == "text":
        if not isinstance(param.get("text"), str) or not param["text"].strip():
            raise missing(f"{name}['text']")
    elif ptype in ("image", "video", "document"):
        if ctype != "header" or template.header_format != ptype.upper():
            raise GraphError(132012, f"{name}: parameter of type {ptype} does not match the template's format")
        _check_media(ptype, param.get(ptype), f"{name}['{ptype}']")
    elif ptype == "location" and template.header_format not in MEDIA_HEADER_FORMATS:
        raise GraphError(132012, f"{name}: parameter of type location does not match the template's format")
    elif ptype == "payload" and not param.get("payload"):
        raise missing(f"{name}['payload']")


def _compare_counts(where: str, given: int, low: int, high: int) -> None:
    if not low <= given <= high:
        raise GraphError(
            132000,
            f"{where}: number of localizable_params ({given}) does not match the expected number of params ({high if given > high else low})",
        )


def template_values(tpl: Dict[str, Any]) -> Dict[str, List[str]]:
    """Text values of a template send per component, to render what the customer would read."""
    values: Dict[str, List[str]] = {"header": [], "body": []}
    for comp in tpl.get("components", []) or []:
        ctype = str(comp.get("type", "")).lower()
        if ctype in values:
            for p in comp.get("parameters", []) or []:
                if not isinstance(p, dict):
                    continue
                value = p.get("text")
                if value is None:
                    typed = p.get(p.get("type", ""))
                    value = typed.get("fallback_value", f"<{p.get('type')}>") if isinstance(typed, dict) else typed
                values[ctype].append(str(value))
    return values
