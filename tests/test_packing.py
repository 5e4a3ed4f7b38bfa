"""Fixed-shape rows (runner.speed.profiles.FixedRows): a packed or padded row trains on exactly the per-example losses.

Everything runs the tiny model through the runner's own 4-bit + LoRA loading path on the CPU.
"""

from __future__ import annotations

import json

import pytest

from runner.cli import recipes
from runner.speed import profiles
from tests.conftest import ROOT

TINY = ROOT / "recipes" / "tiny" / "xsum_tiny.yaml"
PAD = 0
ROW = 96


@pytest.fixture(scope="module")
def model(tiny):
    import torch

    from runner.model import model as model_mod

    recipe = recipes.load(TINY, ["training.profile=fast"])
    speed = profiles.candidates(recipe, "fast")[0]
    torch.manual_seed(0)
    net = model_mod.load_for_training(recipe, speed)
    # LoRA's B starts at zero; random values make the adapter part of what is checked.
    for name, param in net.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    net.eval()
    return net


def examples(vocab: int = 256):
    """Three examples of different lengths; the first few tokens of each are prompt (no loss)."""
    import torch

    g = torch.Generator().manual_seed(1)
    out = []
    for length, prompt in ((30, 20), (41, 33), (17, 9)):
        ids = torch.randint(1, vocab, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def token_losses(net, batch: dict):
    """Per-position next-token loss, 0 where the label is ignored ([rows, length - 1])."""
    import torch
    import torch.nn.functional as F

    inputs = {k: v for k, v in batch.items() if k not in ("labels", profiles.REAL_TOKENS)}
    with torch.no_grad():
        logits = net(**inputs, use_cache=False).logits.float()
    labels = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels.clamp(min=0), reduction="none")
    return losses * (labels != -100)


def alone(net, example: dict):
    import torch

    batch = {"input_ids": torch.tensor([example["input_ids"]]), "labels": torch.tensor([example["labels"]])}
    return token_losses(net, batch)[0]


def packed_row(exs: list[dict]) -> dict:
    return {"input_ids": sum((e["input_ids"] for e in exs), []), "labels": sum((e["labels"] for e in exs), []),
            "seq_lengths": [len(e["input_ids"]) for e in exs]}


def test_packed_row_loss_equals_the_per_example_losses(model):
    exs = examples()
    batch = profiles.FixedRows(PAD, ROW)([packed_row(exs)])
    packed = token_losses(model, batch)[0]
    start = 0
    for example in exs:
        n = len(example["input_ids"])
        separate = alone(model, example)
        # positions start .. start+n-2 predict this example's own tokens; the one after its end is the boundary
        assert packed[start:start + n - 1].tolist() == pytest.approx(separate.tolist(), abs=2e-4)
        start += n
    total_alone = sum(alone(model, e).sum().item() for e in exs)
    assert packed.sum().item() == pytest.approx(total_alone, rel=1e-5)
    assert (packed[start:] == 0).all()  # the padding carries no loss


def test_without_restarting_positions_the_packed_examples_would_leak(model):
    """The check above has teeth: the same row with plain 0..n positions attends across examples."""
    import torch

    exs = examples()
    batch = profiles.FixedRows(PAD, ROW)([packed_row(exs)])
    batch["position_ids"] = torch.arange(ROW)[None]
    leaked = token_losses(model, batch)[0]
    second = alone(model, exs[1])
    start = len(exs[0]["input_ids"])
    assert leaked[start:start + len(exs[1]["input_ids"]) - 1].sub(second).abs().max().item() > 1e-2


def test_padded_rows_without_attention_mask_equal_the_unpadded_examples(model):
    exs = examples()
    batch = profiles.FixedRows(PAD, ROW)(exs)
    assert set(batch) == {"input_ids", "labels", "position_ids", profiles.REAL_TOKENS}  # no attention mask
    losses = token_losses(model, batch)
    for row, example in enumerate(exs):
        n = len(example["input_ids"])
        assert losses[row, : n - 1].tolist() == pytest.approx(alone(model, example).tolist(), abs=2e-4)
        assert (losses[row, n - 1:] == 0).all()


def test_fixed_rows_layout():
    rows = profiles.FixedRows(PAD, 10)([{"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9],
                                         "seq_lengths": [2, 3]}, {"input_ids": [1, 2], "labels": [-100, 2]}])
    assert rows["input_ids"].shape == rows["position_ids"].shape == (2, 10)
    assert rows["position_ids"][0].tolist() == [0, 1, 0, 1, 2, 3, 4, 5, 6, 7]  # padding continues the last example
    assert rows["position_ids"][1].tolist() == list(range(10))
    assert rows["labels"][0].tolist() == [5, 6, -100, 8, 9] + [-100] * 5  # no label across the boundary
    assert rows["input_ids"][1].tolist() == [1, 2] + [PAD] * 8
    with pytest.raises(ValueError, match="longer than the fixed length"):
        profiles.FixedRows(PAD, 3)([{"input_ids": [1, 2, 3, 4]}])
    # rows: a short batch gets rows of padding without labels up to that many; a full one is unchanged
    padded = profiles.FixedRows(PAD, 4, rows=3)([{"input_ids": [1, 2], "labels": [1, 2]}])
    assert padded["input_ids"].tolist() == [[1, 2, PAD, PAD], [PAD] * 4, [PAD] * 4]
    assert padded["labels"][1:].eq(-100).all() and padded["position_ids"][2].tolist() == [0, 1, 2, 3]
    assert padded[profiles.REAL_TOKENS].tolist() == [2, 0, 0]  # what the log's num_tokens counts
    assert rows[profiles.REAL_TOKENS].tolist() == [5, 2]
    full = [{"input_ids": [i]} for i in range(3)]
    assert profiles.FixedRows(PAD, 4, rows=3)(full)["input_ids"].equal(profiles.FixedRows(PAD, 4)(full)["input_ids"])


@pytest.mark.slow
def test_profile_fast_trains_packed_fixed_rows_through_the_cli(tiny, cli, tmp_path):
    result = cli("train", TINY, "training.profile=fast", "training.packing=true", "training.max_steps=3",
                 "training.micro_batch_size=4", "training.gradient_accumulation_steps=2", "data.train_samples=64",
                 f"output_dir={tmp_path}",
                 "--no-eval")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "speed: profile fast: micro-batch 8 x 1, no gradient checkpointing, fixed rows" in result.stdout
    run = next((tmp_path / "xsum_tiny").iterdir())
    env = json.loads((run / "env.json").read_text())
    assert env["speed"]["profile"] == "fast" and env["speed"]["fixed_shapes"] is True
    assert env["global_step"] == 3
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses and all(loss == loss and loss > 0 for loss in losses)  # finite, positive
