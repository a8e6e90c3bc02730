"""The alignment losses' keyword arguments in their current form, from the flat keywords the fp64
references (tests/alignment_reference.py) take: the tests hand one keyword dict to both.

``preference(**kw)`` / ``policy(**kw)`` / ``kto(**kw)`` move the options fields into ``options=``, the
reference model's ``ref_hidden`` / ``ref_weight`` / ``ref_bias`` into ``reference=``, KTO's KL
estimate into ``kl=``, ``algorithm`` into ``execution=``; other keywords pass unchanged. An incomplete
or conflicting group (``ref_hidden`` without ``ref_weight``, ``kl`` with ``kl_hidden``) is left flat,
so that the function's own error shows.
"""

from __future__ import annotations

import tune_losses as tl

_EXECUTION = ("algorithm", "drop_ignored_tokens", "dw_accumulation")


def _move(kw: dict, cls) -> dict:
    out = dict(kw)
    fields = {k: out.pop(k) for k in list(out) if k in cls.__dataclass_fields__}
    if fields:
        out["options"] = cls(**fields)
    execution = {k: out.pop(k) for k in _EXECUTION if k in out}
    if execution:
        out["execution"] = tl.ExecutionOptions(**execution)
    if out.get("ref_hidden") is not None and out.get("ref_weight") is not None and "reference" not in out:
        out["reference"] = tl.Reference(out.pop("ref_hidden"), out.pop("ref_weight"), out.pop("ref_bias", None))
    elif "ref_bias" in out and out["ref_bias"] is None:
        out.pop("ref_bias")
    return out


def preference(**kw) -> dict:
    return _move(kw, tl.PreferenceOptions)


def policy(**kw) -> dict:
    return _move(kw, tl.PolicyOptions)


def kto(**kw) -> dict:
    out = _move(kw, tl.KTOOptions)
    if out.get("kl") is None and out.get("kl_hidden") is not None and out.get("kl_labels") is not None:
        out["kl"] = tl.KLEstimate(
            out.pop("kl_hidden"), out.pop("kl_labels"), out.pop("kl_ref_hidden", None), out.pop("kl_ref_logps", None)
        )
    return out
