"""The detection sets fetched from real PyPI archives (deepforest, imgaug, sahi): real files, no mocks.

Needs network to PyPI on the first fetch; without it every test that needs a set is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from repghost.detection import sources
from repghost.detection.sources import common
from repghost.detection.sources import deepforest as deepforest_source
from repghost.detection.sources import DownloadError, fetch, fetch_deepforest, fetch_quokka
from repghost.detection.sources.common import SOURCES

from conftest import OFFLINE_SKIP

# The sets come from PyPI archives (pip download on the first fetch): the `network` tier. And
# pycocotools' mask decoding (annToMask) trips a NumPy 2 deprecation inside pycocotools itself.
pytestmark = [pytest.mark.network, pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")]

# Found in the deepforest==2.1.0 wheel (deepforest/data/*.xml): 574 + 279 boxes on two YELL crops
# (2299x2472 and 1249x1035), 61 on OSBS_029 and 37 on SOAP_061 (400x400 each).
DEEPFOREST_SOURCE_BOXES = 951
ROOT = Path(__file__).resolve().parents[1]
# Source image -> (width, height, boxes).
DEEPFOREST_IMAGES = {
    "2019_YELL_2_528000_4978000_image_crop2.png": (2299, 2472, 574),
    "2019_YELL_2_541000_4977000_image_crop.png": (1249, 1035, 279),
    "OSBS_029.tif": (400, 400, 61),
    "SOAP_061.png": (400, 400, 37),
}
# sahi's terrain2_coco.json gives every car the area of the whole 1024x682 image.
TERRAIN_WRONG_AREA = 1024 * 682


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("detection-data")


def _index_answers(package: str) -> bool:
    """Whether pip's configured package index lists ``package`` (the network to it works)."""
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "index", "versions", package, "--disable-pip-version-check"],
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    # a pip without the (experimental) `index` command says nothing about the network: count it as answering,
    # so the fetch failure is reported, not skipped
    return done.returncode == 0 or "unknown command" in done.stderr.lower()


def _fetch_or_skip(name: str, cache: Path) -> Path:
    try:
        return fetch(name, cache)
    except DownloadError as e:
        package = SOURCES[name]["package"].split("==")[0]
        if _index_answers(package):
            raise  # the index answers: a real failure (a broken pin, a changed archive), not a missing network
        pytest.skip(f"cannot download the {name} source package: {OFFLINE_SKIP} (offline?): {e}")


@pytest.fixture(scope="module")
def deepforest(cache: Path) -> Path:
    return _fetch_or_skip("deepforest", cache)


@pytest.fixture(scope="module")
def quokka(cache: Path) -> Path:
    return _fetch_or_skip("quokka", cache)


@pytest.fixture(scope="module")
def terrain(cache: Path) -> Path:
    return _fetch_or_skip("terrain", cache)


