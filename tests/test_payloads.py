import pytest

from connector.inbound import rasa_metadata, rasa_text
from connector.payloads import (
    CallEvent,
    ContactPhone,
    ErrorNotice,
    Media,
    MalformedWebhook,
    OrderItem,
    SystemChange,
    UserPreference,
    parse_webhook,
)
from tests.fixtures.loader import WEBHOOKS, webhook

KERRY = "16315551181"
BSUID = "US.13491208655302741918"
BUSINESS_MESSAGE = "wamid.HBgLMTYzMTU1NTExODEVAgARGBINEFENjIwODRGMkZBMTYzMkRFMDEAA="


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


def test_value_errors_are_parsed_with_their_code():
    parsed = parse_webhook(webhook("value_errors"))
    assert parsed.messages == () and parsed.statuses == () and parsed.skipped == ()
    (error,) = parsed.errors
    assert (error.code, error.title, error.field, error.phone_number_id) == (130429, "Rate limit hit", "messages", "106540352242922")
    assert error.details.startswith("Message failed to send because there were too many messages")
    assert error.href == "/documentation/business-messaging/whatsapp/support/error-codes"


@pytest.mark.parametrize("name", sorted(path.stem for path in WEBHOOKS.glob("*.json")))
def test_every_fixture_parses_into_something_and_skips_nothing(name):
    parsed = parse_webhook(webhook(name))
    assert parsed.skipped == ()
    items = (parsed.messages, parsed.statuses, parsed.system_changes, parsed.calls, parsed.preferences, parsed.errors, parsed.notices)
    assert sum(len(group) for group in items) >= 1


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
        "parent_user_id": None,
        "username": None,
        "profile_name": "Kerry Fisher",
        "context": None,
        "reply": None,
    }


# --- every message type: the typed fields ------------------------------------------------


def test_image_media_fields():
    message = only_message("image")
    assert message.media == Media(
        id="1003383421387256",
        mime_type="image/jpeg",
        sha256="SfInY0gGKTsJlUWbwxC1k+FAD0FZHvzwfpvO0zX0GUI=",
        caption="Photo of the damaged box",
        url="https://lookaside.fbsbx.com/whatsapp_business/attachments/?mid=1003383421387256&ext=1732543500&hash=ATu1",
    )
    assert message.text == "Photo of the damaged box"


def test_image_without_caption_or_url():
    message = only_message("image_no_caption")
    assert (message.media.id, message.media.caption, message.media.url) == ("1003383421387257", None, None)
    assert message.text is None


def test_voice_note():
    message = only_message("audio_voice")
    assert message.type == "audio"
    assert (message.media.id, message.media.mime_type, message.media.voice) == ("1158201444211790", "audio/ogg; codecs=opus", True)
    assert message.text is None


def test_video_with_caption():
    message = only_message("video")
    assert (message.media.id, message.media.mime_type, message.media.caption) == ("2011375702660432", "video/mp4", "Unboxing")
    assert message.text == "Unboxing" and message.media.voice is False


def test_document_keeps_filename():
    message = only_message("document")
    assert (message.media.filename, message.media.mime_type, message.media.caption) == ("invoice-4711.pdf", "application/pdf", "My invoice")
    assert message.media.sha256 == "grwfwe/ZPx0wAbdfbdeFUNItPZ0RylL8gGUvdt3YFqc="


def test_animated_sticker():
    message = only_message("sticker")
    assert (message.media.id, message.media.mime_type, message.media.animated) == ("3085176491662214", "image/webp", True)
    assert message.text is None


def test_media_message_without_media_id_is_skipped():
    body = webhook("image")
    del body["entry"][0]["changes"][0]["value"]["messages"][0]["image"]["id"]
    parsed = parse_webhook(body)
    assert parsed.messages == () and "missing 'id'" in parsed.skipped[0]


def test_location_with_name_and_address():
    location = only_message("location").location
    assert (location.latitude, location.longitude) == (37.44221496582, -122.16165924072)
    assert (location.name, location.address, location.url) == (
        "Philz Coffee", "101 Forest Ave, Palo Alto, CA 94301", "https://philzcoffee.com/",
    )


