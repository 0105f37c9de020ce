"""What Rasa receives for each WhatsApp message type: text or `/intent` payload, and metadata."""

import json

import pytest

from rasa.shared.core.training_data.story_reader.yaml_story_reader import YAMLStoryReader
from rasa.shared.nlu.training_data.message import Message

from connector.inbound import TEXT_ONLY, InboundOptions, rasa_metadata, rasa_text
from connector.payloads import parse_webhook
from tests.fixtures.loader import webhook

OPTIONS = InboundOptions()
ORIGINAL = "wamid.HBgLMTYzMTU1NTExODEVAgASGBQM0E0QTY1OTlBRUUwMzgxMDE0NDAAA="


def message(name, body=None):
    (parsed,) = parse_webhook(body or webhook(name)).messages
    return parsed


def whatsapp(name):
    return rasa_metadata(message(name))["whatsapp"]


def as_rasa_parses_it(text):
    """Rasa's own `/intent{entities}` parser (no domain): what the NLU would be handed."""
    parsed = YAMLStoryReader.unpack_regex_message(Message(data={"text": text}))
    return parsed.get("intent")["name"], {e["entity"]: e["value"] for e in parsed.get("entities")}


def test_defaults():
    assert OPTIONS == InboundOptions(
        media_intent="/whatsapp_media",
        location_intent="/whatsapp_location",
        contacts_intent="/whatsapp_contacts",
        order_intent="/whatsapp_order",
        flow_intent="/whatsapp_flow",
        reaction_intent=None,
        edits=True,
    )


@pytest.mark.parametrize("field", ["media_intent", "location_intent", "reaction_intent"])
@pytest.mark.parametrize("bad", ["whatsapp_media", "/two words", '/x{"a": 1}', "/", "/a@0.5", 3])
def test_an_intent_option_must_be_a_plain_payload(field, bad):
    with pytest.raises(ValueError, match=field):
        InboundOptions(**{field: bad})


# --- text the customer typed or tapped: unchanged by options --------------------------------


@pytest.mark.parametrize("name, text", [
    ("text", "Hi, is my order on its way?"),
    ("interactive_button_reply", "Confirm"),
    ("interactive_list_reply", "Priority Mail Express"),
    ("button_template_quick_reply", "Stop promotions"),
    ("text_product_inquiry", "Is this one in stock?"),
])
@pytest.mark.parametrize("options", [OPTIONS, TEXT_ONLY])
def test_typed_and_tapped_text(name, text, options):
    assert rasa_text(message(name), options) == text


# --- media ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, caption", [("image", "Photo of the damaged box"), ("video", "Unboxing"), ("document", "My invoice")])
def test_media_caption_is_the_text(name, caption):
    assert rasa_text(message(name), OPTIONS) == caption


@pytest.mark.parametrize("name", ["image_no_caption", "audio_voice", "sticker", "video_referral_ctwa"])
def test_media_without_caption_is_the_media_intent(name):
    assert rasa_text(message(name), OPTIONS) == "/whatsapp_media"
    assert rasa_text(message(name), InboundOptions(media_intent="/sent_file")) == "/sent_file"
    assert rasa_text(message(name), InboundOptions(media_intent=None)) is None


def test_whitespace_caption_counts_as_none():
    body = webhook("image")
    body["entry"][0]["changes"][0]["value"]["messages"][0]["image"]["caption"] = "   "
    assert rasa_text(message("image", body), OPTIONS) == "/whatsapp_media"


def test_media_metadata():
    assert whatsapp("document")["media"] == {
        "id": "1269843217718215",
        "mime_type": "application/pdf",
        "sha256": "grwfwe/ZPx0wAbdfbdeFUNItPZ0RylL8gGUvdt3YFqc=",
        "filename": "invoice-4711.pdf",
        "url": None,
        "voice": False,
        "animated": False,
    }
    assert whatsapp("audio_voice")["media"]["voice"] is True
    assert whatsapp("sticker")["media"]["animated"] is True
    assert whatsapp("image")["media"]["url"].startswith("https://lookaside.fbsbx.com/")


# --- location -------------------------------------------------------------------------------


