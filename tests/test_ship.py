"""Shipping a run: the GGUF export (phi2, llama) read back, the Ollama Modelfile, the model card, and `runner push`'s
upload plan and refusals, all offline (no hub, fake or real, is asked)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import yaml

from runner.cli import cli, recipes
from runner.common.errors import EnvironmentProblem, RecipeError
from tests.conftest import ROOT

TINY = ROOT / "recipes" / "tiny" / "xsum_tiny.yaml"
CHAT = ROOT / "recipes" / "tiny" / "chat_tiny.yaml"
needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None,
                                reason="the gguf package is not installed (pip install 'qlora-recipes[gguf]')")

METRICS = {"split": "test", "examples": 48, "rouge": {"rougeL": {"f1": 61.5, "ci95": [55.25, 67.75]}}}


def _run(tmp_path, metrics=METRICS):
    """A run folder as `runner train` leaves it, as far as the card and the plan read it (no weights)."""
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"0" * 10)
    (run / "adapter" / "README.md").write_text("peft's template")
    (run / "metrics.json").write_text(json.dumps(metrics))
    from runner.recipe.recipe import dump

    (run / "recipe.yaml").write_text(dump(recipes.load(TINY)))  # the resolved recipe, as a run keeps it
    (run / "report.md").write_text("# report")
    (run / "report").mkdir()
    (run / "report" / "loss.png").write_bytes(b"png")
    return run


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


# ---------------------------------------------------------------- the card


def test_the_card_names_a_local_base_as_local_and_carries_the_metrics_with_cis(tiny, tmp_path):
    from runner.export import card

    recipe = recipes.load(TINY)
    run = _run(tmp_path)
    (run / "compare-20260101-000000").mkdir()
    (run / "compare-20260101-000000" / "comparison.json").write_text(json.dumps({"split": "test", "examples": 48,
        "metrics": {"rouge.rougeL": {"base": 3.5, "adapter": 61.5, "difference": 58.0,
                                     "paired": {"difference_ci95": [50.0, 66.0]}}}}))
    text = card.render(recipe, run)
    meta = _front_matter(text)
    assert meta["library_name"] == "peft" and "base_model" not in meta  # a local folder is no hub id
    assert "datasets" not in meta  # local files, not hub datasets
    result = meta["model-index"][0]["results"][0]
    assert result["metrics"][0] == {"type": "rougeL", "value": 61.5, "name": "rouge.rougeL"}
    assert "a local model folder (`phi`)" in text
    assert "| rouge.rougeL | 61.5 | [55.25, 67.75] |" in text
    assert "| rouge.rougeL | 3.5 | 61.5 | 58 [50, 66] |" in text  # the comparison with the base
    assert "PeftModel.from_pretrained" in text and "runner export" in text
    assert str(ROOT) not in text and str(tmp_path) not in text  # no local absolute path


def test_the_card_gives_a_hub_base_as_base_model_and_hub_datasets(tiny, tmp_path):
    from runner.export import card

    recipe = recipes.load(TINY, ["model.name_or_path=microsoft/phi-2"])
    recipe["data"]["source"] = "EdinburghNLP/xsum"  # as a hub recipe names it (not loaded here)
    meta = _front_matter(card.render(recipe, _run(tmp_path, metrics={}), "merged", repo="me/xsum"))
    assert meta["base_model"] == "microsoft/phi-2" and meta["datasets"] == ["EdinburghNLP/xsum"]
    assert meta["library_name"] == "transformers" and "model-index" not in meta  # no metrics recorded


# ---------------------------------------------------------------- prompts for llama.cpp and Ollama


def test_the_gguf_chat_template_and_the_modelfile_render_the_recipes_prompt(tiny):
    import jinja2

    from runner.export import modelfile
    from runner.recipe.templates import render

    recipe = recipes.load(TINY)
    article = "Rain fell on {Tuesday}."
    expected = render(recipe["prompt"]["template"], {"document": article})
    jinja = jinja2.Environment().from_string(modelfile.jinja_template(recipe, None))
    assert jinja.render(messages=[{"role": "user", "content": article}]) == expected
    text = modelfile.modelfile(recipe, "m.gguf", ["\n"])
    assert "FROM ./m.gguf" in text
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template.replace("{{ .Prompt }}", article) == expected
    assert 'PARAMETER stop """\n"""' in text and "PARAMETER temperature 0" in text
    assert "PARAMETER num_predict 24" in text


def test_a_chatml_recipe_gets_ollamas_chatml_template(tiny):
    from runner.export import modelfile

    recipe = recipes.load(CHAT)
    assert modelfile.go_template(recipe) == modelfile.CHATML_GO
    assert "<|im_end|>" in modelfile.modelfile(recipe, "m.gguf", ["<|im_end|>"])


# ---------------------------------------------------------------- runner push, offline


def test_the_upload_plan_puts_the_adapter_on_top_and_the_record_under_run(tiny, tmp_path):
    from runner.export import push

    run = _run(tmp_path)
    paths = [i.path_in_repo for i in push.plan(run, "adapter", None)]
    assert paths == ["adapter_config.json", "adapter_model.safetensors", "run/recipe.yaml", "run/metrics.json",
                     "run/report.md", "run/report/loss.png"]  # peft's README.md is replaced by the card
    assert push.plan(run, "gguf", None)[0].local is None  # made by the export first


def test_the_record_goes_up_without_local_paths(tiny, tmp_path):
    from runner.export import push

    run = _run(tmp_path)
    recorded = (run / "recipe.yaml").read_text()
    assert str(ROOT) in recorded  # the resolved recipe names the local model and data folders
    (run / "env.json").write_text(json.dumps({"started_from": {"folder": "/home/ann/runs/sft-1/adapter"},
                                              "url": "https://huggingface.co/x/y", "relative": "runs/a/b"}))
    items = {i.path_in_repo: i for i in push.plan(run, "adapter", None)}
    recipe_up = items["run/recipe.yaml"].data.decode()
    env_up = json.loads(items["run/env.json"].data)
    assert str(ROOT) not in recipe_up and "<local>/" in recipe_up
    assert env_up == {"started_from": {"folder": "<local>/adapter"}, "url": "https://huggingface.co/x/y",
                      "relative": "runs/a/b"}  # URLs and relative paths stay as they are
    assert items["run/report/loss.png"].data is None  # binary files go up as they are


def test_push_dry_run_prints_the_plan_and_the_card_and_asks_no_hub(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a dry run needs no hub
    run = _run(tmp_path)
    assert cli.main(["push", str(TINY), "--run", str(run), "--repo", "me/xsum-tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("upload to me/xsum-tiny (public), one commit: README.md (the model card) and 6 files")
    assert "library_name: peft" in out and out.rstrip().endswith("dry run: nothing was uploaded")


@pytest.mark.parametrize("argv, env, code, message", [
    (["--repo", "not a name!"], {}, 2, "error: --repo: 'not a name!' is not a hub repo name"),
    (["--repo", "me/x", "--quant", "q8_0"], {}, 2, "error: --quant: applies to --gguf only"),
    (["--repo", "me/x"], {"HF_HUB_OFFLINE": "1"}, 1, "error: runner push: offline: HF_HUB_OFFLINE is set"),
    (["--repo", "me/x"], {"HF_HUB_OFFLINE": None, "HF_TOKEN": None}, 1,
     "error: runner push: not logged in to the Hugging Face hub"),
])
def test_push_refuses_in_one_line_before_anything_loads(tiny, tmp_path, capsys, monkeypatch, argv, env, code,
                                                        message):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # no stored login
    monkeypatch.setattr(hub_constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    run = _run(tmp_path)
    assert cli.main(["push", str(TINY), "--run", str(run), *argv]) == code
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not list(run.glob("push-*"))  # nothing staged


# ---------------------------------------------------------------- GGUF


def test_gguf_refuses_what_it_cannot_write_before_loading(tiny, monkeypatch, tmp_path):
    from transformers import AutoConfig, GPT2Config

    from runner.export import gguf_file

    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # as when the extra is not installed
    with pytest.raises(EnvironmentProblem, match="pip install 'qlora-recipes\\[gguf\\]'"):
        gguf_file.check(AutoConfig.from_pretrained(tiny / "phi"), "f16", None)
    monkeypatch.undo()
    if importlib.util.find_spec("gguf") is None:
        return
    with pytest.raises(RecipeError, match="'gpt2' architecture is not supported yet"):
        gguf_file.check(GPT2Config(), "f16", None)
    monkeypatch.setenv("PATH", str(tmp_path))  # no llama-quantize anywhere
    monkeypatch.delenv(gguf_file.LLAMA_CPP_ENV, raising=False)
    with pytest.raises(EnvironmentProblem, match="q4_k_m needs llama.cpp's llama-quantize") as caught:
        gguf_file.check(AutoConfig.from_pretrained(tiny / "phi"), "q4_k_m", None)
    assert caught.value.exit_code == 1


def _write_and_read(model, tokenizer, folder, quant):
    from runner.export import gguf_file

    tokenizer.save_pretrained(folder)
    written = gguf_file.write(model, tokenizer, folder, folder / "m.gguf", quant, name="t", base="local",
                              chat_template="{{ messages[0]['content'] }}")
    return written, gguf_file.verify(folder / "m.gguf", written)


@needs_gguf
def test_phi_gguf_reads_back_with_llama_cpps_names_metadata_and_weights(tiny, tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny / "phi")
    written, back = _write_and_read(model, AutoTokenizer.from_pretrained(tiny / "phi"), tmp_path, "q8_0")
    assert back["tensors"] == len(model.state_dict()) and back["tokens"] == model.config.vocab_size
    assert back["max_weight_error_relative"] < 0.01  # Q8_0: one part in 127 of each block's largest weight
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "blk.0.attn_q.bias", "blk.3.attn_output.weight", "blk.0.ffn_up.weight",
            "output_norm.weight", "output.weight", "output.bias"} <= names
    assert reader.fields["phi2.rope.dimension_count"].contents() == 12  # 0.4 x 128 / 4 heads
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert written["types"]["blk.0.attn_norm.weight"] == "F32" and written["types"]["token_embd.weight"] == "Q8_0"
    from runner.export import gguf_file

    with pytest.raises(EnvironmentProblem, match="phi2.context_length is 512, not 1024"):  # the check can fail
        gguf_file.verify(tmp_path / "m.gguf", {**written, "context_length": 1024})


@needs_gguf
def test_llama_gguf_permutes_q_and_k_for_llama_cpps_rotary_layout(tiny, tmp_path):
    import gguf
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from runner.export import gguf_file

    tokenizer = AutoTokenizer.from_pretrained(tiny / "phi")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256)).eval()
    model.save_pretrained(tmp_path / "llama")  # the real from_pretrained path, as a user's local base
    model = type(model).from_pretrained(tmp_path / "llama")
    written, back = _write_and_read(model, tokenizer, tmp_path, "f32")
    assert back["tensors"] == len(model.state_dict()) and back["max_weight_error_relative"] == 0
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2
    assert reader.fields["llama.rope.dimension_count"].contents() == 16
    tensors = {t.name: t for t in reader.tensors}
    k = model.model.layers[0].self_attn.k_proj.weight.detach().numpy()
    stored = tensors["blk.0.attn_k.weight"].data.reshape(k.shape)
    assert not (stored == k).all()
    assert (stored == gguf_file._permute(k, 4, 2)).all()  # rows in llama.cpp's interleaved pairs
    assert "blk.1.ffn_gate.weight" in tensors and "output.weight" in tensors


@needs_gguf
def test_gguf_writer_holds_one_tensor_at_a_time_not_the_whole_model(tiny, tmp_path):
    """Phi-2 in float32 is 11 GB: the writer makes each tensor when it writes it, so its peak memory does not grow
    with the model's depth. Measured with tracemalloc, which sees numpy's buffers (the q8_0 copies), not torch's."""
    import tracemalloc

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from runner.export import gguf_file

    tokenizer = AutoTokenizer.from_pretrained(tiny / "phi")
    tokenizer.save_pretrained(tmp_path)
    peaks, weights = {}, {}
    for layers in (2, 12):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=256)).eval()
        weights[layers] = sum(t.numel() for t in model.state_dict().values())
        tracemalloc.start()
        try:
            gguf_file.write(model, tokenizer, tmp_path, tmp_path / f"{layers}.gguf", "q8_0", name="t", base="local",
                            chat_template=None)
            peaks[layers] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    # ten more layers are 1.5M more weights: keeping every q8_0 copy until the end made the peak grow by 1.1 MB
    growth, extra = peaks[12] - peaks[2], weights[12] - weights[2]
    assert growth < 0.25 * extra, f"peak grew by {growth} bytes for {extra} more weights"


