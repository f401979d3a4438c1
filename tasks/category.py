"""One category of a task: the small type that the task model and the COCO loader share.

It has a module of its own so that `tasks.task`, which builds
`CocoDetection`s, and `tasks.coco`, which takes categories, need not import each other.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


def clean_name(name: str) -> str:
    """GLIP's `clean_name`: drop "(...)", turn "_" into spaces, squeeze double spaces."""
    name = re.sub(r"\(.*\)", "", name)
    name = name.replace("_", " ")
    return name.replace("  ", " ")


@dataclass(frozen=True)
class Category:
    """One category of a task.

    Attributes:
        name: the category name as the annotation files and reports spell it.
        prefix: text placed before the phrase in a descriptive prompt (GLIP `CAPTION_PROMPT` prefix).
        suffix: text placed after the phrase (e.g. " which is flat and round").
        phrase: the words that name the category in the prompt; defaults to `clean_name(name)`.
            GLIP's pothole prompt, for instance, names "holes".
        id: the category id in the annotation files; None means position + 1 (COCO/Roboflow convention).
    """

    name: str
    prefix: str = ""
    suffix: str = ""
    phrase: str | None = None
    id: int | None = None

    @property
    def prompt_phrase(self) -> str:
        return self.phrase if self.phrase is not None else clean_name(self.name)

    @property
    def has_description(self) -> bool:
        return bool(self.prefix.strip() or self.suffix.strip())
