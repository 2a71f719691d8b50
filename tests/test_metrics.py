"""recall@k equals a brute-force reading of the standard protocol, whatever the chunking or order; the reference
rule (clip_benchmark's topk) equals it where no score ties exactly, and counts the ties where some do."""

from __future__ import annotations

import numpy as np
import pytest

from clipsearch.lab.metrics import recall_at_k, reference_recall


def brute_force(text: np.ndarray, images: np.ndarray, owners: np.ndarray, ks=(1, 5, 10)):
    """The protocol as written: cosine matrix, then one query at a time."""
    text = text / np.linalg.norm(text, axis=1, keepdims=True)
    images = images / np.linalg.norm(images, axis=1, keepdims=True)
    sims = text.astype(np.float64) @ images.astype(np.float64).T
    t2i = {k: 0.0 for k in ks}
    for c in range(len(text)):
        top = list(np.argsort(-sims[c]))
        for k in ks:
            t2i[k] += owners[c] in top[:k]
    i2t = {k: 0.0 for k in ks}
    queries = 0
    for i in range(len(images)):
        own = {c for c in range(len(text)) if owners[c] == i}
        if not own:
            continue
        queries += 1
        top = list(np.argsort(-sims[:, i]))
        for k in ks:
            i2t[k] += bool(own & set(top[:k]))
    return {k: v / len(text) for k, v in t2i.items()}, {k: v / queries for k, v in i2t.items()}


def noisy_set(n_images=40, captions_each=5, dim=16, noise=1.2, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n_images, dim)).astype(np.float32)
    owners = np.repeat(np.arange(n_images), captions_each)
    text = (images[owners] + noise * rng.normal(size=(len(owners), dim))).astype(np.float32)
    return text, images, owners


def test_matches_brute_force_with_uneven_captions_and_a_distractor_image():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(30, 8)).astype(np.float32)
    owners = np.sort(rng.integers(0, 29, size=90))  # image 29 has no caption: a distractor only
    text = (images[owners] + rng.normal(size=(90, 8))).astype(np.float32)

    metrics = recall_at_k(text, images, owners)
    t2i, i2t = brute_force(text, images, owners)

    assert metrics.t2i == pytest.approx(t2i, abs=1e-12)
    assert metrics.i2t == pytest.approx(i2t, abs=1e-12)
    assert 0 < metrics.t2i[1] < metrics.t2i[10] < 1
    assert (metrics.n_images, metrics.n_captions) == (30, 90)


def test_perfect_embeddings_give_one_everywhere():
    images = np.eye(12, dtype=np.float32)
    owners = np.repeat(np.arange(12), 5)
    metrics = recall_at_k(images[owners], images, owners)

    assert set(metrics.t2i.values()) == {1.0} and set(metrics.i2t.values()) == {1.0}
    assert metrics.mean_r1 == 1.0 and metrics.rsum == pytest.approx(600.0)


def test_chunk_size_and_order_do_not_change_results():
    text, images, owners = noisy_set()
    reference = recall_at_k(text, images, owners).as_dict()

    assert recall_at_k(text, images, owners, chunk_bytes=1).as_dict() == reference
    assert recall_at_k(text, images, owners, chunk_bytes=8 * 16 * 7).as_dict() == reference

    rng = np.random.default_rng(3)
    image_order, caption_order = rng.permutation(len(images)), rng.permutation(len(text))
    new_index = np.argsort(image_order)  # where each old image went
    shuffled = recall_at_k(text[caption_order], images[image_order], new_index[owners[caption_order]])
    assert shuffled.as_dict() == reference


def test_resolution_is_one_caption_and_one_image():
    text, images, owners = noisy_set(n_images=37, captions_each=3)
    metrics = recall_at_k(text, images, owners)

    for value in metrics.t2i.values():
        assert value * len(text) == pytest.approx(round(value * len(text)), abs=1e-9)
    for value in metrics.i2t.values():
        assert value * len(images) == pytest.approx(round(value * len(images)), abs=1e-9)


def test_ties_count_against_the_query():
    """A model that maps everything to one vector must not score: every other image ties with the right one."""
    owners = np.repeat(np.arange(20), 2)
    metrics = recall_at_k(np.ones((40, 4), np.float32), np.ones((20, 4), np.float32), owners, ks=(1, 5, 20))

    assert metrics.t2i == {1: 0.0, 5: 0.0, 20: 1.0}
    assert metrics.i2t == {1: 0.0, 5: 0.0, 20: 0.0}


def test_as_dict_has_our_names_and_clip_benchmarks():
    text, images, owners = noisy_set()
    metrics = recall_at_k(text, images, owners)
    flat = metrics.as_dict()

    for k in (1, 5, 10):
        assert flat[f"image_retrieval_recall@{k}"] == flat[f"text_to_image_recall@{k}"] == metrics.t2i[k]
        assert flat[f"text_retrieval_recall@{k}"] == flat[f"image_to_text_recall@{k}"] == metrics.i2t[k]
    assert flat["mean_recall@1"] == pytest.approx((metrics.t2i[1] + metrics.i2t[1]) / 2)
    assert flat["rsum"] == pytest.approx(100 * sum(metrics.t2i.values()) + 100 * sum(metrics.i2t.values()))


def test_bad_inputs_are_refused():
    text, images, owners = noisy_set(n_images=4, captions_each=1)
    with pytest.raises(ValueError, match="one entry a caption"):
        recall_at_k(text, images, owners[:-1])
    with pytest.raises(ValueError, match="outside"):
        recall_at_k(text, images, owners + 1)
    with pytest.raises(ValueError, match="same d|one d"):
        recall_at_k(text[:, :3], images, owners)


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_reference_rule_equals_the_strict_rule_without_ties():
    text, images, owners = noisy_set()

    metrics, ties = reference_recall(unit(text), unit(images), owners, row_batch=7)
    strict = recall_at_k(text, images, owners)

    assert ties.total == 0
    assert metrics.t2i == pytest.approx(strict.t2i, abs=1e-12) and metrics.i2t == pytest.approx(strict.i2t, abs=1e-12)
    assert ties.strict_t2i == metrics.t2i and ties.strict_i2t == metrics.i2t


def test_exact_ties_at_the_cut_are_counted_and_strict_recall_counts_them_as_misses():
    """Every image the same vector: each caption ties with all 19 other images, so from k=1 up to 19 each is a tie."""
    owners = np.repeat(np.arange(20), 2)
    same = np.ones((20, 4), np.float32) / 2

    metrics, ties = reference_recall(unit(np.ones((40, 4))), same, owners, ks=(1, 5, 20))

    assert ties.t2i == {1: 40, 5: 40, 20: 0} and ties.i2t == {1: 20, 5: 20, 20: 20}
    assert ties.strict_t2i == {1: 0.0, 5: 0.0, 20: 1.0} and ties.strict_i2t == {1: 0.0, 5: 0.0, 20: 0.0}
    assert 0 < metrics.t2i[5] < 1 and metrics.t2i[20] == 1.0  # topk picks some of the tied images
    assert recall_at_k(np.ones((40, 4), np.float32), same, owners, ks=(1, 5, 20)).t2i == ties.strict_t2i


def test_an_image_without_captions_is_a_missed_image_to_text_query_as_in_clip_benchmark():
    text, images, owners = noisy_set(n_images=10, noise=0.0)
    images = np.vstack([images, np.ones((1, images.shape[1]), np.float32)])  # image 10: no caption

    metrics, _ = reference_recall(unit(text), unit(images), owners)

    assert metrics.n_images == 11 and metrics.i2t[10] == pytest.approx(10 / 11)
