"""mitmweb in a real browser: session totals updated live in the flow list, the "OpenAI Realtime" view on
messages, Realtime and Gemini Live sessions read as conversations.

The other tests prove what the addon does to flows; only a browser proves what a developer sees in
mitmweb. Debian's Chromium is the browser, driven by Playwright: test tools cannot download browser
builds of their own here, and a missing Chromium is installed by scripts/install-browser. The
browser and the openai SDK share one event loop, so the test can look at the page between two
responses of the session. `UPDATE_SCREENSHOT=1` refreshes docs/mitmweb.png with the page it ends on.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from pathlib import Path

import pytest
from openai import AsyncOpenAI

from ai_gateway_tools.debug import TRUNCATED_MS, VOICE_SIMULATOR, drive_voice_session, mitmweb, web_url
from ai_gateway_tools.harness import free_port
from ai_gateway_tools.simulators.gemini_live import USER_TRANSCRIPT, GeminiLiveSimulator
from ai_gateway_tools.simulators.realtime import SimulatorThread, resolve_model

from ..clients import RESPONSE_DONE, websocket_base
from . import test_gemini_conversation_e2e as gemini
from .test_gemini_live_e2e import LiveGateway

pytest.importorskip("playwright", reason="playwright is not installed (the test extra has it)")
from playwright.async_api import Locator, Page, ViewportSize, async_playwright, expect  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
INSTALL_BROWSER = ROOT / "scripts" / "install-browser"
SCREENSHOT = ROOT / "docs" / "mitmweb.png"
# Without these, Chromium's own background connections are refused by a closed network and slow it down;
# Playwright adds --headless and a fresh temporary --user-data-dir itself.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
# Wide enough for the whole session comment beside the messages, tall enough for a response's deltas
# and its response.done with the usage table, in one screenshot.
VIEWPORT: ViewportSize = {"width": 1920, "height": 1560}
UI_TIMEOUT_MS = 15_000
MODEL = "gpt-realtime"
RESPONSES = 3
AUDIO_DELTAS = 2  # per response; few, so that a whole response fits the screenshot
AUDIO_PLACEHOLDER = "<audio pcm16 24 kHz:"
USAGE_BANNER = "══ usage: response.done, completed ══"
MESSAGES_CONTENT = re.compile(r"/flows/[^/]+/messages/content/[^/]+\.json")
RESPONSE_CONTENT = re.compile(r"/flows/[^/]+/response/content/[^/]+\.json")

expect.set_options(timeout=UI_TIMEOUT_MS)


@pytest.fixture(scope="module")
def chromium() -> Path:
    """Debian's Chromium, installed on first use; the test is skipped only where it cannot be installed."""
    if not CHROMIUM.exists():
        result = subprocess.run([INSTALL_BROWSER], capture_output=True, text=True, check=False)
        if not CHROMIUM.exists():
            detail = result.stderr.strip() or f"exit code {result.returncode}"
            pytest.skip(f"no Chromium at {CHROMIUM}, and scripts/install-browser could not install it: {detail}")
    return CHROMIUM


@pytest.mark.slow
def test_mitmweb_shows_live_session_totals_and_the_realtime_view(chromium: Path, tmp_path: Path) -> None:
    with (
        SimulatorThread(seed=20261124, audio_deltas=AUDIO_DELTAS, transcript_deltas=1) as simulator,
        mitmweb(simulator.url, web_port=free_port()) as gateway,
    ):
        asyncio.run(watch_session(chromium, web_url(gateway), gateway.url, tmp_path / "mitmweb.png"))


async def watch_session(chromium: Path, ui_url: str, gateway_url: str, screenshot_path: Path) -> None:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = await browser.new_page(viewport=VIEWPORT)
        page.set_default_timeout(UI_TIMEOUT_MS)
        await page.goto(ui_url)
        # Connected before the session starts: whatever the flow list shows next came as a live update.
        await expect(page.locator(".connection-indicator.established")).to_be_attached()
        row = page.locator(".flow-table tbody tr", has_text="/v1/realtime")
        await drive_session(gateway_url, row.locator("td.col-comment"))
        await row.click()
        focus = await check_messages(page)
        await screenshot(page, focus, screenshot_path)
        await browser.close()


