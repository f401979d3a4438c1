"""LoRA is served exactly as trained: the server's scores equal `adapt predict --adapter` (AdapterDetector, the
adapter folded into a private base) and the peft-wrapped training model (adapt.strategies.LoRA, whose wrapped
projections take the fusion's direct order), for every default target group and in a mixed batch."""
import io
import re

import pytest
import torch
from PIL import Image
from torch import nn

from adapt.adapter import load_adapter, save_adapter
from adapt.predict import AdapterDetector
from adapt.serve.engine import DetectParams, EngineConfig, MultiTenantEngine
from adapt.serve.testing import image_bytes, random_adapter, tiny_base
from adapt.strategies import LORA_DEFAULT_TARGETS, LoRA
from backbone.model import GLIP
from backbone.processor import GLIPProcessor

pytestmark = pytest.mark.usefixtures("one_thread")

# The projections LORA_DEFAULT_TARGETS names, one group per kind (both fusion layers of the tiny base).
TARGET_GROUPS = ("v_proj", "l_proj", "values_v_proj", "values_l_proj", "out_v_proj", "out_l_proj",
                 "dot_product_projection_text")
TOLERANCE = 1e-4


def lora_targets(base: GLIP, pattern: str) -> list[str]:
    return [n for n, m in base.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(pattern, n)]


