"""``xmoe export-hf RUN --out DIR``: a trained run as a Hugging Face Qwen3-MoE folder."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    """Add ``export-hf`` to the ``xmoe`` subparsers ``sub``."""
    p = sub.add_parser(
        "export-hf",
        help="write a model.arch=qwen3_moe run as a folder transformers loads (Qwen3-MoE)",
        description=(
            "Write RUN's checkpoint as config.json + model.safetensors + tokenizer files that "
            "transformers.AutoModelForCausalLM / AutoTokenizer load with no custom code. Top-k "
            "runs export exactly; a threshold run exports as top-k with k = its max experts, "
            "and config.json['xmoe'] keeps the exact threshold routing."
        ),
    )
    p.add_argument("run_dir", metavar="RUN", help="a run folder trained with model.arch=qwen3_moe")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export at DIR")
    p.add_argument(
        "--check",
        action="store_true",
        help="load DIR with transformers and print the largest logit difference on val tokens",
    )
    p.set_defaults(handler=export_command)


def export_command(args) -> int:
    from ..hf.export import compare_logits, export_model, read_xmoe_section
    from ..train.run_dir import load_run

    run = load_run(args.run_dir)
    out = export_model(run.model, args.out, run.data.tokenizer, overwrite=args.overwrite)
    section = read_xmoe_section(out)
    exported = section["exported_as"]
    how = "exactly" if section["exact"] else "as top-k (exact routing in config.json['xmoe'])"
    print(f"exported {args.run_dir} -> {out} {how}")
    print(
        f"  qwen3_moe: {run.model.cfg.n_layer} layers, {run.model.cfg.moe.num_experts} experts, "
        f"num_experts_per_tok={exported['k']}, norm_topk_prob={exported['norm_topk_prob']}"
    )
    if args.check:
        block = run.model.cfg.block_size
        val = run.data.val
        n = min(4, max(1, len(val) // block))
        import torch

        idx = torch.from_numpy(val[: n * block].astype("int64")).view(n, block)
        print(json.dumps(compare_logits(run.model, out, idx)))
    return 0
