"""``python -m tesloss.text``: a file of class names in, a text head file out."""
import argparse

from .encoders import ENCODER_SPECS, encoder_from_spec
from .heads import DEFAULT_TEMPLATES, _check_templates, build_text_head, save_text_head

__all__ = ["main"]


def _read_lines(path, what):
    try:
        with open(path, encoding="utf-8") as file:
            lines = [line.strip() for line in file]
    except OSError as error:
        raise SystemExit(f"tesloss.text: cannot read {what} {path}: {error}")
    return [line for line in lines if line]


def main(argv=None):
    """``python -m tesloss.text``: class names file in, text head file out."""
    parser = argparse.ArgumentParser(
        prog="python -m tesloss.text",
        description="Build a TeS text reference head from class names and save it as "
                    "safetensors.")
    parser.add_argument("--classnames", required=True, metavar="FILE",
                        help="class names, one a line, in label order")
    parser.add_argument("--encoder", required=True, metavar="SPEC",
                        help="; ".join(ENCODER_SPECS))
    parser.add_argument("--out", required=True, metavar="FILE",
                        help="the .safetensors file to write")
    parser.add_argument("--template", action="append", metavar="T",
                        help=f"a template with '{{}}' for the class name; repeat to ensemble "
                             f"(default: {DEFAULT_TEMPLATES[0]!r})")
    parser.add_argument("--templates-file", metavar="FILE", help="templates, one a line")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=256, help="prompts per forward pass")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    classnames = _read_lines(args.classnames, "--classnames")
    if not classnames:
        parser.error(f"--classnames {args.classnames} holds no class names")
    templates = list(args.template or [])
    if args.templates_file:
        templates += _read_lines(args.templates_file, "--templates-file")
    templates = templates or list(DEFAULT_TEMPLATES)
    try:
        templates = _check_templates("--template", templates)
    except ValueError as error:
        parser.error(str(error))
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        encoder = encoder_from_spec(args.encoder, device=args.device)
    except (ValueError, TypeError, OSError, ImportError, RuntimeError) as error:
        parser.error(f"--encoder {args.encoder}: {error}")
    head = build_text_head(encoder, classnames, templates, batch_size=args.batch_size,
                           progress=False if args.no_progress else None)
    save_text_head(args.out, head, classnames=classnames, templates=templates, encoder=encoder)
    print(f"wrote {args.out}: {head.shape[0]} classes x {head.shape[1]} dims from "
          f"{encoder.spec}, {len(templates)} template(s)")
    return 0
