"""Questions, answers and captions from a scene: seven question types and a caption.

Each scene yields one item of every type, in TASK_TYPES order, chosen by the scene's own
question stream (so items too are a pure function of (split, index)):

| type     | example question                                      | answer                      |
|----------|-------------------------------------------------------|-----------------------------|
| count    | How many crosses are there? / ... red objects ...     | a digit, 0-5                |
| color    | What color is the large triangle?                     | a colour                    |
| shape    | What shape is at the top right?                       | a shape                     |
| exist    | Is there a blue square?                               | yes / no (half each)        |
| relation | Is the red circle to the left of the small cross?     | yes / no (half each)        |
| compare  | Which is larger, the blue square or the green cross?  | the blue square / they are the same size |
| describe | What is at the bottom middle?                         | a small red triangle / nothing |
| caption  | Describe the image.                                   | every object, reading order (16-40 tokens) |

Objects are named by the shortest description that is unique in the scene (shape; colour and
shape; size and shape; size, colour and shape); a colour question never names the colour and
falls back to the position when nothing else is unique. A "no" to an existence question is a
near miss (a colour or a shape the scene has, in a combination it does not have), so the answer
needs the binding of colour to shape, not just a list of what is present.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tlq_vllm.scenes.render import COLORS, GRID, POSITIONS, SHAPES, Scene, SceneObject, pick
from tlq_vllm.scenes.splits import stream_seed

QA_TYPES = ("count", "color", "shape", "exist", "relation", "compare", "describe")
TASK_TYPES = (*QA_TYPES, "caption")
CAPTION_PROMPT = "Describe the image."
RELATIONS = ("to the left of", "to the right of", "above", "below")


@dataclass(frozen=True)
class QAItem:
    type: str
    question: str
    answer: str


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def noun_phrase(o: SceneObject) -> str:
    return f"{o.size} {o.color} {o.shape}"


def where(o: SceneObject) -> str:
    return "in the center" if o.position == "center" else f"at {o.position}"


def caption(scene: Scene) -> str:
    """Every object in reading order: 'a large red circle at top left, ... and a small blue
    cross in the center.' (16-40 tokens with the testbed model's tokenizer)"""
    phrases = [f"a {noun_phrase(o)} {where(o)}" for o in scene.objects]
    return (", ".join(phrases[:-1]) + " and " + phrases[-1] + ".") if len(phrases) > 1 else phrases[0] + "."


def reference(o: SceneObject, scene: Scene, *, use_color: bool = True) -> str:
    """The shortest unique description of `o` (without its position when one exists)."""
    forms = [lambda x: x.shape, lambda x: f"{x.size} {x.shape}"]
    if use_color:
        forms[1:1] = [lambda x: f"{x.color} {x.shape}"]
        forms.append(noun_phrase)
    for form in forms:
        if sum(form(x) == form(o) for x in scene.objects) == 1:
            return form(o)
    return f"{o.shape} at the {o.position}"


def relation_holds(a: SceneObject, b: SceneObject, relation: str) -> bool | None:
    """Whether a is `relation` b by grid cell; None when the cells do not decide it (same column
    for left/right, same row for above/below)."""
    horizontal = relation in RELATIONS[:2]
    delta = (a.col - b.col) if horizontal else (a.row - b.row)
    if delta == 0:
        return None
    return (delta < 0) if relation in ("to the left of", "above") else (delta > 0)


def count_item(scene: Scene, rng: random.Random) -> QAItem:
    variant = pick(rng, ("objects", "shape", "color"))
    if variant == "objects":
        return QAItem("count", "How many objects are there?", str(len(scene.objects)))
    present = rng.random() < 0.5  # half the time about something the scene has, else any value
    if variant == "shape":
        shape = pick(rng, [o.shape for o in scene.objects]) if present else pick(rng, SHAPES)
        n = sum(o.shape == shape for o in scene.objects)
        return QAItem("count", f"How many {plural(shape)} are there?", str(n))
    color = pick(rng, [o.color for o in scene.objects]) if present else pick(rng, tuple(COLORS))
    n = sum(o.color == color for o in scene.objects)
    return QAItem("count", f"How many {color} objects are there?", str(n))


def exist_item(scene: Scene, rng: random.Random) -> QAItem:
    have = {(o.color, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        color, shape = pick(rng, sorted(have))
        return QAItem("exist", f"Is there {article(color)} {color} {shape}?", "yes")
    o = pick(rng, scene.objects)
    misses = sorted(({(o.color, s) for s in SHAPES} | {(c, o.shape) for c in COLORS}) - have)
    color, shape = pick(rng, misses)
    return QAItem("exist", f"Is there {article(color)} {color} {shape}?", "no")


def relation_item(scene: Scene, rng: random.Random) -> QAItem:
    want = rng.random() < 0.5
    options = [(a, b, rel) for a in scene.objects for b in scene.objects if a is not b
               for rel in RELATIONS if relation_holds(a, b, rel) is want]
    if not options:  # every pair in one row and column is impossible with 2+ objects; kept for safety
        raise AssertionError("no decidable relation in a scene with two or more objects")
    a, b, rel = pick(rng, options)
    return QAItem("relation", f"Is the {reference(a, scene)} {rel} the {reference(b, scene)}?",
                  "yes" if want else "no")


def compare_item(scene: Scene, rng: random.Random) -> QAItem:
    pairs = [(a, b) for i, a in enumerate(scene.objects) for b in scene.objects[i + 1:]]
    differ = [(a, b) for a, b in pairs if a.size != b.size]
    a, b = pick(rng, differ if differ and rng.random() < 0.7 else pairs)
    if rng.random() < 0.5:
        a, b = b, a
    ra, rb = reference(a, scene), reference(b, scene)
    if a.size == b.size:
        answer = "they are the same size"
    else:
        answer = f"the {ra if a.size == 'large' else rb}"
    return QAItem("compare", f"Which is larger, the {ra} or the {rb}?", answer)


def describe_item(scene: Scene, rng: random.Random) -> QAItem:
    occupied = {(o.row, o.col): o for o in scene.objects}
    empty = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in occupied]
    if empty and rng.random() < 0.2:
        r, c = pick(rng, empty)
        return QAItem("describe", f"What is at the {POSITIONS[r][c]}?", "nothing")
    o = pick(rng, scene.objects)
    return QAItem("describe", f"What is at the {o.position}?", f"a {noun_phrase(o)}")


def scene_items(scene: Scene, rng: random.Random) -> list[QAItem]:
    """One item of every type, in TASK_TYPES order."""
    color_of = pick(rng, scene.objects)
    shape_at = pick(rng, scene.objects)
    return [
        count_item(scene, rng),
        QAItem("color", f"What color is the {reference(color_of, scene, use_color=False)}?", color_of.color),
        QAItem("shape", f"What shape is at the {shape_at.position}?", shape_at.shape),
        exist_item(scene, rng),
        relation_item(scene, rng),
        compare_item(scene, rng),
        describe_item(scene, rng),
        QAItem("caption", CAPTION_PROMPT, caption(scene)),
    ]


def items_for(scene: Scene, split: str, index: int) -> list[QAItem]:
    return scene_items(scene, random.Random(stream_seed(split, index, "questions")))
