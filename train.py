"""Pretraining and supervised fine-tuning of the GPT: one script for both, nanoGPT-style settings.

    python train.py config/train_config.py                     # pretrain on data/processed
    python train.py config/train_config_sft.py                 # fine-tune it on data/sft
    python train.py config/train_config_cpu.py --max_iters=50  # any setting as --key=value
    torchrun --standalone --nproc_per_node=4 train.py config/train_config.py

Design choices:
- Settings are the module-level assignments below, overridden by config files and then flags
  (configurator.py). The model's shape comes from the settings; its block size, vocabulary and
  tokenizer from the data's meta.json (the vocabulary padded up to a multiple of 64, which makes
  the output layer's matmuls faster; the padding ids never occur in the data and are left out of
  the loss's softmax, `GPTConfig.n_vocab`, so val_loss is exactly the loss of the trimmed model
  that inference.load_run gives evaluations/perplexity.py).
- `init_from`: 'scratch'; 'resume' continues out_dir/last.pt exactly (model, optimizer, scaler,
  RNG states, data position); a run directory starts from that run's best.pt with a fresh optimizer
  at iteration 0 (fine-tuning), refused when its tokenizer, vocabulary or block size differ from
  the data's.
- A step's loss is the cross-entropy summed over the counted targets (the data's loss mask) of all
  micro-batches and ranks, divided by their total count, so gradient accumulation and DDP give the
  gradient of one big batch. All ranks draw the same global batch (one shared order or generator)
  and take interleaved slices of it: 2 ranks x 8 blocks train on exactly what 1 x 16 would, and
  the sampling state is the same on every rank, so a checkpoint holds it once. (Dropout streams
  differ per rank; a checkpoint keeps rank 0's, and a resumed DDP run re-seeds the others.)
- val_loss / val_ppl / val_bpc come from one fixed set of validation blocks, chosen once from the
  seed, so evaluations are comparable with each other (data_utils.evaluate_blocks computes them,
  as evaluations/perplexity.py does). The set is eval_iters global micro-batches (eval_iters x
  batch_size x processes blocks), as the training batch is: 1 process x 16 blocks and 2 x 8
  score the same blocks (each rank its interleaved share, sums all-reduced) and report the same
  val loss, to float32 rounding; a rank's evaluation work does not grow with the world size.
- Several machines: torchrun's c10d rendezvous (`--nnodes=2 --rdzv_backend=c10d
  --rdzv_endpoint=HOST:PORT`) starts the same ranks one launcher with more processes would, and
  nothing here depends on which machine a rank runs on; checkpoints are written by rank 0 and
  resume under any world size (the sampling state is global).
- Nothing loses a run: last.pt is written (atomically) at every evaluation and when Ctrl-C (exit
  130) or SIGTERM (exit 143, as a shell reports a killed process: a stopped run is not a
  finished one, and pipeline.py must not mark its stage done) stops the run at a step boundary;
  best.pt holds the weights, without optimizer state, of the lowest val loss. A non-finite loss
  stops the run (exit 1) without saving, so the last good checkpoint stays as it was. A new run
  refuses an out_dir that holds one unless `overwrite=True`.
- Errors: the functions below raise typed errors (`TrainingError`, `checkpoint.CheckpointError`,
  `configurator.ConfigError`) with a message saying what to do; only `main` turns them into a
  one-line message and exit status 1. A resumed run drops log lines it will write again and any
  torn line (a kill mid-write) from log.jsonl; every line records `"schema"` (docs/FORMATS.md).
- Precision and compilation decide by measurement (issue 20): `dtype=auto` is `inference.auto_dtype`,
  the rule the evaluations and the engine share (bf16 only where the GPU or CPU computes it
  natively); `compile=auto` compiles on a Linux CPU only when the run is long enough to repay the
  measured warm-up (`choose_compile`). The run prints both choices and why.
- The host reads values from the accelerator only at log steps (loss, gradient norm, the stop
  flag that DDP ranks agree on), so the GPU is never made to wait in between.
- LoRA and DPO live in lora.py and dpo.py; this file only wires them in. `lora_rank > 0` trains
  adapters on the frozen init_from weights and checkpoints hold only the adapter plus a
  hash-checked reference to the base. Data of kind 'dpo' (data/prepare_dpo.py) switches the loss to
  DPO against the frozen init_from checkpoint; batch_size then counts preference pairs, and the
  DPO validation loss picks best.pt.
"""
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data_utils
from checkpoint import CheckpointError, find_checkpoint, load_checkpoint, save_checkpoint
from configurator import ConfigError, configure, settings_help
from data_utils import BadLines, BlockData, atomic_write, evaluate_blocks, load_meta, parse_jsonl_line
from dpo import DPO, pair_rows
from inference import auto_dtype, pick_device
from lora import adapter_entries, setup_training
from model import GPT, GPTConfig
from tokenizer import TokenizerId, load_tokenizer

