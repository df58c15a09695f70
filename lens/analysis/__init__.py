"""Reading models through lenses: held-out evaluation (``evaluate``, ``depth``), per-token pictures
and trajectories (``picture``, ``trajectory``), what an intervention changes (``intervention_eval``,
``spans``). One per-layer accumulator (``layers``) feeds every result; results are dataclasses
with ``to_json()``. No Lightning, no files."""
