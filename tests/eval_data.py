"""Shared by the eval tests: HellaSwag items in the official schema (rowanz/hellaswag
data/hellaswag_val.jsonl); conftest's `items_file` fixture writes them."""

from __future__ import annotations

import json
from pathlib import Path


def _item(ind: int, ctx_a: str, ctx_b: str, endings: list[str], label: int, source: str = "activitynet") -> dict:
    return {
        "ind": ind,
        "activity_label": "Test activity",
        "ctx_a": ctx_a,
        "ctx_b": ctx_b,
        # The official ctx is ctx_a, a space, then ctx_b when ctx_b is not empty.
        "ctx": f"{ctx_a} {ctx_b}" if ctx_b else ctx_a,
        "endings": endings,
        "source_id": f"{source}~v_test{ind}",
        "split": "val",
        "split_type": "indomain" if ind % 2 else "zeroshot",
        "label": label,
    }


ITEMS = [
    _item(
        0,
        "A man is sitting on a roof.",
        "he",
        [
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
            "starts pulling up roofing on a roof.",
        ],
        3,
    ),
    _item(
        1,
        "A woman walks into a kitchen carrying a bag of groceries. She sets it on the counter and",
        "",
        ["opens the fridge.", "flies away.", "sings loudly to the cat while dancing on one foot.", "x"],
        0,
    ),
    _item(
        2,
        "[header] How to clean a cast iron pan [title] Rinse the pan with hot water. [step] Avoid soap,",
        "",
        [
            "because it strips the seasoning from the pan.",
            "as the pan is made of glass.",
            "unless you enjoy rust, which is very tasty.",
            "and paint the pan blue before drying it in the oven for an hour at a low temperature.",
        ],
        0,
        "wikihow",
    ),
    _item(
        3,
        "Two kids are playing soccer in a park. One of them",
        "kicks",
        ["the ball into the goal.", "a tree.", "the moon over the river and into the sea beyond.", "nothing."],
        0,
    ),
    _item(
        4,
        "A chef slices onions on a wooden board. Tears",
        "",
        ["run down his face.", "are in the oven.", "sing.", "build a bridge of onions across the kitchen floor."],
        0,
    ),
    _item(
        5,
        "The cat jumps onto the table and",
        "",
        ["knocks over a glass.", "writes a novel.", "é à ü — unicode ending.", "sleeps."],
        2,
    ),
]


def write_items(path: Path, items: list[dict] | None = None) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in (ITEMS if items is None else items)))
    return path
