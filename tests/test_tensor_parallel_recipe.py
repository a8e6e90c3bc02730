"""The distributed recipes with ``tensor_parallel_dim`` (output projection sharded over the vocabulary,
FSDP2 over the data-parallel mesh dimension), launched as users launch them (``tune run``).

With the same global batch, the first two optimizer steps' loss and grad_norm equal the single-device
run's to 1e-4: tensor parallelism changes where the vocabulary lives, not the math.
"""

import pytest
from test_recipes import SHORT, _assert_same_first_steps, tune_run

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.mark.parametrize("task", ["sft", "kd"])
def test_tensor_parallel_2_matches_single_device(task, tmp_path, tiny_assets):
    """2 ranks, mesh (dp=1, tp=2): both ranks read the same batch of 2, each holds half the vocabulary."""
    keys = ("loss", "grad_norm") + (("class_loss", "kd_loss") if task == "kd" else ())
    runs = {
        "single": tune_run(f"{task}_single_device", task, tmp_path / "single", *SHORT, "batch_size=2"),
        "tp2": tune_run(
            f"{task}_distributed", task, tmp_path / "tp2", *SHORT, "batch_size=2", "tensor_parallel_dim=2", nproc=2
        ),
    }
    _assert_same_first_steps(runs, keys)
    assert (tmp_path / "tp2" / "epoch_0" / "model-00001-of-00001.bin").exists()


def test_data_2_x_tensor_2_matches_single_device_batch_4(tmp_path, tiny_assets):
    """4 ranks, mesh (dp=2, tp=2): dp ranks read different batches of 2 (global batch 4), tokens counted
    over dp only, grad_norm counting each layer once although it is replicated over tp."""
    runs = {
        "batch4": tune_run("sft_single_device", "sft", tmp_path / "single", *SHORT, "batch_size=4"),
        "dp2xtp2": tune_run(
            "sft_distributed", "sft", tmp_path / "dp2tp2", *SHORT, "batch_size=2", "tensor_parallel_dim=2", nproc=4
        ),
    }
    _assert_same_first_steps(runs)


def test_tensor_parallel_needs_a_fused_loss(tmp_path, tiny_assets):
    with pytest.raises(AssertionError, match="tensor_parallel_dim: 2 needs a fused loss"):
        tune_run(
            "sft_distributed",
            "sft",
            tmp_path,
            *SHORT,
            "batch_size=2",
            "tensor_parallel_dim=2",
            "loss._component_=tune_losses.CEWithChunkedOutputLoss",
            "+loss.num_output_chunks=4",
            nproc=2,
        )