def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Make every ``pip download`` child fail: no index, and find-links pointing at an empty folder."""
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------- deepforest

def test_deepforest_split_shares_no_source_image_and_tiles_overlap(deepforest: Path) -> None:
    train, val = _load(deepforest / "train.json"), _load(deepforest / "val.json")
    meta = _load(deepforest / "meta.json")
    assert meta["split_by"] == "source_image"
    for split, coco in (("train", train), ("val", val)):
        assert coco["images"], f"{split} is empty"
        assert sorted({i["source_image"] for i in coco["images"]}) == meta["splits"][split]["source_images"]
        assert sorted({i["site"] for i in coco["images"]}) == meta["splits"][split]["sites"]
    assert not {i["source_image"] for i in train["images"]} & {i["source_image"] for i in val["images"]}
    assert all(deepforest_source._site(i["source_image"]) == i["site"] for i in train["images"] + val["images"])
    # Source images sorted by name; target 0.3 * 951 = 285.3 boxes: the 574-box crop overshoots, the
    # 279-box crop gets closest, and adding OSBS (61) or SOAP (37) would move val away again.
    assert meta["splits"]["val"]["source_images"] == ["2019_YELL_2_541000_4977000_image_crop.png"]
    assert meta["splits"]["train"]["source_images"] == [
        "2019_YELL_2_528000_4978000_image_crop2.png", "OSBS_029.tif", "SOAP_061.png"]
    assert (meta["splits"]["train"]["source_boxes"], meta["splits"]["val"]["source_boxes"]) == (672, 279)
    # Split by scene, not site: YELL is in both splits (two scenes ~13 km apart).
    assert meta["splits"]["val"]["sites"] == ["YELL"]
    assert meta["splits"]["train"]["sites"] == ["OSBS", "SOAP", "YELL"]

    # The tiles of each source image cover it, 400 px square (or the whole image), neighbours sharing >= 100 px.
    tiles: dict = {}
    for image in train["images"] + val["images"]:
        x0, y0 = image["tile_origin"]
        tiles.setdefault(image["source_image"], []).append((x0, y0, x0 + image["width"], y0 + image["height"]))
    assert sorted(tiles) == sorted(DEEPFOREST_IMAGES)
    for name, rects in tiles.items():
        width, height, _ = DEEPFOREST_IMAGES[name]
        assert all(0 <= a and 0 <= b and c <= width and d <= height for a, b, c, d in rects), name
        assert all(c - a == min(400, width) and d - b == min(400, height) for a, b, c, d in rects), name
        xs, ys = sorted({r[0] for r in rects}), sorted({r[1] for r in rects})
        assert all(b - a <= 300 for a, b in zip(xs, xs[1:])) and all(b - a <= 300 for a, b in zip(ys, ys[1:])), name
        assert len(rects) == len(xs) * len(ys) and xs[0] == ys[0] == 0
        assert xs[-1] + min(400, width) == width and ys[-1] + min(400, height) == height

    # fit and tune: the training scenes in two regions that share no pixel; val's scene in neither.
    fit, tune = _load(deepforest / "fit.json"), _load(deepforest / "tune.json")
    assert {i["source_image"] for i in fit["images"]} == set(meta["splits"]["train"]["source_images"])
    assert {i["source_image"] for i in tune["images"]} == {"2019_YELL_2_528000_4978000_image_crop2.png"}
    cut = min(i["tile_origin"][1] for i in tune["images"])
    assert cut == 2472 - 618
    assert all(i["tile_origin"][1] + i["height"] <= cut for i in fit["images"] if i["source_image"] in {x["source_image"] for x in tune["images"]})


def test_deepforest_boxes_lie_inside_their_tiles(deepforest: Path) -> None:
    for split in ("train", "val"):
        coco = _load(deepforest / f"{split}.json")
        images = {i["id"]: i for i in coco["images"]}
        for image in coco["images"]:
            with Image.open(deepforest / "images" / image["file_name"]) as img:
                assert img.mode == "RGB"
                assert img.size == (image["width"], image["height"])
                assert image["width"] <= 400 and image["height"] <= 400
        assert coco["annotations"]
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            image = images[ann["image_id"]]
            assert 0 <= x and 0 <= y and x + w <= image["width"] and y + h <= image["height"], ann
            assert w >= 1 and h >= 1 and (ann["iscrowd"] == 1 or (w >= 2 and h >= 2))
            assert ann["area"] == pytest.approx(w * h)
            assert ann["category_id"] == 1 and ann["iscrowd"] in (0, 1)
        assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])


def test_deepforest_counts(deepforest: Path) -> None:
    meta = _load(deepforest / "meta.json")
    train, val = _load(deepforest / "train.json"), _load(deepforest / "val.json")
    assert meta["source_boxes"] == DEEPFOREST_SOURCE_BOXES
    assert meta["splits"]["train"]["source_boxes"] + meta["splits"]["val"]["source_boxes"] == DEEPFOREST_SOURCE_BOXES
    # Tiles (400 px, >= 100 px overlap): 2299x2472 -> 8 x 8, 1249x1035 -> 4 x 4, 400x400 -> 1 each;
    # train = the 2299x2472 crop + OSBS + SOAP, val = the 1249x1035 crop; fit = the crop's top 1854 rows
    # (8 x 6) + OSBS + SOAP, tune = its bottom 618 rows (8 x 2).
    assert len(train["images"]) == meta["splits"]["train"]["images"] == 64 + 1 + 1
    assert len(val["images"]) == meta["splits"]["val"]["images"] == 16
    assert (meta["holdout"]["fit"]["images"], meta["holdout"]["tune"]["images"]) == (48 + 2, 16)
    assert meta["boxes_outside_image"] == 0
    for split, coco in (("train", train), ("val", val)):
        crowd = sum(a["iscrowd"] for a in coco["annotations"])
        assert crowd > 0 and meta["splits"][split]["crowd"] == crowd
        assert meta["splits"][split]["boxes"] == len(coco["annotations"]) - crowd
    # A crown in an overlap is a label in several tiles; the single-tile scenes keep their boxes one for one.
    per_source: dict = {}
    for coco in (train, val):
        source_of = {i["id"]: i["source_image"] for i in coco["images"]}
        for ann in coco["annotations"]:
            if not ann["iscrowd"]:
                per_source[source_of[ann["image_id"]]] = per_source.get(source_of[ann["image_id"]], 0) + 1
    assert all(per_source[name] > boxes for name, (_, _, boxes) in DEEPFOREST_IMAGES.items() if name.startswith("2019"))
    assert all(per_source[name] == boxes for name, (_, _, boxes) in DEEPFOREST_IMAGES.items() if not name.startswith("2019"))
    assert meta["license"] == "MIT" and meta["source"] == "deepforest==2.1.0"


def test_scene_statistics_count_each_crown_once_across_overlapping_tiles(deepforest: Path) -> None:
    # benchmarks/deepforest_scenes.py (docs/detection.md's scene table) maps tile boxes back to their
    # scene: every scene must come back with the crowns its source annotation file holds.
    import importlib.util

    spec = importlib.util.spec_from_file_location("deepforest_scenes", ROOT / "benchmarks" / "deepforest_scenes.py")
    scenes_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scenes_module)
    scenes = {}
    for split in ("train", "val"):
        scenes.update(scenes_module.scene_stats(_load(deepforest / f"{split}.json")))
    assert {name: s["crowns"] for name, s in scenes.items()} == {
        name: boxes for name, (_, _, boxes) in DEEPFOREST_IMAGES.items()}
    for name, (width, height, _) in DEEPFOREST_IMAGES.items():
        assert scenes[name]["scene_px"] == [width, height]
        assert 0 < scenes[name]["box_cover"] < 1
    # The fit and tune regions split the large training scene's crowns between them.
    crop = "2019_YELL_2_528000_4978000_image_crop2.png"
    fit, tune = (scenes_module.scene_stats(_load(deepforest / f"{part}.json"))[crop] for part in ("fit", "tune"))
    assert fit["crowns"] + tune["crowns"] == DEEPFOREST_IMAGES[crop][2]
    assert fit["scene_px"][0] == tune["scene_px"][0] == DEEPFOREST_IMAGES[crop][0]


def test_all_sets_load_with_pycocotools(deepforest: Path, quokka: Path, terrain: Path) -> None:
    expected = {deepforest / "train.json": "tree", deepforest / "val.json": "tree",
                quokka / "annotations.json": "quokka", terrain / "annotations.json": "car"}
    for path, category in expected.items():
        coco = COCO(str(path))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == [category]
        assert coco.getAnnIds()
        for image in coco.dataset["images"]:
            assert (path.parent / "images" / image["file_name"]).is_file()


# ------------------------------------------------------------------------------------------- quokka

def test_quokka_polygon_and_area(quokka: Path) -> None:
    coco = COCO(str(quokka / "annotations.json"))
    (ann,) = coco.dataset["annotations"]
    (image,) = coco.dataset["images"]
    with Image.open(quokka / "images" / "quokka.jpg") as img:
        assert img.size == (image["width"], image["height"]) == (960, 643)
    (polygon,) = ann["segmentation"]
    assert len(polygon) == 2 * 39
    xs, ys = polygon[0::2], polygon[1::2]
    assert max(xs) <= image["width"] and max(ys) <= image["height"]
    assert ann["bbox"] == [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    pixels = int(coco.annToMask(ann).sum())
    assert ann["area"] == pixels
    assert 0.25 * ann["bbox"][2] * ann["bbox"][3] < pixels < ann["bbox"][2] * ann["bbox"][3]


# ------------------------------------------------------------------------------------------- terrain

def test_terrain_areas_recomputed(terrain: Path) -> None:
    coco = COCO(str(terrain / "annotations.json"))
    anns = coco.dataset["annotations"]
    assert len(anns) == 5
    (image,) = coco.dataset["images"]
    with Image.open(terrain / "images" / image["file_name"]) as img:
        assert img.mode == "RGB" and img.size == (image["width"], image["height"]) == (1024, 682)
    for ann in anns:
        assert ann["area"] != TERRAIN_WRONG_AREA
        assert ann["area"] == int(coco.annToMask(ann).sum()) > 0
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], image["height"], image["width"]))
        assert ann["area"] == int(mask_utils.area(rle))
        x, y, w, h = ann["bbox"]
        assert w * h == pytest.approx(ann["area"], rel=0.05)  # the polygons are rectangles
    fixed = _load(terrain / "meta.json")["fixed"]
    assert sorted(f["annotation_id"] for f in fixed if f["field"] == "area") == [1, 2, 3, 4, 5]
    assert all(f["was"] == TERRAIN_WRONG_AREA for f in fixed if f["field"] == "area")


# ------------------------------------------------------------------------------------------- caching

def test_second_fetch_uses_the_cache_without_network(deepforest: Path, quokka: Path, terrain: Path,
                                                     monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cache = deepforest.parent
    before = {p: (p.stat().st_ino, (p / "meta.json").stat().st_ino) for p in (deepforest, quokka, terrain)}
    listing = sorted(os.listdir(cache))
    _offline(monkeypatch, tmp_path)
    assert fetch_deepforest(cache) == deepforest
    assert fetch("quokka", cache) == quokka
    assert fetch("terrain", cache) == terrain
    assert {p: (p.stat().st_ino, (p / "meta.json").stat().st_ino) for p in before} == before
    assert sorted(os.listdir(cache)) == listing  # no staging folder was made


def test_failed_fetch_raises_and_leaves_nothing_behind(deepforest: Path, monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    _offline(monkeypatch, tmp_path)
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="PyPI") as info:
        fetch_quokka(fresh)
    assert "imgaug==0.4.0" in str(info.value)
    assert os.listdir(fresh) == []

    # Other options need a new set; its failed download keeps the cached one as it was.
    cache = deepforest.parent
    meta = (deepforest / "meta.json").read_text()
    listing = sorted(os.listdir(cache))
    with pytest.raises(DownloadError):
        fetch_deepforest(cache, val_fraction=0.5)
    assert (deepforest / "meta.json").read_text() == meta
    assert sorted(os.listdir(cache)) == listing


# ------------------------------------------------------------------------------------------- small parts

def test_fetch_rejects_unknown_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="deepforest, quokka, terrain"):
        fetch("coco2017", tmp_path)
    assert sorted(sources.SOURCES) == ["deepforest", "quokka", "terrain"]
    assert all(s["license"] == "MIT" and "==" in s["package"] for s in sources.SOURCES.values())


def test_default_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REPGHOST_DATA", str(tmp_path / "data"))
    assert sources.default_cache() == tmp_path / "data"
    monkeypatch.delenv("REPGHOST_DATA")
    assert sources.default_cache() == Path.home() / ".cache" / "repghost" / "data"


def test_tiling_and_site_helpers() -> None:
    assert deepforest_source._tile_spans(1249, 400, 100) == [(0, 400), (283, 400), (566, 400), (849, 400)]
    assert deepforest_source._tile_spans(700, 400, 100) == [(0, 400), (300, 400)]
    assert deepforest_source._tile_spans(800, 400, 0) == [(0, 400), (400, 400)]
    assert deepforest_source._tile_spans(300, 400, 100) == [(0, 300)]
    assert deepforest_source._tile_spans(400, 400, 100) == [(0, 400)]
    for size in (401, 1035, 2299, 2472):
        for overlap in (0, 50, 100):
            spans = deepforest_source._tile_spans(size, 400, overlap)
            assert spans[0][0] == 0 and spans[-1][0] + spans[-1][1] == size and all(length == 400 for _, length in spans)
            shared = [a + 400 - b for (a, _), (b, _) in zip(spans, spans[1:])]
            assert min(shared) >= overlap, (size, overlap, shared)
            assert len(spans) == 1 or len(deepforest_source._tile_spans(size, 400, overlap)) == 1 + -(-(size - 400) // (400 - overlap))
    with pytest.raises(ValueError):
        deepforest_source._tile_spans(0, 400)
    with pytest.raises(ValueError, match="overlap"):
        deepforest_source._tile_spans(800, 400, 400)
    assert deepforest_source._site("2019_YELL_2_528000_4978000_image_crop2.png") == "YELL"
    assert deepforest_source._site("OSBS_029.tif") == "OSBS"
    assert deepforest_source._site("image_crop.png") is None
    assert deepforest_source._split_groups({"OSBS": 61, "SOAP": 37, "YELL": 853}, 0.3) == ["OSBS", "SOAP"]
    assert deepforest_source._split_groups({name: boxes for name, (_, _, boxes) in DEEPFOREST_IMAGES.items()}, 0.3) == [
        "2019_YELL_2_541000_4977000_image_crop.png"]
    assert deepforest_source._split_groups({"A": 900, "B": 100}, 0.3) == ["B"]
    assert deepforest_source._split_groups({"A": 50, "B": 60}, 0.9) == ["A"]  # one group always stays in train


def test_overlapping_tiles_label_visible_crowns_and_mark_remainders_crowd() -> None:
    """A 700x300 region cut into two 400 px tiles overlapping by 100 px (x 0-400 and 300-700)."""
    B = deepforest_source._Box
    boxes = [
        B(310, 10, 390, 60),    # inside the overlap: a whole label in both tiles
        B(350, 100, 450, 150),  # half in the first tile, whole in the second
        B(380, 200, 480, 260),  # a fifth in the first tile, whole in the second
        B(10, 10, 50, 50),      # first tile only
        B(399.5, 250, 420, 290),  # a 0.5 px sliver in the first tile: not there at all
    ]
    tiles = deepforest_source._tile_annotations(700, 300, boxes, tile=400, overlap=100, min_visibility=0.5)
    assert [(t["x0"], t["y0"], t["width"], t["height"]) for t in tiles] == [(0, 0, 400, 300), (300, 0, 400, 300)]
    first, second = ({tuple(b): crowd for b, crowd in t["boxes"]} for t in tiles)
    assert first == {(310, 10, 80, 50): 0, (350, 100, 50, 50): 0, (380, 200, 20, 60): 1, (10, 10, 40, 40): 0}
    assert second == {(10, 10, 80, 50): 0, (50, 100, 100, 50): 0, (80, 200, 100, 60): 0, (99.5, 250, 20.5, 40): 0}
    # A stricter threshold turns the half-visible crown into a crowd region; every crown stays labelled somewhere.
    strict = deepforest_source._tile_annotations(700, 300, boxes, tile=400, overlap=100, min_visibility=0.6)
    assert {tuple(b): c for b, c in strict[0]["boxes"]}[(350, 100, 50, 50)] == 1
    # A region's origin moves the tiles, not the boxes' reference: tile pixels stay relative to the tile.
    moved = deepforest_source._tile_annotations(400, 300, boxes, tile=400, overlap=100, min_visibility=0.5, origin=(300, 0))
    assert [(t["x0"], t["y0"]) for t in moved] == [(300, 0)] and moved[0]["boxes"] == tiles[1]["boxes"]
    assert deepforest_source._tune_band(2299, 2472, 400, 0.25) == (1854, 618)
    assert deepforest_source._tune_band(400, 400, 400, 0.25) is None and deepforest_source._tune_band(2299, 2472, 400, 0.0) is None


def test_an_older_cached_layout_is_rebuilt_not_reused(tmp_path: Path) -> None:
    folder = tmp_path / "deepforest"
    folder.mkdir()
    want = deepforest_source._deepforest_want(400, 100, 0.5, 0.3, 0.25)
    (folder / "meta.json").write_text(json.dumps({**want, "format": 2}))  # the non-overlapping tiles of format 2
    assert not common._cached(folder, want)
    (folder / "meta.json").write_text(json.dumps(want))
    assert common._cached(folder, want)


def test_to_rgb_converts_16_bit_and_alpha() -> None:
    grey16 = Image.fromarray(np.array([[0, 65535], [257, 32896]], dtype=np.uint16))
    assert grey16.mode.startswith("I;16")
    rgb = np.asarray(common._to_rgb(grey16))
    assert rgb.shape == (2, 2, 3) and rgb[..., 0].tolist() == [[0, 255], [1, 128]]
    rgba = Image.fromarray(np.array([[[200, 100, 50, 0], [200, 100, 50, 255]]], dtype=np.uint8), "RGBA")
    assert np.asarray(common._to_rgb(rgba)).tolist() == [[[0, 0, 0], [200, 100, 50]]]
