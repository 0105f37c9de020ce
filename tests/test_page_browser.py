"""The simulator's page in a real browser (Debian's Chromium, headless, driven by Playwright) against
the real bot: the 25-hour scenario a person plays by hand, and the agent desk under the window.
Screenshots go to test-output/page/."""

import shutil
from pathlib import Path

import pytest

from tests.stack import ROOT, Stack

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = ROOT / "test-output" / "page"
WAIT_MS = 30_000


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("page"), follow_up_seconds=25 * 3600).start()
    yield stack
    stack.stop()


@pytest.fixture
def page(stack):
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: `apt-get install chromium` (.ci/run does), or leave the browser "
                    "tests out with -m 'not browser'")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 950})
        page.set_default_timeout(WAIT_MS)
        page.goto(f"{stack.sim_url}/")
        yield page
        browser.close()


def customer_types(page, text):
    page.fill("#message", text)
    page.press("#message", "Enter")


def bubble(page, text):
    """The phone's latest bot bubble containing `text`."""
    return page.locator("#chat li.bot", has_text=text).last


def test_the_25_hour_scenario_on_the_page(page, stack):
    from playwright.sync_api import expect

    page.click("#new-customer")
    customer_types(page, "hi")
    bubble(page, "How can I help").get_by_role("button", name="Order updates").click()  # a reply button, tapped
    expect(bubble(page, "updates")).to_be_visible()
    expect(page.locator("#opt-in")).to_have_text("yes")
    customer_types(page, "where is order 10042")
    expect(bubble(page, "Order 10042 (Ceramic coffee mug (set of 2)) has shipped")).to_be_visible()
    customer_types(page, "and order 10043")  # a second follow-up, due at the same time
    expect(bubble(page, "Order 10043")).to_be_visible()
    expect(page.locator("#window-state")).to_contain_text("open, closes in 23 h")
    expect(page.locator("#timeline li.free_form").first).to_be_visible()

    page.get_by_role("button", name="+25 h").click()  # both follow-ups were due in the skipped hours
    template = page.locator("#chat li.bot[data-type=template]")
    expect(template).to_have_count(1)
    expect(template).to_contain_text("template order_status_update")
    expect(template).to_contain_text("Update on your order 100")  # rendered with its parameters
    expect(page.locator("#timeline li.template").first).to_contain_text("template order_status_update")
    expect(page.locator("#timeline li.suppressed").first).to_contain_text("suppressed: one template per lapsed window")
    expect(page.locator("#window-state")).to_contain_text("closed since")
    expect(page.locator("#templates-left")).to_have_text("0")
    page.screenshot(path=str(SHOTS / "phone-and-panel.png"))
    assert stack.stats()["window_violations"] == 0


def test_the_agent_desk_obeys_the_window(page, stack):
    from playwright.sync_api import expect

    page.click("#new-customer")
    customer_types(page, "hi")
    bubble(page, "How can I help").get_by_role("button", name="Order updates").click()
    expect(page.locator("#opt-in")).to_have_text("yes")
    bubble(page, "How can I help").get_by_role("button", name="Talk to a person").click()
    expect(page.locator("#agent-status")).to_contain_text("is with an agent")

    page.fill("#agent-text", "Hi, Sam here. Let me check.")
    page.click("#agent-send")
    expect(bubble(page, "Sam here")).to_be_visible()  # inside the window: free-form

    page.get_by_role("button", name="+25 h").click()
    expect(page.locator("#agent-lock")).to_contain_text("Locked: the care window closed at")
    expect(page.locator("#agent-lock")).to_contain_text("only a template can reach the customer")
    expect(page.locator("#agent-send")).to_be_disabled()

    page.select_option("#template-name", "order_status_update")
    page.fill("#param-1", "10042")
    page.fill("#param-2", "refunded")
    page.get_by_role("button", name="Send template").click()
    template = page.locator("#chat li.bot[data-type=template]")
    expect(template).to_contain_text("Update on your order 10042: it is now refunded.")
    expect(page.locator("#timeline li.template").first).to_contain_text("template order_status_update")

    page.get_by_role("button", name="Send template").click()  # one per lapsed window: the API refuses
    expect(page.locator("#agent-lock")).to_contain_text("Refused (409 care_window_closed)")
    page.screenshot(path=str(SHOTS / "agent-desk.png"))

    page.get_by_role("button", name="Hand back to the bot").click()
    expect(page.locator("#handoff")).to_be_visible()
    assert stack.stats()["window_violations"] == 0
