"""The ``edgekv`` command line."""

from __future__ import annotations

import click

from edgekv import __version__
from edgekv.quant import FORMATS, VARIANTS, get_format


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgekv")
def main() -> None:
    """EdgeKV: LLM inference with a paged, quantized KV cache."""


@main.command()
@click.option("--layers", default=32, show_default=True, help="Transformer layers.")
@click.option("--kv-heads", default=8, show_default=True, help="KV heads per layer.")
@click.option("--head-dim", default=128, show_default=True, help="Values per head.")
@click.option("--variants", is_flag=True, help="Also list the alternative int formats.")
def formats(layers: int, kv_heads: int, head_dim: int, variants: bool) -> None:
    """KV formats and their exact cost per token (K+V, all layers, scales included)."""
    if min(layers, kv_heads, head_dim) <= 0:
        raise click.UsageError("--layers, --kv-heads and --head-dim must be positive")
    fp16 = get_format("fp16").bytes_per_token(kv_heads, head_dim) * layers
    click.echo(f"{'format':<12}{'bytes/token':>12}{'vs fp16':>9}")
    for name in FORMATS + (VARIANTS if variants else ()):
        fmt = get_format(name)
        try:
            b = fmt.bytes_per_token(kv_heads, head_dim) * layers
        except ValueError as e:
            click.echo(f"{name:<12}  n/a: {e}")
            continue
        click.echo(f"{name:<12}{b:>12,}{b / fp16:>8.3f}x")
