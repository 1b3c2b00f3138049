"""``optimum-superweight export MODEL OUT --format awq|compressed-tensors|gguf``: write a checkpoint for vLLM or llama.cpp.

AWQ: vLLM on CPU and GPU. compressed-tensors: vLLM on GPU (and plain transformers when symmetric). GGUF: llama.cpp.
Layers a format cannot hold exactly are refused with the layer named, or re-fitted with ``--requantize``.
"""

from __future__ import annotations

import argparse
import json

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a quantized checkpoint to AWQ or compressed-tensors (vLLM) or GGUF (llama.cpp), super weights exact",
        description=__doc__,
    )
    parser.add_argument("model", help="folder of a checkpoint saved by this package")
    parser.add_argument("output", help="output folder (awq, compressed-tensors) or .gguf file (gguf)")
    parser.add_argument("--format", required=True, choices=["awq", "compressed-tensors", "gguf"], help="target format")
    parser.add_argument(
        "--requantize",
        action="store_true",
        help="re-fit layers the format cannot hold exactly from their dequantized weights, weighted by activations on "
        "the calibration text (default: refuse with an error naming them); the output's README says which and what it cost",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float16", "bfloat16", "float32"],
        help="awq: dtype of dense layers and the config (auto: float16, AWQ's own, unless it would round a super weight, "
        "then float32); compressed-tensors: serving dtype of "
        "scales and dense layers (auto: the model's)",
    )
    parser.add_argument(
        "--zero-point",
        default="auto",
        choices=["auto", "uint8", "symmetric"],
        help="compressed-tensors: the form of the export (auto: symmetric when every exact layer is symmetric, else "
        "integer zero-points); layers in another form need --requantize",
    )
    parser.add_argument(
        "--super-weight-type",
        default="block",
        choices=["block", "auto", "f32", "f16", "bf16", "q8_0"],
        help="gguf: layers holding super weights (block: keep the block type, super weight exact in a re-fitted block; "
        "auto: dense, F16/BF16 where lossless, else F32)",
    )
    parser.add_argument(
        "--embedding-type", default="auto", metavar="TYPE",
        help="gguf: embeddings and output head (auto: llama.cpp's own choice, e.g. Q6_K / Q8_0; keep: as --dense-type; or Q8_0, Q6_K, Q5_0, Q4_K, F16, ...)",
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
        options = {"dtype": args.dtype, "zero_point": args.zero_point}
    elif args.format == "awq":
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
    serve = {
        "awq": f"vllm serve {args.output} --dtype float16",
        "compressed-tensors": f"vllm serve {args.output}",
    }.get(args.format, f"llama-cli -m {args.output}  (or llama_cpp.Llama(model_path=...))")
    print(f"written {args.output}; serve it with: {serve}")
    return 0
