"""The templates mapping against Meta's templates, as the Graph API lists them."""

import logging

import pytest

from connector.config import ChannelConfig
from connector.care_state import CareState
from connector.care_state.memory import MemoryBackend
from connector.template_check import MetaTemplate, TemplateMismatch, check
from connector.template_status import MetaTemplates
from connector.templates import TemplateBook

CATALOG = [MetaTemplate.from_graph(raw) for raw in [
    {"name": "order_status_update", "language": "en_US", "status": "APPROVED", "category": "UTILITY",
     "components": [{"type": "BODY", "text": "Update on your order {{1}}: it is now {{2}}."}]},
    {"name": "order_status_update", "language": "es", "status": "PAUSED", "category": "UTILITY",
     "components": [{"type": "BODY", "text": "Pedido {{1}}: {{2}}."}]},
    {"name": "welcome", "language": "en_US", "status": "APPROVED", "category": "MARKETING",
     "components": [{"type": "HEADER", "format": "IMAGE"}, {"type": "BODY", "text": "Hi {{customer_name}}!"},
                    {"type": "BUTTONS", "buttons": [{"type": "QUICK_REPLY", "text": "Stop"},
                                                    {"type": "URL", "text": "Shop", "url": "https://shop.example/{{1}}"},
                                                    {"type": "URL", "text": "Help", "url": "https://shop.example/help"}]}]},
]]


def book(**mapping):
    return TemplateBook.parse({"utter_x": mapping}, None)


def errors(**mapping):
    return list(check(book(**mapping), CATALOG).errors)


def test_a_mapping_that_matches_passes():
    assert check(book(name="order_status_update", language="en_US", body=["{order_id}", "{order_status}"]), CATALOG) \
        .errors == ()
    assert errors(name="welcome", language="en_US", header={"type": "image", "link": "https://x/y.png"},
                  body=["{name}"], buttons=[{"sub_type": "quick_reply", "index": 0, "payload": "/opt_out"},
                                            {"sub_type": "url", "index": 1, "text": "{order_id}"}]) == []


@pytest.mark.parametrize("mapping, message", [
    ({"name": "order_status_updates", "language": "en_US", "body": ["{a}", "{b}"]},
     "templates.utter_x.name: the business account has no template order_status_updates"),
    ({"name": "order_status_update", "language": "de", "body": ["{a}", "{b}"]},
     "templates.utter_x.language: order_status_update has no de version (it has en_US, es)"),
    ({"name": "order_status_update", "language": "en_US", "body": ["{order_id}"]},
     "templates.utter_x.body has 1 parameter; order_status_update (en_US) has 2 placeholders"),
    ({"name": "order_status_update", "language": "en_US", "body": ["{a}", "{b}"], "header": ["{c}"]},
     "templates.utter_x.header has 1 parameter; order_status_update (en_US)'s header has 0 placeholders"),
    ({"name": "welcome", "language": "en_US", "body": ["{n}"]},
     "templates.utter_x.header is missing; welcome (en_US) has an image header"),
    ({"name": "welcome", "language": "en_US", "header": {"type": "video", "link": "https://x/v.mp4"}, "body": ["{n}"]},
     "templates.utter_x.header is a video; welcome (en_US) has an image header"),
    ({"name": "welcome", "language": "en_US", "header": {"type": "image", "link": "https://x"}, "body": ["{n}"],
      "buttons": [{"sub_type": "url", "index": 0, "text": "{id}"}]},
     "templates.utter_x.buttons[0].sub_type is url; button 0 of welcome (en_US) is QUICK_REPLY"),
    ({"name": "welcome", "language": "en_US", "header": {"type": "image", "link": "https://x"}, "body": ["{n}"],
      "buttons": [{"sub_type": "url", "index": 2, "text": "{id}"}]},
     "templates.utter_x.buttons[0]: button 2 of welcome (en_US) has a fixed URL, it takes no parameter"),
    ({"name": "welcome", "language": "en_US", "header": {"type": "image", "link": "https://x"}, "body": ["{n}"],
      "buttons": [{"sub_type": "quick_reply", "index": 5, "payload": "/x"}]},
     "templates.utter_x.buttons[0].index is 5; welcome (en_US) has 3 buttons"),
])
def test_a_mapping_that_cannot_work_is_named_with_what_is_wrong(mapping, message):
    assert errors(**mapping) == [message]


def test_a_template_that_is_not_approved_is_a_warning():
    result = check(book(name="order_status_update", language="es", body=["{a}", "{b}"]), CATALOG)
    assert result.errors == ()
    assert result.warnings == ("templates.utter_x: order_status_update (es) is PAUSED at Meta, which refuses to "
                               "send it until it is approved again",)


class FakeClient:
    def __init__(self, answer):
        self.answer = answer

    async def message_templates(self, waba_id):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


CREDENTIALS = {"access_token": "t", "phone_number_id": "106540352242922", "app_secret": "s", "verify_token": "v",
               "templates": {"utter_order_update": {"name": "order_status_update", "language": "en_US", "body": ["{order_id}"]}}}
RAW = [{"name": t.name, "language": t.language, "status": t.status, "category": t.category,
        "components": list(t.components)} for t in CATALOG]


async def now():
    return 1767225600.0


async def not_approved(templates):
    return {key: t.status for key, t in (await templates.known()).items() if t.status != "APPROVED"}


def meta_templates(answer, **credentials):
    state = CareState(MemoryBackend())
    config = ChannelConfig.from_credentials({**CREDENTIALS, **credentials})
    return MetaTemplates(config, FakeClient(answer), lambda: state, now), state


async def test_startup_stops_on_a_mapping_that_cannot_work(caplog):
    templates, state = meta_templates(RAW, whatsapp_business_account_id="102290129340398")
    with pytest.raises(TemplateMismatch, match="templates.utter_order_update.body has 1 parameter; "
                                               r"order_status_update \(en_US\) has 2 placeholders"):
        await templates.start()
    state.close()


async def test_a_sync_stores_what_meta_says_and_a_failed_one_keeps_the_last_copy(caplog):
    templates, state = meta_templates(RAW, whatsapp_business_account_id="102290129340398",
                                      templates={"utter_x": {"name": "order_status_update", "language": "es",
                                                             "body": ["{a}", "{b}"]}})
    await templates.start()
    await templates.stop()
    assert "order_status_update (es) is PAUSED at Meta" in caplog.text
    assert await not_approved(templates) == {("order_status_update", "es"): "PAUSED"}
    templates.client = FakeClient(TimeoutError("Graph is down"))
    assert await templates.sync() is False
    assert "Meta's templates could not be read (TimeoutError: Graph is down): the last copy stays in use" in caplog.text
    assert await not_approved(templates) == {("order_status_update", "es"): "PAUSED"}
    state.close()


async def test_startup_goes_on_when_meta_cannot_be_read_or_no_account_is_set(caplog):
    caplog.set_level(logging.INFO)
    templates, state = meta_templates(TimeoutError("Graph is down"), whatsapp_business_account_id="102290129340398")
    await templates.start()
    await templates.stop()
    assert "Meta's templates could not be read (TimeoutError: Graph is down): the templates mapping is not checked" \
        in caplog.text
    templates, state = meta_templates(RAW)
    await templates.start()
    assert "set whatsapp_business_account_id" in caplog.text
    state.close()
