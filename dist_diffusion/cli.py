"""`dist-diffusion`: the command line. Each subcommand parses the config tree once,
validates it, and only then starts work."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, field_docs, load_config, to_yaml


def _cmd_config(args: argparse.Namespace) -> int:
    if args.docs:
        for key, doc in field_docs():
            print(f"{key:32s} {doc}")
        return 0
    cfg = load_config(args.config, args.overrides)
    print(to_yaml(cfg), end="")
    if args.summary:
        _print_summary(cfg)
    return 0


def _print_summary(cfg) -> None:
    from .core.models import build_unet, count_parameters, unet_input_shape

    shape = "x".join(map(str, unet_input_shape(cfg)))
    params = count_parameters(build_unet(cfg)) / 1e6
    space = "latent" if cfg.vae.enabled else "pixel"
    print(f"# UNet: {params:.1f}M parameters on {space} inputs {shape}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dist-diffusion",
        description="Latent diffusion training and evaluation on clusters.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("config", help="validate a recipe and print the resolved config tree")
    p.add_argument("config", nargs="?", help="YAML recipe, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=20")
    p.add_argument("--docs", action="store_true", help="list every config key with its doc")
    p.add_argument("--summary", action="store_true", help="also print the model size (stderr)")
    p.set_defaults(func=_cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
