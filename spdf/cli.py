"""The `spdf` command: run, pretrain, finetune, inspect, flops.

User errors (a bad recipe key, a missing file, an unknown model name, a damaged checkpoint) print one line and
exit with status 2; nothing already on disk is touched by a failed start.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_USER_ERROR = 2


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", type=Path, help="YAML recipe (see recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set phases.pretrain.steps=100 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spdf", description="Sparse Pre-training and Dense Fine-tuning of GPT models.",
        epilog="A run resumes automatically from its run directory's last checkpoint. "
               "Multi-GPU: accelerate launch --config_file recipes/accelerate/ddp-8gpu.yaml -m spdf run RECIPE")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run every phase of a recipe: sparse pre-training, densify, dense fine-tuning",
                       description="Run every phase of a recipe in order, resuming an existing run directory.")
    _add_recipe_args(p)
    p = sub.add_parser("pretrain", help="run only the recipe's pre-training phases",
                       description="Run only the pre-training phases of a recipe (resumable).")
    _add_recipe_args(p)
    p = sub.add_parser("finetune", help="run the recipe's fine-tuning phases, from --from CHECKPOINT",
                       description="Run the fine-tuning phases of a recipe, starting from a checkpoint (an export, "
                                   "a phase or a run directory) or from the recipe's own finished pre-training.")
    _add_recipe_args(p)
    p.add_argument("--from", dest="init_from", type=Path, default=None, metavar="CHECKPOINT",
                   help="export, phase or run directory whose weights (and masks) to fine-tune")

    p = sub.add_parser("inspect", help="per-layer sparsity of a checkpoint, export or run directory")
    p.add_argument("path", type=Path)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("flops", help="analytic training FLOPs, dense vs sparse, per component",
                       description="Training FLOPs per token (and in total) of a named model at a sparsity, or of a "
                                   "checkpoint with its masks.")
    p.add_argument("model", help="model name (e.g. gpt3-xl; see --list), a checkpoint/export/run directory, or a "
                                 "recipe (.yaml: its model, sparsity method and pre-training steps)")
    p.add_argument("--sparsity", type=float, default=0.0, help="sparsity of attention and MLP weights (named models)")
    p.add_argument("--tokens", type=float, default=None, help="training tokens, for totals (e.g. 26e9)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (default: the model's context)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--list", action="store_true", help="list the named model configs and exit")
    return parser


def _cmd_train(args, kinds) -> int:
    from .recipe import load_recipe
    from .train import run_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    summary = run_recipe(recipe, kinds=kinds, init_from=getattr(args, "init_from", None))
    if summary["main_process"]:
        print(_format_summary(summary))
    return 0


def _format_summary(summary: dict) -> str:
    lines = ["", "spdf run finished"]
    for p in summary["phases"]:
        before, after = p.get("val_loss_before"), p.get("val_loss_after")
        loss = f"val loss {before:.3f} -> {after:.3f}" if before is not None and after is not None else ""
        saving = p["flops_dense_equivalent"] / p["flops_spent"] if p["flops_spent"] else float("nan")
        lines.append(f"  {p['phase']:12s} {p['kind']:8s} {'sparse' if p['sparse'] else 'dense':6s} {p['steps']:6d} "
                     f"steps {p['tokens']:>12,d} tokens  {loss}  FLOPs {p['flops_spent']:.3e} spent vs "
                     f"{p['flops_dense_equivalent']:.3e} dense ({saving:.2f}x fewer)")
    lines += [f"  run directory: {summary['run_dir']}", f"  metrics:       {summary['metrics']}",
              f"  checkpoints:   {summary['run_dir']}/phases/<phase>/checkpoints",
              f"  exports:       {summary['run_dir']}/phases/<phase>/export"]
    return "\n".join(lines)


def _cmd_inspect(args) -> int:
    from .inspect import checkpoint_stats, format_stats

    stats = checkpoint_stats(args.path)
    print(json.dumps(stats, indent=2, default=str) if args.json else format_stats(stats))
    return 0


def _cmd_flops(args) -> int:
    from .flops import analytic_flops, format_table, model_flops
    from .model.config import CONFIGS, GPTConfig

    if args.list:
        for name, cfg in CONFIGS.items():
            print(f"{name:20s} {cfg.n_layer:3d} layers  d_model {cfg.d_model:5d}  heads {cfg.n_head:3d}  "
                  f"d_ff {cfg.d_ff:6d}  ctx {cfg.n_ctx}")
        return 0
    path = Path(args.model)
    if path.suffix in (".yaml", ".yml"):
        return _recipe_flops(args, path)
    if path.exists():
        from .train.checkpoint import load_export
        from .train.runner import _export_dir
        from .sparsity import sparsify

        model, masks, _ = load_export(_export_dir(path))
        if masks:
            sparsify(model, init=masks, param_filter=[f"{name}.weight" for name in masks])
        fb, label, name = model_flops(model, args.seq_len), "densities from the masks", str(path)
    else:
        fb = analytic_flops(GPTConfig.from_name(args.model), args.sparsity, args.seq_len)
        label, name = f"{args.sparsity:.0%} sparse attention and MLP weights", args.model
    if args.json:
        print(json.dumps({"model": name, **fb.to_dict(), "tokens": args.tokens}, indent=2))
    else:
        print(format_table(name, fb, label, args.tokens))
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
    level = 0.0 if sp.method == "none" else sp.level
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
    from .data import DataError
    from .recipe import RecipeError
    from .train.checkpoint import CheckpointError

    try:
        if args.command in ("run", "pretrain", "finetune"):
            kinds = {"run": ("pretrain", "finetune"), "pretrain": ("pretrain",), "finetune": ("finetune",)}
            return _cmd_train(args, kinds[args.command])
        if args.command == "inspect":
            return _cmd_inspect(args)
        return _cmd_flops(args)
    except (RecipeError, DataError, CheckpointError, ValueError, FileNotFoundError, IsADirectoryError,
            PermissionError) as e:
        print(f"spdf: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # `spdf inspect … | head`
        return 0
    except KeyboardInterrupt:
        print("spdf: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
