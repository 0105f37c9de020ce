"""Custom actions for the demo shop bot.

Run with ``rasa run actions --actions actions`` from the project root.
"""

import abc
import asyncio
import json
import logging
import math
import os
import re
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Text, Tuple

import aiohttp
from rasa_sdk import Action, FormValidationAction, Tracker
from rasa_sdk.events import ConversationPaused, EventType, ReminderScheduled, SlotSet
from rasa_sdk.executor import CollectingDispatcher
from rasa_sdk.types import DomainDict

# Looked up next to this file, so the action server can be started from any cwd.
ORDERS_FILE = Path(__file__).resolve().parent / "orders.json"

OPT_IN_SLOT = "whatsapp_opt_in"
FOLLOW_UP_INTENT = "EXTERNAL_order_follow_up"
# 25 hours after the check: by then the care window has lapsed unless the customer wrote again, so
# the update goes out as the approved `order_status_update` template (see credentials.yml); the
# simulator page's "+25 h" lands on it.
FOLLOW_UP_SECONDS = float(os.environ.get("ORDER_FOLLOW_UP_SECONDS", 25 * 3600))
# How long the order system takes to answer (0 here; tests make it slow to catch a turn mid-way).
ORDER_LOOKUP_SECONDS = float(os.environ.get("ORDER_LOOKUP_SECONDS", 0))
FOLLOW_UP_STATUSES = ("processing", "shipped")

logger = logging.getLogger(__name__)

_ORDER_ID_RE = re.compile(r"\d{4,8}")
# A 4-8 digit number standing on its own inside a longer reply ("it's 10042").
_ORDER_ID_IN_TEXT_RE = re.compile(r"(?<![\w])\d{4,8}(?![\w])")


def load_orders(path: Path = ORDERS_FILE) -> Dict[Text, Dict[Text, Any]]:
    """Read the demo order "database" (a dict keyed by order number)."""
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def normalize_order_id(value: Any) -> Optional[Text]:
    """Return the order number in ``value`` as a digit string, or None.

    Accepts "10042", " #10042 " and replies such as "it's 10042"; rejects
    anything without exactly one 4-8 digit number.
    """
    if value is None:
        return None
    text = str(value).strip()
    if text.startswith("#"):
        text = text[1:].strip()
    if _ORDER_ID_RE.fullmatch(text):
        return text
    found = _ORDER_ID_IN_TEXT_RE.findall(text.replace("#", " "))
    if len(found) == 1:
        return found[0]
    return None


def _format_date(value: Optional[Text]) -> Optional[Text]:
    if not value:
        return None
    try:
        d = date.fromisoformat(value)
    except ValueError:
        return value
    return f"{d.day} {d.strftime('%B')}"


def describe_order(order_id: Text, order: Dict[Text, Any]) -> Text:
    """A one-message, human-friendly description of an order's status."""
    status = order.get("status", "unknown")
    item = order.get("item")
    what = f"Order {order_id} ({item})" if item else f"Order {order_id}"
    eta = _format_date(order.get("eta"))

    if status == "shipped":
        carrier = order.get("carrier")
        text = f"{what} has shipped"
        if carrier:
            text += f" with {carrier}"
        if eta:
            text += f" and should arrive by {eta}"
        return text + "."
    if status == "processing":
        text = f"{what} is being prepared"
        if eta:
            text += f" and should ship by {eta}"
        return text + "."
    if status == "delivered":
        delivered_on = _format_date(order.get("delivered_on"))
        if delivered_on:
            return f"{what} was delivered on {delivered_on}."
        return f"{what} has been delivered."
    if status == "cancelled":
        return (
            f"{what} was cancelled. If that's unexpected, ask to talk to a "
            "person and a colleague will look into it."
        )
    return f"{what} is {status}."


class ActionCheckOrderStatus(Action):
    """Look up the order in ``order_id`` and tell the customer its status."""

    def name(self) -> Text:
        return "action_check_order_status"

    async def run(
        self,
        dispatcher: CollectingDispatcher,
        tracker: Tracker,
        domain: DomainDict,
    ) -> List[EventType]:
        order_id = normalize_order_id(tracker.get_slot("order_id"))
        if order_id is None:
            dispatcher.utter_message(response="utter_ask_order_id")
            return [SlotSet("order_id", None), SlotSet("order_status", None)]

        if ORDER_LOOKUP_SECONDS:
            await asyncio.sleep(ORDER_LOOKUP_SECONDS)
        order = load_orders().get(order_id)
        if order is None:
            dispatcher.utter_message(
                text=(
                    f"I couldn't find an order with number {order_id}. Please "
                    "check the number in your confirmation email and send it "
                    "again, or ask to talk to a person."
                )
            )
            # Forget the wrong number so the next attempt asks again.
            return [SlotSet("order_id", None), SlotSet("order_status", None)]

        dispatcher.utter_message(text=describe_order(order_id, order))
        events: List[EventType] = [
            SlotSet("order_id", order_id),
            SlotSet("order_status", order.get("status")),
        ]
        if order.get("status") in FOLLOW_UP_STATUSES:
            events.append(
                ReminderScheduled(
                    FOLLOW_UP_INTENT,
                    trigger_date_time=datetime.now() + timedelta(seconds=FOLLOW_UP_SECONDS),
                    entities=[{"entity": "order_id", "value": order_id}],
                    name=f"order_follow_up_{order_id}",
                    kill_on_user_message=False,
                )
            )
        return events


