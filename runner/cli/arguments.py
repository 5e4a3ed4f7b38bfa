"""The command line's options, one function per command (``COMMANDS`` in runner.cli.cli names them), and the
parser whose mistakes are one-line errors like every other."""

from __future__ import annotations

import argparse

from runner.common.errors import RecipeError


def validate(p):
    p.add_argument("--print", action="store_true", dest="show",
                   help="print the resolved recipe as YAML (the ok line goes to stderr, so > r.yaml saves a recipe)")


def train(p):
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    p.add_argument("--no-cache", action="store_true", help="prepare the data again, without .cache/prepared "
                   "(the same as data.cache=false)")


def inspect(p):
    p.add_argument("--out", metavar="DIR", help="where inspect.json and the histograms go "
                   "(default: <output_dir>/<name>/inspect)")
    p.add_argument("--no-cache", action="store_true", help="tokenize again instead of using .cache/inspect")


def eval(p):
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="a finished run folder, e.g. runs/xsum_tiny/20261128-010203")
    which.add_argument("--base", action="store_true", help="evaluate the base model without an adapter")
    p.add_argument("--no-cache", action="store_true", help="prepare the data again, without .cache/prepared "
                   "(the same as data.cache=false)")


def compare(p):
    p.add_argument("--run", required=True, action="append",
                   help="a finished run folder, e.g. runs/xsum_tiny/20261128-010203: its adapter vs the base model; "
                        "given twice (--run A --run B): adapter A vs adapter B, the difference B - A")


def generate(p):
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="a finished run folder whose adapter generates")
    which.add_argument("--base", action="store_true", help="generate with the base model, no adapter")
    p.add_argument("--input", default="-", metavar="FILE|-",
                   help="JSONL records with the template's fields (a line starting with { is a record), or raw text "
                        "lines for its main field (prompt.truncate or its only field); one input per line; "
                        "- = standard input (default)")
    p.add_argument("--jsonl", action="store_true", help="print each input record with its completion as JSON")


def export(p):
    p.add_argument("--run", required=True, help="a finished run folder whose adapter is merged")
    p.add_argument("--out", required=True, metavar="DIR", help="the new model folder (must not exist)")
    p.add_argument("--format", default="hf", choices=("hf", "gguf"), help="hf: a transformers folder (default); "
                   "gguf: a GGUF file + Ollama Modelfile (phi, llama; pip install 'qlora-recipes[gguf]')")
    p.add_argument("--quant", default=None, metavar="TYPE", help="the GGUF's weights: f32, f16 (default), bf16, "
                   "q8_0, q5_0, q4_0; q4_k_m, q4_k_s, q5_k_m, q6_k, q3_k_m, q2_k need llama.cpp's llama-quantize")
    p.add_argument("--llama-cpp", default=None, metavar="DIR", help="a llama.cpp build with llama-quantize "
                   "(default: $LLAMA_CPP_DIR, else PATH)")


def push(p):
    p.add_argument("--run", required=True, help="a finished run folder whose adapter is pushed")
    p.add_argument("--repo", required=True, metavar="NAME", help="a new hub repo: owner/name, or name (yours)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--merged", action="store_true", help="push the merged model (runner export), not the adapter")
    what.add_argument("--gguf", action="store_true", help="push the GGUF and its Modelfile (export --format gguf)")
    p.add_argument("--quant", default=None, metavar="TYPE", help="with --gguf: the GGUF's weight type (default f16)")
    p.add_argument("--dry-run", action="store_true", help="print the upload plan and the model card; ask no hub")


def plan(p):
    p.add_argument("--gpu-gb", type=float, default=None, metavar="GiB",
                   help="plan for a card of this much memory (default: --card's, else this machine's GPU, if any)")
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="plan for N processes, one per GPU (torchrun --nproc-per-node x --nnodes): per-GPU memory "
                        "with ddp and with fsdp, and the strategy auto picks (default 1)")
    p.add_argument("--card", default=None, metavar="NAME",
                   help="predict training time for this card from bench/RESULTS.md (H100, H200; default: this "
                        "machine's GPU; without one, no training time is predicted)")


def sweep(p):
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="train every setting with N seeds (the recipe's seed, +1, ...) on the same examples")
    p.add_argument("--name", default=None, help="the sweep's folder name under <output_dir>/<name>/sweeps/ "
                   "(default: made from the axes, so the same command resumes the same sweep)")
    p.add_argument("--metric", default=None, help="the metric settings are compared on, e.g. rouge.rougeL "
                   "(default: the headline metric of the recipe's first evaluator that declares one)")
    p.add_argument("--card", default=None, metavar="NAME", help="predict memory and training time for this card "
                   "(H100, H200; default: this machine's GPU; without one, no training time is predicted)")
    p.add_argument("--gpu-gb", type=float, default=None, metavar="GiB", help="plan memory for a card this large")
    p.add_argument("--dry-run", action="store_true", help="check every cell and print the plan; train nothing")
    p.add_argument("--no-cache", action="store_true", help="prepare the data again, without .cache/prepared "
                   "(the same as data.cache=false)")


class Parser(argparse.ArgumentParser):
    """argparse, with its mistakes in the one-line form every other error has."""

    def error(self, message):
        raise RecipeError("command line", message, f"see {self.prog} --help")
