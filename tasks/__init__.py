"""Detection tasks: the ODinW registry, COCO loading, few-shot sampling, evaluation and the icon world.

`tasks` imports nothing of this project but `glip_io`; `adapt` builds on it.
"""
from tasks.category import Category, clean_name
from tasks.coco import CocoDetection, DataError, LoadReport, find_coco_splits, load_rgb
from tasks.evaluate import detections_to_results, evaluate_detections, save_results, xyxy_to_xywh
from tasks.fewshot import FewShotSubset, sample_few_shot
from tasks.registry import (UnknownTaskError, default_data_root, get_task, list_tasks, load_task_file,
                            register_task, registry)
from tasks.task import DataNotFoundError, SplitSpec, Task, build_prompt

__all__ = [
    "Category", "CocoDetection", "DataError", "DataNotFoundError", "FewShotSubset", "LoadReport", "SplitSpec",
    "Task", "UnknownTaskError", "build_prompt", "clean_name", "default_data_root", "detections_to_results",
    "evaluate_detections", "find_coco_splits", "get_task", "list_tasks", "load_rgb", "load_task_file",
    "register_task", "registry", "sample_few_shot", "save_results", "xyxy_to_xywh",
]