def test_location_with_coordinates_only():
    location = only_message("location_no_name").location
    assert (location.latitude, location.longitude, location.name, location.address) == (52.520008, 13.404954, None, None)


@pytest.mark.parametrize("latitude", [None, "north", True, 91, float("nan")])
def test_location_with_bad_coordinates_is_skipped(latitude):
    body = webhook("location")
    body["entry"][0]["changes"][0]["value"]["messages"][0]["location"]["latitude"] = latitude
    parsed = parse_webhook(body)
    assert parsed.messages == () and "bad latitude" in parsed.skipped[0]


def test_one_contact_card():
    (card,) = only_message("contacts").contacts
    assert card.name == "Barbara J. Johnson"
    assert card.phones == (ContactPhone(phone="+1 (415) 555-0829", wa_id="14155550829", type="MOBILE"),)
    assert card.emails == ("bjohnson@example.com",)
    assert card.organization == "Social Tsunami"


def test_several_contact_cards():
    first, second = only_message("contacts_several_cards").contacts
    assert [p.phone for p in first.phones] == ["+1 (415) 555-0829", "+1 (415) 555-0100"]
    assert first.phones[1].wa_id is None and first.organization is None and first.emails == ()
    assert (second.name, second.organization, second.emails) == ("Ren\u00e9 Dubois", "Dubois & Fils", ("rene@example.com",))
    assert second.raw["addresses"][0]["city"] == "Paris"


def test_order():
    order = only_message("order").order
    assert (order.catalog_id, order.text) == ("194836987003835", "Love these!")
    assert order.items == (
        OrderItem(product_retailer_id="di9ozbzfi4", quantity=2, item_price=30, currency="USD"),
        OrderItem(product_retailer_id="nqryix03ez", quantity=1, item_price=25, currency="USD"),
    )


def test_reaction():
    message = only_message("reaction")
    assert (message.reaction.message_id, message.reaction.emoji) == (BUSINESS_MESSAGE, "\U0001f44d")
    assert not message.reaction.removed


@pytest.mark.parametrize("name", ["reaction_removed", "reaction_removed_empty_emoji"])
def test_removed_reaction_has_no_emoji(name):
    reaction = only_message(name).reaction
    assert (reaction.message_id, reaction.emoji, reaction.removed) == (BUSINESS_MESSAGE, None, True)


def test_flow_reply_decodes_its_response_json():
    message = only_message("interactive_flow_nfm_reply")
    assert message.reply is None
    assert (message.flow.name, message.flow.body) == ("flow", "Sent")
    assert dict(message.flow.response) == {"flow_token": "return-10042", "reason": "damaged", "refund": True}


def test_product_inquiry_names_the_product():
    message = only_message("text_product_inquiry")
    assert message.text == "Is this one in stock?"
    assert (message.context.catalog_id, message.context.product_retailer_id) == ("194836987003835", "di9ozbzfi4")


def test_referral_from_a_click_to_whatsapp_ad():
    message = only_message("referral_ctwa")
    referral = message.referral
    assert (referral.source_type, referral.source_id, referral.source_url) == ("ad", "120226305854810726", "https://fb.me/3cr4Wqqkv")
    assert (referral.headline, referral.body, referral.media_type) == ("Chat with us", "Summer succulents are here!", "image")
    assert referral.image_url.endswith("example.jpg") and referral.ctwa_clid.startswith("Aff-n8ZT")
    assert referral.welcome_message == "Hi there! Let us know how we can help!"
    assert message.text == "Can I get more info about this?" and message.sender_id == "16315551182"


def test_referral_on_a_media_message():
    message = only_message("video_referral_ctwa")
    assert message.media.id == "2011375702660499"
    assert (message.referral.source_type, message.referral.media_type) == ("post", "video")
    assert message.referral.video_url.endswith("example.mp4") and message.referral.ctwa_clid is None


def test_edited_caption():
    message = only_message("edited_message")
    assert message.type == "edit" and message.text is None
    assert message.edit.original_message_id == "wamid.HBgLMTYzMTU1NTExODEVAgASGBQM0EwRjFFMkQzQzRCNUE2OTc4ODYAA="
    assert (message.edit.type, message.edit.text) == ("image", "Photo of the damaged box (corner)")
    assert message.edit.media.id == "1003383421387256"


