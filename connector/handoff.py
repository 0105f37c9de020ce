"""Human handoff: a conversation is with a person while its Rasa tracker is paused, whoever paused
it (a bot action, Rasa's events API, the agent API).

Rasa stores a paused conversation's messages and predicts nothing, but its `SessionStarted`
clears the pause: a customer who writes after the session expired would be answered by the bot
in the middle of a handoff. Two hooks on Rasa's `MessageProcessor` (the class: `PUT /model` makes
new processors, and reminders run on them) keep it with the person and tell the desk what
happens, both before Rasa saves the turn (a failure retries the turn, never loses it):

- at a session start, a paused conversation is paused again in the new session;
- after each prediction loop, a pause or resume is registered in the shared state (so every
  instance can list the handoffs and warn before a window lapses), and a customer message that
  arrived while paused is forwarded to the desk.

Nothing is read or written for a conversation that is not paused.
"""

import asyncio
import logging
from typing import Any, Awaitable, Callable, Dict, Optional

from rasa.shared.core.events import ActionExecuted, ConversationPaused, ConversationResumed, UserUttered

from connector.action_guard import in_channel_turn
from connector.care_state import unwrap
from connector.config import ChannelConfig
from connector.conversation import customer_message, history
from connector.decisions import masked
from connector.desk import Desk
from connector.intake import TurnInterrupted
from connector.outbound import Stores
from connector.tracker_reads import off_loop
from connector.window import CARE_WINDOW_SECONDS

logger = logging.getLogger(__name__)

_HOOKED = "_whatsapp_handoff_hooked"
_active: Optional["Handoffs"] = None
"""The running channel's handoffs, which the processor hooks report to."""


def install(handoffs: "Handoffs") -> None:
    """Hook Rasa's processor class once per process; the latest channel started gets the reports."""
    from rasa.core.processor import MessageProcessor

    global _active
    _active = handoffs
    if getattr(MessageProcessor, _HOOKED, False):
        return
    update_session, prediction_loop = MessageProcessor._update_tracker_session, MessageProcessor._run_prediction_loop

    async def keep_paused(processor: Any, tracker: Any, output_channel: Any, metadata: Optional[Dict] = None) -> None:
        paused = tracker.is_paused()
        await update_session(processor, tracker, output_channel, metadata)
        if paused and not tracker.is_paused():
            logger.info("Conversation %s is with an agent: paused again in its new Rasa session", masked(tracker.sender_id))
            tracker.update(ConversationPaused())

    async def observed(processor: Any, output_channel: Any, tracker: Any) -> None:
        paused = tracker.is_paused()
        await prediction_loop(processor, output_channel, tracker)
        if (paused or tracker.is_paused()) and _active is not None:
            await _active.after_prediction(tracker, paused)

    MessageProcessor._update_tracker_session = keep_paused
    MessageProcessor._run_prediction_loop = observed
    setattr(MessageProcessor, _HOOKED, True)


