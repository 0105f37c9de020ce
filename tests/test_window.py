"""The care window decision, table-driven, no I/O."""

import pytest

from connector.templates import TemplateBook
from connector.window import (
    CARE_WINDOW_SECONDS,
    CareWindowPolicy,
    Outbound,
    SendFreeForm,
    SendTemplate,
    Suppress,
    SuppressReason,
    WindowFacts,
    decide,
)

T0 = 1_764_000_000.0  # the customer's last message (WhatsApp timestamp)
H = 3600.0
STRICT = CareWindowPolicy(margin_seconds=0)
BOOK = TemplateBook.parse(
    {
        "utter_order_update": {"name": "order_update", "language": "en_US", "body": ["{order_id}"]},
        "utter_greet": {"name": "hello_world", "language": "en_US"},
    },
    fallback={"name": "agent_follow_up", "language": "en_US", "body": ["{customer_name}"]},
)
ORDER_UPDATE = Outbound("utter_order_update", values={"order_id": "10042"})
ORDER_UPDATE_TEMPLATE = SendTemplate(
    "order_update", "en_US", ({"type": "body", "parameters": [{"type": "text", "text": "10042"}]},)
)


def facts(last=T0, **kwargs):
    kwargs.setdefault("opt_in", True)
    return WindowFacts(last_inbound_at=last, **kwargs)