def test_location_is_an_intent_with_entities_rasa_can_parse():
    text = rasa_text(message("location"), OPTIONS)
    assert text.startswith('/whatsapp_location{"latitude": 37.44221496582, ')
    assert as_rasa_parses_it(text) == ("whatsapp_location", {
        "latitude": 37.44221496582,
        "longitude": -122.16165924072,
        "name": "Philz Coffee",
        "address": "101 Forest Ave, Palo Alto, CA 94301",
    })


def test_location_without_name_leaves_those_entities_out():
    text = rasa_text(message("location_no_name"), OPTIONS)
    assert text == '/whatsapp_location{"latitude": 52.520008, "longitude": 13.404954}'


def test_location_name_with_quotes_braces_and_newlines_stays_one_payload():
    body = webhook("location")
    body["entry"][0]["changes"][0]["value"]["messages"][0]["location"]["name"] = 'Caf\u00e9 "Zum {Hirsch}"\n@ Mitte'
    text = rasa_text(message("location", body), OPTIONS)
    assert "\n" not in text
    assert as_rasa_parses_it(text)[1]["name"] == 'Caf\u00e9 "Zum {Hirsch}"\n@ Mitte'


def test_location_metadata():
    assert whatsapp("location")["location"] == {
        "latitude": 37.44221496582,
        "longitude": -122.16165924072,
        "name": "Philz Coffee",
        "address": "101 Forest Ave, Palo Alto, CA 94301",
        "url": "https://philzcoffee.com/",
    }


# --- contacts, order, flow, reaction ---------------------------------------------------------


def test_contacts_intent_and_cards_in_metadata():
    assert rasa_text(message("contacts_several_cards"), OPTIONS) == "/whatsapp_contacts"
    assert whatsapp("contacts_several_cards")["contacts"] == [
        {
            "name": "Barbara J. Johnson",
            "phones": [
                {"phone": "+1 (415) 555-0829", "wa_id": "14155550829", "type": "MOBILE"},
                {"phone": "+1 (415) 555-0100", "wa_id": None, "type": "WORK"},
            ],
            "emails": [],
            "organization": None,
        },
        {
            "name": "Ren\u00e9 Dubois",
            "phones": [{"phone": "+33 1 23 45 67 89", "wa_id": None, "type": "WORK"}],
            "emails": ["rene@example.com"],
            "organization": "Dubois & Fils",
        },
    ]


def test_order_intent_and_items_in_metadata():
    assert rasa_text(message("order"), OPTIONS) == "/whatsapp_order"
    assert whatsapp("order")["order"] == {
        "catalog_id": "194836987003835",
        "text": "Love these!",
        "product_items": [
            {"product_retailer_id": "di9ozbzfi4", "quantity": 2, "item_price": 30, "currency": "USD"},
            {"product_retailer_id": "nqryix03ez", "quantity": 1, "item_price": 25, "currency": "USD"},
        ],
    }


def test_flow_reply_intent_and_response_in_metadata():
    assert rasa_text(message("interactive_flow_nfm_reply"), OPTIONS) == "/whatsapp_flow"
    assert whatsapp("interactive_flow_nfm_reply")["flow"] == {
        "name": "flow",
        "body": "Sent",
        "response": {"flow_token": "return-10042", "reason": "damaged", "refund": True},
    }


@pytest.mark.parametrize("name", ["reaction", "reaction_removed", "reaction_removed_empty_emoji"])
def test_reactions_are_recorded_only_by_default(name):
    assert rasa_text(message(name), OPTIONS) is None


def test_reaction_intent_when_configured_but_never_for_a_removal():
    options = InboundOptions(reaction_intent="/whatsapp_reaction")
    assert rasa_text(message("reaction"), options) == "/whatsapp_reaction"
    assert rasa_text(message("reaction_removed"), options) is None
    assert whatsapp("reaction")["reaction"] == {
        "message_id": "wamid.HBgLMTYzMTU1NTExODEVAgARGBINEFENjIwODRGMkZBMTYzMkRFMDEAA=",
        "emoji": "\U0001f44d",
    }
    assert whatsapp("reaction_removed")["reaction"]["emoji"] is None


# --- edits, revokes, unsupported ---------------------------------------------------------------


