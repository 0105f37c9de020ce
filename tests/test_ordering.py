import asyncio

from connector.ordering import PerSenderQueue


async def test_one_senders_jobs_run_in_order_and_senders_run_concurrently():
    queue = PerSenderQueue()
    log = []
    release_a = asyncio.Event()

    def job(name, wait=None):
        async def run():
            if wait is not None:
                await wait.wait()
            log.append(name)
        return run

    queue.submit("a", job("a1", wait=release_a))
    queue.submit("a", job("a2"))
    queue.submit("b", job("b1"))
    await asyncio.sleep(0.01)
    assert log == ["b1"]  # b is not held up by a's slow first turn
    release_a.set()
    await queue.drain()
    assert log == ["b1", "a1", "a2"]
    assert queue.busy == 0


async def test_a_failing_job_is_logged_and_the_next_still_runs(caplog):
    queue = PerSenderQueue()
    log = []

    async def boom():
        raise RuntimeError("rasa exploded")

    async def after():
        log.append("after")

    queue.submit("a", boom)
    queue.submit("a", after)
    await queue.drain()
    assert log == ["after"]
    assert "background WhatsApp job failed" in caplog.text


async def test_drain_waits_for_jobs_submitted_while_draining():
    queue = PerSenderQueue()
    log = []

    async def first():
        await asyncio.sleep(0.01)
        queue.submit("b", second)
        log.append("first")

    async def second():
        log.append("second")

    queue.submit("a", first)
    await queue.drain()
    assert log == ["first", "second"]
