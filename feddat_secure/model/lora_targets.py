"""Which backbone modules LoRA adapts: the default names and PEFT's matching rule.

Kept free of torch and PEFT so that loading a configuration, and every command of the CLI that trains
nothing, imports neither.
"""

from __future__ import annotations

# Attention (query, key, value, attention output) and feed-forward (intermediate, output)
# projections of every ViLT encoder layer; "output.dense" matches both output projections.
DEFAULT_TARGET_MODULES = ("query", "key", "value", "output.dense", "intermediate.dense")


def matches_target(module_name: str, target: str) -> bool:
    """PEFT's rule for a list of target names: the module's full dotted name, or a dotted suffix of it."""
    return module_name == target or module_name.endswith("." + target)
