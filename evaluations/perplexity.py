"""Perplexity and bits per character of a run on a prepared split (pretraining or SFT data).

    python evaluations/perplexity.py --out_dir out/pretrain [--data data/processed] [--split val]
        [--max_blocks N] [--batch_size 16] [--device auto] [--dtype auto] [--which best] [--output FILE]

- The loss is the masked mean over every target of the split (or of its first `--max_blocks`
  blocks), computed by `data_utils.evaluate_blocks`, the same function training uses for val_loss,
  so the numbers here and in log.jsonl agree (on the same blocks, to float rounding: the trimmed
  model `load_run` gives and training's padded one have the same softmax, GPTConfig.n_vocab).
  The mask comes from the data's own kind: all tokens but padding for pretraining data, answer
  spans only for SFT data.
- `--dtype auto` is training's rule (inference.auto_dtype: bf16 on a GPU with it or a CPU with
  native bf16, float32 elsewhere); the weights are cast to it, the loss is summed in float32.
- Bits per character divides by characters, not tokens, so runs with different tokenizers (or
  gpt2) can be compared; perplexity cannot.
- Data tokenized with another tokenizer is refused: its ids would mean other strings to the model.
- Writes `OUT_DIR/eval_perplexity_<kind>_<split>.json` (kind of the data), so a fine-tuned run can
  be scored on both its SFT data and the pretraining data (to see forgetting) without overwriting.
"""
import argparse
import sys
from pathlib import Path

if not __package__:  # run as a script (python evaluations/perplexity.py): the modules live in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data_utils import BlockData, evaluate_blocks  # noqa: E402
from evaluations.metrics import default_output, format_table, write_results  # noqa: E402
from inference import load_run, pick_device  # noqa: E402
from tokenizer import TokenizerId  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description="Masked loss, perplexity and bits per character of a run on a split.")
    p.add_argument("--out_dir", required=True, help="run directory (best.pt / last.pt)")
    p.add_argument("--data", default="data/processed", help="folder with train.bin / val.bin / meta.json")
    p.add_argument("--split", default="val")
    p.add_argument("--max_blocks", type=int, default=None, help="score only the first N blocks")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="weights' precision; auto: bf16 where the GPU/CPU computes it natively (as train.py)")
    p.add_argument("--which", default="best", help="checkpoint: best or last")
    p.add_argument("--output", default=None, help="result JSON (default OUT_DIR/eval_perplexity_<kind>_<split>.json)")
    args = p.parse_args(argv)

    device = pick_device(args.device)
    run = load_run(args.out_dir, args.which, device, args.dtype)
    data = BlockData(args.data, args.split)
    if TokenizerId.from_json(data.meta["tokenizer"]) != run.tok.identity:
        sys.exit(f"error: {args.data} was tokenized with {TokenizerId.from_json(data.meta['tokenizer']).short()}, but "
                 f"{args.out_dir} uses {run.tok.identity.short()}; prepare the data with the run's tokenizer")
    if data.block_size - 1 > run.model.config.block_size:
        sys.exit(f"error: blocks of {data.block_size} tokens are longer than the model's context "
                 f"({run.model.config.block_size} + 1)")
    n_blocks = min(data.n_blocks, args.max_blocks or data.n_blocks)
    metrics = evaluate_blocks(run.model, data, range(n_blocks), run.tok, args.batch_size, device)

    kind = data.meta["kind"]
    output = args.output or default_output(args.out_dir, f"perplexity_{kind}_{args.split}")
    settings = {"split": args.split, "kind": kind, "max_blocks": args.max_blocks, "which": args.which,
                "dtype": run.info["dtype"],
                "block_size": data.block_size}
    write_results(output, f"perplexity_{kind}_{args.split}", run, args.data, settings, metrics)
    print(format_table({"run": run.info["name"], "data": f"{args.data} ({kind}, {args.split})", **metrics}))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
