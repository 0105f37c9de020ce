import pytest

from connector.inbound import rasa_metadata, rasa_text
from connector.payloads import MalformedWebhook, parse_webhook
from tests.fixtures.loader import WEBHOOKS, webhook


def only_message(name):
    parsed = parse_webhook(webhook(name))
    assert parsed.skipped == () and parsed.statuses == ()
    (message,) = parsed.messages
    return message


def test_text_message():
    message = only_message("text")
    assert message.wamid == "wamid.HBgLMTYzMTU1NTExODEVAgASGBQM0E0QTY1OTlBRUUwMzgxMDE0NDAAA="
    assert (message.type, message.timestamp, message.text) == ("text", 1732543200, "Hi, is my order on its way?")
    assert (message.wa_id, message.user_id, message.sender_id) == ("16315551181", None, "16315551181")
    assert message.profile_name == "Kerry Fisher"
    assert (message.phone_number_id, message.display_phone_number) == ("106540352242922", "15550783881")
    assert message.reply is None and message.context is None
    assert rasa_text(message) == "Hi, is my order on its way?"


def test_reply_context():
    message = only_message("text_reply_context")
    assert message.context.from_ == "15550783881"
    assert message.context.message_id == "wamid.HBgLMTYzMTU1NTExODEVAgARGBINEFENjIwODRGMkZBMTYzMkRFMDEAA="
    assert rasa_metadata(message)["whatsapp"]["context"] == {
        "message_id": message.context.message_id,
        "from": "15550783881",
        "forwarded": False,
        "frequently_forwarded": False,
    }


def test_button_reply_uses_title_when_id_is_not_an_intent():
    message = only_message("interactive_button_reply")
    assert (message.reply.kind, message.reply.id, message.reply.title) == ("button_reply", "confirm_order", "Confirm")
    assert rasa_text(message) == "Confirm"


def test_list_reply():
    message = only_message("interactive_list_reply")
    assert message.reply.kind == "list_reply"
    assert message.reply.description == "Next Day to 2 Days"
    assert rasa_text(message) == "Priority Mail Express"


def test_reply_id_that_is_an_intent_payload_goes_to_rasa_as_is():
    body = webhook("interactive_button_reply")
    choice = body["entry"][0]["changes"][0]["value"]["messages"][0]["interactive"]["button_reply"]
    choice["id"] = '/order_status{"order_id": "10042"}'
    (message,) = parse_webhook(body).messages
    assert rasa_text(message) == '/order_status{"order_id": "10042"}'


def test_template_quick_reply_button():
    message = only_message("button_template_quick_reply")
    assert (message.reply.kind, message.reply.id, message.reply.title) == ("button", "STOP_PROMOTIONS", "Stop promotions")
    assert rasa_text(message) == "Stop promotions"
    assert message.context is not None


def test_image_caption_is_the_text():
    message = only_message("image")
    assert message.type == "image"
    assert rasa_text(message) == "Photo of the damaged box"
    assert message.raw["image"]["mime_type"] == "image/jpeg"


@pytest.mark.parametrize("name", ["image_no_caption", "sticker", "location", "reaction", "unsupported", "audio_voice"])
def test_messages_without_text_parse_but_have_no_rasa_text(name):
    message = only_message(name)
    assert message.type in name or message.type == "audio"
    assert rasa_text(message) is None


def test_username_customer_without_wa_id_uses_business_scoped_user_id():
    message = only_message("username_user_id_only")
    assert message.wa_id is None
    assert message.user_id == "US.13491208655302741918"
    assert message.sender_id == "US.13491208655302741918"
    assert message.profile_name == "Kerry F."


def test_customer_with_both_ids_keeps_wa_id_as_sender():
    message = only_message("text_with_bsuid")
    assert (message.wa_id, message.user_id, message.sender_id) == (
        "16315551181", "US.13491208655302741918", "16315551181",
    )


