"""The offline recognizer's inputs: the domain language model (pure text), numbers as
spoken words, and the audio it is given (digital silence filled); plus two checks with
espeak-ng's real voice, without LiveKit."""

from __future__ import annotations

import asyncio
import shutil

import numpy as np
import pytest

from agent.offline_voice import (
    CALLER_PHRASES,
    COMMON_WORDS,
    KEPT_SILENCE_FRAMES,
    REPLY_PHRASES,
    SILENT_PEAK,
    STT_RATE,
    as_a_microphone_hears,
    bigram_arpa,
    check_voice,
    domain_corpus,
)
from agent.spoken_numbers import cardinal, ordinal, readings, spoken_variants

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs Debian's espeak-ng")


def test_the_corpus_is_the_clients_sentences_in_lower_case_words_plus_common_ones():
    sentences = domain_corpus(["The door code is open. Parking: level three!", ""])
    assert ["the", "door", "code", "is", "open"] in sentences and ["parking"] in sentences
    assert ["level", "three"] in sentences
    assert all(w == w.lower() for s in sentences for w in s)
    assert {w for s in sentences for w in s} >= set(COMMON_WORDS.split())


# -- numbers: written in digits, heard as words -------------------------------------------

def test_numbers_are_said_the_american_way_up_to_billions():
    said = {0: "zero", 7: "seven", 13: "thirteen", 20: "twenty", 42: "forty two", 100: "one hundred",
            101: "one hundred one", 999: "nine hundred ninety nine", 1000: "one thousand",
            4271: "four thousand two hundred seventy one", 30_000: "thirty thousand",
            1_000_001: "one million one", 999_999_999_999: "nine hundred ninety nine billion nine hundred ninety nine "
            "million nine hundred ninety nine thousand nine hundred ninety nine"}
    assert {n: cardinal(n) for n in said} == said
    assert [ordinal(n) for n in (1, 2, 3, 5, 12, 21, 40, 100)] == [
        "first", "second", "third", "fifth", "twelfth", "twenty first", "fortieth", "one hundredth"]


def test_a_code_is_read_as_a_number_digit_by_digit_or_in_pairs():
    assert readings("4271") == ["four thousand two hundred seventy one", "four two seven one", "forty two seventy one",
                                "forty two hundred seventy one"]
    assert readings("1905")[2:] == ["nineteen oh five", "nineteen hundred five", "one nine oh five"]
    assert readings("412") == ["four hundred twelve", "four one two", "four twelve"]
    assert readings("30") == ["thirty"]  # a quantity: nobody says "three zero days"
    # A leading zero or a long run is an identifier: digit by digit only.
    assert readings("0042") == ["zero zero four two", "oh oh four two"]
    assert readings("1234567890123") == [
        "one two three four five six seven eight nine zero one two three",
        "one two three four five six seven eight nine oh one two three"]


def test_a_sentence_has_one_variant_per_reading_of_its_numbers():
    assert spoken_variants("The gate code is 7 3 1 9.") == ["The gate code is seven three one nine ."]
    assert spoken_variants("The door code is 4271, room 12.") == [
        "The door code is four thousand two hundred seventy one , room twelve .",
        "The door code is four two seven one , room twelve .",
        "The door code is forty two seventy one , room twelve .",
        "The door code is forty two hundred seventy one , room twelve ."]
    assert spoken_variants("Open 9:30 to 5:00, on the 1st; 3.5% off 1,200 items") == [
        "Open nine thirty to five o'clock , on the first ; three point five percent off one thousand two hundred items",
        "Open nine thirty to five , on the first ; three point five percent off one thousand two hundred items"]
    assert spoken_variants("no digits here") == ["no digits here"]


def test_the_corpus_holds_a_documents_numbers_as_the_words_a_caller_says():
    sentences = domain_corpus(["The gate code is 7 3 1 9.\n\nThe door code is 4271. Returns within 30 days.",
                               "You are the desk of Acme 3.5"])
    assert ["the", "gate", "code", "is", "seven", "three", "one", "nine"] in sentences
    assert ["the", "door", "code", "is", "four", "two", "seven", "one"] in sentences
    assert ["the", "door", "code", "is", "forty", "two", "seventy", "one"] in sentences
    assert ["the", "door", "code", "is", "four", "thousand", "two", "hundred", "seventy", "one"] in sentences
    assert ["returns", "within", "thirty", "days"] in sentences
    assert ["you", "are", "the", "desk", "of", "acme", "three", "point", "five"] in sentences  # a prompt too, unsplit


# -- digital silence ----------------------------------------------------------------------

