"""Driving calls on an enterprise's Asterisk: smart-redirect moves and click-to-call originates.

``CallControl`` turns a decision into a background job of ``AsteriskControl`` (bounded overall and
per enterprise, drained when it closes), so the HTTP answer never waits for SSH; each job's outcome
goes to the ``integration_logs`` journal.
"""

from __future__ import annotations

import logging
from typing import Any

from retailcrm_service.storage.journal import IntegrationLogWriter
from retailcrm_service.telephony.asterisk_ssh import (
    AsteriskControl,
    AsteriskError,
    InvalidArgument,
    validate_extension,
)
from retailcrm_service.telephony.smart_redirect import Decision

logger = logging.getLogger(__name__)


class CallControl:
    """Schedules redirects and originates on ``asterisk``; journals what happened."""

    def __init__(self, *, asterisk: AsteriskControl, journal: IntegrationLogWriter) -> None:
        self.asterisk = asterisk
        self._journal = journal

    def schedule_redirect(
        self, decision: Decision, channel: str | None, call_unique_id: str | None
    ) -> bool:
        """Move ``channel`` to the decided manager's extension in the background; False if not."""
        if not (
            channel
            and decision.redirect_channel
            and decision.extension
            and decision.host
            and decision.enterprise_number
        ):
            return False
        try:
            validate_extension(decision.extension)
        except InvalidArgument:
            return False
        job = self._redirect(
            decision.enterprise_number,
            decision.host,
            channel,
            decision.extension,
            decision.redirect_context,
            decision.manager_id,
            call_unique_id,
        )
        return self.asterisk.spawn(
            job, name="smart-redirect", enterprise=decision.enterprise_number
        )

    def start_call(self, enterprise_number: str, host: str, extension: str, phone: str) -> bool:
        """Click-to-call in the background: ring ``extension``, then dial ``phone``."""
        job = self._originate(enterprise_number, host, extension, phone)
        return self.asterisk.spawn(job, name="click-to-call", enterprise=enterprise_number)

    async def _redirect(
        self,
        enterprise_number: str,
        host: str,
        channel: str,
        extension: str,
        context: str | None,
        manager_id: int | None,
        call_unique_id: str | None,
    ) -> None:
        request = {
            "channel": channel,
            "extension": extension,
            "context": context,
            "manager_id": manager_id,
        }
        try:
            result = await self.asterisk.redirect(host, channel, extension, context=context)
        except AsteriskError as exc:
            logger.warning(
                "call_control.redirect_failed enterprise=%s error=%s",
                enterprise_number,
                type(exc).__name__,
            )
            self._failed(enterprise_number, "channel_redirect", request, exc, call_unique_id)
            return
        self._journal.write(
            enterprise_number,
            "channel_redirect",
            request_data=request,
            response_data={
                "output": result.stdout.strip()[:500],
                "elapsed_ms": result.elapsed * 1000,
            },
            status="success",
            call_unique_id=call_unique_id,
        )

    async def _originate(
        self, enterprise_number: str, host: str, extension: str, phone: str
    ) -> None:
        request = {"extension": extension, "phone": phone}
        try:
            result = await self.asterisk.originate(host, extension, phone)
        except AsteriskError as exc:
            logger.warning(
                "call_control.originate_failed enterprise=%s error=%s",
                enterprise_number,
                type(exc).__name__,
            )
            self._failed(enterprise_number, "click_to_call", request, exc, None)
            return
        self._journal.write(
            enterprise_number,
            "click_to_call",
            request_data=request,
            response_data={"elapsed_ms": round(result.elapsed * 1000)},
            status="success",
        )

    def _failed(
        self,
        enterprise_number: str,
        event: str,
        request: dict[str, Any],
        exc: AsteriskError,
        call_unique_id: str | None,
    ) -> None:
        self._journal.write(
            enterprise_number,
            event,
            request_data=request,
            response_data=None,
            status="error",
            error_message=f"{type(exc).__name__}: {exc}",
            call_unique_id=call_unique_id,
        )
