"""A custom action the action server cannot run must not cost the customer their message.

Rasa logs such a failure and saves the turn as if the action had run: the customer gets no answer
and nothing retries. In a turn the WhatsApp channel handed to Rasa, the guarded endpoint raises
`TurnInterrupted` instead, which ends the turn before Rasa saves it; the intake retries it. Other
channels' turns (REST, the HTTP API) keep Rasa's own behaviour.
"""

import asyncio
from contextvars import ContextVar
from typing import Any

import aiohttp
from rasa.utils.endpoints import EndpointConfig

from connector.intake import TurnInterrupted

in_channel_turn: ContextVar[bool] = ContextVar("in_whatsapp_turn", default=False)


class GuardedEndpoint(EndpointConfig):
    """The action endpoint as configured, with unreachable (or 5xx) action servers raising
    `TurnInterrupted` inside the channel's turns. A 4xx is the action rejecting: Rasa's to handle."""

    def __init__(self, original: EndpointConfig) -> None:
        self.__dict__.update(original.__dict__)

    async def request(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().request(*args, **kwargs)
        except aiohttp.ClientResponseError as error:
            if error.status < 500 or not in_channel_turn.get():
                raise
            raise TurnInterrupted(f"the action server answered {error.status}") from error
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            if not in_channel_turn.get():
                raise
            raise TurnInterrupted(f"the action server could not be reached ({type(error).__name__})") from error


def guard(agent: Any) -> None:
    """Wrap the agent's action endpoint (again after `PUT /model` replaced the agent)."""
    processor = getattr(agent, "processor", None)
    endpoint = getattr(processor, "action_endpoint", None)
    if endpoint is not None and not isinstance(endpoint, GuardedEndpoint):
        processor.action_endpoint = GuardedEndpoint(endpoint)
