"""``optimum-superweight export MODEL OUT --format compressed-tensors|gguf``: write a checkpoint for vLLM or llama.cpp."""

from __future__ import annotations

import argparse
import json

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a quantized checkpoint to compressed-tensors (vLLM) or GGUF (llama.cpp), super weights exact",
        description=__doc__,
    )
    parser.add_argument("model", help="folder of a checkpoint saved by this package")
    parser.add_argument("output", help="output folder (compressed-tensors) or .gguf file (gguf)")
    parser.add_argument("--format", required=True, choices=["compressed-tensors", "gguf"], help="target format")
    parser.add_argument(
        "--requantize",
        action="store_true",
        help="re-quantize layers the format cannot hold exactly (default: refuse with an error naming them)",
    )
    parser.add_argument("--dtype", default="auto", help="compressed-tensors: serving dtype of scales and dense layers (default: the model's)")
    parser.add_argument(
        "--super-weight-type",
        default="block",
        choices=["block", "auto", "f32", "f16", "bf16", "q8_0"],
        help="gguf: layers holding super weights (block: keep the block type, super weight exact in a re-fitted block; "
        "auto: dense, F16/BF16 where lossless, else F32)",
    )
    parser.add_argument(
        "--embedding-type", default="auto", metavar="TYPE",
        help="gguf: embeddings and output head (auto: llama.cpp's own choice, e.g. Q8_0; keep: as --dense-type; or Q8_0, Q5_0, F16, ...)",
    )
    parser.add_argument(
        "--dense-type", default="auto", choices=["auto", "f32", "f16", "bf16", "q8_0"], help="gguf: type of embeddings etc."
    )
    parser.add_argument("--llama-quantize", default=None, metavar="TYPE", help="gguf: let llama.cpp quantize all but the super-weight tensors (e.g. Q4_K_M)")
    parser.add_argument("--converter", default=None, metavar="PATH", help="gguf: llama.cpp source folder with convert_hf_to_gguf.py")
    parser.add_argument("--pre-tokenizer", default=None, help="gguf: llama.cpp pre-tokenizer name when the converter does not know the tokenizer")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..export import export

    if args.format == "compressed-tensors":
        options = {"dtype": args.dtype}
    else:
        options = {
            "super_weight_type": args.super_weight_type,
            "embedding_type": args.embedding_type,
            "dense_type": args.dense_type,
            "llama_quantize": args.llama_quantize,
            "converter": args.converter,
            "pre_tokenizer": args.pre_tokenizer,
        }
    result = export(args.model, args.output, format=args.format, allow_requantize=args.requantize, **options)
    print(json.dumps(result, indent=2))
    serve = f"vllm serve {args.output}" if args.format == "compressed-tensors" else f"llama-cli -m {args.output}  (or llama_cpp.Llama(model_path=...))"
    print(f"written {args.output}; serve it with: {serve}")
    return 0
