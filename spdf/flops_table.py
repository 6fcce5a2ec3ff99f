"""FLOP tables for every named model (`spdf flops --table`): pre-training FLOPs on a compute-optimal budget of 20
tokens per parameter, dense vs sparse, at 0/50/75/90% sparsity, written as flops.md, flops.json and flops.png.

Every number comes from `spdf.flops.analytic_flops` (its conventions hold here); this module only chooses the
models, multiplies by the token budget and explains the result. Configs of the same shape (GPT-3 XL and
Cerebras-GPT 1.3B, a µP twin) cost the same FLOPs: they share one row that names them all.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .flops import CONVENTION, DENSE_COMPONENTS, WEIGHT_COMPONENTS, analytic_flops
from .fswrite import WriteError, replacing_file, write_text_atomic
from .model.families import family_of, named_shapes

LEVELS = (0.0, 0.5, 0.75, 0.9)
TOKENS_PER_PARAMETER = 20  # Chinchilla's compute-optimal budget, which the Cerebras-GPT family was trained on
EXPLAIN_LEVEL = 0.75  # the level the "why" section works through (the paper's headline)
FILES = ("flops.md", "flops.json", "flops.png")


def parameter_count(cfg) -> int:
    """Parameters of the spdf model of this shape (tied embeddings counted once), built by its family on the meta
    device: the model's own count, with no memory spent on a 13B model."""
    with torch.device("meta"):
        return family_of(cfg).build(cfg).num_parameters()


def _is_test_shape(name: str) -> bool:
    return name.startswith("tiny") or name.endswith(("-tiny", "-tiny-test"))


def table_models() -> list[tuple[object, list[str], int]]:
    """One (config, names, parameters) per distinct shape among the named configs of every family, the tiny test
    shapes left out, smallest first. Configs of one family with the same parameters and the same FLOPs per
    component are one shape (names and training settings, such as dropout or µP multipliers, do not count)."""
    groups: dict[tuple, tuple[object, list[str], int]] = {}
    for family, name, cfg in named_shapes():
        if not _is_test_shape(name):
            params = parameter_count(cfg)
            key = (family.name, params, tuple(sorted(family.forward_flops(cfg, cfg.n_ctx).items())))
            groups.setdefault(key, (cfg, [], params))[1].append(name)
    return sorted(groups.values(), key=lambda model: model[2])


def _share(forward: dict[str, float], components) -> float:
    return sum(forward[c] for c in components) / sum(forward.values())


def table_rows(levels=LEVELS) -> list[dict]:
    rows = []
    for cfg, names, params in table_models():
        tokens = TOKENS_PER_PARAMETER * params
        for level in levels:
            fb = analytic_flops(cfg, level)
            rows.append(dict(
                model=names[0], family=family_of(cfg).name, same_shape=names[1:], n_layer=cfg.n_layer,
                d_model=cfg.d_model, seq_len=fb.seq_len,
                vocab_size=cfg.vocab_size, parameters=params, tokens=tokens, sparsity=level,
                dense_flops=fb.dense_train * tokens, sparse_flops=fb.sparse_train * tokens, reduction=fb.reduction,
                kaplan_reduction=fb.kaplan_reduction,
                # share of the sparse run's FLOPs in the matmuls that have no weight to thin
                dense_share=_share(fb.sparse_forward, DENSE_COMPONENTS),
                **{f"{c}_share": _share(fb.sparse_forward, (c,)) for c in DENSE_COMPONENTS},
                # what the attention scores and the logits cost next to all the weight matmuls, in the dense model
                **{f"{c}_vs_weights": fb.dense_forward[c] / sum(fb.dense_forward[w] for w in WEIGHT_COMPONENTS)
                   for c in DENSE_COMPONENTS},
                dense_forward_per_token=fb.dense_forward, sparse_forward_per_token=fb.sparse_forward))
    return rows


# ---- Markdown -----------------------------------------------------------------------------------------------------
def _count(n: float) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:,.0f}"


