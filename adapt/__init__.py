"""Adaptation strategies, adapter files, the training engine, the CLI and the server."""

__version__ = "0.1.0"

# The strategy names users type, in CLI order: the one list (adapt.strategies maps each to its class;
# kept here so adapter files, the CLI and benchmarks can name strategies without importing torch or peft).
STRATEGY_NAMES = ("prompt-tune", "linear-probe", "lora", "finetune")