def _frames(samples: np.ndarray) -> np.ndarray:
    return samples[: len(samples) // 160 * 160].reshape(-1, 160)


def test_digital_silence_becomes_a_short_pause_with_a_room_tone_under_it():
    rng = np.random.default_rng(1)
    speech = (3000 * np.sin(np.arange(8000) * 0.2)).astype(np.int16)  # 0.5 s
    zeros, near_zeros = np.zeros(19_200, np.int16), rng.integers(-2, 3, 19_200).astype(np.int16)  # 1.2 s each
    for silence in (zeros, near_zeros):  # exact zeros arrive as +-1 or 2 after Opus and a resampler
        heard = as_a_microphone_hears(np.concatenate([silence, speech, silence, speech, silence]))
        # Each run of silence is cut to 0.1 s: 1 s of speech and 0.3 s of pause are left.
        assert len(heard) == 2 * len(speech) + 3 * KEPT_SILENCE_FRAMES * 160
        # No frame is digital silence any more: each has a quiet room's energy.
        assert np.abs(_frames(heard).astype(np.int32)).max(axis=1).min() > SILENT_PEAK
        # The speech itself is kept (under a tone ~50 dB below it), and the same input gives the same output.
        start = KEPT_SILENCE_FRAMES * 160
        assert np.abs(heard[start:start + len(speech)].astype(np.int32) - speech).max() < 50
        assert np.array_equal(heard, as_a_microphone_hears(np.concatenate([silence, speech, silence, speech, silence])))


def test_a_real_noise_floor_is_not_digital_silence_and_is_kept_whole():
    noise = np.random.default_rng(2).normal(0, 20, STT_RATE).astype(np.int16)  # 1 s of a quiet room
    assert len(as_a_microphone_hears(noise)) == len(noise)


async def _speech_16k(*texts: str, pause_s: float) -> bytes:
    """``texts`` said by espeak-ng with ``pause_s`` of exact zeros between them, inside 0.5 s
    before and 1 s after (a VAD's padding), at the recognizer's rate."""
    from livekit import rtc

    from agent.offline_voice import TTS_RATE, speak, to_16k_mono

    parts = []
    for text in texts:
        parts.append(b"".join([chunk async for chunk in speak(text)]))
    pcm = bytes(TTS_RATE) + bytes(int(TTS_RATE * pause_s) * 2).join(parts) + bytes(2 * TTS_RATE)
    step = TTS_RATE // 100
    return to_16k_mono([rtc.AudioFrame(pcm[i:i + 2 * step].ljust(2 * step, b"\0"), TTS_RATE, 1, step)
                        for i in range(0, len(pcm), 2 * step)])


@needs_espeak
def test_digits_and_a_pause_of_digital_silence_are_heard_right():
    """espeak-ng's audio straight into the recognizer (no LiveKit): the caller's digits, read
    three ways, and a question with 1.2 s of exact zeros in it. Before the silence was
    filled, these came out as "you three one you are you" and "what is are"."""
    from agent.offline_voice import Recognizer

    recognizer = Recognizer(["The gate code is 7 3 1 9.\n\nThe door code is 4271.", "You are the front desk of Acme."])
    lines = [(("seven three one nine",), 0.0), (("four two seven one",), 0.0), (("forty two seventy one",), 0.0),
             (("What is the", "gate code?"), 1.2), (("Where is the", "door code?"), 1.2)]
    heard = [recognizer.words(asyncio.run(_speech_16k(*texts, pause_s=pause))) for texts, pause in lines]
    assert heard == ["seven three one nine", "four two seven one", "forty two seventy one", "what is the gate code",
                     "where is the door code"]


def test_the_model_is_well_formed_arpa_with_every_bigram_over_known_words():
    arpa = bigram_arpa([["what", "is", "the", "door", "code"], ["the", "door"]])
    head, _, rest = arpa.partition("\\1-grams:\n")
    unigram_block, _, rest = rest.partition("\n\n\\2-grams:\n")
    bigram_block, _, tail = rest.partition("\n\n\\end\\")
    unigrams = {line.split()[1]: float(line.split()[0]) for line in unigram_block.splitlines()}
    bigrams = [line.split() for line in bigram_block.splitlines()]
    assert f"ngram 1={len(unigrams)}" in head and f"ngram 2={len(bigrams)}" in head
    assert {"<s>", "</s>", "door"} <= set(unigrams) and all(p < 0 for p in unigrams.values())
    assert all(a in unigrams and b in unigrams and float(p) <= 0 for p, a, b in bigrams)
    assert ["<s>", "what"] in [b[1:] for b in bigrams] and ["door", "code"] in [b[1:] for b in bigrams]
    # "the door" is seen twice, "door code" once after "door": the likelier bigram scores higher
    score = {(a, b): float(p) for p, a, b in bigrams}
    assert score[("the", "door")] > score[("door", "code")]


@needs_espeak
def test_a_worker_whose_offline_voice_cannot_speak_does_not_start():
    check_voice("en-us")  # speaks
    with pytest.raises(RuntimeError, match="cannot speak voice 'no-such-voice'"):
        check_voice("no-such-voice")


def test_the_corpus_is_capped_so_a_huge_knowledge_base_cannot_stall_a_start():
    sentences = domain_corpus(["one two three four. " * 1000], max_words=40)
    fixed = len(COMMON_WORDS.split()) + sum(len(phrase.split()) for phrase in CALLER_PHRASES + REPLY_PHRASES)
    assert sum(len(s) for s in sentences if s != ["one", "two", "three", "four"]) <= fixed
    assert sentences.count(["one", "two", "three", "four"]) == 10
