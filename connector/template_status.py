"""Templates as Meta knows them at run time, shared by every instance through the care-window
state: synced from the business account at startup and then periodically, followed through
Meta's template webhooks and through sends Meta refused because it paused or disabled the
template. A template Meta will not send is not tried: the reply becomes the fallback template or
a recorded suppression with that reason, until Meta reinstates it.
"""

import asyncio
import logging
from typing import Any, Awaitable, Callable, Dict, Optional, Tuple

from connector.care_state import TemplateState
from connector.config import ChannelConfig
from connector.payloads import Notice
from connector.template_check import MetaTemplate, TemplateMismatch, check

logger = logging.getLogger(__name__)

NOT_SENT = ("PAUSED", "DISABLED", "REJECTED")
_STATUS_FIELD = "message_template_status_update"
_CATEGORY_FIELD = "template_category_update"


class MetaTemplates:
    def __init__(self, config: ChannelConfig, client: Any, state: Callable[[], Any],
                 now: Callable[[], Awaitable[float]]) -> None:
        self.config = config
        self.client = client
        self.state = state
        self.now = now
        self._task: Optional["asyncio.Task[None]"] = None

    @property
    def enabled(self) -> bool:
        return bool(self.config.whatsapp_business_account_id)

    async def start(self) -> None:
        """The first sync checks the mapping: one that cannot work stops the server
        (`TemplateMismatch`); Meta unreachable is logged and never blocks startup."""
        if not self.enabled:
            logger.info("The templates mapping is not checked against Meta's templates: set "
                        "whatsapp_business_account_id in the channel's credentials to have it checked and followed")
            return
        await self.sync(startup=True)
        self._task = asyncio.get_running_loop().create_task(self._sync_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.template_sync_seconds)
            await self.sync()

    async def sync(self, startup: bool = False) -> bool:
        """Meta's templates into the shared state; a failed read keeps the last good copy."""
        try:
            raw = await self.client.message_templates(self.config.whatsapp_business_account_id)
        except Exception as error:  # Graph down, no permission, a timeout
            logger.warning("Meta's templates could not be read (%s: %s): %s", type(error).__name__, error,
                           "the templates mapping is not checked" if startup else "the last copy stays in use")
            return False
        catalog = [MetaTemplate.from_graph(t) for t in raw]
        result = check(self.config.templates, catalog)
        for warning in result.warnings:
            logger.warning("WhatsApp channel setting %s (credentials.yml)", warning)
        if result.errors:
            message = ("WhatsApp channel setting " + "; ".join(result.errors)
                       + " (credentials.yml, checked against Meta's templates)")
            if startup:
                raise TemplateMismatch(message)
            logger.error("%s", message)
        now = await self.now()
        state = self.state()
        for template in catalog:
            await state.update_template(TemplateState(template.name, template.language, template.status,
                                                      template.category, now))
        logger.info("Meta's %d template(s) synced; the templates mapping %s", len(catalog),
                    "matches them" if not result.errors else "does not match them")
        return True

    async def on_notice(self, notice: Notice) -> None:
        """Meta's template webhooks: paused, disabled, reinstated, re-categorised."""
        if notice.field not in (_STATUS_FIELD, _CATEGORY_FIELD):
            return
        detail = notice.detail
        name = detail.get("message_template_name")
        language = detail.get("message_template_language")
        if not isinstance(name, str) or not isinstance(language, str):
            logger.warning("Template webhook %s without a template name and language: %s", notice.field, dict(detail))
            return
        at = float(notice.time) if notice.time else await self.now()
        if notice.field == _STATUS_FIELD:
            status = str(detail.get("event") or "").upper()
            stored = await self.state().update_template(TemplateState(name, language, status, "", at), category=False)
            logger.warning("Meta says template %s (%s) is %s%s", name, language, status,
                           f": {detail.get('reason')}" if detail.get("reason") not in (None, "NONE") else "")
        else:
            category = str(detail.get("new_category") or "").upper()
            stored = await self.state().update_template(TemplateState(name, language, "", category, at), status=False)
            logger.warning("Meta moved template %s (%s) to category %s", name, language, category)
        if not stored:
            logger.info("Template webhook for %s (%s) is older than what is known: kept", name, language)

    async def refused(self, name: str, language: str, status: str) -> None:
        """Meta refused a send because it paused or disabled the template (132015, 132016)."""
        await self.state().update_template(TemplateState(name, language, status, "", await self.now()), category=False)
        logger.warning("Template %s (%s) is %s at Meta: not sent until Meta reinstates it", name, language, status)

    async def known(self) -> Dict[Tuple[str, str], TemplateState]:
        """What Meta last said of each template, by (name, language)."""
        return {(t.name, t.language): t for t in await self.state().templates()}
