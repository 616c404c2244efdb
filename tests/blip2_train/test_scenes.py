"""The synthetic scene generator and the caption-file readers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blip2_embed.images import ImageSpec
from blip2_train.data import BatchSampler, CaptionDataset, load_captions
from blip2_train.scenes import (
    COLOURS,
    SHAPES,
    VOCABULARY,
    SceneRecord,
    captions_for,
    colour_and_shape_named,
    generate_dataset,
    iter_scenes,
    read_records,
    render,
    sample_scene,
)


def test_same_seed_same_scenes_and_pixels() -> None:
    a, b = sample_scene(5, 17), sample_scene(5, 17)
    assert a == b
    assert np.array_equal(np.asarray(render(a, 64)), np.asarray(render(b, 64)))
    assert sample_scene(6, 17) != a or sample_scene(5, 18) != a


def test_unique_scenes_have_distinct_caption_keys() -> None:
    scenes = list(iter_scenes(3, 300))
    assert len({s.key() for s in scenes}) == 300


def test_captions_name_every_attribute_in_varied_phrasings() -> None:
    for index in range(50):
        scene = sample_scene(1, index, max_objects=2)
        caps = captions_for(scene, 5)
        assert len(set(caps)) == len(caps) >= 2
        for cap in caps:
            assert scene.background in cap.split()
            objects = [{"colour": o.colour, "shape": o.shape} for o in scene.objects]
            assert colour_and_shape_named(cap, objects), cap
            assert set(cap.split()) <= set(VOCABULARY), cap


def test_render_draws_the_object_colour() -> None:
    scene = sample_scene(0, 0)
    obj = scene.objects[0]
    pixels = np.asarray(render(scene, 96)).reshape(-1, 3).astype(int)
    distance = np.abs(pixels - np.array(COLOURS[obj.colour])).sum(axis=1)
    assert (distance < 60).mean() > 0.01  # some pixels have the object's colour


def test_generate_dataset_layouts_are_readable(tmp_path: Path) -> None:
    records = generate_dataset(tmp_path, 12, seed=4, image_size=48, max_objects=2, captions_per_image=3)
    assert len(records) == 12 == len(read_records(tmp_path))
    with Image.open(tmp_path / records[0].image) as im:
        assert im.size == (48, 48) and im.mode == "RGB"
    from_jsonl = load_captions(tmp_path)
    from_karpathy = load_captions(tmp_path / "karpathy.json", split="test")
    assert [i.image for i in from_jsonl] == [i.image for i in from_karpathy]
    assert [i.captions for i in from_jsonl] == [i.captions for i in from_karpathy]
    assert all(i.image.is_file() and len(i.captions) == 3 for i in from_jsonl)
    assert {o["shape"] for r in records for o in r.objects} <= set(SHAPES)


def test_other_caption_layouts(tmp_path: Path) -> None:
    img = tmp_path / "imgs" / "a.png"
    img.parent.mkdir()
    Image.new("RGB", (8, 8)).save(img)
    coco = {
        "images": [{"id": 7, "file_name": "a.png"}],
        "annotations": [{"image_id": 7, "caption": "one"}, {"image_id": 7, "caption": "two"}],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    assert load_captions(tmp_path / "coco.json", image_root=tmp_path / "imgs")[0].captions == ("one", "two")
    (tmp_path / "lavis.json").write_text(json.dumps([{"image": "imgs/a.png", "caption": ["x", "y"]}]))
    assert load_captions(tmp_path / "lavis.json")[0].image == img
    (tmp_path / "c.jsonl").write_text(json.dumps({"file_name": "imgs/a.png", "caption": "z"}) + "\n")
    assert load_captions(tmp_path / "c.jsonl")[0].captions == ("z",)
    img.with_suffix(".txt").write_text("first\n\nsecond\n")
    assert load_captions(tmp_path / "imgs")[0].captions == ("first", "second")
    with pytest.raises(ValueError):
        load_captions(tmp_path / "c.jsonl", split="test")


def test_batch_sampler_is_a_function_of_the_step() -> None:
    a, b = BatchSampler(10, 4, seed=1), BatchSampler(10, 4, seed=1)
    assert [a.batch(s)[0] for s in range(5)] == [b.batch(s)[0] for s in reversed(range(5))][::-1]
    first_epoch = a.batch(0)[0] + a.batch(1)[0]
    assert len(set(first_epoch)) == 8  # distinct images within an epoch


def test_queries_are_partial_descriptions_shared_by_every_image_they_describe(tmp_path: Path) -> None:
    records = generate_dataset(tmp_path, 40, seed=8, image_size=32, captions_per_image=2, queries=True)
    for rec in records:
        obj = rec.objects[0]
        assert {f"a {obj['colour']} {obj['shape']}", f"the {obj['colour']} {obj['shape']}"} <= set(
            rec.queries
        )
        for q in rec.queries:
            assert obj["shape"] in q.split() and set(q.split()) <= set(VOCABULARY), q
    items = load_captions(tmp_path)
    assert [list(i.queries) for i in items] == [r.queries for r in records]
    generate_dataset(tmp_path / "plain", 2, seed=8, image_size=32)
    assert "queries" not in (tmp_path / "plain" / "captions.jsonl").read_text()  # layout unchanged
    dataset = CaptionDataset(items, ImageSpec(size=32))
    texts = dataset.sample_captions(range(40), random.Random(0), query_ratio=1.0)
    assert all(t in items[i].queries for i, t in enumerate(texts))
    positive = dataset.positives(list(range(40)), texts)
    for i in range(40):
        for j in range(40):
            # A text is a positive of every image it describes ("a red circle": all red circles).
            assert bool(positive[i, j]) == (i == j or texts[j] in items[i].texts())
    assert positive.sum() > 40  # some texts describe several images of the batch
    assert dataset.sample_captions([0], random.Random(0))[0] in items[0].captions  # default: captions


def _attributes(text: str) -> set[str]:
    """The attribute words of a single-object caption (colour, shape, background, size, position)."""
    from blip2_train.scenes import BACKGROUNDS, POSITION_PHRASES, SIZE_WORDS

    found = {w for w in text.split() if w in COLOURS or w in SHAPES or w in BACKGROUNDS}
    found |= {size for size, words in SIZE_WORDS.items() for w in words if f" {w} " in f" {text} "}
    # The longest phrase wins: "at the top" is inside "at the top left".
    where = max((p for phrases in POSITION_PHRASES.values() for p in phrases if p in text), key=len)
    found |= {pos for pos, phrases in POSITION_PHRASES.items() if where in phrases}
    return found


def test_negatives_are_captions_with_one_attribute_changed(tmp_path: Path) -> None:
    records = generate_dataset(tmp_path, 30, seed=8, image_size=32, captions_per_image=3, negatives=True)
    changed: dict[str, int] = {}
    for rec in records:
        obj = rec.objects[0]
        truth = {obj["colour"], obj["shape"], obj["size"], obj["position"], rec.background}
        assert len(rec.negatives) >= 4
        for neg in rec.negatives:
            assert neg not in rec.captions and set(neg.split()) <= set(VOCABULARY)
            words = _attributes(neg)
            lost = truth - words
            assert len(lost) == 1, (neg, truth)
            kind = next(k for k, v in obj.items() if v in lost) if lost - {rec.background} else "background"
            changed[kind] = changed.get(kind, 0) + 1
    assert set(changed) == {"colour", "shape", "size", "position", "background"}
    assert changed["position"] > changed["shape"]  # positions twice: what the model learns last
    items = load_captions(tmp_path)
    assert [list(i.negatives) for i in items] == [r.negatives for r in records]
    generate_dataset(tmp_path / "plain", 2, seed=8, image_size=32)
    assert "negatives" not in (tmp_path / "plain" / "captions.jsonl").read_text()  # layout unchanged
    dataset = CaptionDataset(items, ImageSpec(size=32))
    negs = dataset.sample_negatives(range(30), random.Random(0))
    assert negs is not None and all(n in items[i].negatives for i, n in enumerate(negs))
    # A negative that is another image's own text counts as describing that image.
    texts = [*negs[:-1], items[0].captions[0]]
    described = dataset.described(list(range(30)), texts)
    assert described.shape == (30, 30) and bool(described[0, 29]) and described.sum() == 1
    assert (
        CaptionDataset(load_captions(tmp_path / "plain"), ImageSpec(size=32)).sample_negatives(
            [0], random.Random(0)
        )
        is None
    )


def test_look_alike_batches_pair_scenes_that_differ_in_one_attribute(tmp_path: Path) -> None:
    records = generate_dataset(tmp_path, 400, seed=8, image_size=16, captions_per_image=1, negatives=True)
    by_image = {r.image: r for r in records}

    def attributes(r: SceneRecord) -> set[tuple[str, str]]:
        return {*r.objects[0].items(), ("background", r.background)}

    assert sum(len(r.near) for r in records) > 400  # most scenes have look-alikes among 400
    for rec in records:
        for other in rec.near:
            assert len(attributes(rec) - attributes(by_image[other])) == 1
    dataset = CaptionDataset(load_captions(tmp_path), ImageSpec(size=16))
    near = dataset.near_indices()
    sampler = BatchSampler(len(dataset), 16, seed=3, near=near, near_ratio=0.5)
    again = BatchSampler(len(dataset), 16, seed=3, near=near, near_ratio=0.5)
    for step in (0, 7, 30):
        batch, _ = sampler.batch(step)
        assert batch == again.batch(step)[0]  # a function of (seed, step): resume sees the same
        assert len(batch) == 16 == len(set(batch))
        anchors, added = batch[:8], batch[8:]
        paired = sum(any(j in near[a] for a in anchors) for j in added)
        assert paired >= 6, (anchors, added)  # the other half: look-alikes of the first
    assert sampler.per_epoch == 400 // 8
    plain = BatchSampler(len(dataset), 16, seed=3)
    assert len(plain.batch(0)[0]) == 16 and plain.per_epoch == 400 // 16


def test_blind_recall_is_the_ceiling_of_a_model_blind_to_one_attribute() -> None:
    from blip2_train.evaluate import blind_recall

    def rec(position: str, colour: str = "red") -> SceneRecord:
        obj = {"colour": colour, "shape": "circle", "size": "small", "position": position}
        return SceneRecord(image="x.png", captions=["c"], background="navy", objects=[obj])

    # Three red circles differ only in position (each found 1 time in 3), the blue one is unique.
    records = [rec("top"), rec("left"), rec("center"), rec("top", colour="blue")]
    assert blind_recall(records, "position") == pytest.approx((3 * (1 / 3) + 1) / 4)
    assert blind_recall(records, "colour") == pytest.approx((2 * 0.5 + 2) / 4)  # the two at the top
    assert blind_recall(records, "background") == 1.0


def test_look_alikes_can_be_limited_to_position(tmp_path: Path) -> None:
    from blip2_train.scenes import look_alikes

    records = generate_dataset(
        tmp_path,
        300,
        seed=8,
        image_size=16,
        captions_per_image=1,
        negatives=True,
        near_attributes=["position"],
    )
    by_image = {r.image: r for r in records}
    assert any(r.near for r in records)
    for rec in records:
        for other in rec.near:
            a, b = rec.objects[0], by_image[other].objects[0]
            assert a["position"] != b["position"]
            assert (a["colour"], a["shape"], a["size"], rec.background) == (
                b["colour"],
                b["shape"],
                b["size"],
                by_image[other].background,
            )
    with pytest.raises(ValueError, match="unknown scene attributes"):
        look_alikes([], ["location"])


@pytest.mark.parametrize(("value", "says"), [("location", "unknown scene attributes"), (" , ", "no scene")])
def test_cli_bad_near_attributes_are_a_usage_error_before_any_image(
    tmp_path: Path, value: str, says: str
) -> None:
    from typer.testing import CliRunner

    from blip2_search.cli import app

    out = tmp_path / "scenes"
    args = ["scenes", str(out), "--n", "3", "--negatives", "--near-attributes", value]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "--near-attributes" in result.output and says in result.output and "position" in result.output
    assert "Traceback" not in result.output
    assert not list(out.rglob("*.png"))
    with pytest.raises(ValueError, match="unknown scene attributes"):  # the library call fails as early
        generate_dataset(out, 3, negatives=True, near_attributes=["location"])
    assert not list(out.rglob("*.png"))
