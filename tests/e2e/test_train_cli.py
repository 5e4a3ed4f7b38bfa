"""The real CLI on tiny recipes: a small model learns from a YAML recipe; the study's recipe runs end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.twins("xsum_tiny")  # the twin `trained` gives this module's tests (docs/testing.md)

TINY = ROOT / "recipes" / "tiny" / "xsum_tiny.yaml"
PHI2 = ROOT / "recipes" / "xsum_phi2.yaml"


def run_folder(output_dir: Path, name: str) -> Path:
    folders = sorted(p for p in (output_dir / name).iterdir() if p.is_dir() and p.name[0].isdigit())
    assert len(folders) == 1, folders
    return folders[0]


def ok(result):
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def rouge_l(metrics: dict) -> float:
    return metrics["rouge"]["rougeL"]["f1"]


def test_tiny_xsum_learns_to_summarize(trained):
    run = trained("xsum_tiny")
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    base = ok(run_cli("eval", TINY, "--base", f"output_dir={run.output_dir}"))
    base_dir = next((run.output_dir / "xsum_tiny" / "base").iterdir())
    base_metrics = json.loads((base_dir / "metrics.json").read_text())
    assert metrics["examples"] == base_metrics["examples"] == 48
    print(f"ROUGE-L trained {rouge_l(metrics):.1f} vs untrained {rouge_l(base_metrics):.1f}")
    assert rouge_l(metrics) >= 50
    assert rouge_l(metrics) >= 3 * rouge_l(base_metrics)
    assert "rougeL" in run.stdout and "trainable params:" in run.stdout
    assert "rougeL" in base.stdout


def test_run_folder_holds_the_record(trained):
    run = trained("xsum_tiny")
    steps = yaml.safe_load(TINY.read_text())["training"]["max_steps"]
    recipe = yaml.safe_load((run.run_dir / "recipe.yaml").read_text())
    assert recipe["training"]["max_steps"] == steps and recipe["training"]["num_threads"] is None  # defaults filled
    env = json.loads((run.run_dir / "env.json").read_text())
    assert env["versions"]["trl"] and env["device"]["type"] in ("cpu", "cuda")
    assert env["data"]["train"]["kept"] == 2000 and len(env["data_fingerprint"]) == 16
    assert env["trainable"] > 0 and env["train_seconds"] > 0 and env["global_step"] == steps
    log = [json.loads(line) for line in (run.run_dir / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) >= steps // 10 and losses[-1] < losses[0]
    assert any("eval_loss" in r for r in log)
    predictions = [json.loads(line) for line in (run.run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 48 and {"prompt", "reference", "prediction"} <= set(predictions[0])
    assert "| reference | prediction |" in (run.run_dir / "samples.md").read_text()


def test_the_cpu_trained_adapter_stays_fp32(trained):
    """TRL casts QLoRA adapters to bf16; on a CPU the runner keeps them fp32 (bf16 matmuls are slow without
    AVX512-BF16), so the saved adapter is fp32 too."""
    from safetensors import safe_open

    with safe_open(trained("xsum_tiny").run_dir / "adapter" / "adapter_model.safetensors", "pt") as f:
        dtypes = {str(f.get_slice(name).get_dtype()) for name in f.keys()}
    assert dtypes == {"F32"}


def test_adapter_loads_with_plain_peft(trained, tiny):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = trained("xsum_tiny").run_dir
    base = AutoModelForCausalLM.from_pretrained(tiny / "phi")
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    tok = AutoTokenizer.from_pretrained(run_dir / "adapter")
    ids = tok("Article: Heavy snow closed schools.\nSummary:", return_tensors="pt")
    with torch.no_grad():
        assert model(**ids).logits.shape[-1] == base.config.vocab_size


def test_eval_of_a_saved_run_reproduces_its_metrics(trained):
    run_dir = trained("xsum_tiny").run_dir
    ok(run_cli("eval", TINY, "--run", run_dir))
    again = json.loads(next(run_dir.glob("eval-*/metrics.json")).read_text())
    first = json.loads((run_dir / "metrics.json").read_text())
    assert rouge_l(again) == pytest.approx(rouge_l(first), abs=1.0)  # greedy; 4-bit CPU kernels differ slightly


@pytest.mark.slow
def test_the_study_recipe_runs_end_to_end_on_the_tiny_model(tiny, tmp_path):
    """xsum_phi2.yaml unchanged but for model, data and sizes: NF4 double quant, q/k/v/dense LoRA,
    paged_adamw_8bit, gradient checkpointing, eval and checkpoints, nucleus sampling with repetition penalty."""
    data = tiny / "data" / "xsum_tiny"
    result = ok(run_cli("train", PHI2, f"model.name_or_path={tiny / 'phi'}",
                        f"data.source={{train: {data / 'train.jsonl'}, eval: {data / 'validation.jsonl'}, "
                        f"test: {data / 'test.jsonl'}}}",
                        "data.train_samples=64", "data.eval_samples=8", "data.test_samples=8",
                        "training.max_steps=4", "training.eval_every=2", "training.save_every=2",
                        "generation.max_new_tokens=8", f"output_dir={tmp_path}"))
    run_dir = run_folder(tmp_path, "xsum_phi2")
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert recipe["training"]["optimizer"] == "paged_adamw_8bit" and recipe["training"]["gradient_checkpointing"]
    assert recipe["lora"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "dense"]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    adapter_cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter_cfg["target_modules"]) == ["dense", "k_proj", "q_proj", "v_proj"]
    assert adapter_cfg["r"] == 16 and adapter_cfg["lora_alpha"] == 32
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert sum("eval_loss" in r for r in log) == 2
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["examples"] == 8 and set(metrics["rouge"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert "trainable params:" in result.stdout


@pytest.mark.slow
def test_resume_auto_continues_an_interrupted_run(tiny, tmp_path):
    args = ["train", TINY, f"output_dir={tmp_path}", "training.max_steps=4", "training.save_every=2",
            "training.resume=auto", "training.logging_steps=1", "data.train_samples=64", "data.test_samples=4", "--no-eval"]
    ok(run_cli(*args))
    run_dir = run_folder(tmp_path, "xsum_tiny")
    # What an interruption after step 2 leaves: checkpoint-2, no later checkpoint, no adapter, no report.
    (run_dir / "report.md").unlink()
    shutil.rmtree(run_dir / "adapter")
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-4")
    log_path = run_dir / "train_log.jsonl"
    log_path.write_text("".join(line + "\n" for line in log_path.read_text().splitlines()
                                if json.loads(line)["step"] <= 2))
    result = ok(run_cli(*args))
    assert "resuming the interrupted run" in result.stdout and "checkpoint-2" in result.stdout
    assert run_folder(tmp_path, "xsum_tiny") == run_dir  # same folder, no new one
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    steps = [json.loads(line)["step"] for line in log_path.read_text().splitlines()]
    assert max(steps) == 4 and min(s for s in steps if s > 2) == 3
    # A finished run is never reopened: the next run gets a new folder.
    ok(run_cli(*args))
    assert len([p for p in (tmp_path / "xsum_tiny").iterdir() if p.name[0].isdigit()]) == 2