def test_batch_across_entries_and_changes_loses_no_message():
    parsed = parse_webhook(webhook("batch_three_customers"))
    assert [(m.sender_id, m.text) for m in parsed.messages] == [
        ("16315551181", "First customer here"),
        ("16315551182", "Second customer here"),
        ("16315551183", "Third customer here"),
    ]
    assert [m.profile_name for m in parsed.messages] == ["Kerry Fisher", "Jamal Ortiz", "Mei Tanaka"]


def test_batch_of_two_messages_in_one_value():
    parsed = parse_webhook(webhook("batch_two_messages_one_value"))
    assert [m.text for m in parsed.messages] == ["Two quick questions", "Do you ship to Canada?"]


def test_failed_status_carries_graph_code():
    parsed = parse_webhook(webhook("status_failed_131047"))
    assert parsed.messages == ()
    (status,) = parsed.statuses
    assert (status.status, status.recipient_id, status.timestamp) == ("failed", "16315551182", 1732630000)
    assert status.errors[0].code == 131047
    assert "24 hours" in status.errors[0].details


@pytest.mark.parametrize("name, state", [("status_sent", "sent"), ("status_delivered", "delivered"), ("status_read", "read")])
def test_delivery_statuses(name, state):
    (status,) = parse_webhook(webhook(name)).statuses
    assert status.status == state and status.errors == ()


def test_status_for_username_customer():
    (status,) = parse_webhook(webhook("status_delivered_username_user_id_only")).statuses
    assert status.recipient_id == "US.13491208655302741918"


@pytest.mark.parametrize("name", ["account_update", "message_template_status_update", "user_preferences_marketing_stop"])
def test_other_fields_are_skipped_with_a_reason(name):
    parsed = parse_webhook(webhook(name))
    assert parsed.messages == () and parsed.statuses == ()
    assert "is not handled" in parsed.skipped[0]


def test_value_errors_are_reported():
    parsed = parse_webhook(webhook("value_errors"))
    assert "130429" in parsed.skipped[0]


def test_every_fixture_parses_without_exception():
    for path in sorted(WEBHOOKS.glob("*.json")):
        parse_webhook(webhook(path.stem))


def test_a_broken_message_is_skipped_and_its_siblings_kept():
    body = webhook("batch_two_messages_one_value")
    first = body["entry"][0]["changes"][0]["value"]["messages"][0]
    first["timestamp"] = "yesterday"
    parsed = parse_webhook(body)
    assert [m.text for m in parsed.messages] == ["Do you ship to Canada?"]
    assert "bad timestamp 'yesterday'" in parsed.skipped[0]


def test_a_message_without_sender_is_skipped():
    body = webhook("text")
    value = body["entry"][0]["changes"][0]["value"]
    del value["messages"][0]["from"]
    value["contacts"] = []
    parsed = parse_webhook(body)
    assert parsed.messages == ()
    assert "neither 'from'" in parsed.skipped[0]


def test_other_objects_are_ignored_not_refused():
    parsed = parse_webhook({"object": "page", "entry": []})
    assert parsed.messages == () and "not whatsapp_business_account" in parsed.skipped[0]


@pytest.mark.parametrize("body", [[], "text", 3, None, {"object": "whatsapp_business_account"}, {"object": "whatsapp_business_account", "entry": {}}])
def test_non_webhooks_are_refused(body):
    with pytest.raises(MalformedWebhook):
        parse_webhook(body)


def test_metadata_for_rasa():
    metadata = rasa_metadata(only_message("text"))["whatsapp"]
    assert metadata == {
        "wamid": "wamid.HBgLMTYzMTU1NTExODEVAgASGBQM0E0QTY1OTlBRUUwMzgxMDE0NDAAA=",
        "type": "text",
        "timestamp": 1732543200,
        "phone_number_id": "106540352242922",
        "display_phone_number": "15550783881",
        "wa_id": "16315551181",
        "user_id": None,
        "profile_name": "Kerry Fisher",
        "context": None,
        "reply": None,
    }
