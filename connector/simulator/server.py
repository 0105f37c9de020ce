"""App factory: wires settings, templates, state and both APIs into one aiohttp application."""

from __future__ import annotations

import logging
from typing import AsyncIterator, Optional

from aiohttp import web

from . import cloud_api, control_api, page
from .core import SIM, Simulator
from .persist import PERSISTER, Persister
from .settings import Settings
from .state import Clock, SimState
from .templates import TemplateRegistry

log = logging.getLogger("connector.simulator")


def create_app(settings: Settings, *, clock: Optional[Clock] = None) -> web.Application:
    """A ready-to-run simulator app; the webhook session opens and closes with the app."""
    registry = TemplateRegistry.load(settings.templates_path)
    simulator = Simulator(settings, registry, SimState(settings, clock))
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app[SIM] = simulator

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await simulator.start()
        log.info(
            "simulating phone numbers %s; bot webhook %s; window errors %s; statuses %s; redelivery after %s s",
            ", ".join(f"{n} ({settings.display_number(n)})" for n in settings.business_numbers),
            settings.bot_webhook_url, settings.window_errors, ",".join(settings.statuses) or "none",
            ",".join(f"{d:g}" for d in settings.redeliver_delays) or "never",
        )
        yield
        await simulator.close()

    if settings.state_file is not None:
        persister = app[PERSISTER] = Persister(settings.state_file, simulator.state)

        async def persistence(app: web.Application) -> AsyncIterator[None]:
            persister.load()  # before the simulator starts: nothing has been played yet
            persister.start()
            yield
            await persister.close()  # after `lifecycle` (cleanups run in reverse): the last change is in

        app.cleanup_ctx.append(persistence)
    app.cleanup_ctx.append(lifecycle)
    cloud_api.add_routes(app)
    control_api.add_routes(app)
    page.add_routes(app)
    return app
