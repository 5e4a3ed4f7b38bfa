"""runner export: the QLoRA-correct merge (dequantized 4-bit base + LoRA in the compute dtype), saved as a plain
transformers folder that loads without peft, bitsandbytes or the runner."""

from __future__ import annotations

import json

import pytest

from runner.cli import cli, recipes
from tests.conftest import ROOT

pytestmark = pytest.mark.twins("xsum_tiny")  # the twin `trained` gives this module's tests (docs/testing.md)

TINY = ROOT / "recipes" / "tiny" / "xsum_tiny.yaml"


def test_export_refuses_an_existing_folder_before_loading_anything(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "out").mkdir()
    code = cli.main(["export", str(TINY), "--run", str(run), "--out", str(tmp_path / "out")])
    assert code == 2
    assert capsys.readouterr().err.startswith("error: --out: ")
    code = cli.main(["export", str(TINY), "--run", str(tmp_path), "--out", str(tmp_path / "new")])
    assert code == 2 and "has no trained adapter" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_export_makes_missing_parent_folders_but_refuses_a_file_in_the_way(tiny, tmp_path, capsys):
    """`--out merged/<name>` on a fresh clone (no merged/ yet) must work; a file where a folder should be must not."""
    from runner.export import export

    nested = tmp_path / "merged" / "deeper" / "xsum_tiny"
    assert export.check_out(nested) == nested  # the parents are made when the model is saved
    assert not (tmp_path / "merged").exists()  # ...not before: a refused or failed export leaves nothing
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile" / "model", tmp_path / "afile" / "sub" / "model"):
        code = cli.main(["export", str(TINY), "--run", str(run), "--out", str(out)])
        assert code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --out: ") and "afile is a file" in err, err
    assert (tmp_path / "afile").read_text() == "x"


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    from tests.conftest import run_cli, run_folder

    twin = trained("xsum_tiny")
    out = tmp_path_factory.mktemp("export") / "merged" / "xsum_tiny"  # merged/ does not exist yet
    result = run_cli("export", twin.recipe, "--run", twin.run_dir, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert run_folder(result.stdout) == out
    return twin, out, result.stdout


def test_the_export_is_a_plain_transformers_folder_with_the_recipes_decoding(exported):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    _, out, stdout = exported
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "config.json", "export.json", "generation_config.json", "model.safetensors",
                     "tokenizer.json", "tokenizer_config.json"]  # README.md: the model card (issue 28)
    assert not list(out.parent.glob("*.partial"))
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers: no peft, no quantization
    assert type(model).__name__ == "PhiForCausalLM"
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    AutoTokenizer.from_pretrained(out)
    gen = GenerationConfig.from_pretrained(out)
    assert (gen.max_new_tokens, gen.do_sample, gen.num_beams) == (24, False, 1)  # the recipe's generation section
    assert gen.stop_strings is None  # would make a plain generate() without tokenizer= fail: in export.json
    record = json.loads((out / "export.json").read_text())
    assert record["stop_strings"] == ["\n"] and record["quantization"] == "bnb_4bit"
    assert "differ by at most" in stdout


def test_merged_logits_match_the_4bit_model_with_its_adapter_unlike_requantizing(exported):
    """The known peer bug is merging and then quantizing again (peft's merge_and_unload on a 4-bit model): that
    model computes something else. Measured on 16 test examples (prompt + reference) of the trained XSum twin, fp32
    on CPU: the export's logits differ from the 4-bit model + adapter by at most 1.1e-5 (logits up to 11.1); the
    re-quantized merge by 2.2. The tolerance below is 1e-4, and re-quantizing must be 1000x further off."""
    import torch
    from transformers import AutoModelForCausalLM

    from runner.cli import recipes
    from runner.model import model as model_mod

    twin, out, _ = exported
    torch.set_num_threads(2)
    recipe = recipes.load(twin.recipe)
    tokenizer = model_mod.load_tokenizer(recipe)
    adapter = model_mod.load_trained(recipe, twin.run_dir / "adapter")
    model_mod._keep_trainable_layout(adapter)  # the 4-bit layout training computed with (not CPU inference's)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    rows = [json.loads(line) for line in (twin.run_dir / "predictions.jsonl").read_text().splitlines()][:16]
    enc = tokenizer([r["prompt"] + " " + r["reference"] for r in rows], return_tensors="pt", padding=True)
    mask = enc["attention_mask"].bool()
    with torch.no_grad():
        want = adapter(**enc).logits[mask]
        ours = (merged(**enc).logits[mask] - want).abs().max().item()
        with pytest.warns(UserWarning, match="rounding errors"):  # peft knows, and says so
            requantized = (adapter.merge_and_unload()(**enc).logits[mask] - want).abs().max().item()
    assert ours < 1e-4
    assert requantized > 1000 * ours


def test_export_without_a_recipe_takes_the_runs_own(tiny, tmp_path, capsys):
    """No RECIPE: the run's recipe.yaml; a run without a readable one is refused, naming how to give the recipe."""
    from runner.recipe import recipe as recipe_mod

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    code = cli.main(["export", "--run", str(run), "--out", str(tmp_path / "new")])
    assert code == 2 and capsys.readouterr().err.strip() == (
        f"error: --run: {run} has no readable recipe.yaml to take the recipe from (name the recipe it was trained "
        f"with: runner export RECIPE --run {run})")
    (run / "recipe.yaml").write_text(recipe_mod.dump(recipes.load(TINY, ["model.name_or_path=./nowhere"])))
    code = cli.main(["export", "--run", str(run), "--out", str(tmp_path / "new")])
    assert code == 2 and capsys.readouterr().err.startswith("error: model.name_or_path: local folder not found: ")
    assert not (tmp_path / "new").exists()
    code = cli.main(["eval", "--base"])
    assert code == 2 and capsys.readouterr().err.startswith("error: RECIPE: missing (give the recipe file")
