"""The `spdf` command: run, pretrain, finetune, prepare, evaluate, export, inspect, flops; each subcommand names its
handler (`set_defaults(func=...)`).

User errors (a bad recipe key, a missing file, an unknown model name, a damaged checkpoint, a full disk, a run
directory in use: an spdf.errors.SpdfUserError, or an OSError on a path the user gave) print one line and exit with
status 2; nothing already on disk is touched by a failed start. Any other exception is a bug and shows its traceback.
Training that diverges (non-finite loss or gradients too many steps in a row) exits 3; a run stopped by SIGINT or
SIGTERM writes a checkpoint and exits 130 or 143 (README, "Failures and recovery").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import SpdfUserError

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in spdf's form: one `spdf: error:` line and exit 2 (no usage block before it)."""

    def error(self, message: str):
        print(f"spdf: error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", type=Path, help="YAML recipe (see recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set phases.pretrain.steps=100 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    from .data.task_registry import task_names

    parser = _Parser(
        prog="spdf", description="Sparse Pre-training and Dense Fine-tuning of GPT models.",
        epilog="A run resumes automatically from its run directory's last checkpoint. "
               "Multi-GPU: accelerate launch --config_file recipes/accelerate/ddp-8gpu.yaml -m spdf run RECIPE")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run every phase of a recipe: sparse pre-training, densify, dense fine-tuning",
                       description="Run every phase of a recipe in order, resuming an existing run directory.")
    _add_recipe_args(p)
    p.set_defaults(func=_cmd_train, kinds=("pretrain", "finetune"))
    p = sub.add_parser("pretrain", help="run only the recipe's pre-training phases",
                       description="Run only the pre-training phases of a recipe (resumable), from a fresh model or, "
                                   "with --from, from a dense model's weights (continued pre-training).")
    _add_recipe_args(p)
    p.set_defaults(func=_cmd_train, kinds=("pretrain",))
    p.add_argument("--from", dest="init_from", type=Path, default=None, metavar="CHECKPOINT",
                   help="dense export, phase, run or Hugging Face directory whose weights pre-training continues "
                        "from (the recipe's sparsity is applied to them; its tokenizer is used)")
    p = sub.add_parser("finetune", help="run the recipe's fine-tuning phases, from --from CHECKPOINT",
                       description="Run the fine-tuning phases of a recipe, starting from a checkpoint (an export, "
                                   "a phase or a run directory) or from the recipe's own finished pre-training.")
    _add_recipe_args(p)
    p.set_defaults(func=_cmd_train, kinds=("finetune",))
    p.add_argument("--from", dest="init_from", type=Path, default=None, metavar="CHECKPOINT",
                   help="export, phase or run directory whose weights (and masks) to fine-tune")

    p = sub.add_parser("prepare", help="train the tokenizer and tokenize every pre-training corpus into the cache",
                       description="Do a run's data work ahead of it, in parallel (data.workers processes, default "
                                   "one per core): the tokenizer into the run directory and each pre-training "
                                   "phase's packed tokens into the data cache (SPDF_CACHE_DIR). Interrupted, it "
                                   "resumes from its last committed chunk; a later `spdf run` reuses the cache.")
    _add_recipe_args(p)
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("evaluate", help="generate on a downstream task and score it (BLEU, ROUGE, ...), offline",
                       description="Generate for every input of a task split with an export (or a phase's or run's "
                                   "last export), score against every reference of each input with the task's "
                                   "metrics, and write eval/<task>-<split>.json and .md next to it (or in --out).")
    p.set_defaults(func=_cmd_evaluate)
    p.add_argument("path", type=Path, help="export, phase or run directory")
    *others, last = task_names()  # the registered tasks (spdf.data.task_registry)
    p.add_argument("--task", required=True, metavar="TASK", help=f"{', '.join(others)} or {last}")
    p.add_argument("--split", default=None, help="default: test where the task has one, else validation")
    p.add_argument("--task-path", default=None, metavar="FILE",
                   help="a local copy of the task ({split} stands for the split name); the data-to-text tasks' "
                        "files in the Hugging Face schema, as .jsonl or .json")
    p.add_argument("--task-set", dest="task_sets", action="append", default=[], metavar="KEY=VALUE",
                   help="any other task setting, as in a recipe's task block (e.g. prompt_field=question)")
    p.add_argument("--decoding", default=None,
                   help="paper (beam 10, length penalty 0.8, no-repeat 4-grams, 64 new tokens), greedy or sample; "
                        "default: the settings the run recorded for this task (its phase's eval.generate, prompts "
                        "truncated as in training), else paper")
    p.add_argument("--num-beams", type=int, default=None, help="override the preset's beam width")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override the preset's new-token cap")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N inputs of the split")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="prompts decoded together")
    p.add_argument("--truncate-prompts", action="store_true",
                   help="cut the middle of prompts that leave no room for the new tokens, instead of refusing them")
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="report folder (default: PATH/eval)")

    p = sub.add_parser("export", help="write a run's model in another ecosystem's format (Hugging Face)",
                       description="Write the model of an export, phase or run directory (its last finished phase) as "
                                   "a Hugging Face transformers directory of its family's architecture (gpt: "
                                   "GPT-2) (config, dense weights, tokenizer; "
                                   "masks beside them for a sparse model) that AutoModelForCausalLM and "
                                   "AutoTokenizer load offline.")
    p.set_defaults(func=_cmd_export)
    p.add_argument("path", type=Path, help="export, phase or run directory")
    p.add_argument("out", type=Path, help="directory to write: new or empty (an earlier export only with --force); "
                                          "never inside the run or export it reads")
    p.add_argument("--force", action="store_true", help="replace OUT if it holds an earlier export of this format")
    p.add_argument("--format", choices=sorted(EXPORT_FORMATS), default="hf",
                   help="hf: Hugging Face transformers (GPT-2 or Llama, by the model's family)")

    p = sub.add_parser("inspect", help="per-layer sparsity of a checkpoint, export or run directory")
    p.set_defaults(func=_cmd_inspect)
    p.add_argument("path", type=Path)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--verify", action="store_true",
                   help="check every checkpoint and export under PATH against its manifest (exit 2 if any is damaged)")

    p = sub.add_parser("flops", help="analytic training FLOPs, dense vs sparse, per component",
                       description="Training FLOPs per token (and in total) of a named model at a sparsity, or of a "
                                   "checkpoint with its masks.")
    p.set_defaults(func=_cmd_flops)
    p.add_argument("model", nargs="?", help="model name (e.g. gpt3-xl; see --list), a checkpoint/export/run "
                                            "directory, or a recipe (.yaml: its model, sparsity method and pre-training steps)")
    p.add_argument("--sparsity", type=float, default=None, help="sparsity of attention and MLP weights (named models)")
    p.add_argument("--tokens", type=float, default=None, help="training tokens, for totals (e.g. 26e9)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (default: the model's context)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--list", action="store_true", help="list the named model configs and exit")
    p.add_argument("--table", nargs="?", const=Path("benchmarks/results"), default=None, type=Path, metavar="DIR",
                   help="write flops.md/.json/.png for every named model at 0/50/75/90%% sparsity, 20 tokens per "
                        "parameter, into DIR (default: benchmarks/results)")
    return parser


