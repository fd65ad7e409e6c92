"""Stop strings over streamed text pieces (pure logic)."""

from __future__ import annotations

import pytest

from mlxpool.agent.engine.stopping import StopStringMatcher


def feed_all(matcher: StopStringMatcher, pieces: list[str]) -> tuple[list[str], bool]:
    out = []
    for piece in pieces:
        out.append(matcher.feed(piece))
        if matcher.stopped:
            break
    return out, matcher.stopped


def test_without_stop_strings_text_passes_through():
    matcher = StopStringMatcher(())
    assert feed_all(matcher, ["a", "b"]) == (["a", "b"], False)
    assert matcher.flush() == ""


def test_stop_string_inside_one_piece_cuts_before_it():
    matcher = StopStringMatcher(["END"])
    assert matcher.feed("abcENDxyz") == "abc"
    assert matcher.stopped
    assert matcher.feed("more") == "" and matcher.flush() == ""


def test_stop_string_split_across_pieces_is_held_back_then_dropped():
    matcher = StopStringMatcher(["\nUser:"])
    out, stopped = feed_all(matcher, ["Hi", " there\n", "Us", "er", ": next"])
    assert stopped
    assert "".join(out) == "Hi there"
    assert out[1] == " there"  # "\n" could start the stop string: held


def test_held_text_is_released_when_it_turns_out_not_to_stop():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("abST") == "ab"
    assert matcher.feed("ay") == "STay"
    assert not matcher.stopped


def test_flush_returns_held_text_at_the_end():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("xSTO") == "x"
    assert matcher.flush() == "STO"


def test_earliest_of_several_stop_strings_wins():
    matcher = StopStringMatcher(["zz", "b"])
    assert matcher.feed("abzz") == "a"


def test_overlapping_prefixes_hold_the_longest_candidate():
    matcher = StopStringMatcher(["aab"])
    assert matcher.feed("xaa") == "x"
    assert matcher.feed("a") == "a"  # "aaa": only the last "aa" can still start "aab"
    assert matcher.feed("b") == ""
    assert matcher.stopped


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        StopStringMatcher([""])
