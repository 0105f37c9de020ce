from connector.render import render, shorten, split_text


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