@pytest.mark.parametrize(
    "case, now, window, outbound, policy, expected",
    [
        ("just written", T0 + 5, facts(), ORDER_UPDATE, STRICT, SendFreeForm()),
        ("23:59:59 later", T0 + CARE_WINDOW_SECONDS - 1, facts(), Outbound("utter_x"), STRICT, SendFreeForm()),
        ("exactly 24 h later: closed", T0 + CARE_WINDOW_SECONDS, facts(), ORDER_UPDATE, STRICT, ORDER_UPDATE_TEMPLATE),
        ("inside the margin before the deadline", T0 + CARE_WINDOW_SECONDS - 30, facts(), ORDER_UPDATE,
         CareWindowPolicy(margin_seconds=60), ORDER_UPDATE_TEMPLATE),
        ("just outside the margin", T0 + CARE_WINDOW_SECONDS - 61, facts(), ORDER_UPDATE,
         CareWindowPolicy(margin_seconds=60), SendFreeForm()),
        ("a template inside the window goes out free-form as it is", T0 + H, facts(templates_sent=5), ORDER_UPDATE,
         STRICT, SendFreeForm()),
        ("opt-in does not matter inside", T0 + H, facts(opt_in=False), Outbound(None), STRICT, SendFreeForm()),
        ("outside, mapped, opted in", T0 + 30 * H, facts(), ORDER_UPDATE, STRICT, ORDER_UPDATE_TEMPLATE),
        ("outside, one template already sent", T0 + 30 * H, facts(templates_sent=1), ORDER_UPDATE, STRICT,
         Suppress(SuppressReason.TEMPLATE_LIMIT,
                  "outside the care window and 1 template(s) already sent since it lapsed (limit 1)")),
        ("a raised limit", T0 + 30 * H, facts(templates_sent=1), ORDER_UPDATE,
         CareWindowPolicy(margin_seconds=0, templates_per_lapsed_window=2), ORDER_UPDATE_TEMPLATE),
        ("outside, no mapping", T0 + 30 * H, facts(), Outbound("utter_goodbye"), STRICT,
         Suppress(SuppressReason.NO_TEMPLATE, "outside the care window and no template is mapped for utter_goodbye")),
        ("outside, missing slot", T0 + 30 * H, facts(), Outbound("utter_order_update"), STRICT,
         Suppress(SuppressReason.TEMPLATE_UNFILLABLE,
                  "outside the care window and template order_update cannot be filled: no value for {order_id}")),
        ("outside, empty slot", T0 + 30 * H, facts(), Outbound("utter_order_update", values={"order_id": " "}),
         STRICT, Suppress(SuppressReason.TEMPLATE_UNFILLABLE,
                          "outside the care window and template order_update cannot be filled: no value for {order_id}")),
        ("outside, opted out", T0 + 30 * H, facts(opt_in=False), ORDER_UPDATE, STRICT,
         Suppress(SuppressReason.NO_OPT_IN, "outside the care window and the customer has not opted in")),
        ("outside, never asked", T0 + 30 * H, facts(opt_in=None), ORDER_UPDATE, STRICT,
         Suppress(SuppressReason.NO_OPT_IN, "outside the care window and the customer has not opted in")),
        ("opt-in collected elsewhere", T0 + 30 * H, facts(opt_in=None), ORDER_UPDATE,
         CareWindowPolicy(margin_seconds=0, opt_in_collected_elsewhere=True), ORDER_UPDATE_TEMPLATE),
        ("collected elsewhere, but opted out here", T0 + 30 * H, facts(opt_in=False), ORDER_UPDATE,
         CareWindowPolicy(margin_seconds=0, opt_in_collected_elsewhere=True),
         Suppress(SuppressReason.NO_OPT_IN, "outside the care window and the customer has not opted in")),
        ("never wrote: business-initiated rules", T0, facts(last=None), ORDER_UPDATE, STRICT, ORDER_UPDATE_TEMPLATE),
        ("never wrote, no opt-in", T0, facts(last=None, opt_in=None), ORDER_UPDATE, STRICT,
         Suppress(SuppressReason.NO_OPT_IN, "outside the care window and the customer has not opted in")),
        ("free text outside uses the fallback template", T0 + 30 * H, facts(),
         Outbound(None, values={"customer_name": "Ada"}), STRICT,
         SendTemplate("agent_follow_up", "en_US", ({"type": "body", "parameters": [{"type": "text", "text": "Ada"}]},))),
        ("a template without parameters", T0 + 30 * H, facts(), Outbound("utter_greet"), STRICT,
         SendTemplate("hello_world", "en_US", ())),
        ("Meta said 131047 to a reply to the last message", T0 + H, facts(closed_for_inbound=T0), ORDER_UPDATE, STRICT,
         ORDER_UPDATE_TEMPLATE),
        ("a customer message after Meta's 131047 reopens", T0 + H, facts(closed_for_inbound=T0 - 10), Outbound("utter_x"),
         STRICT, SendFreeForm()),
        ("tracker store unavailable", T0 + H, facts(unknown="tracker store unavailable"), ORDER_UPDATE, STRICT,
         Suppress(SuppressReason.STATE_UNKNOWN, "care window unknown: tracker store unavailable")),
        ("the message is itself a template", T0 + 30 * H, facts(),
         Outbound(None, template={"name": "hello_world", "language": {"code": "en_US"}}), STRICT,
         SendTemplate("hello_world", "en_US", ())),
        ("a template message still needs opt-in", T0 + 30 * H, facts(opt_in=False),
         Outbound(None, template={"name": "hello_world", "language": {"code": "en_US"}}), STRICT,
         Suppress(SuppressReason.NO_OPT_IN, "outside the care window and the customer has not opted in")),
    ],
)
def test_decide(case, now, window, outbound, policy, expected):
    assert decide(now, window, outbound, BOOK, policy) == expected, case


def test_clock_skew_timestamp_in_the_future_counts_as_now():
    future = facts(last=T0 + 300)  # WhatsApp's clock 5 min ahead of ours
    assert future.expires_at(T0) == T0 + CARE_WINDOW_SECONDS
    assert decide(T0, future, ORDER_UPDATE, BOOK, STRICT) == SendFreeForm()
    # the window still ends no later than 24 h after our receipt
    assert decide(T0 + CARE_WINDOW_SECONDS, future, ORDER_UPDATE, BOOK, STRICT) == SendFreeForm()
    assert future.expires_at(T0 + CARE_WINDOW_SECONDS) == T0 + 300 + CARE_WINDOW_SECONDS


def test_template_message_object():
    assert ORDER_UPDATE_TEMPLATE.message() == {
        "type": "template",
        "template": {
            "name": "order_update",
            "language": {"code": "en_US"},
            "components": [{"type": "body", "parameters": [{"type": "text", "text": "10042"}]}],
        },
    }
    assert SendTemplate("hello_world", "en_US", ()).message() == {
        "type": "template", "template": {"name": "hello_world", "language": {"code": "en_US"}},
    }
