"""The end user's side of a voice session: a mouth that speaks into the room and ears that
transcribe the agent, both offline (espeak-ng and pocketsphinx, as the agent uses).

Used by ``autonomite chat --voice``, the voice tests and the voice benchmark: what they
hear is real LiveKit audio, through the same SFU a phone or browser would use.

Both run on the caller's event loop. The mouth keeps its track fed with 10 ms frames
(silence between lines, as a real microphone sends), so the agent's VAD hears each line
end. The ears cut the agent's audio into utterances by energy and decode each one in a
thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from livekit import rtc

from agent.offline_voice import TTS_RATE, Recognizer, speak

FRAME_MS = 10
VOICED_RMS = 300  # int16 RMS above this is speech (espeak-ng speaks at ~3000, silence is 0)
UTTERANCE_GAP_S = 0.6  # unvoiced this long ends an utterance (espeak-ng pauses ~0.3 s at commas)


class Mouth:
    """A microphone track: silence until :meth:`say` gives it a line."""

    def __init__(self) -> None:
        self.source = rtc.AudioSource(TTS_RATE, 1)
        self._lines: asyncio.Queue[tuple[bytes, asyncio.Future[Any]]] = asyncio.Queue()
        self._pump: asyncio.Task[Any] | None = None

    async def publish(self, room: rtc.Room) -> None:
        track = rtc.LocalAudioTrack.create_audio_track("microphone", self.source)
        options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        await room.local_participant.publish_track(track, options)
        self._pump = asyncio.create_task(self._run())

    async def say(self, *texts: str, pause_s: float = 0.0) -> float:
        """Speak ``texts`` one after another, ``pause_s`` of silence between them (a caller
        who pauses mid-thought); return the moment (perf_counter) the last sample played out."""
        gap = bytes(int(TTS_RATE * pause_s) * 2)
        parts = []
        for text in texts:
            async with contextlib.aclosing(speak(text)) as speech:
                parts.append(b"".join([chunk async for chunk in speech]))
        pcm = gap.join(parts)
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._lines.put((pcm, done))
        played: float = await done
        return played

    async def close(self) -> None:
        if self._pump is not None:  # ended before the source closes: no frame goes to a closed source
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
        await self.source.aclose()

    async def _run(self) -> None:
        samples = TTS_RATE * FRAME_MS // 1000
        silence = bytes(samples * 2)
        while True:
            if self._lines.empty():
                await self._frame(silence, samples)
                continue
            pcm, done = self._lines.get_nowait()
            for start in range(0, len(pcm), samples * 2):
                chunk = pcm[start:start + samples * 2]
                await self._frame(chunk + bytes(samples * 2 - len(chunk)), samples)
            await self.source.wait_for_playout()
            if not done.done():  # its caller may have given up waiting: the pump goes on
                done.set_result(time.perf_counter())

    async def _frame(self, data: bytes, samples: int) -> None:
        # capture_frame waits while the source's buffer is full: this paces the pump in real time.
        await self.source.capture_frame(rtc.AudioFrame(data, TTS_RATE, 1, samples))


@dataclass(frozen=True)
class Heard:
    started: float  # perf_counter of the utterance's first voiced frame
    text: str


class Ears:
    """Transcribes every agent audio track in the room, utterance by utterance.

    Create before ``connect()``, so the greeting is not missed."""

    def __init__(self, room: rtc.Room, recognizer: Recognizer) -> None:
        self.heard: asyncio.Queue[Heard] = asyncio.Queue()
        self.first_audio: asyncio.Queue[float] = asyncio.Queue()  # each utterance's start, as it starts
        self._recognizer = recognizer
        self._tasks: set[asyncio.Task[Any]] = set()

        @room.on("track_subscribed")
        def _on_track(track: rtc.Track, _pub: rtc.RemoteTrackPublication, who: rtc.RemoteParticipant) -> None:
            if track.kind == rtc.TrackKind.KIND_AUDIO and who.identity.startswith("agent-"):
                task = asyncio.ensure_future(self._listen(track))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _listen(self, track: rtc.Track) -> None:
        stream = rtc.AudioStream(track, sample_rate=16_000, num_channels=1)
        frames = aiter(stream)
        voiced: list[rtc.AudioFrame] = []
        started = quiet_since = 0.0
        try:
            while True:
                try:  # a track may send nothing between utterances: that is silence too
                    frame = (await asyncio.wait_for(anext(frames), UTTERANCE_GAP_S)).frame
                except TimeoutError:
                    frame = None
                except StopAsyncIteration:
                    return
                now = time.perf_counter()
                loud = frame is not None and _rms(frame) > VOICED_RMS
                if loud:
                    if not voiced:
                        started = now
                        self.first_audio.put_nowait(now)
                    quiet_since = 0.0
                elif not quiet_since:
                    quiet_since = now
                if voiced or loud:
                    if frame is not None:
                        voiced.append(frame)
                    if not loud and now - quiet_since >= UTTERANCE_GAP_S:
                        text = await asyncio.to_thread(self._recognizer.transcribe, voiced)
                        self.heard.put_nowait(Heard(started, text))
                        voiced = []
        finally:
            await stream.aclose()

    async def answer(self, timeout: float = 30.0, gap_s: float = 2.0) -> list[str]:
        """The agent's next answer, utterance by utterance: the first within ``timeout``,
        then each one after it until none is heard for ``gap_s`` (an utterance is heard
        once it ends, so ``gap_s`` must outlast the longest one expected)."""
        heard = [(await asyncio.wait_for(self.heard.get(), timeout)).text]
        while True:
            try:
                heard.append((await asyncio.wait_for(self.heard.get(), gap_s)).text)
            except TimeoutError:
                return heard

    async def close(self) -> None:
        """Stop listening, and wait until every audio stream is closed (before the room goes)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def caller(url: str, token: str, recognizer: Recognizer,
                 room: rtc.Room | None = None) -> AsyncIterator[tuple[Ears, Mouth]]:
    """A caller in the room: ears on the agent's audio (listening before the join, so the
    greeting is heard) and a published microphone; all closed, and the room left, on exit.
    ``room``: one not yet connected, for a caller that also reads the room's text."""
    room = room or rtc.Room()
    ears, mouth = Ears(room, recognizer), Mouth()
    await room.connect(url, token)
    await mouth.publish(room)
    try:
        yield ears, mouth
    finally:
        await ears.close()
        await mouth.close()
        await room.disconnect()


def _rms(frame: rtc.AudioFrame) -> float:
    samples = np.frombuffer(frame.data, dtype=np.int16).astype(np.float32)
    return float(np.sqrt(np.mean(samples * samples))) if samples.size else 0.0
