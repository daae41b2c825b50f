"""push_service/bounded.py: a full cache makes room by dropping its oldest entries, an eighth at a time."""

from __future__ import annotations

from push_service.bounded import with_room


def test_a_cache_under_its_limit_is_left_as_it_is():
    entries = {index: index for index in range(7)}
    assert with_room(entries, 8) is entries


def test_a_full_cache_loses_its_oldest_eighth_and_keeps_the_order_of_the_rest():
    entries = {index: str(index) for index in range(80)}
    entries.pop(5)  # a key taken out and put back is among the newest
    entries[5] = "5"
    kept = with_room(entries, 80)
    assert list(kept) == [*range(11, 80), 5]  # 0-4 and 6-10 out: the ten oldest
    assert kept[5] == "5" and len(entries) == 80  # the original is not changed


def test_a_small_cache_loses_one_entry_at_least():
    assert list(with_room({"a": 1, "b": 2, "c": 3}, 3)) == ["b", "c"]


def test_inserting_through_it_never_holds_more_than_the_limit():
    entries: dict[int, int] = {}
    sizes = set()
    for index in range(10_000):
        entries = with_room(entries, 1_000)
        entries[index] = index
        sizes.add(len(entries))
    assert max(sizes) == 1_000 and len(entries) >= 875  # 875: after an eighth went
    assert list(entries)[-1] == 9_999
