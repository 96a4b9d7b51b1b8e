"""Comparing n-gram tables: one path's changes between two models, and a table against a
reference (true chain rows or corpus counts)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from jetgraph.applications.ngrams.contexts import all_contexts
from jetgraph.applications.ngrams.sweep import evaluate_path, path_schedule
from jetgraph.ir import ResidualProgram
from jetgraph.passes.paths import context_tokens, path_term, view_of_term


@torch.no_grad()
def diff_tables(prog_a: ResidualProgram, prog_b: ResidualProgram, path: str, top: int = 50,
                contexts: torch.Tensor | None = None, chunk: int = 1024,
                progress: bool = True) -> dict[str, list[tuple[int, int, float, float]]]:
    """Ranked changes of one path's bigram probabilities from model A to model B.

    Returns the ``top`` largest increases and decreases as (context row, next token, p_A, p_B).
    Both models must share a vocabulary."""
    term_a, term_b = path_term(prog_a, path), path_term(prog_b, path)
    va, vb = prog_a.decoder.unembedding, prog_b.decoder.unembedding
    if va is None or vb is None or va.shape[0] != vb.shape[0]:
        raise ValueError("diff_tables needs two models with the same vocabulary size "
                         f"({None if va is None else va.shape[0]} vs {None if vb is None else vb.shape[0]})")
    vocab = int(va.shape[0])
    contexts = all_contexts(vocab, context_tokens(term_a)) if contexts is None else torch.as_tensor(contexts)
    schedules = [path_schedule(view_of_term(p, t), t) for p, t in ((prog_a, term_a), (prog_b, term_b))]
    best = {"increase": (torch.empty(0), torch.empty(0, dtype=torch.long)),
            "decrease": (torch.empty(0), torch.empty(0, dtype=torch.long))}
    probs_at: dict[int, tuple[float, float]] = {}
    for start in tqdm(range(0, contexts.shape[0], chunk), desc="diff", disable=not progress, leave=False):
        ids = contexts[start:start + chunk]
        pa = evaluate_path(schedules[0], ids).float().softmax(-1)
        pb = evaluate_path(schedules[1], ids).float().softmax(-1)
        delta = (pb - pa).reshape(-1)
        for direction, sign in (("increase", 1.0), ("decrease", -1.0)):
            values, flat = (sign * delta).topk(min(top, delta.numel()))
            flat = flat + start * vocab
            for f in flat.tolist():
                r, c = divmod(f, vocab)
                probs_at[f] = (pa[r - start, c].item(), pb[r - start, c].item())
            merged_v = torch.cat([best[direction][0], values])
            merged_i = torch.cat([best[direction][1], flat])
            keep = merged_v.topk(min(top, merged_v.numel())).indices
            best[direction] = (merged_v[keep], merged_i[keep])
    result = {}
    for direction, (_, flat) in best.items():
        result[direction] = [(divmod(f, vocab)[0], divmod(f, vocab)[1], *probs_at[f]) for f in flat.tolist()]
    return result


def compare_to_reference(table_logits: torch.Tensor, reference: torch.Tensor,
                         k: int = 100) -> dict[str, float]:
    """A full jet bigram table against a reference (true chain rows or corpus counts), both
    [V, V] (rows: context token). Reports the top-1 hit ratio per row (rows with data), the mean
    KL(reference row ‖ jet row), the global top-k hit ratio |top-k jet ∩ top-k reference| / k and
    the total mass: the share of the reference's joint bigram mass that the jet's top-k covers."""
    reference = reference.double()
    counts = reference.sum(-1)
    rows = counts > 0
    ref_rows = reference[rows] / counts[rows, None]
    jet_log = table_logits[rows].double().log_softmax(-1)
    top1 = (jet_log.argmax(-1) == ref_rows.argmax(-1)).double().mean().item()
    kl = (ref_rows * (torch.log(ref_rows.clamp_min(1e-300)) - jet_log)).where(ref_rows > 0,
                                                                              torch.zeros(())).sum(-1)
    joint = reference / reference.sum()
    jet_joint = table_logits.double().log_softmax(-1)
    jet_top = set(jet_joint.where(rows[:, None], torch.tensor(-torch.inf, dtype=torch.double))
                  .flatten().topk(k).indices.tolist())
    ref_top = set(joint.flatten().topk(k).indices.tolist())
    mass = joint.flatten()[list(jet_top)].sum().item()
    return {"top1_hit_ratio": top1, "mean_kl": kl.mean().item(),
            f"top{k}_hit_ratio": len(jet_top & ref_top) / k, f"top{k}_mass": mass, "rows": int(rows.sum())}
