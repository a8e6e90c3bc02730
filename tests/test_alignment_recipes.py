"""The DPO recipes end to end on the tiny preference pairs, launched as users launch them (`tune run`).

Slow (each run pays torchtune's import); the 2-rank one also distributed.
"""

import pytest
from test_recipes import TWO_STEPS, _assert_same_first_steps, tune_run

from tune_losses.training.dpo import METRICS  # torchtune's DPO metric names

pytestmark = pytest.mark.slow

SHORT = [*TWO_STEPS, "tokenizer.max_seq_len=96", "eval_dataset=null", "optimizer.lr=1e-3"]
TORCHTUNE_DPO = ["loss._component_=torchtune.rlhf.loss.DPOLoss", "~loss.loss_type", "~loss.nll_weight"]


@pytest.mark.distributed
def test_dpo_exact_normalization_across_accumulation_and_ranks(tmp_path, tiny_assets):
    """batch 4 == batch 2 x 2 accumulation == 2 ranks x batch 2: same loss, grad_norm and metrics, steps 1-2."""
    runs = {
        "batch4": tune_run("dpo_single_device", "dpo", tmp_path / "a", *SHORT, "batch_size=4"),
        "batch2x2": tune_run(
            "dpo_single_device", "dpo", tmp_path / "b", *SHORT, "batch_size=2", "gradient_accumulation_steps=2"
        ),
        "2ranks": tune_run("dpo_distributed", "dpo", tmp_path / "c", *SHORT, "batch_size=2", nproc=2),
    }
    _assert_same_first_steps(runs, ("loss", "grad_norm", "log_probs/chosen", "log_probs/rejected"))
    for step in (1, 2):
        for name, run in runs.items():
            assert set(METRICS) <= set(run[step]), (name, step)
            margin = run[step]["rewards/chosen"] - run[step]["rewards/rejected"]
            assert abs(run[step]["rewards/margins"] - margin) < 1e-5, (name, step)


def test_fused_dpo_matches_torchtune_dpo_on_full_logits(tmp_path, tiny_assets):
    """The fused loss and torchtune's DPOLoss (full logits, torchtune's get_batch_log_probs): same run."""
    common = [*SHORT, "batch_size=4", "loss.beta=0.5", "loss.label_smoothing=0.1"]
    runs = {
        "fused": tune_run("dpo_single_device", "dpo", tmp_path / "fused", *common),
        "torchtune": tune_run("dpo_single_device", "dpo", tmp_path / "tt", *common, *TORCHTUNE_DPO),
    }
    _assert_same_first_steps(runs, ("loss", "grad_norm", "log_probs/chosen", "log_probs/rejected"))
    assert abs(runs["fused"][1]["loss"] - 0.6931472) < 1e-5  # reference = initial policy: log 2
    assert runs["fused"][2]["rewards/margins"] != 0.0
