"""Background tasks that never die silently.

Every long-running loop of the service (scrapers, the snapshot ticker, discovery) runs under
:func:`supervised`: an unexpected exception is logged with its traceback, counted in
``extproc_task_errors_total{task}``, and the loop is restarted after a short backoff. Only
cancellation (shutdown, a backend leaving the pool) ends it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = 0.2
MAX_RESTART_BACKOFF_S = 5.0


async def supervised(
    name: str,
    body: Callable[[], Awaitable[None]],
    on_error: Callable[[str], None],
    *,
    keep_going: Callable[[], bool] = lambda: True,
    backoff: float = RESTART_BACKOFF_S,
) -> None:
    """Run ``body()`` until it returns normally or ``keep_going()`` turns false."""
    delay = backoff
    while keep_going():
        try:
            await body()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background task %s failed; restarting in %.1f s", name, delay)
            on_error(name)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RESTART_BACKOFF_S)


def spawn(
    name: str,
    body: Callable[[], Awaitable[None]],
    on_error: Callable[[str], None],
    *,
    keep_going: Callable[[], bool] = lambda: True,
) -> asyncio.Task[None]:
    return asyncio.create_task(supervised(name, body, on_error, keep_going=keep_going), name=name)
