"""A request's accuracy and scheduling settings, checked against the server's limits and
resolved with the model's defaults. Protocol-neutral: every wire protocol's requests pass here."""

from __future__ import annotations

import difflib
import functools
import math

import torch

from neuralode.precision import PRECISIONS, computes_natively
from neuralode.solvers import METHODS

from .api import Accuracy, Caller, Code, RequestError, Scheduling, invalid, quoted
from .config import ServerConfig
from .engine import SchedulingTerms
from .models import ServedModel

LISTED_MODELS = 8
"""The most served model names an unknown model's message lists (ListModels has them all)."""
SERVED_METHODS = tuple(sorted(name for name, method in METHODS.items() if method.adaptive))
DEFAULT_METHOD = "dopri5"
REQUEST_PRECISIONS = ("auto", *PRECISIONS)


def precision_setting(accuracy: Accuracy, model: ServedModel, config: ServerConfig, rtol: float, atol: float) -> str:
    """The precision f is evaluated in for a request. ``auto`` (the default) is bfloat16 only
    where the model card measured bfloat16 giving float32's error and NFE, at this tolerance and
    every looser one, and only on a device that computes bfloat16 natively (emulated, it is
    slower than float32); ``auto_tol`` requests stay float32 (their tolerance is chosen later)."""
    asked = accuracy.precision or "auto"
    if asked not in REQUEST_PRECISIONS:
        raise invalid(
            f"accuracy.precision must be one of {', '.join(REQUEST_PRECISIONS)} (empty: auto), "
            f"got {quoted(accuracy.precision)}"
        )
    if asked == "float32":
        return asked
    if asked != "auto":
        refusal = _unserved(asked, model, config)
        if refusal:
            raise RequestError(
                Code.FAILED_PRECONDITION,
                f"accuracy.precision {asked!r} is not served here: {refusal}; ask for float32 or auto",
            )
        return asked
    floor = model.bfloat16_from_tol
    fits = floor is not None and not accuracy.auto_tol and min(rtol, atol) >= floor
    return "bfloat16" if fits and not _unserved("bfloat16", model, config) else "float32"


def served_precisions(model: ServedModel, config: ServerConfig) -> tuple[str, ...]:
    """The precisions some request may have ``model``'s f evaluated in (float32 always; any
    other where the server's ``bfloat16`` setting and the device allow asking for it)."""
    return tuple(p for p in PRECISIONS if p == "float32" or not _unserved(p, model, config))


def _unserved(precision: str, model: ServedModel, config: ServerConfig) -> str:
    """Why ``precision`` is not served for ``model`` ("" when it is)."""
    if config.bfloat16 == "off":
        return "the server's bfloat16 setting is off"
    if config.bfloat16 == "native" and not _native(precision, model.device):
        return (
            f"the server's {model.device} has no {precision} units (emulated, f runs several times slower "
            "than in float32; the server's bfloat16 setting 'on' serves it anyway)"
        )
    return ""


@functools.cache
def _native(precision: str, device: str) -> bool:
    return computes_natively(precision, torch.device(device))


def accuracy_settings(accuracy: Accuracy, model: ServedModel, config: ServerConfig) -> tuple[float, float, str, int]:
    """(rtol, atol, method, max_nfe) for a request, with the model's and server's defaults.
    For ``auto_tol`` the tolerances are the model's default until the engine chooses."""
    method = accuracy.method or DEFAULT_METHOD
    if method not in SERVED_METHODS:
        raise invalid(f"accuracy.method must be one of {', '.join(SERVED_METHODS)}, got {quoted(accuracy.method)}")
    max_nfe = min(accuracy.max_nfe or config.max_nfe, config.max_nfe)
    if accuracy.auto_tol:
        _check_auto(accuracy, model, method, config)
        return model.default_tol, model.default_tol, method, max_nfe
    given = {"tol": accuracy.tol, "rtol": accuracy.rtol, "atol": accuracy.atol}
    for name, value in given.items():
        if math.isnan(value) or math.isinf(value):
            raise invalid(f"accuracy.{name} must be a finite number, got {value!r}")
        if value < 0:
            raise invalid(f"accuracy.{name} must be > 0 (0 means unset: the model's default), got {value!r}")
    if given["tol"] and (given["rtol"] or given["atol"]):
        raise invalid("accuracy: give tol, or rtol and atol, not both")
    rtol = given["tol"] or given["rtol"] or model.default_tol
    atol = given["tol"] or given["atol"] or model.default_tol
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not config.min_tol <= value <= config.max_tol:
            label = "tol" if given["tol"] else name
            raise invalid(f"accuracy.{label} must be between {config.min_tol:g} and {config.max_tol:g}, got {value!r}")
    return rtol, atol, method, max_nfe


