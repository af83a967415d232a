"""Offline speech in and out: pocketsphinx for STT, espeak-ng for TTS, behind the real
livekit-agents ``stt.STT`` and ``tts.TTS`` interfaces. No key, no network.

Why a domain language model: pocketsphinx's general English model hears espeak-ng's voice
badly ("what is the door code" came out as "what is or so"). A small bigram model made
from the client's own words (its agents' prompts, its documents, the replies the agent
itself says, common question words) heard every test phrase right, in ~0.1 s each. So
each worker builds one at start from what its client can talk about. Words outside it
are not heard: the trade that a phone menu makes too.

Why the recognizer fills digital silence: pocketsphinx was trained on microphones, whose
silence always has some noise. Phone and WebRTC legs send exact zeros instead (a muted
microphone, comfort noise off), and so do espeak-ng's pauses and the caller's mouth
between lines. pocketsphinx's front end makes a zero frame's log energy its floor (c0 of
-46, where a faint noise gives ~11); its CMN leaves such frames out of the mean it
subtracts, and the decoder hears words in them and, through the delta features, garbles
the words beside them: "what is the [1.2 s of zeros] gate code" came out as "why is at day
so", and the VAD's own padding of zeros made "seven three one nine" end in "you are you".
So each utterance has its digital silence cut to a short pause and a faint room tone laid
under it before decoding (:func:`as_a_microphone_hears`).

Both are non-streaming: livekit-agents wraps the STT in a ``StreamAdapter`` driven by the
session's VAD (one silero model per worker, loaded at start), and the TTS in one that
synthesizes sentence by sentence. espeak-ng runs as one short subprocess per sentence,
its audio streamed as it is made; it is waited for, or killed, before the sentence ends:
no process outlives its sentence.

Threads: decoding runs in a worker thread (``asyncio.to_thread``); one decoder per
worker, used under a lock (one session per worker, so it is never contended).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import re
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

import numpy as np
from livekit import rtc
from livekit.agents import APIConnectionError, LanguageCode, stt, tts, utils
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, NOT_GIVEN, APIConnectOptions, NotGivenOr

from agent.spoken_numbers import spoken_variants

logger = logging.getLogger("autonomite.agent.voice")

STT_RATE = 16_000  # what the en-us acoustic model was trained on
TTS_RATE = 22_050  # what espeak-ng speaks at
TTS_VOICE = "en-us"
MAX_CORPUS_WORDS = 200_000  # ~0.5 s of model building at a worker's start
# What callers ask and what the agent says around the client's own words.
COMMON_WORDS = """
what when where who how why which is are was do does did can could would will the a an of to
for on in at by with from and or my me i you your it its this that tell please what's hello hi
thanks thank yes no okay goodbye bye help need want know about open close time today number
"""
# How callers open a question, for the bigrams: without them "what is the door code" was
# often heard as "what's is the door code" (the model knew each word, not the phrase).
CALLER_PHRASES = ["What is the", "What are the", "Where is the", "When is the", "When does the", "How do I"]
# What the offline LLM says around them (agent/offline_llm.py), for the bigrams.
REPLY_PHRASES = ["Hello, how can I help you today?", "Welcome back.", "I'm the assistant for",
                 "Here is what I found:", "You said:"]
# Digital silence: 10 ms frames whose samples are all within this of zero (exact zeros come
# out of Opus and the resamplers as +-1 or 2; a microphone's noise floor peaks well above).
SILENT_PEAK = 4
KEPT_SILENCE_FRAMES = 10  # a run of it is cut to 0.1 s: a pause between words, not a word
ROOM_TONE_RMS = 8.0  # the faint noise laid under each utterance (-72 dBFS; speech is ~-20)
_WORD = re.compile(r"[a-z']+")
_SENTENCE = re.compile(r"(?:[.:](?!\d)|[?!;\n])+")  # not inside 3.5 or 9:30


def domain_corpus(texts: list[str], max_words: int = MAX_CORPUS_WORDS) -> list[list[str]]:
    """Sentences of lower-case words, from every text the client's agent may hear or say
    (the first ``max_words`` of them: a worker builds its model at every start). Numbers
    become words, once per way of reading them (agent/spoken_numbers.py)."""
    sentences, words = [], 0
    for text in texts:
        for sentence in _SENTENCE.split(text):
            if words >= max_words:
                break
            for variant in spoken_variants(sentence):  # "code 4271": each way it may be read out
                sentences.append(_WORD.findall(variant.lower()))
                words += len(sentences[-1])
    sentences += [_WORD.findall(s.lower()) for s in CALLER_PHRASES + REPLY_PHRASES]
    return [s for s in sentences if s] + [[w] for w in COMMON_WORDS.split()]


def bigram_arpa(sentences: list[list[str]]) -> str:
    """A bigram language model in ARPA text: add-one unigrams, bigrams seen in the corpus,
    and a flat back-off, which lets any known word follow any other."""
    unigrams: collections.Counter[str] = collections.Counter()
    bigrams: collections.Counter[tuple[str, str]] = collections.Counter()
    for words in sentences:
        tokens = ["<s>", *words, "</s>"]
        unigrams.update(tokens)
        bigrams.update(zip(tokens, tokens[1:], strict=False))
    total, vocabulary = sum(unigrams.values()), len(unigrams)
    lines = ["\\data\\", f"ngram 1={vocabulary}", f"ngram 2={len(bigrams)}", "", "\\1-grams:"]
    lines += [f"{math.log10((c + 1) / (total + vocabulary)):.4f} {w} -0.3010" for w, c in sorted(unigrams.items())]
    lines += ["", "\\2-grams:"]
    lines += [f"{math.log10(0.5 * c / unigrams[a]):.4f} {a} {b}" for (a, b), c in sorted(bigrams.items())]
    return "\n".join([*lines, "", "\\end\\", ""])


def pronunciations(words: set[str], dictionary: Path) -> dict[str, str]:
    """The entries of a CMU-style dictionary for ``words`` (alternates ``word(2)`` included)."""
    found = {}
    with dictionary.open() as entries:
        for entry in entries:
            head, _, phones = entry.partition(" ")
            if head.split("(", 1)[0] in words:
                found[head] = phones.strip()
    return found


class Recognizer:
    """One pocketsphinx decoder with a domain model: 16 kHz mono PCM in, words out.

    Its dictionary holds only the domain's words: with the whole en-us dictionary (134k
    words) the decoder took 2.9 s to build, with the domain's few hundred, 11 ms."""

    def __init__(self, texts: list[str]) -> None:
        from pocketsphinx import Decoder, get_model_path

        sentences = domain_corpus(texts)
        known = pronunciations({w for s in sentences for w in s}, Path(get_model_path("en-us")) / "cmudict-en-us.dict")
        words = {head.split("(", 1)[0] for head in known}
        sentences = [[w for w in s if w in words] for s in sentences]  # a word it cannot say, it cannot hear
        with tempfile.TemporaryDirectory(prefix="asr-") as folder:
            lm, dictionary = Path(folder) / "domain.arpa", Path(folder) / "domain.dict"
            lm.write_text(bigram_arpa([s for s in sentences if s]))
            dictionary.write_text("".join(f"{head} {phones}\n" for head, phones in sorted(known.items())))
            self._decoder = Decoder(samprate=STT_RATE, lm=str(lm), dict=str(dictionary), loglevel="FATAL")
        self.vocabulary = len(words)
        self._lock = threading.Lock()

    def words(self, pcm16k: bytes) -> str:
        audio = as_a_microphone_hears(np.frombuffer(pcm16k, dtype=np.int16)).tobytes()
        with self._lock:
            self._decoder.start_utt()
            self._decoder.process_raw(audio, full_utt=True)
            self._decoder.end_utt()
            hyp = self._decoder.hyp()
        return hyp.hypstr if hyp is not None else ""

    def transcribe(self, frames: list[rtc.AudioFrame]) -> str:
        return self.words(to_16k_mono(frames)) if frames else ""


