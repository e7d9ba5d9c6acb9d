"""The procedural scene testbed: determinism, split disjointness, vision tokens, answers checked
against the rendered pixels alone, and the calibrator and evaluator reading it by name."""

import hashlib
import json
import re
from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from tlq_vllm import scenes
from tlq_vllm.scenes.render import COLORS, GRID, POSITIONS, SIZES
from tlq_vllm.scenes.splits import split_of_layout


def digest(split: str, indices) -> str:
    d = hashlib.sha256()
    for i in indices:
        sample = scenes.generate(split, i)
        d.update(scenes.render_array(sample.scene).tobytes())
        d.update(json.dumps([[q.type, q.question, q.answer] for q in sample.items]).encode())
    return d.hexdigest()


def test_same_split_and_index_give_identical_pixels_and_items_on_every_machine():
    """The digest was computed once (2026-12-01, x86_64, numpy 2.3, Pillow 13): pixels come from exact
    arithmetic and questions from `random.random()` alone, so any machine must reproduce it."""
    d = hashlib.sha256()
    for split in scenes.SPLITS:
        for i in range(4):
            sample = scenes.generate(split, i)
            d.update(scenes.render_array(sample.scene).tobytes())
            d.update(json.dumps([[q.type, q.question, q.answer] for q in sample.items]).encode())
    assert d.hexdigest() == "752f7936406c465c12a8146bdc51bfebb37e6a9ac998fc5bcff537a485738747"
    assert digest("test", range(5)) == digest("test", range(5))
    pil = np.asarray(scenes.generate("train", 7).image())
    assert np.array_equal(pil, scenes.render_array(scenes.sample_scene("train", 7)))


def test_splits_are_disjoint_by_content():
    counts = {"train": 1500, "calibration": 400, "validation": 400, "test": 400}
    layouts, pixels = {}, {}
    for split, n in counts.items():
        samples = [scenes.generate(split, i) for i in range(n)]
        assert all(split_of_layout(s.scene.layout_key) == split for s in samples)
        layouts[split] = {s.scene.layout_key for s in samples}
        pixels[split] = {hashlib.sha256(scenes.render_array(s.scene).tobytes()).digest() for s in samples}
        assert len(pixels[split]) == n  # and no repeats inside a split either
    for a in scenes.SPLITS:
        for b in scenes.SPLITS:
            if a < b:
                assert not layouts[a] & layouts[b], (a, b)
                assert not pixels[a] & pixels[b], (a, b)
    with pytest.raises(ValueError, match="unknown scene split"):
        scenes.generate("dev", 0)


def test_every_image_gives_at_least_64_vision_tokens_through_qwen2_vl_processors():
    """The fixture's processor caps images at 224x224 (64 tokens); the testbed model's takes the
    280x280 canvas whole (100 tokens)."""
    from transformers import AutoProcessor

    from benchmarks.toyvlm2.train import RECIPES
    from tlq_vllm.models.tiny import make_processor
    from tlq_vllm.testing import build_fixture

    fixture = AutoProcessor.from_pretrained(build_fixture("qwen2-vl"))
    testbed = make_processor(RECIPES["toyvlm-scenes"], fixture.tokenizer, max_pixels=scenes.CANVAS**2)
    image = scenes.generate("test", 0).image()
    for processor, expected in ((fixture, 64), (testbed, 100)):
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
            add_generation_prompt=True)
        inputs = processor(text=[prompt], images=[image], return_tensors="pt")
        image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert int((inputs["input_ids"] == image_token).sum()) == expected


# ---- answers against the pixels: objects found by connected colour regions, not by the generator ----

