import pytest

from connector.config import ChannelConfig, ConfigError

VALID = {
    "access_token": "EAAG-token",
    "phone_number_id": "106540352242922",
    "app_secret": "secret",
    "verify_token": "verify",
    "api_url": "http://127.0.0.1:5090/",
    "api_version": "v23.0",
}


def test_valid_block_is_read_and_normalised():
    config = ChannelConfig.from_credentials(VALID)
    assert config.api_url == "http://127.0.0.1:5090"
    assert config.messages_url == "http://127.0.0.1:5090/v23.0/106540352242922/messages"
    assert config.request_timeout == 10.0


def test_the_startup_heap_is_frozen_unless_switched_off():
    assert ChannelConfig.from_credentials(VALID).freeze_startup_heap is True
    assert ChannelConfig.from_credentials({**VALID, "freeze_startup_heap": "false"}).freeze_startup_heap is False


def test_defaults_for_empty_api_url_and_version():
    config = ChannelConfig.from_credentials({**VALID, "api_url": "", "api_version": None})
    assert config.api_url == "https://graph.facebook.com"
    assert config.api_version == "v23.0"


@pytest.mark.parametrize(
    "change, bad_key",
    [
        ({"access_token": ""}, "access_token"),
        ({"app_secret": None}, "app_secret"),
        ({"verify_token": "   "}, "verify_token"),
        ({"phone_number_id": "+1 555 078 3881"}, "phone_number_id"),
        ({"api_url": "graph.facebook.com"}, "api_url"),
        ({"api_version": "23"}, "api_version"),
        ({"request_timeout": 0}, "request_timeout"),
        ({"request_timeout": "10"}, "request_timeout"),
        ({"acess_token": "typo"}, "acess_token"),
        ({"access_token": ["a"]}, "access_token"),
        ({"phone_number_id": []}, "phone_number_id"),
        ({"phone_number_id": ["106540352242922", "+1 555"]}, "phone_number_id"),
        ({"phone_number_id": ""}, "phone_number_id"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"max_in_flight": 2.5}, "max_in_flight"),
        ({"turn_attempts": 0}, "turn_attempts"),
        ({"shutdown_deadline_seconds": -1}, "shutdown_deadline_seconds"),
        ({"handoff_webhook_url": "desk.example.com/hook", "agent_token": "t"}, "handoff_webhook_url"),
        ({"handoff_webhook_url": "https://desk.example.com/hook"}, "agent_token"),
        ({"window_closing_lead_minutes": 1440}, "window_closing_lead_minutes"),
        ({"desk_backlog_limit": 0}, "desk_backlog_limit"),
        ({"resume_intent": "/bot_is_back"}, "resume_intent"),
        ({"whatsapp_business_account_id": "WABA-1"}, "whatsapp_business_account_id"),
        ({"template_sync_minutes": 0}, "template_sync_minutes"),
        ({"freeze_startup_heap": "yes"}, "freeze_startup_heap"),
    ],
)
def test_bad_setting_is_named(change, bad_key):
    with pytest.raises(ConfigError) as raised:
        ChannelConfig.from_credentials({**VALID, **change})
    assert raised.value.key == bad_key
    assert f"'{bad_key}'" in str(raised.value)


def test_missing_block():
    with pytest.raises(ConfigError, match="access_token"):
        ChannelConfig.from_credentials(None)


def test_missing_required_key():
    block = dict(VALID)
    del block["app_secret"]
    with pytest.raises(ConfigError, match="'app_secret' is missing"):
        ChannelConfig.from_credentials(block)


@pytest.mark.parametrize("numbers", [["106540352242922", "222222222222222"], "106540352242922, 222222222222222",
                                     ["106540352242922", 222222222222222, "222222222222222"]])
def test_several_business_numbers_as_a_list_or_an_environment_variable(numbers):
    config = ChannelConfig.from_credentials({**VALID, "phone_number_id": numbers})
    assert config.phone_number_ids == ("106540352242922", "222222222222222")
    assert config.phone_number_id == "106540352242922"  # where messages leave from when unknown


def test_delivery_defaults_and_the_retired_redis_url(caplog):
    config = ChannelConfig.from_credentials({**VALID, "redis_url": "redis://127.0.0.1:6379/0"})
    assert (config.max_in_flight, config.turn_attempts, config.shutdown_deadline_seconds) == (200, 8, 20.0)
    assert "'redis_url' is no longer used" in caplog.text


def test_handoff_settings_and_their_defaults():
    off = ChannelConfig.from_credentials(VALID)
    assert (off.agent_token, off.handoff_webhook_url, off.resume_intent) == ("", "", None)
    assert (off.window_closing_lead_seconds, off.desk_backlog_limit) == (3600.0, 1000)
    on = ChannelConfig.from_credentials({
        **VALID, "agent_token": "agent-secret", "handoff_webhook_url": "https://desk.example.com/whatsapp",
        "window_closing_lead_minutes": 90, "desk_backlog_limit": 50, "resume_intent": "bot_is_back"})
    assert (on.agent_token, on.handoff_webhook_url) == ("agent-secret", "https://desk.example.com/whatsapp")
    assert (on.window_closing_lead_seconds, on.desk_backlog_limit, on.resume_intent) == (5400.0, 50, "bot_is_back")


def test_time_travel_is_refused_when_the_api_url_points_at_meta():
    with pytest.raises(ConfigError, match="simulator_clock_url.*points at Meta"):
        ChannelConfig.from_credentials({**VALID, "api_url": "https://graph.facebook.com",
                                        "simulator_clock_url": "http://127.0.0.1:5090"})
    with pytest.raises(ConfigError, match="simulator_clock_url"):
        no_api_url = {k: v for k, v in VALID.items() if k != "api_url"}  # Meta by default
        ChannelConfig.from_credentials({**no_api_url, "simulator_clock_url": "http://127.0.0.1:5090"})