def lora_adapter(base, processor, task, categories, targets, *, rank=4, sigma=0.3, alpha=4.0, seed=0):
    """A prompt adapter plus random rank-`rank` LoRA factors (entries N(0, sigma^2)) on `targets`."""
    adapter = random_adapter(base, processor, task, categories, seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    state = base.state_dict()
    adapter.strategy = "lora"
    adapter.lora_config = {"r": rank, "alpha": alpha, "target_modules": targets, "dropout": 0.0}
    for t in targets:
        out_dim, in_dim = state[f"{t}.weight"].shape
        adapter.lora[f"{t}.lora_A.weight"] = sigma * torch.randn(rank, in_dim, generator=generator)
        adapter.lora[f"{t}.lora_B.weight"] = sigma * torch.randn(out_dim, rank, generator=generator)
    return adapter


def served(engine, items):
    """Engine scores per item (one batch), as lists of (category, score)."""
    results = engine.run([(task, engine.prepare(data), DetectParams(threshold=0.0, top_k=100))
                          for task, data in items])
    for result in results:
        assert not isinstance(result, Exception), result
    return [[(d["category"], d["score"]) for d in r.detections] for r in results]


def predicted(path, base_seed, data):
    """`adapt predict --adapter` on the same file: the adapter folded into a private base."""
    base = tiny_base(base_seed)
    detector = AdapterDetector(base, load_adapter(path, base=base))
    [found] = detector.detect(Image.open(io.BytesIO(data)).convert("RGB"), threshold=0.0)
    return [(detector.categories[label], score) for label, score in zip(found.labels.tolist(), found.scores.tolist())]


def trained(path, base_seed, data, processor):
    """The peft-wrapped training model (adapt.strategies.LoRA) with the file's factors, on the file's P0."""
    glip = tiny_base(base_seed)
    adapter = load_adapter(path, base=glip)
    [tokens] = processor.tokenize(adapter.category_names)
    config = adapter.lora_config
    pattern = "|".join(re.escape(t) for t in config["target_modules"])
    model = LoRA(glip, tokens, r=config["r"], alpha=config["alpha"], target_modules=pattern).eval()
    state = {}
    for name in model.glip.state_dict():
        match = re.fullmatch(r"(.*)\.lora_([AB])\.default\.weight", name)
        if match:
            state[name] = adapter.lora[f"{match[1].replace('.base_layer', '')}.lora_{match[2]}.weight"]
    assert len(state) == 2 * len(config["target_modules"])
    model.glip.load_state_dict(state, strict=False)
    batch = processor.preprocess([Image.open(io.BytesIO(data)).convert("RGB")])
    with torch.no_grad():
        outputs = model.glip(adapter.prompt, batch.pixel_values, batch.image_sizes)
    from backbone.postprocess import Postprocessor

    [final] = Postprocessor.from_config(glip.config)(outputs, [adapter.positive_map])
    keep = final.scores > 0.0
    return [(adapter.category_names[label], score) for label, score in
            zip(final.labels[keep].tolist(), final.scores[keep].tolist())]


def assert_same(ours, reference, what):
    assert len(ours) == len(reference) > 0, what
    assert [c for c, _ in ours] == [c for c, _ in reference], what
    assert [s for _, s in ours] == pytest.approx([s for _, s in reference], abs=TOLERANCE), what


def make_engine(directory, base_seed=0):
    return MultiTenantEngine(tiny_base(base_seed), directory, EngineConfig(max_pixels=4_000_000))


@pytest.mark.parametrize("group", TARGET_GROUPS)
def test_each_default_target_group_is_served_as_trained(tmp_path, processor, group):
    base = tiny_base()
    targets = lora_targets(base, rf".*\.{group}")
    assert targets and all(re.fullmatch(LORA_DEFAULT_TARGETS, t) for t in targets)
    adapter = lora_adapter(base, processor, "lora", ["shark", "whale"], targets, seed=3)
    path = save_adapter(adapter, tmp_path / "lora.safetensors")
    prompt_only = random_adapter(base, processor, "prompt", ["shark", "whale"], seed=3)  # the same P0, no LoRA
    save_adapter(prompt_only, tmp_path / "prompt.safetensors")
    data = image_bytes(96, 64, seed=1)
    with_lora, without = served(make_engine(tmp_path), [("lora", data), ("prompt", data)])
    # The LoRA changes the scores (else this test could not tell a served LoRA from an ignored one) ...
    assert max(abs(a[1] - b[1]) for a, b in zip(with_lora, without)) > 1e-3
    # ... and the server gives what `adapt predict --adapter` and the peft training model give.
    assert_same(with_lora, predicted(path, 0, data), f"{group}: server vs adapt predict")
    assert_same(with_lora, trained(path, 0, data, processor), f"{group}: server vs peft training model")


def test_mixed_batch_of_lora_prompt_and_linear_probe_tenants_matches_predict(tmp_path, processor):
    base = tiny_base()
    every = lora_targets(base, LORA_DEFAULT_TARGETS)
    visual = lora_targets(base, r".*fusion\.attn\.(v_proj|values_v_proj|out_v_proj)")
    adapters = {
        "lora-all": lora_adapter(base, processor, "lora-all", ["shark", "whale"], every, sigma=0.2, seed=1),
        "lora-visual": lora_adapter(base, processor, "lora-visual", ["fish"], visual, seed=2),
        "prompt": random_adapter(base, processor, "prompt", ["cat", "dog", "bird"], seed=3),
        "probe": random_adapter(base, processor, "probe", ["car"], strategy="linear-probe", seed=4),
    }
    paths = {task: save_adapter(a, tmp_path / f"{task}.safetensors") for task, a in adapters.items()}
    images = [image_bytes(96, 64, seed=5), image_bytes(64, 96, seed=6)]
    items = [(task, images[i % 2]) for i, task in enumerate([*adapters, *adapters, "lora-all"])]
    for (task, data), scores in zip(items, served(make_engine(tmp_path), items)):
        assert_same(scores, predicted(paths[task], 0, data), f"{task}: server vs adapt predict")
        if task.startswith("lora"):
            assert_same(scores, trained(paths[task], 0, data, processor), f"{task}: server vs peft training model")


@pytest.mark.slow
def test_issue_reproduction_lora_on_the_visual_projections_of_glip_nano(tmp_path):
    """A prompt-only adapter plus random rank-4 A/B (sigma 0.5) on the three visual projections of both fusion
    layers: served, it must not give the prompt-only detections, and must give what `adapt predict` gives."""
    base = GLIP.from_pretrained("glip-nano").eval()
    processor = GLIPProcessor.from_config(base.config)
    categories = ["fish", "jellyfish", "penguin", "shark"]
    targets = lora_targets(base, r".*fusion\.attn\.(v_proj|values_v_proj|out_v_proj)")
    assert len(targets) == 6
    # alpha/r = 0.5 keeps each update (~5x its weight's norm here) inside the server's 10x bound
    adapter = lora_adapter(base, processor, "nano-lora", categories, targets, rank=4, sigma=0.5, alpha=2.0, seed=7)
    path = save_adapter(adapter, tmp_path / "nano-lora.safetensors")
    save_adapter(random_adapter(base, processor, "nano-prompt", categories, seed=7),
                 tmp_path / "nano-prompt.safetensors")
    data = image_bytes(320, 240, seed=8)
    engine = MultiTenantEngine(base, tmp_path, EngineConfig(max_pixels=4_000_000))
    with_lora, prompt_only = served(engine, [("nano-lora", data), ("nano-prompt", data)])
    assert with_lora != prompt_only
    assert max(abs(a[1] - b[1]) for a, b in zip(with_lora, prompt_only)) > 1e-3
    detector = AdapterDetector.load(path)  # what `adapt predict --adapter` runs
    [found] = detector.detect(Image.open(io.BytesIO(data)).convert("RGB"), threshold=0.0)
    assert_same(with_lora, [(detector.categories[label], score) for label, score in
                            zip(found.labels.tolist(), found.scores.tolist())], "glip-nano: server vs adapt predict")
