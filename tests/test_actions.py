"""Unit tests for the demo bot's custom actions (actions/actions.py).

They use the real rasa_sdk Tracker / CollectingDispatcher, the real
actions/orders.json and the real domain.yml; no Rasa server is needed.
"""

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import yaml
from rasa_sdk import Tracker
from rasa_sdk.events import SlotSet
from rasa_sdk.executor import CollectingDispatcher

from actions import actions
from actions.actions import (
    PICKUP_POINTS,
    ActionNearestPickupPoint,
    ActionOrderFollowUp,
    ActionCheckOrderStatus,
    ActionOptIn,
    ActionOptOut,
    ValidateOrderForm,
    haversine_km,
    load_orders,
    nearest_pickup_point,
    normalize_order_id,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def domain() -> Dict[str, Any]:
    with (ROOT / "domain.yml").open(encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def orders() -> Dict[str, Dict[str, Any]]:
    with (ROOT / "actions" / "orders.json").open(encoding="utf-8") as f:
        return json.load(f)


def make_tracker(
    slots: Optional[Dict[str, Any]] = None,
    text: str = "",
    intent: str = "order_status",
    events: Optional[List[Dict[str, Any]]] = None,
    active_loop: Optional[Dict[str, Any]] = None,
    entities: Optional[List[Dict[str, Any]]] = None,
) -> Tracker:
    latest_message = {
        "text": text,
        "intent": {"name": intent, "confidence": 1.0},
        "entities": list(entities or []),
    }
    return Tracker(
        sender_id="test-user",
        slots=dict(slots or {}),
        latest_message=latest_message,
        events=list(events or [{"event": "user", "text": text, "parse_data": latest_message}]),
        paused=False,
        followup_action=None,
        active_loop=active_loop or {},
        latest_action_name="action_listen",
    )


def texts(dispatcher: CollectingDispatcher) -> List[str]:
    return [m.get("text") or "" for m in dispatcher.messages]


# --- orders data -----------------------------------------------------------


def test_orders_file_is_found_next_to_the_actions_module(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the lookup must not depend on the cwd
    assert actions.ORDERS_FILE == ROOT / "actions" / "orders.json"
    assert load_orders() == json.loads(actions.ORDERS_FILE.read_text())


def test_orders_file_has_a_dozen_valid_orders(orders):
    assert len(orders) >= 12
    statuses = {o["status"] for o in orders.values()}
    assert {"shipped", "processing", "delivered", "cancelled"} <= statuses
    for order_id, order in orders.items():
        assert normalize_order_id(order_id) == order_id
        assert order["item"]


# --- action_check_order_status ---------------------------------------------


async def test_check_order_status_found(domain, orders):
    dispatcher = CollectingDispatcher()
    tracker = make_tracker(slots={"order_id": "10042"})

    events = await ActionCheckOrderStatus().run(dispatcher, tracker, domain)

    assert ActionCheckOrderStatus().name() == "action_check_order_status"
    assert events[:2] == [SlotSet("order_id", "10042"), SlotSet("order_status", "shipped")]
    (follow_up,) = events[2:]  # a shipped order gets a follow-up a day later
    assert follow_up["event"] == "reminder" and follow_up["intent"] == "EXTERNAL_order_follow_up"
    assert follow_up["entities"] == [{"entity": "order_id", "value": "10042"}]
    [message] = texts(dispatcher)
    assert "10042" in message
    assert "shipped" in message
    assert orders["10042"]["item"] in message
    assert orders["10042"]["carrier"] in message


@pytest.mark.parametrize("order_id", ["10043", "10044", "10045"])
async def test_check_order_status_reports_each_status(domain, orders, order_id):
    dispatcher = CollectingDispatcher()
    tracker = make_tracker(slots={"order_id": order_id})

    events = await ActionCheckOrderStatus().run(dispatcher, tracker, domain)

    status = orders[order_id]["status"]
    assert SlotSet("order_status", status) in events
    [message] = texts(dispatcher)
    assert order_id in message
    assert {"processing": "being prepared", "delivered": "delivered",
            "cancelled": "cancelled"}[status] in message


async def test_check_order_status_accepts_hash_prefix(domain):
    dispatcher = CollectingDispatcher()
    tracker = make_tracker(slots={"order_id": "#10046"})

    events = await ActionCheckOrderStatus().run(dispatcher, tracker, domain)

    assert events[:2] == [SlotSet("order_id", "10046"), SlotSet("order_status", "shipped")]


async def test_check_order_status_unknown_order(domain, orders):
    assert "99999" not in orders
    dispatcher = CollectingDispatcher()
    tracker = make_tracker(slots={"order_id": "99999"})

    events = await ActionCheckOrderStatus().run(dispatcher, tracker, domain)

    assert events == [SlotSet("order_id", None), SlotSet("order_status", None)]
    [message] = texts(dispatcher)
    assert "couldn't find" in message
    assert "99999" in message


async def test_check_order_status_without_order_id_asks_for_it(domain):
    dispatcher = CollectingDispatcher()
    tracker = make_tracker(slots={"order_id": None})

    events = await ActionCheckOrderStatus().run(dispatcher, tracker, domain)

    assert dispatcher.messages[0]["response"] == "utter_ask_order_id"
    assert SlotSet("order_status", None) in events


# --- opt in / opt out --------------------------------------------------------


async def test_opt_in_sets_slot_true(domain):
    dispatcher = CollectingDispatcher()
    tracker = make_tracker(slots={"whatsapp_opt_in": None}, text="subscribe", intent="opt_in")

    events = await ActionOptIn().run(dispatcher, tracker, domain)

    assert ActionOptIn().name() == "action_opt_in"
    assert events == [SlotSet("whatsapp_opt_in", True)]
    [message] = texts(dispatcher)
    assert "updates about your orders" in message
    assert "STOP" in message


async def test_opt_out_sets_slot_false(domain):
    dispatcher = CollectingDispatcher()
    tracker = make_tracker(slots={"whatsapp_opt_in": True}, text="unsubscribe", intent="opt_out")

    events = await ActionOptOut().run(dispatcher, tracker, domain)

    assert ActionOptOut().name() == "action_opt_out"
    assert events == [SlotSet("whatsapp_opt_in", False)]
    [message] = texts(dispatcher)
    assert "won't send you order updates" in message


def test_opt_in_slot_is_declared_as_the_channel_expects(domain):
    slot = domain["slots"]["whatsapp_opt_in"]
    assert slot["type"] == "bool"
    assert slot["influence_conversation"] is False
    assert "initial_value" not in slot


# --- validate_order_form ------------------------------------------------------

ASKED = {"requested_slot": "order_id"}  # the form asked "What's your order number?"


@pytest.mark.parametrize(
    "value, expected",
    [
        ("10042", "10042"),
        ("1234", "1234"),
        ("12345678", "12345678"),
        ("#10042", "10042"),
        (" 10042 ", "10042"),
        ("it's 10042", "10042"),
    ],
)
def test_validate_order_id_accepts_4_to_8_digits(domain, value, expected):
    dispatcher = CollectingDispatcher()
    tracker = make_tracker(slots=ASKED, text=str(value), intent="inform_order_id")
    result = ValidateOrderForm().validate_order_id(value, dispatcher, tracker, domain)

    assert result == {"order_id": expected}
    assert dispatcher.messages == []


@pytest.mark.parametrize(
    "value", ["abc", "12", "123", "123456789", "10042 or 10043", "", None, "1o042"]
)
def test_validate_order_id_rejects_everything_else(domain, value):
    dispatcher = CollectingDispatcher()
    tracker = make_tracker(slots=ASKED, text=str(value), intent="inform_order_id")
    result = ValidateOrderForm().validate_order_id(value, dispatcher, tracker, domain)

    assert result == {"order_id": None}
    [message] = texts(dispatcher)
    assert "4 to 8 digits" in message


def test_validate_order_id_at_activation_uses_number_from_the_message(domain):
    # "status of order 10044": the form starts with order_id already extracted.
    dispatcher = CollectingDispatcher()
    tracker = make_tracker(
        slots={"order_id": "10044"},
        text="status of order 10044",
        entities=[{"entity": "order_id", "value": "10044", "start": 16, "end": 21}],
    )

    result = ValidateOrderForm().validate_order_id("10044", dispatcher, tracker, domain)

    assert result == {"order_id": "10044"}
    assert dispatcher.messages == []


def test_validate_order_id_at_activation_drops_number_left_from_earlier(domain):
    # "where is my order?" after an earlier check: ask again instead of
    # silently re-reporting the old order.
    dispatcher = CollectingDispatcher()
    tracker = make_tracker(slots={"order_id": "10042"}, text="where is my order?")

    result = ValidateOrderForm().validate_order_id("10042", dispatcher, tracker, domain)

    assert result == {"order_id": None}
    assert dispatcher.messages == []


def _form_tracker(value: Any, text: str) -> Tracker:
    """A tracker as Rasa sends it to validate_order_form: the slot candidate
    is the last event after the user's message, the form is active."""
    latest_message = {
        "text": text,
        "intent": {"name": "inform_order_id", "confidence": 1.0},
        "entities": [],
    }
    events = [
        {"event": "active_loop", "name": "order_form"},
        {"event": "slot", "name": "requested_slot", "value": "order_id"},
        {"event": "action", "name": "action_listen"},
        {"event": "user", "text": text, "parse_data": latest_message},
        {"event": "slot", "name": "order_id", "value": value},
    ]
    return Tracker(
        sender_id="test-user",
        slots={"order_id": value, "requested_slot": "order_id"},
        latest_message=latest_message,
        events=events,
        paused=False,
        followup_action=None,
        active_loop={"name": "order_form"},
        latest_action_name="action_listen",
    )


async def test_validate_order_form_run_accepts(domain):
    dispatcher = CollectingDispatcher()
    form = ValidateOrderForm()

    events = await form.run(dispatcher, _form_tracker("#10042", "#10042"), domain)

    assert form.name() == "validate_order_form"
    assert SlotSet("order_id", "10042") in events
    assert dispatcher.messages == []


async def test_validate_order_form_run_rejects(domain):
    dispatcher = CollectingDispatcher()

    events = await ValidateOrderForm().run(dispatcher, _form_tracker("abc", "abc"), domain)

    assert SlotSet("order_id", None) in events
    [message] = texts(dispatcher)
    assert "doesn't look like an order number" in message


@pytest.mark.parametrize("order_id, follows_up", [("10043", True), ("10044", False), ("10045", False)])
async def test_only_open_orders_get_a_follow_up(domain, order_id, follows_up):
    events = await ActionCheckOrderStatus().run(CollectingDispatcher(), make_tracker(slots={"order_id": order_id}), domain)
    assert any(e["event"] == "reminder" for e in events) is follows_up


async def test_follow_up_inside_the_window_is_free_text(domain):
    dispatcher = CollectingDispatcher()
    tracker = make_tracker(slots={"order_id": "10042", "whatsapp_window_open": True})
    events = await ActionOrderFollowUp().run(dispatcher, tracker, domain)
    assert texts(dispatcher)[0].startswith("A quick update: Order 10042")
    assert events == [SlotSet("order_status", "shipped")]


async def test_follow_up_outside_the_window_uses_the_templated_response_with_its_parameters(domain):
    dispatcher = CollectingDispatcher()
    tracker = make_tracker(slots={"order_id": "10042", "whatsapp_window_open": False})
    await ActionOrderFollowUp().run(dispatcher, tracker, domain)
    (message,) = dispatcher.messages
    assert message["response"] == "utter_order_update"
    assert (message["order_id"], message["order_status"]) == ("10042", "shipped")


# --- action_nearest_pickup_point (a shared location) --------------------------------------


def _location_tracker(**entities: Any) -> Tracker:
    """The latest message as RegexMessageHandler parses `/whatsapp_location{...}`."""
    payload = "/whatsapp_location" + (json.dumps(entities) if entities else "")
    return make_tracker(
        text=payload,
        intent="whatsapp_location",
        entities=[{"entity": k, "value": v, "start": 18, "end": len(payload)} for k, v in entities.items()],
    )


def test_haversine_known_distances():
    assert haversine_km(52.52, 13.40, 52.52, 13.40) == 0
    # Berlin (52.5200, 13.4050) – Paris (48.8566, 2.3522): about 878 km.
    assert haversine_km(52.52, 13.405, 48.8566, 2.3522) == pytest.approx(878, abs=3)
    # One degree of latitude along a meridian: 2πR/360.
    assert haversine_km(0, 0, 1, 0) == pytest.approx(111.19, abs=0.01)
    # Symmetric, and across the antimeridian the short way round.
    assert haversine_km(10, 20, -5, 40) == pytest.approx(haversine_km(-5, 40, 10, 20))
    assert haversine_km(0, 179.5, 0, -179.5) == pytest.approx(111.19, abs=0.01)


def test_nearest_pickup_point_is_the_minimum():
    for point in PICKUP_POINTS:
        assert nearest_pickup_point(point.latitude, point.longitude) == (point, 0)
    lat, lon = 52.5163, 13.3777  # Brandenburg Gate
    point, km = nearest_pickup_point(lat, lon)
    assert km == min(haversine_km(lat, lon, p.latitude, p.longitude) for p in PICKUP_POINTS)
    assert km == haversine_km(lat, lon, point.latitude, point.longitude)


def test_there_are_three_distinct_pickup_points():
    assert len(PICKUP_POINTS) == 3
    assert len({(p.latitude, p.longitude) for p in PICKUP_POINTS}) == 3


def test_nearest_pickup_point_is_declared_in_the_domain(domain):
    assert ActionNearestPickupPoint().name() == "action_nearest_pickup_point"
    assert "action_nearest_pickup_point" in domain["actions"]
    assert "whatsapp_location" in domain["intents"]
    entities = {next(iter(e)) if isinstance(e, dict) else e for e in domain["entities"]}
    assert {"latitude", "longitude", "name", "address"} <= entities


async def test_nearest_pickup_point_for_alexanderplatz(domain):
    dispatcher = CollectingDispatcher()
    tracker = _location_tracker(latitude=52.52, longitude=13.40, name="Alexanderplatz")

    events = await ActionNearestPickupPoint().run(dispatcher, tracker, domain)

    assert events == []
    [message] = texts(dispatcher)
    point, km = nearest_pickup_point(52.52, 13.40)
    assert point.name == "the shop counter in Mitte"
    assert km == pytest.approx(1.0, abs=0.1)
    assert message == (
        "The nearest pickup point to Alexanderplatz is the shop counter in Mitte, "
        "Torstraße 101, 10119 Berlin (about 1.0 km away)."
    )


@pytest.mark.parametrize(
    "lat, lon, expected",
    [
        (52.4990, 13.4180, "the Kreuzberg kiosk"),
        (52.5050, 13.3000, "the Charlottenburg parcel locker"),
        ("52.5291", "13.4010", "the shop counter in Mitte"),  # strings are fine too
    ],
)
async def test_nearest_pickup_point_picks_each_point(domain, lat, lon, expected):
    dispatcher = CollectingDispatcher()

    await ActionNearestPickupPoint().run(dispatcher, _location_tracker(latitude=lat, longitude=lon), domain)

    [message] = texts(dispatcher)
    assert message.startswith(f"The nearest pickup point is {expected}, ")
    assert " km away)." in message
    assert "Berlin;" not in message  # no "far away" note


async def test_nearest_pickup_point_without_a_name_uses_the_address(domain):
    dispatcher = CollectingDispatcher()
    tracker = _location_tracker(latitude=52.5291, longitude=13.4010, address="Torstraße 99")

    await ActionNearestPickupPoint().run(dispatcher, tracker, domain)

    assert texts(dispatcher) == [
        "The nearest pickup point to Torstraße 99 is the shop counter in Mitte, "
        "Torstraße 101, 10119 Berlin (less than 0.1 km away)."
    ]


async def test_nearest_pickup_point_far_away_says_so(domain):
    dispatcher = CollectingDispatcher()

    await ActionNearestPickupPoint().run(dispatcher, _location_tracker(latitude=48.1374, longitude=11.5755, name="Munich"), domain)

    [message] = texts(dispatcher)
    assert message.startswith("The nearest pickup point to Munich is ")
    assert "(about 50" in message and " km away)." in message  # ~505 km, no decimals
    assert "." not in message.split("(about ")[1].split(" km")[0]
    assert "pickup points are all in Berlin" in message


async def test_nearest_pickup_point_keeps_a_multiline_place_name_on_one_line(domain):
    dispatcher = CollectingDispatcher()
    tracker = _location_tracker(latitude=52.5, longitude=13.3, name='Café "Zum {Eck}"\n  Hof', address="Kantstr. 1")

    await ActionNearestPickupPoint().run(dispatcher, tracker, domain)

    [message] = texts(dispatcher)
    assert message.startswith('The nearest pickup point to Café "Zum {Eck}" Hof is ')
    assert "\n" not in message


async def test_nearest_pickup_point_ignores_a_blank_name(domain):
    dispatcher = CollectingDispatcher()
    tracker = _location_tracker(latitude=52.5291, longitude=13.4010, name="  ", address=" ")

    await ActionNearestPickupPoint().run(dispatcher, tracker, domain)

    assert texts(dispatcher)[0].startswith("The nearest pickup point is the shop counter in Mitte")


@pytest.mark.parametrize(
    "entities",
    [
        {},
        {"latitude": 52.52},
        {"longitude": 13.40},
        {"latitude": "north", "longitude": 13.40},
        {"latitude": 91, "longitude": 13.40},
        {"latitude": 52.52, "longitude": -180.5},
        {"latitude": None, "longitude": None},
        {"latitude": True, "longitude": 13.40},
        {"latitude": "nan", "longitude": 13.40},
    ],
)
async def test_nearest_pickup_point_without_usable_coordinates(domain, entities):
    dispatcher = CollectingDispatcher()

    events = await ActionNearestPickupPoint().run(dispatcher, _location_tracker(**entities), domain)

    assert events == []
    [message] = texts(dispatcher)
    assert "couldn't read it" in message
