"""Declarative key maps, one module per model, each exporting `RULES: list[Rule]` used in both directions."""
