"""Interventions on a frozen model, each a context manager that restores the model on exit.

    from lens.interventions import ActAdd, SteeringVector, LayerProgram, compose

    with compose(ActAdd(model, tok, pairs=[("Love", "Hate")], layer=6, coefficient=5.0),
                 LayerProgram.skip(model, 10, 12)):
        out = model.generate(ids, max_new_tokens=20)
"""

from lens.interventions.ablation import Ablation
from lens.interventions.base import Intervention, compose, hook_count
from lens.interventions.rome import RankOneDelta, RankOneEdit
from lens.interventions.steering import ActAdd, ResidualAdd, SteeringVector, actadd_tensor
from lens.interventions.surgery import LayerProgram

__all__ = [
    "Ablation",
    "ActAdd",
    "Intervention",
    "LayerProgram",
    "RankOneDelta",
    "RankOneEdit",
    "ResidualAdd",
    "SteeringVector",
    "actadd_tensor",
    "compose",
    "hook_count",
]
