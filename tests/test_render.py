import pytest

from connector.render import media_kind, message_problem, numbered_choice, render, shorten, split_text
from connector.simulator.settings import DEFAULT_TEMPLATES
from connector.simulator.templates import TemplateRegistry
from connector.simulator.validate import validate_send


def buttons(n):
    return [{"title": f"Option {i}", "payload": f"/choose{{\"n\": {i}}}"} for i in range(1, n + 1)]


def test_plain_text():
    (message,) = render({"text": "Hello!"}).messages
    assert message == {"type": "text", "text": {"body": "Hello!", "preview_url": False}}


def test_long_text_is_split_on_sentences_within_the_limit():
    sentence = "Your parcel left our warehouse this morning. "
    text = sentence * 200  # ~9,000 characters
    parts = [m["text"]["body"] for m in render({"text": text}).messages]
    assert len(parts) == 3
    assert all(len(part) <= 4096 for part in parts)
    assert all(part.endswith(".") for part in parts)
    assert " ".join(parts) == text.strip()


def test_split_text_cuts_a_single_overlong_word():
    assert [len(p) for p in split_text("x" * 10, 4)] == [4, 4, 2]


def test_up_to_three_buttons_become_reply_buttons():
    (message,) = render({"text": "What can I do?", "buttons": buttons(3)}).messages
    interactive = message["interactive"]
    assert interactive["type"] == "button"
    assert interactive["body"] == {"text": "What can I do?"}
    assert interactive["action"]["buttons"][0] == {
        "type": "reply",
        "reply": {"id": '/choose{"n": 1}', "title": "Option 1"},
    }


def test_button_titles_are_shortened_to_twenty():
    rendered = render({"text": "Pick", "buttons": [{"title": "Check the status of my order", "payload": "/order_status"}]})
    title = rendered.messages[0]["interactive"]["action"]["buttons"][0]["reply"]["title"]
    assert len(title) == 20 and title.endswith("…")


def test_four_to_ten_buttons_become_a_list():
    (message,) = render({"text": "Pick one", "buttons": buttons(10)}).messages
    interactive = message["interactive"]
    assert interactive["type"] == "list"
    rows = interactive["action"]["sections"][0]["rows"]
    assert len(rows) == 10 and rows[9] == {"id": '/choose{"n": 10}', "title": "Option 10"}
    assert interactive["action"]["button"] == "Choose"


def test_long_row_title_keeps_full_text_in_description():
    options = buttons(3) + [{"title": "A very long option title that does not fit", "payload": "/long"}]
    rows = render({"text": "Pick", "buttons": options}).messages[0]["interactive"]["action"]["sections"][0]["rows"]
    assert len(rows[3]["title"]) == 24
    assert rows[3]["description"] == "A very long option title that does not fit"


def test_more_than_ten_buttons_become_numbered_text():
    (message,) = render({"text": "Pick", "buttons": buttons(12)}).messages
    body = message["text"]["body"]
    assert body.startswith("Pick\n\n1. Option 1\n")
    assert body.endswith("12. Option 12")


def test_long_text_with_buttons_puts_buttons_on_the_last_part():
    text = "word " * 500  # 2,500 characters, over the 1,024 interactive body limit
    messages = render({"text": text, "buttons": buttons(2)}).messages
    assert [m["type"] for m in messages] == ["text", "text", "interactive"]
    assert len(messages[-1]["interactive"]["body"]["text"]) <= 1024


def test_buttons_without_text_get_a_prompt():
    (message,) = render({"buttons": buttons(2)}).messages
    assert message["interactive"]["body"]["text"] == "Please choose:"


def test_quick_replies_render_like_buttons():
    (message,) = render({"text": "Ok?", "quick_replies": [{"title": "Yes", "payload": "/affirm"}]}).messages
    assert message["interactive"]["action"]["buttons"][0]["reply"] == {"id": "/affirm", "title": "Yes"}


def test_image_and_custom_after_text():
    custom = {"type": "location", "location": {"latitude": 52.5, "longitude": 13.4}}
    rendered = render({"text": "Here:", "image": "https://example.com/map.png", "custom": custom})
    assert [m["type"] for m in rendered.messages] == ["text", "location", "image"]
    assert rendered.messages[2] == {"type": "image", "image": {"link": "https://example.com/map.png"}}
    assert rendered.not_rendered == ()


