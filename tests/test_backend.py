"""Evaluation backends: the merged copy computes what 4-bit + LoRA computes, every backend gives the plain path's
greedy predictions and stops where it stopped, batch sizes stay within the memory budget, a merged evaluation
resumes to the same predictions.jsonl, and `runner validate` checks generation.backend."""

from __future__ import annotations

import copy
import json

import pytest

from runner.cli import recipes
from runner.common.errors import RecipeError
from runner.data import data as data_mod
from runner.evaluate import backend
from runner.evaluate import evaluate as evaluate_mod
from runner.evaluate import generate as generate_mod
from runner.evaluate import rank as rank_mod
from runner.model import lora as lora_mod
from runner.model import merge
from runner.speed import memory
from tests.conftest import ROOT
from tests.test_generate import interrupted_after, with_keys

TINY_XSUM = ROOT / "recipes" / "tiny" / "xsum_tiny.yaml"
GIB = 2**30


@pytest.fixture(scope="module")
def lora_net(tiny):
    """The tiny 4-bit Phi with a LoRA whose B matrices are random (a fresh adapter's are zero: nothing to merge).
    bitsandbytes' CPU inference layout computes in bf16; the training layout computes exactly, so differences
    below are the merge's own."""
    import torch
    from peft import get_peft_model

    from runner.model import model as model_mod

    torch.set_num_threads(2)
    recipe = recipes.load(TINY_XSUM)
    tokenizer = model_mod.load_tokenizer(recipe)
    base = model_mod.load_base(recipe)
    model_mod._keep_trainable_layout(base)
    net = get_peft_model(base, lora_mod.lora_config(recipe))
    gen = torch.Generator().manual_seed(0)
    for name, param in net.named_parameters():
        if "lora_B" in name:
            param.data.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    net.eval()
    prompts = list(data_mod.prepare(recipe, tokenizer, roles=("test",)).splits["test"]["prompt"][:8])
    return recipe, tokenizer, net, prompts


# ---------------------------------------------------------------- the merged copy


def test_the_merged_copy_computes_what_the_4bit_model_with_lora_computes(lora_net):
    import torch

    recipe, tokenizer, net, prompts = lora_net
    enc = tokenizer(prompts[:3], return_tensors="pt", padding=True)
    copy_ = merge.merged_copy(net)
    assert not merge.is_quantized(copy_) and not hasattr(copy_, "peft_config")
    with torch.inference_mode():
        expected, got = net(**enc).logits, copy_(**enc).logits
        with net.disable_adapter():
            base_expected = net(**enc).logits
            base_copy = merge.merged_copy(net)  # inside disable_adapter(): the base alone, as runner compare needs
            base_got = base_copy(**enc).logits
    assert (expected - base_expected).abs().max() > 0.5  # the adapter matters, so merging it is tested
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.allclose(base_got, base_expected, atol=1e-4, rtol=1e-4)
    assert merge.adapter_active(net)  # the loaded model is untouched


def test_merged_loss_and_rank_scores_match(lora_net):
    recipe, tokenizer, net, prompts = lora_net
    completions = [" Storms close schools.", " Norcom cuts jobs.", " Rovers win."]
    plain = rank_mod.completion_logprobs(net, tokenizer, prompts[:3], completions,
                                         with_keys(recipe, generation={"backend": "plain"}))
    merged = rank_mod.completion_logprobs(net, tokenizer, prompts[:3], completions,
                                          with_keys(recipe, generation={"backend": "merged"}), batch_size=2)
    for (a, n), (b, m) in zip(plain, merged, strict=True):
        assert n == m and b == pytest.approx(a, abs=1e-3)
    pairs = rank_mod.tokenize_pairs(tokenizer, [p for p in prompts[:3] for _ in completions], completions * 3)
    grouped = rank_mod.score_groups(net, tokenizer, [pairs[g:g + 3] for g in (0, 3, 6)])  # each prompt run once
    assert grouped.flatten().tolist() == pytest.approx(rank_mod.score_rows(net, tokenizer, pairs).tolist(), abs=1e-3)
    ranked = with_keys(recipe, generation={"mode": "rank", "labels": ["Storms", "Norcom", "Rovers"]})
    merged_rank = {**ranked, "generation": {**ranked["generation"], "backend": "merged"}}
    assert rank_mod.rank(net, tokenizer, prompts[:4], merged_rank) == rank_mod.rank(net, tokenizer, prompts[:4], ranked)


