"""The Graph endpoints the connector calls, at the same paths as graph.facebook.com.

`POST /{version}/{phone_number_id}/messages` (send, mark read), `POST /{version}/{phone_number_id}/media`
(upload), `GET /{version}/{media_id}` (media URL) and the URL's download, and from the Business
Management API `GET /{version}/{waba_id}/message_templates` (the template list, cursor-paged).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Tuple
from urllib.parse import urlencode

from aiohttp import web

from .core import SIM
from .errors import GraphError
from .payloads import fake_sha256
from .templates import Page, encode_cursor

VERSION = r"{version:v\d+(?:\.\d+)?}"


def graph_error(error: GraphError) -> web.Response:
    return web.json_response(error.body(), status=error.http_status)


async def send_message(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    body: Any = None
    try:
        sim.check_auth(request.headers.get("Authorization"), request.query.get("access_token"))
        sim.check_phone_number_id(request.match_info["phone_number_id"])
        raw = await request.read()
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            raise GraphError(100, "The request body is not valid JSON.") from None
        result = await sim.send(request.match_info["version"], body, request.match_info["phone_number_id"])
    except GraphError as error:
        return graph_error(sim.reject(error, body))
    return web.json_response(result)


async def upload_media(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    try:
        sim.check_auth(request.headers.get("Authorization"), request.query.get("access_token"))
        sim.check_phone_number_id(request.match_info["phone_number_id"])
        if not request.content_type.startswith("multipart/"):
            raise GraphError(100, "Upload media as multipart/form-data with fields messaging_product, type and file.")
        form = await request.post()
        upload = form.get("file")
        if not hasattr(upload, "file"):
            raise GraphError(131008, "The parameter file is required.")
        data = upload.file.read()
        mime = str(form.get("type") or upload.content_type or "application/octet-stream")
    except GraphError as error:
        return graph_error(sim.reject(error))
    return web.json_response({"id": sim.store_media(data, mime)})


async def media_url(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    media_id = request.match_info["media_id"]
    try:
        sim.check_auth(request.headers.get("Authorization"), request.query.get("access_token"))
        stored = sim.state.media.get(media_id)
        if stored is None:
            raise GraphError(100, f"Unsupported get request. Object with ID '{media_id}' does not exist.", error_type="GraphMethodException")
    except GraphError as error:
        return graph_error(sim.reject(error))
    data, mime = stored
    path = request.app.router["sim_media_download"].url_for(media_id=media_id)
    url = f"{request.scheme}://{request.host}{path}"
    return web.json_response({
        "messaging_product": "whatsapp",
        "url": url,
        "mime_type": mime,
        "sha256": fake_sha256(data),
        "file_size": len(data),
        "id": media_id,
    })


async def media_download(request: web.Request) -> web.Response:
    """Meta's media URLs need the same bearer token; without it they answer 401/404."""
    sim = request.app[SIM]
    try:
        sim.check_auth(request.headers.get("Authorization"), request.query.get("access_token"))
    except GraphError as error:
        return graph_error(error)
    stored = sim.state.media.get(request.match_info["media_id"])
    if stored is None:
        raise web.HTTPNotFound()
    data, mime = stored
    return web.Response(body=data, content_type=mime.split(";")[0])


async def message_templates(request: web.Request) -> web.Response:
    """Meta's answer: `{"data": [...], "paging": {"cursors": {"before", "after"}, "previous"?, "next"?}}`,
    `next`/`previous` being full URLs (same query, other cursor), present only when there is more."""
    sim = request.app[SIM]
    try:
        sim.check_auth(request.headers.get("Authorization"), request.query.get("access_token"))
        sim.check_business_account(request.match_info["waba_id"])
        data, found, limit = await sim.list_templates(request.query)
    except GraphError as error:
        return graph_error(error)
    body: Dict[str, Any] = {"data": data}
    if found.items:
        body["paging"] = paging(request, found, limit)
    return web.json_response(body)


def paging(request: web.Request, found: Page, limit: int) -> Dict[str, Any]:
    first, last = encode_cursor(found.items[0]), encode_cursor(found.items[-1])
    out: Dict[str, Any] = {"cursors": {"before": first, "after": last}}
    base = f"{request.scheme}://{request.host}{request.path}"  # as the client addressed the simulator
    keep: List[Tuple[str, str]] = [(k, v) for k, v in request.query.items() if k not in ("after", "before", "limit")]
    if found.has_before:
        out["previous"] = f"{base}?{urlencode(keep + [('limit', str(limit)), ('before', first)])}"
    if found.has_after:
        out["next"] = f"{base}?{urlencode(keep + [('limit', str(limit)), ('after', last)])}"
    return out


def add_routes(app: web.Application) -> None:
    app.router.add_post(f"/{VERSION}/{{phone_number_id}}/messages", send_message)
    app.router.add_post(f"/{VERSION}/{{phone_number_id}}/media", upload_media)
    app.router.add_get(f"/{VERSION}/{{waba_id}}/message_templates", message_templates)
    app.router.add_get(f"/{VERSION}/{{media_id:\\d+}}", media_url)
    app.router.add_get("/_sim/media/{media_id}/download", media_download, name="sim_media_download")
