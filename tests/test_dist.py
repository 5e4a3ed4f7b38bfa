"""Several processes without launching any: how a step splits across ranks, which strategy auto picks, what the
plan predicts per GPU, and how evaluation batches are shared (runner.common.dist, runner.speed.profiles, runner.speed.memory)."""

from __future__ import annotations

import pytest

from runner.common import dist
from runner.common.errors import RecipeError
from runner.speed import memory, profiles
from tests.test_plan import phi2_config, phi2_dir, xsum  # noqa: F401  (fixtures)


def test_world_comes_from_the_launchers_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert dist.world() == dist.World() and dist.world().main
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    w = dist.world()
    assert (w.rank, w.size, w.local_rank, w.local_size, w.nodes, w.main) == (3, 4, 1, 2, 2, False)
    assert dist.broadcast("x") == "x" and dist.gather(1) == [1]  # no process group: a world of one answers


def test_each_rank_gets_whole_batches_and_every_batch_goes_to_one_rank():
    batches = [[i] for i in range(7)]
    shares = [list(dist.share(batches, dist.World(rank=r, size=3))) for r in range(3)]
    assert shares == [[[0], [3], [6]], [[1], [4]], [[2], [5]]]
    assert sorted(b for share in shares for b in share) == batches


@pytest.mark.parametrize("n, batch, size", [(1000, 424, 2), (20, 16, 2), (7, 16, 2), (11334, 424, 4), (5, 2, 3)])
def test_evaluation_batches_give_every_rank_the_same_number(n, batch, size):
    from runner.evaluate.generate import length_sorted_batches

    w = dist.World(rank=0, size=size)
    got = dist.balanced(batch, n, w)
    assert 1 <= got <= batch
    batches = list(length_sorted_batches([1] * n, got))
    per_rank = [len(list(dist.share(batches, dist.World(rank=r, size=size)))) for r in range(size)]
    assert max(per_rank) == -(-n // (size * batch))  # no rank does more batches than the largest size needs
    assert max(per_rank) - min(per_rank) <= 1 and sum(len(b) for b in batches) == n
    if n >= size * got:
        assert max(per_rank) == min(per_rank)
    assert dist.balanced(batch, n, dist.World()) == batch  # one process: the batch as chosen


def test_the_step_splits_evenly_or_fails_naming_the_key():
    assert dist.split_step(16, 4) == 4
    with pytest.raises(RecipeError) as err:
        dist.split_step(12, 5)
    assert err.value.key_path == "training.gradient_accumulation_steps"
    assert "12 examples per optimizer step cannot be split evenly across 5 processes" in err.value.line()


def test_as_written_keeps_examples_per_step_across_ranks():
    recipe = xsum("training.micro_batch_size=4", "training.gradient_accumulation_steps=4")
    for n, (micro, acc) in {1: (4, 4), 2: (4, 2), 4: (4, 1), 8: (2, 1), 16: (1, 1)}.items():
        speed = profiles.as_written(recipe, world_size=n)
        assert (speed.micro_batch_size, speed.gradient_accumulation_steps) == (micro, acc)
        assert speed.micro_batch_size * speed.gradient_accumulation_steps * n == 16


def test_profiles_choose_the_micro_batch_of_each_rank(phi2_config):  # noqa: F811
    speed = profiles.resolve(xsum("training.profile=fast"), phi2_config, card_gb=80, detect=False, world_size=2)
    assert (speed.micro_batch_size, speed.gradient_accumulation_steps, speed.world_size) == (8, 1, 2)
    assert speed.distributed == "ddp"  # the 4-bit Phi-2 fits one card many times over
    assert "per process x 2 processes (ddp)" in speed.describe()


def test_auto_shards_with_fsdp_when_one_card_cannot_hold_the_model(phi2_config):  # noqa: F811
    recipe = xsum("training.profile=low_memory", "training.vram_budget_gb=1.8")
    with pytest.raises(RecipeError):  # one GPU: nothing fits
        profiles.resolve(recipe, phi2_config, card_gb=80, detect=False, world_size=1)
    speed = profiles.resolve(recipe, phi2_config, card_gb=80, detect=False, world_size=4)
    assert speed.distributed == "fsdp" and speed.predicted_gb <= 1.8
    ddp = profiles.as_written(recipe, world_size=4, strategy="ddp")
    fsdp = profiles.as_written(recipe, world_size=4, strategy="fsdp")
    assert memory.estimate(recipe, phi2_config, fsdp).reserved_gb < memory.estimate(recipe, phi2_config, ddp).reserved_gb


def test_fsdp_estimate_shards_the_static_memory(phi2_config):  # noqa: F811
    recipe = xsum("training.profile=none")
    one = memory.estimate(recipe, phi2_config, profiles.as_written(recipe))
    four = memory.estimate(recipe, phi2_config, profiles.as_written(recipe, world_size=4, strategy="fsdp"))
    weights = next(v for k, v in one.parts.items() if k.startswith("4-bit weights"))
    assert four.parts["4-bit weights / 4 (FSDP shard)"] == pytest.approx(weights / 4)
    assert "FSDP gathered layers (current + prefetched)" in four.parts


@pytest.mark.slow
def test_plan_cli_shows_ddp_and_fsdp_per_gpu(phi2_dir, cli):  # noqa: F811
    from tests.conftest import ROOT

    result = cli("plan", ROOT / "recipes" / "xsum_phi2.yaml", f"model.name_or_path={phi2_dir}", "--gpu-gb", "80",
                 "--gpus", "4", "training.vram_budget_gb=1.8", "training.profile=low_memory")
    assert result.returncode == 0, result.stderr
    assert "per GPU (predicted)" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines()
            if line.startswith("low_memory") and line.split()[1] in ("ddp", "fsdp")]
    assert [r[1] for r in rows] == ["ddp", "fsdp"]
    assert "nothing fits" in " ".join(rows[0]) and rows[1][-1] == "GiB"
    assert "training.distributed auto -> fsdp on 4 GPUs" in result.stdout
    bad = cli("plan", ROOT / "recipes" / "xsum_phi2.yaml", f"model.name_or_path={phi2_dir}", "--gpus", "3")
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: training.gradient_accumulation_steps: ")