def test_edit_goes_to_rasa_as_the_new_text_with_the_original_id():
    assert rasa_text(message("edited_message_text"), OPTIONS) == "Hi, is order 10042 on its way?"
    assert rasa_text(message("edited_message"), OPTIONS) == "Photo of the damaged box (corner)"
    metadata = whatsapp("edited_message")
    assert (metadata["type"], metadata["edited_of"]) == ("edit", "wamid.HBgLMTYzMTU1NTExODEVAgASGBQM0EwRjFFMkQzQzRCNUE2OTc4ODYAA=")
    assert metadata["media"]["id"] == "1003383421387256"
    assert whatsapp("edited_message_text")["edited_of"] == ORIGINAL


def test_edits_can_be_recorded_instead():
    assert rasa_text(message("edited_message_text"), InboundOptions(edits=False)) is None


def test_an_edit_that_removes_a_caption_is_not_sent():
    body = webhook("edited_message")
    del body["entry"][0]["changes"][0]["value"]["messages"][0]["edit"]["message"]["image"]["caption"]
    assert rasa_text(message("edited_message", body), OPTIONS) is None


@pytest.mark.parametrize("name", ["revoked_message", "unsupported"])
@pytest.mark.parametrize("options", [OPTIONS, InboundOptions(reaction_intent="/r")])
def test_never_for_the_nlu(name, options):
    assert rasa_text(message(name), options) is None


# --- text-only mode (the default without options) ----------------------------------------------


@pytest.mark.parametrize("name", [
    "image_no_caption", "audio_voice", "sticker", "location", "contacts", "order",
    "interactive_flow_nfm_reply", "reaction", "edited_message_text", "revoked_message", "unsupported",
])
def test_text_only_records_everything_that_is_not_typed_or_tapped(name):
    assert rasa_text(message(name)) is None
    assert rasa_text(message(name), InboundOptions.text_only()) is None


# --- metadata common to every type -------------------------------------------------------------


def test_referral_and_entry_point():
    metadata = whatsapp("referral_ctwa")
    assert metadata["entry_point"] == "ctwa"
    assert metadata["referral"] == {
        "source_url": "https://fb.me/3cr4Wqqkv",
        "source_id": "120226305854810726",
        "source_type": "ad",
        "headline": "Chat with us",
        "body": "Summer succulents are here!",
        "media_type": "image",
        "image_url": "https://scontent.xx.fbcdn.net/v/t45.1600-4/example.jpg",
        "video_url": None,
        "thumbnail_url": None,
        "ctwa_clid": message("referral_ctwa").referral.ctwa_clid,
        "welcome_message": "Hi there! Let us know how we can help!",
    }
    assert whatsapp("video_referral_ctwa")["entry_point"] == "ctwa"


@pytest.mark.parametrize("name", ["text", "image", "location", "reaction"])
def test_no_entry_point_without_referral(name):
    assert "entry_point" not in whatsapp(name) and "referral" not in whatsapp(name)


def test_type_specific_keys_only_where_they_apply():
    assert set(whatsapp("text")) == {
        "wamid", "type", "timestamp", "phone_number_id", "display_phone_number", "wa_id", "user_id",
        "parent_user_id", "username", "profile_name", "context", "reply",
    }
    assert set(whatsapp("location")) - set(whatsapp("text")) == {"location"}
    assert set(whatsapp("order")) - set(whatsapp("text")) == {"order"}


def test_username_customer_metadata():
    metadata = whatsapp("username_user_id_only")
    assert (metadata["wa_id"], metadata["user_id"], metadata["username"], metadata["profile_name"]) == (
        None, "US.13491208655302741918", "@kerryfisher", "Kerry F.",
    )


def test_referred_product_in_context():
    assert whatsapp("text_product_inquiry")["context"]["referred_product"] == {
        "catalog_id": "194836987003835",
        "product_retailer_id": "di9ozbzfi4",
    }


@pytest.mark.parametrize("name", [
    "text", "image", "document", "audio_voice", "sticker", "location", "contacts_several_cards", "order",
    "reaction", "edited_message", "interactive_flow_nfm_reply", "referral_ctwa", "text_product_inquiry",
])
def test_metadata_is_plain_json(name):
    metadata = rasa_metadata(message(name))
    assert json.loads(json.dumps(metadata)) == metadata