async def drive_session(gateway_url: str, comment: Locator) -> None:
    """A session with the openai SDK; after each response.done the comment must show the new total."""
    client = AsyncOpenAI(api_key="sk-client-own-key", websocket_base_url=websocket_base(gateway_url) + "/v1")
    async with client.realtime.connect(model=MODEL) as connection:
        for n in range(1, RESPONSES + 1):
            await connection.response.create()
            async for event in connection:
                if event.type == RESPONSE_DONE:
                    break
            await expect(comment).to_contain_text(re.compile(rf"^{n} responses? · input "))
    await expect(comment).to_contain_text(resolve_model(MODEL))


async def check_messages(page: Page) -> Locator:
    """Every message rendered by the gateway's view, chosen automatically; returns the first response.done."""
    async with page.expect_response(MESSAGES_CONTENT) as messages_response:
        await page.locator(".nav-tabs a", has_text="WebSocket").click()
    views = {message["view_name"] for message in await (await messages_response.value).json()}
    assert views == {"OpenAI Realtime"}, "mitmweb's automatic view is not the gateway's"
    messages = page.locator(".websocket pre")
    await expect(messages.filter(has_text=AUDIO_PLACEHOLDER)).to_have_count(RESPONSES * AUDIO_DELTAS)
    done = messages.filter(has_text=USAGE_BANNER)
    await expect(done).to_have_count(RESPONSES)
    return done.first


async def screenshot(page: Page, focus: Locator, path: Path) -> None:
    """The page with the whole session comment in view and `focus` at the bottom of the message pane.

    mitmweb gives the comment column 150 pixels and the flow list half the window; the test fits the
    columns to their content and widens the list to them as a user would (double-clicks on column
    edges, a drag of the splitter). `focus` at the bottom shows the messages that led to it above it.
    """
    for column in ("path", "comment"):
        await page.locator(f"th.col-{column} .col-resize-handle").dblclick()
    columns_width = await page.locator(".flow-table th:not(.col-filler)").evaluate_all(
        "columns => columns.reduce((width, column) => width + column.offsetWidth, 0)"
    )
    await drag_splitter(page, to_x=columns_width)
    await focus.evaluate("element => element.scrollIntoView({block: 'end'})")
    await page.screenshot(path=path, full_page=True)
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        SCREENSHOT.write_bytes(path.read_bytes())


async def drag_splitter(page: Page, to_x: float) -> None:
    box = await page.locator(".splitter").bounding_box()
    assert box is not None, "no splitter: the flow details are not open"
    y = box["y"] + box["height"] / 2
    await page.mouse.move(box["x"] + box["width"] / 2, y)
    await page.mouse.down()
    await page.mouse.move(to_x + box["width"] / 2, y, steps=5)
    await page.mouse.up()


CONVERSATION_SCREENSHOT = ROOT / "docs" / "mitmweb-conversation.png"
CONVERSATION_VIEWPORT: ViewportSize = {"width": 1600, "height": 960}  # the conversation, without a blank half
TRANSCRIPT = "Hello from the simulated upstream"  # what the simulator transcribes and says


@pytest.mark.slow
def test_mitmweb_shows_a_voice_session_as_a_conversation(chromium: Path, tmp_path: Path) -> None:
    """Voice turns, a barge-in (cancel and truncate) and a tool call, read in the "Realtime conversation"
    view of the handshake's response, each answer's cost and latency under it and under its response.done."""
    with (
        SimulatorThread(seed=20261207, **VOICE_SIMULATOR) as simulator,
        mitmweb(simulator.url, web_port=free_port()) as gateway,
    ):
        asyncio.run(read_conversation(chromium, web_url(gateway), gateway.url, tmp_path / "conversation.png"))


