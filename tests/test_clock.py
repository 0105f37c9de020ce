"""Time travel: the channel's clock follows the simulator's, and Rasa's reminders follow its jumps
(a real simulator app and a real APScheduler, as Rasa runs them)."""

import asyncio
from datetime import datetime, timedelta, timezone

from aiohttp.test_utils import TestClient, TestServer
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from connector.clock import SimulatorClock
from connector.simulator import Settings, create_app

HOUR = 3600


async def test_a_jump_fires_the_reminders_it_skipped_and_keeps_the_distance_of_the_others():
    sim = TestClient(TestServer(create_app(Settings(
        access_token="t", phone_number_id="106540352242922", app_secret="s", display_phone_number="15550001234",
        bot_webhook_url="http://127.0.0.1:9/webhooks/whatsapp/webhook")), host="127.0.0.1"))
    await sim.start_server()
    scheduler = AsyncIOScheduler(event_loop=asyncio.get_running_loop())
    scheduler.start()
    fired = []
    start = datetime.now(timezone.utc)
    for name, hours in (("follow_up_25h", 25), ("follow_up_30h", 30), ("later_50h", 50)):
        scheduler.add_job(fired.append, "date", run_date=start + timedelta(hours=hours), args=[name], id=name)

    async def rasa_scheduler():
        return scheduler

    clock = SimulatorClock(str(sim.make_url("")), scheduler=rasa_scheduler)
    follower = asyncio.get_running_loop().create_task(clock.follow())
    try:
        await asyncio.sleep(0.1)  # the follower has seen the clock once
        assert (await (await sim.post("/_sim/clock", json={"advance": 25 * HOUR})).json())["offset"] == 25 * HOUR
        for _ in range(40):
            if fired:
                break
            await asyncio.sleep(0.1)
        assert fired == ["follow_up_25h"]  # due in the skipped interval: fired without a message handled
        later = scheduler.get_job("later_50h").next_run_time
        assert abs((later - start).total_seconds() - 25 * HOUR) < 5  # still 25 h after the new "now"

        await sim.post("/_sim/clock", json={"reset": True})  # back to now: the rest are due later again
        await asyncio.sleep(1.2)
        assert abs((scheduler.get_job("later_50h").next_run_time - start).total_seconds() - 50 * HOUR) < 5
        assert abs((scheduler.get_job("follow_up_30h").next_run_time - start).total_seconds() - 30 * HOUR) < 5
        assert await clock.now() - datetime.now(timezone.utc).timestamp() < 5
    finally:
        follower.cancel()
        scheduler.shutdown(wait=False)
        await clock.close()
        await sim.close()


async def test_an_unreachable_simulator_falls_back_to_the_system_clock_and_warns_once(caplog):
    async def no_scheduler():
        raise AssertionError("nothing to move")

    clock = SimulatorClock("http://127.0.0.1:9", scheduler=no_scheduler)
    try:
        for _ in range(3):
            assert abs(await clock.now() - datetime.now(timezone.utc).timestamp()) < 2
    finally:
        await clock.close()
    assert caplog.text.count("unreadable") == 1
