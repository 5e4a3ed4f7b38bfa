"""runner plan and the speed profiles: parameters and memory from a config alone; budgets fit or refuse early."""

from __future__ import annotations

import re

import pytest

from runner.cli import recipes
from runner.common.errors import RecipeError
from runner.speed import memory, profiles
from tests.conftest import ROOT

XSUM = ROOT / "recipes" / "xsum_phi2.yaml"
TINY = ROOT / "recipes" / "tiny" / "xsum_tiny.yaml"
PHI2 = dict(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
            num_attention_heads=32, partial_rotary_factor=0.4, max_position_embeddings=2048, hidden_act="gelu_new",
            tie_word_embeddings=False)


@pytest.fixture(scope="module")
def phi2_config():
    from transformers import PhiConfig

    return PhiConfig(**PHI2)


@pytest.fixture(scope="module")
def phi2_dir(tmp_path_factory, phi2_config):
    folder = tmp_path_factory.mktemp("phi2-config-only")
    phi2_config.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    return folder


def xsum(*overrides: str) -> dict:
    return recipes.load(XSUM, list(overrides))


@pytest.mark.slow
def test_plan_runs_offline_from_a_folder_holding_only_config_json(phi2_dir, cli):
    result = cli("plan", XSUM, f"model.name_or_path={phi2_dir}", "--gpu-gb", "80")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "trainable params: 10,485,760 || all params: 2,790,169,600" in out
    for name in ("none", "fast", "balanced", "low_memory"):
        assert re.search(rf"^{name}\s+\d+ x \d+\s+(yes|no)\s+[\d.]+ GiB$", out, re.M), out
    # the breakdown's terms add up to the predicted peak
    parts = [float(v) for v in re.findall(r"^  (?![=+(]).*?\s([\d.]+) GiB$", out, re.M)]
    total = float(re.search(r"= peak reserved by torch\s+([\d.]+) GiB", out).group(1))
    assert len(parts) >= 5
    assert sum(parts) == pytest.approx(total, abs=0.01 * len(parts))
    assert "4-bit weights" in out and "CUDA context" in out


# Peak reserved memory measured through the runner on an H200 (bench/RESULTS.md, call 2) and, for the study's own
# path, on an H100 by ../shared/bench/RESULTS.md (variants A, B, E3). (overrides, speed, GiB measured)
PROFILED = dict(fixed_shapes=True, keep_dtype=True, fused_activation=True, cudnn_sdpa=False)
MEASURED = [
    (["model.attn_implementation=eager"], profiles.Speed("none", 4, 4, True), 4.26),  # notebook baseline A
    ([], profiles.Speed("none", 4, 4, True), 3.86),  # B: sdpa, padding to the longest
    ([], profiles.Speed("none", 16, 1, False), 58.32),  # E3: fixed rows, no checkpointing, fp32 upcasts
    ([], profiles.Speed("fast", 16, 1, False, **PROFILED), 21.25),  # bench call 2 (H200): fast
    ([], profiles.Speed("balanced", 8, 2, False, **PROFILED), 11.62),  # balanced
    ([], profiles.Speed("low_memory", 8, 2, True, **PROFILED), 3.13),  # low_memory
    ([], profiles.Speed("none", 4, 4, True, **PROFILED), 2.52),  # L4: every switch at the study's 4 x 4
]


@pytest.mark.parametrize("overrides,speed,measured", MEASURED)
def test_plan_predicts_measured_gpu_peaks_within_15_percent(phi2_config, overrides, speed, measured):
    predicted = memory.estimate(xsum(*overrides), phi2_config, speed).reserved_gb
    assert predicted == pytest.approx(measured, rel=0.15)


