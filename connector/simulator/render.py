"""One-line, human-readable text of a message, for the conversation log and the CLI."""

from __future__ import annotations

from typing import Any, Dict, Optional

from .templates import Template
from .validate import template_values


def describe(message: Dict[str, Any], template: Optional[Template] = None) -> str:
    """Text of an outbound send body or an inbound `messages[]` item (same per-type shapes)."""
    kind = message.get("type", "text")
    content = message.get(kind)
    if kind == "text":
        return str((content or {}).get("body", ""))
    if kind == "template":
        if template is not None:
            values = template_values(content or {})
            return template.render(values["body"], values["header"])
        return f"<template {(content or {}).get('name')}>"
    if kind == "interactive":
        return _interactive(content or {})
    if kind == "button":
        return str((content or {}).get("text", ""))
    if kind in ("image", "audio", "video", "document", "sticker"):
        media = content or {}
        label = media.get("caption") or media.get("filename") or media.get("link") or media.get("id") or ""
        return f"<{kind}> {label}".strip()
    if kind == "location":
        loc = content or {}
        where = loc.get("name") or loc.get("address") or ""
        return f"<location {loc.get('latitude')},{loc.get('longitude')}> {where}".strip()
    if kind == "reaction":
        return f"<reaction {(content or {}).get('emoji', '')}>"
    if kind == "contacts":
        names = [c.get("name", {}).get("formatted_name", "?") for c in content or [] if isinstance(c, dict)]
        return "<contacts> " + ", ".join(names)
    return f"<{kind}>"


def _interactive(inter: Dict[str, Any]) -> str:
    kind = inter.get("type")
    if kind in ("button_reply", "list_reply"):  # inbound taps
        return str(inter.get(kind, {}).get("title", ""))
    parts = []
    header = inter.get("header") or {}
    if header.get("type") == "text":
        parts.append(str(header.get("text", "")))
    parts.append(str((inter.get("body") or {}).get("text", "")))
    action = inter.get("action") or {}
    if kind == "button":
        parts.append(" ".join(f"[{b.get('reply', {}).get('title', '')}]" for b in action.get("buttons", [])))
    elif kind == "list":
        rows = [r.get("title", "") for s in action.get("sections", []) for r in s.get("rows", [])]
        parts.append(f"[{action.get('button', '')}: " + " | ".join(rows) + "]")
    elif kind == "cta_url":
        params = action.get("parameters") or {}
        parts.append(f"[{params.get('display_text', '')} -> {params.get('url', '')}]")
    footer = (inter.get("footer") or {}).get("text")
    if footer:
        parts.append(footer)
    return "\n".join(p for p in parts if p)
