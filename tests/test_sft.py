"""The runner's trainer (runner.train.sft): the same loss as TRL's SFTTrainer and the same logged entropy, token accuracy
and token count, with the metrics summed on the device and read once per log instead of once per micro-batch; and
bitsandbytes' optimizers stepping without a device sync per parameter where stream order does its work."""

from __future__ import annotations

import pytest

from runner.cli import recipes
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # loads torch and the tiny model


def _trainer(cls, tmp_path, tiny, *overrides: str):
    import torch

    from runner.data import data as data_mod
    from runner.model import model as model_mod
    from runner.train import train as train_mod

    torch.manual_seed(0)
    recipe = recipes.load(ROOT / "recipes" / "tiny" / "xsum_tiny.yaml", ["lora.dropout=0", *overrides])
    tokenizer = model_mod.load_tokenizer(recipe)
    data = data_mod.prepare(recipe, tokenizer, roles=("train",)).splits["train"].select(range(8))
    model = model_mod.load_for_training(recipe)
    args = train_mod._setup_training(recipe, tmp_path, has_eval=False)
    return cls(model=model, args=args, train_dataset=data.select_columns(["prompt", "completion"]),
               processing_class=tokenizer)


def test_the_loss_and_logged_metrics_are_trls_and_no_host_read_happens_per_batch(tiny, tmp_path, monkeypatch):
    import torch
    from trl import SFTTrainer

    from runner.train.sft import Trainer

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


def test_the_logged_token_count_leaves_out_the_padding_of_fixed_rows(tiny, tmp_path):
    """Fixed rows pass no attention mask; num_tokens counts the examples' tokens, not the padded rows' cells."""
    from runner.speed import profiles
    from runner.train.sft import Trainer

    trainer = _trainer(Trainer, tmp_path, tiny)
    examples = [trainer.train_dataset[i] for i in range(3)]
    batch = profiles.FixedRows(trainer.processing_class.pad_token_id, 512, rows=4)(examples)
    real = sum(len(e["input_ids"]) for e in examples)
    assert real < batch["input_ids"].numel() and profiles.REAL_TOKENS in batch
    trainer.model.train()
    trainer.compute_loss(trainer.model, dict(batch))  # the count is taken out before the model is called
    trainer.log({"loss": 0.0})
    assert trainer.state.log_history[-1]["num_tokens"] == real


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")  # bitsandbytes, on a CPU
def test_bitsandbytes_optimizers_step_without_a_device_sync_per_parameter(tiny, tmp_path, monkeypatch):
    import bitsandbytes as bnb
    import bitsandbytes.optim.optimizer as bnb_optimizer
    import torch

    from runner.train import sft

    syncs: list[int] = []
    counting = lambda tensor: syncs.append(1)  # noqa: E731
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", counting)
    after = {}
    for ordered in (False, True):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(64, 128)) for _ in range(3)]
        optimizer = bnb.optim.PagedAdamW8bit(params, lr=1e-2)
        sft.skip_needless_syncs(optimizer)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (s + 1))  # wraps step.__func__
        # a CPU is never stream-ordered in bitsandbytes' sense: stand in for a GPU whose state is not paged
        monkeypatch.setattr(sft, "stream_ordered", lambda opt, ordered=ordered: ordered)
        syncs.clear()
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            for param in params:
                param.grad = torch.randn(param.shape, generator=gen)
            optimizer.step()
            schedule.step()
        after[ordered] = [param.detach().clone() for param in params], len(syncs)
    assert after[False][1] == 3 * (3 + 1)  # bitsandbytes: one per parameter, one more per step (a paged optimizer)
    assert after[True][1] == 0 and bnb_optimizer.sync_gpu is counting  # none, and its function put back
    assert all(torch.equal(a, b) for a, b in zip(after[False][0], after[True][0]))
    torch.manual_seed(0)
    assert not torch.equal(after[True][0][0], torch.randn(64, 128))  # the steps moved the weights

    monkeypatch.undo()
    assert not sft.stream_ordered(optimizer)  # CPU parameters
    weight = torch.nn.Parameter(torch.zeros(4))
    weight.grad = torch.ones(4)
    fresh = bnb.optim.PagedAdamW8bit([weight], lr=1e-2)
    assert not sft.stream_ordered(fresh)  # no state before the first step: that step keeps bitsandbytes' syncs
    trainer = _trainer(sft.Trainer, tmp_path, tiny, "training.optimizer=paged_adamw_8bit", "training.max_steps=2",
                       "training.save_every=null")
    trainer.create_optimizer()
    assert trainer.optimizer.step.__func__.__wrapped__ is type(trainer.optimizer).step
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()  # the Trainer's own scheduler and accelerate's wrapper around the wrapped step
    assert trainer.state.global_step == 2
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)