def test_scoring_runs_the_lm_head_once_over_the_kept_positions_copied_together(lora_net):
    """The kept positions reach the LM head as one contiguous block (one matmul), not as a strided slice of the
    hidden states (a batched matmul reading the head's weight once per row on a GPU); scores unchanged."""
    import torch

    recipe, tokenizer, net, prompts = lora_net
    completions = [" Storms close schools.", " Rovers win."]
    pairs = rank_mod.tokenize_pairs(tokenizer, [p for p in prompts[:3] for _ in completions], completions * 3)
    head = net.get_output_embeddings()
    seen: list[tuple[tuple[int, ...], bool]] = []
    hook = head.register_forward_pre_hook(lambda _, args: seen.append((tuple(args[0].shape), args[0].is_contiguous())))
    try:
        rows = rank_mod.score_rows(net, tokenizer, pairs)
        groups = rank_mod.score_groups(net, tokenizer, [pairs[g:g + 2] for g in (0, 2, 4)])
    finally:
        hook.remove()
    width = max(len(ids) for ids, _ in pairs)
    keep = max(n for _, n in pairs) + 1
    assert seen[0] == ((len(pairs), keep, head.in_features), True) and keep < width  # a slice, made contiguous
    assert len(seen) == 2 and seen[1][1] and seen[1][0][0] == 3  # the packed pass too
    with torch.inference_mode():  # the same scores as the whole sequence's logits give
        enc = [torch.tensor(ids)[None] for ids, _ in pairs]
        full = [torch.log_softmax(net(input_ids=e).logits[0, -n - 1:-1].float(), -1)
                .gather(-1, e[0, -n:, None]).sum().item() for e, (_, n) in zip(enc, pairs)]
    assert rows.tolist() == pytest.approx(full, abs=1e-3)
    assert groups.flatten().tolist() == pytest.approx(full, abs=1e-3)


def test_the_merged_copy_is_released_when_its_evaluation_ends(lora_net):
    import torch

    recipe, tokenizer, net, prompts = lora_net
    with backend.model_for(backend.Choice("merged", 4), net) as copy_:
        assert copy_ is not net and copy_.get_input_embeddings().weight.device.type == "cpu"
    # the caller's name still points at the copy, and its weights are gone anyway (no garbage collection needed)
    assert {p.device.type for p in copy_.parameters()} == {"meta"}
    assert merge.adapter_active(net) and net.get_input_embeddings().weight.device.type == "cpu"
    with torch.inference_mode():
        assert torch.isfinite(net(**tokenizer(prompts[:1], return_tensors="pt")).logits).all()


def test_rank_mode_queues_the_next_batch_before_it_reads_a_batchs_scores(lora_net, monkeypatch):
    """The host tokenizes and packs batch i + 1 while the GPU runs batch i: reading a batch's scores (a wait for
    the GPU) comes after the next batch was queued."""
    recipe, tokenizer, net, prompts = lora_net
    events: list[str] = []
    real = rank_mod.score_groups

    class Queued:
        def __init__(self, scores, n):
            self.scores, self.n = scores, n

        def argmax(self, dim):
            events.append(f"read {self.n}")
            return self.scores.argmax(dim)

    def logged(net_, tokenizer_, groups):
        n = sum(e.startswith("queue") for e in events)
        events.append(f"queue {n}")
        return Queued(real(net_, tokenizer_, groups), n)

    monkeypatch.setattr(rank_mod, "score_groups", logged)
    ranked = with_keys(recipe, generation={"mode": "rank", "labels": ["Storms", "Norcom", "Rovers"],
                                           "backend": "merged", "batch_size": 2})
    predicted = rank_mod.rank(net, tokenizer, prompts[:6], ranked)
    assert events == ["queue 0", "queue 1", "read 0", "queue 2", "read 1", "read 2"]
    monkeypatch.setattr(rank_mod, "score_groups", real)
    assert predicted == rank_mod.rank(net, tokenizer, prompts[:6], {**ranked, "generation": {
        **ranked["generation"], "batch_size": 6}})


