"""What several test modules share: the thread count, the `gpu` and `reference` skips (driven by the markers, here
only), the official-code reference cases, a small COCO split, a tiny base with an icon task for end-to-end tuning,
and the serving fixtures on the tiny random GLIP.

Plain helper functions (not fixtures) live in `tests/_coco_helpers.py`, `tests/_serve_helpers.py` and
`tests/_train_helpers.py`.
"""
import os
from pathlib import Path

import pytest
import torch

# Two cores on the reference machine: keep test processes from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# The reference cases produced by the official GLIP code (not shipped with the package).
REFERENCE = Path(os.environ.get("ADAPT_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference"))


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests skip without CUDA; `@pytest.mark.reference` tests skip without the reference cases."""
    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA device")
    if not (REFERENCE / "init_weights.py").exists():
        skips["reference"] = pytest.mark.skip(reason=f"needs the official-code reference cases in {REFERENCE} "
                                                     "(set ADAPT_REFERENCE_DIR)")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The reference cases' folder (tests that use it are marked `reference`, so they skip when it is absent)."""
    return REFERENCE


@pytest.fixture
def split(tmp_path):
    """A three-image, two-category COCO split (fish, shark) as `CocoDetection`."""
    from tasks import CocoDetection
    from tests._coco_helpers import write_coco

    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 16]},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [30, 10, 30, 30]},
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [0, 0, 40, 40]},
            {"id": 4, "image_id": 3, "category_id": 1, "bbox": [2, 2, 10, 10]}]
    ann = write_coco(tmp_path / "s", annotations=anns, sizes=[(64, 48), (64, 48), (32, 32)])
    return CocoDetection(ann, ann.parent)


@pytest.fixture(scope="session")
def tiny_icon_workspace(tmp_path_factory):
    """A random tiny base (`base.safetensors`) and the icons-aquarium task (train 10, valid 4, test 4 images)
    under `data/`, for tests that run `tune` end to end."""
    from backbone.checkpoints import save_model
    from backbone.config import tiny_for_tests
    from backbone.model import GLIP
    from tasks.icons.suite import generate_icon_task, task_dir

    root = tmp_path_factory.mktemp("tiny-icon-workspace")
    torch.manual_seed(0)
    save_model(GLIP.from_config(tiny_for_tests()), root / "base.safetensors")
    generate_icon_task("icons-aquarium", task_dir(root / "data", "icons-aquarium"),
                       sizes={"train": 10, "valid": 4, "test": 4})
    return root


# ----------------------------------------------------------------------------- serving on the tiny random GLIP


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model's ops are too small to gain from threads; one avoids contention with the batcher.
    Serving modules use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def processor():
    """The tiny base's processor."""
    from adapt.serve.testing import tiny_base
    from backbone.processor import GLIPProcessor

    return GLIPProcessor.from_config(tiny_base().config)


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, processor):
    """A folder with one adapter per task of `_serve_helpers.CATEGORIES` (all four strategies) and a finetune."""
    from adapt.serve.testing import tiny_base, write_adapter
    from tests._serve_helpers import CATEGORIES

    directory = tmp_path_factory.mktemp("adapters")
    base = tiny_base()
    for seed, (task, (cats, strategy)) in enumerate(CATEGORIES.items()):
        write_adapter(base, processor, directory, task, cats, strategy=strategy, seed=seed)
    write_adapter(base, processor, directory, "full", ["boat"], strategy="finetune", seed=9)
    return directory


@pytest.fixture()
def client(adapters_dir):
    """The HTTP app over an engine on `adapters_dir`, with `_serve_helpers.tenancy()`; `client.engine` is the engine."""
    from fastapi.testclient import TestClient

    from adapt.serve.app import HTTPLimits, serve_engine
    from tests._serve_helpers import make_engine, tenancy

    engine = make_engine(adapters_dir, batch_window_ms=2.0, max_upload_bytes=200_000)
    app = serve_engine(engine, tenancy(), HTTPLimits(max_body_bytes=300_000))
    with TestClient(app) as c:
        c.engine = engine
        yield c
