"""Procedural VQA scenes: a seeded, unlimited, offline testbed with many vision tokens per image.

`generate(split, index)` is a pure function of its arguments: the same (image, scene, items) on
every machine. See docs/testbed.md for the tasks, the splits and the vision-token counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from tlq_vllm.scenes.files import image_file
from tlq_vllm.scenes.render import CANVAS, Scene, SceneObject, render, render_array, sample_scene
from tlq_vllm.scenes.splits import CALIBRATION_POOL, EVAL_SCENES, SPLITS, check_split
from tlq_vllm.scenes.tasks import QA_TYPES, TASK_TYPES, QAItem, items_for


@dataclass(frozen=True)
class SceneSample:
    split: str
    index: int
    scene: Scene
    items: tuple[QAItem, ...]  # one per TASK_TYPES entry, in that order

    def image(self):
        return render(self.scene)


def generate(split: str, index: int) -> SceneSample:
    scene = sample_scene(split, index)
    return SceneSample(split, index, scene, tuple(items_for(scene, split, index)))


__all__ = [
    "CALIBRATION_POOL", "CANVAS", "EVAL_SCENES", "QA_TYPES", "SPLITS", "TASK_TYPES", "QAItem", "Scene", "SceneObject",
    "SceneSample", "check_split", "generate", "image_file", "render", "render_array", "sample_scene",
]
