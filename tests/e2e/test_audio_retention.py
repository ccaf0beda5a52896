"""An hour of a voice session's audio through a real mitmdump keeping the whole history
(`gateway_websocket_history=all`, as mitmweb does, and saving it with `-w`) with the audio caps
on: its memory stays within the caps plus a fixed margin, and the bundle exported from the saved
flow holds the newest audio the caps kept (without the caps the process would hold the whole hour:
about 460 MB of base64 audio).

mitmdump rather than mitmweb: mitmweb sums the sizes of all a flow's messages on every message
(`flow_to_json`'s `messages_meta`), so an hour-long session's many messages cost it quadratic time, which
is mitmweb's and not what this test measures."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import wave
from pathlib import Path

import psutil
import pytest
import websockets
from mitmproxy import io

from ai_gateway.proxy.export import write_bundle
from ai_gateway_tools.harness import GatewayProcess
from ai_gateway_tools.simulators.realtime import SimulatorThread

from ..clients import websocket_base

CHUNK_MS = 1000  # appends and deltas of 1 s of 24 kHz PCM16 (clients send 20 ms to 1 s; the fewer, the faster the test)
CHUNK_BYTES = 48 * CHUNK_MS
SECONDS = 3600
RESPONSES = 60  # a minute of the model's audio each, answering a minute of the user's
CHUNKS_PER_TURN = SECONDS * 1000 // CHUNK_MS // RESPONSES
SESSION_MB, TOTAL_MB = 8, 12
# What mitmproxy and Python hold besides the kept audio: the flow's 7,200 messages stay listed
# (as placeholders, a few hundred bytes each), -w serialises the whole flow when it closes, and
# allocator slack. Measured: 37 MB grown in all with 12 MB of audio kept and 500 ms chunks (twice
# the messages; load average 9, two cores; 158 MB with 100 ms chunks); without the caps the hour's
# audio alone is about 460 MB.
MARGIN_MB = 60


def chunk(index: int) -> bytes:
    """The user's chunk number `index`: recognisable in the exported WAV."""
    return index.to_bytes(4, "little") * (CHUNK_BYTES // 4)


async def hour_of_audio(gateway_url: str) -> int:
    """A minute of the user's audio, then a minute of the model's, sixty times; returns the bytes heard."""
    heard = 0
    url = f"{websocket_base(gateway_url)}/v1/realtime?model=gpt-realtime"
    async with websockets.connect(url, compression=None, max_size=None) as ws:
        await ws.recv()
        for turn in range(RESPONSES):
            for index in range(turn * CHUNKS_PER_TURN, (turn + 1) * CHUNKS_PER_TURN):
                # base64 needs no escaping: json.dumps would only scan its 64 KB again, 3,600 times
                audio = base64.b64encode(chunk(index)).decode()
                await ws.send(f'{{"type": "input_audio_buffer.append", "audio": "{audio}"}}')
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            await ws.send(json.dumps({"type": "response.create"}))
            while (event := json.loads(await ws.recv()))["type"] != "response.done":
                if event["type"] == "response.output_audio.delta":
                    heard += len(base64.b64decode(event["delta"]))
    return heard


class PeakRss:
    """The process's resident memory, sampled every 50 ms in a thread until stopped."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self) -> None:
        while not self.stopped.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()


@pytest.mark.slow
def test_an_hour_of_audio_stays_within_the_caps_and_the_newest_is_exported(tmp_path: Path) -> None:
    saved = tmp_path / "session.mitm"
    options = {
        "gateway_websocket_history": "all",
        "gateway_audio_session_mb": str(SESSION_MB),
        "gateway_audio_total_mb": str(TOTAL_MB),
        "save_stream_file": str(saved),
    }
    with SimulatorThread(seed=25, audio_deltas=CHUNKS_PER_TURN, audio_bytes=CHUNK_BYTES, transcript_deltas=1) as sim:
        with GatewayProcess(sim.url, options=options) as gateway:
            assert gateway.process is not None
            with PeakRss(gateway.process.pid) as rss:
                baseline = rss.peak
                heard = asyncio.run(hour_of_audio(gateway.url))
    assert heard == SECONDS * 1000 // CHUNK_MS * CHUNK_BYTES  # an hour of the model's audio went through
    grown_mb = (rss.peak - baseline) / 2**20
    print(f"mitmdump: baseline {baseline / 2**20:.0f} MB, peak {rss.peak / 2**20:.0f} MB, grown {grown_mb:.0f} MB")
    assert grown_mb < TOTAL_MB + MARGIN_MB
    with saved.open("rb") as f:
        (flow,) = [f for f in io.FlowReader(f).stream() if f.websocket is not None]
    write_bundle(flow, tmp_path / "bundle", None)
    with wave.open(str(tmp_path / "bundle" / "user.wav"), "rb") as wav:
        user = wav.readframes(wav.getnframes())
    with wave.open(str(tmp_path / "bundle" / "model.wav"), "rb") as wav:
        model = wav.readframes(wav.getnframes())
    # The newest audio, within the session's cap (counted in base64 JSON messages: a bit over 4/3 of the audio).
    assert 0 < (len(user) + len(model)) * 4 / 3 <= SESSION_MB * 2**20
    last = SECONDS * 1000 // CHUNK_MS - 1
    kept = len(user) // CHUNK_BYTES
    assert kept > 0 and user == b"".join(chunk(index) for index in range(last - kept + 1, last + 1))
    assert len(model) % CHUNK_BYTES == 0 and len(model) > 0
