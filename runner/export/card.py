"""The model card (``README.md``) of a run's adapter and of its exports, built from the run's own record.

Hub metadata first (YAML front matter through huggingface_hub's ModelCardData, so the hub reads it): base_model as
the hub id, library_name, tags, datasets (hub ids only), the metrics and their values (model-index). Then the recipe
in brief, the metrics with their 95% CIs, the trivial baselines (baselines.json) and the comparison with the base
model (the newest finished ``runner compare`` of the run) where they exist, intended use, and how to load it. No
local absolute path appears: a local base model or data file is named by its folder or file name, and said to be
local.
"""

from __future__ import annotations

import json
from pathlib import Path

from runner.common import safeio
from runner.common.markdown import cell
from runner.evaluate import metrics as metrics_mod

KINDS = ("adapter", "merged", "gguf")
LIBRARY = {"adapter": "peft", "merged": "transformers", "gguf": "gguf"}
CARD = "README.md"


def is_local(name: str) -> bool:
    """A path (absolute, relative or existing) rather than a hub id (``owner/name`` or ``name``)."""
    return Path(name).is_absolute() or name.startswith((".", "~")) or Path(name).exists() or name.count("/") > 1


def base_text(recipe: dict) -> str:
    name = recipe["model"]["name_or_path"]
    if is_local(name):
        return f"a local model folder (`{Path(name).name}`), not a hub model"
    return f"[{name}](https://huggingface.co/{name})"


def _sources(recipe: dict) -> list[str]:
    d = recipe["data"]
    if d.get("sources"):
        return [s["source"] for s in d["sources"] if isinstance(s["source"], str)]
    return [d["source"]] if isinstance(d["source"], str) else []


def hub_datasets(recipe: dict) -> list[str]:
    return [s for s in _sources(recipe) if not is_local(s)]


def data_text(recipe: dict) -> str:
    hub = hub_datasets(recipe)
    if hub:
        return ", ".join(f"[{s}](https://huggingface.co/datasets/{s})" for s in hub)
    return "local data files (not on the hub)"


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def newest_comparison(run_dir: Path) -> dict | None:
    """The newest finished ``runner compare`` of this run against its base (``compare-*/comparison.json``)."""
    for folder in sorted(run_dir.glob("compare-*"), reverse=True):
        found = _json(folder / "comparison.json")
        if found is not None:
            return found
    return None


def _num(value) -> str:
    return "–" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))


def _ci(ci) -> str:
    return f"[{_num(ci[0])}, {_num(ci[1])}]" if isinstance(ci, list) and len(ci) == 2 else "–"


def metadata(recipe: dict, metrics: dict | None, kind: str) -> str:
    """The YAML front matter (without the ``---`` lines)."""
    from huggingface_hub import EvalResult, ModelCardData

    base = recipe["model"]["name_or_path"]
    heads = metrics_mod.headline(metrics) if metrics else {}
    split = recipe["evaluation"]["split"]
    hub = hub_datasets(recipe)
    results = [EvalResult(task_type="text-generation", dataset_type=hub[0] if hub else "local",
                          dataset_name=hub[0] if hub else "local data files", dataset_split=split,
                          metric_type=name.rpartition(".")[2], metric_name=name, metric_value=m["value"])
               for name, m in heads.items()]
    tags = ["qlora", "lora", "qlora-recipes", recipe["name"]] + (["gguf"] if kind == "gguf" else [])
    data = ModelCardData(base_model=None if is_local(base) else base, library_name=LIBRARY[kind], tags=tags,
                         datasets=hub or None, metrics=sorted({n.rpartition(".")[2] for n in heads}) or None,
                         model_name=recipe["name"] if results else None, eval_results=results or None,
                         pipeline_tag="text-generation")
    return data.to_yaml()


def _recipe_rows(recipe: dict) -> list[str]:
    q, lora, t, g = recipe["quantization"], recipe["lora"], recipe["training"], recipe["generation"]
    adapter = "full fine-tuning" if lora is None else (f"LoRA r={lora['r']}, alpha={lora['alpha']}, "
                                                       f"dropout={lora['dropout']} on {lora['target_modules']}")
    steps = f"{t['max_steps']} steps" if t["max_steps"] else f"{t['epochs']} epoch(s)"
    rows = [("base model", base_text(recipe)), ("quantization while training", q["method"]
                                                 + (f" ({q['quant_type']})" if q["method"] == "bnb_4bit" else "")),
            ("adapter", adapter), ("data", data_text(recipe)),
            ("training", f"{steps}, lr {t['learning_rate']} ({t['lr_scheduler']}), micro-batch "
                         f"{t['micro_batch_size']} x {t['gradient_accumulation_steps']}, seed {recipe['seed']}"),
            ("decoding", ("sampling" if g["do_sample"] else "greedy") + f", max_new_tokens {g['max_new_tokens']}, "
                         f"stop {json.dumps(g['stop'], ensure_ascii=False)}")]
    return ["| | |", "|---|---|", *(f"| {k} | {cell(str(v))} |" for k, v in rows)]


def _prompt_lines(recipe: dict) -> list[str]:
    p = recipe["prompt"]
    if p.get("messages"):
        return [f"Chat conversations, rendered with the chat template `{p['chat_template'] or 'of the tokenizer'}`"
                " (saved with the tokenizer)."]
    return ["Prompt template (the model was trained and evaluated on prompts in exactly this shape; the completion "
            f"follows it as `{p['completion'].replace('`', chr(39))}`):", "", "```text", p["template"], "```"]