def test_tokenizing_on_threads_gives_the_tokenizers_own_ids(lora_net):
    _, tokenizer, _, prompts = lora_net
    texts = [p + f" {i}" for i in range(40) for p in prompts]
    want = tokenizer(texts)["input_ids"]
    padded = copy.deepcopy(tokenizer)
    padded._tokenizer.enable_padding(pad_id=0, length=512)  # a state every call must first reset
    assert rank_mod.token_ids(padded, texts, workers=3) == want
    assert rank_mod.token_ids(tokenizer, texts) == want and rank_mod.token_ids(tokenizer, []) == []
    reused = rank_mod.tokenize_pairs(tokenizer, prompts[:2], [" a", " b"], prompt_ids={prompts[0]: [1, 2]})
    assert reused[0][1] == len(reused[0][0])  # the given ids, not the prompt's own, were the prefix
    assert reused[1] == rank_mod.tokenize_pairs(tokenizer, prompts[1:2], [" b"])[0]


# ---------------------------------------------------------------- same predictions, same stops


def _generated_rows(monkeypatch) -> list:
    """Records every row model.generate returns (new tokens, trailing padding dropped), whichever model runs."""
    from transformers.generation.utils import GenerationMixin

    rows: list = []
    real = GenerationMixin.generate

    def recording(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        pad = kwargs["generation_config"].pad_token_id
        for row in out[:, kwargs["input_ids"].shape[1]:].tolist():
            while row and row[-1] == pad:
                row.pop()
            rows.append(row)
        return out

    monkeypatch.setattr(GenerationMixin, "generate", recording)
    return rows


@pytest.fixture(scope="module")
def plain_stops(lora_net):
    """The plain path's greedy predictions with a stop string the random model writes mid-answer, and the tokens
    model.generate returned for each row (in the length-sorted order of the batch)."""
    recipe, tokenizer, net, prompts = lora_net
    free = with_keys(recipe, generation={"max_new_tokens": 10, "stop": [], "backend": "plain", "batch_size": 8})
    first = generate_mod.generate(net, tokenizer, prompts, free)
    stop = next(t[3:6] for t in first.values() if len(t) > 8)  # three characters some answer has after its start
    plain = with_keys(free, generation={"stop": [stop]})
    with pytest.MonkeyPatch.context() as mp:
        rows = _generated_rows(mp)
        expected = generate_mod.generate(net, tokenizer, prompts, plain)
    assert any(stop not in t and len(t) < len(first[i]) for i, t in expected.items())  # the stop string cut some
    return plain, expected, rows


@pytest.mark.parametrize("name", ["batched", "merged", "compiled"])
def test_every_backend_predicts_and_stops_as_the_plain_path_does(lora_net, plain_stops, monkeypatch, name):
    """Greedy: the same cut predictions, and the same generated tokens (each row ended on the same token)."""
    _, tokenizer, net, prompts = lora_net
    plain, expected, expected_rows = plain_stops
    rows = _generated_rows(monkeypatch)
    got = generate_mod.generate(net, tokenizer, prompts, with_keys(plain, generation={"backend": name,
                                                                                        "batch_size": 3}))
    assert got == expected
    # Rows come in length-sorted order; the compiled backend pads its last batch (3, 3, 2 + 1) with a prompt's copy.
    assert len(rows) == len(prompts) + (name == "compiled")
    assert rows[:len(prompts)] == expected_rows


def test_sampling_on_a_new_backend_follows_the_seed(lora_net):
    recipe, tokenizer, net, prompts = lora_net
    sample = with_keys(recipe, generation={"backend": "merged", "batch_size": 4, "do_sample": True, "top_p": 0.9,
                                           "temperature": 1.5, "max_new_tokens": 6, "stop": []})
    first, again = (generate_mod.generate(net, tokenizer, prompts[:3], sample) for _ in range(2))
    other = generate_mod.generate(net, tokenizer, prompts[:3], {**sample, "seed": sample["seed"] + 1})
    assert first == again and first != other


# ---------------------------------------------------------------- batch sizes within the budget


@pytest.mark.parametrize("budget_gib", [1, 3.8, 20, 127])
@pytest.mark.parametrize("fixed_gib", [0.0, 2.5, 7.5])
def test_batch_for_budget_never_exceeds_the_budget_and_leaves_little_unused(budget_gib, fixed_gib):
    from transformers import PhiConfig

    shape = memory.model_shape(PhiConfig(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                                  num_attention_heads=32))
    for prompt in (40, 400, 512):
        for rows_per_prompt in (1, 4):
            per_row = memory.generation_row_bytes(shape, 2, prompt, 64, static_cache=True)
            batch = backend.batch_for_budget(budget_gib * GIB, fixed_gib * GIB, per_row, rows_per_prompt, 10_000)
            used = memory.reserved_for(fixed_gib * GIB + batch * rows_per_prompt * per_row)
            assert batch == 0 or used <= budget_gib * GIB
            more = memory.reserved_for(fixed_gib * GIB + (batch + 8) * rows_per_prompt * per_row)
            assert more > budget_gib * GIB  # within one rounding step (a multiple of 8) of the most that fits
    assert backend.batch_for_budget(127 * GIB, 0, 1e6, 1, 300) == 300  # never more than the prompts there are


def test_auto_merges_when_the_copy_fits_else_batches_and_compiles_long_runs(lora_net, monkeypatch):
    recipe, tokenizer, net, prompts = lora_net
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]] * 100  # 800 prompts
    auto = with_keys(recipe, generation={"backend": "auto", "batch_size": "auto"})
    assert backend.for_generation(auto, net, lengths).backend == "plain"  # no GPU: the path and speed of before
    c = merge.compute_dtype(net).itemsize
    copy_bytes = merge.copy_bytes(net, c)
    row = memory.generation_row_bytes(memory.model_shape(net.config), c, max(lengths), 24, static_cache=True)
    monkeypatch.setattr(backend, "_allocated", lambda: 1e6)
    for rows, expected in ((4, "batched"), (40, "merged"), (4000, "merged")):
        budget = memory.reserved_for(1e6 + copy_bytes + rows * row)
        monkeypatch.setattr(backend, "budget_bytes", lambda recipe, b=budget: b)
        choice = backend.for_generation(auto, net, lengths)
        assert choice.backend == expected
        assert choice.predicted_gb * GIB <= budget * (1 + 1e-9)
    new_tokens = backend.COMPILE_MIN_STEPS // 12  # 800 prompts in 13 batches of 64: 13 x new_tokens steps
    long = with_keys(auto, generation={"max_new_tokens": new_tokens})
    long_row = memory.generation_row_bytes(memory.model_shape(net.config), c, max(lengths), new_tokens, static_cache=True)
    monkeypatch.setattr(backend, "budget_bytes", lambda recipe: memory.reserved_for(1e6 + copy_bytes + 64 * long_row))
    assert backend.for_generation(long, net, lengths).backend == "compiled"
    short = with_keys(auto, generation={"max_new_tokens": new_tokens // 2})
    assert backend.for_generation(short, net, lengths).backend == "merged"  # half the steps: compiling costs more
    fixed = with_keys(auto, generation={"backend": "merged", "batch_size": 5})
    assert backend.for_generation(fixed, net, lengths).batch_size == 5  # a number is used as written
    monkeypatch.setattr(backend, "budget_bytes", lambda recipe: memory.reserved_for(1e6 + copy_bytes / 2))
    assert backend.for_generation(auto, net, lengths).backend == "batched"
    with pytest.raises(RecipeError) as err:  # asked for explicitly, a copy that cannot fit is the user's to change
        backend.for_generation(with_keys(auto, generation={"backend": "merged"}), net, lengths)
    assert err.value.key_path == "generation.backend"


def test_scoring_batches_stop_at_the_token_cap_and_within_the_budget(lora_net, monkeypatch):
    """Scoring passes are compute-bound: a card with room for thousands of prompts still gets passes of at most
    SCORING_TOKENS tokens; a small budget gets fewer prompts, within it."""
    recipe, tokenizer, net, prompts = lora_net
    lengths = [100] * 5000
    auto = with_keys(recipe, generation={"backend": "merged", "batch_size": "auto"})
    monkeypatch.setattr(backend, "_allocated", lambda: 1e6)
    monkeypatch.setattr(backend, "budget_bytes", lambda recipe: 1000 * GIB)
    shared = backend.for_scoring(auto, net, lengths, 4, rows_per_prompt=4, shared_prefix=True)
    assert shared.batch_size * (96 + 4 * 4) <= backend.SCORING_TOKENS < (shared.batch_size + 8) * (96 + 4 * 4)
    rows = backend.for_scoring(auto, net, lengths, 4, rows_per_prompt=4)  # every label's row runs the prompt
    assert rows.batch_size * 4 * 100 <= backend.SCORING_TOKENS < (rows.batch_size + 8) * 4 * 100
    small = memory.reserved_for(1e6 + merge.copy_bytes(net, 4) + 10.5 * memory.packed_scoring_bytes(
        memory.model_shape(net.config), 4, 96, 4 * 4))
    monkeypatch.setattr(backend, "budget_bytes", lambda recipe: small)
    choice = backend.for_scoring(auto, net, lengths, 4, rows_per_prompt=4, shared_prefix=True)
    assert choice.batch_size == 10 and choice.predicted_gb * GIB <= small * (1 + 1e-9)


# ---------------------------------------------------------------- resume, records


def test_an_interrupted_merged_evaluation_resumes_to_the_same_predictions(lora_net, tmp_path, monkeypatch):
    recipe, tokenizer, net, _ = lora_net
    recipe = with_keys(recipe, generation={"max_new_tokens": 4, "batch_size": 3, "backend": "merged"},
                       evaluation={"evaluators": [{"name": "rouge"}]})
    examples = data_mod.prepare(recipe, tokenizer, roles=("test",)).splits["test"].select(range(8))
    full = tmp_path / "full"
    full.mkdir()
    metrics = evaluate_mod.evaluate(recipe, net, tokenizer, full, examples=examples)
    assert (metrics["backend"], metrics["batch_size"], metrics["new_predictions"]) == ("merged", 3, 8)
    assert metrics["prompts_per_s"] > 0 and metrics["tokens_per_s"] > 0 and metrics["evaluation_seconds"] > 0
    from runner.report import report

    shown = "\n".join(report.metrics_section(json.loads((full / "metrics.json").read_text()), full))
    assert "8 predictions at" in shown and "prompts/s" in shown and "backend merged, batch 3" in shown
    real = generate_mod.generate
    out = tmp_path / "resumed"
    out.mkdir()
    monkeypatch.setattr(generate_mod, "generate", interrupted_after(1, real))
    with pytest.raises(KeyboardInterrupt):
        evaluate_mod.evaluate(recipe, net, tokenizer, out, examples=examples)
    monkeypatch.setattr(generate_mod, "generate", real)
    resumed = evaluate_mod.evaluate(recipe, net, tokenizer, out, examples=examples)
    assert resumed["new_predictions"] == 5
    rows = [sorted((json.loads(line) for line in (d / "predictions.jsonl").read_text().splitlines()),
                   key=lambda r: r["index"]) for d in (full, out)]
    assert rows[0] == rows[1]


def test_an_interrupted_rank_mode_evaluation_resumes_to_the_same_predictions(lora_net, tmp_path, monkeypatch):
    """Rank mode reads a batch's scores only after queuing the next (rank.one_behind): stopped once a batch is
    written, it resumes from what was written and ends with the uninterrupted run's predictions."""
    recipe, tokenizer, net, _ = lora_net
    recipe = with_keys(recipe, generation={"mode": "rank", "labels": ["Storms", "Norcom", "Rovers"], "batch_size": 3,
                                           "backend": "merged"}, evaluation={"evaluators": [{"name": "rouge"}]})
    examples = data_mod.prepare(recipe, tokenizer, roles=("test",)).splits["test"].select(range(8))
    full, out = tmp_path / "full", tmp_path / "resumed"
    full.mkdir()
    out.mkdir()
    evaluate_mod.evaluate(recipe, net, tokenizer, full, examples=examples)
    real = rank_mod.rank
    monkeypatch.setattr(rank_mod, "rank", interrupted_after(1, real))
    with pytest.raises(KeyboardInterrupt):
        evaluate_mod.evaluate(recipe, net, tokenizer, out, examples=examples)
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3
    monkeypatch.setattr(rank_mod, "rank", real)
    assert evaluate_mod.evaluate(recipe, net, tokenizer, out, examples=examples)["new_predictions"] == 5
    rows = [sorted((json.loads(line) for line in (d / "predictions.jsonl").read_text().splitlines()),
                   key=lambda r: r["index"]) for d in (full, out)]
    assert rows[0] == rows[1] and {r["prediction"] for r in rows[0]} <= {"Storms", "Norcom", "Rovers"}



@pytest.fixture
def spied(monkeypatch):
    """(the choices runner.evaluate.backend decided, the choices predictions ran with) while a test runs, on a
    card-sized budget so that auto sizes from memory (its choice carries the predicted peak)."""
    decided, ran = [], []
    monkeypatch.setattr(backend, "_allocated", lambda: 1e6)
    monkeypatch.setattr(backend, "budget_bytes", lambda recipe: 1000 * GIB)
    for name in ("for_generation", "for_scoring"):
        real = getattr(backend, name)
        monkeypatch.setattr(backend, name, lambda *a, real=real, **k: decided.append(real(*a, **k)) or decided[-1])

    class Running(backend.model_for):
        def __init__(self, choice, model):
            ran.append(choice)
            super().__init__(choice, model)

    monkeypatch.setattr(backend, "model_for", Running)
    return decided, ran


@pytest.mark.parametrize("mode", ["generate", "rank"])
def test_the_backend_is_decided_once_and_metrics_record_what_ran(lora_net, tmp_path, spied, mode):
    """generation.backend and batch_size (auto) are decided once per evaluation and handed to the predictor as a
    value: it runs that very choice (not one decided again from a rewritten recipe), and metrics.json records it.
    A choice given to evaluate() is used and recorded as it is, with nothing decided."""
    recipe, tokenizer, net, _ = lora_net
    keys = {"generate": {"max_new_tokens": 3}, "rank": {"mode": "rank", "labels": ["Storms", "Norcom", "Rovers"]}}
    recipe = with_keys(recipe, generation={"backend": "auto", "batch_size": "auto", **keys[mode]},
                       evaluation={"evaluators": [{"name": "rouge"}]})
    examples = data_mod.prepare(recipe, tokenizer, roles=("test",)).splits["test"].select(range(6))
    decided, ran = spied
    metrics = evaluate_mod.evaluate(recipe, net, tokenizer, tmp_path, examples=examples)
    assert len(decided) == 1 and ran == decided and ran[0] is decided[0]
    assert decided[0].backend == "merged" and decided[0].predicted_gb is not None  # sized from the budget
    recorded = json.loads((tmp_path / "metrics.json").read_text())
    assert (recorded["backend"], recorded["batch_size"]) == (metrics["backend"], metrics["batch_size"]) == (
        ran[0].backend, ran[0].batch_size)
    given = backend.Choice("batched", 2)
    again = tmp_path / "given"
    again.mkdir()
    metrics = evaluate_mod.evaluate(recipe, net, tokenizer, again, examples=examples, choice=given)
    assert len(decided) == 1 and ran[-1] is given
    assert (metrics["backend"], metrics["batch_size"], metrics["new_predictions"]) == ("batched", 2, 6)

def test_validate_checks_the_backend():
    recipe = recipes.load(TINY_XSUM)
    eight_bit = copy.deepcopy(recipe)
    eight_bit["quantization"]["method"] = "bnb_8bit"
    with pytest.raises(RecipeError) as err:
        with_keys(eight_bit, generation={"backend": "merged"})
    assert err.value.key_path == "generation.backend"
    with pytest.raises(RecipeError) as err:
        with_keys(recipe, generation={"backend": "compiled", "num_beams": 2})
    assert err.value.key_path == "generation.backend"
    with pytest.raises(RecipeError) as err:
        recipes.load(TINY_XSUM, ["generation.batch_size=0"])
    assert err.value.key_path == "generation.batch_size"
    assert recipes.load(TINY_XSUM, ["generation.batch_size=auto"])["generation"]["batch_size"] == "auto"
    assert recipes.load(ROOT / "recipes" / "xsum_phi2.yaml")["generation"]["backend"] == "auto"
