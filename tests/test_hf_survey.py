"""Every causal-LM class of the installed Transformers, built tiny: ``patch`` equals stock (loss, every
gradient with weights moved off their initial values, ``return_dict=False``, eval logits, greedy
generation, unpatch) or refuses with a reason; never a silent difference or a crash (tests/hf_survey.py).

A handful of families run in the fast suite; the whole survey is slow-marked (its measured time is in
docs/hf_models.md, with the generated table)."""

import pytest

pytest.importorskip("transformers")

from hf_survey import check, survey  # noqa: E402

FAST = ["llama", "qwen2", "gemma2", "gemma3", "opt", "bart", "bert", "cohere", "xlstm", "dbrx"]
"""Llama, Qwen2, Gemma 2 (softcap), Gemma 3 (ForConditionalGeneration: the loss type's name differs),
OPT (backbone self.model.decoder), BART's ForCausalLM (nested decoder, unshifted CrossEntropyLoss), BERT
(output layer inside cls.predictions after a transform), Cohere (logit scale), xLSTM (softcap by a function
call beside an eval-only branch), DBRX (per-family sub-config settings)."""

REFUSED = {
    "git": "passes self.loss_function something other than",  # image tokens' logits dropped, labels pre-shifted
    "gemma4_unified_assistant": "takes no labels",  # a drafter: per-family inputs, no loss
    "musicgen": "one per codebook",  # per-family inputs (codebooks); one output layer per codebook
}
"""Families built with per-family settings (tests/hf_families.py) that patch refuses, with the reason's words."""

MIN_MATCHED = 187
"""Matched model types with transformers 5.24 (the table in docs/hf_models.md); a drop means a regression."""


@pytest.mark.parametrize("model_type", FAST)
def test_family_matches_stock(model_type):
    outcome = check(model_type, generate=model_type in ("llama", "gemma2"))
    assert outcome.status == "matched", outcome


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_family_refused_with_its_reason(model_type):
    outcome = check(model_type, generate=False)
    assert outcome.status == "refused" and REFUSED[model_type] in outcome.reason, outcome


@pytest.mark.slow
def test_every_causal_lm_matches_stock_or_is_refused_with_a_reason():
    outcomes = survey()
    bad = [o for o in outcomes if o.status in ("MISMATCH", "CRASH")]
    assert not bad, bad
    assert all(o.reason for o in outcomes if o.status != "matched")
    matched = sum(o.status == "matched" for o in outcomes)
    assert matched >= MIN_MATCHED, [(o.model_type, o.status, o.reason) for o in outcomes if o.status != "matched"]
