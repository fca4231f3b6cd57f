"""Starting an aiohttp server's listening site: started, or its runner cleaned up; the port it bound."""

from __future__ import annotations

from aiohttp import web


async def start_site(runner: web.AppRunner, site: web.BaseSite) -> int | None:
    """Start `site` of `runner`; the TCP port it bound (None for a unix socket). When it cannot start,
    the runner is cleaned up (its app, its other sites) and the error raised."""
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    return None