def test_edited_text():
    edit = only_message("edited_message_text").edit
    assert (edit.type, edit.text, edit.media) == ("text", "Hi, is order 10042 on its way?", None)
    assert edit.original_message_id == "wamid.HBgLMTYzMTU1NTExODEVAgASGBQM0E0QTY1OTlBRUUwMzgxMDE0NDAAA="


def test_revoked_message():
    message = only_message("revoked_message")
    assert message.type == "revoke" and message.text is None
    assert message.revoked_message_id == "wamid.HBgLMTYzMTU1NTExODEVAgASGBQM0E0QTY1OTlBRUUwMzgxMDE0NDAAA="


def test_unsupported_message_carries_its_error_code():
    message = only_message("unsupported")
    assert message.type == "unsupported" and message.raw["unsupported"]["type"] == "edit"
    assert message.errors == (
        ErrorNotice(
            code=131051,
            title="Message type unknown",
            details="Message type is currently not supported.",
            message="Message type unknown",
        ),
    )


# --- identity ------------------------------------------------------------------------------


def test_username_and_business_scoped_id_are_kept():
    message = only_message("username_user_id_only")
    assert (message.username, message.user_id, message.wa_id, message.parent_user_id) == ("@kerryfisher", BSUID, None, None)


def test_parent_user_id_comes_from_the_message_or_the_contact():
    body = webhook("username_user_id_only")
    value = body["entry"][0]["changes"][0]["value"]
    value["contacts"][0]["parent_user_id"] = "US.ENT.1122"
    (message,) = parse_webhook(body).messages
    assert (message.parent_user_id, message.sender_id) == ("US.ENT.1122", BSUID)
    value["messages"][0]["from_parent_user_id"] = "US.ENT.3344"
    (message,) = parse_webhook(body).messages
    assert message.parent_user_id == "US.ENT.3344"


# --- system messages: never messages ------------------------------------------------------


def test_user_changed_number():
    parsed = parse_webhook(webhook("system_user_changed_number"))
    assert parsed.messages == () and parsed.skipped == ()
    (change,) = parsed.system_changes
    assert change == SystemChange(
        wamid="wamid.HBgLMTYzMTU1NTExODEVAgASGBQM0FGNUE0N0Q5QThCMkMxRDNFNDUAA=",
        type="user_changed_number",
        timestamp=1732544160,
        phone_number_id="106540352242922",
        body="User Kerry Fisher changed from 16315551181 to 16315551190",
        old_wa_id=KERRY,
        new_wa_id="16315551190",
        old_user_id=BSUID,
        new_user_id="US.20587719330417265529",
    )
    assert (change.old_sender_id, change.new_sender_id) == (KERRY, "16315551190")


def test_user_changed_user_id_without_from():
    (change,) = parse_webhook(webhook("system_user_changed_user_id")).system_changes
    assert change.type == "user_changed_user_id" and change.timestamp == 1732544170
    assert (change.old_wa_id, change.new_wa_id) == (None, None)
    assert (change.old_user_id, change.new_user_id) == ("US.31698820441528376630", "US.42709931552639487741")
    assert (change.old_sender_id, change.new_sender_id) == ("US.31698820441528376630", "US.42709931552639487741")


def test_customer_identity_changed_keeps_the_same_customer():
    (change,) = parse_webhook(webhook("system_customer_identity_changed")).system_changes
    assert (change.type, change.body) == ("customer_identity_changed", "User identity changed")
    assert (change.old_sender_id, change.new_sender_id) == (KERRY, KERRY)


def test_system_message_without_system_object_is_skipped():
    body = webhook("system_user_changed_number")
    del body["entry"][0]["changes"][0]["value"]["messages"][0]["system"]
    parsed = parse_webhook(body)
    assert parsed.system_changes == () and "no 'system' object" in parsed.skipped[0]


# --- statuses ------------------------------------------------------------------------------


def test_sent_status_pricing():
    (status,) = parse_webhook(webhook("status_sent")).statuses
    assert (status.wamid, status.timestamp, status.recipient_id) == (BUSINESS_MESSAGE, 1732543205, KERRY)
    assert (status.pricing_category, status.pricing_type, status.billable) == ("service", "free_customer_service", False)
    assert status.recipient_user_id is None and status.biz_opaque_callback_data is None


