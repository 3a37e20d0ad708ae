"""``edgekv formats``: each KV format's exact bytes per token."""

from __future__ import annotations

import click

from edgekv.names import KV_FORMATS as FORMATS
from edgekv.names import KV_VARIANTS as VARIANTS


@click.command()
@click.option("--layers", default=32, show_default=True, help="Transformer layers.")
@click.option("--kv-heads", default=8, show_default=True, help="KV heads per layer.")
@click.option("--head-dim", default=128, show_default=True, help="Values per head.")
@click.option("--variants", is_flag=True, help="Also list the alternative int formats.")
def formats(layers: int, kv_heads: int, head_dim: int, variants: bool) -> None:
    """KV formats and their exact cost per token (K+V, all layers, scales included)."""
    from edgekv.quant import get_format
    from edgekv.tables import text_table

    if min(layers, kv_heads, head_dim) <= 0:
        raise click.UsageError("--layers, --kv-heads and --head-dim must be positive")
    fp16 = get_format("fp16").bytes_per_token(kv_heads, head_dim) * layers
    rows, unusable = [], []
    for name in FORMATS + (VARIANTS if variants else ()):
        try:
            b = get_format(name).bytes_per_token(kv_heads, head_dim) * layers
        except ValueError as e:
            rows.append((name, "n/a", "-"))
            unusable.append(f"{name}  n/a: {e}")
            continue
        rows.append((name, f"{b:,}", f"{b / fp16:.3f}x"))
    for line in text_table(rows, ("format", "bytes/token", "vs fp16"), align="lrr") + unusable:
        click.echo(line)
