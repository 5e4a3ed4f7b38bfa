"""`runner plan` predicts training time per profile from the measured throughput in bench/RESULTS.md; the table in
runner/speed/throughput.py must stay equal to that file."""

from __future__ import annotations

import pytest

from runner.cli import recipes
from runner.common.errors import RecipeError
from runner.speed import throughput
from tests.conftest import ROOT

RESULTS = ROOT / "bench" / "RESULTS.md"
SECTIONS = {"H100": "## Confirmation on the issue's card: one NVIDIA H100 (call 4)", "H200": "## Results (call 2,"}
ROWS = {"none": "A", "low_memory": "low_memory", "balanced": "balanced", "fast": "fast"}


def measured_table(heading: str) -> dict[str, dict]:
    """{variant: {column: text}} of the first table after ``heading`` in bench/RESULTS.md."""
    lines = RESULTS.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    first = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))
    header = [c.strip() for c in lines[first].strip("|").split("|")]
    rows = {}
    for line in lines[first + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].split(" (")[0]] = dict(zip(header, cells, strict=True))
    return rows


@pytest.mark.parametrize("card", list(throughput.CARDS))
def test_the_throughput_table_is_the_one_in_bench_results(card):
    table = measured_table(SECTIONS[card])
    assert throughput.CARDS[card]["source"].split(", ")[1] in SECTIONS[card]  # "call 4"
    for profile, variant in ROWS.items():
        row = table[variant]
        assert throughput.CARDS[card]["tokens_per_s"][profile] == int(row["real tok/s"].strip("*").replace(",", ""))
        # The study's job (5,000 examples x 1 epoch at 512 tokens) in the bench's own column, within its rounding.
        recipe = recipes.load(ROOT / "recipes" / "xsum_phi2.yaml", [f"training.profile={profile}"])
        minutes = 5000 / throughput.examples_per_second(card, profile, throughput.MEASURED_PARAMS, 512) / 60
        column = next(k for k in row if k.startswith("study job"))
        assert minutes == pytest.approx(float(row[column].strip("*")), abs=0.051)
        assert recipe["prompt"]["max_length"] == throughput.MEASURED_TOKENS


def test_time_scales_with_parameters_row_length_and_examples():
    recipe = recipes.load(ROOT / "recipes" / "xsum_phi2.yaml", ["training.max_steps=100"])
    assert throughput.examples_to_train(recipe) == 1600
    base = throughput.predict_seconds(recipe, "H100", "fast", throughput.MEASURED_PARAMS)
    assert base == pytest.approx(1600 * 389.9 / 20474)
    assert throughput.predict_seconds(recipe, "H100", "fast", throughput.MEASURED_PARAMS // 2) == pytest.approx(base / 2)
    half = recipes.load(ROOT / "recipes" / "xsum_phi2.yaml", ["training.max_steps=100", "prompt.max_length=256",
                                                                 "data.max_tokens=256"])
    assert throughput.predict_seconds(half, "H100", "fast", throughput.MEASURED_PARAMS) == pytest.approx(base / 2)
    epochs = recipes.load(ROOT / "recipes" / "xsum_phi2.yaml", ["training.epochs=2"])
    assert throughput.examples_to_train(epochs) == 2 * 5008  # 313 steps of 16 per epoch
    assert throughput.examples_to_train(recipes.load(ROOT / "recipes" / "xsum_phi2.yaml",
                                                        ["data.train_samples=null"])) is None


def test_the_card_is_named_detected_or_assumed_and_said():
    assert throughput.find_card("h200") == ("H200", "named")
    assert throughput.find_card(None, "NVIDIA H200") == ("H200", "this machine's GPU")
    key, why = throughput.find_card(None, "NVIDIA A10G")
    assert key == "H100" and "A10G" in why and why.startswith("assumed")
    assert throughput.find_card(None, None) is None  # no GPU, none named: the GPU measurements predict nothing
    with pytest.raises(RecipeError) as err:
        throughput.find_card("A100")
    assert err.value.key_path == "--card" and "H100, H200" in err.value.hint


@pytest.mark.slow
def test_plan_prints_the_time_per_profile_and_the_card(tmp_path, cli):
    from transformers import PhiConfig

    from tests.test_plan import PHI2

    PhiConfig(**PHI2).save_pretrained(tmp_path)
    result = cli("plan", ROOT / "recipes" / "xsum_phi2.yaml", f"model.name_or_path={tmp_path}", "--card", "H200")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "training time on NVIDIA H200 (named), from bench/RESULTS.md, call 2" in out
    assert "5,008 examples" in out
    # 5,008 examples at 19,423 real tokens/s / 389.9 tokens an example, scaled by 2,779,683,840 / 2,779,683,840
    assert "fast              49.8            1.7 min" in out, out
    assert "(rates measured uncompiled; on a GPU, fast and balanced compile their decoder layers " \
           "(training.compile: auto)" in out
    eager = cli("plan", ROOT / "recipes" / "xsum_phi2.yaml", f"model.name_or_path={tmp_path}", "--card", "H200",
                "training.compile=false")
    assert eager.returncode == 0 and "49.8" in eager.stdout and "compile" not in eager.stdout
    assert "(and measured with bitsandbytes' optimizer syncing the GPU after every parameter" in out  # paged_adamw_8bit
    torch_adam = cli("plan", ROOT / "recipes" / "xsum_phi2.yaml", f"model.name_or_path={tmp_path}", "--card", "H200",
                     "training.optimizer=adamw_torch")
    assert torch_adam.returncode == 0 and "bitsandbytes" not in torch_adam.stdout
    bad = cli("plan", ROOT / "recipes" / "xsum_phi2.yaml", f"model.name_or_path={tmp_path}", "--card", "A100")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --card: no measured throughput for 'A100'")


def test_without_a_gpu_the_plan_predicts_no_time(tiny):
    """The measured throughput is a GPU's: on a CPU (none named) the plan says no time is predicted instead of
    printing an H100's examples/s for this machine."""
    from runner.speed import plan

    text = plan.report(recipes.load(ROOT / "recipes" / "tiny" / "xsum_tiny.yaml"), None, card=None)
    assert throughput.NOT_PREDICTED in text and "examples/s" not in text and "H100" not in text.replace(
        throughput.NOT_PREDICTED, "")
    assert "no GPU here: GPU memory predicted for a card of any size" in text
    named = plan.report(recipes.load(ROOT / "recipes" / "tiny" / "xsum_tiny.yaml"), None,
                        card=throughput.find_card("H100"))
    assert "training time on NVIDIA H100 80GB HBM3 (named)" in named and throughput.NOT_PREDICTED not in named


@pytest.mark.slow
def test_plan_on_this_cpu_says_no_time_is_predicted(tiny, cli):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: its time is predicted")
    result = cli("plan", ROOT / "recipes" / "tiny" / "xsum_tiny.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.rstrip().endswith(throughput.NOT_PREDICTED) and "examples/s" not in result.stdout