def _is_stale_order_id(tracker: Tracker) -> bool:
    """True if the form is starting and the latest message named no order.

    ``order_id`` keeps the last order checked (``utter_order_update`` uses
    it), so "where is my order?" later in the conversation would otherwise
    skip the question and report that old order again.
    """
    if tracker.get_slot("requested_slot") == "order_id":
        return False  # the customer is answering "What's your order number?"
    entities = (tracker.latest_message or {}).get("entities") or []
    return not any(e.get("entity") == "order_id" for e in entities)


class ValidateOrderForm(FormValidationAction):
    """Accept only order numbers of 4 to 8 digits."""

    def name(self) -> Text:
        return "validate_order_form"

    def validate_order_id(
        self,
        slot_value: Any,
        dispatcher: CollectingDispatcher,
        tracker: Tracker,
        domain: DomainDict,
    ) -> Dict[Text, Any]:
        if _is_stale_order_id(tracker):
            # The form is being activated and the number is left over from an
            # earlier check: drop it (silently) so the form asks which order.
            return {"order_id": None}

        order_id = normalize_order_id(slot_value)
        if order_id is None:
            dispatcher.utter_message(
                text=(
                    "That doesn't look like an order number. It's 4 to 8 "
                    "digits long, like 10042."
                )
            )
            return {"order_id": None}
        return {"order_id": order_id}


class _SetOptIn(Action, abc.ABC):
    """Record the customer's choice about proactive order updates (the channel reads the slot).
    Abstract, so that the action server does not register it."""

    opt_in: bool
    confirmation: Text

    @abc.abstractmethod
    def name(self) -> Text:
        ...

    async def run(
        self,
        dispatcher: CollectingDispatcher,
        tracker: Tracker,
        domain: DomainDict,
    ) -> List[EventType]:
        dispatcher.utter_message(text=self.confirmation)
        return [SlotSet(OPT_IN_SLOT, self.opt_in)]


class ActionOptIn(_SetOptIn):
    opt_in = True
    confirmation = "You'll get updates about your orders here. Reply STOP at any time to stop."

    def name(self) -> Text:
        return "action_opt_in"


class ActionOptOut(_SetOptIn):
    opt_in = False
    confirmation = 'Done, I won\'t send you order updates any more. Send "subscribe" if you change your mind.'

    def name(self) -> Text:
        return "action_opt_out"


class ActionOrderFollowUp(Action):
    """The follow-up a day later: a chatty update while the care window is open, otherwise the
    `utter_order_update` response, which the channel sends as its approved template."""

    def name(self) -> Text:
        return "action_order_follow_up"

    async def run(
        self,
        dispatcher: CollectingDispatcher,
        tracker: Tracker,
        domain: DomainDict,
    ) -> List[EventType]:
        order_id = normalize_order_id(tracker.get_slot("order_id"))
        order = load_orders().get(order_id) if order_id else None
        if order is None:
            return []
        status = order.get("status")
        if tracker.get_slot("whatsapp_window_open"):
            dispatcher.utter_message(text=f"A quick update: {describe_order(order_id, order)}")
        else:
            # The parameters travel with the message, so the template is filled even though
            # the slots set in this turn are not saved yet when the channel sends it.
            dispatcher.utter_message(response="utter_order_update", order_id=order_id, order_status=status)
        return [SlotSet("order_status", status)]


class ActionHandOff(Action):
    """"Talk to a person": tells the customer what happens next and pauses the conversation for a
    colleague (a rule ends the order form first if it was asking). The WhatsApp channel sees the pause, tells
    the desk with the conversation so far, forwards what the customer writes next, and keeps the
    bot quiet, across Rasa sessions, until an agent hands the conversation back."""

    def name(self) -> Text:
        return "action_hand_off"

    async def run(
        self,
        dispatcher: CollectingDispatcher,
        tracker: Tracker,
        domain: DomainDict,
    ) -> List[EventType]:
        dispatcher.utter_message(response="utter_human_handoff")
        return [ConversationPaused()]


