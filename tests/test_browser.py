"""The demo page at ``/``, in a real headless Chromium: subscribe and publish by typing,
messages live with their latency, and a gateway restart survived with nothing lost."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from publisher import Publisher
from publisher.history import HistoryPolicy
from tests.browser import Browser, Page
from tests.harness import GatewayFactory, GatewayProcess, RedisServer

DEMO = {
    "GATEWAY_DEMO_PAGE": "on",
    "GATEWAY_HISTORY_CHANNELS": "demo.*",
    "GATEWAY_ANONYMOUS_PUBLISH": "demo.*",
    "GATEWAY_PRESENCE_CHANNELS": "demo.*",
    "GATEWAY_JOIN_LEAVE_CHANNELS": "demo.*",
    "GATEWAY_DELTA_CHANNELS": "demo.*",
}
PRESENT = "document.querySelector('#presence li[data-channel=\"demo.room\"]')?.dataset.count"


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    browser = Browser(tmp_path).start()
    yield browser
    await browser.close()


async def type_and_submit(page: Page, fields: dict[str, str], form: str) -> None:
    for element, value in fields.items():
        await page.evaluate(f"document.getElementById({element!r}).value = {json.dumps(value)}")
    await page.evaluate(f"document.getElementById({form!r}).requestSubmit()")


ROWS = """[...document.querySelectorAll('#messages tr')].reverse().map(r => ({
    channel: r.cells[1].textContent, offset: r.cells[2].textContent,
    latency: r.cells[3].textContent, data: JSON.parse(r.cells[4].textContent)}))"""


async def subscribed_page(browser: Browser, gateway: GatewayProcess, channel: str) -> Page:
    page = await browser.open(gateway.http_url + "/")
    await page.wait_for("document.getElementById('status').textContent === 'connected'")
    await type_and_submit(page, {"channel": channel}, "subscribe-form")
    await page.wait_for(
        "[...document.querySelectorAll('#channels span')].some("
        f"t => t.dataset.state === 'subscribed' && t.firstChild.textContent === {channel!r})"
    )
    return page


async def notices(page: Page, channel: str) -> list[str]:
    """The page's notices, newest first, but for its own join of ``channel``: whether that
    one shows depends on whether the join frame or the presence read came first."""
    listed = await page.evaluate(
        "[...document.getElementById('notices').children].map(item => item.textContent)"
    )
    return [text for text in listed if f"joined {channel}" not in text]


async def test_the_embedded_gateway_is_usable_with_nothing_but_a_browser(
    browser: Browser, gateway_factory: GatewayFactory
) -> None:
    gateway = gateway_factory({**DEMO, "GATEWAY_DEMO_PAGE": "auto"})  # on: no Redis
    page = await subscribed_page(browser, gateway, "demo.chat")
    assert await notices(page, "demo.chat") == []  # subscribing raised nothing
    await type_and_submit(page, {"pub-data": '{"text": "hello from the page"}'}, "publish-form")
    rows = await page.wait_for(f"({ROWS}).length === 1 && {ROWS}")
    assert rows[0]["channel"] == "demo.chat"
    assert rows[0]["offset"] == "1"
    assert rows[0]["data"] == {"text": "hello from the page"}
    assert rows[0]["latency"].endswith(" ms") and int(rows[0]["latency"].split()[0]) < 5000
    # Outside what the configuration allows, the page shows the refusal.
    await type_and_submit(page, {"pub-channel": "other", "pub-data": "1"}, "publish-form")
    await page.wait_for("document.getElementById('notices').textContent.includes('refused')")
    notice = await page.evaluate("document.getElementById('notices').textContent")
    assert "publish other refused: forbidden" in notice
    # The refusal did not hide the earlier notice: the last few are listed, newest first.
    listed = await notices(page, "demo.chat")
    assert len(listed) == 2 and "refused" in listed[0] and listed[1].endswith("published")
    # The page says what it is, where it may publish, what its columns mean, where the docs are.
    about = await page.evaluate("document.getElementById('about').textContent")
    for words in ("demo.*", "offset", "latency", "docs/protocol.md"):
        assert words in about, words


async def test_the_page_shows_who_is_on_a_demo_channel_and_who_comes_and_goes(
    browser: Browser, redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    env = {**DEMO, "GATEWAY_REDIS_URL": redis_server.url}
    first, second = gateway_factory(env), gateway_factory(env)  # two tabs, two replicas
    here = await subscribed_page(browser, first, "demo.room")
    await here.wait_for(f"{PRESENT} === '1'")
    there = await subscribed_page(browser, second, "demo.room")
    await there.wait_for(f"{PRESENT} === '2'")  # read at subscribe: itself and the first
    await here.wait_for(f"{PRESENT} === '2'")  # told by the join frame
    assert "joined demo.room" in await here.evaluate(
        "document.getElementById('notices').textContent"
    )
    await there.call("Page.close")  # the tab is closed
    await here.wait_for(f"{PRESENT} === '1'")
    assert "left demo.room" in await here.evaluate("document.getElementById('notices').textContent")


async def test_the_page_survives_a_gateway_restart_and_shows_what_it_missed(
    browser: Browser, redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    gateway = gateway_factory({**DEMO, "GATEWAY_REDIS_URL": redis_server.url})
    page = await subscribed_page(browser, gateway, "demo.feed")
    with Publisher(redis_server.url, history=HistoryPolicy(("demo.*",))) as publisher:
        publisher.publish("demo.feed", {"n": 1})
        await page.wait_for(f"({ROWS}).length === 1")

        gateway.stop()  # SIGTERM: the page sees 1001 and starts its backoff
        await page.wait_for("document.getElementById('status').textContent !== 'connected'")
        for n in (2, 3, 4):  # published while the page has no gateway
            publisher.publish("demo.feed", {"n": n})
        gateway.start()  # same port, as a restarted pod behind the same Service

        await page.wait_for("document.getElementById('status').textContent === 'connected'")
        await page.wait_for(f"({ROWS}).length === 4", timeout=20)
        notice = await page.evaluate("document.getElementById('notices').textContent")
        assert "resumed demo.feed: nothing lost" in notice
        # Live again (the page asks for deltas): 5 as its full text (the first message after
        # the reply's offset, even while the replica catches up), then 6, 7 and 8 as Fossil
        # deltas that the page applies.
        for n in (5, 6, 7, 8):
            publisher.publish("demo.feed", {"n": n, "text": "the same long text " * 20})
        rows = await page.wait_for(f"({ROWS}).length === 8 && {ROWS}")
        assert await page.evaluate("document.body.dataset.deltas") == "3"
    assert [row["data"]["n"] for row in rows] == list(range(1, 9))
    assert rows[-1]["data"]["text"] == "the same long text " * 20
    assert [row["offset"] for row in rows] == [str(n) for n in range(1, 9)]


def test_the_page_is_served_with_strict_headers_and_only_where_enabled(
    redis_server: RedisServer, gateway_factory: GatewayFactory
) -> None:
    embedded = gateway_factory({})
    status, body = embedded.http("/")
    assert status == 200 and "<title>wsgateway demo</title>" in body
    assert embedded.http("/demo.js")[0] == 200
    with_redis = gateway_factory({"GATEWAY_REDIS_URL": redis_server.url})  # auto: off
    assert with_redis.http("/")[0] == 404
    assert gateway_factory({"GATEWAY_DEMO_PAGE": "off"}).http("/demo.js")[0] == 404
    with urllib.request.urlopen(embedded.http_url + "/", timeout=5) as response:
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        assert "script-src 'self'" in response.headers["Content-Security-Policy"]
        assert response.headers["X-Content-Type-Options"] == "nosniff"