def observed_objects(image: np.ndarray) -> list[dict]:
    """Every object in the image: one connected region of a palette colour; its shape from the
    region's fill of its bounding box and its row widths, its cell from its centre."""
    found = []
    cell = image.shape[0] / GRID
    for color, rgb in COLORS.items():
        labels, n = ndimage.label((image == rgb).all(-1))
        for region in ndimage.find_objects(labels):
            mask = labels[region] > 0
            h, w = mask.shape
            widths = mask.sum(1) / w
            fill = mask.sum() / (h * w)
            top, middle, bottom = widths[0], widths[h // 2], widths[-1]
            if fill > 0.95:
                shape = "square"
            elif fill > 0.7:  # a disc fills pi/4 of its box; the others at most 5/9
                shape = "circle"
            elif 0.25 < top < 0.45 and 0.25 < bottom < 0.45:
                shape = "cross"
            elif bottom > 0.9 and top < 0.2:
                shape = "triangle"
            else:
                assert middle > 0.9 and top < 0.2 and bottom < 0.2, (color, fill, top, middle, bottom)
                shape = "diamond"
            cy, cx = (region[0].start + region[0].stop) / 2, (region[1].start + region[1].stop) / 2
            size = "small" if max(h, w) <= 2 * SIZES["small"][1] + 1 else "large"
            assert max(h, w) <= 2 * SIZES["small"][1] + 1 or max(h, w) >= 2 * SIZES["large"][0] * 0.85 - 1
            found.append({"color": color, "shape": shape, "size": size, "row": int(cy // cell), "col": int(cx // cell)})
    return found


def cell_of(position: str) -> tuple[int, int]:
    return next((r, c) for r in range(GRID) for c in range(GRID) if POSITIONS[r][c] == position)


def resolve(ref: str, objects: list[dict]) -> dict:
    """The one object a reference names: 'cross at the top left', 'large red circle', 'square'."""
    if " at the " in ref:
        shape, position = ref.split(" at the ")
        matches = [o for o in objects if o["shape"] == shape and (o["row"], o["col"]) == cell_of(position)]
    else:
        words = ref.split()
        matches = [o for o in objects if all(w in (o["size"], o["color"], o["shape"]) for w in words)]
    assert len(matches) == 1, (ref, objects)
    return matches[0]


def expected_answer(question: str, objects: list[dict]) -> str:
    if m := re.fullmatch(r"How many objects are there\?", question):
        return str(len(objects))
    if m := re.fullmatch(r"How many (\w+) are there\?", question):
        shape = {"circles": "circle", "squares": "square", "triangles": "triangle", "diamonds": "diamond",
                 "crosses": "cross"}[m[1]]
        return str(sum(o["shape"] == shape for o in objects))
    if m := re.fullmatch(r"How many (\w+) objects are there\?", question):
        return str(sum(o["color"] == m[1] for o in objects))
    if m := re.fullmatch(r"What color is the (.+)\?", question):
        return resolve(m[1], objects)["color"]
    if m := re.fullmatch(r"What shape is at the (.+)\?", question):
        return next(o["shape"] for o in objects if (o["row"], o["col"]) == cell_of(m[1]))
    if m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", question):
        return "yes" if any((o["color"], o["shape"]) == (m[1], m[2]) for o in objects) else "no"
    if m := re.fullmatch(r"Is the (.+) (to the left of|to the right of|above|below) the (.+)\?", question):
        a, b = resolve(m[1], objects), resolve(m[3], objects)
        holds = {"to the left of": a["col"] < b["col"], "to the right of": a["col"] > b["col"],
                 "above": a["row"] < b["row"], "below": a["row"] > b["row"]}[m[2]]
        return "yes" if holds else "no"
    if m := re.fullmatch(r"Which is larger, the (.+) or the (.+)\?", question):
        a, b = resolve(m[1], objects), resolve(m[2], objects)
        if a["size"] == b["size"]:
            return "they are the same size"
        return f"the {m[1] if a['size'] == 'large' else m[2]}"
    if m := re.fullmatch(r"What is at the (.+)\?", question):
        here = [o for o in objects if (o["row"], o["col"]) == cell_of(m[1])]
        return f"a {here[0]['size']} {here[0]['color']} {here[0]['shape']}" if here else "nothing"
    raise AssertionError(f"unknown question form: {question}")


def caption_objects(caption: str) -> set[tuple]:
    phrases = re.split(r", | and ", caption.removesuffix("."))
    out = set()
    for phrase in phrases:
        m = re.fullmatch(r"a (\w+) (\w+) (\w+) (?:at|in the) (.+)", phrase)
        assert m, phrase
        out.add((m[1], m[2], m[3], cell_of(m[4])))
    return out


@pytest.mark.parametrize("split", scenes.SPLITS)
def test_answers_and_captions_match_what_the_image_shows(split):
    for index in range(40):
        sample = scenes.generate(split, index)
        objects = observed_objects(scenes.render_array(sample.scene))
        assert len(objects) == len(sample.scene.objects)
        for qa in sample.items:
            if qa.type == "caption":
                assert caption_objects(qa.answer) == {(o["size"], o["color"], o["shape"], (o["row"], o["col"]))
                                                       for o in objects}
            else:
                assert qa.answer == expected_answer(qa.question, objects), (split, index, qa)


def test_every_type_in_every_scene_and_answers_not_constant():
    samples = [scenes.generate("test", i) for i in range(300)]
    assert all(tuple(q.type for q in s.items) == scenes.TASK_TYPES for s in samples)
    answers = {t: Counter(s.items[k].answer for s in samples) for k, t in enumerate(scenes.TASK_TYPES)}
    for t in ("exist", "relation"):
        assert 0.35 < answers[t]["yes"] / 300 < 0.65, answers[t]
    for t, counter in answers.items():
        assert counter.most_common(1)[0][1] / 300 < 0.7, (t, counter.most_common(3))
    assert set(answers["count"]) >= {"0", "1", "2", "3", "4", "5"}
    assert {"nothing", "they are the same size"} <= set(answers["describe"]) | set(answers["compare"])


# ---- the tools read the scenes by name ----

def test_calibrator_records_and_evaluator_items(tmp_path, monkeypatch):
    from tlq_vllm.calibrate.data import DataError, load_records
    from tlq_vllm.eval import load_items
    from tlq_vllm.eval.__main__ import score

    monkeypatch.setenv("TLQ_CACHE_DIR", str(tmp_path))
    records = load_records("scenes:calibration", num_samples=16, seed=0)
    assert [r.source for r in records] == [r.source for r in load_records("scenes:calibration", num_samples=16, seed=0)]
    assert all(r.answer and r.images[0].is_file() and r.source.startswith("scenes:calibration:") for r in records)
    with pytest.raises(DataError, match="evaluation split"):
        load_records("scenes:test", num_samples=1, seed=0)
    items = load_items("scenes", limit=70, seed=0)
    assert {it.type for it in items} == set(scenes.QA_TYPES) and all(it.id.startswith("scenes-test:") for it in items)
    metrics = score(items, [it.answers[0] for it in items])
    assert metrics["accuracy"] == 1.0 and all(metrics[f"accuracy_{t}"] == 1.0 for t in scenes.QA_TYPES)
    wrong = score(items, ["no"] * len(items))
    assert wrong["accuracy_exist"] < 1.0 and wrong["accuracy_color"] == 0.0


def test_calibration_runs_end_to_end_on_scenes(tmp_path, monkeypatch):
    from tlq_vllm.calibrate import CalibrationConfig, run

    monkeypatch.setenv("TLQ_CACHE_DIR", str(tmp_path / "cache"))
    out = run(CalibrationConfig(model="fixture:qwen2-vl", data="scenes:calibration", method="gptq", num_samples=2,
                                output=str(tmp_path / "out"), progress=False, seed=0))
    provenance = json.loads((out / "tlq_provenance.json").read_text())
    assert provenance["calibration_set"]["source"] == "scenes:calibration"
    assert provenance["calibration_set"]["num_samples"] == 2
    assert provenance["calibration_set"]["num_tokens"] > 2 * 64