# ----------------------------------------------------------------------------- settings
# run and data
out_dir = "out/pretrain"
data_dir = "data/processed"
init_from = "scratch"  # 'scratch', 'resume' (out_dir/last.pt) or a run directory to fine-tune
overwrite = False  # let 'scratch' replace a run already in out_dir
# length, evaluation, logging
max_iters = 5000
max_epochs = None  # when set, max_iters = this many passes over the training blocks
eval_interval = 250
eval_iters = 20  # the validation set: eval_iters * batch_size * processes fixed blocks (all of val when fewer):
# fixed by the global batch, so 1 x 16 and 2 x 8 score the same blocks (the ranks share the scoring)
log_interval = 10
wandb_log = False
wandb_project = "minigpt-zh"
wandb_run_name = None
# batches
batch_size = 16
gradient_accumulation_steps = 4
sampling = "random"  # 'random' (with replacement) or 'sequential' (each epoch visits every block once)
# model (block_size and vocabulary come from the data)
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = True  # gpt2 only
arch = "gpt2"  # 'gpt2' (GPT-2: learned positions, LayerNorm, GELU) or 'qwen3' (RoPE, RMSNorm, QK-norm, SwiGLU)
n_kv_head = None  # qwen3: key/value heads for grouped-query attention (None: n_head)
rope_theta = 10000.0  # qwen3
mlp_act = "swiglu"  # qwen3: 'swiglu' (Qwen3's; exports) or 'relu2' (ReLU squared; BENCHMARKS.md, no export)
tie_embeddings = True  # qwen3: share the token embedding with the output layer (gpt2 always does and ignores
# the qwen3-only settings, so `--arch=gpt2` alone turns a qwen3 config back into the GPT-2 model)
# optimizer: 'adamw' for every weight, or 'muon' (torch.optim.Muon) for the blocks' weight matrices
# with AdamW (learning_rate) for embeddings, output layer and gains; warmup, then the lr_schedule
optimizer = "adamw"
learning_rate = 6e-4  # AdamW's
min_lr = 6e-5  # the end of the schedule; Muon's is min_lr / learning_rate * muon_lr
muon_lr = 0.02
muon_momentum = 0.95
muon_weight_decay = 0.0
lr_schedule = "cosine"  # 'cosine' (to min_lr at lr_decay_iters) or 'wsd' (warmup, stable, linear decay)
decay_frac = 0.2  # wsd: the last share of lr_decay_iters spent decaying to min_lr
warmup_iters = 200
lr_decay_iters = None  # default: max_iters
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 turns clipping off
# LoRA (lora.py): lora_rank > 0 trains low-rank adapters on the frozen weights of init_from
lora_rank = 0
lora_alpha = 16
lora_targets = "attn,mlp"
lora_dropout = 0.0
# DPO (dpo.py), used when the data's kind is 'dpo': the frozen init_from checkpoint is the reference
dpo_beta = 0.1
# system
device = "auto"  # auto: cuda > mps > cpu
# auto: bfloat16 on Ampere+ and on CPUs with native bf16, float16 (GradScaler) on older GPUs, else float32
dtype = "auto"
compile = "auto"  # auto: torch.compile on CUDA under Linux; on a Linux CPU when the run repays the warm-up
seed = 1337

DEFAULTS = {k: v for k, v in globals().items()
            if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))}

# dense bf16 (fp16 where there is no bf16) tensor-core peak per GPU, for MFU; more specific names first
PEAK_FLOPS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("A10G", 70e12),
              ("A10", 125e12), ("L40S", 362e12), ("L4", 121e12), ("4090", 165e12), ("3090", 71e12),
              ("A6000", 155e12), ("V100", 125e12), ("T4", 65e12))


LOG_SCHEMA = 1  # the log.jsonl format version, recorded on every line (docs/FORMATS.md)


class TrainingError(Exception):
    """A run that cannot start or go on (bad settings, data that does not fit the checkpoint, a
    non-finite loss); the message says what to do. `main` turns it into an exit status."""


# ----------------------------------------------------------------------------- set-up


