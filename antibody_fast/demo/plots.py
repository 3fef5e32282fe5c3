"""Plots of the demos: one run's (:func:`plot`) and several seeds' (:func:`plot_summary`)."""

from __future__ import annotations

import os

from .methods import METHOD_LABELS, WEIGHTED_FINETUNE


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def method_colors(methods: list[str]) -> dict[str, str]:
    palette = {
        "sft": "tab:grey",
        "vaccine": "tab:purple",
        "lisa": "tab:orange",
        "booster": "tab:green",
        "antibody_align": "tab:cyan",
        "antibody_ft": "tab:brown",
    }
    return {m: palette.get(m, "tab:blue") for m in methods}


def save_figure(fig, out: str, name: str) -> str:
    """Save ``fig`` as ``out/name`` (tight layout, 110 dpi), close it, return the path."""
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def plot(report: dict, out: str) -> list[str]:
    """The plots of one run: ``weights.png`` (Antibody's sample weights), ``hs_fa.png`` (final HS/FA per
    method), ``finetuning.png`` (held-out HS and FA during fine-tuning) and ``alignment.png`` (alignment loss
    and, for the ``align_step`` methods, cos(g_a, g_s) and λ_t)."""
    plt = pyplot()
    files = []
    rows = report["methods"]
    colors = method_colors([r["method"] for r in rows])
    ab = next((r for r in rows if r["method"] in WEIGHTED_FINETUNE), None)
    if ab is not None:
        tr = ab["trace"]
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        steps = range(1, len(tr["harmful_weight"]) + 1)
        ax.plot(steps, tr["harmful_weight"], color="tab:red", label="harmful samples")
        ax.plot(steps, tr["benign_weight"], color="tab:blue", label="benign samples")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="uniform (SFT)")
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("mean weight × batch size")
        ax.set_yscale("log")
        ax.set_title(f"{ab['label']}: sample weights")
        ax.legend()
        files.append(save_figure(fig, out, "weights.png"))

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["hs"] for r in rows], width=0.4, color="tab:red", label="HS (%) ↓")
    ax.bar([i + 0.2 for i in x], [r["fa"] for r in rows], width=0.4, color="tab:green", label="FA (%) ↑")
    ax.set_xticks(list(x), [r["label"] for r in rows])
    ax.set_ylim(0, 118)
    ax.set_ylabel("%")
    ax.set_title(
        f"after fine-tuning: harmful ratio {report['config']['harmful_ratio']:g}, seed {report['config']['seed']}"
    )
    ax.legend(loc="upper center", ncol=2, frameon=False)
    files.append(save_figure(fig, out, "hs_fa.png"))

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for r in rows:
        c = r["curve"]
        a1.plot(c["step"], c["hs"], marker="o", ms=3, color=colors[r["method"]], label=r["label"])
        a2.plot(c["step"], c["fa"], marker="o", ms=3, color=colors[r["method"]], label=r["label"])
    a1.set_title("held-out HS during fine-tuning (%) ↓")
    a2.set_title("held-out FA during fine-tuning (%) ↑")
    for a in (a1, a2):
        a.set_xlabel("fine-tuning step")
        a.set_ylim(-3, 103)
    a1.legend(fontsize=8)
    files.append(save_figure(fig, out, "finetuning.png"))

    aligned = {}
    for r in rows:  # one curve per alignment (Lisa shares SFT's)
        aligned.setdefault(r["alignment"], r["align_trace"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, tr in aligned.items():
        steps = range(1, len(tr["loss_align"]) + 1)
        a1.plot(steps, tr["loss_align"], color=colors[name], label=METHOD_LABELS[name])
        if "cos" in tr:
            a2.plot(steps, tr["cos"], color=colors[name], label=f"{METHOD_LABELS[name]}: cos(g_a, g_s)")
            a2.plot(steps, [v / 10 for v in tr["lambda_t"]], color=colors[name], ls="--",
                    label=f"{METHOD_LABELS[name]}: λ_t / 10")  # fmt: skip
    a1.set_yscale("log")
    a1.set_xlabel("alignment step")
    a1.set_title("alignment loss L_A (refusals on harmful prompts)")
    a1.legend(fontsize=8)
    a2.axhline(0.0, color="grey", lw=0.6)
    a2.set_xlabel("alignment step")
    a2.set_title("align_step: cos(g_a, g_s) and λ_t")
    if a2.lines[1:]:
        a2.legend(fontsize=8)
    files.append(save_figure(fig, out, "alignment.png"))
    return files


def plot_summary(summary: dict, out: str) -> list[str]:
    """Several seeds: ``hs_fa.png`` with the mean and the per-seed values of HS and FA per method."""
    plt = pyplot()
    rows = summary["methods"]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, r in enumerate(rows):
        for dx, key, color in ((-0.2, "hs", "tab:red"), (0.2, "fa", "tab:green")):
            vals = r[key]
            ax.bar(i + dx, sum(vals) / len(vals), width=0.4, color=color, alpha=0.6,
                   label=("HS (%) ↓" if key == "hs" else "FA (%) ↑") if i == 0 else None)  # fmt: skip
            ax.scatter([i + dx] * len(vals), vals, color="black", s=8, zorder=3)
    ax.set_xticks(list(range(len(rows))), [r["label"] for r in rows])
    ax.set_ylim(0, 118)
    ax.set_ylabel("%  (bars: mean; dots: seeds)")
    ax.set_title(f"after fine-tuning, seeds {','.join(map(str, summary['seeds']))}")
    ax.legend(loc="upper center", ncol=2, frameon=False)
    return [save_figure(fig, out, "hs_fa.png")]
