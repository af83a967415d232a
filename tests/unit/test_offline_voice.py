"""The domain language model the offline recognizer is built with (pure text, no audio)."""

from __future__ import annotations

import shutil

import pytest

from agent.offline_voice import COMMON_WORDS, bigram_arpa, check_voice, domain_corpus


def test_the_corpus_is_the_clients_sentences_in_lower_case_words_plus_common_ones():
    sentences = domain_corpus(["The door code is 4271. Parking: level three!", ""])
    assert ["the", "door", "code", "is"] in sentences and ["parking"] in sentences and ["level", "three"] in sentences
    assert all(w == w.lower() for s in sentences for w in s)
    assert {w for s in sentences for w in s} >= set(COMMON_WORDS.split())


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


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs Debian's espeak-ng")
def test_a_worker_whose_offline_voice_cannot_speak_does_not_start():
    check_voice("en-us")  # speaks
    with pytest.raises(RuntimeError, match="cannot speak voice 'no-such-voice'"):
        check_voice("no-such-voice")


def test_the_corpus_is_capped_so_a_huge_knowledge_base_cannot_stall_a_start():
    sentences = domain_corpus(["one two three four. " * 1000], max_words=40)
    assert sum(len(s) for s in sentences if s != ["one", "two", "three", "four"]) <= len(COMMON_WORDS.split()) + 20
    assert sentences.count(["one", "two", "three", "four"]) == 10