async def read_conversation(chromium: Path, ui_url: str, gateway_url: str, screenshot_path: Path) -> None:
    await drive_voice_session(gateway_url)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = await browser.new_page(viewport=CONVERSATION_VIEWPORT)
        page.set_default_timeout(UI_TIMEOUT_MS)
        await page.goto(ui_url)
        await page.locator(".flow-table tbody tr", has_text="/v1/realtime").click()
        await page.locator(".nav-tabs a", has_text="WebSocket").click()
        # mitmweb renders each line as an element: the banner and the line under it read as one text.
        turn = page.locator(".websocket pre").filter(has_text="══ usage: turn ══")
        summary = re.compile(
            r"══ usage: turn ══\s*completed · [\d,]+ tokens .* · \$\d+\.\d{4} · TTFT \d+ ms · voice turn"
        )
        await expect(turn.first).to_contain_text(summary)
        # The 101's body is empty ("No content" above the view): the automatic view is still asked, and is ours.
        async with page.expect_response(RESPONSE_CONTENT) as shown:
            await page.locator(".nav-tabs a", has_text="Response").click()
        assert (await (await shown.value).json())["view_name"] == "Realtime conversation"
        text = page.locator(".contentview pre")
        await expect(text).to_contain_text(re.compile(r"══ conversation: \d+ turns ══"))
        await expect(text).to_contain_text(f"user (voice): {TRANSCRIPT}")
        await expect(text).to_contain_text(f"assistant: {TRANSCRIPT}")
        await expect(text).to_contain_text(re.compile(r"completed · [\d,]+ tokens .* · \$\d+\.\d{4} · TTFT \d+ ms"))
        for shown in (
            "! interrupted: the user spoke",
            "! cancelled by the client",
            f"! truncated at {TRUNCATED_MS} ms of audio (what the user heard)",
            '→ calls get_weather({"city": "Paris", "unit": "celsius"})',
            "tool result call_",
            "cancelled · ",
            "assistant: (cut before any transcript)",
        ):
            await expect(text).to_contain_text(shown)
        await drag_splitter(page, to_x=CONVERSATION_VIEWPORT["width"] * 0.3)
        await page.screenshot(path=screenshot_path, full_page=True)
        if os.environ.get("UPDATE_SCREENSHOT") == "1":
            CONVERSATION_SCREENSHOT.write_bytes(screenshot_path.read_bytes())
        await browser.close()


@pytest.mark.slow
def test_mitmweb_shows_a_gemini_live_session_as_a_conversation(chromium: Path, tmp_path: Path) -> None:
    """A google-genai session (spoken, typed, a function call, a barge-in) read in the "Realtime
    conversation" view of its handshake, and each turn's tokens and cost under its turnComplete."""
    args = ["--web-port", str(free_port()), "--no-web-open-browser"]
    with (
        SimulatorThread(server=GeminiLiveSimulator(seed=20261207)) as simulator,
        LiveGateway(simulator.url, tmp_path / "confdir", tool="mitmweb", args=args) as gateway,
    ):
        asyncio.run(gemini.session(gateway))
        asyncio.run(read_gemini_conversation(chromium, web_url(gateway)))


async def read_gemini_conversation(chromium: Path, ui_url: str) -> None:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = await browser.new_page(viewport=CONVERSATION_VIEWPORT)
        page.set_default_timeout(UI_TIMEOUT_MS)
        await page.goto(ui_url)
        await page.locator(".flow-table tbody tr", has_text="BidiGenerateContent").click()
        async with page.expect_response(MESSAGES_CONTENT) as messages_response:
            await page.locator(".nav-tabs a", has_text="WebSocket").click()
        views = {message["view_name"] for message in await (await messages_response.value).json()}
        assert views == {"Gemini Live"}, "mitmweb's automatic view of Gemini Live messages is not the gateway's"
        turn = page.locator(".websocket pre").filter(has_text="══ usage: turn ══")
        await expect(turn).to_have_count(3)
        await expect(turn.first).to_contain_text(
            re.compile(r"completed · [\d,]+ tokens .* · \$\d+\.\d{4} · TTFT \d+ ms")
        )
        await expect(page.locator(".websocket pre").filter(has_text="<audio audio/pcm;rate=24000: ")).not_to_have_count(
            0
        )
        async with page.expect_response(RESPONSE_CONTENT) as shown:
            await page.locator(".nav-tabs a", has_text="Response").click()
        assert (await (await shown.value).json())["view_name"] == "Realtime conversation"
        text = page.locator(".contentview pre")
        for said in (
            "══ conversation: 9 turns ══",
            f"user (voice): {USER_TRANSCRIPT}",
            f"assistant: {gemini.SPOKEN}",
            f"user: {gemini.TYPED}",
            '→ calls get_weather({"city": "Paris", "unit": "celsius"}) fc_1',
            'tool result fc_1: {"temperature": 18}',
            "! interrupted: the user spoke",
        ):
            await expect(text).to_contain_text(said)
        await expect(text).to_contain_text(re.compile(r"cancelled · [\d,]+ tokens .* · \$\d+\.\d{4} · TTFT \d+ ms"))
        await browser.close()
