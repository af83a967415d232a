"""The voice turn, offline: from the end of the caller's speech to the first audio of the reply.

    .venv/bin/pip install -e '.[bench]'   # matplotlib, for the chart
    .venv/bin/python bench/voice_turn.py [--sessions 8] [--windows 0.55,0.3] [--chart docs/voice_turn.png]

One ``autonomite serve`` (process backend, zygote) on a real livekit-server on loopback,
with two clients: ``voiceco`` (a voice agent: pocketsphinx, silero VAD, espeak-ng) and
``textco`` (text only). Each voice session: the caller (runtime/dev/voice_io.py) hears the
greeting, then asks three questions with espeak-ng; the clock runs from the moment the
caller's last sample was played out to the first voiced frame of the agent's answer, as the
caller receives it. The worker logs livekit-agents' own measures of each stage, which
split that time: the VAD's silence window and decoding (end of utterance), the LLM's first
token, the TTS's first audio. What is left is the runtime and the media path.

``--windows`` gives the voice client one agent per end-of-turn silence window
(``end_of_turn_s``); sessions alternate between them in the same run, so the windows are
compared side by side, as a ratio, on the same noisy machine.

Also: the idle memory (PSS and RSS) of a voice worker beside a text-only one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from agent.offline_voice import Recognizer
from bench.trigger_latency import machine
from bench.worker_start import pss_mb
from runtime.dev.devserver import LiveKitServer
from runtime.dev.voice_io import caller
from tests.support import Client, LiveKitProject, Serve, wait_until, write_config

DOCUMENTS = "The door code is four two seven one.\n\nThe office opens at nine in the morning.\n\nParking is on level three.\n"
PROMPT = "You are the front desk of Acme."
QUESTIONS = {"What is the door code?": "four two seven one", "Where is parking?": "level three",
             "When does the office open?": "nine in the morning"}


async def session(url: str, token: str, recognizer: Recognizer) -> list[tuple[float, bool]]:
    """(seconds from the end of the question to the answer's first audio, answer right) per question."""
    turns = []
    async with caller(url, token, recognizer) as (ears, mouth):
        await asyncio.wait_for(ears.heard.get(), 30)  # the greeting, heard to its end
        while not ears.first_audio.empty():
            ears.first_audio.get_nowait()
        for question, answer in QUESTIONS.items():
            said = await mouth.say(question)
            first = await asyncio.wait_for(ears.first_audio.get(), 30)
            heard = await ears.answer()  # the whole answer: its utterances until 2 s of quiet
            while not ears.first_audio.empty():
                ears.first_audio.get_nowait()
            turns.append((first - said, answer in " ".join(heard)))
    return turns


def rss_mb(pid: int) -> float:
    return next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS")) / 1024


def stage_metrics(log_dir: Path) -> dict[str, list[float]]:
    stages: dict[str, list[float]] = {}
    names = {("EOUMetrics", "end_of_utterance_delay"): "end of utterance (VAD silence + decoding)",
             ("EOUMetrics", "transcription_delay"): "transcript ready",
             ("STTMetrics", "duration"): "pocketsphinx decode",
             ("LLMMetrics", "ttft"): "LLM first token (offline rules)",
             ("TTSMetrics", "ttfb"): "espeak-ng first audio"}
    for log in log_dir.rglob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if "voice metric " in line:
                metric = json.loads(line.split("voice metric ", 1)[1])
                for (kind, field), name in names.items():
                    if metric["kind"] == kind:
                        stages.setdefault(name, []).append(metric[field])
    return stages


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=20)[int(q * 20) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--windows", default="0.55", help="end_of_turn_s values, comma-separated")
    parser.add_argument("--chart", type=Path)
    args = parser.parse_args()
    windows = [float(w) for w in args.windows.split(",")]
    print(f"machine: {machine()}")
    work = Path(tempfile.mkdtemp(prefix="bench-voice-"))
    (work / "docs").mkdir()
    (work / "docs" / "front-desk.txt").write_text(DOCUMENTS)
    server = LiveKitServer({"benchkey": "bench-secret-" + "x" * 32}, log_path=work / "livekit.log").start()
    project = LiveKitProject(server, "benchkey", "bench-secret-" + "x" * 32)
    voices = {f"desk{i}": {"name": f"desk{i}", "system_prompt": PROMPT, "enable_rag": True, "end_of_turn_s": w,
                           "stt": {"provider": "offline"}, "tts": {"provider": "offline"}} for i, w in enumerate(windows)}
    text = {"name": "support", "system_prompt": PROMPT, "enable_rag": True}
    voiceco = Client("voiceco", project, min_idle=1, max_size=2, agents=list(voices.values()),
                     knowledge_dir=str(work / "docs"))
    textco = Client("textco", project, min_idle=1, max_size=1, agents=[text], knowledge_dir=str(work / "docs"))
    env = write_config(work / "clients.yaml", [voiceco, textco])
    serve = Serve(work / "clients.yaml", env, work / "serve.log")
    recognizer = Recognizer([DOCUMENTS, PROMPT])
    try:
        serve.start()
        time.sleep(3)  # let the idle workers settle before reading their memory
        memory = {}
        for client in ("voiceco", "textco"):
            [worker] = serve.pool(client)["workers"]
            pid = int(worker["ref"])
            memory[client] = (pss_mb([pid]), rss_mb(pid))
        turns: dict[float, list[tuple[float, bool]]] = {w: [] for w in windows}
        for i in range(args.sessions * len(windows)):
            agent = f"desk{i % len(windows)}"
            wait_until(lambda: serve.pool("voiceco")["idle"] >= 1, 60, "an idle voice worker")
            r = serve.trigger(voiceco, f"voice-{i}", agent=agent)
            assert r.status == 200, r.body
            turns[voices[agent]["end_of_turn_s"]] += asyncio.run(
                session(r.body["livekit_url"], r.body["participant_token"], recognizer))
            project.delete_room(f"voice-{i}")
        wait_until(lambda: serve.pool("voiceco")["leased"] == 0, 60, "the last session over")
    finally:
        serve.stop()
        server.stop()
    stages = stage_metrics(work / "workers")
    every = [t for ts in turns.values() for t in ts]
    print(f"\n{len(every)} voice turns, {sum(ok for _, ok in every)} answered right (heard by the caller)\n")
    print("| end_of_turn_s | turns | answered right | end of speech → first audio p50 (ms) | p95 (ms) | p50 ÷ first window's |")
    print("|---|---|---|---|---|---|")
    base = pct([t for t, _ in turns[windows[0]]], 0.5)
    for w, ts in turns.items():
        lat = [t for t, _ in ts]
        print(f"| {w:g} | {len(ts)} | {sum(ok for _, ok in ts)} | {pct(lat, 0.5) * 1000:.0f} | "
              f"{pct(lat, 0.95) * 1000:.0f} | {pct(lat, 0.5) / base:.2f} |")
    print("\nEvery window's turns, split by stage (livekit-agents' own measures):\n")
    print("| stage | p50 (ms) | p95 (ms) |\n|---|---|---|")
    rows = [*((f"caller's view, end_of_turn_s {w:g}", [t for t, _ in ts]) for w, ts in turns.items()),
            *stages.items()]
    for name, values in rows:
        print(f"| {name} | {pct(values, 0.5) * 1000:.0f} | {pct(values, 0.95) * 1000:.0f} |")
    print("\n| idle worker | PSS (MB) | RSS (MB) |\n|---|---|---|")
    for client, (pss, rss) in memory.items():
        print(f"| {'voice (VAD + recognizer)' if client == 'voiceco' else 'text only'} | {pss:.0f} | {rss:.0f} |")
    if args.chart:
        from bench.charts import Panel, grouped_bars

        grouped_bars(args.chart, "Voice turn, offline engines (ms)", [n for n, _ in rows],
                     Panel("milliseconds", {"p50": [pct(v, 0.5) * 1000 for _, v in rows],
                                            "p95": [pct(v, 0.95) * 1000 for _, v in rows]}))
        grouped_bars(args.chart.with_name(args.chart.stem + "_memory.png"), "Idle worker memory (MB)",
                     ["voice (VAD + recognizer)", "text only"],
                     Panel("MB", {"PSS": [memory["voiceco"][0], memory["textco"][0]],
                                  "RSS": [memory["voiceco"][1], memory["textco"][1]]}))


if __name__ == "__main__":
    main()
