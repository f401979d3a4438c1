"""What `adapt tasks inspect` shows: every split loaded, with its counts and every problem found."""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field

from tasks.coco import DataError, LoadReport
from tasks.task import DataNotFoundError, Task


@dataclass(frozen=True)
class SplitInspection:
    """One split as loaded: counts, the loader's report, or the error that stopped it.

    Attributes:
        name: split name.
        source: its annotation file (for YOLO/VOC, the file that lists it) and image folder, relative to the
            task's root.
        images, boxes: counts after loading (boxes include crowd/difficult ones).
        boxes_per_category: category name -> boxes.
        report: the loader's report (None when the split did not load).
        error: why the split did not load, else None.
    """

    name: str
    source: str
    images: int = 0
    boxes: int = 0
    boxes_per_category: dict[str, int] = field(default_factory=dict)
    report: LoadReport | None = None
    error: str | None = None

    @property
    def problems(self) -> list[str]:
        """One line per problem: the error, each skipped record, the boxes clipped to their image."""
        if self.error is not None:
            return [self.error]
        lines = list(self.report.skipped)
        if self.report.clipped_boxes:
            lines.append(f"{self.report.clipped_boxes} boxes extend outside their image and were clipped to it")
        if self.report.exif_ignored:
            lines.append(f"{self.report.exif_ignored} images are annotated on their pixels as stored, ignoring "
                         "their EXIF orientation")
        return lines


def inspect_task(task: Task) -> list[SplitInspection]:
    """Load every split of `task` (the loaders' warnings are kept in the results, not emitted)."""
    out = []
    for name, spec in task.splits.items():
        source = spec.ann_files[0] + (f", images in {spec.img_dir}" if spec.img_dir not in (".", "") else "")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dataset = task.split(name)
        except (DataError, DataNotFoundError, KeyError) as error:
            out.append(SplitInspection(name, source, error=str(error).strip("'\"")))
            continue
        per_label = Counter(dataset.cat_id_to_label[a["category_id"]] for a in dataset.coco.anns.values())
        out.append(SplitInspection(
            name, source, images=len(dataset), boxes=len(dataset.coco.anns),
            boxes_per_category={c.name: per_label.get(k, 0) for k, c in enumerate(dataset.categories)},
            report=dataset.report))
    return out
