"""Offline power-performance models: profile a plant over (power cap x batch), fit a light model,
predict every configuration (PALS's "lightweight offline power-performance models").

>>> from palsctl.models import PowerPerfModel          # doctest: +SKIP
>>> m = PowerPerfModel.fit("profile.csv", kind="parametric")   # doctest: +SKIP
>>> m.predict(power_cap_w=250.0, max_batch=32).tokens_per_joule  # doctest: +SKIP
"""
from __future__ import annotations

from palsctl.models.power_perf import Gradients, ModelRangeWarning, PowerPerfModel, Prediction

__all__ = ["PowerPerfModel", "Prediction", "Gradients", "ModelRangeWarning", "build_model_for",
           "profile_plant"]


def __getattr__(name):
    if name in ("build_model_for", "profile_plant"):
        from palsctl.models import profile
        return getattr(profile, name)
    raise AttributeError(f"module 'palsctl.models' has no attribute {name!r}")