class Handoffs:
    def __init__(self, config: ChannelConfig, stores: Callable[[], Stores], now: Callable[[], Awaitable[float]],
                 desk: Desk, sweep_seconds: float = 5.0) -> None:
        self.config = config
        self.stores = stores
        self.now = now
        self.desk = desk
        self.sweep_seconds = sweep_seconds
        self._sweeper: Optional["asyncio.Task[None]"] = None

    # --- what Rasa's processor reports ------------------------------------------------------

    async def after_prediction(self, tracker: Any, was_paused: bool) -> None:
        sender_id = tracker.sender_id
        try:
            if not tracker.is_paused():  # a bot action resumed it
                await self.ended(sender_id)
                return
            if not was_paused:
                await self.started(sender_id, f"the bot ran {_last_action(tracker) or 'an action'}", tracker.events)
                return
            await self.started(sender_id, "paused through Rasa", tracker.events)
            latest = tracker.latest_message
            if in_channel_turn.get() and isinstance(latest, UserUttered):
                await self._forward(sender_id, latest)
        except Exception as error:
            if in_channel_turn.get():  # not saved: the intake runs the turn again
                raise TurnInterrupted(f"the handoff state could not be written ({type(error).__name__}: {error})") from error
            logger.error("Handoff of %s not recorded: %s: %s", masked(sender_id), type(error).__name__, error)

    async def started(self, sender_id: str, reason: Optional[str], events: Any) -> bool:
        """Registers the handoff; the desk hears of it once, with the conversation so far."""
        state = self.stores().state
        now = await self.now()
        if not await state.start_handoff(sender_id, now, reason):
            return False
        logger.info("Conversation %s handed to an agent: %s", masked(sender_id), reason)
        try:
            customer = await state.customer(sender_id)
            records = await state.recent_outbound(sender_id, 20)
            await self.desk.emit(sender_id, "handoff", event_id=f"handoff:{sender_id}:{now}", reason=reason,
                                 window_expires_at=self.expiry(customer.last_inbound_at),
                                 messages=history(events, records, 20))
        except Exception:
            await state.end_handoff(sender_id)  # so that the retry starts it, and tells the desk, again
            raise
        return True

    async def ended(self, sender_id: str) -> bool:
        state = self.stores().state
        if not await state.end_handoff(sender_id):
            return False
        logger.info("Conversation %s is back with the bot", masked(sender_id))
        await self.desk.emit(sender_id, "resumed")
        return True

    async def _forward(self, sender_id: str, event: UserUttered) -> None:
        message = customer_message(event)
        if message is None:
            return
        await self.desk.emit(sender_id, "message", event_id=f"message:{message['wamid']}", **message,
                             window_expires_at=self.expiry(message["timestamp"]))

    # --- what the agent API does -------------------------------------------------------------

    async def tracker(self, sender_id: str, full: bool = False) -> Any:
        """Read off the event loop (SQL stores block), from the store itself: Rasa's fail-safe
        wrapper would answer a failed read with an empty tracker; `full` for every session."""
        store = unwrap(self.stores().tracker_store)
        if full:
            return await off_loop(store, lambda: store.retrieve_full_tracker(sender_id), saves=False)
        return await off_loop(store, lambda: store.get_or_create_tracker(sender_id, append_action_listen=False))

    async def save(self, tracker: Any) -> None:
        """Raises if the store cannot take it (the fail-safe wrapper would keep it in memory)."""
        store = unwrap(self.stores().tracker_store)
        await off_loop(store, lambda: store.save(tracker))

    async def pause(self, sender_id: str, reason: Optional[str]) -> bool:
        """Call with Rasa's lock held. False if it was paused already."""
        tracker = await self.tracker(sender_id)
        if tracker.is_paused():
            await self.started(sender_id, reason, tracker.events)  # registered if Rasa paused it
            return False
        tracker.update(ConversationPaused())
        await self.save(tracker)
        await self.started(sender_id, reason, tracker.events)
        return True

    async def resume(self, sender_id: str, processor: Any, output_channel: Any) -> bool:
        """Call with Rasa's lock held: the conversation is the bot's again, and with
        `resume_intent` the bot says so. False if it was not paused (nothing is said)."""
        tracker = await self.tracker(sender_id)
        if not tracker.is_paused():
            await self.ended(sender_id)  # resumed through Rasa's own API
            return False
        _resume(tracker)
        await self.save(tracker)
        await self.ended(sender_id)
        if self.config.resume_intent:
            tracker = await processor.fetch_tracker_and_update_session(sender_id, output_channel)
            await processor.trigger_external_user_uttered(self.config.resume_intent, {}, tracker, output_channel)
        return True

    def expiry(self, last_inbound_at: Optional[float]) -> Optional[float]:
        """When the channel stops sending free-form (the margin before Meta's end), as the
        conversation views say."""
        if not last_inbound_at:
            return None
        return float(last_inbound_at) + CARE_WINDOW_SECONDS - self.config.care_window.margin_seconds

    # --- the warning before a handed-off conversation's window lapses -------------------------

    def start(self) -> None:
        if self.desk.enabled and self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_seconds)
            try:
                await self.sweep()
            except Exception as error:
                logger.error("Handoff windows unreadable: %s: %s", type(error).__name__, error)

    async def sweep(self) -> int:
        """`window_closing` once per window of each handed-off conversation, at the lead time
        (every instance sweeps; the conditional mark lets one of them tell the desk)."""
        state = self.stores().state
        now = await self.now()
        lead = self.config.window_closing_lead_seconds
        warned = 0
        for handoff in await state.handoffs(500):
            window_of = handoff.last_inbound_at
            if not window_of or (handoff.closing_sent_for or 0) >= window_of:
                continue
            expires_at = self.expiry(window_of)
            if not (expires_at - lead <= now < expires_at):
                continue
            if not (await self.tracker(handoff.sender_id)).is_paused():  # resumed through Rasa's own API
                await self.ended(handoff.sender_id)
                continue
            await self.desk.emit(handoff.sender_id, "window_closing", event_id=f"window_closing:{handoff.sender_id}:{window_of}",
                                 window_expires_at=expires_at, seconds_left=round(expires_at - now))
            if await state.mark_window_closing(handoff.sender_id, window_of):
                warned += 1
        return warned


def _resume(tracker: Any) -> None:
    """Resumed, and listening: the pause stopped Rasa's loop before its `action_listen`, and
    without it the next message is predicted as if it answered the handoff action."""
    if tracker.is_paused():
        tracker.update(ConversationResumed())
    if tracker.latest_action_name != "action_listen":
        tracker.update(ActionExecuted("action_listen"))


def _last_action(tracker: Any) -> Optional[str]:
    for event in reversed(tracker.events):
        if isinstance(event, ActionExecuted) and event.action_name not in ("action_listen", None):
            return event.action_name
    return None