def as_a_microphone_hears(samples: np.ndarray) -> np.ndarray:
    """16 kHz int16 ``samples`` with each run of digital silence cut to 0.1 s and a faint
    room tone under all of it: what a microphone would have sent (see the module's notes).
    The room tone is the same for the same input, so the same audio gives the same words."""
    frame = STT_RATE // 100  # pocketsphinx's frame step
    whole = len(samples) // frame * frame
    frames = samples[:whole].reshape(-1, frame)
    silent = np.abs(frames.astype(np.int32)).max(axis=1) <= SILENT_PEAK
    index = np.arange(len(frames))
    run_start = np.maximum.accumulate(np.where(silent, 0, index + 1))  # the frame after the last sound
    kept = frames[~silent | (index - run_start < KEPT_SILENCE_FRAMES)].ravel()
    kept = np.concatenate([kept, samples[whole:]]).astype(np.float64)
    tone = np.random.default_rng(0).normal(0.0, ROOM_TONE_RMS, len(kept))
    return np.clip(np.rint(kept + tone), -32768, 32767).astype(np.int16)


def to_16k_mono(frames: list[rtc.AudioFrame]) -> bytes:
    frame = rtc.combine_audio_frames(frames)
    samples = np.frombuffer(frame.data, dtype=np.int16)
    if frame.num_channels > 1:
        samples = samples.reshape(-1, frame.num_channels).mean(axis=1).astype(np.int16)
    if frame.sample_rate == STT_RATE:
        return samples.tobytes()
    resampler = rtc.AudioResampler(frame.sample_rate, STT_RATE, num_channels=1,
                                   quality=rtc.AudioResamplerQuality.HIGH)
    out = [*resampler.push(bytearray(samples.tobytes())), *resampler.flush()]
    return b"".join(bytes(f.data) for f in out)


