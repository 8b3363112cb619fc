"""The ways to cut a model (data, pipeline, tensor, expert): one module each, each with its plan as data,
and the collectives they share."""