def _label(row: dict) -> str:
    return " = ".join([f"`{row['model']}`", *(f"`{n}`" for n in row["same_shape"])])


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _summary(rows: list[dict], levels) -> list[str]:
    sparse_levels = [s for s in levels if s > 0]
    lines = ["| model | parameters | " + " | ".join(f"{s:.0%} sparse" for s in sparse_levels) + " |",
             "|---|---:|" + "---:|" * len(sparse_levels)]
    for model in dict.fromkeys(r["model"] for r in rows):
        sel = {r["sparsity"]: r for r in rows if r["model"] == model}
        first = next(iter(sel.values()))
        lines.append(f"| {_label(first)} | {_count(first['parameters'])} | "
                     + " | ".join(f"{sel[s]['reduction']:.2f}x" for s in sparse_levels) + " |")
    return lines


def _full_table(rows: list[dict]) -> list[str]:
    lines = ["| model | parameters | tokens | sparsity | dense FLOPs | sparse FLOPs | reduction | dense share | "
             "of which attention scores/AV | of which logits |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {_label(r)} | {_count(r['parameters'])} | {_count(r['tokens'])} | {r['sparsity']:.0%} | "
                     f"{r['dense_flops']:.3e} | {r['sparse_flops']:.3e} | {r['reduction']:.2f}x | "
                     f"{_pct(r['dense_share'])} | {_pct(r['attn_scores_share'])} | {_pct(r['logits_share'])} |")
    return lines


