"""The built-in visual question answering sets, made from the shapes scenes.

Every scene (see picovlm.data.shapes) gets questions whose answers need the image:

    colour    "What colour are the squares?"                 -> "red"
    shape     "What shape is the blue object?"                -> "circle"
    count     "How many red squares are there?"               -> "two"
    position  "Are the red squares left of the blue circle?"  -> "yes" / "no"
    yes/no    "Is there a green triangle?"                    -> "yes" / "no"

Two formats, the two that nanoVLM-style training and evaluation read:

* the Cauldron's rows: {"images": [image], "texts": [{"user", "assistant", "source"}, ...]}
  (several questions about one image are turns of one conversation), for training;
* MMStar's rows: {"index", "question", "image", "answer", "category", "l2_category"}, where
  the question lists options "A: ...", "B: ..." and the answer is a letter, for evaluation.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from picovlm.data.shapes import COLOURS, INVERSE, SHAPES, Scene, draw_scene

SOURCE = "picovlm-shapes-vqa"
CATEGORIES = ("colour", "shape", "count", "position", "existence")
RELATIONS = tuple(INVERSE)
NUMBERS = {1: "one", 2: "two", 3: "three"}


def _plural(shape: str, count: int) -> str:
    return shape + ("s" if count > 1 else "")


def _group(scene: Scene) -> str:
    """How to name the group unambiguously: by shape, or by colour and shape."""
    return f"{scene.colour} {_plural(scene.shape, scene.count)}"


def _single(scene: Scene) -> str:
    return f"{scene.other_colour} {scene.other_shape}"


def questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str, list[str]]]:
    """(category, question, answer, the answer's alternatives) for one scene, one per category."""
    verb = "are" if scene.count > 1 else "is"
    relation = rng.choice(RELATIONS)
    other = rng.choice([c for c in COLOURS if c != scene.colour])
    probe = rng.choice([(scene.other_colour, scene.other_shape), (other, rng.choice(SHAPES))])
    present = probe in ((scene.colour, scene.shape), (scene.other_colour, scene.other_shape))
    yes_no = ["yes", "no"]
    return [
        ("colour", f"What colour {verb} the {_plural(scene.shape, scene.count)} {scene.relation} the "
                   f"{scene.other_shape}?", scene.colour, list(COLOURS)),
        ("shape", f"What shape is the {scene.other_colour} object?", scene.other_shape, list(SHAPES)),
        ("count", f"How many {scene.colour} {_plural(scene.shape, 2)} are there?", NUMBERS[scene.count],
         list(NUMBERS.values())),
        ("position", f"{verb.capitalize()} the {_group(scene)} {relation} the {_single(scene)}?",
         "yes" if relation == scene.relation else "no", yes_no),
        ("existence", f"Is there a {probe[0]} {probe[1]}?", "yes" if present else "no", yes_no),
    ]


def vqa_rows(n_images: int, size: int = 128, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Cauldron rows: one image, its questions as turns of one conversation (in a random order)."""
    rng = random.Random(seed)
    for _ in range(n_images):
        image, scene = draw_scene(rng, size)
        qa = questions(scene, rng)
        rng.shuffle(qa)
        yield {"images": [image], "texts": [{"user": q, "assistant": a, "source": SOURCE} for _, q, a, _ in qa]}


def multiple_choice_rows(n_images: int, size: int = 128, seed: int = 1) -> Iterator[dict[str, Any]]:
    """MMStar-format rows: one question per image, its options lettered, the answer a letter."""
    rng = random.Random(seed)
    for index in range(n_images):
        image, scene = draw_scene(rng, size)
        category, question, answer, choices = rng.choice(questions(scene, rng))
        options = _options(answer, choices, rng)
        letter = "ABCD"[options.index(answer)]
        lettered = ", ".join(f"{'ABCD'[i]}: {o}" for i, o in enumerate(options))
        yield {"index": index, "question": f"{question}\nOptions: {lettered}", "image": image,
               "answer": letter, "category": category, "l2_category": f"shapes {category}"}


def _options(answer: str, choices: list[str], rng: random.Random, n: int = 4) -> list[str]:
    """The answer and up to n-1 wrong choices, shuffled."""
    wrong = [c for c in choices if c != answer]
    options = [answer, *rng.sample(wrong, min(n - 1, len(wrong)))]
    rng.shuffle(options)
    return options