# compile=auto on a CPU: torch.compile's measured speed-up of a training step and its warm-up (the
# first step's extra seconds), per dtype, at the CPU preset's shape (BENCHMARKS.md "bf16 and
# torch.compile on the CPU"). float32: bench/bench_recipe.py on this avx2-only 2-core machine, one
# thread, CPU clock (medians 6.128 s/step eager, 5.721 compiled; first compiled step 33.1 s); bfloat16: the
# issue-20 machine with avx512_bf16 (compile + bf16 3,362 tokens/s against eager bf16's 2,624, 46 s).
CPU_COMPILE = {"float32": {"speedup": 6.128 / 5.721, "warmup_s": 33.1 - 5.721},
               "bfloat16": {"speedup": 3362 / 2624, "warmup_s": 46.0}}
# eager float32 FLOP/s of one thread, the same measurement: 4,080 tokens per 6.128 s at the preset's
# 31.9M training FLOPs per token (model.flops_per_token(255)); it turns a run's FLOPs into seconds
CPU_EAGER_FLOPS_PER_THREAD = 4080 / 6.128 * 31.9e6


def choose_compile(setting, device_type, dtype, run_flops=None, threads=1):
    """(compile?, why) for the `compile` setting. auto: on CUDA under Linux always; on a CPU when the
    run is long enough to repay the warm-up: the estimated eager run time T (`run_flops` at
    CPU_EAGER_FLOPS_PER_THREAD x `threads`) saves T x (1 - 1/speedup) seconds, which must exceed the
    warm-up (CPU_COMPILE). Elsewhere (MPS, Windows, macOS) off."""
    if isinstance(setting, bool):
        return setting, "set"
    if setting != "auto":
        raise TrainingError(f"compile must be auto, True or False, not {setting!r}")
    if device_type == "cuda":
        on = sys.platform.startswith("linux")
        return on, "CUDA under Linux" if on else "torch.compile needs Linux here"
    if device_type != "cpu" or not sys.platform.startswith("linux"):
        return False, f"auto compiles only on CUDA and on Linux CPUs, not {device_type} on {sys.platform}"
    if not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
        return False, "no C++ compiler (torch.compile's CPU code is C++)"
    measured = CPU_COMPILE.get(dtype)
    if measured is None or run_flops is None:
        return False, "no measurement for this case"
    speedup, warmup = measured["speedup"], measured["warmup_s"]
    if speedup <= 1:
        return False, f"compiled {dtype} steps were measured {speedup:.2f}x eager on a CPU: no gain to repay"
    eager_s = run_flops / (CPU_EAGER_FLOPS_PER_THREAD * max(1, threads))
    saved = eager_s * (1 - 1 / speedup)
    verdict = "repays" if saved > warmup else "does not repay"
    return saved > warmup, (f"the run is ~{eager_s:,.0f} s eager; compile ({speedup:.2f}x for {dtype}) saves "
                            f"~{saved:,.0f} s, which {verdict} its ~{warmup:.0f} s warm-up")


