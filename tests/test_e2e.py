"""End to end: real `rasa run` with the WhatsApp channel, the real action server and the Cloud
API simulator as separate processes, talking HTTP. Each test plays its own customer."""

import json

import pytest

from connector.signature import sign
from tests.stack import APP_SECRET, VERIFY_TOKEN, http, new_wa_id

pytestmark = pytest.mark.e2e


def webhook_from(wa_id, messages, name="Ada"):
    """A Meta-shaped webhook body with these raw messages from one customer."""
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": "1", "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550783881", "phone_number_id": "106540352242922"},
            "contacts": [{"profile": {"name": name}, "wa_id": wa_id}],
            "messages": messages,
        }}]}],
    }


def post_signed(stack, body):
    raw = json.dumps(body).encode()
    return http("POST", stack.webhook_url, raw, headers={"X-Hub-Signature-256": sign(raw, APP_SECRET)})[0]


def bodies(messages):
    return [m["payload"] for m in messages]


def test_hi_gets_the_greeting_with_reply_buttons(stack, wa_id):
    stack.customer_says(wa_id, "hi")
    (reply,) = bodies(stack.wait_outbound(wa_id, 1))
    assert reply["to"] == wa_id and reply["messaging_product"] == "whatsapp"
    assert reply["type"] == "interactive"
    assert reply["interactive"]["body"]["text"].startswith("Hi!")
    buttons = [b["reply"] for b in reply["interactive"]["action"]["buttons"]]
    assert [b["id"] for b in buttons] == ["/order_status", "/opt_in", "/human_handoff"]


def test_order_status_walks_through_the_custom_action(stack, wa_id):
    stack.customer_says(wa_id, {"button_reply": {"id": "/order_status", "title": "Order status"}})
    asked = bodies(stack.wait_outbound(wa_id, 1))[-1]
    assert "order number" in asked["text"]["body"]
    stack.customer_says(wa_id, "10042")
    answer = bodies(stack.wait_outbound(wa_id, 2))[-1]
    assert "10042" in answer["text"]["body"] and "shipped" in answer["text"]["body"]
    slots = stack.tracker(wa_id, turns=2)["slots"]
    assert (slots["order_id"], slots["order_status"]) == ("10042", "shipped")


def test_message_id_and_whatsapp_timestamp_are_stored_on_the_tracker(stack, wa_id):
    written_at = int(http("GET", f"{stack.sim_url}/_sim/clock")[1]["now"]) - 60
    sent = stack.customer_says(wa_id, {"text": "hello", "timestamp": written_at, "name": "Ada"})
    stack.wait_outbound(wa_id, 1)
    (user_event,) = [e for e in stack.tracker(wa_id, turns=1)["events"] if e["event"] == "user"]
    assert user_event["message_id"] == sent["wamid"]
    assert user_event["input_channel"] == "whatsapp"
    whatsapp = user_event["metadata"]["whatsapp"]
    assert (whatsapp["timestamp"], whatsapp["wa_id"], whatsapp["profile_name"]) == (written_at, wa_id, "Ada")


def test_batch_of_three_customers_gets_three_replies(stack):
    customers = [new_wa_id() for _ in range(3)]
    status, answer = http("POST", f"{stack.sim_url}/_sim/batch", {"messages": [{"wa_id": c, "text": "hi"} for c in customers]})
    assert status == 200 and answer["webhook_status"] == 200
    for customer in customers:
        (reply,) = bodies(stack.wait_outbound(customer, 1))
        assert reply["type"] == "interactive"


@pytest.mark.parametrize("signature, expected", [("missing", 401), ("invalid", 403)])
def test_forged_or_unsigned_posts_reach_no_bot(stack, wa_id, signature, expected):
    body = webhook_from(wa_id, [
        {"from": wa_id, "id": f"wamid.forged{wa_id}", "timestamp": "1764000000", "type": "text", "text": {"body": "hi"}},
    ], name="Mallory")
    status, answer = http("POST", f"{stack.sim_url}/_sim/webhook", {"body": body, "signature": signature})
    assert status == 200 and answer["status"] == expected
    assert [e for e in stack.tracker(wa_id)["events"] if e["event"] == "user"] == []


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"object": "whatsapp_business_account", "entry": "x"}'])
def test_malformed_signed_body_is_a_4xx_never_a_500(stack, body):
    status, _ = http("POST", stack.webhook_url, body, headers={"X-Hub-Signature-256": sign(body, APP_SECRET)})
    assert status == 400


