"""``--plot out.png``: perplexity change and KL by format, and by eviction budget.

Needs matplotlib (``pip install edgekv[plot]``); the import is deferred so the rest of
``edgekv eval`` works without it.
"""

from __future__ import annotations

from pathlib import Path


def plot(rows: list[dict], path: str | Path) -> None:
    """Left: Δppl % (bars, coloured by how it was measured) and KL (dots) per format,
    no eviction. Right, when eviction rows exist:
    Δppl % against the budget, one line per (format, policy). Raises ValueError without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'edgekv[plot]'") from None
    plain = [r for r in rows if not r["eviction"]]
    evicted = [r for r in rows if r["eviction"]]
    fig, axes = plt.subplots(1, 2 if evicted else 1, figsize=(12 if evicted else 7, 4.5),
                             squeeze=False)
    ax = axes[0][0]
    names = [r["format"] for r in plain]
    xs = range(len(plain))
    colors = ["tab:blue" if r["ppl_mode"] == "prefill" else "tab:orange" for r in plain]
    ax.bar(xs, [r["delta_ppl_pct"] or 0.0 for r in plain], color=colors)
    if "tab:orange" in colors:  # peers' perplexity is token by token on fewer windows
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color="tab:blue", label="all windows, prefill"),
                           Patch(color="tab:orange", label="token by token, decode windows")],
                  loc="upper left", fontsize=8)
    ax.set_xticks(list(xs), names, rotation=45, ha="right")
    ax.set_ylabel("Δ perplexity vs fp16 (%)")
    ax.axhline(0, color="black", lw=0.5)
    kl_ax = ax.twinx()
    kl_ax.plot(list(xs), [r["kl"] if r["kl"] is not None else float("nan") for r in plain],
               "o", color="tab:red")
    kl_ax.set_ylabel("KL(fp16 || format), nats/token", color="tab:red")
    ax.set_title("KV format cost")
    if evicted:
        ax = axes[0][1]
        for key in sorted({(r["format"], r["eviction"]) for r in evicted}):
            pts = sorted((r["kv_budget"], r["delta_ppl_pct"]) for r in evicted
                         if (r["format"], r["eviction"]) == key)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{key[1]} {key[0]}")
        ax.set_xlabel("KV budget (tokens per sequence)")
        ax.set_ylabel("Δ perplexity vs fp16 (%), token by token")
        ax.set_title("Eviction cost by budget")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
