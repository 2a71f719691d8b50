"""Each annotation format people have for Flickr30K (and their own sets) reads into the same captioned set."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from clipsearch.lab.datasets import (
    CaptionedSet,
    DatasetError,
    flickr30k_test_problems,
    load_captioned_set,
)

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
FLICKR_NAMES = ("1000092795.jpg", "10002456.jpg", "1007129816.jpg", "2199200615.jpg")
TEST_CAPTIONS = {
    "1007129816.jpg": (
        "The man with pierced ears is wearing glasses and an orange hat .",
        "A man with glasses is wearing a beer can crocheted hat .",
    ),
    "2199200615.jpg": ("A dog runs across the grass .",),
}


def make_images(folder: Path, names) -> Path:
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), "red").save(path)
    return folder


@pytest.fixture
def flickr_images(tmp_path: Path) -> Path:
    return make_images(tmp_path / "flickr30k-images", FLICKR_NAMES)


def captions_by_name(captioned: CaptionedSet) -> dict[str, tuple[str, ...]]:
    return {item.path.name: item.captions for item in captioned.items}


def test_karpathy_json_keeps_its_splits_and_absolute_paths(flickr_images: Path):
    captioned = load_captioned_set(FIXTURES / "dataset_flickr30k.json", flickr_images)

    assert captioned.source_format == "karpathy-json"
    assert [item.split for item in captioned.items] == ["train", "val", "test", "test"]
    assert all(item.path.is_absolute() and item.path.is_file() for item in captioned.items)
    assert captions_by_name(captioned.split("test")) == TEST_CAPTIONS
    assert captions_by_name(load_captioned_set(FIXTURES / "dataset_flickr30k.json", flickr_images, "test")) == (
        TEST_CAPTIONS
    )


def test_token_file_takes_its_split_from_the_karpathy_json(flickr_images: Path):
    token = FIXTURES / "results_20130124.token"
    everything = load_captioned_set(token, flickr_images)
    test = load_captioned_set(token, flickr_images, "test", split_file=FIXTURES / "dataset_flickr30k.json")

    assert everything.source_format == "flickr30k-token"
    assert len(everything.items) == 4 and everything.n_captions == 6
    assert captions_by_name(test) == TEST_CAPTIONS


def test_token_file_takes_its_split_from_a_list_of_image_names(flickr_images: Path):
    test = load_captioned_set(
        FIXTURES / "results_20130124.token", flickr_images, "test", split_file=FIXTURES / "test_images.txt"
    )
    assert captions_by_name(test) == TEST_CAPTIONS


def test_a_split_asked_of_annotations_without_one_says_how_to_give_it(flickr_images: Path):
    with pytest.raises(DatasetError, match="no train/val/test split.*--split-file"):
        load_captioned_set(FIXTURES / "results_20130124.token", flickr_images, "test")


def test_kaggle_csv_including_its_malformed_row(flickr_images: Path):
    captioned = load_captioned_set(FIXTURES / "results.csv", flickr_images)

    assert captioned.source_format == "kaggle-csv"
    assert captions_by_name(captioned)["2199200615.jpg"] == ("A dog runs across the grass .",)
    assert captions_by_name(captioned)["1000092795.jpg"] == (
        "Two young guys with shaggy hair look at their hands .",
        "Two friends enjoy time spent together .",
    )
    assert captioned.n_captions == 6


def test_clip_benchmark_txt_keeps_commas_inside_captions(flickr_images: Path):
    captioned = load_captioned_set(FIXTURES / "flickr30k_test_karpathy.txt", flickr_images)

    assert captioned.source_format == "image-caption-csv"
    assert captions_by_name(captioned) == {
        "1007129816.jpg": (
            "The man with pierced ears is wearing glasses and an orange hat .",
            "A man with glasses, a beard, and a beer can crocheted hat .",
        ),
        "2199200615.jpg": ("A dog runs across the grass, fast .",),
    }


def test_csv_with_json_caption_lists_and_a_split_column(flickr_images: Path):
    captioned = load_captioned_set(FIXTURES / "test_1k_flickr.csv", flickr_images, "test")

    assert captioned.source_format == "caption-list-csv"
    assert captions_by_name(captioned) == TEST_CAPTIONS


@pytest.mark.parametrize("name", ["captions.csv", "captions.jsonl"])
def test_custom_image_caption_files_in_subfolders(tmp_path: Path, name: str):
    images = make_images(tmp_path / "photos", ["beach/sunset.jpg", "cat.png"])
    captioned = load_captioned_set(FIXTURES / name, images)

    assert captions_by_name(captioned)["sunset.jpg"] == (
        "An orange sky over the sea, at dusk",
        "Waves under a red sunset",
    )
    assert captioned.items[0].path == (images / "beach" / "sunset.jpg").resolve()


def test_custom_csv_split_column(tmp_path: Path):
    images = make_images(tmp_path / "photos", ["beach/sunset.jpg", "cat.png"])
    assert [item.path.name for item in load_captioned_set(FIXTURES / "captions.csv", images, "train").items] == [
        "cat.png"
    ]


def test_unknown_format_fails_with_what_was_expected(flickr_images: Path):
    with pytest.raises(DatasetError, match="cannot tell the format.*Karpathy"):
        load_captioned_set(FIXTURES / "unknown_format.txt", flickr_images)


def test_missing_images_are_named_and_can_be_skipped(tmp_path: Path):
    images = make_images(tmp_path / "imgs", ["1007129816.jpg"])
    annotations = FIXTURES / "dataset_flickr30k.json"

    with pytest.raises(DatasetError, match=r"1 of 2 images are not found.*2199200615\.jpg.*--allow-missing"):
        load_captioned_set(annotations, images, "test")
    partial = load_captioned_set(annotations, images, "test", allow_missing=True)
    assert [item.path.name for item in partial.items] == ["1007129816.jpg"]
    assert [item.path.name for item in partial.missing] == ["2199200615.jpg"]
    assert any("1 images not found (e.g. 2199200615.jpg)" in p for p in flickr30k_test_problems(partial))


def test_wrong_images_folder_is_reported_as_such(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="none of the 2 images.*--images"):
        load_captioned_set(FIXTURES / "dataset_flickr30k.json", empty, "test")


def test_flickr30k_size_check_names_the_difference(flickr_images: Path):
    test = load_captioned_set(FIXTURES / "dataset_flickr30k.json", flickr_images, "test")
    problems = flickr30k_test_problems(test)
    assert any("2 images and 3 captions" in problem and "1,000 and 5,000" in problem for problem in problems)


def test_flickr30k_size_check_passes_on_a_full_split(tmp_path: Path):
    from clipsearch.lab.datasets import CaptionedImage

    items = tuple(CaptionedImage(tmp_path / f"{i}.jpg", ("a",) * 5, "test") for i in range(1000))
    assert flickr30k_test_problems(CaptionedSet(items, "karpathy-json")) == []