def _cmd_train(args) -> int:
    from .recipe import load_recipe
    from .train import run_recipe
    from .train.nonfinite import NonFiniteTraining
    from .train.preemption import Preempted

    recipe = load_recipe(args.recipe, args.overrides)
    try:
        summary = run_recipe(recipe, kinds=args.kinds, init_from=getattr(args, "init_from", None))
    except NonFiniteTraining as e:
        print(f"spdf: error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except Preempted as e:
        print(f"spdf: {e}", file=sys.stderr)
        return e.exit_code
    if summary["main_process"]:
        print(_format_summary(summary, args.command))
    return 0


def _cmd_prepare(args) -> int:
    from .recipe import load_recipe
    from .train import prepare_recipe

    for entry in prepare_recipe(load_recipe(args.recipe, args.overrides)):
        tokens = ", ".join(f"{s} {v['tokens']:,} tokens" for s, v in entry["splits"].items())
        state = "already prepared" if entry["cache_hit"] else "prepared"
        source = f" source {entry['source']}" if entry.get("source") else ""
        print(f"phase {entry['phase']}{source}: {state} in {entry['dir']} ({tokens})")
    return 0


def _format_summary(summary: dict, command: str = "run") -> str:
    from .layout import RunLayout

    lines = ["", f"spdf {command} finished"]
    for p in summary["phases"]:
        before, after = p.get("val_loss_before"), p.get("val_loss_after")
        loss = f"val loss {before:.3f} -> {after:.3f}" if before is not None and after is not None else ""
        saving = p["flops_dense_equivalent"] / p["flops_spent"] if p["flops_spent"] else float("nan")
        lines.append(f"  {p['phase']:12s} {p['kind']:8s} {'sparse' if p['sparse'] else 'dense':6s} {p['steps']:6d} "
                     f"steps {p['tokens']:>12,d} tokens  {loss}  FLOPs {p['flops_spent']:.3e} spent vs "
                     f"{p['flops_dense_equivalent']:.3e} dense ({saving:.2f}x fewer)")
        if p.get("tokens_by_source"):  # a mixture phase
            total = max(sum(p["tokens_by_source"].values()), 1)
            lines.append(f"  {'':12s} tokens by source: " + ", ".join(
                f"{name} {n:,} ({100 * n / total:.1f}%)" for name, n in p["tokens_by_source"].items()))
    lines += _format_downstream(summary["phases"])
    every_phase = RunLayout(summary["run_dir"]).phase("<phase>")
    lines += [f"  run directory: {summary['run_dir']}", f"  metrics:       {summary['metrics']}",
              f"  checkpoints:   {every_phase.checkpoints}", f"  exports:       {every_phase.export}"]
    return "\n".join(lines)


def _cmd_evaluate(args) -> int:
    from .data import TaskSpec, task_splits
    from .eval.evaluate import (check_limit, check_report_dir, evaluate_export, format_table, recorded_generation,
                                write_report)
    from .eval.generate import DecodingConfig
    from .export import find_export
    import yaml

    from .fswrite import check_dir_target
    from .layout import EVAL_DIR
    from .typed_spec import RecipeError, build

    # Everything that can be checked without the model is checked first, and nothing is written before the end.
    check_limit(args.limit)
    # Unless --decoding says otherwise, a run is evaluated as it evaluated itself (its recorded eval.generate);
    # each flag given still overrides its own setting.
    recorded = recorded_generation(args.path, args.task) if args.decoding is None else None
    decoding_name = args.decoding or (recorded or {}).get("decoding") or "paper"
    overrides = {k: v for k, v in (("num_beams", args.num_beams), ("max_new_tokens", args.max_new_tokens))
                 if v is not None}
    if recorded:
        overrides = {**{k: recorded[k] for k in ("num_beams", "max_new_tokens") if recorded[k] is not None},
                     **overrides}
    decoding = DecodingConfig.from_name(decoding_name, **overrides)
    truncate = args.truncate_prompts or recorded is not None  # the phase's evaluation cut prompts as training does
    task_data = {"task": args.task, **({"path": str(args.task_path)} if args.task_path else {})}
    for setting in args.task_sets:
        key, sep, text = setting.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--task-set {setting!r}: expected KEY=VALUE, e.g. prompt_field=question")
        try:
            task_data[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise RecipeError(f"--task-set {setting!r}: cannot parse the value {text!r}") from None
    task = build(TaskSpec, task_data, "task")
    find_export(args.path)  # PATH first: a file given as PATH is not an export, whatever its report folder would be
    out_dir = args.out if args.out is not None else Path(args.path) / EVAL_DIR
    out_name = "--out" if args.out is not None else "the report folder"
    check_dir_target(out_dir, out_name)
    check_report_dir(out_dir, out_name)
    split = args.split or (recorded or {}).get("split") or task_splits(task.task)[-1]
    report = evaluate_export(args.path, task, split, decoding, decoding_name, limit=args.limit,
                             batch_size=args.batch_size, truncate_prompts=truncate, progress=True)
    json_path, md_path = write_report(report, out_dir)
    print(format_table(report))
    if recorded:
        print(f"  settings: the run's own ({recorded['where']}): {decoding_name} decoding, "
              f"{decoding.max_new_tokens} new tokens, split {split}, long prompts cut as in training; --decoding, "
              f"--max-new-tokens, --split override")
    print(f"  report: {json_path} and {md_path.name}")
    return 0


def _format_downstream(phases: list[dict]) -> list[str]:
    """Per fine-tuning phase with an eval.generate block: its task metrics before and after fine-tuning."""
    from .eval.evaluate import METRIC_LABELS
    from .eval.metrics import TASK_METRICS

    lines = []
    for p in phases:
        rows = [(label, p.get(key)) for label, key in (("before fine-tuning", "downstream_before"),
                                                       ("after fine-tuning", "downstream_after")) if p.get(key)]
        if not rows:
            continue
        first = rows[-1][1]
        names = [n for n in TASK_METRICS.get(first["task"], ()) if n in first["metrics"]]  # done.json sorts keys
        lines.append(f"  downstream ({p['phase']}): {first['split']} split, {first['examples']} inputs, "
                     f"{first['decoding']} decoding")
        lines.append(f"    {'':20s}" + "".join(f"{METRIC_LABELS.get(n, n):>9s}" for n in names))
        for label, result in rows:
            values = [result["metrics"].get(n) for n in names]
            lines.append(f"    {label:20s}" + "".join(f"{v:9.2f}" if isinstance(v, (int, float)) else f"{str(v):>9s}"
                                                      for v in values))
    return lines


def _export_hf(source: Path, out: Path, force: bool) -> Path:
    from .integrations.hf_gpt2 import export_hf  # imported when used: transformers is an optional extra

    return export_hf(source, out, force=force)


EXPORT_FORMATS = {"hf": _export_hf}  # `spdf export --format NAME`: the writer of each format


def _cmd_export(args) -> int:
    out = Path(os.path.abspath(args.out))  # "." or "..": a named directory
    print(EXPORT_FORMATS[args.format](args.path, out, args.force))
    return 0


def _cmd_inspect(args) -> int:
    from .errors import CheckpointError
    from .inspect import checkpoint_stats, format_stats, verify_saved

    if args.verify:
        results = verify_saved(args.path)
        if args.json:
            print(json.dumps([{"status": status, "path": str(path), "detail": detail}
                              for status, path, detail in results], indent=2))
        else:
            for status, path, detail in results:
                print(f"{status:10s} {path}: {detail}")
        damaged = [str(path) for status, path, _ in results if status == "DAMAGED"]
        if damaged:
            raise CheckpointError(f"{len(damaged)} of {len(results)} damaged: {', '.join(damaged)}")
        return 0
    stats = checkpoint_stats(args.path)
    print(json.dumps(stats, indent=2, default=str) if args.json else format_stats(stats))
    return 0


def _cmd_flops(args) -> int:
    from .flops import analytic_flops, format_table, model_flops
    from .model.families import config_by_name, named_shapes

    _check_flops_flags(args, {name for _, name, _ in named_shapes()})
    if args.table is not None:
        return _flops_table(args.table)
    if args.list:
        for family, name, cfg in named_shapes():
            print(f"{name:22s} {cfg.n_layer:3d} layers  d_model {cfg.d_model:5d}  heads {cfg.n_head:3d}  "
                  f"d_ff {cfg.d_ff:6d}  ctx {cfg.n_ctx:5d}  family {family.name}")
        return 0
    path = Path(args.model)
    if path.suffix in (".yaml", ".yml"):
        return _recipe_flops(args, path)
    if path.exists():
        from .export import find_export, sparse_model

        model, _ = sparse_model(find_export(path))
        fb, label, name = model_flops(model, args.seq_len), "densities from the masks", str(path)
    else:
        sparsity = args.sparsity or 0.0
        fb = analytic_flops(config_by_name(args.model), sparsity, args.seq_len)
        label, name = f"{sparsity:.0%} sparse attention and MLP weights", args.model
    if args.json:
        print(json.dumps({"model": name, **fb.to_dict(), "tokens": args.tokens}, indent=2))
    else:
        print(format_table(name, fb, label, args.tokens))
    return 0


def _check_flops_flags(args, configs) -> None:
    import math

    if args.table is not None:
        given = [flag for flag, value in (("MODEL", args.model), ("--sparsity", args.sparsity),
                                          ("--tokens", args.tokens), ("--seq-len", args.seq_len),
                                          ("--json", args.json), ("--list", args.list))
                 if value is not None and value is not False]
        if given:
            raise SpdfUserError(f"--table covers every named model at fixed levels and budget; it takes no "
                                f"{', '.join(given)} (and its optional argument is the output directory)")
        if str(args.table) in configs:
            raise SpdfUserError(f"--table {args.table}: that is a model name; --table takes an output directory "
                                f"and covers every named model")
    elif args.model is None and not args.list:
        raise SpdfUserError("flops: name a MODEL (or a checkpoint, or a recipe), or give --list or --table")
    elif args.model is not None and args.sparsity is not None and (
            Path(args.model).suffix in (".yaml", ".yml") or Path(args.model).exists()):
        # a recipe or a checkpoint brings its own sparsity: an ignored --sparsity would print another level's FLOPs
        raise SpdfUserError(f"--sparsity applies to a named model; {args.model} brings its own (a recipe its "
                            f"sparsity.level, a checkpoint or export its masks): drop --sparsity")
    if args.seq_len is not None and args.seq_len < 1:
        raise SpdfUserError(f"--seq-len must be a positive number of tokens, got {args.seq_len}")
    if args.tokens is not None and not (math.isfinite(args.tokens) and args.tokens > 0):
        raise SpdfUserError(f"--tokens must be a positive finite number of tokens, got {args.tokens}")
    if args.sparsity is not None and not (math.isfinite(args.sparsity) and 0.0 <= args.sparsity < 1.0):
        raise SpdfUserError(f"--sparsity must be in [0, 1), got {args.sparsity}")


def _flops_table(out_dir: Path) -> int:
    from .flops_table import write_tables

    result = write_tables(out_dir)
    print(f"pre-training FLOP reduction (dense / sparse), 20 tokens per parameter:\n{result['summary']}")
    print("wrote " + ", ".join(str(p) for p in result["written"]))
    if result["plot_missing"]:
        print(f"spdf: flops.png not drawn: {result['plot_missing']}; the table and JSON were written",
              file=sys.stderr)
    return 0


def _recipe_flops(args, path: Path) -> int:
    """FLOPs of a recipe's pre-training: the table at its final sparsity, and the mean over its steps of what a
    dynamic method spends (GMP's rising sparsity, RigL's dense-gradient steps)."""
    from .flops import analytic_flops, format_table, schedule_flops
    from .recipe import RecipeError, load_recipe, model_config
    from .train.sparsity_plan import algorithm, pretrain_steps

    recipe = load_recipe(path)
    steps = pretrain_steps(recipe)
    if steps is None:
        raise RecipeError(f"{path}: no pre-training phase with a fixed number of steps or tokens")
    phase = next(p for p in recipe.phases if p.kind == "pretrain")
    seq_len = args.seq_len or phase.seq_len
    sp = recipe.sparsity
    level = 0.0 if sp.method == "none" else sp.mask_level  # n:m fixes its own level
    cfg = model_config(recipe)
    fb = analytic_flops(cfg, level, seq_len)
    over = schedule_flops(cfg, level, algorithm(recipe), steps, seq_len)
    tokens = args.tokens or steps * phase.batch_size * seq_len
    if args.json:
        print(json.dumps({"model": recipe.model.name, **fb.to_dict(), "tokens": tokens, "schedule": over}, indent=2))
        return 0
    print(format_table(f"{recipe.name} ({recipe.model.name})", fb, f"sparsity.level {level:.0%} on attention and "
                       f"MLP weights, method {sp.method}", tokens))
    print(f"over {steps} steps of method {sp.method}: mean {over['mean_spent_train_per_token']:.4e} training FLOPs "
          f"per token vs {over['dense_train_per_token']:.4e} dense ({over['reduction']:.2f}x fewer); "
          f"total {over['mean_spent_train_per_token'] * tokens:.4e} for {tokens:.3g} tokens")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `spdf inspect … | head`
        return 0
    except (SpdfUserError, OSError, ImportError) as e:
        # SpdfUserError: spdf's own user errors (RecipeError, DataError, CheckpointError, WriteError, ...);
        # ImportError: an optional extra (e.g. spdf[eval]) is missing; OSError: a path the user gave cannot be
        # read or written (the messages of spdf's own writes say which and why). Anything else is a bug: traceback.
        print(f"spdf: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("spdf: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
