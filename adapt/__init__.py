"""Adaptation strategies, adapter files, the training engine, the CLI and the server."""

__version__ = "0.1.0"

# The strategy table (adapt.strategy_spec imports nothing heavy, so adapter files, the CLI and benchmarks name
# strategies without importing torch or peft). STRATEGY_NAMES: the built-in ones, in CLI order.
from adapt.strategy_spec import STRATEGIES, STRATEGY_NAMES, StrategySpec, get_strategy, register_strategy, registered

__all__ = ["STRATEGIES", "STRATEGY_NAMES", "StrategySpec", "__version__", "get_strategy", "register_strategy",
           "registered"]
