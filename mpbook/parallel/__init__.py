"""The three ways to cut a model: one module each, each with its plan as data."""