def _why(rows: list[dict], level: float) -> list[str]:
    rows = [r for r in rows if r["family"] == "gpt"]  # the closed forms below are GPT's (d_ff = 4·d, full heads)
    dense = {r["model"]: r for r in rows if r["sparsity"] == 0.0}
    at = [r for r in rows if r["sparsity"] == level]
    ceiling = 1 / (1 - level)
    lines = [
        "## Why small models save less", "",
        "(The gpt family's models; a Llama's SwiGLU, grouped K/V and large vocabulary change the terms, not the "
        "argument: its rows above follow from the same accounting.) "
        "Sparsity thins only the matmuls with a weight. Per token and layer those cost 2·(4·d·d_attn + 2·d·d_ff) = "
        "24·d² forward FLOPs (d_ff = 4·d), while the attention scores and AV cost 4·n_ctx·d_attn, which no weight "
        "thins: next to the weights that is n_ctx/(6·d), and the context is 2048 for every model here, so it "
        "shrinks only as models widen. The logits cost 2·d·V once per token against L·24·d² for all the weights: "
        "V/(12·L·d), shrinking with depth and width. If a share f of the dense run's FLOPs has no weight to thin, "
        f"the reduction at sparsity s is 1/(f + (1−f)(1−s)), below the weights' own 1/(1−s) ({ceiling:.0f}x at "
        f"{level:.0%}). From the table's numbers, at {level:.0%}:", "",
        "| model | layers | d_model | attention scores / weights | logits / weights | f (dense run) | "
        f"1/(f + (1−f)·{1 - level:g}) | reduction | dense share of the sparse run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in at:
        f = dense[r["model"]]["dense_share"]
        lines.append(f"| {_label(r)} | {r['n_layer']} | {r['d_model']} | {_pct(r['attn_scores_vs_weights'])} | "
                     f"{_pct(r['logits_vs_weights'])} | {_pct(f)} | {1 / (f + (1 - f) * (1 - level)):.2f}x | "
                     f"{r['reduction']:.2f}x | {_pct(r['dense_share'])} |")
    small, large = at[0], at[-1]
    lines += ["", f"The smallest model, {_label(small)}, spends {_pct(dense[small['model']]['dense_share'])} of its "
              f"dense FLOPs where sparsity cannot reach (attention scores {_pct(small['attn_scores_vs_weights'])} "
              f"and logits {_pct(small['logits_vs_weights'])} of the weight matmuls); at {level:.0%} sparsity "
              f"those are {_pct(small['dense_share'])} of what its sparse run spends, and it saves "
              f"{small['reduction']:.2f}x. The largest, {_label(large)}, has "
              f"{_pct(dense[large['model']]['dense_share'])} of dense FLOPs beyond sparsity's reach and saves "
              f"{large['reduction']:.2f}x of the {ceiling:.0f}x ceiling."]
    return lines


def format_markdown(rows: list[dict], levels=LEVELS, plotted: bool = True) -> str:
    xl = next((r for r in rows if "gpt3-xl" in (r["model"], *r["same_shape"]) and r["sparsity"] == 0.75), None)
    lines = ["# Pre-training FLOPs, dense vs sparse, for every named model", "",
             "Written by `spdf flops --table` (analytic, no measurement: the same on every machine). Budget: "
             f"{TOKENS_PER_PARAMETER} tokens per parameter (parameters counted with the tied embedding once), the "
             "same at every sparsity; sequence length = the model's context. Sparsity is uniform on the attention "
             "projections and MLP weights (the paper's layout: each model family's default filter); embeddings, "
             "norms, biases and the LM head stay "
             f"dense. Convention: {CONVENTION}. Reduction = dense FLOPs / sparse FLOPs; dense share = the share of "
             "the sparse run's FLOPs (at 0%: the dense run's) in matmuls without a weight (attention scores and AV, "
             "logits).", ""]
    if xl is not None:
        lines += [f"**GPT-3 XL at 75%: {xl['reduction']:.2f}x fewer pre-training FLOPs** (the paper: about 2.5x); "
                  f"{xl['kaplan_reduction']:.2f}x with causal attention counted at half, as Kaplan et al. (2020) "
                  f"count it.", ""]
    lines += ["## Reduction at a glance", "", *_summary(rows, levels), ""]
    lines += (["![reduction vs model size](flops.png)", ""] if plotted
              else ["(flops.png not drawn: matplotlib is not installed; `pip install 'spdf[plot]'`.)", ""])
    lines += ["## Full table", "", *_full_table(rows), ""]
    if EXPLAIN_LEVEL in levels and 0.0 in levels:
        lines += [*_why(rows, EXPLAIN_LEVEL), ""]
    return "\n".join(lines)


# ---- plot and files -----------------------------------------------------------------------------------------------
def draw_plot(rows: list[dict], levels, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, level in enumerate(levels):
        sel = [r for r in rows if r["sparsity"] == level]
        color = f"C{i}"
        ax.plot([r["parameters"] for r in sel], [r["reduction"] for r in sel], marker="o", color=color,
                label=f"{level:.0%} sparse")
        if level > 0:  # what the weights alone would give: the limit as attention and logits vanish
            ax.axhline(1 / (1 - level), color=color, ls=":", lw=0.8)
    for r in rows:
        if r["model"] in ("gpt3-small", "gpt3-xl", "gpt3-13b") and r["sparsity"] == 0.75:
            last = r["model"] == "gpt3-13b"
            ax.annotate(f"{r['model']} {r['reduction']:.2f}x", (r["parameters"], r["reduction"]),
                        textcoords="offset points", xytext=(-6, 6) if last else (4, -12), fontsize=8,
                        ha="right" if last else "left")
    ax.set_xscale("log")
    ax.set_xlabel(f"parameters ({TOKENS_PER_PARAMETER} tokens per parameter)")
    ax.set_ylabel("pre-training FLOPs, dense / sparse")
    ax.set_title("FLOP reduction of sparse pre-training vs model size\n(dotted: 1/(1−s), the weights alone)")
    ax.legend()
    fig.tight_layout()
    with replacing_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_tables(out_dir: Path, levels=LEVELS) -> dict:
    """Write flops.json, flops.md and (with matplotlib) flops.png into `out_dir`, each atomically. Returns the rows,
    the paths written and, when the plot could not be drawn, why."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise WriteError(f"--table {out_dir}: not a directory (give the directory to write {', '.join(FILES)} into)")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = table_rows(levels)
    try:
        import matplotlib  # noqa: F401  (the [plot] extra)
        missing = None
    except ImportError:
        missing = "matplotlib is not installed (pip install 'spdf[plot]')"
    record = dict(tokens_per_parameter=TOKENS_PER_PARAMETER, levels=list(levels), convention=CONVENTION, rows=rows)
    texts = {"flops.json": json.dumps(record, indent=2) + "\n",
             "flops.md": format_markdown(rows, levels, plotted=missing is None)}
    for name, text in texts.items():  # both composed before either is written
        write_text_atomic(out_dir / name, text)
    written = [out_dir / "flops.json", out_dir / "flops.md"]
    if missing is None:
        draw_plot(rows, levels, out_dir / "flops.png")
        written.append(out_dir / "flops.png")
    return dict(rows=rows, written=written, plot_missing=missing, summary="\n".join(_summary(rows, levels)))