class OfflineSTT(stt.STT):
    """``stt: {provider: offline}``: pocketsphinx on each utterance the VAD cuts out."""

    def __init__(self, recognizer: Recognizer) -> None:
        super().__init__(capabilities=stt.STTCapabilities(streaming=False, interim_results=False))
        self._recognizer = recognizer

    @property
    def model(self) -> str:
        return "pocketsphinx-en-us-domain"

    @property
    def provider(self) -> str:
        return "offline"

    async def _recognize_impl(
        self, buffer: utils.AudioBuffer, *, language: NotGivenOr[str] = NOT_GIVEN, conn_options: APIConnectOptions
    ) -> stt.SpeechEvent:
        frames = buffer if isinstance(buffer, list) else [buffer]
        text = await asyncio.to_thread(self._recognizer.transcribe, frames)
        return stt.SpeechEvent(
            type=stt.SpeechEventType.FINAL_TRANSCRIPT,
            request_id=uuid.uuid4().hex,
            alternatives=[stt.SpeechData(language=LanguageCode("en"), text=text)],
        )


class OfflineTTS(tts.TTS):
    """``tts: {provider: offline}``: espeak-ng, one subprocess per sentence."""

    def __init__(self, voice: str = TTS_VOICE) -> None:
        super().__init__(capabilities=tts.TTSCapabilities(streaming=False), sample_rate=TTS_RATE, num_channels=1)
        self.voice = voice

    @property
    def model(self) -> str:
        return "espeak-ng"

    @property
    def provider(self) -> str:
        return "offline"

    def synthesize(self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS) -> tts.ChunkedStream:
        return _Speech(tts=self, input_text=text, conn_options=conn_options)


class _Speech(tts.ChunkedStream):
    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        voice = self._tts.voice if isinstance(self._tts, OfflineTTS) else TTS_VOICE
        output_emitter.initialize(request_id=uuid.uuid4().hex, sample_rate=TTS_RATE, num_channels=1,
                                  mime_type="audio/pcm")
        if self._input_text.strip():
            async with contextlib.aclosing(speak(self._input_text, voice)) as speech:  # cancelled: killed now
                async for chunk in speech:
                    output_emitter.push(chunk)
        output_emitter.flush()


async def speak(text: str, voice: str = TTS_VOICE):  # noqa: ANN201 - an async iterator of PCM bytes
    """espeak-ng's 16-bit mono PCM at 22.05 kHz for ``text``, as it is made. The text goes
    on stdin, not argv, so no other process on the host can read what is said."""
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise APIConnectionError("espeak-ng is not installed (Debian: apt install espeak-ng)", retryable=False)
    proc = await asyncio.create_subprocess_exec(
        binary, "--stdout", "-v", voice, "--stdin",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None  # all three are PIPEs
    try:
        proc.stdin.write(text.encode())
        proc.stdin.close()
        try:
            header = await proc.stdout.readexactly(44)
        except asyncio.IncompleteReadError:  # e.g. an unknown voice: it says why on stderr
            why = (await proc.stderr.read(300)).decode(errors="replace").strip()
            raise APIConnectionError(f"espeak-ng gave no audio (voice {voice!r}): {why}", retryable=False) from None
        if header[:4] != b"RIFF" or int.from_bytes(header[24:28], "little") != TTS_RATE:
            raise APIConnectionError(f"espeak-ng did not give {TTS_RATE} Hz WAV", retryable=False)
        carry = b""
        while chunk := await proc.stdout.read(8192):
            chunk, carry = carry + chunk, b""
            if len(chunk) % 2:  # whole 16-bit samples only
                chunk, carry = chunk[:-1], chunk[-1:]
            yield chunk
        await proc.wait()
    finally:
        if proc.returncode is None:  # cancelled (the caller interrupted the agent): no orphan
            proc.kill()
            await proc.wait()



def check_voice(voice: str) -> None:
    """At worker start: espeak-ng is installed and knows ``voice``, or the start fails
    rather than leaving a warm worker that would be mute or speak in another voice
    (espeak-ng falls back to its default voice silently)."""
    import subprocess

    binary = shutil.which("espeak-ng")
    if binary is None:
        raise RuntimeError("the offline TTS needs espeak-ng (Debian: apt install espeak-ng)")
    listing = subprocess.run([binary, "--voices"], capture_output=True, text=True, timeout=10).stdout
    names = set()
    for row in listing.splitlines()[1:]:  # Pty Language Age/Gender VoiceName File ...
        fields = row.split()
        if len(fields) >= 5:
            names |= {fields[1].lower(), fields[3].lower(), fields[4].lower(), fields[4].rsplit("/", 1)[-1].lower()}
    if voice.split("+", 1)[0].lower() not in names:  # "+m3" picks a variant of that voice
        raise RuntimeError(f"espeak-ng cannot speak voice {voice!r} (espeak-ng --voices lists those it can)")