def _check_auto(accuracy: Accuracy, model: ServedModel, method: str, config: ServerConfig) -> None:
    if accuracy.tol or accuracy.rtol or accuracy.atol:
        raise invalid("accuracy: auto_tol chooses the tolerance; leave tol, rtol and atol unset")
    target = accuracy.latency_target_seconds
    if math.isnan(target) or math.isinf(target) or target < 0:
        raise invalid(f"accuracy.latency_target_seconds must be a finite number >= 0, got {target!r}")
    if not auto_tolerances(model, config):
        raise invalid(
            f"accuracy.auto_tol: the card of model {quoted(model.name)} has no NFE table within the "
            f"served tolerances [{config.min_tol:g}, {config.max_tol:g}]"
        )
    card_method = model.card.method
    if method != card_method:
        raise invalid(
            f"accuracy.auto_tol needs the method the model card was measured with ({card_method}), got {method!r}"
        )


def auto_tolerances(model: ServedModel, config: ServerConfig) -> list[float]:
    """The card's evaluated tolerances that requests may be served at, for ``auto_tol``."""
    return [tol for tol in model.card_tolerances if config.min_tol <= tol <= config.max_tol]


def scheduling_settings(
    accuracy: Accuracy, scheduling: Scheduling, deadline: float | None, config: ServerConfig, caller: Caller = Caller()
) -> SchedulingTerms:
    """The engine's scheduling for a request: priority level (at most as urgent as the caller
    was granted), NFE budget, auto tolerance; the caller owns its share of the queue."""
    priority = scheduling.priority or config.default_priority
    if not 1 <= priority <= config.priority_levels:
        raise invalid(
            f"scheduling.priority must be 0 (the default, {config.default_priority}) or 1 .. "
            f"{config.priority_levels}, got {scheduling.priority}"
        )
    allowed = caller.max_priority or config.default_priority
    if priority < allowed:
        raise RequestError(
            Code.PERMISSION_DENIED,
            f"scheduling.priority {priority} is more urgent than this caller may ask for "
            f"({allowed} .. {config.priority_levels}): levels above the default need a bearer "
            "token granted them (token_file: '<token> priority=N')",
        )
    budget = min(scheduling.max_total_nfe or config.max_request_nfe, config.max_request_nfe)
    target = accuracy.latency_target_seconds or None
    if accuracy.auto_tol and target is None and deadline is None:
        raise invalid("accuracy.auto_tol needs latency_target_seconds or a deadline on the call")
    return SchedulingTerms(
        priority=priority, budget=budget, auto=accuracy.auto_tol, latency_target=target, owner=caller.key or None
    )


def _alternatives(models: dict[str, ServedModel], name: str) -> str:
    """The closest served name, and the served names (the first few), for an unknown model's
    message: callers who may ask may also list them."""
    names = sorted(models)
    close = difflib.get_close_matches(name[:64], names, n=1, cutoff=0.6)
    listed = ", ".join(names[:LISTED_MODELS]) + (f", ... ({len(names)} in all)" if len(names) > LISTED_MODELS else "")
    return (f"; did you mean {close[0]!r}?" if close else "") + (f" (served: {listed})" if names else "")


def find_model(models: dict[str, ServedModel], name: str, version: str) -> ServedModel:
    if not name:
        raise invalid("model must name a served model (see ListModels)")
    model = models.get(name)  # a dictionary lookup: names never touch the file system
    if model is None:
        raise RequestError(Code.NOT_FOUND, f"model {quoted(name)} is not served{_alternatives(models, name)}")
    if version and version != model.version:
        raise RequestError(
            Code.NOT_FOUND, f"model {quoted(name)} has no version {quoted(version)} (serving {model.version})"
        )
    return model
