"""Rows out: the console table, and JSON / CSV / Markdown files.

A row is a flat dict (``COLUMNS`` first, then the run's settings); ``None`` is a metric
that was not measured for that configuration (e.g. the attention error of a peer).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from edgekv.tables import markdown_table

COLUMNS = ("format", "backend", "eviction", "kv_budget", "exact_window", "kv_budget_frac",
           "ppl", "ppl_mode",
           "ppl_tokens", "delta_ppl_pct", "ppl_decode", "delta_ppl_decode_pct", "kl", "top1",
           "greedy_match", "greedy_full", "attn_rel_err", "attn_rel_err_layers",
           "passkey_acc", "passkey", "bytes_per_token", "kv_vs_fp16", "notes", "run_notes")

# (header, width, how to show a row) for the console and Markdown tables. The console
# prints each row as it is measured (minutes apart), so its widths are fixed here rather
# than taken from all the rows at the end as tabulate does for the Markdown file.
_TABLE = (
    ("format", 17, lambda r: r["format"] + (f" +w{r['exact_window']}"
                                            if r.get("exact_window") else "")),
    ("backend", 12, lambda r: r["backend"]),
    ("eviction", 16, lambda r: f"{r['eviction']}@{r['kv_budget']}" if r["eviction"] else "-"),
    ("KV vs fp16", 10, lambda r: _num(r["kv_vs_fp16"], "{:.3f}x")),
    ("ppl", 9, lambda r: _num(r["ppl"], "{:.4f}") + ("*" if r["ppl_mode"] == "decode" else "")),
    ("Δppl %", 9, lambda r: _num(r["delta_ppl_pct"], "{:+.3f}")),
    ("ppl tok-by-tok", 14, lambda r: _num(r["ppl_decode"], "{:.4f}")),
    ("Δ %", 8, lambda r: _num(r["delta_ppl_decode_pct"], "{:+.3f}")),
    ("KL", 9, lambda r: _num(r["kl"], "{:.2e}")),
    ("top-1 %", 8, lambda r: _num(r["top1"], "{:.2%}", scale=False)),
    ("greedy", 7, lambda r: _num(r["greedy_match"], "{:.1f}")),
    ("attn err", 9, lambda r: _num(r["attn_rel_err"], "{:.2e}")),
    ("passkey", 7, lambda r: _num(r["passkey_acc"], "{:.0%}", scale=False)),
)


def _num(v, fmt: str, scale: bool = True) -> str:
    if v is None:
        return "-"
    s = fmt.format(v)
    return s[:-1] if not scale and s.endswith("%") else s


def table_header() -> str:
    return "  ".join(f"{h:>{w}}" for h, w, _ in _TABLE)


def table_line(row: dict) -> str:
    return "  ".join(f"{show(row):>{w}}" for _, w, show in _TABLE)


def legend(rows: list[dict]) -> list[str]:
    """Lines under the table: what was measured on what."""
    if not rows:
        return []
    r = rows[0]
    chunk = r.get("eviction_chunk", 1)
    evict = "" if chunk == 1 or not any(x.get("eviction") for x in rows) else (
        f"; eviction rows stream the window through the budget in prefill chunks of {chunk}")
    lines = [
        f"model {r['model']}, {r['dtype']} on {r['device']}; text {r['text']} "
        f"({r['text_tokens']:,} tokens)",
        f"ppl: {r['ppl_windows']} windows of {r['window']} tokens, stride {r['stride']}, "
        f"each from its own start (prefill: new tokens are written to the cache and read "
        f"back); * = token by token over the first {r['decode_windows']} window(s) only"
        f"{evict}",
        f"tok-by-tok ppl, KL(fp16 || row), top-1: first {r['decode_windows']} window(s), "
        f"each token reading its history from the cache as decode does",
    ]
    if r["prompts"]:
        lines.append(f"greedy: mean tokens before the first divergence from fp16 "
                     f"({r['prompts']} prompts of {r['prompt_len']}, {r['gen_len']} new "
                     f"tokens)")
    if r["layer_tokens"]:
        lines.append(f"attn err: mean over layers of the relative error of each attention "
                     f"output vs an fp32 cache, every layer fed the same input "
                     f"({r['layer_tokens']} tokens of the first window)")
    if any(x.get("exact_window") for x in rows):
        lines.append("+wN: each sequence's newest N tokens also kept exact (the exact window; "
                     "for transformers' caches, their residual_length)")
    if r.get("run_notes"):
        lines.append(f"notes: {r['run_notes']}")
    return lines


def write_json(rows: list[dict], path: str | Path) -> None:
    Path(path).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


def write_csv(rows: list[dict], path: str | Path) -> None:
    """One line per row; lists and dicts are written as JSON text."""
    fields = list(COLUMNS) + [k for k in (rows[0] if rows else {}) if k not in COLUMNS]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v
                        for k, v in r.items()})


def markdown(rows: list[dict]) -> str:
    """The table as GitHub Markdown (the names left-aligned, the numbers right), with the
    legend as a list under it."""
    table = markdown_table([[show(r) for _, _, show in _TABLE] for r in rows],
                           [h for h, _, _ in _TABLE], align="lll" + "r" * (len(_TABLE) - 3))
    notes = [f"- {line}" for line in legend(rows)]
    return "\n".join([table, "", *notes]) + "\n"


def write_markdown(rows: list[dict], path: str | Path) -> None:
    Path(path).write_text(markdown(rows), encoding="utf-8")