def test_auto_on_a_cpu_changes_nothing(phi2_config):
    recipe = recipes.load(TINY)
    speed = profiles.resolve(recipe, phi2_config, card_gb=None, detect=False)
    assert speed == profiles.Speed("none", 16, 1, False)
    assert not (speed.fixed_shapes or speed.keep_dtype or speed.fused_activation) and speed.cudnn_sdpa
    t = recipe["training"]  # what trains is what the recipe writes
    assert (speed.micro_batch_size, speed.gradient_accumulation_steps, speed.gradient_checkpointing) == (
        t["micro_batch_size"], t["gradient_accumulation_steps"], t["gradient_checkpointing"])


@pytest.mark.parametrize("card,expected", [(80, "fast"), (40, "fast"), (24, "balanced"), (6, "low_memory"),
                                           (None, "none")])
def test_auto_picks_a_profile_by_card_memory(card, expected):
    assert profiles.pick_profile("auto", card) == expected
    assert profiles.pick_profile("balanced", card) == "balanced"


def test_profiles_keep_examples_per_step_and_fit_their_budgets(phi2_config):
    picked = {}
    for name in ("fast", "balanced", "low_memory"):
        speed = profiles.resolve(xsum(f"training.profile={name}"), phi2_config, card_gb=80, detect=False)
        assert speed.micro_batch_size * speed.gradient_accumulation_steps == 16
        assert speed.fixed_shapes and speed.keep_dtype and speed.fused_activation and not speed.cudnn_sdpa
        assert speed.predicted_gb <= speed.budget_gb
        picked[name] = speed
    assert picked["fast"].micro_batch_size == 16 and not picked["fast"].gradient_checkpointing
    assert picked["balanced"].budget_gb == profiles.BUDGET_GB["balanced"]
    assert picked["low_memory"].gradient_checkpointing
    assert picked["fast"].predicted_gb > picked["balanced"].predicted_gb > picked["low_memory"].predicted_gb