def test_read_status_has_no_pricing():
    (status,) = parse_webhook(webhook("status_read")).statuses
    assert (status.pricing_category, status.pricing_type, status.billable) == (None, None, None)


def test_status_with_callback_data_and_both_ids():
    (status,) = parse_webhook(webhook("status_sent_callback_data_user_id")).statuses
    assert (status.recipient_id, status.recipient_user_id) == (KERRY, BSUID)
    assert status.biz_opaque_callback_data == "order-10042-shipped"
    assert (status.pricing_category, status.pricing_type, status.billable) == ("utility", "regular", True)


def test_status_of_username_customer_has_user_id_only():
    (status,) = parse_webhook(webhook("status_delivered_username_user_id_only")).statuses
    assert (status.recipient_id, status.recipient_user_id, status.status) == (BSUID, BSUID, "delivered")


def test_failed_131026_status_error_details():
    (status,) = parse_webhook(webhook("status_failed_131026")).statuses
    assert (status.status, status.recipient_id) == ("failed", "16315551183")
    (error,) = status.errors
    assert (error.code, error.title, error.details, error.message) == (
        131026, "Message undeliverable", "Message Undeliverable.", "Message undeliverable",
    )
    assert error.href == "/documentation/business-messaging/whatsapp/support/error-codes"


# --- calls, preferences, notices ----------------------------------------------------------


def test_customer_call_connect():
    parsed = parse_webhook(webhook("call_connect"))
    assert parsed.messages == () and parsed.statuses == () and parsed.skipped == ()
    (call,) = parsed.calls
    assert call == CallEvent(
        call_id="wacid.HBgLMTYzMTU1NTExODEVAgASGBQzQTNGNUY3MkM5QkE0QzA5RDNCRAA=",
        event="connect",
        timestamp=1732545500,
        phone_number_id="106540352242922",
        wa_id=KERRY,
        user_id=None,
        direction="USER_INITIATED",
        profile_name="Kerry Fisher",
    )
    assert call.sender_id == KERRY and call.customer_initiated


def test_call_terminate_has_status_and_duration():
    (call,) = parse_webhook(webhook("call_terminate")).calls
    assert (call.event, call.status, call.duration, call.timestamp, call.wa_id) == ("terminate", "COMPLETED", 115, 1732545620, KERRY)


def test_call_without_direction_finds_the_customer_side():
    body = webhook("call_connect")
    call = body["entry"][0]["changes"][0]["value"]["calls"][0]
    del call["direction"]
    call["from"], call["to"] = "15550783881", KERRY
    (event,) = parse_webhook(body).calls
    assert event.wa_id == KERRY


def test_business_call_ringing_status_is_a_call_event_not_a_message_status():
    parsed = parse_webhook(webhook("call_status_ringing"))
    assert parsed.statuses == ()
    (call,) = parsed.calls
    assert (call.event, call.status, call.wa_id, call.timestamp) == ("status", "RINGING", "16315551182", 1732545700)
    assert call.biz_opaque_callback_data == "callback-order-10042" and not call.customer_initiated


def test_marketing_stop_preference_with_integer_timestamp():
    parsed = parse_webhook(webhook("user_preferences_marketing_stop"))
    assert parsed.messages == () and parsed.skipped == ()
    assert parsed.preferences == (
        UserPreference(
            wa_id=KERRY,
            user_id=None,
            category="marketing_messages",
            value="stop",
            timestamp=1732545300,
            phone_number_id="106540352242922",
            detail="User requested to stop marketing messages",
        ),
    )


def test_resume_preference_of_username_customer():
    (preference,) = parse_webhook(webhook("user_preferences_marketing_resume_user_id")).preferences
    assert (preference.value, preference.wa_id, preference.user_id, preference.sender_id) == ("resume", None, BSUID, BSUID)