def test_a_model_sharded_by_fsdp_is_recognised():
    import torch

    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert not dist.sharded(plain)
    fsdp_unit = type("FullyShardedDataParallel", (torch.nn.Module,), {})()  # FSDP1's wrapper class, by name
    fsdp2_unit = type("FSDPLinear", (torch.nn.Linear,), {})(2, 2)  # FSDP2 makes FSDP<Class> subclasses
    assert dist.sharded(torch.nn.Sequential(fsdp_unit)) and dist.sharded(torch.nn.Sequential(fsdp2_unit))


def test_one_process_trains_on_one_gpu_even_when_several_are_visible(tmp_path, monkeypatch, capsys):
    """Without a launcher, transformers would wrap the model in nn.DataParallel over every visible GPU, which TRL
    refuses with an internal error (seen on a 2x H200 machine): the runner keeps one process on one GPU and says how
    to use the others. Under a launcher each process already has its own GPU."""
    from trl import SFTConfig

    from runner.train import train as train_mod

    def config(gpus: int):
        args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
        assert args.device is not None  # devices are set up, as TRL's check and the Trainer will see them
        args._n_gpu = gpus  # what transformers finds on a machine with that many GPUs
        return args

    args = train_mod._one_gpu_per_process(config(2))
    assert args.n_gpu == 1
    assert "2 GPUs visible to one process" in capsys.readouterr().out
    assert train_mod._one_gpu_per_process(config(1)).n_gpu == 1
    launched = config(2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train_mod._one_gpu_per_process(launched).n_gpu == 2  # a launcher's process: not ours to change


@pytest.mark.slow
def test_a_rank_that_succeeded_ends_after_its_exit_handlers_and_without_the_teardown(tmp_path):
    """dist.end: a process in a process group that succeeded exits right after its Python exit handlers (a tracker
    finishing its run, here a file written), skipping the interpreter's teardown that aborted finished gloo ranks; a
    failed one, or a process in no group, gets its code back for SystemExit."""
    import subprocess
    import sys

    from tests.conftest import ROOT, cli_env

    script = f"""
import atexit, pathlib, torch.distributed as td
from runner.common import dist
assert dist.end(0) == 0  # no group yet: returned
td.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
assert dist.end(2) == 2  # failed: the usual exit
atexit.register(lambda: pathlib.Path("{tmp_path / 'handler_ran'}").write_text("yes"))
print("before", flush=True)
dist.end(0)
print("never printed")
raise SystemExit(7)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "before" and (tmp_path / "handler_ran").read_text() == "yes"