def setup_runtime(cfg):
    """Processes, device and precision: what the run executes on. Compilation is chosen in
    `train` (choose_compile), once the run's length is known; `rt.compile` is the setting until then."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # started by torchrun
    rank, world, local_rank = 0, 1, 0
    device = pick_device(cfg.device)
    if ddp:
        rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        if device == "cuda":
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    device_type = device.split(":")[0]
    dtype, dtype_why = cfg.dtype, "set"
    if dtype == "auto":
        dtype, dtype_why = auto_dtype(device)  # bf16 on a CPU only with native bf16 (inference.auto_dtype)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise TrainingError(f"dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and newer
    if not isinstance(cfg.compile, bool) and cfg.compile != "auto":
        raise TrainingError(f"compile must be auto, True or False, not {cfg.compile!r}")
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=getattr(torch, dtype))
    return SimpleNamespace(ddp=ddp, rank=rank, world=world, master=rank == 0, device=device,
                           device_type=device_type, dtype=dtype, dtype_why=dtype_why, ctx=ctx,
                           compile=cfg.compile is True, compile_why="set")


def check_compatible(ckpt, source, meta, data_dir, vocab_size):
    """Refuse a checkpoint whose ids or positions would mean something else with this data."""
    args, problems = ckpt["model_args"], []
    theirs, ours = TokenizerId.from_json(ckpt["tokenizer"]), TokenizerId.from_json(meta["tokenizer"])
    if theirs != ours:
        problems.append(f"tokenizer {theirs.short()} vs {ours.short()}")
    if args["vocab_size"] != vocab_size:
        problems.append(f"vocabulary {args['vocab_size']} vs {vocab_size}")
    if args["block_size"] != meta["block_size"]:
        problems.append(f"block size {args['block_size']} vs {meta['block_size']}")
    if problems:
        raise TrainingError(f"{source} does not fit the data in {data_dir} ({'; '.join(problems)}): prepare the data "
                         f"with the run's tokenizer and block size, e.g. python data/prepare_sft.py "
                         f"--tokenizer {Path(source).parent}/tokenizer --block_size {args['block_size']}")


def build_model(cfg, meta, out_dir):
    """The one place the model is made: from scratch, from last.pt (resume) or from a run's best.pt.

    Returns the model (on CPU), its GPTConfig fields, the checkpoint it came from (or None) and,
    for a LoRA run, what its checkpoints record about the adapter (else None).
    """
    vocab_size = math.ceil(meta["vocab_size"] / 64) * 64
    # the padding ids past the tokenizer's are no tokens: n_vocab keeps them out of the loss's
    # softmax, so the loss is that of the trimmed model inference.load_run hands the evaluations
    model_args = dict(block_size=meta["block_size"], vocab_size=vocab_size, n_vocab=meta["vocab_size"],
                      n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias,
                      arch=cfg.arch)
    if cfg.arch == "qwen3":  # the qwen3-only fields; gpt2 runs record what they always did, plus arch
        model_args.update(bias=False, n_kv_head=cfg.n_kv_head, rope_theta=cfg.rope_theta,
                          tie_embeddings=cfg.tie_embeddings, mlp_act=cfg.mlp_act)
    ckpt = source = None
    if cfg.init_from == "resume":
        source = out_dir / "last.pt"
        if not source.exists():
            raise TrainingError(f"init_from=resume, but {source} does not exist")
    elif cfg.init_from != "scratch":
        run_dir = Path(cfg.init_from)
        if not run_dir.is_dir():
            raise TrainingError(f"init_from must be 'scratch', 'resume' or a run directory; {run_dir} is none of them")
        if run_dir.resolve() == out_dir.resolve():
            raise TrainingError(f"fine-tuning {run_dir} would overwrite it: choose another out_dir")
        source = find_checkpoint(run_dir, "best")
    if cfg.init_from != "scratch":
        ckpt = load_checkpoint(source)
        check_compatible(ckpt, source, meta, cfg.data_dir, vocab_size)
        # the architecture is the checkpoint's; dropout is a training setting (and runs from before
        # n_vocab was recorded get it from the data, whose tokenizer check_compatible matched)
        model_args = {**ckpt["model_args"], "dropout": cfg.dropout, "n_vocab": meta["vocab_size"]}
    try:
        model = GPT(GPTConfig(**model_args))
    except ValueError as e:
        raise TrainingError(f"model settings: {e}") from None
    if ckpt is not None and "lora" not in ckpt:
        model.load_state_dict(ckpt["model"])
    try:  # LoRA: adapters on the init_from weights, or an adapter run's base + adapter (lora.py)
        adapter = setup_training(model, ckpt, source, cfg.init_from == "resume", cfg.lora_rank, cfg.lora_alpha,
                                 cfg.lora_targets, cfg.lora_dropout)
    except (ValueError, FileNotFoundError) as e:  # bad LoRA settings, a missing or changed base
        raise TrainingError(str(e)) from e
    return model, model_args, ckpt, adapter


# ----------------------------------------------------------------------------- one step


def next_batches(data, cfg, rt, rng, dpo=None):
    """This rank's micro-batches of one step: its interleaved slice of each global draw (for DPO,
    the preference pairs the drawn blocks belong to)."""
    batches = []
    for _ in range(cfg.gradient_accumulation_steps):
        indices = data.next_indices(cfg.batch_size * rt.world, cfg.sampling, rng)[rt.rank::rt.world]
        # trimming all-padding tail columns changes shapes, which would make torch.compile recompile
        batches.append(data.batch(indices if dpo is None else pair_rows(indices), rt.device, trim=not rt.compile))
    return batches


def masked_loss_sum(model, x, y, mask, ctx):
    """Cross-entropy summed over the counted targets. The model's masked mean times the count:
    computed inside the (compiled) forward, so no float32 copy of the logits is made out here."""
    with ctx:
        _, mean = model(x, y, mask)
    return mean * mask.sum()


def train_step(model, batches, optimizer, scaler, cfg, rt, dpo=None):
    """Accumulate the gradient of the step's micro-batches, clip, update; returns (summed loss,
    target count over all ranks, gradient norm or None), left on the device. With `dpo` the loss is
    the DPO loss and the count is of preference pairs."""
    count = sum(mask.sum() if dpo is None else dpo.count(mask) for _, _, mask in batches)
    if rt.ddp:
        dist.all_reduce(count)
    total = torch.zeros((), device=rt.device)
    for i, (x, y, mask) in enumerate(batches):
        last = i == len(batches) - 1
        with model.no_sync() if rt.ddp and not last else nullcontext():
            objective = masked_loss_sum if dpo is None else dpo.loss_sum
            loss_sum = objective(model, x, y, mask, rt.ctx)
            # DDP averages gradients over ranks; times world size, that average becomes the sum
            scaler.scale(loss_sum * rt.world / count.clamp(min=1)).backward()
        total += loss_sum.detach()
    grad_norm = None
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total, count, grad_norm


def ranks_agree(model, rt):
    """Whether every rank holds the same weights, from one all-gather of a float64 checksum (sum and
    sum of squares). DDP keeps them equal; a machine running other code or kernels would drift
    silently, so this runs at each evaluation (a few hundred bytes)."""
    if not rt.ddp:
        return True
    with torch.no_grad():
        params = list(model.parameters())
        check = torch.stack([sum(p.double().sum() for p in params), sum(p.double().square().sum() for p in params)])
    gathered = [torch.zeros_like(check) for _ in range(rt.world)]
    dist.all_gather(gathered, check)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def lr_at(it, cfg):
    """Linear warmup to learning_rate, then either cosine decay to min_lr at lr_decay_iters
    (lr_schedule 'cosine', also when cfg has none) or 'wsd': warmup, stable at learning_rate, and a
    linear decay to min_lr over the last decay_frac of lr_decay_iters. Each param group gets this
    times its `lr_scale` (Muon's learning rate relative to AdamW's)."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    if getattr(cfg, "lr_schedule", "cosine") == "wsd":
        decay_start = max(cfg.warmup_iters, decay_iters - round(cfg.decay_frac * decay_iters))
        if it < decay_start:
            return cfg.learning_rate
        progress = (it - decay_start) / max(1, decay_iters - decay_start)
        return cfg.learning_rate + progress * (cfg.min_lr - cfg.learning_rate)
    progress = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