def test_account_update_is_a_notice():
    parsed = parse_webhook(webhook("account_update"))
    assert parsed.skipped == () and parsed.messages == ()
    (notice,) = parsed.notices
    assert (notice.field, notice.event, notice.entry_id, notice.time) == ("account_update", "ACCOUNT_VIOLATION", "102290129340398", 1732545600)
    assert notice.detail["violation_info"] == {"violation_type": "ADULT"}


def test_template_status_update_is_a_notice():
    (notice,) = parse_webhook(webhook("message_template_status_update")).notices
    assert (notice.field, notice.event) == ("message_template_status_update", "APPROVED")
    assert (notice.detail["message_template_name"], notice.detail["message_template_id"]) == ("order_shipped", 1689556908129832)


def test_change_without_field_name_is_skipped():
    body = webhook("account_update")
    del body["entry"][0]["changes"][0]["field"]
    parsed = parse_webhook(body)
    assert parsed.notices == () and "is not handled" in parsed.skipped[0]


@pytest.mark.parametrize("key, broken", [
    ("calls", {"id": "wacid.1", "event": "connect", "timestamp": "soon", "from": KERRY}),
    ("calls", "not an object"),
])
def test_a_broken_call_is_skipped(key, broken):
    body = webhook("call_connect")
    body["entry"][0]["changes"][0]["value"][key].append(broken)
    parsed = parse_webhook(body)
    assert len(parsed.calls) == 1 and parsed.skipped[0].startswith("entry[0].changes[0].calls[1]")


def test_a_preference_naming_no_customer_is_skipped():
    body = webhook("user_preferences_marketing_stop")
    value = body["entry"][0]["changes"][0]["value"]
    del value["user_preferences"][0]["wa_id"]
    value["contacts"] = []
    parsed = parse_webhook(body)
    assert parsed.preferences == () and "names no customer" in parsed.skipped[0]


def test_mixed_batch_sorts_every_item_into_its_place():
    bodies = [webhook(n) for n in ("text", "status_read", "system_user_changed_number", "call_connect",
                                   "user_preferences_marketing_stop", "value_errors", "account_update")]
    merged = {"object": "whatsapp_business_account", "entry": [entry for b in bodies for entry in b["entry"]]}
    parsed = parse_webhook(merged)
    assert parsed.skipped == ()
    counts = [len(g) for g in (parsed.messages, parsed.statuses, parsed.system_changes, parsed.calls,
                               parsed.preferences, parsed.errors, parsed.notices)]
    assert counts == [1, 1, 1, 1, 1, 1, 1]


def test_a_lone_contact_of_another_customer_does_not_lend_its_ids():
    body = webhook("text")
    value = body["entry"][0]["changes"][0]["value"]
    message = value["messages"][0]
    del message["from"]
    message["from_user_id"] = "US.999"
    value["contacts"] = [{"profile": {"name": "Kerry Fisher"}, "wa_id": "16315551181", "user_id": "US.111"}]
    (parsed,) = parse_webhook(body).messages
    assert (parsed.sender_id, parsed.wa_id, parsed.profile_name) == ("US.999", None, None)


def test_a_deeply_nested_flow_response_does_not_lose_the_batch():
    body = webhook("batch_two_messages_one_value")
    value = body["entry"][0]["changes"][0]["value"]
    flow = dict(value["messages"][0], id="wamid.flow", type="interactive",
                interactive={"type": "nfm_reply", "nfm_reply": {"name": "flow", "body": "Sent", "response_json": "[" * 5000}})
    value["messages"].append(flow)
    parsed = parse_webhook(body)
    assert [m.text for m in parsed.messages][:2] == ["Two quick questions", "Do you ship to Canada?"]


def test_items_keep_the_order_they_arrive_in_across_changes():
    text, call = webhook("text"), webhook("call_connect")
    second = webhook("text")
    second["entry"][0]["changes"][0]["value"]["messages"][0]["id"] = "wamid.second"
    body = {"object": "whatsapp_business_account", "entry": [
        {"id": "1", "changes": text["entry"][0]["changes"] + call["entry"][0]["changes"] + second["entry"][0]["changes"]},
    ]}
    parsed = parse_webhook(body)
    assert [type(item).__name__ for item in parsed.in_order] == ["InboundMessage", "CallEvent", "InboundMessage"]
    assert parsed.in_order[2].wamid == "wamid.second"