class ActionWhatsAppWindow(Action):
    """Lets stories and actions branch on the care window: sets `whatsapp_window_open` and
    `whatsapp_window_expires_at` from the channel's view (which reads every Rasa session) and the
    message in flight (which Rasa has not saved yet)."""

    def name(self) -> Text:
        return "action_whatsapp_window"

    async def run(
        self,
        dispatcher: CollectingDispatcher,
        tracker: Tracker,
        domain: DomainDict,
    ) -> List[EventType]:
        from connector.window import CareWindowPolicy, WindowFacts
        from connector.tracker_reads import inbound_timestamp

        view = await _fetch_window_view(tracker.sender_id)
        in_tracker = [inbound_timestamp(e) for e in tracker.events if e.get("event") == "user"]
        candidates = [t for t in in_tracker + [view.get("last_inbound_at")] if t is not None]
        now = view.get("now") or datetime.now().timestamp()
        facts = WindowFacts(
            last_inbound_at=max(candidates) if candidates else None,
            closed_for_inbound=view.get("closed_by_meta_for"),
        )
        policy = CareWindowPolicy(margin_seconds=view.get("margin_seconds", 60.0))
        is_open = facts.is_open(now, policy)
        expires_at = facts.expires_at(now) - policy.margin_seconds if is_open else None
        return [SlotSet("whatsapp_window_open", is_open), SlotSet("whatsapp_window_expires_at", expires_at)]


async def _fetch_window_view(sender_id: Text) -> Dict[Text, Any]:
    url = f"{os.environ.get('RASA_URL', 'http://localhost:5005')}/webhooks/whatsapp/conversations/{sender_id}"
    headers = {"Authorization": f"Bearer {os.environ.get('RASA_AUTH_TOKEN', '')}"}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            async with session.get(url, headers=headers) as response:
                response.raise_for_status()
                return await response.json()
    except (aiohttp.ClientError, OSError, ValueError) as error:
        logger.warning("Care window view unavailable (%s): judging from this session only", error)
        return {}


# --- A shared location → the nearest pickup point ------------------------------------------


class PickupPoint(NamedTuple):
    name: Text
    address: Text
    latitude: float
    longitude: float


# Made-up pickup points for the demo shop.
PICKUP_POINTS: Tuple[PickupPoint, ...] = (
    PickupPoint("the shop counter in Mitte", "Torstraße 101, 10119 Berlin", 52.5291, 13.4010),
    PickupPoint("the Kreuzberg kiosk", "Oranienstraße 25, 10999 Berlin", 52.5010, 13.4195),
    PickupPoint("the Charlottenburg parcel locker", "Kantstraße 60, 10627 Berlin", 52.5060, 13.3050),
)
# Farther than this, the customer is told the points are all in Berlin.
PICKUP_FAR_KM = 50.0
EARTH_RADIUS_KM = 6371.0


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in km between two points given in degrees."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    d_phi = phi2 - phi1
    d_lambda = math.radians(lon2 - lon1)
    a = math.sin(d_phi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(d_lambda / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def nearest_pickup_point(
    latitude: float, longitude: float, points: Tuple[PickupPoint, ...] = PICKUP_POINTS
) -> Tuple[PickupPoint, float]:
    """The closest point and its distance in km."""
    return min(
        ((p, haversine_km(latitude, longitude, p.latitude, p.longitude)) for p in points),
        key=lambda pair: pair[1],
    )


def _coordinate(value: Any, limit: float) -> Optional[float]:
    """A latitude (limit 90) or longitude (limit 180) as float, or None when unusable."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number) or abs(number) > limit:
        return None
    return number


def _latest_entity(tracker: Tracker, entity: Text) -> Any:
    for found in (tracker.latest_message or {}).get("entities") or []:
        if found.get("entity") == entity:
            return found.get("value")
    return None


def format_km(km: float) -> Text:
    if km < 0.1:
        return "less than 0.1 km"
    return f"about {km:.1f} km" if km < 100 else f"about {km:,.0f} km"


def _place_label(value: Any, limit: int = 80) -> Optional[Text]:
    """The shared place's name or address on one line (names may contain newlines)."""
    label = " ".join(str(value).split()) if value is not None else ""
    if len(label) > limit:
        label = label[: limit - 1].rstrip() + "…"
    return label or None


class ActionNearestPickupPoint(Action):
    """Answers a shared location (`/whatsapp_location{"latitude": .., "longitude": .., ...}`)
    with the nearest pickup point and its distance."""

    def name(self) -> Text:
        return "action_nearest_pickup_point"

    async def run(
        self,
        dispatcher: CollectingDispatcher,
        tracker: Tracker,
        domain: DomainDict,
    ) -> List[EventType]:
        latitude = _coordinate(_latest_entity(tracker, "latitude"), 90.0)
        longitude = _coordinate(_latest_entity(tracker, "longitude"), 180.0)
        if latitude is None or longitude is None:
            dispatcher.utter_message(
                text=(
                    "Thanks for the location! I couldn't read it, though. Please share it "
                    "again, or ask for a person."
                )
            )
            return []

        point, km = nearest_pickup_point(latitude, longitude)
        place = _place_label(_latest_entity(tracker, "name")) or _place_label(
            _latest_entity(tracker, "address")
        )
        where = f" to {place}" if place else ""
        text = (
            f"The nearest pickup point{where} is {point.name}, {point.address} "
            f"({format_km(km)} away)."
        )
        if km > PICKUP_FAR_KM:
            text += " Our pickup points are all in Berlin; ask for a person about delivery to you."
        dispatcher.utter_message(text=text)
        return []
