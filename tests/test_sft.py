"""The runner's trainer (runner.sft): the same loss as TRL's SFTTrainer and the same logged entropy, token accuracy
and token count, with the metrics summed on the device and read once per log instead of once per micro-batch."""

from __future__ import annotations

import pytest

from runner import recipe as recipe_mod
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # loads torch and the tiny model


def _trainer(cls, tmp_path, tiny):
    import torch

    from runner import data as data_mod
    from runner import model as model_mod
    from runner import train as train_mod

    torch.manual_seed(0)
    recipe = recipe_mod.load(ROOT / "recipes" / "tiny" / "xsum_tiny.yaml", ["lora.dropout=0"])
    tokenizer = model_mod.load_tokenizer(recipe)
    data = data_mod.prepare(recipe, tokenizer, roles=("train",)).splits["train"].select(range(8))
    model = model_mod.load_for_training(recipe)
    args = train_mod._setup_training(recipe, tmp_path, has_eval=False)
    return cls(model=model, args=args, train_dataset=data.select_columns(["prompt", "completion"]),
               processing_class=tokenizer)


def test_the_loss_and_logged_metrics_are_trls_and_no_host_read_happens_per_batch(tiny, tmp_path, monkeypatch):
    import torch
    from trl import SFTTrainer

    from runner.sft import Trainer

    ours, theirs = _trainer(Trainer, tmp_path / "a", tiny), _trainer(SFTTrainer, tmp_path / "b", tiny)
    batch = next(iter(ours.get_train_dataloader()))
    ours.model.train()
    theirs.model.train()
    reads = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(1) or real_item(t))
    loss = ours.compute_loss(ours.model, dict(batch))
    assert reads == []  # nothing read on the host between the forward and the backward pass
    monkeypatch.undo()
    expected = theirs.compute_loss(theirs.model, dict(batch))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)

    ours.log({"loss": loss.item()})
    theirs.log({"loss": expected.item()})
    got, want = ours.state.log_history[-1], theirs.state.log_history[-1]
    for key in ("entropy", "mean_token_accuracy", "num_tokens"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    assert got["num_tokens"] == int(batch["attention_mask"].sum())

    ours.compute_loss(ours.model, dict(batch))  # two micro-batches before the next log: their tokens add up
    ours.compute_loss(ours.model, dict(batch))
    ours.log({"loss": loss.item()})
    assert ours.state.log_history[-1]["num_tokens"] == 3 * int(batch["attention_mask"].sum())
    assert ours.state.log_history[-1]["entropy"] == pytest.approx(got["entropy"], rel=1e-5)