def test_the_profiles_need_less_memory_than_the_study_path_at_the_same_micro_batch(phi2_config):
    recipe = xsum()
    for micro, gc in ((4, True), (16, False)):
        as_written = memory.estimate(recipe, phi2_config, profiles.Speed("none", micro, 16 // micro, gc))
        profiled = memory.estimate(recipe, phi2_config, profiles.Speed("fast", micro, 16 // micro, gc, **PROFILED))
        assert profiled.reserved < as_written.reserved


def test_a_vram_budget_picks_what_fits(phi2_config):
    speed = profiles.resolve(xsum("training.vram_budget_gb=6"), phi2_config, card_gb=80, detect=False)
    assert speed.profile == "fast" and speed.budget_gb == 6
    assert speed.predicted_gb <= 6
    assert speed.micro_batch_size * speed.gradient_accumulation_steps == 16


def test_a_vram_budget_nothing_fits_is_a_recipe_error(phi2_config):
    with pytest.raises(RecipeError) as err:
        profiles.resolve(xsum("training.vram_budget_gb=1.0"), phi2_config, card_gb=80, detect=False)
    assert err.value.key_path == "training.vram_budget_gb"
    assert "nothing fits 1 GiB" in err.value.problem


@pytest.mark.slow
def test_train_refuses_a_budget_before_loading_weights_or_writing_anything(tiny, cli, tmp_path):
    result = cli("train", TINY, "training.vram_budget_gb=0.000001", f"output_dir={tmp_path / 'runs'}")
    assert result.returncode == 2, result.stderr[-3000:]
    # (bitsandbytes may log a line about optional CPU kernels when peft imports it; the error is the one line after)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: training.vram_budget_gb: nothing fits"), result.stderr
    assert result.stderr.strip().endswith(errors[0]) and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()
    assert "Loading weights" not in result.stdout + result.stderr


@pytest.mark.slow
def test_training_arguments_are_the_resolved_speeds_not_the_recipes(tmp_path):
    """train.py builds SFTConfig from the one resolved Speed (what env.json, recipe.yaml's note and report.md show),
    not from a second, rewritten recipe."""
    from runner.train import train

    recipe = recipes.load(TINY)  # as written: 16 x 1, no checkpointing
    speed = profiles.Speed("low_memory", 4, 4, True)
    args = train._setup_training(recipe, tmp_path, has_eval=False, speed=speed)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 4)
    assert any(getattr(args, f"{prefix}_checkpointing", False) for prefix in ("activation", "gradient"))
    assert recipe["training"]["micro_batch_size"] == 16  # the recipe itself is left as written


# ---------------------------------------------------------------- a hub id out of reach


NEVER_CACHED = "qlora-recipes-tests/never-cached"


@pytest.fixture
def hub_requests(monkeypatch):
    """Every request huggingface_hub makes, each failing to connect (no network); and its retry sleeps."""
    import threading

    import httpx2
    from huggingface_hub.utils import _http

    made, slept = [], []
    this, real_sleep = threading.get_ident(), _http.time.sleep

    def sleep(seconds):  # time.sleep itself: the session's background threads sleep on as before
        if threading.get_ident() == this:
            slept.append(seconds)
        else:
            real_sleep(seconds)

    class NoNetwork:
        def request(self, method, url, **kwargs):
            made.append((method, url))
            raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(_http, "get_session", NoNetwork)
    monkeypatch.setattr(_http.time, "sleep", sleep)
    return made, slept


def test_a_hub_id_offline_fails_at_once_without_a_request(hub_requests, monkeypatch):
    from huggingface_hub import constants

    from runner.common.errors import EnvironmentProblem
    from runner.model import model

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EnvironmentProblem) as err:
        model.load_config(xsum(f"model.name_or_path={NEVER_CACHED}"))
    assert err.value.key_path == "model.name_or_path" and "(offline: HF_HUB_OFFLINE is set)" in err.value.problem
    assert hub_requests == ([], [])


def test_a_hub_id_without_network_is_asked_once_without_retries(hub_requests, monkeypatch):
    """huggingface_hub retries a file that is not cached with backoff (23 s of sleeping); the runner asks once."""
    from huggingface_hub import constants

    from runner.common.errors import EnvironmentProblem
    from runner.model import model

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(EnvironmentProblem) as err:
        model.load_config(xsum(f"model.name_or_path={NEVER_CACHED}"))
    assert err.value.line().startswith(f"error: model.name_or_path: cannot reach the Hugging Face hub for "
                                       f"'{NEVER_CACHED}' (no network? HF_HUB_OFFLINE is not set)")
    made, slept = hub_requests
    assert len(made) == 1 and made[0][0] == "HEAD" and NEVER_CACHED in made[0][1] and slept == []


def test_plan_on_a_hub_id_offline_is_one_line_exit_1(cli):
    result = cli("plan", XSUM, f"model.name_or_path={NEVER_CACHED}")  # the tests run with HF_HUB_OFFLINE=1
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip() == (
        f"error: model.name_or_path: cannot reach the Hugging Face hub for '{NEVER_CACHED}' (offline: HF_HUB_OFFLINE "
        "is set), and it is not in the local cache (connect to the network and unset HF_HUB_OFFLINE, or use a local "
        "directory)")


def test_a_local_folder_written_without_dot_slash_is_loaded_as_local(hub_requests, monkeypatch, tiny):
    """``.cache/tiny/phi`` names a folder that exists: from_pretrained reads it, so the hub is never asked (it was
    taken for a hub id and failed as an invalid one)."""
    from runner.model import model

    monkeypatch.chdir(tiny.parent.parent)
    config = model.load_config(xsum(f"model.name_or_path={tiny.relative_to(tiny.parent.parent) / 'phi'}"))
    assert config.model_type == "phi" and hub_requests == ([], [])


def test_a_name_that_is_neither_a_folder_nor_a_hub_id_is_the_users_mistake(hub_requests):
    from runner.model import model

    with pytest.raises(RecipeError) as err:
        model.load_config(xsum("model.name_or_path=no/such/folder"))
    assert err.value.exit_code == 2 and err.value.line() == (
        "error: model.name_or_path: 'no/such/folder' is neither a local folder nor a hub id (use a local directory, "
        "or a hub id such as microsoft/phi-2)")
    assert hub_requests == ([], [])