@pytest.mark.slow
@pytest.mark.twins("xsum_tiny")
@needs_gguf
def test_export_gguf_of_a_trained_run_with_modelfile_and_card(trained, tmp_path, capsys):
    twin = trained("xsum_tiny")
    card = (twin.run_dir / "adapter" / "README.md").read_text()
    assert _front_matter(card)["library_name"] == "peft" and str(ROOT) not in card  # written after the report
    out = tmp_path / "gguf"
    assert cli.main(["export", str(twin.recipe), "--run", str(twin.run_dir), "--out", str(out), "--format", "gguf",
                     "--quant", "q8_0"]) == 0
    stdout = capsys.readouterr().out
    assert "GGUF xsum_tiny-q8_0.gguf (phi2, q8_0): read back 61 tensors, 1728 tokens" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "export.json", "xsum_tiny-q8_0.gguf"]
    record = json.loads((out / "export.json").read_text())["gguf"]
    # 4 layers x 6 matrices + token_embd + output in Q8_0; biases and norms (35) in F32, as llama.cpp's converter
    assert record["tensor_types"] == {"Q8_0": 26, "F32": 35}
    assert "FROM ./xsum_tiny-q8_0.gguf" in (out / "Modelfile").read_text()
    assert _front_matter((out / "README.md").read_text())["library_name"] == "gguf"