def test_unparseable_message_in_a_batch_does_not_stop_the_others(stack, wa_id):
    stack.customer_says(wa_id, "hi")  # the simulator (like Meta) only lets replies out to a customer who wrote
    stack.wait_outbound(wa_id, 1)
    now = str(int(http("GET", f"{stack.sim_url}/_sim/clock")[1]["now"]))
    body = webhook_from(wa_id, [
        {"from": wa_id, "timestamp": now, "type": "text", "text": {"body": "no id"}},
        {"from": wa_id, "id": f"wamid.ok{wa_id}", "timestamp": now, "type": "text", "text": {"body": "bye"}},
        {"from": wa_id, "id": f"wamid.img{wa_id}", "timestamp": now, "type": "image", "image": {"id": "1"}},
    ])
    assert post_signed(stack, body) == 200
    stack.wait_outbound(wa_id, 2)
    user_events = [e for e in stack.tracker(wa_id, turns=3)["events"] if e["event"] == "user"]
    assert [e["message_id"] for e in user_events][1:] == [f"wamid.ok{wa_id}", f"wamid.img{wa_id}"]
    assert "missing 'id'" in stack.log("rasa")


def test_subscription_handshake(stack):
    status, text = http("GET", f"{stack.webhook_url}?hub.mode=subscribe&hub.verify_token={VERIFY_TOKEN}&hub.challenge=42")
    assert (status, str(text)) == (200, "42")
    assert http("GET", f"{stack.webhook_url}?hub.mode=subscribe&hub.verify_token=nope&hub.challenge=42")[0] == 403


def test_http_api_needs_the_token(stack, wa_id):
    assert http("GET", f"{stack.rasa_url}/conversations/{wa_id}/tracker")[0] == 401




def test_photo_with_caption_is_understood_as_text(stack, wa_id):
    stack.customer_says(wa_id, {"image": {"caption": "where is order 10042"}})
    reply = bodies(stack.wait_outbound(wa_id, 1))[-1]
    assert "10042" in reply["text"]["body"] and "shipped" in reply["text"]["body"]
    (user_event,) = [e for e in stack.tracker(wa_id, turns=1)["events"] if e["event"] == "user"]
    assert user_event["metadata"]["whatsapp"]["media"]["mime_type"].startswith("image/")


def test_photo_without_caption_gets_the_media_reply(stack, wa_id):
    stack.customer_says(wa_id, {"image": {}})
    reply = bodies(stack.wait_outbound(wa_id, 1))[-1]
    assert reply["text"]["body"].startswith("Thanks! I can't look at photos")


def test_shared_location_gets_the_nearest_pickup_point(stack, wa_id):
    stack.customer_says(wa_id, {"location": {"latitude": 52.52, "longitude": 13.40, "name": "Alexanderplatz"}})
    reply = bodies(stack.wait_outbound(wa_id, 1))[-1]
    assert reply["text"]["body"].startswith("The nearest pickup point to Alexanderplatz")


def test_list_row_tap_with_an_intent_id(stack, wa_id):
    stack.customer_says(wa_id, {"list_reply": {"id": "/human_handoff", "title": "Talk to a person"}})
    assert "colleague" in bodies(stack.wait_outbound(wa_id, 1))[-1]["text"]["body"]


def test_customer_messages_are_marked_read(stack, wa_id):
    sent = stack.customer_says(wa_id, "hi")
    stack.wait_outbound(wa_id, 1)
    (inbound,) = [m for m in stack.conversation(wa_id)["messages"] if m["direction"] == "in"]
    assert inbound["wamid"] == sent["wamid"] and inbound["read_at"] is not None and inbound["typing_indicator"]


def test_meta_redelivering_a_message_gets_one_answer(stack, wa_id):
    stack.customer_says(wa_id, "hi")
    stack.wait_outbound(wa_id, 1)
    (inbound,) = [m for m in stack.conversation(wa_id)["messages"] if m["direction"] == "in"]
    for _ in range(2):
        assert post_signed(stack, webhook_from(wa_id, [inbound["payload"]])) == 200
    stack.customer_says(wa_id, "bye")  # a later message is answered: the duplicates were not
    replies = stack.wait_outbound(wa_id, 2)
    assert len(replies) == 2 and len([e for e in stack.tracker(wa_id, turns=2)["events"] if e["event"] == "user"]) == 2
