"""Direct Preference Optimisation (DPO, Rafailov et al. 2023): the loss and the pair batches.

    python data/prepare_dpo.py --input ../shared/data/qa/cmrc2018_trial.json --out data/dpo --sft_run out/sft
    python train.py config/train_config_dpo.py

Design choices:
- Preference data is ordinary SFT blocks in pairs: row 2i = prompt + chosen answer, row 2i+1 =
  prompt + rejected answer (data/prepare_dpo.py writes them, meta kind "dpo"). The response spans
  are therefore exactly what `data_utils.loss_mask(..., kind="sft")` marks, and nothing about the
  block format is new.
- A sequence's log-probability is the *sum* over its response tokens (prompt and padding masked),
  as in the paper; the implicit reward of a response is beta * (log pi - log pi_ref).
- The reference model is the frozen starting point of the policy: the checkpoint `init_from`
  names (the SFT run's best.pt; with LoRA the same base the adapters sit on), loaded from file by
  path and sha256 (`checkpoint.checkpoint_reference`) and recorded in the run's checkpoints, so a
  resumed run compares against the very same model. It runs without gradients.
- `batch_size` counts pairs: a batch of n drawn block indices becomes the n pairs those blocks
  belong to (2n rows), so uniform block sampling is uniform pair sampling (with `sequential`
  sampling an epoch of blocks visits every pair twice, in shuffled order).
"""
import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import checkpoint_reference, find_checkpoint, load_referenced
from inference import model_from_checkpoint


def sequence_logps(logits, y, mask):
    """Per-row sum of log p(y_t) over the positions where `mask` is true: (B, T, V), (B, T) -> (B,)."""
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return (logps * mask.to(logps.dtype)).sum(-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1):
    """Mean of -log sigmoid(beta * ((pc - rc) - (pr - rr))), plus the per-pair implicit rewards."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def pair_rows(block_indices):
    """Block indices drawn by BlockData -> the rows of the pairs they belong to, chosen first."""
    pairs = np.asarray(block_indices) // 2
    return np.stack([2 * pairs, 2 * pairs + 1], axis=1).reshape(-1)


class DPO:
    """train.py's objective on preference data: the reference model, the loss of a micro-batch and
    the statistics to log.

    `reference` = `checkpoint.checkpoint_reference(...)` of the policy's starting checkpoint; it is
    recorded in the run's checkpoints (key `dpo_reference`) so a resumed run compares against the
    same, hash-checked, model. Statistics accumulate on the device and are read only at log steps.
    """

    def __init__(self, reference, beta, device):
        self.reference, self.beta = reference, beta
        ref_ckpt = load_referenced(reference, "the DPO reference checkpoint", hint="")
        self.ref_model = model_from_checkpoint(ref_ckpt, device)
        for p in self.ref_model.parameters():
            p.requires_grad_(False)
        self._sums = torch.zeros(3, device=device)  # margin sum, pairs with margin > 0, pairs

    @classmethod
    def for_run(cls, init_from, ckpt, beta, device):
        """train.py's DPO: the reference is the checkpoint `init_from` names (the SFT run's best.pt),
        or, when resuming, the one the run recorded."""
        if init_from == "scratch":
            raise ValueError("DPO needs init_from = the SFT run to start from (it is also the reference model)")
        reference = ckpt["dpo_reference"] if init_from == "resume" else checkpoint_reference(find_checkpoint(init_from))
        return cls(reference, beta, device)

    def margins(self, model, x, y, mask, ctx):
        """Mean DPO loss of interleaved (chosen, rejected) rows and each pair's reward margin."""
        n = self.ref_model.config.n_vocab  # padding ids are no tokens: not in the softmax (None: old runs)
        with ctx:
            policy = sequence_logps(model(x)[0][..., :n], y, mask)
            with torch.no_grad():
                ref = sequence_logps(self.ref_model(x)[0][..., :n], y, mask)
        loss, chosen, rejected = dpo_loss(policy[0::2], policy[1::2], ref[0::2], ref[1::2], self.beta)
        return loss, chosen - rejected

    @staticmethod
    def count(mask):
        """What a micro-batch's loss is summed over: its pairs (a tensor, like the masked-token count)."""
        return torch.tensor(mask.size(0) // 2, device=mask.device)

    def loss_sum(self, model, x, y, mask, ctx):
        """The micro-batch's DPO loss summed over its pairs; its margins go into the statistics."""
        loss, margin = self.margins(model, x, y, mask, ctx)
        self._sums += torch.stack([margin.sum(), (margin > 0).float().sum(), margin.new_tensor(margin.numel())])
        return loss * margin.numel()

    def take_stats(self):
        """Mean reward margin and accuracy since the last call (log.jsonl's dpo_margin, dpo_acc)."""
        margin, correct, pairs = self._sums.tolist()
        self._sums.zero_()
        return {"dpo_margin": margin / max(pairs, 1), "dpo_acc": correct / max(pairs, 1)}

    @torch.no_grad()
    def evaluate(self, model, data, indices, batch_size, device, ctx):
        """DPO loss, margin and accuracy over the pairs of the given validation blocks."""
        pairs = np.unique(np.asarray(indices) // 2)
        was_training = model.training
        model.eval()
        losses, margins = [], []
        for start in range(0, len(pairs), batch_size):
            x, y, mask = data.batch(pair_rows(2 * pairs[start:start + batch_size]), device, kind="sft")
            loss, margin = self.margins(model, x, y, mask, ctx)
            losses.append(loss * margin.numel())
            margins.append(margin)
        model.train(was_training)
        margin = torch.cat(margins).float()
        return {"dpo_loss": float(sum(losses)) / margin.numel(), "dpo_margin": float(margin.mean()),
                "dpo_acc": float((margin > 0).float().mean())}
