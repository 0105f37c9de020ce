import pytest

from connector.templates import InvalidTemplate, MissingParameter, TemplateBook

FULL = {
    "utter_order_update": {
        "name": "order_update",
        "language": "en_US",
        "header": ["{customer_name}"],
        "body": ["{order_id}", "now {order_status}"],
        "buttons": [
            {"sub_type": "quick_reply", "index": 0, "payload": "/opt_out"},
            {"sub_type": "url", "index": 1, "text": "track/{order_id}"},
        ],
    },
    "utter_promo": {"name": "spring_sale", "language": "es", "header": {"type": "image", "link": "https://shop.example/{campaign}.png"}},
}


def test_components_in_metas_shape():
    book = TemplateBook.parse(FULL, None)
    mapping = book.for_response("utter_order_update")
    values = {"customer_name": "Ada", "order_id": "10042", "order_status": "shipped"}
    assert mapping.components(values) == (
        {"type": "header", "parameters": [{"type": "text", "text": "Ada"}]},
        {"type": "body", "parameters": [{"type": "text", "text": "10042"}, {"type": "text", "text": "now shipped"}]},
        {"type": "button", "sub_type": "quick_reply", "index": "0", "parameters": [{"type": "payload", "payload": "/opt_out"}]},
        {"type": "button", "sub_type": "url", "index": "1", "parameters": [{"type": "text", "text": "track/10042"}]},
    )
    assert mapping.placeholders == ("order_id", "order_status", "customer_name")


def test_media_header():
    mapping = TemplateBook.parse(FULL, None).for_response("utter_promo")
    assert mapping.components({"campaign": "spring"}) == (
        {"type": "header", "parameters": [{"type": "image", "image": {"link": "https://shop.example/spring.png"}}]},
    )


def test_missing_value():
    mapping = TemplateBook.parse(FULL, None).for_response("utter_order_update")
    with pytest.raises(MissingParameter, match="order_status"):
        mapping.components({"customer_name": "Ada", "order_id": "1"})


def test_fallback_only_for_unnamed_messages():
    book = TemplateBook.parse({}, {"name": "agent_reply", "language": "en_US"})
    assert book.for_response(None).name == "agent_reply"
    assert book.for_response("utter_unmapped") is None


@pytest.mark.parametrize(
    "templates, key",
    [
        ({"utter_x": "order_update"}, "templates.utter_x"),
        ({"utter_x": {"language": "en_US"}}, "templates.utter_x.name"),
        ({"utter_x": {"name": "Order Update", "language": "en_US"}}, "templates.utter_x.name"),
        ({"utter_x": {"name": "a", "language": "english"}}, "templates.utter_x.language"),
        ({"utter_x": {"name": "a", "language": "en_US", "body": "{order_id}"}}, "templates.utter_x.body"),
        ({"utter_x": {"name": "a", "language": "en_US", "body": ["{order id}"]}}, "templates.utter_x.body[0]"),
        ({"utter_x": {"name": "a", "language": "en_US", "body": ["{order_id"]}}, "templates.utter_x.body[0]"),
        ({"utter_x": {"name": "a", "language": "en_US", "body": [""]}}, "templates.utter_x.body[0]"),
        ({"utter_x": {"name": "a", "language": "en_US", "header": {"type": "gif", "link": "x"}}}, "templates.utter_x.header"),
        ({"utter_x": {"name": "a", "language": "en_US", "buttons": [{"sub_type": "call"}]}}, "templates.utter_x.buttons[0]"),
        ({"utter_x": {"name": "a", "language": "en_US", "buttons": [{"sub_type": "url"}]}}, "templates.utter_x.buttons[0].text"),
        ({"utter_x": {"name": "a", "language": "en_US", "buttons": [{"sub_type": "url", "index": 12, "text": "x"}]}},
         "templates.utter_x.buttons[0].index"),
        ({"utter_x": {"name": "a", "language": "en_US", "params": []}}, "templates.utter_x.params"),
        (["utter_x"], "templates"),
    ],
)
def test_bad_mapping_names_the_key(templates, key):
    with pytest.raises(InvalidTemplate) as raised:
        TemplateBook.parse(templates, None)
    assert raised.value.key == key