# ----------------------------------------------------------------------------- state and logs


def rng_states(rng, rt):
    """Plain values and tensors only (the numpy state is nested ints), so weights_only can load it."""
    states = {"torch": torch.get_rng_state(), "numpy": rng.bit_generator.state}
    if rt.device_type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states, rng, rt, cfg, iter_num):
    rng.bit_generator.state = states["numpy"]
    torch.set_rng_state(states["torch"].cpu())
    if rt.device_type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])
    if rt.rank:  # the checkpoint holds rank 0's dropout stream; the others start afresh, distinct
        torch.manual_seed(cfg.seed + 1000 * iter_num + rt.rank)


class StopRequest:
    """Ctrl-C and SIGTERM ask the loop to save and stop at the next step boundary; a second Ctrl-C
    interrupts at once (without saving). A SIGTERM after Ctrl-C changes nothing: torchrun sends one
    to its workers when it is interrupted itself."""

    def __init__(self, verbose):
        self.signum, self.verbose = 0, verbose
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.signum and self.verbose:
            print("\nstopping after this step to save last.pt (Ctrl-C again to quit without saving)", flush=True)
        self.signum = self.signum or signum

    def agreed(self, rt, it, log_interval):
        """The signal number once every rank has heard of it (DDP ranks compare notes at log steps)."""
        if not rt.ddp:
            return self.signum
        if it % log_interval:
            return 0
        flag = torch.tensor(self.signum, device=rt.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def lines_before(path, resume_iter):
    """The lines of log.jsonl logged before iteration `resume_iter` (the steps after the checkpoint
    run again), as text. A torn line (a kill in the middle of a write) or any other malformed line is
    dropped and reported, never fatal."""
    bad, keep = BadLines(), []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            obj = parse_jsonl_line(raw, f"{path}:{lineno}", bad, required=())
            if obj is None:
                continue
            if not isinstance(obj.get("iter"), int):
                bad.add(f"{path}:{lineno}", "no integer 'iter'")
            elif obj["iter"] < resume_iter:
                keep.append(raw.decode("utf-8").rstrip("\r\n") + "\n")
    bad.report("malformed lines of the training log (dropped)")
    return keep


class Log:
    """log.jsonl (and wandb when enabled) on rank 0; other ranks write nothing. Every line records
    the format version (`"schema": LOG_SCHEMA`)."""

    def __init__(self, path, cfg, rt, resume_iter):
        self.path, self.active, self.wandb = path, rt.master, None
        if not self.active:
            return
        if resume_iter is None:
            path.unlink(missing_ok=True)
        elif path.exists():
            lines = lines_before(path, resume_iter)
            with atomic_write(path, "w") as f:
                f.write("".join(lines))
        if cfg.wandb_log:
            try:
                import wandb
            except ImportError:
                raise TrainingError("wandb_log=True needs wandb: pip install wandb") from None
            self.wandb = wandb
            wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=vars(cfg))

    def write(self, record):
        if not self.active:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"schema": LOG_SCHEMA, **record}) + "\n")
        if self.wandb:
            self.wandb.log(record, step=record["iter"])


