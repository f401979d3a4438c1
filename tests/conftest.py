import os

import pytest
import torch

# Two cores on the reference machine: keep test processes from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