def test_unsupported_parts_are_reported_not_dropped_silently():
    rendered = render({"text": "Doc", "attachment": {"type": "file"}, "custom": {"no": "type"}})
    assert [m["type"] for m in rendered.messages] == ["text"]
    assert set(rendered.not_rendered) == {"attachment", "custom"}


def test_rasa_bookkeeping_keys_are_ignored():
    message = {"text": "Hi", "utter_action": "utter_greet", "recipient_id": "1", "timestamp": None, "id": "x"}
    assert len(render(message).messages) == 1


def test_shorten():
    assert shorten("short", 20) == "short"
    assert shorten("a" * 30, 20) == "a" * 19 + "…"


# --- table-driven: every Rasa response type --------------------------------------------------

REGISTRY = TemplateRegistry.load(DEFAULT_TEMPLATES)
URL = "https://cdn.example/"


def card(title, subtitle=None, image=None, *buttons):
    return {"title": title, "subtitle": subtitle, "image_url": image, "buttons": list(buttons)}


def types(rendered):
    kinds = []
    for m in rendered.messages:
        kinds.append(f"interactive:{m['interactive']['type']}" if m["type"] == "interactive" else m["type"])
    return kinds


CASES = [
    # (id, rasa message, expected message types, not_rendered)
    ("empty", {}, [], ()),
    ("blank-text", {"text": "   "}, [], ()),
    ("text", {"text": "hi"}, ["text"], ()),
    ("long-text", {"text": "word " * 2000}, ["text", "text", "text"], ()),
    ("1-button", {"text": "t", "buttons": buttons(1)}, ["interactive:button"], ()),
    ("3-buttons", {"text": "t", "buttons": buttons(3)}, ["interactive:button"], ()),
    ("4-buttons", {"text": "t", "buttons": buttons(4)}, ["interactive:list"], ()),
    ("10-buttons", {"text": "t", "buttons": buttons(10)}, ["interactive:list"], ()),
    ("11-buttons", {"text": "t", "buttons": buttons(11)}, ["text"], ()),
    ("long-payload", {"text": "t", "buttons": [{"title": "A", "payload": "/x" + "y" * 300}]}, ["text"], ()),
    ("list-long-payload", {"text": "t", "buttons": buttons(4) + [{"title": "A", "payload": "/" + "y" * 210}]}, ["text"], ()),
    ("quick-replies", {"text": "t", "quick_replies": buttons(2)}, ["interactive:button"], ()),
    ("quick-replies-win", {"text": "t", "quick_replies": buttons(2), "buttons": buttons(5)}, ["interactive:button"], ()),
    ("location-quick-reply", {"text": "t", "quick_replies": [{"content_type": "location"}]}, ["interactive:location_request_message"], ()),
    ("buttons-and-location", {"text": "t", "quick_replies": buttons(2) + [{"content_type": "location"}]},
     ["interactive:button", "interactive:location_request_message"], ()),
    ("phone-quick-reply", {"text": "t", "quick_replies": [{"content_type": "user_phone_number"}]}, ["text"], ()),
    ("url-button", {"text": "t", "buttons": [{"title": "Site", "url": "https://x.example"}]}, ["interactive:cta_url"], ()),
    ("url-and-postback", {"text": "t", "buttons": [{"title": "Site", "type": "web_url", "url": "https://x.example"}, *buttons(1)]},
     ["interactive:button"], ()),
    ("two-urls", {"text": "t", "buttons": [{"title": "A", "url": "https://a.example"}, {"title": "B", "url": "https://b.example"}]}, ["text"], ()),
    ("image", {"image": URL + "a.png"}, ["image"], ()),
    ("image-gif-as-document", {"image": URL + "a.gif"}, ["document"], ()),
    ("image-no-extension", {"image": URL + "picture?id=3"}, ["image"], ()),
    ("image-not-a-url", {"text": "t", "image": "map.png"}, ["text"], ("image",)),
    ("text-and-image", {"text": "t", "image": URL + "a.png"}, ["image"], ()),
    ("long-text-and-image", {"text": "x " * 600, "image": URL + "a.png"}, ["text", "image"], ()),
    ("text-image-attachment", {"text": "t", "image": URL + "a.png", "attachment": URL + "b.pdf"}, ["text", "image", "document"], ()),
    ("attachment-url-pdf", {"attachment": URL + "a.pdf"}, ["document"], ()),
    ("attachment-url-mp3", {"attachment": URL + "a.mp3"}, ["audio"], ()),
    ("attachment-url-unknown", {"attachment": URL + "download"}, ["document"], ()),
    ("attachment-video", {"attachment": {"type": "video", "payload": {"src": URL + "v"}}}, ["video"], ()),
    ("attachment-flat", {"attachment": {"type": "image", "url": URL + "a.jpg", "caption": "c"}}, ["image"], ()),
    ("attachment-untyped", {"attachment": {"payload": {"src": URL + "a.ogg"}}}, ["audio"], ()),
    ("attachment-long-caption", {"attachment": {"type": "image", "payload": {"src": URL + "a.jpg", "caption": "c " * 700}}}, ["image", "text"], ()),
    ("attachment-sticker-caption", {"attachment": {"type": "sticker", "payload": {"src": URL + "s.webp", "caption": "c"}}}, ["sticker", "text"], ()),
    ("attachment-no-source", {"text": "t", "attachment": {"type": "file"}}, ["text"], ("attachment",)),
    ("attachment-unknown-type", {"attachment": {"type": "hologram", "payload": {"src": URL + "h"}}}, [], ("attachment",)),
    ("attachment-generic-template", {"attachment": {"type": "template", "payload": {"template_type": "generic", "elements": [
        card("A", "a"), card("B", "b")]}}}, ["interactive:list"], ()),
    ("attachment-button-template", {"attachment": {"type": "template", "payload": {"template_type": "button", "text": "t",
                                                                                    "buttons": buttons(2)}}}, ["interactive:button"], ()),
    ("elements-images", {"elements": [card("A", "a", URL + "a.jpg"), card("B", None, URL + "b.jpg")]}, ["image", "image"], ()),
    ("elements-image-buttons", {"elements": [card("A", "a", URL + "a.jpg", *buttons(2))]}, ["interactive:button"], ()),
    ("elements-image-many-buttons", {"elements": [card("A", "a", URL + "a.jpg", *buttons(5))]}, ["image", "interactive:list"], ()),
    ("elements-no-images", {"text": "t", "elements": [card(f"Card {i}", "s") for i in range(3)]}, ["interactive:list"], ()),
    ("elements-no-images-no-subtitles", {"elements": [card(f"Card {i}") for i in range(2)]}, ["interactive:button"], ()),
    ("elements-11-no-images", {"elements": [card(f"Card {i}", "s") for i in range(11)]}, ["text"], ()),
    ("elements-mixed", {"elements": [card("A", "a", URL + "a.jpg"), card("B", "b", None, *buttons(1)), card("C")]},
     ["image", "interactive:button", "text"], ()),
    ("elements-untitled", {"elements": [{"subtitle": "no title"}]}, [], ("elements",)),
    ("custom", {"custom": {"type": "location", "location": {"latitude": 1, "longitude": 2}}}, ["location"], ()),
    ("custom-list", {"custom": [{"type": "reaction", "reaction": {"message_id": "wamid.X", "emoji": "👍"}},
                                {"type": "text", "text": {"body": "b"}}]}, ["reaction", "text"], ()),
    ("custom-bad", {"text": "t", "custom": {"type": "text", "text": {"body": ""}}}, ["text"], ("custom",)),
    ("custom-other-channel", {"custom": {"blocks": []}}, [], ("custom",)),
    ("everything", {"text": "t", "buttons": buttons(2), "custom": {"type": "text", "text": {"body": "c"}},
                    "image": URL + "i.png", "attachment": URL + "d.pdf", "elements": [card("A", "a", URL + "a.jpg")]},
     ["interactive:button", "text", "image", "document", "image"], ()),
]


