"""``finetune export RUN``: the flags as ``export_run``'s arguments, then its summary on the console."""

from __future__ import annotations

import argparse
import logging

from finetune.export.build import export_run
from finetune.export.formats import FORMATS, QUANTIZATIONS
from finetune.processes import command_logging

log = logging.getLogger("finetune.export")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a finished run folder (an adapter run is exported merged)")
    parser.add_argument("--format", default="onnx", choices=FORMATS,
                        help="onnx (default; served by onnxruntime), torchscript, or safetensors-int8 (int8 linear "
                             "layers, rebuilt by finetune or the folder's predict.py)")
    parser.add_argument("--quantize", choices=QUANTIZATIONS,
                        help="onnx: onnxruntime dynamic int8; torchscript: PyTorch dynamic int8 linear layers")
    parser.add_argument("--output", help="the exported folder (default: RUN-FORMAT[-int8] beside the run)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --output")
    parser.add_argument("--check-split", default="test", choices=["train", "validation", "test"],
                        help="the split the export is checked on against the run's PyTorch model (default test; "
                             "validation when the recipe has no test split)")
    parser.add_argument("--check-rows", type=int, help="check on the split's first N rows only (default: all)")


def command(args: argparse.Namespace) -> int:
    command_logging("export", logger=log)
    report = export_run(args.run, args.output, format=args.format, quantize=args.quantize, overwrite=args.overwrite,
                        check_split=args.check_split, check_rows=args.check_rows)
    print("\n".join(report.summary))
    return 0
