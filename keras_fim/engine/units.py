"""Units: the layers whose calls a measurement records, each with its rule.

A unit is a layer whose trainable weights one rule handles
(`keras_fim.engine.rules`). Layers own disjoint weights, so the Gram matrix
``J J^T`` is a sum of one block per unit (`keras_fim.engine.gram`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import keras
import tensorflow as tf

from keras_fim._keras_compat import flatten_layers
from keras_fim.engine import rules


class Unit(NamedTuple):
    """A layer and the `keras_fim.engine.rules.LayerRule` that handles it."""

    layer: keras.layers.Layer
    rule: rules.LayerRule


def own_trainable_variables(layer) -> list:
    """`layer`'s trainable variables that none of its sublayers holds."""
    inner = {
        id(v)
        for sub in flatten_layers(layer, include_self=False, recursive=True)
        for v in sub.trainable_variables
    }
    return [v for v in layer.trainable_variables if id(v) not in inner]


def find_units(
    model: keras.Model,
    registry: rules.RuleRegistry | None = None,
    layers: list | None = None,
) -> list:
    """The layers whose calls are recorded, each with the rule that handles it.

    A layer with a registered rule is one unit (the rule covers all its
    weights); a layer holding weights of its own with no rule is handled by
    the exact generic rule as a whole; otherwise we descend into sublayers.
    `registry`: where rules are looked up (the process-wide one if `None`).
    `layers`: layers of `model` (`resolve_layers`); only the units among
    them and their sublayers are kept (all if `None`).
    """
    registry = rules.DEFAULT_REGISTRY if registry is None else registry
    units, seen = [], set()

    def visit(layer, is_root):
        if id(layer) in seen or not layer.trainable_variables:
            return
        seen.add(id(layer))
        rule = None if is_root else registry.rule_for(layer)
        if rule is None and own_trainable_variables(layer):
            rule = rules.GENERIC
        if rule is not None:
            units.append(Unit(layer, rule))
            return
        for sub in flatten_layers(layer, include_self=False, recursive=False):
            visit(sub, False)

    visit(model, True)
    if layers is None:
        return units
    kept = []
    for chosen in layers:
        inside = {
            id(sub) for sub in flatten_layers(chosen, include_self=True, recursive=True)
        }
        selected = [unit for unit in units if id(unit.layer) in inside]
        if chosen.trainable_variables and not selected:
            whole = [
                unit.layer.name
                for unit in units
                if id(chosen)
                in {
                    id(sub)
                    for sub in flatten_layers(
                        unit.layer, include_self=False, recursive=True
                    )
                }
            ]
            raise ValueError(
                "keras-fim measures a layer with all of its weights, so a "
                "sublayer of a measured layer cannot be measured alone. "
                f"Received: measured_layers containing {chosen.name!r}, which "
                f"is measured as part of {', '.join(map(repr, whole))}."
            )
        kept.extend(unit for unit in selected if unit not in kept)
    return kept


def resolve_layers(model: keras.Model, layers) -> list | None:
    """`layers` (names or layers of `model`, at any depth) as layers;
    `ValueError` naming one that `model` does not hold."""
    if layers is None:
        return None
    inside = flatten_layers(model, include_self=False, recursive=True)
    resolved = []
    for layer in layers:
        if isinstance(layer, str):
            match = next((sub for sub in inside if sub.name == layer), None)
        else:
            match = next((sub for sub in inside if sub is layer), None)
        if match is None:
            name = layer if isinstance(layer, str) else layer.name
            raise ValueError(
                "`measured_layers` must name layers of the model. Received: "
                f"measured_layers={[getattr(v, 'name', v) for v in layers]!r}, "
                f"but model {model.name!r} has no layer {name!r}; its layers: "
                f"{sorted({sub.name for sub in inside})!r}."
            )
        resolved.append(match)
    return resolved


def is_coupled(unit: Unit) -> bool:
    """Whether a unit may mix examples: BatchNorm (training mode in `fit`
    unless frozen) and whatever the generic rule handles."""
    if unit.rule is rules.GENERIC:
        return True
    layer = unit.layer
    return isinstance(layer, keras.layers.BatchNormalization) and layer.trainable


def batch_size(x: Any) -> tf.Tensor:
    """The number of examples of a batch's inputs (its first tensor's)."""
    first = next(t for t in keras.tree.flatten(x) if t is not None)
    return tf.shape(first)[0]


def read_variables(model: keras.Model) -> tuple[list, list]:
    """The model's trainable and non-trainable values, read now."""
    return (
        [tf.convert_to_tensor(v.value) for v in model.trainable_variables],
        [tf.convert_to_tensor(v.value) for v in model.non_trainable_variables],
    )
