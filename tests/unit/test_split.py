from collections import Counter

from prolifscore.core.wsi.split import TRAIN, VALIDATION, hash_split, stratified_splits


def test_stratified_split_takes_exact_share_of_each_score():
    slides = [(f"TUPAC-TR-{i:03d}", 1 + i % 3) for i in range(1, 301)]
    splits = stratified_splits(slides, seed=42, validation=0.2)
    by_score = Counter((score, splits[sid]) for sid, score in slides)
    for score in (1, 2, 3):
        assert by_score[(score, VALIDATION)] == 20 and by_score[(score, TRAIN)] == 80


def test_split_is_stable_and_seeded():
    slides = [(f"s{i}", 1 + i % 3) for i in range(50)]
    a = stratified_splits(slides, seed=42, validation=0.2)
    assert a == stratified_splits(list(reversed(slides)), seed=42, validation=0.2)
    assert a != stratified_splits(slides, seed=7, validation=0.2)


def test_hash_split_is_stable_and_near_the_share():
    picks = [hash_split(f"slide-{i}", 2, 42, 0.2) for i in range(2000)]
    assert picks == [hash_split(f"slide-{i}", 2, 42, 0.2) for i in range(2000)]
    assert 0.17 < picks.count(VALIDATION) / len(picks) < 0.23