def _metric_lines(metrics: dict | None, recipe: dict) -> list[str]:
    if not metrics:
        return ["No evaluation was recorded for this run."]
    flat = metrics_mod.headline(metrics)
    lines = [f"On the `{recipe['evaluation']['split']}` split ({metrics.get('examples', '?')} examples), with 95% "
             "bootstrap confidence intervals:", "", "| metric | value | 95% CI |", "|---|---|---|"]
    return lines + [f"| {name} | {_num(m['value'])} | {_ci(m['ci95'])} |" for name, m in flat.items()]


def _baseline_lines(run_dir: Path) -> list[str]:
    found = _json(run_dir / "baselines.json")
    if not found or not found.get("baselines"):
        return []
    lines = ["", "### Trivial baselines", "", "On the same examples; the difference is the model minus the baseline "
             "(paired bootstrap 95% CI).", "", "| baseline | metric | baseline value | model − baseline |",
             "|---|---|---|---|"]
    for name, b in found["baselines"].items():
        paired = b.get("model_minus_baseline") or {}
        for metric, m in metrics_mod.headline(b["metrics"]).items():
            diff = paired.get(metric) or {}
            lines.append(f"| {cell(name)} | {metric} | {_num(m['value'])} | {_num(diff.get('difference'))} "
                         f"{_ci(diff.get('difference_ci95'))} |")
    return lines


def _comparison_lines(run_dir: Path) -> list[str]:
    found = newest_comparison(run_dir)
    if not found:
        return []
    lines = ["", "### Against the base model", "", f"`runner compare` on {found.get('examples', '?')} examples of "
             f"the `{found.get('split')}` split:", "", "| metric | base | fine-tuned | difference (paired 95% CI) |",
             "|---|---|---|---|"]
    for metric, row in (found.get("metrics") or {}).items():
        if metric.count(".") > 1:
            continue
        paired = row.get("paired") or {}
        lines.append(f"| {metric} | {_num(row.get('base'))} | {_num(row.get('adapter'))} | "
                     f"{_num(row.get('difference'))} {_ci(paired.get('difference_ci95'))} |")
    return lines


def _load_lines(recipe: dict, kind: str, repo: str | None, gguf_name: str | None) -> list[str]:
    where = repo or "PATH/TO/THIS/FOLDER"
    base = recipe["model"]["name_or_path"]
    base_ref = "PATH/TO/THE/BASE/MODEL" if is_local(base) else base
    if kind == "gguf":
        return ["```sh", "ollama create " + recipe["name"] + " -f Modelfile   # in this folder", f"ollama run "
                f"{recipe['name']}", f"llama-cli -m {gguf_name or 'MODEL.gguf'} -p '...'   # llama.cpp", "```"]
    merged = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("{where}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{where}")', "```"]
    if kind == "merged":
        return ["A plain transformers model (the adapter merged into the dequantized 4-bit base):", "", *merged]
    return ["With peft, on the base model (loaded in 4 bit as it was trained, or in 16 bit):", "", "```python",
            "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'base = AutoModelForCausalLM.from_pretrained("{base_ref}")',
            f'model = PeftModel.from_pretrained(base, "{where}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{where}")', "```", "",
            "Merged into one plain transformers model: `runner export --run RUN --out DIR` (`--format gguf` for "
            "llama.cpp and Ollama), which merges into the dequantized 4-bit weights the adapter was trained against."]


def render(recipe: dict, run_dir: Path, kind: str = "adapter", repo: str | None = None,
           gguf_name: str | None = None) -> str:
    """The card's text for ``run_dir``'s adapter (``kind``: adapter, merged or gguf)."""
    metrics = _json(run_dir / "metrics.json")
    what = {"adapter": "a LoRA adapter", "merged": "the LoRA adapter merged into its base model",
            "gguf": "the LoRA adapter merged into its base model, as a GGUF file for llama.cpp and Ollama"}[kind]
    lines = ["---", metadata(recipe, metrics, kind).rstrip("\n"), "---", "", f"# {recipe['name']}", "",
             f"{what[0].upper()}{what[1:]}, fine-tuned with QLoRA by the recipe `{recipe['name']}`; base model: "
             f"{base_text(recipe)}. "
             "Made with qlora-recipes; the full resolved recipe is the run's `recipe.yaml`.", "", "## Recipe", "",
             *_recipe_rows(recipe), "", *_prompt_lines(recipe), "", "## Results", "", *_metric_lines(metrics, recipe),
             *_baseline_lines(run_dir), *_comparison_lines(run_dir), "", "## Intended use", "",
             "The task of the recipe, on inputs shaped like its prompt: the scores above hold for examples like "
             "its evaluation data, not for other tasks or other prompt shapes. It inherits the base model's "
             "limitations and biases; check its outputs before relying on them.", "", "## How to load", "",
             *_load_lines(recipe, kind, repo, gguf_name), ""]
    return "\n".join(lines)


def write(path: Path, recipe: dict, run_dir: Path, kind: str = "adapter", repo: str | None = None,
          gguf_name: str | None = None) -> Path:
    safeio.write_text(path, render(recipe, run_dir, kind, repo, gguf_name))
    return path
