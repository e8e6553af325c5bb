"""Dedup and decontamination: exact, near-duplicate (MinHash + LSH + ROUGE-L) and test look-alikes."""

from __future__ import annotations

import random

from llamaduo import dedup
from llamaduo.config import Config
from llamaduo.data import Example, Lineage, make_example

WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "pu", "ra", "si", "to", "vu", "ze") for b in
         ("bar", "cen", "dor", "fel", "gim", "hox", "jup", "kel", "mon", "nar", "pex", "quo", "rin", "sol")]


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def corpus(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    return [
        make_example(text(rng, rng.randint(8, 14)), text(rng, rng.randint(30, 50)), lineage=Lineage(source="synthetic", round=1))
        for _ in range(n)
    ]


def one_word_changed(ex: Example, rng: random.Random) -> Example:
    w = ex.response.split()
    w[rng.randrange(len(w))] = "zzzplanted"
    return make_example(ex.prompt, " ".join(w), lineage=Lineage(source="synthetic", round=1))


def test_exact_duplicates_keep_the_first_and_existing_data_wins():
    base = corpus(6)
    existing = [base[0]]
    again = make_example("  " + base[0].prompt.upper(), base[0].response + "  ")  # same after normalising
    new = [base[1], base[2], again, make_example(base[1].prompt, base[1].response.lower()), base[3]]
    kept, rejected = dedup.clean(new, existing, [], Config())
    assert [e.id for e in kept] == [base[1].id, base[2].id, base[3].id]
    assert [(r["id"], r["reason"], r["duplicate_of"]) for r in rejected] == [
        (again.id, "exact_duplicate", base[0].id),
        (new[3].id, "exact_duplicate", base[1].id),
    ]


def test_planted_near_duplicates_are_removed_and_distinct_items_kept():
    rng = random.Random(5)
    base = corpus(300, seed=1)
    planted = {}
    new = list(base)
    for i in rng.sample(range(300), 30):
        dup = one_word_changed(base[i], rng)
        planted[dup.id] = base[i].id
        new.insert(rng.randint(new.index(base[i]) + 1, len(new)), dup)
    kept, rejected = dedup.clean(new, [], [], Config())
    near = {r["id"]: r["duplicate_of"] for r in rejected if r["reason"] == "near_duplicate"}
    assert near == planted  # every planted copy found, nothing else flagged, the original kept
    assert [e.id for e in kept] == [e.id for e in base]
    assert all(r["detail"].startswith("ROUGE-L F1") and float(r["detail"].split()[-1]) > 0.7 for r in rejected)


def test_a_cluster_of_near_duplicates_keeps_exactly_one_member():
    rng = random.Random(2)
    seed = corpus(1, seed=9)[0]
    cluster = [seed] + [one_word_changed(seed, rng) for _ in range(6)]
    cluster = list({e.id: e for e in cluster}.values())
    others = corpus(40, seed=4)
    new = others[:20] + cluster + others[20:]
    kept, rejected = dedup.clean(new, [], [], Config())
    kept_ids = {e.id for e in kept}
    assert sum(e.id in kept_ids for e in cluster) == 1 and seed.id in kept_ids
    assert all(e.id in kept_ids for e in others)
    assert {r["duplicate_of"] for r in rejected} == {seed.id}


def test_a_near_duplicate_of_existing_data_is_dropped_in_favour_of_the_existing_item():
    rng = random.Random(8)
    existing = corpus(20, seed=6)
    copy = one_word_changed(existing[7], rng)
    kept, rejected = dedup.clean([copy] + corpus(5, seed=7), existing, [], Config())
    assert copy.id not in {e.id for e in kept} and len(kept) == 5
    assert rejected[0]["reason"] == "near_duplicate" and rejected[0]["duplicate_of"] == existing[7].id


def test_decontamination_removes_test_look_alikes_and_keeps_the_rest():
    rng = random.Random(11)
    test = corpus(10, seed=20)
    train = corpus(30, seed=21)
    clean_new = corpus(40, seed=22)
    # A synthetic pair quoting a long run of a test reference inside other text.
    quote = make_example(text(rng, 10), text(rng, 8) + " " + " ".join(test[2].response.split()[:14]) + " " + text(rng, 8))
    lookalike = one_word_changed(test[5], rng)  # a test item with one word changed
    repeated = make_example(test[7].prompt, text(rng, 40))  # a test prompt with a new answer
    new = clean_new[:10] + [quote] + clean_new[10:20] + [lookalike, repeated] + clean_new[20:]
    kept, rejected = dedup.clean(new, train, test, Config())
    contaminated = {r["id"]: r["duplicate_of"] for r in rejected if r["reason"] == "test_contamination"}
    assert contaminated == {quote.id: test[2].id, lookalike.id: test[5].id, repeated.id: test[7].id}
    assert [e.id for e in kept] == [e.id for e in clean_new]


def test_boilerplate_shared_with_the_training_data_is_not_contamination():
    rng = random.Random(4)
    lead = "Extract the request in this customer message as JSON with the keys intent, name, city, item and quantity."
    train = [make_example(f"{lead}\n\n{text(rng, 12)}", text(rng, 10)) for _ in range(10)]
    test = [make_example(f"{lead}\n\n{text(rng, 12)}", text(rng, 10)) for _ in range(5)]
    new = [make_example(f"{lead}\n\n{text(rng, 12)}", text(rng, 10)) for _ in range(8)]
    kept, rejected = dedup.clean(new, train, test, Config())
    assert len(kept) == 8 and rejected == []
    # Without training data holding the same lead, the shared run is flagged.
    _, rejected = dedup.clean(new, [], test, Config())
    assert {r["reason"] for r in rejected} == {"test_contamination"}


def test_rejected_rows_carry_lineage_and_thresholds_come_from_the_config():
    rng = random.Random(6)
    base = corpus(10, seed=30)
    dup = one_word_changed(base[3], rng)
    dup = dup.model_copy(update={"lineage": Lineage(source="synthetic", round=2, seed_id="ex-seed")})
    kept, rejected = dedup.clean(base + [dup], [], [], Config())
    assert rejected[0] | {"detail": None} == {
        "id": dup.id, "instruction": dup.prompt, "response": dup.response, "category": "default",
        "reason": "near_duplicate", "duplicate_of": base[3].id, "detail": None, "seed_id": "ex-seed", "round": 2,
    }
    strict = Config(dedup={"rouge_l": 0.999})  # a one-word edit no longer counts as a duplicate
    kept, rejected = dedup.clean(base + [dup], [], [], strict)
    assert len(kept) == 11 and rejected == []


def test_empty_and_wordless_inputs_are_handled():
    assert dedup.clean([], corpus(3), corpus(2, seed=1), Config()) == ([], [])
    odd = [make_example("?!", "..."), make_example("¿¡", "…")]
    kept, rejected = dedup.clean(odd, [], corpus(2), Config())
    assert len(kept) == 2 and rejected == []


def test_a_cluster_of_thousands_is_checked_against_its_representatives_not_every_pair():
    import time

    rng = random.Random(12)
    seed = corpus(1, seed=13)[0]
    words = seed.response.split()
    cluster = [seed]
    for k in range(3000):  # each variant has one word of its own in a random place
        w = list(words)
        w[rng.randrange(len(w))] = f"zz{k}"
        cluster.append(make_example(seed.prompt, " ".join(w), lineage=Lineage(source="synthetic", round=1)))
    assert len({e.id for e in cluster}) == 3001
    t0 = time.perf_counter()
    kept, rejected = dedup.clean(cluster + corpus(20, seed=14), [], [], Config())
    assert time.perf_counter() - t0 < 20  # every pair of 3,000 would be 4.5 million ROUGE-L checks
    kept_ids = {e.id for e in kept}
    assert seed.id in kept_ids and all(e.id in kept_ids for e in corpus(20, seed=14))
    # LSH proposes pairs by chance: a variant may share no band with a representative (a few in 3,000).
    assert len(rejected) >= 0.99 * (len(cluster) - 1) and all(r["reason"] == "near_duplicate" for r in rejected)
