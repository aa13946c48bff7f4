"""Stop strings across token boundaries and UTF-8 split across tokens."""

from node_agent.text_stream import StopStringFilter, TokenTextDecoder


def feed_all(stops, pieces):
    f = StopStringFilter(stops)
    out = "".join(f.feed(p) for p in pieces)
    return out + f.flush(), f.stopped


def test_stop_string_spanning_pieces_is_cut_and_not_sent():
    assert feed_all(["END"], ["hello E", "N", "D more"]) == ("hello ", True)


def test_partial_stop_prefix_is_released_when_it_does_not_match():
    assert feed_all(["END"], ["a E", "Nx", " b"]) == ("a ENx b", False)


def test_held_prefix_is_released_at_the_end():
    assert feed_all(["END"], ["tail E"]) == ("tail E", False)


def test_earliest_of_several_stops_wins():
    assert feed_all(["\n\n", "bye"], ["ok bye\n\nx"]) == ("ok ", True)


def test_text_is_never_held_without_stops():
    f = StopStringFilter([])
    assert f.feed("abc") == "abc"


def test_multibyte_character_split_over_tokens():
    decoder = TokenTextDecoder()
    snowman = "☃".encode()
    assert decoder.feed(snowman[:1]) == ""
    assert decoder.feed(snowman[1:]) == "☃"
    assert decoder.flush() == ""