@pytest.mark.parametrize("message, expected, not_rendered", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rasa_message_types(message, expected, not_rendered):
    rendered = render(message)
    assert types(rendered) == expected
    assert rendered.not_rendered == not_rendered
    if not_rendered:
        assert all(p.split(":")[0] in not_rendered for p in rendered.problems if not p.startswith(("buttons", "quick")))


@pytest.mark.parametrize("message", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_everything_rendered_passes_metas_limits(message):
    """Each object, in the envelope the client adds, passes the simulator's checks (Meta's codes)
    and render's own validator."""
    for whatsapp_message in render(message).messages:
        assert message_problem(whatsapp_message) is None, whatsapp_message
        validate_send({"messaging_product": "whatsapp", "to": "4915112345678", **whatsapp_message}, REGISTRY)


def test_duplicate_shortened_titles_are_made_unique():
    options = [{"title": "Check the status of my order", "payload": f"/p{i}"} for i in range(3)]
    titles = [b["reply"]["title"] for b in render({"text": "t", "buttons": options}).messages[0]["interactive"]["action"]["buttons"]]
    assert titles == ["Check the status of…", "Check the statu… (2)", "Check the statu… (3)"]
    assert all(len(t) <= 20 for t in titles)


def test_duplicate_payloads_are_dropped_and_reported():
    rendered = render({"text": "t", "buttons": [{"title": "Yes", "payload": "/affirm"}, {"title": "Sure", "payload": "/affirm"}]})
    assert [b["reply"]["title"] for b in rendered.messages[0]["interactive"]["action"]["buttons"]] == ["Yes"]
    assert rendered.not_rendered == () and "Sure" in rendered.problems[0]


def test_numbered_choices_map_typed_numbers_to_payloads():
    rendered = render({"text": "Pick", "buttons": buttons(12)})
    assert rendered.numbered_choices[0] == ("1", '/choose{"n": 1}')
    assert rendered.numbered_choices[-1] == ("12", '/choose{"n": 12}')
    for typed, payload in (("2", '/choose{"n": 2}'), (" 12. ", '/choose{"n": 12}'), ("#3", '/choose{"n": 3}'), ("4)", '/choose{"n": 4}'),
                           ("13", None), ("two", None), ("2 please", None), ("", None)):
        assert numbered_choice(typed, rendered.numbered_choices) == payload, typed
    assert render({"text": "Pick", "buttons": buttons(3)}).numbered_choices == ()


def test_long_payload_goes_numbered_never_truncated():
    payload = '/inform{"note": "' + "x" * 300 + '"}'
    rendered = render({"text": "t", "buttons": [{"title": "Keep it", "payload": payload}]})
    assert rendered.messages[0]["text"]["body"] == "t\n\n1. Keep it"
    assert rendered.numbered_choices == (("1", payload),)


def test_numbered_cards_carry_subtitles_and_continue_numbering():
    rendered = render({"text": "t", "buttons": buttons(11), "elements": [card(f"Card {i}", f"sub {i}") for i in range(11)]})
    assert [n for n, _ in rendered.numbered_choices] == [str(i) for i in range(1, 23)]
    assert "12. Card 0 – sub 0" in rendered.messages[-1]["text"]["body"]
    assert rendered.numbered_choices[11] == ("12", "Card 0")


def test_list_rows_keep_full_title_and_subtitle_in_description():
    rendered = render({"elements": [card("A rather long product name here", "Only €9"), card("B", "b")]})
    row = rendered.messages[0]["interactive"]["action"]["sections"][0]["rows"][0]
    assert row == {"id": "A rather long product name here", "title": "A rather long product n…",
                   "description": "A rather long product name here Only €9"}
    assert rendered.messages[0]["interactive"]["body"]["text"] == "Please choose:"


def test_caption_over_1024_continues_as_text():
    caption = "A sentence about the parcel. " * 50  # ~1,450 characters
    image, rest = render({"attachment": {"type": "image", "payload": {"src": URL + "p.jpg", "caption": caption}}}).messages
    assert len(image["image"]["caption"]) <= 1024 and image["image"]["caption"].endswith(".")
    assert image["image"]["caption"] + " " + rest["text"]["body"] == caption.strip()


def test_button_body_over_1024_and_list_body_up_to_4096():
    text = "word " * 500
    assert types(render({"text": text, "buttons": buttons(2)})) == ["text", "text", "interactive:button"]
    (single,) = render({"text": text, "buttons": buttons(5)}).messages
    assert single["interactive"]["body"]["text"] == text.strip()


@pytest.mark.parametrize("url, kind", [
    (URL + "a.JPG", "image"), (URL + "a.jpeg?x=1", "image"), (URL + "a.png#top", "image"), (URL + "a.mp4", "video"),
    (URL + "a.3gp", "video"), (URL + "a.m4a", "audio"), (URL + "a.opus", "audio"), (URL + "a.pdf", "document"),
    (URL + "a.docx", "document"), (URL + "a.gif", "document"), (URL + "a.webp", "document"), (URL + "dir.v2/file", "document"),
    (URL, "document"),
])
def test_media_kind_from_extension(url, kind):
    assert media_kind(url) == kind


def test_document_filename_from_url_or_payload():
    (doc,) = render({"attachment": URL + "files/Terms%20and%20Conditions.pdf"}).messages
    assert doc["document"] == {"link": URL + "files/Terms%20and%20Conditions.pdf", "filename": "Terms and Conditions.pdf"}
    (doc,) = render({"attachment": {"type": "document", "payload": {"id": "555", "filename": "x.pdf"}}}).messages
    assert doc["document"] == {"id": "555", "filename": "x.pdf"}
    (image,) = render({"attachment": {"type": "image", "payload": {"src": URL + "a.jpg", "filename": "ignored.jpg"}}}).messages
    assert image["image"] == {"link": URL + "a.jpg"}


def test_split_text_prefers_sentence_ends_of_any_kind():
    text = ("Is it here? " * 20 + "Yes! " * 20).strip()
    parts = split_text(text, 100)
    assert all(len(p) <= 100 and p[-1] in "?!" for p in parts)
    assert " ".join(parts) == text


@pytest.mark.parametrize("custom, reason", [
    ({"type": "text", "text": {"body": "x" * 4097}}, "at most 4096"),
    ({"type": "image", "image": {"link": "ftp://x/y.jpg"}}, "http(s) URL"),
    ({"type": "image", "image": {}}, "exactly one of 'id' and 'link'"),
    ({"type": "sticker", "sticker": {"id": "1", "caption": "c"}}, "not allowed for sticker"),
    ({"type": "interactive", "interactive": {"type": "button", "body": {"text": "b"}, "action": {"buttons": [
        {"type": "reply", "reply": {"id": "a", "title": "Same"}}, {"type": "reply", "reply": {"id": "b", "title": "Same"}}]}}},
     "titles must be unique"),
    ({"type": "interactive", "interactive": {"type": "list", "body": {"text": "b"}, "action": {"button": "Go", "sections": [
        {"rows": [{"id": "a", "title": "A"}]}, {"rows": [{"id": "b", "title": "B"}]}]}}}, "['title'] is required"),
    ({"type": "interactive", "interactive": {"type": "list", "header": {"type": "image", "image": {"link": URL}},
                                             "body": {"text": "b"}, "action": {}}}, "header']['type'] must be one of text"),
    ({"type": "interactive", "interactive": {"type": "carousel"}}, "interactive['type'] must be one of"),
    ({"type": "template", "template": {"name": "x", "language": {"code": "en"},
                                       "components": [{"type": "button", "parameters": []}]}}, "sub_type"),
    ({"type": "text", "text": {"body": "hi"}, "context": {}}, "context['message_id']"),
    ({"type": "text", "text": {"body": "hi"}, "recipient": "US.1"}, "must not set 'recipient'"),
    ({"type": "text", "text": {"body": "hi"}, "messaging_product": "sms"}, "messaging_product"),
    ({"text": {"body": "a"}, "image": {"link": URL}}, "no WhatsApp message type"),
    ("just a string", "must be a WhatsApp message object"),
])
def test_custom_is_validated_with_metas_limits(custom, reason):
    rendered = render({"custom": custom})
    assert rendered.messages == () and rendered.not_rendered == ("custom",)
    assert reason in rendered.problems[0], rendered.problems


def test_custom_envelope_keys_are_dropped_and_context_kept():
    custom = {"messaging_product": "whatsapp", "recipient_type": "individual", "type": "text",
              "text": {"body": "re"}, "context": {"message_id": "wamid.A"}}
    (message,) = render({"custom": custom}).messages
    assert message == {"type": "text", "text": {"body": "re"}, "context": {"message_id": "wamid.A"}}