def peak_flops(rt):
    if rt.device_type != "cuda":
        return None
    name = torch.cuda.get_device_name(rt.device)
    return next((flops for key, flops in PEAK_FLOPS if key in name), None)


# ----------------------------------------------------------------------------- the run


def main(argv=None):
    """The command line: settings in, exit status out (the typed errors of the run become messages)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(settings_help(DEFAULTS))
        return
    rt = None
    try:
        cfg = SimpleNamespace(**configure(DEFAULTS, argv))
        if cfg.sampling not in ("random", "sequential"):
            raise TrainingError(f"sampling must be 'random' or 'sequential', not {cfg.sampling!r}")
        for key, allowed in (("optimizer", ("adamw", "muon")), ("lr_schedule", ("cosine", "wsd"))):
            if getattr(cfg, key) not in allowed:
                raise TrainingError(f"{key} must be one of {allowed}, not {getattr(cfg, key)!r}")
        if not 0 < cfg.decay_frac <= 1:
            raise TrainingError(f"decay_frac must be in (0, 1], not {cfg.decay_frac}")
        rt = setup_runtime(cfg)
        status = train(cfg, rt, argv)
    except (ConfigError, TrainingError, CheckpointError, FileNotFoundError) as e:
        # other ranks exit quietly: rank 0 says what happened
        raise SystemExit(str(e) if rt is None or rt.master else 1) from None
    finally:
        if rt is not None and rt.ddp:
            dist.destroy_process_group()
    if status:
        raise SystemExit(status)


def train(cfg, rt, argv):
    """The run; returns its exit status (0 when done; 130 stopped by Ctrl-C, 143 by SIGTERM)."""
    say = print if rt.master else (lambda *a, **k: None)
    out_dir = Path(cfg.out_dir)
    meta = load_meta(cfg.data_dir)
    kind = meta["kind"]
    tok = load_tokenizer(meta["tokenizer"])
    if tok.identity != TokenizerId.from_json(meta["tokenizer"]):
        raise TrainingError(f"the tokenizer at {tok.identity.path} changed since {cfg.data_dir} was prepared")
    if cfg.init_from != "resume" and (out_dir / "last.pt").exists() and not cfg.overwrite:
        raise TrainingError(f"{out_dir} already holds a run: continue it with --init_from=resume, replace it with "
                         f"--overwrite=True, or choose another --out_dir")
    train_data = BlockData(cfg.data_dir, "train", cfg.seed)
    val_data = BlockData(cfg.data_dir, "val", cfg.seed)
    rows_per_draw = 2 if kind == "dpo" else 1  # DPO draws a preference pair (two rows) per index
    blocks_per_iter = cfg.batch_size * cfg.gradient_accumulation_steps * rt.world * rows_per_draw
    tokens_per_iter = blocks_per_iter * (meta["block_size"] - 1)
    if cfg.max_epochs is not None:
        cfg.max_iters = math.ceil(cfg.max_epochs * train_data.n_blocks / blocks_per_iter)

    torch.manual_seed(cfg.seed + rt.rank)
    rng = np.random.default_rng(cfg.seed)  # the same on every rank: they share the global batch draw
    model, model_args, ckpt, adapter = build_model(cfg, meta, out_dir)
    dpo = None
    if kind == "dpo":  # preference pairs (dpo.py): the init_from checkpoint, frozen, is the reference model
        try:
            dpo = DPO.for_run(cfg.init_from, ckpt, cfg.dpo_beta, rt.device)
        except (ValueError, FileNotFoundError) as e:  # no init_from, a missing or changed reference
            raise TrainingError(str(e)) from e
    model.to(rt.device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), rt.device_type,
                                           cfg.optimizer, cfg.muon_lr, cfg.muon_momentum, cfg.muon_weight_decay)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == "float16")
    iter_num, best_val_loss, elapsed = 0, float("inf"), 0.0
    if cfg.init_from == "resume":
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        iter_num, best_val_loss, elapsed = ckpt["iter_num"], ckpt["best_val_loss"], ckpt["elapsed"]
        train_data.load_state(ckpt["data_state"])
        restore_rng(ckpt["rng"], rng, rt, cfg, iter_num)
    ckpt = None  # free the loaded copy of the weights
    raw_model = model
    if cfg.compile == "auto":
        steps_left = max(0, cfg.max_iters - iter_num)
        run_flops = raw_model.flops_per_token(meta["block_size"] - 1) * tokens_per_iter * steps_left
        rt.compile, rt.compile_why = choose_compile("auto", rt.device_type, rt.dtype, run_flops,
                                                    torch.get_num_threads())
    if rt.compile:
        model = torch.compile(model)
    # on a CPU the evaluation runs eager: compiling its no-grad forward too would add a second warm-up
    # that compile=auto's measured one (the training step's) does not include
    eval_model = raw_model if rt.compile and rt.device_type == "cpu" else model
    if rt.ddp:
        model = DDP(model, device_ids=[rt.device] if rt.device_type == "cuda" else None)

    if rt.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in data_utils.remove_stale_temporaries(out_dir, ("last.pt", "best.pt", "log.jsonl")):  # kill -9
            say(f"removed {stale}, left by a run that was killed")
        tok.save(out_dir / "tokenizer")
        if cfg.init_from != "resume":
            for stale in ("best.pt", "last.pt"):
                (out_dir / stale).unlink(missing_ok=True)
    log = Log(out_dir / "log.jsonl", cfg, rt, iter_num if cfg.init_from == "resume" else None)
    n_val = min(cfg.eval_iters * cfg.batch_size * rt.world, val_data.n_blocks)  # set by the global batch
    val_indices = np.sort(np.random.default_rng(cfg.seed).choice(val_data.n_blocks, n_val, replace=False))
    peak = peak_flops(rt)
    flops_per_token = raw_model.flops_per_token(meta["block_size"] - 1)

    say(f"data: {cfg.data_dir} ({kind}): {train_data.n_blocks:,} train / {val_data.n_blocks:,} val blocks of "
        f"{meta['block_size']} tokens; vocabulary {meta['vocab_size']:,} (padded to {model_args['vocab_size']:,}), "
        f"tokenizer {tok.identity.short()}; validating on {n_val} of {val_data.n_blocks:,} blocks")
    say(f"model: {model_args.get('arch', 'gpt2')}, "
        f"{model_args['n_layer']} layers, {model_args['n_head']} heads, {model_args['n_embd']} wide: "
        f"{raw_model.num_params() / 1e6:.2f}M parameters ({raw_model.num_params(False) / 1e6:.2f}M with positions); "
        f"from {cfg.init_from}" + (f" at iteration {iter_num}" if iter_num else ""))
    if adapter:
        trainable = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
        say(f"LoRA {adapter['lora_config']}: {trainable:,} trainable parameters on {adapter['base']['path']}")
    if dpo:
        say(f"DPO: beta {cfg.dpo_beta}, reference model {dpo.reference['path']}")
    say(f"precision: {rt.dtype} ({rt.dtype_why}); compile {'on' if rt.compile else 'off'} ({rt.compile_why})")
    say(f"training: {rt.device}, {rt.dtype}, compile {'on' if rt.compile else 'off'}, {rt.world} process(es); "
        f"{tokens_per_iter:,} tokens per step ({cfg.batch_size} x {cfg.gradient_accumulation_steps} x {rt.world} "
        f"blocks); {cfg.max_iters} steps = {cfg.max_iters * blocks_per_iter / train_data.n_blocks:.2f} epochs; "
        f"{cfg.optimizer}, lr {cfg.learning_rate:g} -> {cfg.min_lr:g}"
        + (f" (Muon {cfg.muon_lr:g})" if cfg.optimizer == "muon" else "") + f", {cfg.lr_schedule}; out_dir {out_dir}")

    def save(path, with_state=True):
        weights = {"model": raw_model.state_dict()} if adapter is None else adapter_entries(raw_model, adapter)
        state = {**weights, "model_args": model_args, "iter_num": iter_num,
                 "best_val_loss": best_val_loss, "config": vars(cfg), "tokenizer": tok.identity.to_json(), "kind": kind}
        if dpo is not None:
            state["dpo_reference"] = dpo.reference
        if with_state:
            state.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), data_state=train_data.state(),
                         rng=rng_states(rng, rt), elapsed=elapsed + time.time() - t_start)
        save_checkpoint(state, path)

    def fail_nonfinite(what):
        raise TrainingError(f"{what} is not finite at iteration {iter_num}: stopping without saving; the last good "
                            f"checkpoint is {out_dir / 'last.pt'}. Try a lower learning_rate, grad_clip or float32.")

    stop = StopRequest(rt.master)
    t_start = t_log = time.time()
    iter_at_log = iter_num
    last_loss = torch.zeros(())
    try:
        while True:
            signum = stop.agreed(rt, iter_num, cfg.log_interval)
            if signum:
                if not math.isfinite(float(last_loss)):
                    fail_nonfinite("the training loss")
                if rt.master:
                    save(out_dir / "last.pt")
                    command = " ".join(["python train.py", *(a for a in argv if not a.startswith("--init_from=")),
                                        "--init_from=resume"])
                    say(f"stopped at iteration {iter_num}: saved {out_dir / 'last.pt'}; continue with: {command}")
                return 128 + signum  # 130 after Ctrl-C, 143 after SIGTERM

            if iter_num % cfg.eval_interval == 0 or iter_num >= cfg.max_iters:
                t_eval = time.time()
                metrics = evaluate_blocks(eval_model, val_data, val_indices, tok, cfg.batch_size, rt.device, rt.ctx,
                                          rt.rank, rt.world)
                if dpo is not None:  # DPO loss, margin and accuracy on the validation pairs; best.pt by that loss
                    metrics |= dpo.evaluate(eval_model, val_data, val_indices, cfg.batch_size, rt.device, rt.ctx)
                if not ranks_agree(raw_model, rt):
                    raise TrainingError(f"the ranks hold different weights at iteration {iter_num}: check that "
                                        f"every machine runs the same code, data and library versions")
                score = metrics["loss"] if dpo is None else metrics["dpo_loss"]
                if not math.isfinite(score):
                    fail_nonfinite("the validation loss")
                dpo_metrics = {f"val_{k}": v for k, v in metrics.items() if k.startswith("dpo_")}
                log.write({"iter": iter_num, "val_loss": metrics["loss"], "val_ppl": metrics["ppl"],
                           "val_bpc": metrics["bpc"], **dpo_metrics, "tokens": iter_num * tokens_per_iter,
                           "time": round(elapsed + time.time() - t_start, 2)})
                say(f"eval {iter_num}: val loss {metrics['loss']:.4f}, ppl {metrics['ppl']:.2f}, "
                    f"bpc {metrics['bpc'] or float('nan'):.4f}"
                    + (f"; DPO loss {metrics['dpo_loss']:.4f}, margin {metrics['dpo_margin']:.3f}, "
                       f"accuracy {metrics['dpo_acc']:.2f}" if dpo else "")
                    + (f"; the {rt.world} ranks hold identical weights" if rt.ddp else ""))
                if rt.master:
                    if score < best_val_loss:
                        best_val_loss = score
                        save(out_dir / "best.pt", with_state=False)
                    save(out_dir / "last.pt")
                t_log += time.time() - t_eval  # throughput counts training time only
            if iter_num >= cfg.max_iters:
                break

            lr = lr_at(iter_num, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # checkpoints before lr_scale: AdamW alone
            loss_sum, count, grad_norm = train_step(model, next_batches(train_data, cfg, rt, rng, dpo), optimizer,
                                                    scaler, cfg, rt, dpo)
            last_loss = loss_sum / count.clamp(min=1)  # this rank's share; exact once all-reduced below
            iter_num += 1
            if (iter_num - 1) % cfg.log_interval == 0:
                if rt.ddp:
                    dist.all_reduce(loss_sum)
                    last_loss = loss_sum / count.clamp(min=1)
                loss = float(last_loss)
                if not math.isfinite(loss):
                    fail_nonfinite("the training loss")
                now = time.time()
                tokens_per_sec = tokens_per_iter * (iter_num - iter_at_log) / max(now - t_log, 1e-9)
                t_log, iter_at_log = now, iter_num
                record = {"iter": iter_num - 1, "loss": loss, "lr": lr, "tokens_per_sec": round(tokens_per_sec)}
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                if peak:
                    record["mfu"] = flops_per_token * tokens_per_sec / (peak * rt.world)
                if dpo is not None:
                    record.update(dpo.take_stats())  # mean reward margin and accuracy since the last log line
                record.update(tokens=iter_num * tokens_per_iter, time=round(elapsed + now - t_start, 2))
                log.write(record)
                say(f"iter {iter_num - 1}: loss {loss:.4f}, lr {lr:.2e}, {tokens_per_sec:,.0f} tok/s"
                    + (f", mfu {record['mfu']:.1%}" if peak else "")
                    + (f", margin {record['dpo_margin']:.3f}, accuracy {record['dpo_acc']:.2f}" if dpo else ""))
    finally:
        stop.restore()
        if log.wandb:
            log.wandb.finish()

    say(f"done: best val loss {best_val_loss:.4f} in {out_dir / 'best.pt'}")
    if kind == "pretrain":
        say(f"next: python sample.py --out_dir={out_dir}\n"
            f"  or fine-tune it: python train.py config/train_config_sft.py --init_from={out_dir}")
    else:
        say(f"next: python sample.py --out_dir={out_dir} --mode=qa   (--mode=chat for dialogue data)")


if __name__ == "__main__":
    main()
