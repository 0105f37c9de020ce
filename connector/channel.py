"""The Rasa channel classes: glue between Meta's webhook, the parsers, Rasa and the client."""

import hmac
import json
import logging
from typing import Any, Awaitable, Callable, Dict, Optional, Text

from sanic import Blueprint, response
from sanic.request import Request
from sanic.response import HTTPResponse

from rasa.core.channels.channel import InputChannel, OutputChannel, UserMessage

from connector.client import CloudApiClient
from connector.config import ChannelConfig
from connector.errors import GraphError
from connector.inbound import rasa_metadata, rasa_text
from connector.ordering import PerSenderQueue
from connector.payloads import InboundMessage, MalformedWebhook, StatusUpdate, parse_webhook
from connector.render import render
from connector.signature import is_valid

logger = logging.getLogger(__name__)

CHANNEL_NAME = "whatsapp"


def masked(wa_id: Optional[str]) -> str:
    """Enough of a customer's id to follow a conversation in the logs, not the phone number."""
    return f"…{wa_id[-4:]}" if wa_id else "?"


class WhatsAppOutput(OutputChannel):
    """Sends Rasa's bot messages to one customer through the Cloud API.

    `send_response` is the single choke point and never raises: an exception there would abort
    Rasa's turn before the tracker is saved.
    """

    @classmethod
    def name(cls) -> Text:
        return CHANNEL_NAME

    def __init__(self, client: CloudApiClient) -> None:
        self.client = client

    async def send_response(self, recipient_id: Text, message: Dict[Text, Any]) -> None:
        try:
            rendered = render(message)
            if rendered.not_rendered:
                logger.warning(
                    "Not sent to %s: %s is not supported yet (response %s)",
                    masked(recipient_id), ", ".join(rendered.not_rendered), message.get("utter_action"),
                )
            for number, whatsapp_message in enumerate(rendered.messages, start=1):
                try:
                    wamid = await self.client.send_message(recipient_id, whatsapp_message)
                except GraphError as error:
                    logger.error(
                        "Cloud API refused a %s message to %s: code=%s %s; %d of %d sent",
                        whatsapp_message.get("type"), masked(recipient_id), error.code,
                        error.message, number - 1, len(rendered.messages),
                    )
                    return
                logger.info("Sent %s %s to %s", whatsapp_message.get("type"), wamid, masked(recipient_id))
        except Exception:
            logger.exception("Sending to %s failed", masked(recipient_id))

    async def send_text_message(self, recipient_id: Text, text: Text, **kwargs: Any) -> None:
        await self.send_response(recipient_id, {"text": text})


class WhatsAppInput(InputChannel):
    """Receives Meta's signed webhooks at /webhooks/whatsapp/webhook."""

    @classmethod
    def name(cls) -> Text:
        return CHANNEL_NAME

    @classmethod
    def from_credentials(cls, credentials: Optional[Dict[Text, Any]]) -> "WhatsAppInput":
        return cls(ChannelConfig.from_credentials(credentials))

    def __init__(self, config: ChannelConfig) -> None:
        self.config = config
        self.client = CloudApiClient(config)
        self.turns = PerSenderQueue()

    def get_output_channel(self) -> WhatsAppOutput:
        return WhatsAppOutput(self.client)

    def blueprint(self, on_new_message: Callable[[UserMessage], Awaitable[Any]]) -> Blueprint:
        bp = Blueprint("whatsapp_webhook", __name__)

        @bp.get("/")
        async def health(_: Request) -> HTTPResponse:
            return response.json({"status": "ok"})

        @bp.get("/webhook")
        async def verify_subscription(request: Request) -> HTTPResponse:
            """Meta's handshake when the webhook URL is saved in the app dashboard."""
            token = request.args.get("hub.verify_token") or ""
            if request.args.get("hub.mode") != "subscribe" or not hmac.compare_digest(
                token.encode(), self.config.verify_token.encode()
            ):
                logger.warning("Webhook verification refused: wrong mode or verify token")
                return response.text("verification failed", status=403)
            return response.text(request.args.get("hub.challenge") or "")

        @bp.post("/webhook")
        async def receive(request: Request) -> HTTPResponse:
            body = request.body or b""
            header = request.headers.get("x-hub-signature-256")
            if not header:
                logger.warning("Webhook refused: no X-Hub-Signature-256 header")
                return response.text("missing signature", status=401)
            if not is_valid(body, header, self.config.app_secret):
                logger.warning("Webhook refused: X-Hub-Signature-256 does not match the body")
                return response.text("invalid signature", status=403)
            try:
                webhook = parse_webhook(json.loads(body))
            except (ValueError, MalformedWebhook) as problem:
                logger.warning("Webhook refused: %s", problem)
                return response.text(f"malformed webhook: {problem}", status=400)

            for reason in webhook.skipped:
                logger.warning("Webhook item skipped: %s", reason)
            for status in webhook.statuses:
                _log_status(status)
            for message in webhook.messages:
                self._hand_to_rasa(message, on_new_message)
            return response.text("EVENT_RECEIVED")

        @bp.listener("before_server_stop")
        async def finish_turns(*_: Any) -> None:
            await self.turns.drain()

        @bp.listener("after_server_stop")
        async def close_client(*_: Any) -> None:
            await self.client.close()

        return bp

    def _hand_to_rasa(
        self, message: InboundMessage, on_new_message: Callable[[UserMessage], Awaitable[Any]]
    ) -> None:
        text = rasa_text(message)
        if text is None:
            logger.warning(
                "Message %s (%s) from %s has no text for Rasa; recorded, not handled yet",
                message.wamid, message.type, masked(message.sender_id),
            )
            return
        user_message = UserMessage(
            text=text,
            output_channel=self.get_output_channel(),
            sender_id=message.sender_id,
            input_channel=self.name(),
            message_id=message.wamid,
            metadata=rasa_metadata(message),
        )

        async def turn() -> None:
            try:
                await on_new_message(user_message)
            except Exception:
                logger.exception("Rasa failed on message %s from %s", message.wamid, masked(message.sender_id))

        self.turns.submit(message.sender_id, turn)


def _log_status(status: StatusUpdate) -> None:
    if status.errors:
        for error in status.errors:
            logger.warning(
                "Message %s to %s failed: code=%s %s",
                status.wamid, masked(status.recipient_id), error.code, error.title,
            )
    else:
        logger.debug("Message %s is %s", status.wamid, status.status)
